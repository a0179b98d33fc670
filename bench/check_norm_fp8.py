"""The VAE's norm + SiLU writing a float8 conv's input itself: which way of storing float8 keeps the norm's speed.

    python3 bench/check_norm_fp8.py [--json FILE]
    TRITON_INTERPRET=1 python bench/check_norm_fp8.py --device cpu --pixels 64   # a dry run of the logic

Why (issue 21): under `dtype fp8` each float8 conv's input goes through two passes, the norm + SiLU writing bf16
and the cast into float8 (`fp8_conv.quantize_staged`): ~20 ms of a steady 720p chunk (bench/RESULTS.md round 16).
Round 16's attempt to store float8 from the product's norm kernel (b5fa4d5, reverted) ran 1.6-1.85x slower than
the two passes on the large shapes. This times, on the decoder's norm shapes, one norm + SiLU kernel (the
product's arithmetic, `kernels/norm_silu.py`) in four stores:
- bf16: what the product's norm writes (its own speed, the floor for the others);
- fp8 div: float8 of (y rounded to bf16) / scale with an IEEE division (round 16's way);
- fp8 mul: the same with a multiplication by the scale's reciprocal (a power-of-two scale makes it exact): the
  product's `FastForwardOptions.fp8_norm_store` (on under `dtype fp8` since bench/RESULTS.md round 17; end to
  end: `bench_pipeline.py --dtype fp8 --fp8-norm-store on|off`);
- fp8 direct: float8 of y * reciprocal, without rounding y to bf16 first;
against the product's two passes (`rms_norm_rows` into bf16, then the cast kernel), with the share of float8
bytes equal to the two passes' and the largest difference in float8 steps. (The interpreter's float32 ->
float8 cast does not round as the GPU's does: in a dry run only the timings' absence and the logic are checked.)
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from check_scaled_mm import append_rows, timed  # noqa: E402

from infvsr_core.fp8 import FP8_DTYPE, FP8_MAX, to_fp8  # noqa: E402
from infvsr_core.kernels import fp8_conv  # noqa: E402
from infvsr_core.kernels.norm_silu import rms_norm_rows, tl, triton  # noqa: E402

# (channels, pixels of one decoder call's norm input) at 720p, a steady chunk: the float8 convs' inputs.
SHAPES = {"720p 96 @ 720x1280 x 4": (96, 4 * 720 * 1280), "720p 192 @ 360x640 x 4": (192, 4 * 360 * 640),
          "720p 384 @ 180x320 x 2": (384, 2 * 180 * 320)}  # fmt: skip
STORES = {"bf16": 0, "fp8 div": 1, "fp8 mul": 2, "fp8 direct": 3}

if triton is not None:

    @triton.jit
    def _norm_store_kernel(
        x_ptr, gamma_ptr, out_ptr, scale_ptr, inv_ptr, rows,
        C: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr, STORE: tl.constexpr, FP8_MAX: tl.constexpr,
    ):  # fmt: skip
        r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
        c = tl.arange(0, BLOCK_C)
        mask = (r < rows)[:, None] & (c < C)[None, :]
        at = r[:, None] * C + c[None, :]
        x = tl.load(x_ptr + at, mask=mask, other=0.0).to(tl.float32)
        inv_norm = 1.0 / tl.maximum(tl.sqrt(tl.sum(x * x, axis=1)), 1e-12)
        y = x * inv_norm[:, None] * tl.load(gamma_ptr + c, mask=c < C, other=0.0)[None, :]
        y = y * tl.sigmoid(y)
        if STORE == 0:
            tl.store(out_ptr + at, y.to(out_ptr.dtype.element_ty), mask=mask)
        else:
            if STORE == 1:
                q = tl.math.div_rn(y.to(tl.bfloat16).to(tl.float32), tl.load(scale_ptr))
            elif STORE == 2:
                q = y.to(tl.bfloat16).to(tl.float32) * tl.load(inv_ptr)
            else:
                q = y * tl.load(inv_ptr)
            q = tl.clamp(q, -FP8_MAX, FP8_MAX).to(out_ptr.dtype.element_ty, fp_downcast_rounding="rtne")
            tl.store(out_ptr + at, q, mask=mask)


def norm_store(x: torch.Tensor, gamma: torch.Tensor, scale: torch.Tensor, store: int) -> torch.Tensor:
    """SiLU(normalize(x) * gamma) of (N, C) bf16 rows, stored as `store` says (see the module docstring)."""
    n, c = x.shape
    out = torch.empty(n, c, dtype=torch.bfloat16 if store == 0 else FP8_DTYPE, device=x.device)
    block_c = triton.next_power_of_2(c)
    block_r = max(1, 4096 // block_c)
    inv = (1.0 / scale).reshape(1)
    _norm_store_kernel[(triton.cdiv(n, block_r),)](
        x, gamma, out, scale.reshape(1), inv, n,
        C=c, BLOCK_C=block_c, BLOCK_R=block_r, STORE=store, FP8_MAX=FP8_MAX, num_warps=4,
    )  # fmt: skip
    return out


def two_passes(x: torch.Tensor, gamma: torch.Tensor, scale: torch.Tensor, wide: torch.Tensor, out: torch.Tensor):
    """The product's way today: the norm pass into bf16, then the cast pass into float8."""
    rms_norm_rows(x, gamma, 1.0, silu=True, out=wide)
    n = wide.numel()
    if x.is_cuda:
        fp8_conv._cast_kernel[(triton.cdiv(n, fp8_conv.CAST_BLOCK),)](
            wide.view(-1), scale, out.view(-1), n, FP8_MAX=FP8_MAX, BLOCK=fp8_conv.CAST_BLOCK
        )
    else:
        out.copy_(to_fp8(wide, scale))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--pixels", type=int, help="pixels per shape instead of the decoder's (a dry run)")
    parser.add_argument("--json", type=Path, help="also append the JSON line to this file")
    args = parser.parse_args()
    if triton is None:
        sys.exit("check_norm_fp8: needs Triton")
    device = torch.device(args.device)
    gen = torch.Generator(device=device).manual_seed(0)
    rows = []
    for label, (c, pixels) in SHAPES.items():
        n = args.pixels or pixels
        x = torch.randn(n, c, device=device, generator=gen).to(torch.bfloat16)
        gamma = (1.0 + 0.1 * torch.randn(c, device=device, generator=gen)) * math.sqrt(c)  # the norm's scale folded
        scale = fp8_conv.static_activation_scale(gamma / math.sqrt(c), c).to(device)
        wide = torch.empty_like(x)
        reference = two_passes(x, gamma, scale, wide, torch.empty(n, c, dtype=FP8_DTYPE, device=device))
        row = {"shape": label}
        for name, store in STORES.items():
            out = norm_store(x, gamma, scale, store)
            if store == 0:
                row["bf16_equal_to_product_norm"] = torch.equal(out, wide)
            else:
                got, want = out.float() * scale, reference.float() * scale
                equal = (out.view(torch.uint8) == reference.view(torch.uint8)).float().mean().item()
                steps = ((got - want).abs() / (want.abs() * 2.0**-3).clamp_min(scale * 2.0**-9)).amax().item()
                row[f"{name} equal_bytes"], row[f"{name} max_steps"] = round(equal, 6), round(steps, 3)
            if device.type == "cuda":
                row[f"{name} ms"] = timed(partial(norm_store, x, gamma, scale, store))
        if device.type == "cuda":
            out8 = torch.empty(n, c, dtype=FP8_DTYPE, device=device)
            row["product two passes ms"] = timed(partial(two_passes, x, gamma, scale, wide, out8))
        rows.append(row)
        print(json.dumps(row), flush=True)
    append_rows(args.json, device, rows)


if __name__ == "__main__":
    main()
