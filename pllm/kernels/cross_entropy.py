"""Fused masked-diffusion cross-entropy: sum_i w_i * CE(hidden_i @ W^T, target_i), never holding
more than one chunk of logits.

The masked-diffusion loss counts only masked positions, so the model hands over the final hidden
states of those rows alone (its `logits_mask`), and this function runs the LM head and the
cross-entropy chunk by chunk (the approach of Liger-Kernel's fused linear cross-entropy): a chunk's
logits are computed, a Triton kernel turns them *in place* into d(loss)/d(logits) while computing
the loss (online log-sum-exp, one read and one write of the chunk), and the chunk's gradients for
the hidden states and the weight are accumulated at once. Neither the (N, V) logits nor their
float32 copy nor the softmax ever exist for the whole batch. On CPU the chunk's loss and gradient
come from `cross_entropy_rows_reference`, the PyTorch definition the kernel is tested against.
"""

from __future__ import annotations

import torch

from .backend import HAS_TRITON, use_triton

DEFAULT_CHUNK_ROWS = 4096


def cross_entropy_rows_reference(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor,
                                 compute_grad: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-row weighted CE, w_i * (logsumexp(x_i) - x_i[t_i]), in float32, and its gradient with
    respect to the logits, w_i * (softmax(x_i) - onehot(t_i)), in the logits' dtype."""
    x = logits.float()
    lse = x.logsumexp(-1)
    loss = weights.float() * (lse - x.gather(-1, targets[:, None]).squeeze(-1))
    if not compute_grad:
        return loss, None
    grad = (x - lse[:, None]).exp()
    grad[torch.arange(x.shape[0], device=x.device), targets] -= 1.0
    return loss, (grad * weights.float()[:, None]).to(logits.dtype)


def cross_entropy_rows(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor,
                       compute_grad: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`cross_entropy_rows_reference`; on CUDA a Triton kernel that writes the gradient over the
    logits in place (the logits are consumed)."""
    if not use_triton(logits):
        return cross_entropy_rows_reference(logits, targets, weights, compute_grad)
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    N, V = logits.shape
    loss = torch.empty(N, dtype=torch.float32, device=logits.device)
    if N:
        _ce_rows_kernel[(N,)](logits, logits.stride(0), targets.contiguous(), weights.float().contiguous(), loss,
                              V, COMPUTE_GRAD=compute_grad, BLOCK_V=2048, num_warps=8)
    return loss, logits if compute_grad else None


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, hidden, weight, targets, weights, chunk_rows):
        needs_grad = hidden.requires_grad or weight.requires_grad
        grad_hidden = torch.empty_like(hidden) if needs_grad else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if weight.requires_grad else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk_rows):
            h = hidden[start:start + chunk_rows]
            logits = h @ weight.t()  # (n, V), in the autocast dtype under autocast
            loss, grad = cross_entropy_rows(logits, targets[start:start + chunk_rows],
                                            weights[start:start + chunk_rows], compute_grad=needs_grad)
            total += loss.sum()
            if needs_grad:
                grad_hidden[start:start + chunk_rows] = (grad @ weight.to(grad.dtype)).to(hidden.dtype)
                if grad_weight is not None:
                    grad_weight += (grad.t() @ h.to(grad.dtype)).float()
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, grad_output):
        grad_hidden, grad_weight = ctx.saved_tensors
        gh = grad_hidden * grad_output.to(grad_hidden.dtype) if grad_hidden is not None else None
        gw = (grad_weight * grad_output).to(ctx.weight_dtype) if grad_weight is not None else None
        return gh, gw, None, None, None


@torch.compiler.disable  # data-dependent row counts and a Python chunk loop: run eagerly
def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         weights: torch.Tensor | None = None, chunk_rows: int = DEFAULT_CHUNK_ROWS) -> torch.Tensor:
    """sum_i weights_i * cross_entropy(hidden_i @ weight^T, targets_i) as a float32 scalar.
    hidden (N, D), weight (V, D), targets (N,), weights (N,) (default 1). The gradients are computed
    in the forward pass, chunk by chunk, and scaled by the incoming gradient in backward."""
    if weights is None:
        weights = torch.ones(hidden.shape[0], device=hidden.device)
    return _LinearCrossEntropy.apply(hidden.contiguous(), weight, targets, weights.detach(), chunk_rows)


if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _ce_rows_kernel(logits_ptr, stride, targets_ptr, weights_ptr, loss_ptr, V,
                        COMPUTE_GRAD: tl.constexpr, BLOCK_V: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        ptr = logits_ptr + row * stride
        # Pass 1: per-lane online max / sum of exp, merged into the row's log-sum-exp.
        run_max = tl.full([BLOCK_V], float("-inf"), tl.float32)
        run_sum = tl.zeros([BLOCK_V], tl.float32)
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V)
            x = tl.load(ptr + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
            new_max = tl.maximum(run_max, x)
            safe = tl.where(new_max == float("-inf"), 0.0, new_max)
            run_sum = run_sum * tl.exp(run_max - safe) + tl.exp(x - safe)
            run_max = new_max
        row_max = tl.max(run_max, axis=0)
        lse = row_max + tl.log(tl.sum(run_sum * tl.exp(run_max - row_max), axis=0))
        target = tl.load(targets_ptr + row)
        w = tl.load(weights_ptr + row)
        x_target = tl.load(ptr + target).to(tl.float32)
        tl.store(loss_ptr + row, w * (lse - x_target))
        if COMPUTE_GRAD:
            # Pass 2: overwrite the logits with w * (softmax - onehot).
            for v0 in range(0, V, BLOCK_V):
                cols = v0 + tl.arange(0, BLOCK_V)
                x = tl.load(ptr + cols, mask=cols < V, other=0.0).to(tl.float32)
                g = tl.exp(x - lse) - (cols == target).to(tl.float32)
                tl.store(ptr + cols, (g * w).to(logits_ptr.dtype.element_ty), mask=cols < V)
