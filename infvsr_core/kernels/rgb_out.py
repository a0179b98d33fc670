"""The VAE's RGB head (96 -> 3, 3x3x3, causal time already staged) as one product of every tap and one gather.

Why: a conv with 3 outputs gives tensor cores almost nothing to multiply, so
cuDNN's kernels (and an implicit-GEMM Triton kernel, which lost to cuDNN: see
kernels/rgb_in.py) are bound by reading each input pixel once per tap. Here the
input is read once: one product of the staged rows (pixels x 96) by the packed
(96 x 27 taps x 3) weight gives every pixel's contribution to each of its 27
neighbours' outputs, and one pass sums, for each output pixel, the 27
contributions addressed to it (zero outside the frame), adds the bias and
rounds once. The contributions round to the model's dtype between the two
passes (cuDNN rounds only the sum): close to cuDNN, not bit for bit, so the
faithful bf16 default keeps cuDNN (`FastForwardOptions.rgb_out_taps`).

Without Triton (CPU) the same result comes from `F.conv3d`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .norm_silu import _TRITON_BROKEN, tl, triton, triton_usable
from .rgb_in import CL3, TAPS, staged_conv3d

MAX_OUTPUTS = 4  # outputs whose 27 taps `few_out_conv` packs into one product (the RGB head has 3)
COLUMN_MULTIPLE = 8  # the packed weight's columns, zero-padded: rows of the product stay 16-byte aligned


if triton is not None:

    @triton.jit
    def _tap_sum_kernel(
        y_ptr, bias_ptr, out_ptr,
        T, H, W,
        sy_b, sy_t, sy_h, sy_w,
        so_b, so_t, so_h, so_w,
        COUT: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_W: tl.constexpr, HAS_BIAS: tl.constexpr,
    ):  # fmt: skip
        h = tl.program_id(1)
        bt = tl.program_id(2)
        b, t = bt // T, bt % T
        w = tl.program_id(0) * BLOCK_W + tl.arange(0, BLOCK_W)
        c = tl.arange(0, BLOCK_C)
        acc = tl.zeros((BLOCK_W, BLOCK_C), dtype=tl.float32)
        base = y_ptr + b.to(tl.int64) * sy_b + t.to(tl.int64) * sy_t
        for tap in tl.static_range(27):
            dt, dh, dw = tap // 9, (tap // 3) % 3, tap % 3
            hh = h + dh - 1
            ww = w + dw - 1
            # the row's test per pixel: Triton's interpreter takes no scalar in a mask
            inside = (ww >= 0) & (ww < W) & ((ww * 0 + hh) >= 0) & ((ww * 0 + hh) < H)
            mask = inside[:, None] & (c < COUT)[None, :]
            row = base + dt * sy_t + hh.to(tl.int64) * sy_h
            acc += tl.load(row + (ww * sy_w)[:, None] + (tap * COUT + c)[None, :], mask=mask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + c, mask=c < COUT, other=0.0)[None, :]
        out = out_ptr + b.to(tl.int64) * so_b + t.to(tl.int64) * so_t + h.to(tl.int64) * so_h
        keep = (w < W)[:, None] & (c < COUT)[None, :]
        tl.store(out + (w * so_w)[:, None] + c[None, :], acc.to(out_ptr.dtype.element_ty), mask=keep)


def few_out_fits(weight: torch.Tensor) -> bool:
    """Whether `few_out_conv` takes this (Cout, Cin, 3, 3, 3) kernel: at most MAX_OUTPUTS outputs."""
    return weight.ndim == 5 and weight.shape[2:] == (3, 3, 3) and weight.shape[0] <= MAX_OUTPUTS


def pack_few_out(weight: torch.Tensor) -> torch.Tensor:
    """(Cout, Cin, 3, 3, 3) -> (Cin, N) with column tap * Cout + o (tap = 9 dt + 3 dh + dw), zero-padded to a
    multiple of COLUMN_MULTIPLE."""
    cout, cin = weight.shape[:2]
    columns = weight.permute(1, 2, 3, 4, 0).reshape(cin, TAPS * cout)
    padded = -(-TAPS * cout // COLUMN_MULTIPLE) * COLUMN_MULTIPLE
    packed = weight.new_zeros((cin, padded))
    packed[:, : TAPS * cout] = columns
    return packed


def tap_contributions(buf: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    """Every staged pixel's contribution to its 27 neighbours' outputs: (B, T + 2, H, W, N), in buf's dtype.

    buf: the staged (B, Cin, T + 2, H, W) buffer with its channels adjacent (channels-last; a copy otherwise).
    """
    b, cin, frames, h, w = buf.shape
    rows = buf.permute(0, 2, 3, 4, 1)
    if not rows.is_contiguous():
        rows = rows.contiguous()
    return torch.mm(rows.reshape(-1, cin), packed).view(b, frames, h, w, packed.shape[1])


def tap_sum_reference(y: torch.Tensor, bias: torch.Tensor | None, cout: int) -> torch.Tensor:
    """The gather as PyTorch ops: output (B, Cout, T, H, W) channels-last from y = `tap_contributions`, summed in
    float32 (the taps in the kernel's order), plus the bias, rounded once to y's dtype."""
    b, frames, h, w, _ = y.shape
    padded = F.pad(y.float(), (0, 0, 1, 1, 1, 1))  # zero contributions from outside the frame
    acc = torch.zeros((b, frames - 2, h, w, cout), dtype=torch.float32, device=y.device)
    for tap in range(TAPS):
        dt, dh, dw = tap // 9, (tap // 3) % 3, tap % 3
        acc += padded[:, dt : dt + frames - 2, dh : dh + h, dw : dw + w, tap * cout : (tap + 1) * cout]
    if bias is not None:
        acc += bias.float()
    return acc.to(y.dtype).permute(0, 4, 1, 2, 3)


def tap_sum(y: torch.Tensor, bias: torch.Tensor | None, cout: int, *, use_triton: bool | None = None) -> torch.Tensor:
    """`tap_sum_reference` as one Triton pass where it can run (y's last dim adjacent in memory)."""
    if use_triton is None:
        use_triton = triton_usable(y)
    b, frames, h, w, _ = y.shape
    if use_triton and y.stride(-1) == 1 and frames > 2 and h and w and b:
        out = torch.empty((b, cout, frames - 2, h, w), dtype=y.dtype, device=y.device, memory_format=CL3)
        bias_t = out if bias is None else bias.float().contiguous()
        sy, so = y.stride(), out.stride()
        block_w = 128
        try:
            _tap_sum_kernel[(triton.cdiv(w, block_w), h, b * (frames - 2))](
                y, bias_t, out, frames - 2, h, w,
                sy[0], sy[1], sy[2], sy[3], so[0], so[2], so[3], so[4],
                COUT=cout, BLOCK_C=triton.next_power_of_2(cout), BLOCK_W=block_w, HAS_BIAS=bias is not None,
                num_warps=4,
            )  # fmt: skip
            return out
        except Exception as error:  # pragma: no cover - a broken Triton install: fall back for good
            _TRITON_BROKEN.append(repr(error))
    return tap_sum_reference(y, bias, cout)


def few_out_conv(
    buf: torch.Tensor,
    weight: torch.Tensor,
    packed: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    use_triton: bool | None = None,
) -> torch.Tensor:
    """conv3d(buf, weight, bias, padding (0, 1, 1)) for few outputs; `packed` = pack_few_out(weight).

    buf: the staged (B, Cin, T + 2, H, W) buffer; out: (B, Cout, T, H, W) channels-last.
    """
    if use_triton is None:
        use_triton = triton_usable(buf)
    if use_triton and buf.shape[2] > 2 and buf.numel():
        return tap_sum(tap_contributions(buf, packed), bias, weight.shape[0], use_triton=True)
    return staged_conv3d(buf, weight, bias)
