"""GPU check of the product's exact-width Triton conv (infvsr_core/kernels/split_conv.py) against cuDNN.

    python bench/check_conv.py [--shapes 2 6]

For each shape of the VAE's wide convs: cuDNN on the staged buffer with the
outputs the product uses (96 computed as 128), then the split kernel over its
block configurations; error against a float32 cuDNN run. (The general
implicit-GEMM prototype this grew from is gone; its findings are in
bench/RESULTS.md, rounds 11-12.)
"""

from __future__ import annotations

import argparse
import itertools
import sys
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from triton.testing import do_bench  # noqa: E402

from infvsr_core.kernels import split_conv  # noqa: E402

CL3 = torch.channels_last_3d
# Output widths as two power-of-two products (the product keeps 192 only: RESULTS round 12).
EXACT = {96: (64, 32), 192: (128, 64)}
# (label, channels in, channels out, frames out, H, W)
SHAPES = [
    ("96 @ 720p, 4 frames", 96, 96, 4, 720, 1280),
    ("96 @ 720p, 12 frames", 96, 96, 12, 720, 1280),
    ("192 @ 360x640, 12 frames", 192, 192, 12, 360, 640),
    ("384 @ 180x320, 12 frames", 384, 384, 12, 180, 320),
    ("96 @ 480p, 12 frames", 96, 96, 12, 480, 832),
    ("96 @ 1080p tile 1024x1024, 4 frames", 96, 96, 4, 1024, 1024),
    ("192 @ 1080p tile 512x512, 12 frames", 192, 192, 12, 512, 512),
    ("192 @ 240x416 (480p), 12 frames", 192, 192, 12, 240, 416),
    ("192 @ 1080p edge tile 512x80, 12 frames", 192, 192, 12, 512, 80),
    ("96 -> 3 (the RGB head) @ 720p, 4 frames", 96, 3, 4, 720, 1280),
    ("96 -> 3 (the RGB head) @ 1080p tile 1024x1024, 4 frames", 96, 3, 4, 1024, 1024),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shapes", type=int, nargs="+", help="indices into SHAPES")
    args = parser.parse_args()
    torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    for index, (label, cin, cout, t, h, w) in enumerate(SHAPES):
        if args.shapes and index not in args.shapes:
            continue
        buf = torch.randn(1, cin, t + 2, h, w, device="cuda", dtype=torch.bfloat16).contiguous(memory_format=CL3)
        weight = (torch.randn(cout, cin, 3, 3, 3, device="cuda") / (27 * cin) ** 0.5).to(torch.bfloat16)
        weight = weight.contiguous(memory_format=CL3)
        bias = torch.randn(cout, device="cuda")
        flops = 2 * 27 * cin * cout * t * h * w
        ref = F.conv3d(buf.float(), weight.float(), bias, padding=(0, 1, 1))
        scale = ref.abs().max().item()
        wide = {96: 128, 3: 8}.get(cout, cout)  # as the product computes them
        padded = weight.new_zeros((wide, cin, 3, 3, 3)).contiguous(memory_format=CL3)
        padded[:cout] = weight
        ms = do_bench(partial(F.conv3d, buf, padded, None, padding=(0, 1, 1)))
        print(f"{label}: cuDNN ({wide} outputs) {ms:.3f} ms = {flops / ms / 1e9:.0f} useful TFLOP/s", flush=True)
        if cout in EXACT:  # the product's kernel (kernels/split_conv.py): exactly cout outputs in two products
            split_conv.SPLITS = EXACT
            for bm, stages, warps in itertools.product([64, 128, 256], [3, 4, 5], [4, 8]):
                if bm * cout > 128 * 256 or (bm == 256 and warps == 4):
                    continue
                split_conv.CONFIGS, split_conv._chosen = ((bm, stages, warps),), {}
                run = partial(split_conv.split_conv, buf, split_conv.pack_split(weight), bias)
                report(f"split m{bm} k{64 if cin % 64 == 0 else 32} s{stages} w{warps}", run, ref, scale, flops)


def report(name: str, run, ref: torch.Tensor, scale: float, flops: int) -> None:
    try:
        err = (run().float() - ref).abs().max().item() / scale
        ms = do_bench(run)
    except Exception as error:  # noqa: BLE001 - report and go on
        print(f"   {name}: failed {type(error).__name__}: {str(error)[:200]}")
        return
    print(f"   {name}: {ms:.3f} ms = {flops / ms / 1e9:.0f} useful TFLOP/s, error {err:.2e}", flush=True)


if __name__ == "__main__":
    main()
