"""The VAE's RGB-in conv (3 -> 96, 3x3x3, causal time already staged) as one Triton kernel.

Why: cuDNN has no good kernel for 3 input channels; padded to 16 channels it
stays several times slower than this kernel (bench/check_kernels.py --sections
few), for a conv that is mostly writing its 96-channel output. Here each pixel's 27 taps x 3 inputs are gathered into
one row of K <= 128 (an implicit im2col, zero-padded borders) and multiplied
by the packed (K, outputs) weight in one tensor-core product with float32
accumulators; the bias is added before the single rounding.

It reads the staged causal-conv buffer (B, C, T + 2, H, W) (the 2 cached
frames in front) in any layout with adjacent channels. Without Triton (CPU)
the same result comes from `F.conv3d`. (The same form for the RGB head, 96 -> 3,
lost to cuDNN: each input is read once per tap; kernels/rgb_out.py reads it once.)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .norm_silu import _TRITON_BROKEN, tl, triton, triton_usable

CL3 = torch.channels_last_3d
TAPS = 27  # 3 x 3 x 3
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


def _pow2(n: int) -> int:
    return max(16, 1 << (n - 1).bit_length())


def few_in_fits(weight: torch.Tensor) -> bool:
    """Whether `few_in_conv` takes this (Cout, Cin, 3, 3, 3) kernel: 27 x Cin gathered inputs in one row."""
    return weight.shape[2:] == (3, 3, 3) and TAPS * weight.shape[1] <= MAX_GATHERED


def pack_few_in(weight: torch.Tensor) -> torch.Tensor:
    """(Cout, Cin, 3, 3, 3) -> (K, N) with row k = tap * Cin + c (tap = 9 dt + 3 dh + dw), zero-padded."""
    cout, cin = weight.shape[:2]
    rows = weight.permute(2, 3, 4, 1, 0).reshape(TAPS * cin, cout)
    packed = weight.new_zeros((_pow2(TAPS * cin), _pow2(cout)))
    packed[: TAPS * cin, :cout] = rows
    return packed


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
    if use_triton is None:
        use_triton = triton_usable(buf)
    b, _, frames, h, w = buf.shape
    cout = weight.shape[0]
    if use_triton and frames > 2 and h and w and b:
        out = torch.empty((b, cout, frames - 2, h, w), dtype=buf.dtype, device=buf.device, memory_format=CL3)
        bias_padded = torch.zeros(packed.shape[1], dtype=torch.float32, device=buf.device)
        if bias is not None:
            bias_padded[:cout] = bias.float()
        sx, so = buf.stride(), out.stride()
        block_h, block_w = 4, 32
        try:
            _few_in_kernel[(triton.cdiv(w, block_w), triton.cdiv(h, block_h), b * (frames - 2))](
                buf, packed, bias_padded, out, frames - 2, h, w,
                sx[0], sx[2], sx[3], sx[4], sx[1], so[0], so[2], so[3], so[4],
                CIN=buf.shape[1], COUT=cout, BLOCK_N=packed.shape[1], BLOCK_K=packed.shape[0],
                BLOCK_H=block_h, BLOCK_W=block_w,
            )  # fmt: skip
            return out
        except Exception as error:  # pragma: no cover - a broken Triton install: fall back for good
            _TRITON_BROKEN.append(repr(error))
    return staged_conv3d(buf, weight, bias)


def staged_conv3d(buf: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The 3x3x3 causal conv on a staged buffer (time already padded) through `F.conv3d`: the result the kernels
    of few channels stand in for, where they do not run. Channels-last, as theirs."""
    out = F.conv3d(buf, weight, None, 1, (0, 1, 1))
    if bias is not None:
        out = out + bias.to(out.dtype).view(1, -1, 1, 1, 1)
    return out.contiguous(memory_format=CL3)
