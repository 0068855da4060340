"""`add_rms_norm`: the residual add and the RMSNorm after it, h = x + y and rms_norm(h) * weight,
with Triton forward and backward kernels on the GPU (training runs it for every norm of the blocks
but the first block's first one). `add_partials_rms_norm` is its inference form for a y that comes
as a K-split matmul's float32 partial sums (the decoding step's o_proj and down_proj).

Under torch.compile (bf16 autocast over an fp32 residual stream), Inductor wrote the forward as a
looped reduction well above its memory time, and the backward as a norm-backward kernel plus a
separate kernel casting the residual gradient to bf16 for the projection's backward matmul. Here
the forward is one program per row, writing h and the normalised row (already in the autocast
dtype, which the next matmul reads). The backward writes x's gradient and, in y's dtype, y's (the
same values), with the weight's gradient summed per program, then over programs; it takes a tile
of rows at a time (one row at a time fell short of the memory time). Timings: benchmarks/RESULTS.md
(`train_throughput.py --ab add-rms-norm`, `norm_backward.py`).
`add_rms_norm_reference` is the PyTorch definition, tested against and used on CPU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .backend import HAS_TRITON, use_triton

# Rows per backward program (the weight's gradient is summed per program), TILE_ROWS at a time (a
# serial loop over single rows held the backward back; `benchmarks/norm_backward.py` sweeps both).
ROWS_PER_PROGRAM = 16
TILE_ROWS = 4  # a power of two


def _normed_dtype(device_type: str, h_dtype: torch.dtype) -> torch.dtype:
    """What the next matmul reads: the autocast dtype under autocast, else h's own."""
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return h_dtype


def add_rms_norm_reference(x, y, weight, eps: float):
    h = x + y
    return h, F.rms_norm(h, (h.shape[-1],), weight, eps).to(_normed_dtype(h.device.type, h.dtype))


def add_rms_norm(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, eps: float,
                 use_kernel: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(h, normed) = (x + y, rms_norm(x + y) * weight) over the last dimension; normed in the
    autocast dtype under autocast (the dtype the next matmul casts it to), else in h's.
    use_kernel=False: the PyTorch definition on GPUs too (`KernelOptions.add_rms_norm`)."""
    if x.shape != y.shape or weight.shape != x.shape[-1:]:
        raise ValueError(f"add_rms_norm: x {tuple(x.shape)}, y {tuple(y.shape)} and weight {tuple(weight.shape)} "
                         "do not fit")
    dtypes = (torch.float32, torch.float16, torch.bfloat16)
    if (use_kernel and use_triton(x, y, weight) and x.dtype in dtypes and y.dtype in dtypes
            and weight.dtype in dtypes):
        normed_dtype = _normed_dtype(x.device.type, torch.promote_types(x.dtype, y.dtype))
        return torch.ops.pllm.add_rms_norm(x, y, weight, float(eps), normed_dtype)
    return add_rms_norm_reference(x, y, weight, eps)


def add_partials_rms_norm(x: torch.Tensor, parts: torch.Tensor, weight: torch.Tensor,
                          eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """`add_rms_norm` of x and y given as float32 partial sums parts (S, *x.shape) (a K-split
    matmul's output: summed here, so no reduce kernel runs between them). h is rounded to x's dtype
    once, after the sum; normed is in x's dtype. Inference only (no autograd)."""
    if parts.dim() != x.dim() + 1 or parts.shape[1:] != x.shape or weight.shape != x.shape[-1:]:
        raise ValueError(f"add_partials_rms_norm: x {tuple(x.shape)}, parts {tuple(parts.shape)} and weight "
                         f"{tuple(weight.shape)} do not fit")
    if not (use_triton(x, parts, weight) and parts.dtype == torch.float32 and x.is_contiguous()
            and parts.is_contiguous() and weight.is_contiguous()):
        return add_partials_rms_norm_reference(x, parts, weight, eps)
    h, normed = torch.empty_like(x), torch.empty_like(x)
    _forward(x, parts, weight, h, normed, eps, parts=parts.shape[0], part_stride=x.numel())
    return h, normed


def add_partials_rms_norm_reference(x, parts, weight, eps: float):
    h = (x.float() + parts.sum(0)).to(x.dtype)
    return h, F.rms_norm(h.float(), (h.shape[-1],), weight.float(), eps).to(x.dtype)


if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _add_rms_norm_forward_kernel(x_ptr, y_ptr, w_ptr, h_ptr, out_ptr, D, part_stride, eps, BLOCK: tl.constexpr,
                                     PARTS: tl.constexpr):
        """h = x + y, or x + the sum of PARTS float32 partial sums of y, part_stride apart."""
        row = tl.program_id(0).to(tl.int64) * D
        cols = tl.arange(0, BLOCK)
        inside = cols < D
        h = tl.load(x_ptr + row + cols, mask=inside, other=0.0).to(tl.float32)
        for part in tl.static_range(PARTS):
            h += tl.load(y_ptr + part * part_stride + row + cols, mask=inside, other=0.0).to(tl.float32)
        h = h.to(h_ptr.dtype.element_ty)  # the residual stream as stored (and as the norm reads it)
        tl.store(h_ptr + row + cols, h, mask=inside)
        h = h.to(tl.float32)
        r = tl.rsqrt(tl.sum(h * h, axis=0) / D + eps)
        w = tl.load(w_ptr + cols, mask=inside, other=0.0).to(tl.float32)
        tl.store(out_ptr + row + cols, (h * r * w).to(out_ptr.dtype.element_ty), mask=inside)

    @triton.jit
    def _add_rms_norm_backward_kernel(h_ptr, w_ptr, dh_ptr, dn_ptr, dx_ptr, dy_ptr, dw_ptr, rows, D, eps,
                                      BLOCK: tl.constexpr, ROWS: tl.constexpr, TILE: tl.constexpr):
        program = tl.program_id(0)
        cols = tl.arange(0, BLOCK)[None, :]
        w = tl.load(w_ptr + cols, mask=cols < D, other=0.0).to(tl.float32)
        dw = tl.zeros([BLOCK], dtype=tl.float32)
        for first in range(0, ROWS, TILE):  # a tile of rows at a time: their loads are all in flight together
            in_program = first + tl.arange(0, TILE)[:, None]
            r_index = program.to(tl.int64) * ROWS + in_program
            inside = (in_program < ROWS) & (r_index < rows) & (cols < D)
            offsets = r_index * D + cols
            h = tl.load(h_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
            r = tl.rsqrt(tl.sum(h * h, axis=1) / D + eps)[:, None]
            hat = h * r
            dn = tl.load(dn_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
            dw += tl.sum(dn * hat, axis=0)
            g = dn * w
            # d/dh of h * r: r * (g - hat * mean(g * hat)); plus the gradient arriving at h itself
            dx = tl.load(dh_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
            dx += r * (g - hat * (tl.sum(g * hat, axis=1) / D)[:, None])
            tl.store(dx_ptr + offsets, dx.to(dx_ptr.dtype.element_ty), mask=inside)
            tl.store(dy_ptr + offsets, dx.to(dy_ptr.dtype.element_ty), mask=inside)
        tl.store(dw_ptr + program * D + tl.arange(0, BLOCK), dw, mask=tl.arange(0, BLOCK) < D)

    def _warps(elements: int) -> int:
        return min(max(elements // 256, 1), 8)

    def _forward(x, y, weight, h, normed, eps: float, parts: int = 1, part_stride: int = 0) -> None:
        """The forward kernel over x's rows into h and normed (y: parts partial sums, part_stride apart)."""
        D = x.shape[-1]
        if h.numel():
            block = triton.next_power_of_2(D)
            _add_rms_norm_forward_kernel[(h.numel() // D,)](x, y, weight, h, normed, D, part_stride, eps, BLOCK=block,
                                                           PARTS=parts, num_warps=_warps(block))

    @torch.library.custom_op("pllm::add_rms_norm", mutates_args=())
    def _add_rms_norm_op(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, eps: float,
                         normed_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        x, y, weight = x.contiguous(), y.contiguous(), weight.contiguous()
        h = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, y.dtype), device=x.device)
        normed = torch.empty(x.shape, dtype=normed_dtype, device=x.device)
        _forward(x, y, weight, h, normed, eps)
        return h, normed

    @_add_rms_norm_op.register_fake
    def _(x, y, weight, eps, normed_dtype):
        return (x.new_empty(x.shape, dtype=torch.promote_types(x.dtype, y.dtype)),
                x.new_empty(x.shape, dtype=normed_dtype))

    def add_rms_norm_backward(h: torch.Tensor, weight: torch.Tensor, eps: float, dh: torch.Tensor, dn: torch.Tensor,
                              x_dtype: torch.dtype, y_dtype: torch.dtype, rows_per_program: int = ROWS_PER_PROGRAM,
                              tile_rows: int = TILE_ROWS) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(dx, dy, dweight): dx and dy are the same values, in x's and y's dtypes (written twice even
        where the dtypes match: gradients that alias each other could be accumulated into in place).
        rows_per_program rows per program, tile_rows (a power of two) at a time (benchmarks sweep them)."""
        h, weight, dh, dn = h.contiguous(), weight.contiguous(), dh.contiguous(), dn.contiguous()
        D = h.shape[-1]
        rows = h.numel() // D
        programs = triton.cdiv(rows, rows_per_program)  # none for no rows: the weight's gradient sums to 0
        dx = torch.empty(h.shape, dtype=x_dtype, device=h.device)
        dy = torch.empty(h.shape, dtype=y_dtype, device=h.device)
        partial = torch.empty(programs, D, dtype=torch.float32, device=h.device)  # every program writes its row
        if rows:
            block = triton.next_power_of_2(D)
            # at most 8K elements a tile: wider rows take fewer at a time (registers)
            tile = max(1, min(tile_rows, triton.next_power_of_2(rows_per_program), 8192 // block))
            _add_rms_norm_backward_kernel[(programs,)](h, weight, dh, dn, dx, dy, partial, rows, D, eps,
                                                       BLOCK=block, ROWS=rows_per_program,
                                                       TILE=tile, num_warps=_warps(block * tile))
        return dx, dy, partial.sum(0).to(weight.dtype)

    @torch.library.custom_op("pllm::add_rms_norm_backward", mutates_args=())
    def _add_rms_norm_backward_op(h: torch.Tensor, weight: torch.Tensor, eps: float, dh: torch.Tensor,
                                  dn: torch.Tensor, x_dtype: torch.dtype,
                                  y_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return add_rms_norm_backward(h, weight, eps, dh, dn, x_dtype, y_dtype)

    @_add_rms_norm_backward_op.register_fake
    def _(h, weight, eps, dh, dn, x_dtype, y_dtype):
        return h.new_empty(h.shape, dtype=x_dtype), h.new_empty(h.shape, dtype=y_dtype), weight.new_empty(weight.shape)

    def _setup_context(ctx, inputs, output):
        x, y, weight, eps, _ = inputs
        ctx.save_for_backward(output[0], weight)
        ctx.eps, ctx.dtypes = eps, (x.dtype, y.dtype)

    def _backward(ctx, dh, dn):  # custom-op autograd passes zeros for an output without a gradient
        h, weight = ctx.saved_tensors
        return (*_add_rms_norm_backward_op(h, weight, ctx.eps, dh, dn, *ctx.dtypes), None, None)

    _add_rms_norm_op.register_autograd(_backward, setup_context=_setup_context)
