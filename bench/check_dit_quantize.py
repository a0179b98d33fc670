"""The fp8 DiT's activation quantizations: the product's compiled passes against one Triton pass per row block.

    python3 bench/check_dit_quantize.py [--tokens 4680 10800 24480] [--json FILE]
    TRITON_INTERPRET=1 python bench/check_dit_quantize.py --device cpu --tokens 64   # a dry run of the logic

(The interpreter's float32 -> float8 cast does not round as the GPU's does, kernels/fp8_conv.py says how: in a
dry run the scales agree and the float8 bytes mostly do; only the GPU's agreement columns mean anything.)

Why (issue 21): a steady 720p fp8 chunk spends ~18 ms in the three quantizations that feed the DiT's float8
products (bench/RESULTS.md round 16: the FFN's GELU + quantize 10.4 ms, the modulated norm + quantize 4.5, the plain
quantize 3.0), under a third of the memory rate; these are `dit.compiled_ops()`'s `gelu_quantize`,
`ln_modulate_quantize` and `quantize` (torch.compile'd reductions over rows of 8960 and 1536). The candidate,
kernels/row_quantize.py (`CausalWanDiT.row_quantize_kernel`, off by default), reads each row once, in
registers, and writes float8 values and the row's scale.

Per token count (480p 4680, 720p 10800, 1080p 24480 tokens a chunk) and op, milliseconds per call of each
(`check_scaled_mm.timed`), and how the candidate agrees with the product's pass: the share of equal float8
bytes, the largest difference in float8 steps of the row's scale, the largest relative difference of the scales.
End to end: `bench_pipeline.py --dtype fp8 --row-quantize on` against `off`.
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

from infvsr_core.dit import EAGER_OPS, compile_available, compiled_ops  # noqa: E402
from infvsr_core.kernels.norm_silu import triton  # noqa: E402
from infvsr_core.kernels.row_quantize import GELU, LN_MODULATE, PLAIN, row_quantize  # noqa: E402

DIM, FFN_DIM, EPS = 1536, 8960, 1e-6

def agreement(got: tuple[torch.Tensor, torch.Tensor], want: tuple[torch.Tensor, torch.Tensor]) -> dict:
    """Equal float8 bytes (share), largest difference in float8 steps at the row's scale, largest scale ratio."""
    values, scales = got
    ref_values, ref_scales = want
    equal = (values.view(torch.uint8) == ref_values.view(torch.uint8)).float().mean().item()
    steps = ((values.float() * scales - ref_values.float() * ref_scales).abs() / (ref_scales * 2.0**-3)).amax()
    ratio = ((scales - ref_scales).abs() / ref_scales).amax()
    return {"equal_bytes": round(equal, 6), "max_steps": round(steps.item(), 3), "scale_rel": float(ratio)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[4680, 10800, 24480])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--json", type=Path, help="also append the JSON line to this file")
    args = parser.parse_args()
    device = torch.device(args.device)
    if triton is None:
        sys.exit("check_dit_quantize: needs Triton")
    gpu = device.type == "cuda"
    ops = compiled_ops() if gpu and compile_available() else EAGER_OPS  # the product's passes on the GPU
    gen = torch.Generator(device=device).manual_seed(0)
    rows = []
    for tokens in args.tokens:
        x = torch.randn(1, tokens, DIM, device=device, generator=gen).to(torch.bfloat16)
        hidden = (2 * torch.randn(tokens, FFN_DIM, device=device, generator=gen)).to(torch.bfloat16)
        shift = 0.1 * torch.randn(1, 1, DIM, device=device, generator=gen)
        scale = 0.1 * torch.randn(1, 1, DIM, device=device, generator=gen)
        cases = {
            "quantize": (partial(ops.quantize, x.reshape(-1, DIM)), partial(row_quantize, x, PLAIN)),
            "gelu_quantize": (partial(ops.gelu_quantize, hidden), partial(row_quantize, hidden, GELU)),
            "ln_modulate_quantize": (
                partial(ops.ln_modulate_quantize, x, shift, scale, EPS),
                partial(row_quantize, x, LN_MODULATE, shift, scale),
            ),
        }
        for name, (product, candidate) in cases.items():
            row = {"tokens": tokens, "op": name, **agreement(candidate(), product())}
            if gpu:
                row["product_ms"], row["triton_ms"] = timed(product), timed(candidate)
            rows.append(row)
            print(json.dumps(row), flush=True)
    append_rows(args.json, device, rows)


if __name__ == "__main__":
    main()
