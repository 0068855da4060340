"""`rotate_qkv`: the training pass's fused-QKV output -> QK-normed, rotated queries and keys, and
values, each (B, L, heads, hd), with Triton forward and backward kernels on the GPU.

Under torch.compile, Inductor wrote the backward of split -> QK-norm -> rotary as one kernel over the
concatenated QKV gradient in which every element picked its source (query, key or value gradient)
and its rotation partner by masked loads, well short of its memory time. Here each program takes
a few tokens and, per token, reads its query, key and value gradient heads and writes its whole
QKV gradient row, contiguous. With QK-norm the norm's weight gradients are summed per program,
then over programs. Timings: benchmarks/RESULTS.md (`train_throughput.py --ab rotate-qkv`).
The op is a `torch.library` custom op with its own autograd formula, so compiled graphs call it as
one opaque kernel. `rotate_qkv_reference` is the PyTorch definition, tested against and used on CPU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .backend import HAS_TRITON, use_triton
from .rotary_cache import apply_rotary

ROWS_PER_PROGRAM = 4  # tokens per backward program: fewer partial sums of the norm weights' gradients


def rotate_qkv_reference(qkv, cos, sin, heads: int, kv_heads: int, q_weight=None, k_weight=None, eps: float = 1e-6):
    """The PyTorch definition: split, F.rms_norm (where a weight is given), then `apply_rotary`."""
    B, L, width = qkv.shape
    head_dim = width // (heads + 2 * kv_heads)
    q, k, v = qkv.view(B, L, heads + 2 * kv_heads, head_dim).split([heads, kv_heads, kv_heads], dim=2)
    cos, sin = cos[:, :, None], sin[:, :, None]  # (B, L, 1, hd)

    def norm_rotate(x, weight):
        if weight is not None:
            x = F.rms_norm(x, (head_dim,), weight, eps)
        return apply_rotary(x, cos, sin)

    return norm_rotate(q, q_weight), norm_rotate(k, k_weight), v


def rotate_qkv(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int, kv_heads: int,
               q_weight: torch.Tensor | None = None, k_weight: torch.Tensor | None = None,
               eps: float = 1e-6, use_kernel: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """qkv (B, L, (heads + 2 kv_heads) hd): rows of query | key | value heads; cos/sin (B, L, hd) or
    (1, L, hd) at each token's position ("rotate half" layout); q_weight/k_weight (hd,): QK-norm
    weights (None: no norm). Returns q (B, L, heads, hd), k and v (B, L, kv_heads, hd). The Triton
    kernels take head sizes that are powers of two; others run the reference, as does
    use_kernel=False (`KernelOptions.rotate_qkv`)."""
    B, L, width = qkv.shape
    head_dim = width // (heads + 2 * kv_heads)
    if width != (heads + 2 * kv_heads) * head_dim or head_dim % 2:
        raise ValueError(f"qkv width {width} is not (heads {heads} + 2 x kv_heads {kv_heads}) x an even head size")
    if cos.shape != (cos.shape[0], L, head_dim) or cos.shape[0] not in (1, B) or sin.shape != cos.shape:
        raise ValueError(f"cos/sin {tuple(cos.shape)} / {tuple(sin.shape)} do not fit qkv {tuple(qkv.shape)}")
    if (use_kernel and use_triton(qkv) and head_dim & (head_dim - 1) == 0
            and qkv.dtype in (torch.float32, torch.float16, torch.bfloat16)):
        return torch.ops.pllm.rotate_qkv(qkv, cos, sin, q_weight, k_weight, heads, kv_heads, float(eps))
    return rotate_qkv_reference(qkv, cos, sin, heads, kv_heads, q_weight, k_weight, eps)


if HAS_TRITON:
    import triton
    import triton.language as tl

    from .rotary_cache import _load_norm_rotate, _trig

    @triton.jit
    def _rotate_qkv_forward_kernel(qkv_ptr, cos_ptr, sin_ptr, qw_ptr, kw_ptr, q_ptr, k_ptr, v_ptr, L, eps,
                                   s_cs_b, s_cs_l, H: tl.constexpr, KV: tl.constexpr, HALF: tl.constexpr,
                                   BLOCK_H: tl.constexpr, BLOCK_KV: tl.constexpr, Q_NORM: tl.constexpr,
                                   K_NORM: tl.constexpr):
        """One program per token: all its query, key and value heads."""
        token = tl.program_id(0).to(tl.int64)
        b, l = token // L, token % L
        cos1, cos2, sin1, sin2 = _trig(cos_ptr, sin_ptr, b, l, s_cs_b, s_cs_l, HALF)
        row = qkv_ptr + token * (H + 2 * KV) * 2 * HALF
        d = tl.arange(0, HALF)[None, :]
        dtype = q_ptr.dtype.element_ty

        y1, y2, h, ok = _load_norm_rotate(row, qw_ptr, eps, cos1, cos2, sin1, sin2, H, BLOCK_H, Q_NORM, HALF)
        out = q_ptr + (token * H + h) * 2 * HALF + d
        tl.store(out, y1.to(dtype), mask=ok)
        tl.store(out + HALF, y2.to(dtype), mask=ok)

        y1, y2, kh, ok = _load_norm_rotate(row + H * 2 * HALF, kw_ptr, eps, cos1, cos2, sin1, sin2, KV, BLOCK_KV,
                                           K_NORM, HALF)
        out = (token * KV + kh) * 2 * HALF + d
        tl.store(k_ptr + out, y1.to(dtype), mask=ok)
        tl.store(k_ptr + out + HALF, y2.to(dtype), mask=ok)
        v_row = row + (H + KV + kh) * 2 * HALF + d
        tl.store(v_ptr + out, tl.load(v_row, mask=ok, other=0.0), mask=ok)
        tl.store(v_ptr + out + HALF, tl.load(v_row + HALF, mask=ok, other=0.0), mask=ok)

    @triton.jit
    def _unrotate_unnorm(x_row, w_ptr, dy_ptr, heads, s_h, eps, cos1, cos2, sin1, sin2, NORM: tl.constexpr,
                         HALF: tl.constexpr, BLOCK: tl.constexpr):
        """Gradients of one token's heads (rows): through the rotation (its transpose), then the RMS
        norm. Returns the input gradient's halves and this token's share of the weight gradient."""
        h = tl.arange(0, BLOCK)[:, None]
        d = tl.arange(0, HALF)[None, :]
        ok = h < heads
        dy1 = tl.load(dy_ptr + h * s_h + d, mask=ok, other=0.0).to(tl.float32)
        dy2 = tl.load(dy_ptr + h * s_h + HALF + d, mask=ok, other=0.0).to(tl.float32)
        # y1 = n1 cos1 - n2 sin1, y2 = n2 cos2 + n1 sin2
        dn1 = dy1 * cos1 + dy2 * sin2
        dn2 = dy2 * cos2 - dy1 * sin1
        if NORM:
            x1 = tl.load(x_row + h * 2 * HALF + d, mask=ok, other=0.0).to(tl.float32)
            x2 = tl.load(x_row + h * 2 * HALF + HALF + d, mask=ok, other=0.0).to(tl.float32)
            r = tl.rsqrt((tl.sum(x1 * x1, axis=1) + tl.sum(x2 * x2, axis=1)) / (2 * HALF) + eps)[:, None]
            xh1, xh2 = x1 * r, x2 * r
            dw1, dw2 = tl.sum(dn1 * xh1, axis=0), tl.sum(dn2 * xh2, axis=0)
            dxh1 = dn1 * tl.load(w_ptr + d).to(tl.float32)
            dxh2 = dn2 * tl.load(w_ptr + HALF + d).to(tl.float32)
            # d/dx of x * r: r * (dxh - xh * mean(dxh * xh))
            mean = ((tl.sum(dxh1 * xh1, axis=1) + tl.sum(dxh2 * xh2, axis=1)) / (2 * HALF))[:, None]
            dn1, dn2 = r * (dxh1 - xh1 * mean), r * (dxh2 - xh2 * mean)
        else:
            dw1 = tl.zeros([HALF], dtype=tl.float32)
            dw2 = tl.zeros([HALF], dtype=tl.float32)
        return dn1, dn2, dw1, dw2

    @triton.jit
    def _rotate_qkv_backward_kernel(qkv_ptr, cos_ptr, sin_ptr, qw_ptr, kw_ptr, dq_ptr, dk_ptr, dv_ptr, dqkv_ptr,
                                    dqw_ptr, dkw_ptr, tokens, L, eps, s_cs_b, s_cs_l, s_dq_b, s_dq_l, s_dq_h,
                                    s_dk_b, s_dk_l, s_dk_h, s_dv_b, s_dv_l, s_dv_h, H: tl.constexpr,
                                    KV: tl.constexpr, HALF: tl.constexpr, BLOCK_H: tl.constexpr,
                                    BLOCK_KV: tl.constexpr, Q_NORM: tl.constexpr, K_NORM: tl.constexpr,
                                    ROWS: tl.constexpr):
        """ROWS tokens per program: each token's whole QKV gradient row; with QK-norm, this program's
        partial sums of the norm weights' gradients."""
        program = tl.program_id(0)
        d = tl.arange(0, HALF)[None, :]
        dtype = dqkv_ptr.dtype.element_ty
        acc_q1 = tl.zeros([HALF], dtype=tl.float32)
        acc_q2 = tl.zeros([HALF], dtype=tl.float32)
        acc_k1 = tl.zeros([HALF], dtype=tl.float32)
        acc_k2 = tl.zeros([HALF], dtype=tl.float32)
        for i in range(ROWS):
            token = program.to(tl.int64) * ROWS + i
            if token < tokens:
                b, l = token // L, token % L
                cos1, cos2, sin1, sin2 = _trig(cos_ptr, sin_ptr, b, l, s_cs_b, s_cs_l, HALF)
                x_row = qkv_ptr + token * (H + 2 * KV) * 2 * HALF
                out_row = dqkv_ptr + token * (H + 2 * KV) * 2 * HALF

                dx1, dx2, dw1, dw2 = _unrotate_unnorm(x_row, qw_ptr, dq_ptr + b * s_dq_b + l * s_dq_l, H, s_dq_h,
                                                      eps, cos1, cos2, sin1, sin2, Q_NORM, HALF, BLOCK_H)
                acc_q1 += dw1
                acc_q2 += dw2
                h = tl.arange(0, BLOCK_H)[:, None]
                tl.store(out_row + h * 2 * HALF + d, dx1.to(dtype), mask=h < H)
                tl.store(out_row + h * 2 * HALF + HALF + d, dx2.to(dtype), mask=h < H)

                k_row = x_row + H * 2 * HALF
                dx1, dx2, dw1, dw2 = _unrotate_unnorm(k_row, kw_ptr, dk_ptr + b * s_dk_b + l * s_dk_l, KV, s_dk_h,
                                                      eps, cos1, cos2, sin1, sin2, K_NORM, HALF, BLOCK_KV)
                acc_k1 += dw1
                acc_k2 += dw2
                kh = tl.arange(0, BLOCK_KV)[:, None]
                ok = kh < KV
                k_out = out_row + (H + kh) * 2 * HALF + d
                tl.store(k_out, dx1.to(dtype), mask=ok)
                tl.store(k_out + HALF, dx2.to(dtype), mask=ok)
                dv = dv_ptr + b * s_dv_b + l * s_dv_l + kh * s_dv_h + d
                tl.store(k_out + KV * 2 * HALF, tl.load(dv, mask=ok, other=0.0).to(dtype), mask=ok)
                tl.store(k_out + KV * 2 * HALF + HALF, tl.load(dv + HALF, mask=ok, other=0.0).to(dtype), mask=ok)
        w = program * 2 * HALF + tl.arange(0, HALF)
        if Q_NORM:
            tl.store(dqw_ptr + w, acc_q1)
            tl.store(dqw_ptr + w + HALF, acc_q2)
        if K_NORM:
            tl.store(dkw_ptr + w, acc_k1)
            tl.store(dkw_ptr + w + HALF, acc_k2)

    def _launch_config(qkv, cos, heads, kv_heads, q_weight, k_weight) -> dict:
        head_dim = qkv.shape[-1] // (heads + 2 * kv_heads)
        return dict(H=heads, KV=kv_heads, HALF=head_dim // 2, BLOCK_H=triton.next_power_of_2(heads),
                    BLOCK_KV=triton.next_power_of_2(kv_heads), Q_NORM=q_weight is not None,
                    K_NORM=k_weight is not None)

    def _trig_strides(cos: torch.Tensor) -> tuple[int, int]:
        return (cos.stride(0) if cos.shape[0] > 1 else 0), cos.stride(1)

    def _unit_stride(x: torch.Tensor) -> torch.Tensor:
        return x if x.stride(-1) == 1 else x.contiguous()

    @torch.library.custom_op("pllm::rotate_qkv", mutates_args=())
    def _rotate_qkv_op(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, q_weight: torch.Tensor | None,
                       k_weight: torch.Tensor | None, heads: int, kv_heads: int,
                       eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        B, L, width = qkv.shape
        head_dim = width // (heads + 2 * kv_heads)
        qkv, cos, sin = qkv.contiguous(), _unit_stride(cos), _unit_stride(sin)
        q = torch.empty(B, L, heads, head_dim, dtype=qkv.dtype, device=qkv.device)
        k, v = (torch.empty(B, L, kv_heads, head_dim, dtype=qkv.dtype, device=qkv.device) for _ in range(2))
        if qkv.numel():
            _rotate_qkv_forward_kernel[(B * L,)](
                qkv, cos, sin, q_weight if q_weight is not None else q, k_weight if k_weight is not None else q,
                q, k, v, L, eps, *_trig_strides(cos), **_launch_config(qkv, cos, heads, kv_heads, q_weight, k_weight),
                num_warps=4)
        return q, k, v

    @_rotate_qkv_op.register_fake
    def _(qkv, cos, sin, q_weight, k_weight, heads, kv_heads, eps):
        B, L, width = qkv.shape
        head_dim = width // (heads + 2 * kv_heads)
        return (qkv.new_empty(B, L, heads, head_dim), qkv.new_empty(B, L, kv_heads, head_dim),
                qkv.new_empty(B, L, kv_heads, head_dim))

    @torch.library.custom_op("pllm::rotate_qkv_backward", mutates_args=())
    def _rotate_qkv_backward_op(qkv: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor,
                                q_weight: torch.Tensor | None, k_weight: torch.Tensor | None, heads: int,
                                kv_heads: int, eps: float, dq: torch.Tensor, dk: torch.Tensor,
                                dv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(dqkv, dq_weight, dk_weight); a weight's gradient is empty (0,) where it has no norm. qkv
        (read only by the norm's backward) may be None without QK-norm."""
        B, L, _, head_dim = dq.shape
        cos, sin = _unit_stride(cos), _unit_stride(sin)
        dq, dk, dv = _unit_stride(dq), _unit_stride(dk), _unit_stride(dv)
        dqkv = torch.empty(B, L, (heads + 2 * kv_heads) * head_dim, dtype=dq.dtype, device=dq.device)
        qkv = qkv.contiguous() if qkv is not None else dqkv  # any pointer: never read without the norm
        programs = triton.cdiv(B * L, ROWS_PER_PROGRAM)
        partial = torch.zeros(2, programs if q_weight is not None or k_weight is not None else 1, head_dim,
                              dtype=torch.float32, device=qkv.device)
        if qkv.numel():
            _rotate_qkv_backward_kernel[(programs,)](
                qkv, cos, sin, q_weight if q_weight is not None else qkv, k_weight if k_weight is not None else qkv,
                dq, dk, dv, dqkv, partial[0], partial[1], B * L, L, eps, *_trig_strides(cos),
                dq.stride(0), dq.stride(1), dq.stride(2), dk.stride(0), dk.stride(1), dk.stride(2),
                dv.stride(0), dv.stride(1), dv.stride(2), ROWS=ROWS_PER_PROGRAM,
                **_launch_config(qkv, cos, heads, kv_heads, q_weight, k_weight), num_warps=4)

        def weight_grad(weight, sums):
            return sums.sum(0).to(weight.dtype) if weight is not None else dq.new_empty(0)

        return dqkv, weight_grad(q_weight, partial[0]), weight_grad(k_weight, partial[1])

    @_rotate_qkv_backward_op.register_fake
    def _(qkv, cos, sin, q_weight, k_weight, heads, kv_heads, eps, dq, dk, dv):
        def weight_grad(weight):
            return weight.new_empty(weight.shape) if weight is not None else dq.new_empty(0)

        B, L, _, head_dim = dq.shape
        return dq.new_empty(B, L, (heads + 2 * kv_heads) * head_dim), weight_grad(q_weight), weight_grad(k_weight)

    def _setup_context(ctx, inputs, output):
        qkv, cos, sin, q_weight, k_weight, heads, kv_heads, eps = inputs
        norm = q_weight is not None or k_weight is not None
        # Without QK-norm the backward never reads qkv: keeping it would hold one activation per layer.
        ctx.save_for_backward(qkv if norm else None, cos, sin, q_weight, k_weight)
        ctx.args = (heads, kv_heads, eps)

    def _backward(ctx, dq, dk, dv):
        qkv, cos, sin, q_weight, k_weight = ctx.saved_tensors
        dqkv, dq_weight, dk_weight = _rotate_qkv_backward_op(qkv, cos, sin, q_weight, k_weight, *ctx.args,
                                                             dq, dk, dv)
        return (dqkv, None, None, dq_weight if q_weight is not None else None,
                dk_weight if k_weight is not None else None, None, None, None)

    _rotate_qkv_op.register_autograd(_backward, setup_context=_setup_context)
