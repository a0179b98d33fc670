"""An experiment for the 96-channel float8 convs (issue 21's 720p target): a tap row as one 288-deep run.

    python3 bench/check_fp8_conv_rows.py [--sizes 720p 1080p] [--json FILE]
    TRITON_INTERPRET=1 python bench/check_fp8_conv_rows.py --device cpu   # the logic on a small shape

Why: the product's float8 conv (kernels/fp8_conv.py) takes each of the 27 taps as one product of depth 128,
and at 96 input channels a quarter of that depth is zero padding (a depth must be a power of two); the
96-channel tier is half of a 720p decode's conv time (bench/RESULTS.md rounds 16 and 18). In a channels-last
buffer the channels of pixels w-1, w and w+1 are adjacent: with one zero column on each side of every row,
the three horizontal taps of a (dt, dh) row are one run of 288 channels that starts at pixel w - 1. A tensor-
memory descriptor whose pixel stride (96) is smaller than its row of channels (288) reads those runs with no
im2col copy, as two products of depth 128 and one of 32: 2592 deep in all, no padding, against 3456 now.

Whether the driver takes such an overlapping descriptor is the first question (its documented stride rules may
refuse it: then the row says so); then the time against the product's kernel on the same float8 operands, and
the largest difference between the two outputs against the output's scale (both accumulate the same products
in float32, in a different order). The zero-bordered copy is made outside the timing: in the product the norm
pass would write into it.
"""

from __future__ import annotations

import argparse
import json
import sys
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from check_scaled_mm import append_rows, timed  # noqa: E402

from infvsr_core.fp8 import FP8_DTYPE, quantize_rows  # noqa: E402
from infvsr_core.kernels.fp8_conv import _store_outputs, fp8_conv, pack_fp8_conv_weight  # noqa: E402
from infvsr_core.kernels.norm_silu import tl, triton  # noqa: E402
from infvsr_core.kernels.split_conv import CL3, TensorDescriptor  # noqa: E402

# (frames, height, width) of one decoder call's 96-channel convs at each size (a 1080p frame in its release tiles).
SHAPES = {"720p": (4, 720, 1280), "1080p": (12, 1024, 1024), "cpu": (1, 4, 16)}
# (block_h, block_w, stages, warps, tail stages): tail stages 0 is the one-loop kernel (round 19: 1.4x slower than
# the product's), else the two-loop kernel.
CONFIGS = ((1, 128, 3, 4, 0), (1, 128, 4, 4, 2), (1, 128, 4, 4, 3), (1, 128, 3, 4, 3), (1, 128, 4, 4, 4),
           (2, 64, 4, 4, 3), (1, 256, 3, 8, 3))  # fmt: skip
DEEP = 128  # the depth of the row's full products; the rest of the row (288 - 256) is one product of its size

if triton is not None:

    @triton.jit
    def _row_taps_kernel(
        x_desc, x_tail_desc, w1_desc, w2_desc, w1_tail_desc, w2_tail_desc, x_scale_ptr, w_scale_ptr, bias_ptr,
        out_ptr, H, W, COUT, so_t, so_h, so_w,
        ROW_K: tl.constexpr, N1: tl.constexpr, N2: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr,
        DEEP: tl.constexpr, TAIL: tl.constexpr, STAGES: tl.constexpr,
    ):  # fmt: skip
        tile = tl.program_id(0)
        tiles_w = tl.cdiv(W, BLOCK_W)
        tiles_h = tl.cdiv(H, BLOCK_H)
        w0 = (tile % tiles_w) * BLOCK_W
        h0 = ((tile // tiles_w) % tiles_h) * BLOCK_H
        t = tile // (tiles_w * tiles_h)
        BLOCK_M: tl.constexpr = BLOCK_H * BLOCK_W
        FULL: tl.constexpr = ROW_K // DEEP
        acc1 = tl.zeros((BLOCK_M, N1), dtype=tl.float32)
        if N2 > 0:
            acc2 = tl.zeros((BLOCK_M, N2), dtype=tl.float32)
        for row in tl.range(0, 9, num_stages=STAGES):  # (dt, dh); the three dw taps are the row's channels
            dt = row // 3
            dh = row % 3
            for j in tl.static_range(FULL):
                a = x_desc.load([t + dt, h0 + dh - 1, w0, j * DEEP]).reshape(BLOCK_M, DEEP)
                k = row * ROW_K + j * DEEP
                acc1 = tl.dot(a, w1_desc.load([0, k]).T, acc1)
                if N2 > 0:
                    acc2 = tl.dot(a, w2_desc.load([N1, k]).T, acc2)
            if TAIL > 0:
                a = x_tail_desc.load([t + dt, h0 + dh - 1, w0, FULL * DEEP]).reshape(BLOCK_M, TAIL)
                k = row * ROW_K + FULL * DEEP
                acc1 = tl.dot(a, w1_tail_desc.load([0, k]).T, acc1)
                if N2 > 0:
                    acc2 = tl.dot(a, w2_tail_desc.load([N1, k]).T, acc2)
        m = tl.arange(0, BLOCK_M)
        h = (h0 + m // BLOCK_W).to(tl.int64)
        w = (w0 + m % BLOCK_W).to(tl.int64)
        keep = (h < H) & (w < W)
        pix_out = t.to(tl.int64) * so_t + h * so_h + w * so_w
        x_scale = tl.load(x_scale_ptr)
        _store_outputs(acc1, 0, keep, pix_out, pix_out, x_scale, w_scale_ptr, bias_ptr, out_ptr, out_ptr, out_ptr,
                       t, h0, w0, COUT, BLOCK_H, BLOCK_W, False, False)  # fmt: skip
        if N2 > 0:
            _store_outputs(acc2, N1, keep, pix_out, pix_out, x_scale, w_scale_ptr, bias_ptr, out_ptr, out_ptr,
                           out_ptr, t, h0, w0, COUT, BLOCK_H, BLOCK_W, False, False)  # fmt: skip


    @triton.jit
    def _row_split_kernel(
        x_desc, x_tail_desc, w1_desc, w2_desc, w1_tail_desc, w2_tail_desc, x_scale_ptr, w_scale_ptr, bias_ptr,
        out_ptr, H, W, COUT, so_t, so_h, so_w,
        ROW_K: tl.constexpr, N1: tl.constexpr, N2: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr,
        DEEP: tl.constexpr, TAIL: tl.constexpr, STAGES: tl.constexpr, TAIL_STAGES: tl.constexpr,
    ):  # fmt: skip
        """The rows' full 128-deep blocks as one flat pipelined loop (the product's loop shape, 18 steps for 27),
        then their 32-deep tails as a second loop: each loop's body is one load and one product per operand."""
        tile = tl.program_id(0)
        tiles_w = tl.cdiv(W, BLOCK_W)
        tiles_h = tl.cdiv(H, BLOCK_H)
        w0 = (tile % tiles_w) * BLOCK_W
        h0 = ((tile // tiles_w) % tiles_h) * BLOCK_H
        t = tile // (tiles_w * tiles_h)
        BLOCK_M: tl.constexpr = BLOCK_H * BLOCK_W
        FULL: tl.constexpr = ROW_K // DEEP
        acc1 = tl.zeros((BLOCK_M, N1), dtype=tl.float32)
        if N2 > 0:
            acc2 = tl.zeros((BLOCK_M, N2), dtype=tl.float32)
        for i in tl.range(0, 9 * FULL, num_stages=STAGES):
            row = i // FULL
            j = i % FULL
            a = x_desc.load([t + row // 3, h0 + row % 3 - 1, w0, j * DEEP]).reshape(BLOCK_M, DEEP)
            k = row * ROW_K + j * DEEP
            acc1 = tl.dot(a, w1_desc.load([0, k]).T, acc1)
            if N2 > 0:
                acc2 = tl.dot(a, w2_desc.load([N1, k]).T, acc2)
        if TAIL > 0:
            for row in tl.range(0, 9, num_stages=TAIL_STAGES):
                a = x_tail_desc.load([t + row // 3, h0 + row % 3 - 1, w0, FULL * DEEP]).reshape(BLOCK_M, TAIL)
                k = row * ROW_K + FULL * DEEP
                acc1 = tl.dot(a, w1_tail_desc.load([0, k]).T, acc1)
                if N2 > 0:
                    acc2 = tl.dot(a, w2_tail_desc.load([N1, k]).T, acc2)
        m = tl.arange(0, BLOCK_M)
        h = (h0 + m // BLOCK_W).to(tl.int64)
        w = (w0 + m % BLOCK_W).to(tl.int64)
        keep = (h < H) & (w < W)
        pix_out = t.to(tl.int64) * so_t + h * so_h + w * so_w
        x_scale = tl.load(x_scale_ptr)
        _store_outputs(acc1, 0, keep, pix_out, pix_out, x_scale, w_scale_ptr, bias_ptr, out_ptr, out_ptr, out_ptr,
                       t, h0, w0, COUT, BLOCK_H, BLOCK_W, False, False)  # fmt: skip
        if N2 > 0:
            _store_outputs(acc2, N1, keep, pix_out, pix_out, x_scale, w_scale_ptr, bias_ptr, out_ptr, out_ptr,
                           out_ptr, t, h0, w0, COUT, BLOCK_H, BLOCK_W, False, False)  # fmt: skip


def pack_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(Cout, Cin, 3, 3, 3) -> float8 rows (Cout, 9 * 3 * Cin), column (3 dt + dh) * 3 Cin + dw * Cin + c, and
    their float32 scales (Cout,): the same values and scales as the product's packing, in row order."""
    cout = weight.shape[0]
    values, scale = quantize_rows(weight.permute(0, 2, 3, 4, 1).reshape(cout, -1))
    return values.contiguous(), scale.reshape(-1).contiguous()


def bordered(buf: torch.Tensor) -> torch.Tensor:
    """The staged (1, C, T + 2, H, W) channels-last buffer as (T + 2, H, W + 2, C) with a zero column each side."""
    view = buf.permute(0, 2, 3, 4, 1)[0]
    out = torch.zeros(view.shape[0], view.shape[1], view.shape[2] + 2, view.shape[3], dtype=buf.dtype,
                      device=buf.device)  # fmt: skip
    out[:, :, 1:-1] = view
    return out


def row_taps_conv(
    padded: torch.Tensor, x_scale: torch.Tensor, packed: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor,
    *, block_h: int = 1, block_w: int = 128, stages: int = 3, warps: int = 4, tail_stages: int = 0,
) -> torch.Tensor:  # fmt: skip
    """The causal 3x3x3 conv (padding (0, 1, 1)) of `bordered`'s buffer through overlapping row descriptors;
    `tail_stages` > 0: `_row_split_kernel` (the full blocks and the tails as two loops, the tails' with that many
    stages), else `_row_taps_kernel` (one loop over the nine rows)."""
    frames, h, w2, c = padded.shape
    w, t, cout, row_k = w2 - 2, frames - 2, packed.shape[0], 3 * c
    tail = row_k % DEEP
    n1 = min(256, 1 << (cout.bit_length() - 1))
    n2 = 0 if cout == n1 else max(16, 1 << (cout - n1 - 1).bit_length())
    rows = torch.as_strided(padded, (frames, h, w, row_k), (h * w2 * c, w2 * c, c, 1))
    out = torch.empty((1, cout, t, h, w), dtype=torch.bfloat16, device=padded.device, memory_format=CL3)
    x_desc = TensorDescriptor(rows, list(rows.shape), list(rows.stride()), [1, block_h, block_w, DEEP])
    x_tail = TensorDescriptor(rows, list(rows.shape), list(rows.stride()), [1, block_h, block_w, max(tail, 16)])

    def weights(n: int, k: int) -> TensorDescriptor:
        return TensorDescriptor(packed, list(packed.shape), list(packed.stride()), [max(n, 16), k])

    tiles = t * triton.cdiv(h, block_h) * triton.cdiv(w, block_w)
    kernel, extra = (_row_split_kernel, {"TAIL_STAGES": tail_stages}) if tail_stages else (_row_taps_kernel, {})
    kernel[(tiles,)](
        x_desc, x_tail, weights(n1, DEEP), weights(n2, DEEP), weights(n1, max(tail, 16)), weights(n2, max(tail, 16)),
        x_scale.reshape(1), w_scale, bias, out, h, w, cout, *out.stride()[2:],
        ROW_K=row_k, N1=n1, N2=n2, BLOCK_H=block_h, BLOCK_W=block_w, DEEP=DEEP, TAIL=tail, STAGES=stages,
        num_warps=warps, **extra,
    )  # fmt: skip
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["720p", "1080p"], choices=sorted(SHAPES))
    parser.add_argument("--channels", type=int, default=96)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--json", type=Path, help="also append the JSON line to this file")
    args = parser.parse_args()
    device = torch.device(args.device)
    if triton is None or TensorDescriptor is None:
        sys.exit("check_fp8_conv_rows: needs Triton with tensor descriptors")
    sizes = ["cpu"] if device.type == "cpu" else args.sizes
    c = args.channels
    gen = torch.Generator(device=device).manual_seed(0)
    rows = []
    for size in sizes:
        frames, h, w = SHAPES[size]
        x = torch.randn(1, c, frames + 2, h, w, device=device, generator=gen)
        buf = (x * 64).clamp(-448, 448).to(FP8_DTYPE).contiguous(memory_format=CL3)
        x_scale = torch.tensor(1 / 64, device=device)
        weight = torch.randn(c, c, 3, 3, 3, device=device, generator=gen) / (27 * c) ** 0.5
        bias = torch.randn(c, device=device, generator=gen) * 0.1
        product_packed, product_scale = pack_fp8_conv_weight(weight)
        packed, w_scale = pack_rows(weight)
        padded = bordered(buf)
        want = fp8_conv(buf, x_scale, product_packed, product_scale, bias)
        row = {"size": size, "channels": c, "frames": frames, "height": h, "width": w}
        try:
            got = row_taps_conv(padded, x_scale, packed, w_scale, bias)
        except Exception as error:  # the driver's refusal of the overlapping descriptor is a result here
            row["refused"] = f"{type(error).__name__}: {str(error)[:300]}"
            got = None
        if got is not None and want is not None:
            difference = (got.float() - want.float()).abs().amax() / want.float().abs().amax()
            row["max_diff_over_out_amax"] = difference.item()
            split = row_taps_conv(padded, x_scale, packed, w_scale, bias, stages=2, tail_stages=2)
            row["split_max_diff_over_out_amax"] = ((split.float() - want.float()).abs().amax()
                                                   / want.float().abs().amax()).item()  # fmt: skip
        if device.type == "cuda" and got is not None:
            row["product_ms"] = timed(partial(fp8_conv, buf, x_scale, product_packed, product_scale, bias))
            for block_h, block_w, stages, warps, tail_stages in CONFIGS:
                if w % block_w:
                    continue
                kind = f"split_t{tail_stages}" if tail_stages else "rows"
                key = f"{kind}_{block_h}x{block_w}_s{stages}_w{warps}_ms"
                run = partial(row_taps_conv, padded, x_scale, packed, w_scale, bias, block_h=block_h,
                              block_w=block_w, stages=stages, warps=warps, tail_stages=tail_stages)  # fmt: skip
                try:
                    row[key] = timed(run)
                except Exception as error:  # a block configuration this GPU's compiler refuses
                    row[key] = f"{type(error).__name__}: {str(error)[:120]}"
        rows.append(row)
        print(json.dumps(row), flush=True)
    append_rows(args.json, device, rows)


if __name__ == "__main__":
    main()
