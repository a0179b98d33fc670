"""The sub-pixel upsampler's interleave: four phase maps -> one 2x frame, plus the bias, in one coalesced pass.

Why: the decoder computes nearest 2x + 3x3 conv as one 2x2 conv at low
resolution whose 4 x C outputs are the four phases of each output pixel
(vae/fast_blocks.py: _subpixel_conv). Writing each phase with a strided PyTorch add
(every other pixel of every other row) ran at a fraction of memory speed.
Here each program writes whole output
rows, reading each pixel's phase from its row of the low-resolution map.
"""

from __future__ import annotations

import torch

from .norm_silu import _TRITON_BROKEN, tl, triton, triton_usable

if triton is not None:

    @triton.jit
    def _interleave_kernel(
        y_ptr, bias_ptr, out_ptr,
        H, W,
        sy_n, sy_h, sy_w,
        so_n, so_h, so_w,
        C: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_W: tl.constexpr, HAS_BIAS: tl.constexpr,
    ):  # fmt: skip
        row = tl.program_id(1)  # output row 2 i + a of frame n
        n = tl.program_id(2)
        i, a = row // 2, row % 2
        q = tl.program_id(0) * BLOCK_W + tl.arange(0, BLOCK_W)  # output columns 2 j + b
        j, b = q // 2, q % 2
        c = tl.arange(0, BLOCK_C)
        mask = (q < 2 * W)[:, None] & (c < C)[None, :]
        src = y_ptr + n.to(tl.int64) * sy_n + (i + a).to(tl.int64) * sy_h
        phase = (2 * a + b) * C
        value = tl.load(src + ((j + b) * sy_w + phase)[:, None] + c[None, :], mask=mask, other=0.0)
        if HAS_BIAS:
            value = value.to(tl.float32) + tl.load(bias_ptr + c, mask=c < C, other=0.0)[None, :]
        dst = out_ptr + n.to(tl.int64) * so_n + row.to(tl.int64) * so_h
        tl.store(dst + (q * so_w)[:, None] + c[None, :], value.to(out_ptr.dtype.element_ty), mask=mask)


def interleave_reference(y: torch.Tensor, bias: torch.Tensor | None, channels: int) -> torch.Tensor:
    """(N, H+1, W+1, 4C) phase maps -> (N, C, 2H, 2W) channels-last: phase (a, b) at (i + a, j + b), channel group
    2a + b, is output pixel (2i + a, 2j + b); plus the bias, rounded once."""
    n, hp, wp, _ = y.shape
    h, w = hp - 1, wp - 1
    out = torch.empty((n, channels, 2 * h, 2 * w), dtype=y.dtype, device=y.device, memory_format=torch.channels_last)
    phases = out.permute(0, 2, 3, 1).view(n, h, 2, w, 2, channels)
    for a in (0, 1):
        for b in (0, 1):
            group = 2 * a + b
            src = y[:, a : a + h, b : b + w, group * channels : (group + 1) * channels]
            if bias is None:
                phases[:, :, a, :, b].copy_(src)
            else:
                torch.add(src, bias, out=phases[:, :, a, :, b])
    return out


def interleave(
    y: torch.Tensor, bias: torch.Tensor | None, channels: int, *, use_triton: bool | None = None
) -> torch.Tensor:
    """`interleave_reference` as one Triton pass where it can run; y's channels must be adjacent in memory."""
    if use_triton is None:
        use_triton = triton_usable(y)
    if use_triton and y.stride(-1) == 1 and y.numel():
        n, hp, wp, _ = y.shape
        h, w = hp - 1, wp - 1
        out = torch.empty(
            (n, channels, 2 * h, 2 * w), dtype=y.dtype, device=y.device, memory_format=torch.channels_last
        )
        block_c = triton.next_power_of_2(channels)
        block_w = max(1, 4096 // block_c)
        so = out.stride()
        bias_t = out if bias is None else bias.float().contiguous()
        try:
            _interleave_kernel[(triton.cdiv(2 * w, block_w), 2 * h, n)](
                y, bias_t, out, h, w, y.stride(0), y.stride(1), y.stride(2), so[0], so[2], so[3],
                C=channels, BLOCK_C=block_c, BLOCK_W=block_w, HAS_BIAS=bias is not None, num_warps=4,
            )  # fmt: skip
            return out
        except Exception as error:  # pragma: no cover - a broken Triton install: fall back for good
            _TRITON_BROKEN.append(repr(error))
    return interleave_reference(y, bias, channels)
