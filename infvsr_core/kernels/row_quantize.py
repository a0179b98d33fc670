"""The fp8 DiT's per-row quantizations (the FFN's tanh GELU + quantize, the plain quantize) in one read.

Why (issue 21): the down projection's float8 operand is the FFN's hidden activation (tokens x 8960, the DiT's
largest tensor) after Wan's tanh GELU, quantized per row. torch.compile makes that a loop over each row for its
extremes and a second loop that reads the row again to write the float8 values: two reads of the bf16 row and
one write of its float8 codes. Here one program holds a whole row in registers: it reads the row once, finds
the row's scale (`fp8.gelu_row_scale`: from the input's extremes, no GELU twice), and writes the codes. A row
is loaded as a power-of-two head with no mask and a masked power-of-two tail (8960 = 8192 + 768 of 1024), so
few lanes idle: round 17's kernel (removed) masked a 16384-wide block, one lane in two.

The arithmetic is fp8.py's: the scale `scale_for(amax)` and the values `to_fp8` (times the scale's reciprocal,
both by IEEE division, saturated, rounded to nearest even), the GELU as x * sigmoid(2u) in float32; codes may
differ by one step from the compiled pass where the exponential's rounding differs. Triton's interpreter casts
float32 to float8 wrongly (kernels/fp8_conv.py says how), so under it the kernel stores the float32 values
before that cast, which PyTorch then casts as the GPU does.
"""

from __future__ import annotations

import torch

from ..fp8 import FP8_DTYPE, FP8_MAX, GELU_ARGMIN, GELU_MIN_BOUND, GELU_TANH_2C, gelu_quantize_rows, quantize_rows
from .norm_silu import INTERPRETED, tl, triton, triton_usable

if triton is not None:

    @triton.jit
    def _gelu(x, C2: tl.constexpr):
        return x * tl.sigmoid(C2 * (x + 0.044715 * x * x * x))

    @triton.jit
    def _row_quantize_kernel(
        x_ptr, out_ptr, scale_ptr, K,
        HEAD: tl.constexpr, TAIL: tl.constexpr, GELU: tl.constexpr, FP8_MAX: tl.constexpr, C2: tl.constexpr,
        ARGMIN: tl.constexpr, MIN_BOUND: tl.constexpr, FLOAT_OUT: tl.constexpr,
    ):  # fmt: skip
        row = tl.program_id(0).to(tl.int64)
        x_row = x_ptr + row * K
        out_row = out_ptr + row * K
        head = tl.arange(0, HEAD)
        a = tl.load(x_row + head).to(tl.float32)
        if GELU:  # the GELU's extreme over the row from the input's (fp8.gelu_row_scale)
            hi = tl.max(a, axis=0)
            lo = tl.min(a, axis=0)
        else:
            amax = tl.max(tl.abs(a), axis=0)
        if TAIL > 0:
            tail = HEAD + tl.arange(0, TAIL)
            inside = tail < K
            b = tl.load(x_row + tail, mask=inside, other=0.0).to(tl.float32)
            if GELU:
                hi = tl.maximum(hi, tl.max(tl.where(inside, b, float("-inf")), axis=0))
                lo = tl.minimum(lo, tl.min(tl.where(inside, b, float("inf")), axis=0))
            else:
                amax = tl.maximum(amax, tl.max(tl.abs(b), axis=0))
        if GELU:
            under = tl.where(lo < ARGMIN, MIN_BOUND, -_gelu(lo, C2))
            amax = tl.maximum(_gelu(hi, C2), under)
        scale = tl.where(amax > 0, tl.math.div_rn(amax, FP8_MAX), 1.0)
        inv = tl.math.div_rn(1.0, scale)
        tl.store(scale_ptr + row, scale)
        if GELU:
            a = _gelu(a, C2)
        qa = tl.clamp(a * inv, -FP8_MAX, FP8_MAX)
        if FLOAT_OUT:
            tl.store(out_row + head, qa)
        else:
            tl.store(out_row + head, qa.to(out_ptr.dtype.element_ty, fp_downcast_rounding="rtne"))
        if TAIL > 0:
            if GELU:
                b = _gelu(b, C2)
            qb = tl.clamp(b * inv, -FP8_MAX, FP8_MAX)
            if FLOAT_OUT:
                tl.store(out_row + tail, qb, mask=inside)
            else:
                tl.store(out_row + tail, qb.to(out_ptr.dtype.element_ty, fp_downcast_rounding="rtne"), mask=inside)


def row_split(k: int) -> tuple[int, int]:
    """(head, tail) blocks of a row of k: the largest power of two not above k, and the rest rounded up to a
    power of two (0 when there is none)."""
    head = 1 << (k.bit_length() - 1)
    rest = k - head
    return head, (triton.next_power_of_2(rest) if rest else 0)


def row_quantize_usable(x: torch.Tensor) -> bool:
    """Whether the kernel runs on rows x: 2-D, contiguous, bf16/fp16/fp32, CUDA where Triton runs (CPU tensors
    under the interpreter), and rows of at most 16384 (one program's registers)."""
    return (
        triton_usable(x)
        and x.is_cuda != INTERPRETED
        and x.ndim == 2
        and x.is_contiguous()
        and x.dtype in (torch.bfloat16, torch.float16, torch.float32)
        and 0 < x.shape[1] <= 16384
    )


def row_quantize(
    x: torch.Tensor, gelu: bool = False, num_warps: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(float8 values (M, K), float32 scales (M, 1)) of x (M, K), or of Wan's tanh GELU of x with `gelu`, in one
    read of x (`row_quantize_usable` must hold). The same as fp8.quantize_rows / fp8.gelu_quantize_rows, up to
    one float8 step where the GELU's exponential rounds apart."""
    m, k = x.shape
    out = torch.empty((m, k), dtype=torch.float32 if INTERPRETED else FP8_DTYPE, device=x.device)
    scale = torch.empty((m, 1), dtype=torch.float32, device=x.device)
    if m:
        head, tail = row_split(k)
        warps = num_warps or (8 if head >= 4096 else 4)
        _row_quantize_kernel[(m,)](
            x, out, scale, k, HEAD=head, TAIL=tail, GELU=gelu, FP8_MAX=FP8_MAX, C2=GELU_TANH_2C,
            ARGMIN=GELU_ARGMIN, MIN_BOUND=GELU_MIN_BOUND, FLOAT_OUT=INTERPRETED, num_warps=warps,
        )  # fmt: skip
    if INTERPRETED:  # PyTorch's cast rounds to nearest even, as the GPU's store does
        out = out.to(FP8_DTYPE)
    return out, scale


def quantize_rows_kernel(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`fp8.quantize_rows` in one read where the kernel runs, else that function."""
    return row_quantize(x) if row_quantize_usable(x) else quantize_rows(x)


def gelu_quantize_rows_kernel(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`fp8.gelu_quantize_rows` in one read where the kernel runs, else that function."""
    return row_quantize(h, gelu=True) if row_quantize_usable(h) else gelu_quantize_rows(h)
