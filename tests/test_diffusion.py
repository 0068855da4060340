import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pllm.diffusion import SCHEDULES, diffusion_loss, evaluate_elbo, get_schedule, mask_tokens, sample_t

MASK = 3


class FixedLogits(nn.Module):
    """A stand-in denoiser with known per-position logits, to check the loss arithmetic."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = nn.Parameter(table)
        self.seen_inputs = None

    def forward(self, x, t=None, attention_mask=None, logits_mask=None, loss_targets=None, loss_weights=None):
        # The DiffusionTransformer contract: logits, or with loss_targets the weighted CE sum.
        self.seen_inputs = x.clone()
        logits = self.table[: x.shape[1]].expand(x.shape[0], -1, -1)
        if logits_mask is not None:  # a bool (B, L) mask or the flat indices of its True positions
            logits = logits[logits_mask] if logits_mask.dtype == torch.bool else logits.flatten(0, 1)[logits_mask]
        if loss_targets is None:
            return logits
        return (torch.nn.functional.cross_entropy(logits, loss_targets, reduction="none") * loss_weights).sum()


@pytest.mark.parametrize("name", ["linear", "cosine", "sqrt"])
def test_loss_equals_hand_computed_value_when_everything_is_masked(name):
    torch.manual_seed(0)
    table = torch.randn(4, 10)
    model = FixedLogits(table)
    x = torch.tensor([[5, 6, 7, 8], [9, 4, 5, 6]])
    t = torch.ones(2)  # alpha(1) = 0: every token is masked
    out = diffusion_loss(model, x, get_schedule(name), MASK, t=t)
    assert (model.seen_inputs == MASK).all()
    ce = -torch.log_softmax(table, -1)
    expected_sum = sum(ce[i, x[b, i]] for b in range(2) for i in range(4))
    weight = {"linear": 1.0, "cosine": math.pi / 2, "sqrt": 0.5}[name]
    assert out.num_masked == 8 and out.num_tokens == 8
    assert torch.allclose(out.loss, weight * expected_sum / 8, rtol=1e-5)


def test_padding_is_never_masked_predicted_or_counted():
    table = torch.randn(5, 10)
    model = FixedLogits(table)
    x = torch.tensor([[0, 0, 5, 6, 7]])
    am = torch.tensor([[0, 0, 1, 1, 1]])
    out = diffusion_loss(model, x, get_schedule("linear"), MASK, attention_mask=am, t=torch.ones(1))
    assert model.seen_inputs[0, :2].tolist() == [0, 0]
    assert out.num_tokens == 3 and out.num_masked == 3
    ce = -torch.log_softmax(table, -1)
    assert torch.allclose(out.loss, (ce[2, 5] + ce[3, 6] + ce[4, 7]) / 3, rtol=1e-5)


@pytest.mark.parametrize("name", ["linear", "cosine", "sqrt"])
def test_elbo_weight_matches_closed_form(name):
    t = torch.linspace(0.01, 0.99, 50, dtype=torch.float64)
    closed = {
        "linear": 1 / t,
        "cosine": (math.pi / 2) * torch.sin(math.pi * t / 2) / (1 - torch.cos(math.pi * t / 2)),
        "sqrt": 1 / (2 * t),
    }[name]
    sched = SCHEDULES[name]
    assert torch.allclose(sched.elbo_weight(t), closed)
    tt = t.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(sched.alpha(tt).sum(), tt)  # alpha' by autograd
    assert torch.allclose(sched.alpha_prime(t), grad)
    assert torch.allclose(sched.alpha(torch.tensor([0.0, 1.0], dtype=torch.float64)), torch.tensor([1.0, 0.0], dtype=torch.float64), atol=1e-12)


@pytest.mark.parametrize("name", ["linear", "cosine", "sqrt"])
def test_mask_rate_follows_the_schedule(name):
    sched = get_schedule(name)
    x = torch.randint(4, 50, (64, 512))
    t = torch.full((64,), 0.3)
    g = torch.Generator().manual_seed(0)
    x_t, masked = mask_tokens(x, t, sched, MASK, torch.ones_like(x, dtype=torch.bool), g)
    assert abs(masked.float().mean().item() - float(1 - sched.alpha(torch.tensor(0.3)))) < 0.01
    assert (x_t[masked] == MASK).all() and torch.equal(x_t[~masked], x[~masked])


def test_low_discrepancy_t_covers_the_interval():
    t = sample_t(8, eps=1e-3, generator=torch.Generator().manual_seed(1))
    assert ((t >= 1e-3) & (t <= 1)).all()
    strata = ((t - 1e-3) / (1 - 1e-3) * 8).floor().long().sort().values
    assert strata.tolist() == list(range(8)) or len(set(strata.tolist())) >= 7  # one t per stratum


def test_validation_elbo_of_a_uniform_model_is_log_vocab():
    """With uniform predictions every masked token costs log V, and E[w(t) * #masked] = L for the
    linear schedule, so the NELBO per token is log V (up to Monte-Carlo noise)."""
    V = 10
    model = FixedLogits(torch.zeros(64, V))
    batches = [torch.randint(4, V, (16, 64)) for _ in range(8)]
    report = evaluate_elbo(model, batches, get_schedule("linear"), MASK, num_samples=4)
    assert report.num_tokens == 8 * 16 * 64
    assert abs(report.nelbo_per_token - math.log(V)) < 0.05 * math.log(V)
    assert math.isclose(report.bits_per_token, report.nelbo_per_token / math.log(2))
    assert math.isclose(report.perplexity_bound, math.exp(report.nelbo_per_token))


def test_loss_backpropagates_only_through_masked_positions():
    table = torch.randn(6, 12)
    model = FixedLogits(table)
    x = torch.tensor([[5, 6, 7, 8, 9, 10]])
    g = torch.Generator().manual_seed(0)
    out = diffusion_loss(model, x, get_schedule("linear"), MASK, t=torch.tensor([0.5]), generator=g)
    out.loss.backward()
    masked = (model.seen_inputs[0] == MASK)
    assert masked.any() and (~masked).any()
    assert (model.table.grad[~masked] == 0).all() and (model.table.grad[masked] != 0).any()
    expected = F.cross_entropy(table[masked], x[0][masked], reduction="sum") / 0.5 / 6
    assert torch.allclose(out.loss, expected, rtol=1e-5)
