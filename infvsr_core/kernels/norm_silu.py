"""Channel RMS-norm (+ SiLU) of the Wan VAE over channels-last rows, in one read and one write.

diffusers' `WanRMS_norm` followed by SiLU makes about eight full-resolution
passes (a float32 copy, the norm, the cast, the scale, the gamma, the bias,
the SiLU). In channels-last memory the C channels of a pixel are contiguous,
so one Triton program can normalize a block of pixels entirely in registers
and write the result straight into the caller's buffer (e.g. behind the
causal conv's 2-frame cache). Where Triton is missing (CPU, no compiler) the
same result comes from the diffusers-order PyTorch ops.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from ..fp8 import FP8_DTYPE, FP8_MAX, to_fp8

try:  # Triton ships with CUDA builds of PyTorch; CPU builds lack it.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None
    tl = None

_TRITON_BROKEN: list[str] = []  # filled with the reason if a launch ever failed: then stay on the fallback
# Triton's interpreter (TRITON_INTERPRET=1, set before this import) runs the kernels on CPU tensors through
# NumPy: the tests use it to check every kernel and the fast VAE through them without a GPU.
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


if triton is not None:

    @triton.jit
    def _rms_norm_silu_kernel(
        x_ptr,
        pre_ptr,
        gamma_ptr,
        bias_ptr,
        out_ptr,
        tail_ptr,
        inv_scale_ptr,
        rows,
        x_stride,
        out_stride,
        tail_start,
        C: tl.constexpr,
        BLOCK_C: tl.constexpr,
        BLOCK_R: tl.constexpr,
        HAS_PRE: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        SILU: tl.constexpr,
        HAS_TAIL: tl.constexpr,
        FP8_OUT: tl.constexpr,
        FP8_TAIL: tl.constexpr,
        FP8_MAX: tl.constexpr,
    ):
        pid = tl.program_id(0)
        r = pid.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
        c = tl.arange(0, BLOCK_C)
        cmask = c < C
        mask = (r < rows)[:, None] & cmask[None, :]
        x = tl.load(x_ptr + r[:, None] * x_stride + c[None, :], mask=mask, other=0.0).to(tl.float32)
        if HAS_PRE:  # the producing conv's bias, added here instead of in a pass of its own
            x += tl.load(pre_ptr + c, mask=cmask, other=0.0)[None, :]
        norm = tl.sqrt(tl.sum(x * x, axis=1))
        inv = 1.0 / tl.maximum(norm, 1e-12)  # F.normalize's eps
        gamma = tl.load(gamma_ptr + c, mask=cmask, other=0.0)
        y = x * inv[:, None] * gamma[None, :]
        if HAS_BIAS:
            y += tl.load(bias_ptr + c, mask=cmask, other=0.0)[None, :]
        if SILU:
            y = y * tl.sigmoid(y)
        if FP8_OUT:  # y / scale in float8, from y rounded to x's dtype first (as a cast pass over it would read)
            q = y.to(x_ptr.dtype.element_ty).to(tl.float32) * tl.load(inv_scale_ptr)
            v = tl.clamp(q, -FP8_MAX, FP8_MAX).to(out_ptr.dtype.element_ty, fp_downcast_rounding="rtne")
        else:
            v = y.to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + r[:, None] * out_stride + c[None, :], v, mask=mask)
        if HAS_TAIL:  # the last rows also go to a compact copy (a causal conv's cache: no second pass)
            tail = (r >= tail_start)[:, None] & mask
            kept = v if FP8_TAIL else y.to(tail_ptr.dtype.element_ty)  # a float8 cache keeps the float8 values
            tl.store(tail_ptr + (r - tail_start)[:, None] * C + c[None, :], kept, mask=tail)

    @triton.jit
    def _bias_add_kernel(
        y_ptr,
        bias_ptr,
        res_ptr,
        out_ptr,
        rows,
        y_stride,
        res_stride,
        out_stride,
        img_h,
        img_w,
        out_frame_stride,
        out_row_stride,
        C: tl.constexpr,
        BLOCK_C: tl.constexpr,
        BLOCK_R: tl.constexpr,
        HAS_RES: tl.constexpr,
        IMAGE: tl.constexpr,
    ):
        pid = tl.program_id(0)
        r = pid.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
        c = tl.arange(0, BLOCK_C)
        cmask = c < C
        mask = (r < rows)[:, None] & cmask[None, :]
        y = tl.load(y_ptr + r[:, None] * y_stride + c[None, :], mask=mask, other=0.0).to(tl.float32)
        y += tl.load(bias_ptr + c, mask=cmask, other=0.0)[None, :]
        if HAS_RES:
            y += tl.load(res_ptr + r[:, None] * res_stride + c[None, :], mask=mask, other=0.0).to(tl.float32)
        if IMAGE:  # row r is pixel (frame, i, j) of img_h x img_w frames, stored with gaps (e.g. a zero border)
            frame, i, j = r // (img_h * img_w), (r // img_w) % img_h, r % img_w
            at = frame * out_frame_stride + i * out_row_stride + j * out_stride
        else:
            at = r * out_stride
        tl.store(out_ptr + at[:, None] + c[None, :], y.to(out_ptr.dtype.element_ty), mask=mask)


def triton_usable(x: torch.Tensor) -> bool:
    """Whether the Triton kernel can run on this tensor's device."""
    return triton is not None and (x.is_cuda or INTERPRETED) and not _TRITON_BROKEN


def _blocks(c: int) -> tuple[int, int]:
    block_c = triton.next_power_of_2(c)
    return block_c, max(1, 4096 // block_c)


def _row_major(rows: torch.Tensor) -> bool:
    """(N, C) rows the kernels can read: channels adjacent, any distance between rows (a channel slice too)."""
    return rows.ndim == 2 and (rows.stride(1) == 1 or rows.shape[1] == 1)


def bias_add_rows_(
    rows: torch.Tensor,
    bias: torch.Tensor | None,
    residual: torch.Tensor | None = None,
    *,
    out: torch.Tensor | None = None,
    use_triton: bool | None = None,
) -> torch.Tensor:
    """rows + bias (per channel; None: 0) [+ residual] in one pass, into `out` (default: rows itself); (N, C) rows.

    PyTorch adds a conv's bias as a separate broadcast pass; here it shares
    one pass with the residual add (rounded once instead of twice). Rows may be
    a channel slice of wider rows (a conv computed with padded outputs). `out`
    may also be (F, H, W, C) frames with any frame and row strides (the inside
    of a zero-bordered buffer), holding the N = F*H*W rows in order.
    """
    target = rows if out is None else out
    image = target.ndim == 4
    if bias is None:
        bias = torch.zeros(rows.shape[1], device=rows.device)
    if use_triton is None:
        use_triton = triton_usable(rows)
    ok = _row_major(rows) and (residual is None or _row_major(residual))
    ok = ok and (target.stride(-1) == 1 if image else _row_major(target))
    if use_triton and ok and rows.numel():
        n, c = rows.shape
        block_c, block_r = _blocks(c)
        res = rows if residual is None else residual
        frame_stride, row_stride, pixel_stride = target.stride()[:3] if image else (0, 0, target.stride(0))
        img_h, img_w = target.shape[1:3] if image else (1, 1)
        try:
            _bias_add_kernel[(triton.cdiv(n, block_r),)](
                rows, bias.float().contiguous(), res, target, n, rows.stride(0), res.stride(0), pixel_stride,
                img_h, img_w, frame_stride, row_stride,
                C=c, BLOCK_C=block_c, BLOCK_R=block_r, HAS_RES=residual is not None, IMAGE=image, num_warps=4,
            )  # fmt: skip
            return target
        except Exception as error:  # pragma: no cover - a broken Triton install: fall back for good
            _TRITON_BROKEN.append(repr(error))
    result = torch.empty_like(rows, memory_format=torch.contiguous_format) if image else target
    torch.add(rows, bias.to(rows.dtype), out=result)
    if residual is not None:
        result.add_(residual)
    if image:
        target.copy_(result.view(target.shape))
    return target


def rms_norm_rows_reference(
    rows: torch.Tensor,
    gamma: torch.Tensor,
    scale: float,
    bias: torch.Tensor | float,
    silu: bool,
    pre_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """diffusers' WanRMS_norm (+ SiLU) on (N, C) rows, in its own op order and dtypes.

    `pre_bias` is the producing conv's bias, added first (as the conv would have).
    """
    if pre_bias is not None:
        rows = rows + pre_bias.to(rows.dtype)
    low = rows.dtype in (torch.float16, torch.bfloat16)
    normalized = F.normalize(rows.float() if low else rows, dim=-1).to(rows.dtype)
    y = normalized * scale * gamma.reshape(-1).to(rows.dtype)
    if isinstance(bias, torch.Tensor):
        y = y + bias.reshape(-1).to(rows.dtype)
    else:
        y = y + bias
    return F.silu(y) if silu else y


def rms_norm_rows(
    rows: torch.Tensor,
    gamma: torch.Tensor,
    scale: float,
    bias: torch.Tensor | float = 0.0,
    *,
    silu: bool,
    out: torch.Tensor | None = None,
    use_triton: bool | None = None,
    pre_bias: torch.Tensor | None = None,
    tail: torch.Tensor | None = None,
    out_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """normalize(rows + pre_bias) * scale * gamma + bias, then SiLU if asked; rows (N, C), channels adjacent.

    `out` (N, C), channels adjacent, receives the result when given; `tail`
    (M, C) contiguous, when given, also receives its last M rows. The Triton
    kernel computes in float32 and rounds once (the reference rounds after
    each op: the two differ at the last bit of the output dtype).
    An `out` in float8_e4m3fn receives result / `out_scale` (a float32 scalar
    tensor), from the result rounded to rows' dtype, saturated and rounded to
    nearest even, without a cast pass after (the float8 causal conv's staged
    input; `FastForwardOptions.fp8_norm_store`). The kernel multiplies by the
    scale's reciprocal, as fp8.to_fp8 does. `tail` keeps rows' dtype (a causal conv's
    history), or, in float8 beside a float8 `out`, takes out's values (`FastForwardOptions.fp8_history`).
    """
    if rows.ndim != 2:
        raise ValueError(f"expected (N, C) rows, got {tuple(rows.shape)}")
    if out is None:
        out = torch.empty_like(rows, memory_format=torch.contiguous_format)
    if use_triton is None:
        use_triton = triton_usable(rows)
    fp8_out = out.dtype == FP8_DTYPE
    fp8_tail = tail is not None and tail.dtype == FP8_DTYPE
    if fp8_tail and not fp8_out:
        raise ValueError("a float8 tail takes a float8 output's values: out must be float8 too")
    if fp8_out:
        if out_scale is None:
            raise ValueError("a float8 output needs its out_scale")
        # The interpreter's float8 cast does not round as the GPU's does: there, and where the kernel cannot write
        # these tensors, the result in rows' dtype is cast after.
        fused = use_triton and not INTERPRETED and _row_major(rows) and _row_major(out)
        fused = fused and (tail is None or (tail.is_contiguous() and tail.shape[1] == rows.shape[1]))
        if not fused:
            return _cast_after(rows, gamma, scale, bias, silu, use_triton, pre_bias, tail, out, out_scale)
    if use_triton and _row_major(rows) and _row_major(out) and rows.numel():
        n, c = rows.shape
        block_c, block_r = _blocks(c)
        gamma_scaled = (gamma.reshape(-1).float() * scale).contiguous()
        has_bias = isinstance(bias, torch.Tensor)
        bias_t = bias.reshape(-1).float().contiguous() if has_bias else gamma_scaled
        if not has_bias and bias != 0.0:
            bias_t, has_bias = torch.full_like(gamma_scaled, float(bias)), True
        try:
            pre = gamma_scaled if pre_bias is None else pre_bias.float().contiguous()
            tail_ok = tail is not None and tail.is_contiguous() and tail.shape[1] == c and tail.shape[0] <= n
            inv_scale = gamma_scaled if out_scale is None else (1.0 / out_scale.float()).reshape(1)
            _rms_norm_silu_kernel[(triton.cdiv(n, block_r),)](
                rows, pre, gamma_scaled, bias_t, out, tail if tail_ok else out, inv_scale, n, rows.stride(0),
                out.stride(0), n - tail.shape[0] if tail_ok else n, C=c, BLOCK_C=block_c, BLOCK_R=block_r,
                HAS_PRE=pre_bias is not None, HAS_BIAS=has_bias, SILU=silu, HAS_TAIL=tail_ok, FP8_OUT=fp8_out,
                FP8_TAIL=fp8_tail, FP8_MAX=FP8_MAX, num_warps=4,
            )  # fmt: skip
            if tail is not None and not tail_ok:
                tail.copy_(out[n - tail.shape[0] :])
            return out
        except Exception as error:  # pragma: no cover - a broken Triton install: fall back for good
            _TRITON_BROKEN.append(repr(error))
    if fp8_out:
        return _cast_after(rows, gamma, scale, bias, silu, False, pre_bias, tail, out, out_scale)
    out.copy_(rms_norm_rows_reference(rows, gamma, scale, bias, silu, pre_bias))
    if tail is not None:
        tail.copy_(out[out.shape[0] - tail.shape[0] :])
    return out


def _cast_after(
    rows: torch.Tensor,
    gamma: torch.Tensor,
    scale: float,
    bias: torch.Tensor | float,
    silu: bool,
    use_triton: bool,
    pre_bias: torch.Tensor | None,
    tail: torch.Tensor | None,
    out: torch.Tensor,
    out_scale: torch.Tensor,
) -> torch.Tensor:
    """`rms_norm_rows` into a float8 `out` where its kernel does not write float8: the result in rows' dtype,
    then cast (the same values); a float8 tail takes out's last rows."""
    wide_tail = tail if tail is None or tail.dtype != FP8_DTYPE else None
    wide = rms_norm_rows(rows, gamma, scale, bias, silu=silu, use_triton=use_triton, pre_bias=pre_bias, tail=wide_tail)
    out.copy_(to_fp8(wide, out_scale))
    if tail is not None and wide_tail is None:
        tail.copy_(out[out.shape[0] - tail.shape[0] :])
    return out
