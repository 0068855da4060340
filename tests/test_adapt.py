"""task "adapt": an autoregressive checkpoint continued as a diffusion LM. The config refuses what does
not fit; the checkpoint's causal attention becomes bidirectional or block-causal with its logits shift
kept; the annealing masks open the causal mask to bidirectional as scheduled, the same on every rank;
a masked step computes exactly what the causal model does; shifted block diffusion trains what
decoding computes; and a tiny Llama checkpoint adapts under FSDP2 on 2 Ray workers, its validation
ELBO falling."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from pydantic import ValidationError

from conftest import tiny_config
from hf_fixtures import cases, reference_model, write_checkpoint
from pllm import DiffusionTransformer, DistributedTrainer, TrainingConfig
from pllm.adaptation import adapted_model_config, annealing_mask, annealing_seed, future_fraction
from pllm.config import AdaptSettings, JobConfig
from pllm.diffusion import diffusion_loss, get_schedule
from pllm.hf import CheckpointError
from pllm.pipelines.job_stages import resolve_init

LLAMA = cases()["llama"]
AR = dict(attention_mode="block_causal", block_size=1, logits_shift=True)  # as an autoregressive base imports
MASK = 3
TRAINING = dict(batch_size=4, seq_len=64, learning_rate=3e-3, warmup_steps=1, num_train_steps=8, eval_interval=2,
                eval_batches=2, log_interval=2, use_torch_compile=False, use_cuda_graphs=False,
                gradient_checkpointing=False, mixed_precision="no", weight_decay=0.01)


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Path:
    return write_checkpoint(LLAMA, reference_model(LLAMA), tmp_path_factory.mktemp("hf") / "llama")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """Text in the tiny tokenizer's words: runs of a 40-word cycle, each from a random start."""
    folder = tmp_path_factory.mktemp("corpus")
    g = torch.Generator().manual_seed(0)
    for f in range(8):
        lines = []
        for start in torch.randint(0, 40, (120,), generator=g).tolist():
            lines.append(" ".join(f"w{4 + (start + 3 * i) % 40}" for i in range(16)))
        (folder / f"part{f}.txt").write_text("\n".join(lines) + "\n")
    return folder


def adapt_job(folder: Path, out: Path, corpus: Path | None = None, adapt: dict | None = None, **model) -> dict:
    job = {"task": "adapt", "model": {"init_from": str(folder), **model},
           "training": {**TRAINING, "output_dir": str(out)},
           "generation": dict(max_new_tokens=8, num_refinement_steps=8, temperature=0.0), "prompt": "w4 w7 w10"}
    if corpus is not None:
        job["data"] = {"paths": [str(corpus)]}
    if adapt is not None:
        job["adapt"] = adapt
    return job


# -- config ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("data, must_mention", [
    ({"task": "adapt"}, ["task 'adapt'", "model.init_from"]),
    ({"adapt": {"mask_anneal_steps": 10}}, ["adapt settings", "task 'adapt'", "'pretrain'"]),
    ({"task": "sft", "model": {"init_from": "x"}, "adapt": {}}, ["adapt settings", "'sft'"]),
    ({"task": "adapt", "model": {"init_from": "x"}, "adapt": {"attention": "block"}}, ["adapt.block_size"]),
    ({"task": "adapt", "model": {"init_from": "x"}, "adapt": {"block_size": 4}}, ["adapt.block_size", "'block'"]),
    ({"task": "adapt", "model": {"init_from": "x"}, "adapt": {"attention": "block", "block_size": 4,
                                                             "mask_anneal_steps": 5}}, ["mask_anneal_steps"]),
    ({"task": "adapt", "model": {"init_from": "x"}, "adapt": {"attention": "causal"}},
     ["attention", "'bidirectional'", "'block'"]),
    ({"task": "adapt", "model": {"init_from": "x"}, "adapt": {"mask_anneal_steps": -1}}, ["mask_anneal_steps"]),
    ({"task": "finetune"}, ["task", "'pretrain'", "'sft'", "'adapt'"]),
    ({"training": {"use_fsdp": False, "fsdp_cpu_offload": True}}, ["fsdp_cpu_offload", "use_fsdp"]),
    ({"training": {"use_fsdp": False, "use_deepspeed": True, "fsdp_cpu_offload": True}}, ["fsdp_cpu_offload"]),
])
def test_the_config_refuses_what_does_not_fit(data, must_mention):
    with pytest.raises(ValidationError) as err:
        JobConfig.from_dict(data)
    assert all(m in str(err.value) for m in must_mention), str(err.value)


def test_task_adapt_has_default_settings_that_survive_a_round_trip():
    job = JobConfig.from_dict({"task": "adapt", "model": {"init_from": "x"}})
    assert job.adapt == AdaptSettings() and (job.adapt.attention, job.adapt.mask_anneal_steps) == ("bidirectional", 0)
    block = JobConfig.from_dict({"task": "adapt", "model": {"init_from": "x"},
                                 "adapt": {"attention": "block", "block_size": 8}})
    assert JobConfig.from_dict(json.loads(block.to_json())) == block
    assert JobConfig().adapt is None and TrainingConfig().fsdp_cpu_offload is False
    assert TrainingConfig(fsdp_cpu_offload=True).fsdp_cpu_offload


# -- the adapted config ------------------------------------------------------------------------------------------------
def test_an_autoregressive_config_becomes_bidirectional_or_block_causal_keeping_its_shift():
    base = tiny_config(**AR)
    bi = adapted_model_config(base, AdaptSettings())
    assert (bi.attention_mode, bi.logits_shift) == ("bidirectional", True)
    assert bi == base.replace(attention_mode="bidirectional")
    block = adapted_model_config(base, AdaptSettings(attention="block", block_size=4))
    assert (block.attention_mode, block.block_size, block.logits_shift) == ("block_causal", 4, True)
    unshifted = adapted_model_config(base.replace(logits_shift=False), AdaptSettings())
    assert unshifted.logits_shift is False  # kept as the checkpoint has it


@pytest.mark.parametrize("checkpoint, must_mention", [
    (dict(attention_mode="bidirectional"), ["already bidirectional", "task: pretrain"]),
    (dict(attention_mode="block_causal", block_size=4, logits_shift=True), ["block-diffusion", "block_size 4"]),
])
def test_adapting_a_diffusion_checkpoint_is_refused(checkpoint, must_mention):
    with pytest.raises(ValueError) as err:
        adapted_model_config(tiny_config(**checkpoint), AdaptSettings())
    assert all(m in str(err.value) for m in must_mention), str(err.value)


def test_resolve_init_adapts_the_llama_checkpoint(llama, tmp_path):
    _, job = resolve_init(JobConfig.from_dict(adapt_job(llama, tmp_path, noise_schedule="linear")))
    m = job.model
    assert (m.attention_mode, m.logits_shift, m.noise_schedule, m.init_from) == ("bidirectional", True, "linear",
                                                                                   str(llama))
    _, block = resolve_init(JobConfig.from_dict(adapt_job(llama, tmp_path, adapt={"attention": "block",
                                                                                   "block_size": 4})))
    assert (block.model.attention_mode, block.model.block_size) == ("block_causal", 4)
    _, plain = resolve_init(JobConfig.from_dict({**adapt_job(llama, tmp_path), "task": "pretrain"}))
    assert (plain.model.attention_mode, plain.model.block_size) == ("block_causal", 1)  # pretrain: as imported
    # adapt chooses the attention: an explicit model.attention_mode / block_size beside it is refused
    for override in (dict(attention_mode="bidirectional"), dict(block_size=4)):
        with pytest.raises(CheckpointError, match=f"model.{next(iter(override))} cannot be set with task 'adapt'"):
            resolve_init(JobConfig.from_dict(adapt_job(llama, tmp_path, **override)))


# -- the annealing schedule and masks ----------------------------------------------------------------------------------
def test_the_visible_future_fraction_rises_linearly_to_one():
    assert [future_fraction(s, 4) for s in (0, 1, 2, 4, 10)] == [0.0, 0.25, 0.5, 1.0, 1.0]
    assert future_fraction(0, 0) == 1.0  # no annealing: bidirectional from the start


def test_annealing_masks_go_from_causal_to_all_visible():
    L = 256
    causal = torch.ones(L, L, dtype=torch.bool).tril()
    assert torch.equal(annealing_mask(L, 0.0, seed=1), causal)
    assert bool(annealing_mask(L, 1.0, seed=1).all())
    future = torch.ones(L, L, dtype=torch.bool).triu(1)
    for fraction in (0.1, 0.5, 0.8):
        mask = annealing_mask(L, fraction, seed=2)
        assert bool(mask[causal].all())  # the past stays visible
        assert float(mask[future].float().mean()) == pytest.approx(fraction, abs=0.02)
    # same seed, same mask (every rank, every resume); another step or micro-batch, another one
    def drawn(step, micro):
        return annealing_mask(L, 0.5, annealing_seed(0, step, micro))

    assert torch.equal(drawn(3, 1), drawn(3, 1))
    assert not torch.equal(drawn(3, 1), drawn(4, 1)) and not torch.equal(drawn(3, 0), drawn(3, 1))


# -- the model under a mask --------------------------------------------------------------------------------------------
def test_a_causal_override_computes_exactly_the_causal_model():
    torch.manual_seed(0)
    causal = DiffusionTransformer(tiny_config(**AR))  # grouped-query attention, shifted logits
    bidirectional = DiffusionTransformer(adapted_model_config(causal.config, AdaptSettings()))
    bidirectional.load_state_dict(causal.state_dict())
    x = torch.randint(4, 90, (3, 24))
    tril = torch.ones(24, 24, dtype=torch.bool).tril()
    with torch.no_grad():
        assert torch.equal(bidirectional.eval()(x, attention_mask_override=tril), causal.eval()(x))
        assert not torch.allclose(bidirectional(x), causal(x))  # without it: bidirectional
        # a (B, 1, L, L) mask, and padding combined with it (padding rows' own outputs are never used)
        pad = torch.ones(3, 24, dtype=torch.long)
        pad[1, 19:] = 0
        real = pad.bool()
        masked = bidirectional(x, attention_mask=pad, attention_mask_override=tril.expand(3, 1, 24, 24))
        assert torch.equal(masked[real], causal(x, attention_mask=pad)[real])
    # ...and through the training loss, gradients included (a masked step runs SDPA, flash off)
    t, draw = torch.full((3,), 0.5), torch.rand(3, 24, generator=torch.Generator().manual_seed(0))
    schedule = get_schedule("linear")
    ours = diffusion_loss(bidirectional.train(), x, schedule, MASK, pad, t=t, mask_draw=draw, attention_override=tril)
    theirs = diffusion_loss(causal.train(), x, schedule, MASK, pad, t=t, mask_draw=draw)
    assert torch.equal(ours.loss, theirs.loss)
    ours.loss.backward()
    theirs.loss.backward()
    assert torch.equal(bidirectional.embed_tokens.weight.grad, causal.embed_tokens.weight.grad)
    with pytest.raises(ValueError, match="attention_mask_override"):
        bidirectional(x, attention_mask_override=tril.float())


# -- shifted block diffusion -------------------------------------------------------------------------------------------
def test_shifted_block_size_one_loss_is_the_next_token_loss():
    """An imported autoregressive model under the block-diffusion objective with one-token blocks:
    each token predicted from the clean tokens before it, as the causal model predicts it."""
    torch.manual_seed(0)
    model = DiffusionTransformer(tiny_config(**AR)).double().eval()
    x = torch.randint(4, 90, (2, 12))
    out = diffusion_loss(model, x, get_schedule("cosine"), MASK, block_size=1)
    with torch.no_grad():
        logits = model(x)  # position i from the clean prefix up to i - 1
        first = model(torch.full((2, 1), MASK))[:, 0]  # position 0 sees only its own mask token
    nll = F.cross_entropy(logits[:, 1:].flatten(0, 1), x[:, 1:].flatten(), reduction="sum")
    nll = nll + F.cross_entropy(first, x[:, 0], reduction="sum")
    assert float(out.nelbo_sum) == pytest.approx(float(nll), rel=1e-6)


def test_shifted_block_diffusion_trains_what_decoding_computes():
    """Fast-dLLM v2's layout: a noisy block's logits in training equal a plain pass over the clean blocks
    before it and that noisy block; its first position reads the finished block before it."""
    torch.manual_seed(0)
    model = DiffusionTransformer(tiny_config(attention_mode="block_causal", block_size=4, logits_shift=True))
    model = model.double().eval()
    clean = torch.randint(4, 90, (1, 16))
    noisy = clean.clone()
    noisy[0, [0, 4, 5, 9, 12, 15]] = MASK
    with torch.no_grad():
        training = model(noisy, clean_input_ids=clean)
        for b in range(4):
            decoding = model(torch.cat([clean[:, :4 * b], noisy[:, 4 * b:4 * b + 4]], 1))[:, 4 * b:]
            torch.testing.assert_close(training[:, 4 * b:4 * b + 4], decoding, rtol=1e-10, atol=1e-10)


# -- the trainer -------------------------------------------------------------------------------------------------------
class Recording(DiffusionTransformer):
    """Records the attention override of every forward call."""

    def __init__(self, config):
        super().__init__(config)
        self.overrides = []

    def forward(self, *args, attention_mask_override=None, **kwargs):
        self.overrides.append((self.training, attention_mask_override))
        return super().forward(*args, attention_mask_override=attention_mask_override, **kwargs)


def test_the_trainer_anneals_the_first_steps_and_evaluates_bidirectionally():
    torch.manual_seed(0)
    model = Recording(tiny_config(logits_shift=True))
    data = [torch.randint(4, 90, (4, 32), generator=torch.Generator().manual_seed(i)) for i in range(4)]
    cfg = TrainingConfig(**{**TRAINING, "seq_len": 32, "num_train_steps": 5, "gradient_accumulation_steps": 2,
                            "eval_interval": 5, "log_interval": 1, "use_fsdp": False})
    seen = []
    trainer = DistributedTrainer(model, cfg, train_dataloader=data, eval_dataloader=data[:1], show_progress=False,
                                 callbacks=[lambda m, step: seen.append(m)], attention_anneal_steps=3)
    trainer.train()
    train_masks = [m for training, m in model.overrides if training]
    assert len(train_masks) == 10 and all(m is None for m in train_masks[6:])  # 3 steps x 2 micro-batches
    tril = torch.ones(32, 32, dtype=torch.bool).tril()
    assert torch.equal(train_masks[0], tril) and torch.equal(train_masks[1], tril)  # step 0: causal
    future = tril.logical_not()
    assert 0 < float(train_masks[4][future].float().mean()) < 1 and not torch.equal(train_masks[4], train_masks[5])
    assert all(m is None for training, m in model.overrides if not training)  # evaluation: bidirectional
    fractions = [m["attention_future_fraction"] for m in seen if "attention_future_fraction" in m]
    assert fractions == pytest.approx([0.0, 1 / 3, 2 / 3, 1.0, 1.0])
    with pytest.raises(ValueError, match="attention_mode is 'block_causal'"):
        DistributedTrainer(DiffusionTransformer(tiny_config(**AR)), cfg, train_dataloader=data,
                           attention_anneal_steps=3)


# -- the jobs ----------------------------------------------------------------------------------------------------------
def test_in_process_adapt_job_saves_a_bidirectional_model(llama, corpus, tmp_path):
    from pllm.checkpoint import load_config
    from pllm.pipelines.in_process_job import run_in_process_job

    job = adapt_job(llama, tmp_path / "run", corpus, adapt={"mask_anneal_steps": 2})
    job["training"] |= {"num_train_steps": 4, "use_fsdp": False}
    result = run_in_process_job(JobConfig.from_dict(job), show_progress=False)
    m = result.metrics
    assert m["step"] == 4 and m["attention_future_fraction"] == 1.0 and "unigram_nats" in m
    cfg = load_config(result.model_dir)
    assert (cfg.attention_mode, cfg.logits_shift) == ("bidirectional", True)
    assert json.loads((tmp_path / "run" / "job_config.json").read_text())["adapt"]["mask_anneal_steps"] == 2


@pytest.mark.slow
def test_ray_job_adapts_a_llama_checkpoint_under_fsdp2_and_its_validation_elbo_falls(llama, corpus, tmp_path,
                                                                                     monkeypatch):
    """The Ray job (FSDP2 on 2 gloo workers, each reading its rows of the checkpoint) adapts an
    autoregressive checkpoint to a bidirectional diffusion LM, annealing its attention over the
    first 4 of 6 steps; the registered model keeps the checkpoint's tokenizer and ids and is a
    starting point in turn."""
    from mlflow.tracking import MlflowClient

    from pllm.checkpoint import load_config

    job = adapt_job(llama, tmp_path / "run", corpus, adapt={"mask_anneal_steps": 4})
    job["training"] |= {"use_fsdp": True, "num_train_steps": 6, "eval_interval": 3}
    job["cluster"] = {"num_workers": 2, "cpus_per_worker": 1.0}
    job["tracking"] = {"registered_model": "pllm-adapt", "alias": "champion"}
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump(job))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    proc = subprocess.run([sys.executable, "-m", "pllm.pipelines.train_job", "--config", str(config),
                           "--output", str(tmp_path / "run"), "--mlflow-uri", uri], cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert (m["step"], m["strategy"], m["world_size"]) == (6, "fsdp2", 2)
    client = MlflowClient(uri)
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    history = {key: [(x.step, x.value) for x in sorted(client.get_metric_history(run.info.run_id, key),
                                                       key=lambda x: x.step)]
               for key in ("val_elbo_nats", "attention_future_fraction")}
    elbo = [v for _, v in history["val_elbo_nats"]]
    assert len(elbo) == 2 and elbo[-1] < elbo[0], elbo
    # the workers annealed: step 2 logged step 1's share of future keys, 1/4; from step 4 on, all
    assert history["attention_future_fraction"] == [(2, 0.25), (4, 0.75), (6, 1.0)]
    cfg = load_config(tmp_path / "run" / "model")
    assert (cfg.attention_mode, cfg.logits_shift, cfg.init_from) == ("bidirectional", True, str(llama))

    # Registered with the checkpoint's tokenizer and special ids...
    from pllm.checkpoint import load_model, load_tokenizer
    from pllm.hf import import_checkpoint
    from pllm.registry import resolve_model_source

    assert "Registered model: models:/pllm-adapt@champion" in proc.stdout
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    _, tokenizer = import_checkpoint(llama)
    folder, _ = resolve_model_source("models:/pllm-adapt@champion", uri)
    model, saved = load_model(folder), load_tokenizer(folder)
    assert saved.special_token_ids == tokenizer.special_token_ids and saved.vocab_size == tokenizer.vocab_size
    assert model.config.mask_token_id == tokenizer.mask_token_id
    # ...and a starting point in turn (our own format now)
    again = JobConfig.from_dict({"model": {"init_from": "models:/pllm-adapt@champion"},
                                 "training": {"output_dir": str(tmp_path / "again")}})
    init, resolved = resolve_init(again, uri)
    assert init.tokenizer.to_json() == saved.to_json()
    assert resolved.model == model.config.replace(init_from="models:/pllm-adapt@champion")
