"""The fp8 DiT's per-row quantizations (the FFN's tanh GELU, the modulated norms, the plain ones) in one read.

Why (issue 21): every float8 product of the DiT takes its input quantized per row (a token's largest magnitude
maps to float8's largest value). torch.compile makes each such op a loop over the row for its extremes, then a
second loop that reads the row again to write the float8 values: for the FFN's hidden activation (tokens x 8960,
the DiT's largest tensor) that is two reads of the bf16 row and one write of its codes. Here one program holds
a whole row in registers: it reads the row once, applies the op (Wan's tanh GELU; or the affine-free layer norm
* (1 + scale) + shift, rounded to the activations' dtype as the op's output is), finds the row's scale (for the
GELU from the input's extremes, `fp8.gelu_row_scale`: no GELU twice) and writes the codes. A row is loaded as a
power-of-two head and a power-of-two tail (8960 = 8192 + 768 of 1024, 1536 = 1024 + 512), so few lanes idle:
an earlier kernel (removed) masked a 16384-wide block, one lane in two.

The queries' and keys' RMS norm + RoPE + float8 (`rms_rope_fp8`, dit's `_rms_rope_fp8_op`: a per-head scale
known from the norm's weight, kept on it by `head_scales`) reads each row once the same way, rotating its pairs
in registers, and writes the cached rows' codes in the same launch. It rounds the norm's and the rotation's
bf16 results as the eager op does; the compiled op may keep an intermediate product in float32, so a code may
differ from its where that rounding moves it (by a step, or across zero where a rotation cancels).

The arithmetic is fp8.py's: the scale `scale_for(amax)` and the values `to_fp8` (times the scale's reciprocal,
both by IEEE division, saturated, rounded to nearest even), the GELU as x * sigmoid(2u) in float32; codes may
differ by one step from the compiled ops where an exponential or a square root rounds apart. Triton's
interpreter casts float32 to float8 wrongly (kernels/fp8_conv.py says how), so under it the kernel stores the
float32 values before that cast, which PyTorch then casts as the GPU does.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch

from ..derived import derived_from
from ..fp8 import FP8_DTYPE, FP8_MAX, GELU_ARGMIN, GELU_MIN_BOUND, GELU_TANH_2C, normed_head_scale
from .norm_silu import _TRITON_BROKEN, INTERPRETED, tl, triton, triton_usable

Quantizing = tuple[torch.Tensor, torch.Tensor]
PLAIN, GELU, LN_MODULATE = 0, 1, 2
"""The ops before the quantization: none, Wan's tanh GELU, the affine-free layer norm * (1 + scale) + shift."""

if triton is not None:

    @triton.jit
    def _gelu(x, C2: tl.constexpr):
        return x * tl.sigmoid(C2 * (x + 0.044715 * x * x * x))

    @triton.jit
    def _ln_modulated(x, mean, rstd, shift_ptr, scale_ptr, batch_at, cols, mask, out_dtype):
        """One block of a row's layer norm * (1 + scale) + shift, rounded to the activations' dtype."""
        at = batch_at[:, None] + cols[None, :]
        y = (x - mean[:, None]) * rstd[:, None] * (1.0 + tl.load(scale_ptr + at, mask=mask, other=0.0))
        return (y + tl.load(shift_ptr + at, mask=mask, other=0.0)).to(out_dtype).to(tl.float32)

    @triton.jit
    def _store_fp8(out_ptr, at, values, inv, mask, FP8_MAX: tl.constexpr, FLOAT_OUT: tl.constexpr):
        """values times the reciprocal scale `inv` (broadcast to them), saturated, stored as float8 (rounded to
        nearest even), or as float32 under the interpreter (FLOAT_OUT)."""
        q = tl.clamp(values * inv, -FP8_MAX, FP8_MAX)
        if FLOAT_OUT:
            tl.store(out_ptr + at, q, mask=mask)
        else:
            tl.store(out_ptr + at, q.to(out_ptr.dtype.element_ty, fp_downcast_rounding="rtne"), mask=mask)

    @triton.jit
    def _row_quantize_kernel(
        x_ptr, out_ptr, scale_out_ptr, shift_ptr, scale_ptr, n_rows, K, tokens, eps,
        ROWS: tl.constexpr, HEAD: tl.constexpr, TAIL: tl.constexpr, OP: tl.constexpr, FP8_MAX: tl.constexpr,
        C2: tl.constexpr, ARGMIN: tl.constexpr, MIN_BOUND: tl.constexpr, FLOAT_OUT: tl.constexpr,
    ):  # fmt: skip
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        in_rows = rows < n_rows
        row_at = rows.to(tl.int64) * K
        head = tl.arange(0, HEAD)
        tail = HEAD + tl.arange(0, TAIL)
        head_mask = in_rows[:, None] & (head < K)[None, :]
        tail_mask = in_rows[:, None] & (tail < K)[None, :]
        head_at = row_at[:, None] + head[None, :]
        tail_at = row_at[:, None] + tail[None, :]
        a = tl.load(x_ptr + head_at, mask=head_mask, other=0.0).to(tl.float32)
        b = tl.load(x_ptr + tail_at, mask=tail_mask, other=0.0).to(tl.float32)
        if OP == 2:  # layer norm over the row (float32, two passes in registers), then the batch's modulation
            mean = (tl.sum(a, axis=1) + tl.sum(b, axis=1)) / K
            da = tl.where(head_mask, a - mean[:, None], 0.0)
            db = tl.where(tail_mask, b - mean[:, None], 0.0)
            rstd = tl.rsqrt((tl.sum(da * da, axis=1) + tl.sum(db * db, axis=1)) / K + eps)
            batch_at = (rows // tokens).to(tl.int64) * K
            a = _ln_modulated(a, mean, rstd, shift_ptr, scale_ptr, batch_at, head, head_mask, x_ptr.dtype.element_ty)
            b = _ln_modulated(b, mean, rstd, shift_ptr, scale_ptr, batch_at, tail, tail_mask, x_ptr.dtype.element_ty)
        if OP == 1:  # the GELU's extreme over the row from the input's (fp8.gelu_row_scale)
            hi = tl.maximum(
                tl.max(tl.where(head_mask, a, float("-inf")), axis=1),
                tl.max(tl.where(tail_mask, b, float("-inf")), axis=1),
            )
            lo = tl.minimum(
                tl.min(tl.where(head_mask, a, float("inf")), axis=1),
                tl.min(tl.where(tail_mask, b, float("inf")), axis=1),
            )
            under = tl.where(lo < ARGMIN, MIN_BOUND, -_gelu(lo, C2))
            amax = tl.maximum(_gelu(hi, C2), under)
            a = _gelu(a, C2)
            b = _gelu(b, C2)
        else:  # masked entries are 0
            amax = tl.maximum(tl.max(tl.abs(a), axis=1), tl.max(tl.abs(b), axis=1))
        scale = tl.where(amax > 0, tl.math.div_rn(amax, FP8_MAX), 1.0)
        tl.store(scale_out_ptr + rows, scale, mask=in_rows)
        inv = tl.math.div_rn(tl.full([ROWS], 1.0, tl.float32), scale)
        _store_fp8(out_ptr, head_at, a, inv[:, None], head_mask, FP8_MAX, FLOAT_OUT)
        _store_fp8(out_ptr, tail_at, b, inv[:, None], tail_mask, FP8_MAX, FLOAT_OUT)

    @triton.jit
    def _normed_rotated(
        x, rstd, w_ptr, cos_ptr, sin_ptr, token, pairs, cols, mask, DIM: tl.constexpr, HALF: tl.constexpr, dtype
    ):
        """A block of pairs (P, 2) of one row: RMS-normed (rounded to dtype), times the weight (rounded), then
        rotated by its token's angles in float32 (`rope.apply_rope`), rounded to dtype."""
        y = (x * rstd).to(dtype).to(tl.float32) * tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        y = y.to(dtype).to(tl.float32)
        first = (cols % 2) == 0
        x0 = tl.sum(tl.where(first, y, 0.0), axis=1)
        x1 = tl.sum(tl.where(first, 0.0, y), axis=1)
        angle_at = token * HALF + pairs % HALF
        inside = 2 * pairs < DIM
        c = tl.load(cos_ptr + angle_at, mask=inside, other=0.0)
        s = tl.load(sin_ptr + angle_at, mask=inside, other=0.0)
        return tl.where(first, (x0 * c - x1 * s)[:, None], (x0 * s + x1 * c)[:, None]).to(dtype)

    @triton.jit
    def _rms_rope_fp8_kernel(
        x_ptr, past_ptr, w_ptr, cos_ptr, sin_ptr, inv_ptr, roped_ptr, out_ptr, tokens, past_tokens, eps,
        DIM: tl.constexpr, HALF: tl.constexpr, HEAD: tl.constexpr, TAIL: tl.constexpr, KEEP: tl.constexpr,
        FP8_MAX: tl.constexpr, FLOAT_OUT: tl.constexpr,
    ):  # fmt: skip
        r = tl.program_id(0)
        joined = past_tokens + tokens
        batch, t = r // joined, r % joined
        two = tl.arange(0, 2)[None, :]
        head_pairs = tl.arange(0, HEAD)
        tail_pairs = HEAD + tl.arange(0, TAIL)
        head_cols = 2 * head_pairs[:, None] + two
        tail_cols = 2 * tail_pairs[:, None] + two
        head_mask = head_cols < DIM
        tail_mask = tail_cols < DIM
        head_inv = tl.load(inv_ptr + head_cols // (2 * HALF), mask=head_mask, other=0.0)
        tail_inv = tl.load(inv_ptr + tail_cols // (2 * HALF), mask=tail_mask, other=0.0)
        out_at = r.to(tl.int64) * DIM
        if t < past_tokens:  # a cached row, already normed and rotated: its float8 codes only
            past_row = past_ptr + (batch * past_tokens + t).to(tl.int64) * DIM
            a = tl.load(past_row + head_cols, mask=head_mask, other=0.0).to(tl.float32)
            b = tl.load(past_row + tail_cols, mask=tail_mask, other=0.0).to(tl.float32)
        else:
            token = t - past_tokens
            row = (batch * tokens + token).to(tl.int64) * DIM
            a = tl.load(x_ptr + row + head_cols, mask=head_mask, other=0.0).to(tl.float32)
            b = tl.load(x_ptr + row + tail_cols, mask=tail_mask, other=0.0).to(tl.float32)
            squares = tl.sum(tl.sum(a * a, axis=1), axis=0) + tl.sum(tl.sum(b * b, axis=1), axis=0)
            rstd = tl.rsqrt(squares / DIM + eps)
            dt = x_ptr.dtype.element_ty
            a = _normed_rotated(a, rstd, w_ptr, cos_ptr, sin_ptr, token, head_pairs, head_cols, head_mask, DIM, HALF,
                                dt)  # fmt: skip
            b = _normed_rotated(b, rstd, w_ptr, cos_ptr, sin_ptr, token, tail_pairs, tail_cols, tail_mask, DIM, HALF,
                                dt)  # fmt: skip
            if KEEP:
                tl.store(roped_ptr + row + head_cols, a, mask=head_mask)
                tl.store(roped_ptr + row + tail_cols, b, mask=tail_mask)
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        _store_fp8(out_ptr, out_at + head_cols, a, head_inv, head_mask, FP8_MAX, FLOAT_OUT)
        _store_fp8(out_ptr, out_at + tail_cols, b, tail_inv, tail_mask, FP8_MAX, FLOAT_OUT)


def row_split(k: int) -> tuple[int, int]:
    """(head, tail) blocks of a row of k: the largest power of two not above k, and the rest rounded up to a
    power of two (1, all masked, when there is none)."""
    head = 1 << (k.bit_length() - 1)
    rest = k - head
    return head, (1 << (rest - 1).bit_length() if rest else 1)


def row_quantize_usable(x: torch.Tensor) -> bool:
    """Whether the kernel runs on x (..., K): contiguous, bf16/fp16/fp32, CUDA where Triton runs (CPU tensors
    under the interpreter), rows of at most 16384 (one program's registers)."""
    return (
        triton_usable(x)
        and x.is_cuda != INTERPRETED
        and x.is_contiguous()
        and x.dtype in (torch.bfloat16, torch.float16, torch.float32)
        and 0 < x.shape[-1] <= 16384
    )


DEFAULT_LAUNCH = (1, 4)
"""(rows per program, warps): one row to a program of 4 warps, for the DiT's rows of 1536 and 8960 alike (the best
of the launch shapes `bench/check_dit_quantize.py` tried at 480p, 720p and 1080p, or within a few percent)."""


def row_quantize(
    x: torch.Tensor,
    op: int = PLAIN,
    shift: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
    eps: float = 0.0,
    launch: tuple[int, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(float8 values (M, K), float32 scales (M, 1)) of op(x), x (..., K) with M rows, quantized per row in one
    read of x (`row_quantize_usable` must hold). op: PLAIN (fp8.quantize_rows), GELU (fp8.gelu_quantize_rows) or
    LN_MODULATE (x (B, L, K), shift and scale (B, 1, K) float32: dit's `_ln_modulate_quantize_op`). The same
    values as those, up to one float8 step where an exponential or a square root rounds apart. `launch`: (rows
    per program, warps), default DEFAULT_LAUNCH."""
    k = x.shape[-1]
    rows = x.reshape(-1, k)
    m = rows.shape[0]
    if op == LN_MODULATE and (x.ndim != 3 or shift is None or scale is None):
        raise ValueError("LN_MODULATE takes x (B, L, K) with shift and scale (B, 1, K)")
    out = torch.empty((m, k), dtype=torch.float32 if INTERPRETED else FP8_DTYPE, device=x.device)
    row_scale = torch.empty((m, 1), dtype=torch.float32, device=x.device)
    if m:
        head, tail = row_split(k)
        per_program, warps = launch or DEFAULT_LAUNCH
        shift = rows if shift is None else shift.float().contiguous()
        scale = rows if scale is None else scale.float().contiguous()
        tokens = x.shape[1] if op == LN_MODULATE else m
        _row_quantize_kernel[(triton.cdiv(m, per_program),)](
            rows, out, row_scale, shift, scale, m, k, tokens, eps, ROWS=per_program, HEAD=head, TAIL=tail, OP=op,
            FP8_MAX=FP8_MAX, C2=GELU_TANH_2C, ARGMIN=GELU_ARGMIN, MIN_BOUND=GELU_MIN_BOUND, FLOAT_OUT=INTERPRETED,
            num_warps=warps,
        )  # fmt: skip
    if INTERPRETED:  # PyTorch's cast rounds to nearest even, as the GPU's store does
        out = out.to(FP8_DTYPE)
    return out, row_scale


def rms_rope_fp8_usable(x: torch.Tensor, weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, eps: float,
                        heads: int, *past: torch.Tensor) -> bool:  # fmt: skip
    """Whether `rms_rope_fp8` runs on these arguments: x (B, L, dim) bf16/fp16 with a weight of its dtype, angles
    (L, head_dim / 2), at most one past (B, Lp, heads, head_dim) of x's dtype, all contiguous."""
    if not (row_quantize_usable(x) and x.ndim == 3 and x.dtype in (torch.bfloat16, torch.float16)):
        return False
    b, tokens, dim = x.shape
    head_dim = dim // heads
    angles = (tokens, head_dim // 2)
    return (
        weight.dtype == x.dtype
        and dim % heads == 0
        and head_dim % 2 == 0
        and all(tuple(t.shape) == angles and t.is_contiguous() and t.device == x.device for t in (cos, sin))
        and len(past) <= 1
        and all(p.dtype == x.dtype and p.is_contiguous() and p.shape[::2] == (b, heads) and p.shape[3] == head_dim
                for p in past)
    )  # fmt: skip


def _scale_and_inverse(weight: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    scale = normed_head_scale(weight, heads)
    return scale, scale.reciprocal()


def head_scales(weight: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`fp8.normed_head_scale(weight, heads)` and its reciprocal, kept on the weight tensor (`derived_from`):
    they depend on the weight only, and computing them is a few tiny launches per block and call that the
    compiled op fuses away."""
    return derived_from(weight, "_infvsr_head_scales", weight, _scale_and_inverse, heads)


def rms_rope_fp8(
    x: torch.Tensor,
    weight: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    eps: float,
    heads: int,
    *past: torch.Tensor,
    keep_roped: bool = True,
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """dit's `_rms_rope_fp8_op` in one read of each row (`rms_rope_fp8_usable` must hold): the queries' or keys'
    RMS norm over the full width, times the weight, rotated per head (RoPE), in float8 with the per-head scale
    known from the weight (fp8.normed_head_scale), joined after the cached rows `past` (their codes written by
    the same launch). Returns (the rotated rows (B, L, heads, head_dim) if `keep_roped`, else None; the float8
    operand (B, Lp + L, heads, head_dim); the scales (B, heads))."""
    b, tokens, dim = x.shape
    head_dim = dim // heads
    scale, inverse = head_scales(weight, heads)
    joined = tokens + (past[0].shape[1] if past else 0)
    out = torch.empty((b, joined, heads, head_dim), dtype=torch.float32 if INTERPRETED else FP8_DTYPE, device=x.device)
    roped = torch.empty((b, tokens, heads, head_dim), dtype=x.dtype, device=x.device) if keep_roped else None
    if out.numel():
        head, tail = row_split(dim // 2)
        _rms_rope_fp8_kernel[(b * joined,)](
            x, past[0] if past else x, weight, cos, sin, inverse, x if roped is None else roped, out,
            tokens, joined - tokens, eps, DIM=dim, HALF=head_dim // 2, HEAD=head, TAIL=tail, KEEP=keep_roped,
            FP8_MAX=FP8_MAX, FLOAT_OUT=INTERPRETED, num_warps=4,
        )  # fmt: skip
    if INTERPRETED:
        out = out.to(FP8_DTYPE)
    return roped, out, scale.expand(b, heads)


def _kernel_usable(x: torch.Tensor, *_rest) -> bool:
    return row_quantize_usable(x)


def row_quantize_op(op: int, x: torch.Tensor, *rest) -> Quantizing:
    """`row_quantize` called as the DiT's op is: (x, then the op's own arguments)."""
    return row_quantize(x, op, *rest)


ROW_QUANTIZE_OPS: dict[str, tuple[Callable[..., object], Callable[..., bool]]] = {
    "quantize": (partial(row_quantize_op, PLAIN), _kernel_usable),
    "gelu_quantize": (partial(row_quantize_op, GELU), _kernel_usable),
    "ln_modulate_quantize": (partial(row_quantize_op, LN_MODULATE), _kernel_usable),
    "rms_rope_fp8": (rms_rope_fp8, rms_rope_fp8_usable),
}
"""The DiT's quantizing ops (dit._Ops' names) the kernels can stand in for: (the kernel's form, whether it runs
on the arguments)."""
ROW_QUANTIZE_DEFAULT = ("quantize", "gelu_quantize", "ln_modulate_quantize", "rms_rope_fp8")
"""The ops a DiT takes by the kernels unless told: each measured faster in GPU time than the compiled op it stands
in for (bench/check_dit_quantize.py's `gpu_ms`; the DiT's steady chunks replay in a CUDA graph, where launch
time is absent)."""


def kernel_or(name: str, fallback: Callable[..., object]) -> Callable[..., object]:
    """The DiT op `name` (a key of ROW_QUANTIZE_OPS, called as `fallback` is) by the kernel where it runs on the
    arguments, else by `fallback` (the compiled or eager op)."""
    kernel, usable = ROW_QUANTIZE_OPS[name]

    def run(*args, **kwargs):
        if usable(*args):
            try:
                return kernel(*args, **kwargs)
            except ValueError:  # a misuse (LN_MODULATE's shapes), not the install's fault
                raise
            except Exception as error:  # pragma: no cover - a broken Triton install: fall back for good
                _TRITON_BROKEN.append(repr(error))
        return fallback(*args, **kwargs)

    return run
