"""The VAE's RGB convs (3 -> 96 in, 96 -> 3 out: 3x3x3, causal time already staged) as Triton kernels.

Why: cuDNN has no good kernel for these shapes. Its implicit GEMMs tile the
few channels 32 or 64 wide, so the RGB head (96 -> 3, padded to 8 outputs)
ran at ~25 ms per 1080p chunk on an H100 for 0.5 TFLOP of work, and the
RGB-in conv needed its input padded to 16 channels. Here the few channels sit
on one side of a small tensor-core product, in float32 accumulators, with the
bias added before the single rounding:

- few inputs (`few_in_conv`): the 27 taps x C inputs of each pixel are
  gathered into one K <= 128 row (an implicit im2col) and multiplied by the
  packed (K, outputs) weight once;
- few outputs (`few_out_conv`): per tap, a block of pixels' C channels times
  the tap's (C, 16) weight slice, summed over the 27 taps.

Both read a staged causal-conv buffer (B, C, T + 2, H, W) in channels-last
layout (the 2 cached frames in front) and zero-pad the spatial borders
themselves. Without Triton (CPU) the same result comes from `F.conv3d`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .norm_silu import _TRITON_BROKEN, tl, triton, triton_usable

TAPS = 27  # 3 x 3 x 3
FEW_OUT = 16  # the smallest tensor-core product width: outputs are computed 16 wide
MAX_GATHERED = 128  # taps x inputs of `few_in_conv`, padded to a power of two


if triton is not None:

    @triton.jit
    def _few_in_kernel(
        x_ptr, w_ptr, bias_ptr, out_ptr,
        T, H, W,
        sx_b, sx_t, sx_h, sx_w, sx_c,
        so_b, so_t, so_h, so_w,
        CIN: tl.constexpr, COUT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr,
    ):  # fmt: skip
        bt = tl.program_id(2)
        b, t = bt // T, bt % T
        m = tl.arange(0, BLOCK_H * BLOCK_W)
        h = tl.program_id(1) * BLOCK_H + m // BLOCK_W
        w = tl.program_id(0) * BLOCK_W + m % BLOCK_W
        k = tl.arange(0, BLOCK_K)
        tap, c = k // CIN, k % CIN
        dt, dh, dw = tap // 9, (tap // 3) % 3, tap % 3
        hh = h[:, None] + dh[None, :] - 1
        ww = w[:, None] + dw[None, :] - 1
        mask = (k < 27 * CIN)[None, :] & (hh >= 0) & (hh < H) & (ww >= 0) & (ww < W)
        base = x_ptr + b.to(tl.int64) * sx_b + t.to(tl.int64) * sx_t
        offsets = dt[None, :].to(tl.int64) * sx_t + hh.to(tl.int64) * sx_h + ww * sx_w + c[None, :] * sx_c
        x = tl.load(base + offsets, mask=mask, other=0.0)
        n = tl.arange(0, BLOCK_N)
        wt = tl.load(w_ptr + k[:, None] * BLOCK_N + n[None, :])
        acc = tl.dot(x, wt) + tl.load(bias_ptr + n)[None, :]
        out = out_ptr + b.to(tl.int64) * so_b + t.to(tl.int64) * so_t
        pixel = h.to(tl.int64) * so_h + w * so_w
        keep = ((h < H) & (w < W))[:, None] & (n < COUT)[None, :]
        tl.store(out + pixel[:, None] + n[None, :], acc.to(out_ptr.dtype.element_ty), mask=keep)

    @triton.jit
    def _few_out_kernel(
        x_ptr, w_ptr, bias_ptr, out_ptr,
        T, H, W,
        sx_b, sx_t, sx_h, sx_w,
        so_b, so_t, so_h, so_w,
        CIN: tl.constexpr, COUT: tl.constexpr, BLOCK_C: tl.constexpr,
        BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr,
    ):  # fmt: skip
        bt = tl.program_id(2)
        b, t = bt // T, bt % T
        m = tl.arange(0, BLOCK_H * BLOCK_W)
        h = tl.program_id(1) * BLOCK_H + m // BLOCK_W
        w = tl.program_id(0) * BLOCK_W + m % BLOCK_W
        c = tl.arange(0, BLOCK_C)
        n = tl.arange(0, 16)
        base = x_ptr + b.to(tl.int64) * sx_b + t.to(tl.int64) * sx_t
        acc = tl.zeros((BLOCK_H * BLOCK_W, 16), dtype=tl.float32)
        for tap in tl.static_range(27):
            hh = h + (tap // 3) % 3 - 1
            ww = w + tap % 3 - 1
            row = (hh >= 0) & (hh < H) & (ww >= 0) & (ww < W)
            pixel = (tap // 9) * sx_t + hh.to(tl.int64) * sx_h + ww * sx_w
            x = tl.load(base + pixel[:, None] + c[None, :], mask=row[:, None] & (c < CIN)[None, :], other=0.0)
            wt = tl.load(w_ptr + tap * BLOCK_C * 16 + c[:, None] * 16 + n[None, :])
            acc += tl.dot(x, wt)
        acc += tl.load(bias_ptr + n)[None, :]
        out = out_ptr + b.to(tl.int64) * so_b + t.to(tl.int64) * so_t
        pixel = h.to(tl.int64) * so_h + w * so_w
        keep = ((h < H) & (w < W))[:, None] & (n < COUT)[None, :]
        tl.store(out + pixel[:, None] + n[None, :], acc.to(out_ptr.dtype.element_ty), mask=keep)


def _pow2(n: int) -> int:
    return max(16, 1 << (n - 1).bit_length())


def few_in_fits(weight: torch.Tensor) -> bool:
    """Whether `few_in_conv` takes this (Cout, Cin, 3, 3, 3) kernel: 27 x Cin gathered inputs in one row."""
    return weight.shape[2:] == (3, 3, 3) and TAPS * weight.shape[1] <= MAX_GATHERED


def few_out_fits(weight: torch.Tensor) -> bool:
    """Whether `few_out_conv` takes this (Cout, Cin, 3, 3, 3) kernel: at most 16 outputs."""
    return weight.shape[2:] == (3, 3, 3) and weight.shape[0] <= FEW_OUT


def pack_few_in(weight: torch.Tensor) -> torch.Tensor:
    """(Cout, Cin, 3, 3, 3) -> (K, N) with row k = tap * Cin + c (tap = 9 dt + 3 dh + dw), zero-padded."""
    cout, cin = weight.shape[:2]
    rows = weight.permute(2, 3, 4, 1, 0).reshape(TAPS * cin, cout)
    packed = weight.new_zeros((_pow2(TAPS * cin), _pow2(cout)))
    packed[: TAPS * cin, :cout] = rows
    return packed


def pack_few_out(weight: torch.Tensor) -> torch.Tensor:
    """(Cout, Cin, 3, 3, 3) -> (27, C, 16): per tap, the (inputs, outputs) slice, zero-padded."""
    cout, cin = weight.shape[:2]
    packed = weight.new_zeros((TAPS, _pow2(cin), FEW_OUT))
    packed[:, :cin, :cout] = weight.permute(2, 3, 4, 1, 0).reshape(TAPS, cin, cout)
    return packed


def _reference(buf: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    out = F.conv3d(buf, weight, None, 1, (0, 1, 1))
    if bias is not None:
        out = out + bias.to(out.dtype).view(1, -1, 1, 1, 1)
    return out.contiguous(memory_format=torch.channels_last_3d)


def _launch(kernel, buf: torch.Tensor, packed: torch.Tensor, bias, cout: int, block_h: int, block_w: int, **meta):
    b, _, frames, h, w = buf.shape
    t = frames - 2
    out = torch.empty((b, cout, t, h, w), dtype=buf.dtype, device=buf.device, memory_format=torch.channels_last_3d)
    if out.numel() == 0:
        return out
    width = packed.shape[-1]
    bias_padded = torch.zeros(width, dtype=torch.float32, device=buf.device)
    if bias is not None:
        bias_padded[:cout] = bias.float()
    sx = buf.stride()
    so = out.stride()
    grid = (triton.cdiv(w, block_w), triton.cdiv(h, block_h), b * t)
    kernel[grid](
        buf, packed, bias_padded, out, t, h, w,
        sx[0], sx[2], sx[3], sx[4], *([sx[1]] if kernel is _few_in_kernel else []),
        so[0], so[2], so[3], so[4],
        CIN=buf.shape[1], COUT=cout, BLOCK_H=block_h, BLOCK_W=block_w, **meta,
    )  # fmt: skip
    return out


def _usable(buf: torch.Tensor, use_triton: bool | None) -> bool:
    if use_triton is None:
        use_triton = triton_usable(buf)
    channels_adjacent = buf.stride(1) == 1 or buf.shape[1] == 1
    return bool(use_triton) and buf.ndim == 5 and buf.shape[2] >= 2 and channels_adjacent


def few_in_conv(
    buf: torch.Tensor,
    weight: torch.Tensor,
    packed: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    use_triton: bool | None = None,
) -> torch.Tensor:
    """conv3d(buf, weight, bias, padding (0, 1, 1)) for few inputs; `packed` = pack_few_in(weight).

    buf: the staged (B, Cin, T + 2, H, W) buffer; out: (B, Cout, T, H, W) channels-last.
    """
    if _usable(buf, use_triton):
        try:
            k, n = packed.shape
            return _launch(_few_in_kernel, buf, packed, bias, weight.shape[0], 4, 32, BLOCK_K=k, BLOCK_N=n)
        except Exception as error:  # pragma: no cover - a broken Triton install: fall back for good
            _TRITON_BROKEN.append(repr(error))
    return _reference(buf, weight, bias)


def few_out_conv(
    buf: torch.Tensor,
    weight: torch.Tensor,
    packed: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    use_triton: bool | None = None,
) -> torch.Tensor:
    """conv3d(buf, weight, bias, padding (0, 1, 1)) for few outputs; `packed` = pack_few_out(weight).

    buf: the staged (B, Cin, T + 2, H, W) buffer, channels adjacent in memory; out: (B, Cout, T, H, W)
    channels-last.
    """
    if _usable(buf, use_triton):
        try:
            return _launch(_few_out_kernel, buf, packed, bias, weight.shape[0], 8, 16, BLOCK_C=packed.shape[1])
        except Exception as error:  # pragma: no cover - a broken Triton install: fall back for good
            _TRITON_BROKEN.append(repr(error))
    return _reference(buf, weight, bias)
