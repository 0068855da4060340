"""`silu_mul`: SwiGLU's elementwise step, silu(gate) * up, read from the fused gate | up projection
output, with Triton forward and backward kernels on the GPU (the backward is what training needs).

Under torch.compile, Inductor writes the backward of chunk -> silu * up as one kernel over the
concatenated gradient, each element choosing its half by a masked load, at about half the memory
bandwidth. Here each program reads one row's gate, up and output-gradient tiles and writes the two
gradient halves, all contiguous, at about the memory time (benchmarks/RESULTS.md). The op is a
`torch.library` custom op with its own autograd formula, so compiled graphs call it as one opaque
kernel. `silu_mul_reference` is the PyTorch definition, tested against and used on CPU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .backend import HAS_TRITON, use_triton

BLOCK = 1024


def silu_mul_reference(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def silu_mul(gate_up: torch.Tensor, use_kernel: bool = True) -> torch.Tensor:
    """silu(gate) * up for gate_up (..., 2F) = [gate | up]; returns (..., F) in gate_up's dtype.
    use_kernel=False: the PyTorch definition on GPUs too (`KernelOptions.silu_mul`)."""
    if gate_up.shape[-1] % 2:
        raise ValueError(f"gate_up's last dimension {gate_up.shape[-1]} is not [gate | up] (odd)")
    if use_kernel and use_triton(gate_up) and gate_up.dtype in (torch.float32, torch.float16, torch.bfloat16):
        return torch.ops.pllm.silu_mul(gate_up)
    return silu_mul_reference(gate_up)


if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _silu_mul_forward_kernel(gate_up_ptr, out_ptr, width, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        inside = cols < width
        gate = tl.load(gate_up_ptr + row * 2 * width + cols, mask=inside).to(tl.float32)
        up = tl.load(gate_up_ptr + row * 2 * width + width + cols, mask=inside).to(tl.float32)
        out = gate * tl.sigmoid(gate) * up
        tl.store(out_ptr + row * width + cols, out.to(out_ptr.dtype.element_ty), mask=inside)

    @triton.jit
    def _silu_mul_backward_kernel(gate_up_ptr, grad_ptr, grad_gate_up_ptr, width, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        inside = cols < width
        gate = tl.load(gate_up_ptr + row * 2 * width + cols, mask=inside).to(tl.float32)
        up = tl.load(gate_up_ptr + row * 2 * width + width + cols, mask=inside).to(tl.float32)
        grad = tl.load(grad_ptr + row * width + cols, mask=inside).to(tl.float32)
        sig = tl.sigmoid(gate)
        # d/dgate [gate * sig(gate)] = sig * (1 + gate * (1 - sig))
        grad_gate = grad * up * sig * (1.0 + gate * (1.0 - sig))
        grad_up = grad * gate * sig
        dtype = grad_gate_up_ptr.dtype.element_ty
        tl.store(grad_gate_up_ptr + row * 2 * width + cols, grad_gate.to(dtype), mask=inside)
        tl.store(grad_gate_up_ptr + row * 2 * width + width + cols, grad_up.to(dtype), mask=inside)

    def _rows(x: torch.Tensor) -> torch.Tensor:
        return x.contiguous().view(-1, x.shape[-1])

    @torch.library.custom_op("pllm::silu_mul", mutates_args=())
    def _silu_mul_op(gate_up: torch.Tensor) -> torch.Tensor:
        rows = _rows(gate_up)
        half = rows.shape[1] // 2
        out = torch.empty(rows.shape[0], half, dtype=gate_up.dtype, device=gate_up.device)
        if out.numel():
            _silu_mul_forward_kernel[(rows.shape[0], triton.cdiv(half, BLOCK))](rows, out, half, BLOCK=BLOCK,
                                                                                 num_warps=4)
        return out.view(*gate_up.shape[:-1], half)

    @_silu_mul_op.register_fake
    def _(gate_up):
        return gate_up.new_empty(*gate_up.shape[:-1], gate_up.shape[-1] // 2)

    @torch.library.custom_op("pllm::silu_mul_backward", mutates_args=())
    def _silu_mul_backward_op(gate_up: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        rows, grad_rows = _rows(gate_up), _rows(grad)
        half = rows.shape[1] // 2
        grad_gate_up = torch.empty_like(rows)
        if rows.numel():
            _silu_mul_backward_kernel[(rows.shape[0], triton.cdiv(half, BLOCK))](rows, grad_rows, grad_gate_up, half,
                                                                                  BLOCK=BLOCK, num_warps=4)
        return grad_gate_up.view(gate_up.shape)

    @_silu_mul_backward_op.register_fake
    def _(gate_up, grad):
        return gate_up.new_empty(gate_up.shape)  # contiguous, as the op returns it

    def _setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    def _backward(ctx, grad):
        return _silu_mul_backward_op(ctx.saved_tensors[0], grad)

    _silu_mul_op.register_autograd(_backward, setup_context=_setup_context)
