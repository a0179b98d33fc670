"""The VAE's causal 3x3x3 convs with float8 operands: a Triton implicit-GEMM kernel (issue 21).

Why: GPUs with fp8 tensor cores (Ada sm89, Hopper sm90, Blackwell) multiply
float8 matrices at twice the bf16 rate, and these convs are most of the VAE's
time. The layout is split_conv's: the causal conv's staged buffer
(1, C, T + 2, H, W), channels-last (2 history frames in front), here held in
float8_e4m3fn with one float32 scale for the whole tensor; the weight packed
as `pack_split`'s rows, each tap's Cin columns padded with zeros to
`tap_depth(Cin)` (Cout, 27 * tap_depth), float8 with one float32 scale per
output channel (`pack_fp8_conv_weight`). The tile for tap (dt, dh, dw) is one
tensor-memory (TMA) box of the (T + 2, H, W, C) view at (t + dt, h + dh - 1,
w + dw - 1): the copy engine fills rows and columns outside the frame with
zeros, which is the conv's spatial zero padding. Products accumulate in
float32 (on Hopper with Triton's default fast float8 accumulation, as the
DiT's scaled products use); the epilogue computes
acc * x_scale * w_scale[n] + bias[n] (+ residual) and rounds once into the
output (bf16 by default).

Pixels: a program's BLOCK_M pixels are BLOCK_H rows x BLOCK_W pixels of one
frame, BLOCK_W the largest power of two (up to BLOCK_M) that divides the row,
so rows of 160 or 320 pixels (the 720p decoder's lower tiers) fill whole
blocks instead of leaving the end of each row's last block empty (which cost
the bf16 kernel its lead where rows were not a multiple of its block).

Outputs: a program computes a group of output channels as up to two tensor-core
products (N1 + N2, each a power of two, the second may be 0) that share each
input tile: the input tile is the larger operand for these shapes (27 * C deep
for every pixel), so reading it once for all outputs is what round 12 found
to beat cuDNN at 192 channels. Where all outputs do not fit one program's
registers (384 float32 accumulators per pixel at 128 pixels), the outputs go in
groups, and the groups of one pixel tile are adjacent program ids: they run at
the same time, so the second read of the input tile comes from L2, not memory.
Output channels past Cout in the last group read zero weight rows (the copy
engine's fill) and are not stored.

Depth: a program takes each tap's input channels in blocks of BLOCK_K. Where
Cin is not a power of two below 128 (the 96-channel tier), a depth that
divides it is small (32), and so many small products keep the tensor cores
waiting on each step's bookkeeping; instead one block may reach past Cin
(96 -> 128): the copy engine fills the input's channels past Cin with zeros,
and the packed weight's padded columns are zero too, so the extra products add
nothing (a quarter of the work wasted, in exchange for a third of the steps).

Rows of taps (`row_packed`; on in the product, `FastForwardOptions.fp8_row_taps`,
where it measured faster end to end): in a channels-last buffer the channels of
pixels w - 1, w and w + 1 are adjacent, so the three horizontal taps of a
(dt, dh) row are one run of 3 * Cin channels starting at pixel w - 1. A tensor
descriptor whose pixel stride (Cin) is shorter than its rows (3 * Cin) reads
those runs directly: at 96 channels, 2 blocks of 128 and a tail of 32 per row,
2592 deep in all against 3456 with padded taps. A run reaches one pixel past
each end of the tile, so only tiles inside their row take it (the ends keep
the padded taps, whose boxes the copy engine fills with zeros past the frame).
The weight's rows are then unpadded (`pack_fp8_row_weight`, the same values).

The next norm: a resblock's first conv feeds only the second conv's RMS norm
+ SiLU. Where one program holds a pixel's outputs whole (`holds_pixel`), the
epilogue computes that norm (over the pixel's channels) and SiLU and writes
the second conv's float8 staged frames and its 2-frame cache entry (`gamma`,
`act`, `tail`): the first conv's output is never stored and the norm makes no
pass of its own. Those stores go through the copy engine (a tensor
descriptor's store per tile), which measured faster there; the plain outputs
are stored element by element, which measured as fast or faster
(bench/check_fp8_conv.py times both).

Triton's interpreter (TRITON_INTERPRET=1, the CPU tests) runs this kernel on
float8 operands as the GPU does: its float8 tensor-memory loads and tl.dot are
exact (values widened to float32). Its float32 -> float8 cast is not (it rounds
ties away from zero and drops the carry into the exponent), so the casting
kernel of `quantize_staged` runs on CUDA only; on the CPU PyTorch casts.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from ..fp8 import FP8_DTYPE, FP8_MAX, quantize_rows, scale_for, to_fp8
from .configs import first_that_runs
from .norm_silu import INTERPRETED, tl, triton, triton_usable
from .split_conv import CAPABILITY, CL3, TensorDescriptor, _pixel_strides, pack_split

# Measured on Hopper (sm90) only, as split_conv: other GPUs with float8 tensor cores (Ada, Blackwell) keep cuDNN's
# bf16 for these convs until the kernel is measured there (its block shapes and tensor-memory loads are Hopper's).
# Rows (W) must be a multiple of this many pixels: a 2D pixel tile's width is a power of two dividing the row.
ROW_MULTIPLE = 16
# Most output channels taken (the VAE's widest convs): up to 256 in one program, above that in groups.
MAX_OUT = 384
# Input channels: a multiple of the smallest float8 product depth.
CHANNEL_MULTIPLE = 32
# The row form (`row_taps_fit`): a row's runs in blocks this deep, its tail in a loop of its own with this many
# stages (the fastest tried: bench/RESULTS.md, "The 96-channel tier as 288-deep rows").
ROW_DEEP = 128
ROW_TAIL_STAGES = 3
# Elements per program of the float8 cast (`quantize_staged` on CUDA).
CAST_BLOCK = 4096


def tap_depth(cin: int) -> int:
    """Columns per tap in the packed weight: Cin, or the next power of two where Cin is below 128 and not one
    (96 -> 128), so that a depth block of that power may cover a whole tap (see the module docstring)."""
    return cin if cin >= 128 or cin & (cin - 1) == 0 else 1 << cin.bit_length()


def block_depth(cin: int, wanted: int) -> int:
    """The depth block a config asking for `wanted` gets: at most the tap's packed depth and a divisor of it, so
    that the blocks of one tap (ceil(cin / depth) of them) never read another tap's columns."""
    tap = tap_depth(cin)
    depth = min(wanted, tap)
    return depth if tap % depth == 0 else math.gcd(tap, depth)


class Config(NamedTuple):
    """One launch configuration: BLOCK_M pixels x (N1 + N2) outputs per program, K in blocks of at most `block_k`
    input channels, `stages` pipelined loads, `warps`; `rows` False keeps a program to one row (BLOCK_W = BLOCK_M,
    the last block of a row masked), the fallback if a GPU's compiler refuses the multi-row tile."""

    block_m: int
    n1: int
    n2: int
    block_k: int
    stages: int
    warps: int
    rows: bool = True


def _cover(cout: int) -> tuple[int, int]:
    """(N1, N2): powers of two (N2 may be 0) with N1 + N2 >= cout and N1 <= 256, as tight as two products get."""
    n1 = min(256, 1 << (cout.bit_length() - 1))
    rest = cout - n1
    return n1, 0 if rest <= 0 else max(16, 1 << (rest - 1).bit_length())


def _tma_writable(out: torch.Tensor) -> bool:
    """Whether the copy engine can store into `out` ((1, Cout, T, H, W), channels adjacent): 16-byte aligned
    start and pixel, row and frame strides (its rule for a tensor descriptor)."""
    size = out.element_size()
    strides = _pixel_strides(out)
    return strides is not None and out.data_ptr() % 16 == 0 and all(s * size % 16 == 0 for s in strides)


def _box(out: torch.Tensor, block_h: int, block_w: int, channels: int) -> TensorDescriptor:
    """A tensor descriptor of `out`'s (T, H, W, C) view whose box is one pixel tile x `channels` outputs."""
    view = out.permute(0, 2, 3, 4, 1)[0]
    return TensorDescriptor(view, list(view.shape), list(view.stride()), [1, block_h, block_w, channels])


def holds_pixel(cout: int) -> bool:
    """Whether one program computes all `cout` outputs of its pixels (`configs_for`: up to 256), so that the next
    RMS norm, over a pixel's channels, can run in the epilogue (`fp8_conv`'s `gamma`)."""
    return sum(_cover(cout)) <= 256


def _group_width(cout: int, groups: int) -> int:
    """Output channels per group when cout goes in `groups` groups (a multiple of 16)."""
    return -(-cout // (16 * groups)) * 16


# Measured orders per output width, fastest first (bench/check_fp8_conv.py --sweep); widths not listed take
# `configs_for`'s defaults. Empty: the sweep of bench/RESULTS.md round 16 (96 and 192 outputs) found the defaults'
# first configuration fastest, within 1 %.
CONFIGS: dict[int, tuple[Config, ...]] = {}


def configs_for(cout: int) -> tuple[Config, ...]:
    """Configurations tried in order for `cout` outputs (`CONFIGS` where measured): all outputs in one program
    up to 256, else two groups side by side (see the module's docstring)."""
    if cout in CONFIGS:
        return CONFIGS[cout]
    whole = _cover(cout)
    if holds_pixel(cout):
        n1, n2 = whole
        return (
            Config(128, n1, n2, 128, 4, 4),
            Config(128, n1, n2, 128, 3, 4),
            Config(64, n1, n2, 128, 2, 4),
            Config(64, n1, n2, 64, 2, 4, rows=False),
        )
    n1, n2 = _cover(_group_width(cout, 2))
    return (
        Config(128, n1, n2, 128, 4, 8),
        Config(64, *whole, 128, 3, 8),
        Config(64, n1, n2, 128, 2, 4),
        Config(64, n1, n2, 64, 2, 4, rows=False),
    )


if triton is not None:

    @triton.jit
    def _conv_outputs(acc, n, x_scale, w_scale_ptr, bias_ptr, COUT):
        """acc * x_scale * w_scale[n] + bias[n] in float32; 0 for the outputs n >= COUT (not the conv's)."""
        valid = n < COUT
        scale = tl.load(w_scale_ptr + n, mask=valid, other=0.0) * x_scale
        return acc * scale[None, :] + tl.load(bias_ptr + n, mask=valid, other=0.0)[None, :]

    @triton.jit
    def _store_outputs(
        acc, n0, keep, pix_out, pix_res, x_scale, w_scale_ptr, bias_ptr, res_ptr, out_ptr, out_desc, t, h0, w0,
        COUT, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, HAS_RES: tl.constexpr, TMA_OUT: tl.constexpr,
    ):  # fmt: skip
        """acc * x_scale * w_scale[n] + bias[n] (+ residual) into out, for the outputs n0 <= n < COUT of kept
        pixels: through the copy engine (`out_desc`, a box of the (T, H, W, Cout) view whose parts outside it are
        not written) with TMA_OUT, else one store per element."""
        n = n0 + tl.arange(0, acc.shape[1])
        y = _conv_outputs(acc, n, x_scale, w_scale_ptr, bias_ptr, COUT)
        mask = keep[:, None] & (n < COUT)[None, :]
        if HAS_RES:
            y += tl.load(res_ptr + pix_res[:, None] + n[None, :], mask=mask, other=0.0).to(tl.float32)
        if TMA_OUT:
            box = y.to(out_desc.dtype).reshape(1, BLOCK_H, BLOCK_W, y.shape[1])
            out_desc.store([t, h0, w0, n0], box)
        else:
            tl.store(out_ptr + pix_out[:, None] + n[None, :], y.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _store_normed(
        y, n0, inv_norm, keep, pix_act, gamma_ptr, act_ptr, tail_ptr, act_desc, tail_desc, inv_act_scale, t, h0, w0,
        T, sa_t, COUT, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, HAS_TAIL: tl.constexpr, FP8_ACT: tl.constexpr,
        TAIL_ACT: tl.constexpr, MODEL_DTYPE: tl.constexpr, FP8_MAX: tl.constexpr, TMA_OUT: tl.constexpr,
    ):  # fmt: skip
        """SiLU(y * inv_norm * gamma[n]) rounded to the model's dtype, as the norm pass rounds it; that value / the
        act scale into act (float8, rounded to nearest even), and the last 2 frames into tail: the model's dtype's
        values, or act's with TAIL_ACT (a float8 cache entry); for the outputs n0 <= n < COUT, through the copy
        engine with TMA_OUT (as `_store_outputs`)."""
        n = n0 + tl.arange(0, y.shape[1])
        valid = n < COUT
        z = y * inv_norm[:, None] * tl.load(gamma_ptr + n, mask=valid, other=0.0)[None, :]
        z = (z * tl.sigmoid(z)).to(MODEL_DTYPE)
        mask = keep[:, None] & valid[None, :]
        q = z.to(tl.float32) * inv_act_scale
        if FP8_ACT:
            q = tl.clamp(q, -FP8_MAX, FP8_MAX).to(act_ptr.dtype.element_ty, fp_downcast_rounding="rtne")
        if HAS_TAIL:
            if t >= T - 2:
                kept = q if TAIL_ACT else z
                if TMA_OUT:
                    box = kept.to(tail_desc.dtype).reshape(1, BLOCK_H, BLOCK_W, y.shape[1])
                    tail_desc.store([t - (T - 2), h0, w0, n0], box)
                else:
                    tail = tail_ptr + (pix_act - (T - 2) * sa_t)[:, None] + n[None, :]
                    tl.store(tail, kept.to(tail_ptr.dtype.element_ty), mask=mask)
        if TMA_OUT:
            act_desc.store([t, h0, w0, n0], q.to(act_desc.dtype).reshape(1, BLOCK_H, BLOCK_W, y.shape[1]))
        else:
            tl.store(act_ptr + pix_act[:, None] + n[None, :], q, mask=mask)

    @triton.jit
    def _tap_products(
        x_desc, w1_desc, w2_desc, acc1, acc2, t, h0, w0, n0, C: tl.constexpr, TAP_K: tl.constexpr,
        N1: tl.constexpr, N2: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, STAGES: tl.constexpr,
    ):  # fmt: skip
        """The 27 taps' products, each tap's channels in blocks of BLOCK_K (the last may reach into the padding)."""
        KC: tl.constexpr = (C + BLOCK_K - 1) // BLOCK_K
        for i in tl.range(0, 27 * KC, num_stages=STAGES):
            tap = i // KC
            c0 = (i % KC) * BLOCK_K
            a = x_desc.load([t + tap // 9, h0 + (tap // 3) % 3 - 1, w0 + tap % 3 - 1, c0])
            a = a.reshape(BLOCK_M, BLOCK_K)
            k = tap * TAP_K + c0
            acc1 = tl.dot(a, w1_desc.load([n0, k]).T, acc1)  # K-major weights: what float8 products take
            if N2 > 0:
                acc2 = tl.dot(a, w2_desc.load([n0 + N1, k]).T, acc2)
        return acc1, acc2

    @triton.jit
    def _row_products(
        xr_desc, xr_tail_desc, wr1_desc, wr2_desc, wr1_tail_desc, wr2_tail_desc, acc1, acc2, t, h0, w0, n0,
        C: tl.constexpr, N1: tl.constexpr, N2: tl.constexpr, BLOCK_M: tl.constexpr, ROW_DEEP: tl.constexpr,
        ROW_TAIL: tl.constexpr, STAGES: tl.constexpr, TAIL_STAGES: tl.constexpr,
    ):  # fmt: skip
        """The 9 (dt, dh) rows' products, each row's 3 * C channels a run from pixel w - 1: its full ROW_DEEP
        blocks as one loop, then each row's last ROW_TAIL channels as a second."""
        ROW_K: tl.constexpr = 3 * C
        FULL: tl.constexpr = ROW_K // ROW_DEEP
        for i in tl.range(0, 9 * FULL, num_stages=STAGES):
            row = i // FULL
            c0 = (i % FULL) * ROW_DEEP
            a = xr_desc.load([t + row // 3, h0 + row % 3 - 1, w0 - 1, c0]).reshape(BLOCK_M, ROW_DEEP)
            acc1 = tl.dot(a, wr1_desc.load([n0, row * ROW_K + c0]).T, acc1)
            if N2 > 0:
                acc2 = tl.dot(a, wr2_desc.load([n0 + N1, row * ROW_K + c0]).T, acc2)
        if ROW_TAIL > 0:
            for row in tl.range(0, 9, num_stages=TAIL_STAGES):
                a = xr_tail_desc.load([t + row // 3, h0 + row % 3 - 1, w0 - 1, FULL * ROW_DEEP])
                a = a.reshape(BLOCK_M, ROW_TAIL)
                k = row * ROW_K + FULL * ROW_DEEP
                acc1 = tl.dot(a, wr1_tail_desc.load([n0, k]).T, acc1)
                if N2 > 0:
                    acc2 = tl.dot(a, wr2_tail_desc.load([n0 + N1, k]).T, acc2)
        return acc1, acc2

    @triton.jit
    def _fp8_conv_kernel(
        x_desc, w1_desc, w2_desc, x_scale_ptr, w_scale_ptr, bias_ptr, res_ptr, out_ptr, out1_desc, out2_desc,
        gamma_ptr, act_ptr, tail_ptr, tail1_desc, tail2_desc, act_scale_ptr,
        xr_desc, xr_tail_desc, wr1_desc, wr2_desc, wr1_tail_desc, wr2_tail_desc,
        T, H, W, COUT,
        so_t, so_h, so_w, sr_t, sr_h, sr_w,
        C: tl.constexpr, TAP_K: tl.constexpr, N1: tl.constexpr, N2: tl.constexpr, GROUPS: tl.constexpr,
        BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_K: tl.constexpr,
        HAS_RES: tl.constexpr, NORM: tl.constexpr, HAS_TAIL: tl.constexpr, FP8_ACT: tl.constexpr,
        TAIL_ACT: tl.constexpr, MODEL_DTYPE: tl.constexpr, FP8_MAX: tl.constexpr, TMA_OUT: tl.constexpr,
        STAGES: tl.constexpr,
        ROWS: tl.constexpr, ROW_DEEP: tl.constexpr, ROW_TAIL: tl.constexpr, TAIL_STAGES: tl.constexpr,
    ):  # fmt: skip
        pid = tl.program_id(0)
        group = pid % GROUPS  # a pixel tile's groups are adjacent programs: its input tile is shared through L2
        tile = pid // GROUPS
        tiles_w = tl.cdiv(W, BLOCK_W)
        tiles_h = tl.cdiv(H, BLOCK_H)
        w0 = (tile % tiles_w) * BLOCK_W
        h0 = ((tile // tiles_w) % tiles_h) * BLOCK_H
        t = tile // (tiles_w * tiles_h)
        n0 = group * (N1 + N2)
        BLOCK_M: tl.constexpr = BLOCK_H * BLOCK_W
        acc1 = tl.zeros((BLOCK_M, N1), dtype=tl.float32)
        acc2 = tl.zeros((BLOCK_M, N2 if N2 > 0 else 16), dtype=tl.float32)  # unused (and dropped) without N2
        if ROWS:
            if (w0 > 0) & (w0 + BLOCK_W < W):  # pixels w0 - 1 .. w0 + BLOCK_W all in the row: the rows' runs
                acc1, acc2 = _row_products(xr_desc, xr_tail_desc, wr1_desc, wr2_desc, wr1_tail_desc, wr2_tail_desc,
                                           acc1, acc2, t, h0, w0, n0, C, N1, N2, BLOCK_M, ROW_DEEP, ROW_TAIL, STAGES,
                                           TAIL_STAGES)  # fmt: skip
            else:
                acc1, acc2 = _tap_products(x_desc, w1_desc, w2_desc, acc1, acc2, t, h0, w0, n0, C, TAP_K, N1, N2,
                                           BLOCK_M, BLOCK_K, STAGES)  # fmt: skip
        else:
            acc1, acc2 = _tap_products(x_desc, w1_desc, w2_desc, acc1, acc2, t, h0, w0, n0, C, TAP_K, N1, N2, BLOCK_M,
                                       BLOCK_K, STAGES)  # fmt: skip
        m = tl.arange(0, BLOCK_M)
        h = (h0 + m // BLOCK_W).to(tl.int64)
        w = (w0 + m % BLOCK_W).to(tl.int64)
        keep = (h < H) & (w < W)
        tt = t.to(tl.int64)
        pix_out = tt * so_t + h * so_h + w * so_w
        pix_res = tt * sr_t + h * sr_h + w * sr_w
        x_scale = tl.load(x_scale_ptr)
        if NORM:  # one group holds each pixel's outputs whole: the next norm + SiLU, in float8, into act
            n = tl.arange(0, N1)
            y1 = _conv_outputs(acc1, n, x_scale, w_scale_ptr, bias_ptr, COUT)
            square = tl.sum(y1 * y1, axis=1)
            if N2 > 0:
                y2 = _conv_outputs(acc2, N1 + tl.arange(0, N2), x_scale, w_scale_ptr, bias_ptr, COUT)
                square += tl.sum(y2 * y2, axis=1)
            inv_norm = 1.0 / tl.maximum(tl.sqrt(square), 1e-12)  # F.normalize's eps, as the norm pass
            inv_act_scale = tl.math.div_rn(1.0, tl.load(act_scale_ptr))  # IEEE, as the norm pass's reciprocal
            _store_normed(y1, 0, inv_norm, keep, pix_out, gamma_ptr, act_ptr, tail_ptr, out1_desc, tail1_desc,
                          inv_act_scale, t, h0, w0, T, so_t, COUT, BLOCK_H, BLOCK_W, HAS_TAIL, FP8_ACT, TAIL_ACT,
                          MODEL_DTYPE, FP8_MAX, TMA_OUT)  # fmt: skip
            if N2 > 0:
                _store_normed(y2, N1, inv_norm, keep, pix_out, gamma_ptr, act_ptr, tail_ptr, out2_desc, tail2_desc,
                              inv_act_scale, t, h0, w0, T, so_t, COUT, BLOCK_H, BLOCK_W, HAS_TAIL, FP8_ACT, TAIL_ACT,
                              MODEL_DTYPE, FP8_MAX, TMA_OUT)  # fmt: skip
        else:
            _store_outputs(acc1, n0, keep, pix_out, pix_res, x_scale, w_scale_ptr, bias_ptr, res_ptr, out_ptr,
                           out1_desc, t, h0, w0, COUT, BLOCK_H, BLOCK_W, HAS_RES, TMA_OUT)  # fmt: skip
            if N2 > 0:
                _store_outputs(acc2, n0 + N1, keep, pix_out, pix_res, x_scale, w_scale_ptr, bias_ptr, res_ptr,
                               out_ptr, out2_desc, t, h0, w0, COUT, BLOCK_H, BLOCK_W, HAS_RES, TMA_OUT)  # fmt: skip

    @triton.jit
    def _cast_kernel(x_ptr, scale_ptr, out_ptr, n, FP8_MAX: tl.constexpr, BLOCK: tl.constexpr):
        """out = float8(clamp(x * (1 / scale))), rounded to nearest even (fp8.to_fp8): one read, one write."""
        i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = i < n
        x = tl.load(x_ptr + i, mask=mask, other=0.0).to(tl.float32)
        inv_scale = tl.math.div_rn(1.0, tl.load(scale_ptr))  # IEEE, as PyTorch's reciprocal: once per thread
        y = tl.clamp(x * inv_scale, -FP8_MAX, FP8_MAX)
        tl.store(out_ptr + i, y.to(out_ptr.dtype.element_ty, fp_downcast_rounding="rtne"), mask=mask)


def fp8_conv_usable(conv: torch.nn.Conv3d, buf: torch.Tensor) -> bool:
    """Whether `fp8_conv` may run `conv` (a causal 3x3x3, padding 1) on this staged buffer (in float8, or in a
    float dtype about to be quantized): `fp8_conv_accepts` its shape, channels-last, a dtype it takes."""
    return (
        buf.ndim == 5
        and fp8_conv_accepts(conv, tuple(buf.shape), buf.device)
        and buf.is_contiguous(memory_format=CL3)
        and buf.dtype in (FP8_DTYPE, torch.bfloat16, torch.float16, torch.float32)
    )


def fp8_conv_accepts(conv: torch.nn.Conv3d, shape: tuple[int, ...], device: torch.device) -> bool:
    """Whether the kernel takes `conv` on a staged buffer of `shape` (1, C, T + 2, H, W) on `device`: Hopper GPUs
    (`CAPABILITY`) or CPU tensors under the interpreter, and not a shape where no block configuration ran
    before. Callers that write the staged buffer in float8 ask before they write it."""
    if TensorDescriptor is None or triton is None or (device.type != "cuda" and not INTERPRETED):
        return False
    if INTERPRETED:
        if device.type == "cuda":
            return False
    elif torch.cuda.get_device_capability(device) != CAPABILITY:  # Hopper has float8 tensor cores
        return False
    if len(shape) != 5:
        return False
    batch, c, frames, _, w = shape
    shape_ok = conv.kernel_size == (3, 3, 3) and conv.stride == (1, 1, 1) and conv.dilation == (1, 1, 1)
    return (
        shape_ok
        and conv.groups == 1
        and tuple(getattr(conv, "_padding", ())) == (1, 1, 1, 1, 2, 0)
        and conv.in_channels == c
        and c % CHANNEL_MULTIPLE == 0
        and conv.out_channels % 16 == 0
        and conv.out_channels <= MAX_OUT
        and batch == 1
        and frames >= 3
        and w % ROW_MULTIPLE == 0
        and _chosen.get(_config_key(device, c, conv.out_channels, w), 0) >= 0
    )


def row_taps_fit(cin: int) -> bool:
    """Whether the row form applies to `cin` input channels: the taps are padded (`tap_depth`), and a row of three
    taps splits into ROW_DEEP-deep blocks and one tail a float8 product can take (a power of two, at least 16)."""
    tail = 3 * cin % ROW_DEEP
    return tap_depth(cin) != cin and (tail == 0 or (tail >= 16 and tail & (tail - 1) == 0))


def pack_fp8_row_weight(weight: torch.Tensor) -> torch.Tensor:
    """(Cout, Cin, 3, 3, 3) -> float8 rows (Cout, 27 * Cin) in `pack_split`'s order, unpadded: column
    (3 dt + dh) * 3 Cin + dw * Cin + c, so each (dt, dh) row of taps is 3 Cin adjacent columns. The values and
    the scales are `pack_fp8_conv_weight`'s, without its padding columns."""
    return quantize_rows(pack_split(weight))[0].contiguous()


def pack_fp8_conv_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(Cout, Cin, 3, 3, 3) -> (float8 rows (Cout, 27 * tap_depth(Cin)) in `pack_split`'s order, each tap's
    columns past Cin zero; float32 scales (Cout,)): each output channel's largest magnitude maps to float8's
    largest finite value (`fp8.quantize_rows`)."""
    cout, cin = weight.shape[:2]
    values, scale = quantize_rows(pack_split(weight))
    depth = tap_depth(cin)
    if depth != cin:
        padded = values.new_zeros((cout, 27, depth))  # float8 zero is the all-zero byte
        padded[:, :, :cin] = values.view(cout, 27, cin)
        values = padded.view(cout, 27 * depth)
    return values.contiguous(), scale.reshape(-1).contiguous()


def static_activation_scale(gamma: torch.Tensor, channels: int, bias: torch.Tensor | float = 0.0) -> torch.Tensor:
    """A per-tensor float8 scale that no output of the VAE's norm + SiLU can exceed (float32 scalar tensor).

    Wan's RMS norm is y = F.normalize(x over channels) * sqrt(C) * gamma + bias, and the normalized vector has
    unit length, so each of its entries is at most 1 in magnitude: |y_i| <= sqrt(C) * max|gamma| + max|bias|
    (reached when all of a pixel's mass is in the channel of the largest gamma), and |SiLU(y)| <= |y|. A scale
    of that bound / 448 (float8_e4m3fn's largest finite value) therefore never saturates, for any input, and
    needs no reduction over the tensor: the norm pass can write float8 directly. The headroom costs little
    because float8 is a floating-point format: a typical entry (about |gamma|, as the normalized entries are
    about 1 / sqrt(C)) maps to about 448 / sqrt(C), and float8 keeps its full relative precision down to
    2**-6, so only entries over a thousand times smaller than typical become subnormal. Inputs that are not
    norm outputs (the decoder's first conv, the temporal upsampler's) take `quantize_staged`'s dynamic scale.
    """
    bound = gamma.detach().abs().amax().float() * math.sqrt(channels)
    if isinstance(bias, torch.Tensor):
        bound = bound + bias.detach().abs().amax().float()
    else:
        bound = bound + abs(float(bias))
    return scale_for(bound)


def dynamic_activation_scale(buf: torch.Tensor) -> torch.Tensor:
    """The per-tensor scale that maps buf's largest magnitude to 448 (1 for an all-zero buffer): one reduction."""
    return scale_for(torch.linalg.vector_norm(buf, float("inf"), dtype=torch.float32))


def quantize_staged(
    buf: torch.Tensor, scale: torch.Tensor | None = None, *, use_triton: bool | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """A staged buffer (1, C, T + 2, H, W) channels-last -> (float8 values of buf / scale, same layout; scale).

    `scale` (float32 scalar tensor): `static_activation_scale` for a norm's output, None for the dynamic one
    (`dynamic_activation_scale`). A buffer already in float8 (a norm pass wrote it, with `scale`) is returned as
    it is. On CUDA one Triton pass casts (rounding to nearest even, saturating); on the CPU PyTorch does (the
    interpreter's float8 cast does not round to nearest even: see the module docstring).
    """
    if buf.ndim != 5 or not buf.is_contiguous(memory_format=CL3):
        raise ValueError(f"expected a channels-last (1, C, T, H, W) staged buffer, got {tuple(buf.shape)}")
    if buf.dtype == FP8_DTYPE:
        if scale is None:
            raise ValueError("a float8 staged buffer comes with the scale it was written with")
        return buf, scale.to(buf.device, torch.float32).reshape(())
    if scale is None:
        scale = dynamic_activation_scale(buf)
    out = torch.empty_like(buf, dtype=FP8_DTYPE, memory_format=CL3)
    return out, cast_into(out, buf, scale, use_triton=use_triton)


def cast_into(
    target: torch.Tensor, source: torch.Tensor, scale: torch.Tensor, *, use_triton: bool | None = None
) -> torch.Tensor:
    """target = float8(clamp(source / scale)), rounded to nearest even (fp8.to_fp8's rounding); both
    (1, C, T, H, W) channels-last with their pixels dense (a staged buffer, or a run of its
    frames). Returns the scale as a float32 scalar tensor."""
    scale = scale.to(source.device, torch.float32).reshape(())
    flat = source.permute(0, 2, 3, 4, 1).reshape(-1)  # dense in channels-last order: a view
    into = target.permute(0, 2, 3, 4, 1).view(-1)
    if use_triton is None:
        use_triton = source.is_cuda and triton_usable(source)
    if use_triton and flat.numel():
        n = flat.numel()
        _cast_kernel[(triton.cdiv(n, CAST_BLOCK),)](flat, scale, into, n, FP8_MAX=FP8_MAX, BLOCK=CAST_BLOCK)
    else:
        into.copy_(to_fp8(flat, scale))
    return scale


# The model's dtype as the epilogue rounds to it (the norm pass's rounding, before the float8 cast).
_TRITON_DTYPES = {}
if triton is not None:
    _TRITON_DTYPES = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}

_chosen: dict[tuple, int] = {}  # (device, C, Cout, row factor) -> index into the configurations; -1: none ran
_failures: list[str] = []


def _config_key(device: torch.device, c: int, cout: int, width: int) -> tuple:
    """The shapes that share a chosen configuration: device, widths, and how rows of `width` split into tiles."""
    return (device, c, cout, min(width & -width, 256))


def _pixel_tile(config: Config, width: int) -> tuple[int, int]:
    """(BLOCK_H, BLOCK_W) of a config's pixel block for rows of `width` pixels."""
    block_w = min(config.block_m, width & -width) if config.rows else config.block_m
    if block_w < ROW_MULTIPLE:
        block_w = config.block_m
    return config.block_m // block_w, block_w


def fp8_conv(
    buf: torch.Tensor,
    x_scale: torch.Tensor,
    packed: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None,
    residual: torch.Tensor | None = None,
    *,
    out: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.bfloat16,
    gamma: torch.Tensor | None = None,
    act: torch.Tensor | None = None,
    act_scale: torch.Tensor | None = None,
    tail: torch.Tensor | None = None,
    tma_out: bool | None = None,
    row_packed: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """conv3d(buf * x_scale, weight, bias, padding (0, 1, 1)) [+ residual] on a float8 staged buffer.

    buf: (1, C, T + 2, H, W) float8_e4m3fn, channels-last (`quantize_staged`); x_scale: its float32 scalar
    scale; packed, w_scale: `pack_fp8_conv_weight(weight)`; bias: (Cout,) or None. The result goes into `out`
    ((1, Cout, T, H, W) with adjacent channels, e.g. a view inside a zero-bordered buffer; new channels-last in
    `out_dtype` if None), rounded once from float32, and is returned. None if no block configuration runs
    here (the caller takes cuDNN).

    With `gamma` (float32 (Cout,): the next RMS norm's gamma x scale; a resblock's first conv, Cout <= 256 so
    that one program holds a pixel's outputs whole) the result is not stored: SiLU(normalize(result) x gamma),
    rounded to `out_dtype` as the norm pass rounds it, divided by `act_scale` into `act` (float8, the next
    conv's staged frames: (1, Cout, T, H, W) with dense pixels) and, when given, its last 2 frames into `tail`
    (the next conv's cache entry, the same pixel strides: in `out_dtype`, or float8 with act's values, the
    float8 history of `FastForwardOptions.fp8_history`); `act` is returned.

    `tma_out`: the stores through the copy engine (a tensor descriptor's store of each product's tile, where the
    strides allow it) or element by element from the products' registers. Default (None): the copy engine for
    the next norm's outputs, element stores otherwise: the faster of the two for each (bench/check_fp8_conv.py
    times both).

    `row_packed` (`pack_fp8_row_weight(weight)`, the same scales): where Cin is padded per tap (`row_taps_fit`),
    the tiles inside their row read each (dt, dh) row of taps as one run of 3 * Cin channels (the module's
    docstring); ignored elsewhere.
    """
    if buf.dtype != FP8_DTYPE or packed.dtype != FP8_DTYPE:
        raise ValueError(f"fp8_conv takes float8_e4m3fn operands, got {buf.dtype} and {packed.dtype}")
    if buf.ndim != 5 or buf.shape[0] != 1 or buf.shape[2] < 3:
        raise ValueError(f"expected a staged (1, C, T + 2, H, W) buffer with T >= 1, got {tuple(buf.shape)}")
    _, c, frames, h, w = buf.shape
    t = frames - 2
    cout = packed.shape[0]
    depth = tap_depth(c)
    if packed.shape[1] != 27 * depth or c % CHANNEL_MULTIPLE:
        raise ValueError(
            f"packed weight {tuple(packed.shape)} does not match {c} input channels x 27 taps "
            f"(expected {27 * depth} columns: pack_fp8_conv_weight)"
        )
    key = _config_key(buf.device, c, cout, w)
    if _chosen.get(key, 0) < 0:  # no configuration ran for this shape before: nothing to allocate
        return None
    normed = gamma is not None
    if normed:
        if act is None or act_scale is None or act.dtype != FP8_DTYPE or residual is not None:
            raise ValueError("a conv with the next norm in its epilogue writes float8 act with act_scale, no residual")
        if not holds_pixel(cout):
            raise ValueError(f"the next norm needs a pixel's outputs in one program: {cout} outputs are too many")
        tail_ok = tail is None or (
            t >= 2 and tail.dtype in (out_dtype, FP8_DTYPE) and _pixel_strides(tail) == _pixel_strides(act)
        )
        if not tail_ok or _pixel_strides(act) is None:
            raise ValueError("act and tail must have adjacent channels and the same pixel strides")
        # The interpreter's float8 cast does not round as the GPU's does: there the kernel stores act / act_scale
        # in float32 and PyTorch casts it (the module docstring); a float8 tail likewise.
        out = torch.empty_like(act, dtype=torch.float32) if INTERPRETED else act
    elif out is None:
        out = torch.empty((1, cout, t, h, w), dtype=out_dtype, device=buf.device, memory_format=CL3)
    tail_act = normed and tail is not None and tail.dtype == FP8_DTYPE
    tail_store = torch.empty_like(tail, dtype=torch.float32) if tail_act and INTERPRETED else tail
    strides = _pixel_strides(out)
    res_strides = (0, 0, 0) if residual is None else _pixel_strides(residual)
    if strides is None or res_strides is None:
        return None
    view = buf.permute(0, 2, 3, 4, 1)[0]  # (T + 2, H, W, C)
    x_scale = x_scale.to(device=buf.device, dtype=torch.float32).reshape(1)
    w_scale = w_scale.to(device=buf.device, dtype=torch.float32).reshape(-1).contiguous()
    bias = torch.zeros_like(w_scale) if bias is None else bias.to(w_scale).reshape(-1).contiguous()
    packed = packed.contiguous()
    if normed:
        gamma = gamma.to(w_scale).reshape(-1).contiguous()
        act_scale = act_scale.to(w_scale).reshape(1)
        tail_arg = tail_store if tail is not None else torch.empty(1, dtype=out_dtype, device=buf.device)

    tails = tail_store if normed and tail is not None else out
    tma_out = (normed if tma_out is None else tma_out) and _tma_writable(out) and _tma_writable(tails)

    rows = row_packed is not None and row_taps_fit(c)
    if rows and tuple(row_packed.shape) != (cout, 27 * c):
        raise ValueError(f"row-packed weight {tuple(row_packed.shape)} is not ({cout}, {27 * c}): pack_fp8_row_weight")
    row_tail = 3 * c % ROW_DEEP

    def launch(config: Config) -> None:
        block_h, block_w = _pixel_tile(config, w)
        block_k = block_depth(c, config.block_k)
        row_descs = [None] * 6
        if rows:
            runs = [t + 2, h, w, 3 * c]  # pixel w's run: its own channels, then pixels w + 1 and w + 2's
            row_descs = [
                TensorDescriptor(view, runs, list(view.stride()), [1, block_h, block_w, ROW_DEEP]),
                TensorDescriptor(view, runs, list(view.stride()), [1, block_h, block_w, max(row_tail, 16)]),
            ] + [
                TensorDescriptor(row_packed, list(row_packed.shape), list(row_packed.stride()), [n, depth])
                for depth in (ROW_DEEP, max(row_tail, 16))
                for n in (config.n1, max(config.n2, 16))
            ]  # fmt: skip
        out_descs = [_box(out, block_h, block_w, n) if tma_out else None for n in (config.n1, max(config.n2, 16))]
        with_tail = tma_out and tails is not out
        tail_descs = [_box(tails, block_h, block_w, n) if with_tail else None for n in (config.n1, max(config.n2, 16))]
        x_desc = TensorDescriptor(view, list(view.shape), list(view.stride()), [1, block_h, block_w, block_k])
        w1_desc = TensorDescriptor(packed, list(packed.shape), list(packed.stride()), [config.n1, block_k])
        w2_desc = TensorDescriptor(packed, list(packed.shape), list(packed.stride()), [max(config.n2, 16), block_k])
        groups = triton.cdiv(cout, config.n1 + config.n2)
        if normed and groups != 1:
            raise ValueError(f"configuration {config} splits the outputs: the next norm needs them whole")
        tiles = t * triton.cdiv(h, block_h) * triton.cdiv(w, block_w)
        _fp8_conv_kernel[(tiles * groups,)](
            x_desc, w1_desc, w2_desc, x_scale, w_scale, bias, out if residual is None else residual, out, *out_descs,
            gamma if normed else w_scale, out, tail_arg if normed else out, *tail_descs,
            act_scale if normed else x_scale, *row_descs,
            t, h, w, cout, *strides, *res_strides,
            C=c, TAP_K=depth, N1=config.n1, N2=config.n2, GROUPS=groups, BLOCK_H=block_h, BLOCK_W=block_w,
            BLOCK_K=block_k, HAS_RES=residual is not None, NORM=normed, HAS_TAIL=normed and tail is not None,
            FP8_ACT=out.dtype == FP8_DTYPE, TAIL_ACT=tail_act, MODEL_DTYPE=_TRITON_DTYPES[out_dtype], FP8_MAX=FP8_MAX,
            TMA_OUT=tma_out, STAGES=config.stages,
            ROWS=rows, ROW_DEEP=ROW_DEEP, ROW_TAIL=row_tail, TAIL_STAGES=ROW_TAIL_STAGES, num_warps=config.warps,
        )  # fmt: skip

    if not first_that_runs(key, configs_for(cout), launch, _chosen, _failures):
        return None
    if normed and out is not act:  # the interpreter's float32 act / act_scale, cast as the GPU's kernel would
        act.copy_(out.clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE))
    if tail_store is not tail:
        tail.copy_(tail_store.clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE))
    return act if normed else out
