"""The fp8 DiT's activation quantizations as one Triton pass per block of rows (opt-in, issue 21).

Why: each float8 product of the DiT takes its input quantized per row (`fp8.quantize_rows`): the largest
magnitude of each token's row maps to float8's largest value. The product makes these inputs in three compiled
passes (`dit.compiled_ops()`: the modulated layer norm + quantize, the FFN's tanh GELU + quantize, the plain
quantize of the attention outputs), which torch.compile builds as looped reductions over rows of 1536 and 8960;
a steady 720p chunk spends about as long in them as in the products (bench/RESULTS.md round 16). Here one
program holds whole rows in registers: it reads each row once, computes the op, its largest magnitude, and
writes the float8 values and the row's scale.

The arithmetic is `fp8.quantize_rows` after the eager op: the op's result rounded to the input's dtype first
(the eager op returns that dtype), the scale amax / 448 and the values y / scale by IEEE division, rounded to
nearest even and saturated. The tanh GELU is computed as x * sigmoid(2u) (the same function) and the layer norm
by its two-pass mean and variance, so results may differ from PyTorch's at the last bit of the input's dtype.

Off by default (`CausalWanDiT.row_quantize_kernel`) until measured against the compiled passes on a GPU
(`bench/check_dit_quantize.py`, `bench_pipeline.py --row-quantize on`). Triton's interpreter casts float32 to
float8 wrongly (kernels/fp8_conv.py says how), so the CPU tests read the values before that cast
(`float_values`), which PyTorch then casts as the GPU does.
"""

from __future__ import annotations

import torch

from ..fp8 import FP8_DTYPE, FP8_MAX, gelu_quantize_rows, quantize_rows
from .norm_silu import INTERPRETED, tl, triton, triton_usable

PLAIN, GELU, LN_MODULATE = 0, 1, 2
# Elements one program holds (rows of C take max(1, ROW_ELEMENTS // next_power_of_two(C)) rows a program).
ROW_ELEMENTS = 8192

if triton is not None:

    @triton.jit
    def _row_quantize_kernel(
        x_ptr, shift_ptr, scale_ptr, out_ptr, row_scale_ptr, n_rows, tokens, C, eps,
        OP: tl.constexpr, ROWS: tl.constexpr, BLOCK_C: tl.constexpr, FP8_MAX: tl.constexpr,
        FLOAT_OUT: tl.constexpr,
    ):  # fmt: skip
        r = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        c = tl.arange(0, BLOCK_C)
        rmask, cmask = r < n_rows, c < C
        mask = rmask[:, None] & cmask[None, :]
        at = r.to(tl.int64)[:, None] * C + c[None, :]
        x = tl.load(x_ptr + at, mask=mask, other=0.0).to(tl.float32)
        if OP == 1:  # Wan's tanh GELU: 0.5 x (1 + tanh(u)) = x sigmoid(2u)
            u = 0.7978845608028654 * (x + 0.044715 * x * x * x)
            y = x * tl.sigmoid(2.0 * u)
        elif OP == 2:  # layer norm without affine, then x * (1 + scale) + shift, one vector per batch
            mean = tl.sum(x, axis=1) / C
            d = tl.where(mask, x - mean[:, None], 0.0)
            normed = d * tl.rsqrt(tl.sum(d * d, axis=1) / C + eps)[:, None]
            batch = (r // tokens).to(tl.int64)[:, None] * C + c[None, :]
            y = normed * (1.0 + tl.load(scale_ptr + batch, mask=mask, other=0.0))
            y += tl.load(shift_ptr + batch, mask=mask, other=0.0)
        else:
            y = x
        y = y.to(x_ptr.dtype.element_ty).to(tl.float32)  # the eager op's result is in the input's dtype
        amax = tl.max(tl.where(mask, tl.abs(y), 0.0), axis=1)
        s = tl.where(amax > 0, tl.math.div_rn(amax, FP8_MAX), 1.0)
        q = tl.clamp(tl.math.div_rn(y, s[:, None]), -FP8_MAX, FP8_MAX)
        if FLOAT_OUT:
            tl.store(out_ptr + at, q, mask=mask)
        else:
            tl.store(out_ptr + at, q.to(out_ptr.dtype.element_ty, fp_downcast_rounding="rtne"), mask=mask)
        tl.store(row_scale_ptr + r, s, mask=rmask)


def row_quantize_usable(x: torch.Tensor) -> bool:
    """Whether the kernel runs on x: CUDA tensors where Triton runs, CPU tensors under the interpreter."""
    return triton_usable(x) and (x.is_cuda != INTERPRETED) and x.dtype in (torch.bfloat16, torch.float16, torch.float32)


def row_quantize(
    x: torch.Tensor,
    op: int = PLAIN,
    shift: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
    eps: float = 1e-6,
    *,
    float_values: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(values (M, C), float32 scales (M, 1)) of op(x) quantized per row, x (..., C) with M rows; one pass.

    op: PLAIN, GELU (Wan's tanh GELU), or LN_MODULATE (x (B, L, C): layer norm over C without affine, then
    * (1 + scale) + shift, both (B, 1, C)). Values are float8, or with `float_values` the float32 values before
    the float8 cast (tests under the interpreter)."""
    c = x.shape[-1]
    rows = x.reshape(-1, c)
    if not rows.is_contiguous():
        rows = rows.contiguous()
    if op == LN_MODULATE and (x.ndim != 3 or shift is None or scale is None):
        raise ValueError("LN_MODULATE takes x (B, L, C) with shift and scale (B, 1, C)")
    tokens = x.shape[1] if op == LN_MODULATE else rows.shape[0]
    out = torch.empty(rows.shape, dtype=torch.float32 if float_values else FP8_DTYPE, device=x.device)
    row_scale = torch.empty(rows.shape[0], 1, dtype=torch.float32, device=x.device)
    if rows.shape[0]:
        block_c = triton.next_power_of_2(c)
        per_row = max(1, ROW_ELEMENTS // block_c)
        shift = rows if shift is None else shift.float().contiguous()
        scale = rows if scale is None else scale.float().contiguous()
        _row_quantize_kernel[(triton.cdiv(rows.shape[0], per_row),)](
            rows, shift, scale, out, row_scale, rows.shape[0], tokens, c, eps,
            OP=op, ROWS=per_row, BLOCK_C=block_c, FP8_MAX=FP8_MAX, FLOAT_OUT=float_values,
            num_warps=8 if block_c >= 4096 else 4,
        )  # fmt: skip
    return out, row_scale


def quantize_rows_kernel(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`fp8.quantize_rows` of (M, K) rows in one pass where the kernel runs (else that function)."""
    return row_quantize(x) if row_quantize_usable(x) else quantize_rows(x)


def gelu_quantize_rows_kernel(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`fp8.gelu_quantize_rows` in one pass where the kernel runs (else that function)."""
    return row_quantize(h, GELU) if row_quantize_usable(h) else gelu_quantize_rows(h)
