"""The fp8 DiT's activation quantizations: the product's compiled passes against other forms of them.

    python3 bench/check_dit_quantize.py [--tokens 4680 10800 24480] [--json FILE]
    python bench/check_dit_quantize.py --device cpu --tokens 64   # a dry run of the logic (eager, untimed)

Why (issue 21): the three quantizations that feed the DiT's float8 products took ~18 ms of GPU time in a steady
720p fp8 chunk (bench/RESULTS.md round 18's profile: the FFN's GELU + quantize 10.4 ms, the modulated norm +
quantize 4.5, the plain quantize 3.0), far under the memory rate: torch.compile made each a loop over the row
that finds its largest magnitude, then a second that recomputes the values and divides each by the scale; the
GELU's tanh was computed in both, and a float32 division is many instructions. The product now multiplies by
the scale's reciprocal (fp8.to_fp8), finds the GELU's row scale from the row's extremes (fp8.gelu_row_scale)
and writes the GELU as x * sigmoid(2u) (fp8.gelu_tanh: the same function, 0.5 (1 + tanh u) = sigmoid(2u), which
compiles to an exponential rather than a tanh). Forms timed against it (each compiled as the product's is):

- `divide`: round 17's product (each value divided by the scale; the GELU's scale from its values);
- `tanh` (the GELU only): the product with F.gelu(approximate="tanh").

The one-read kernels of kernels/row_quantize.py are timed beside them (`kernel_r{rows}w{warps}`: launch shapes),
and the queries'/keys' norm + RoPE + float8 (`rms_rope_fp8`) against the product's compiled op.

Per token count (480p 4680, 720p 10800, 1080p 24480 tokens a chunk) and op: milliseconds per call, as wall
time between events (`check_scaled_mm.timed`: a short call's Python launch time shows in it) and as GPU kernel
time (`gpu_ms`: what the call costs in the DiT's CUDA graph), and how each form agrees with the product's pass
(the share of equal float8 bytes, the largest difference in float8 codes, the largest relative difference of
the scales).
"""

from __future__ import annotations

import argparse
import json
import sys
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from check_scaled_mm import append_rows, gpu_ms, timed  # noqa: E402

from infvsr_core.dit import EAGER_OPS, _ln_modulate_op, compile_available, compiled_ops  # noqa: E402
from infvsr_core.fp8 import FP8_DTYPE, FP8_MAX, gelu_row_scale, to_fp8  # noqa: E402
from infvsr_core.kernels.row_quantize import (  # noqa: E402
    GELU,
    LN_MODULATE,
    PLAIN,
    rms_rope_fp8,
    rms_rope_fp8_usable,
    row_quantize,
    row_quantize_usable,
)

DIM, FFN_DIM, EPS = 1536, 8960, 1e-6


def _divided(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def quantize_divide(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    amax = x.abs().amax(dim=-1, keepdim=True).float()
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    return _divided(x, scale), scale


def gelu_quantize_divide(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return quantize_divide(F.gelu(h, approximate="tanh"))


def gelu_quantize_tanh(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scale = gelu_row_scale(h)
    return to_fp8(F.gelu(h, approximate="tanh"), scale), scale


def ln_modulate_quantize_divide(x, shift, scale, eps):
    return quantize_divide(_ln_modulate_op(x, shift, scale, eps).reshape(-1, x.shape[-1]))


def _row_kernel(op: int, launch: tuple[int, int], x: torch.Tensor, *rest) -> tuple[torch.Tensor, torch.Tensor]:
    return row_quantize(x, op, *rest, launch=launch)


def agreement(got: tuple[torch.Tensor, torch.Tensor], want: tuple[torch.Tensor, torch.Tensor]) -> dict:
    """Equal float8 bytes (share), largest difference of the float8 codes (steps, where the scales agree), largest
    relative difference of the scales."""
    values, scales = got
    ref_values, ref_scales = want
    codes, ref_codes = values.view(torch.uint8).int(), ref_values.view(torch.uint8).int()
    equal = (codes == ref_codes).float().mean().item()
    steps = (codes - ref_codes).abs().amax().item()
    ratio = ((scales - ref_scales).abs() / ref_scales).amax()
    return {"equal_bytes": round(equal, 6), "max_code_diff": steps, "scale_rel": float(ratio)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[4680, 10800, 24480])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--json", type=Path, help="also append the JSON line to this file")
    args = parser.parse_args()
    device = torch.device(args.device)
    gpu = device.type == "cuda" and compile_available()
    ops = compiled_ops() if gpu else EAGER_OPS  # the product's passes on the GPU
    wrap = partial(torch.compile, fullgraph=True) if gpu else (lambda fn: fn)
    candidates = {
        "quantize": {"divide": wrap(quantize_divide)},
        "gelu_quantize": {"divide": wrap(gelu_quantize_divide), "tanh": wrap(gelu_quantize_tanh)},
        "ln_modulate_quantize": {"divide": wrap(ln_modulate_quantize_divide)},
    }
    if row_quantize_usable(torch.empty(1, DIM, device=device, dtype=torch.bfloat16)):  # the one-read row kernel
        for op, kernel_op, launches in (
            ("quantize", PLAIN, [(1, 4), (2, 4), (4, 4), (4, 8)]),
            ("gelu_quantize", GELU, [(1, 4), (1, 8)]),
            ("ln_modulate_quantize", LN_MODULATE, [(1, 4), (2, 4), (4, 4), (4, 8)]),
        ):
            for rows, warps in launches:
                candidates[op][f"kernel_r{rows}w{warps}"] = partial(_row_kernel, kernel_op, (rows, warps))
    gen = torch.Generator(device=device).manual_seed(0)
    rows = []
    for tokens in args.tokens:
        x = torch.randn(1, tokens, DIM, device=device, generator=gen).to(torch.bfloat16)
        hidden = (2 * torch.randn(tokens, FFN_DIM, device=device, generator=gen)).to(torch.bfloat16)
        shift = 0.1 * torch.randn(1, 1, DIM, device=device, generator=gen)
        scale = 0.1 * torch.randn(1, 1, DIM, device=device, generator=gen)
        inputs = {
            "quantize": (x.reshape(-1, DIM),),
            "gelu_quantize": (hidden,),
            "ln_modulate_quantize": (x, shift, scale, EPS),
        }
        for op, forms in candidates.items():
            product = partial(getattr(ops, op), *inputs[op])
            want = product()
            row = {"tokens": tokens, "op": op}
            if gpu:
                row["product_ms"], row["product_gpu_ms"] = timed(product), gpu_ms(product)
            for name, fn in forms.items():
                candidate = partial(fn, *inputs[op])
                row[name] = agreement(candidate(), want)
                if gpu:
                    row[name]["ms"], row[name]["gpu_ms"] = timed(candidate), gpu_ms(candidate)
            rows.append(row)
            print(json.dumps(row), flush=True)
        rows += rope_rows(ops, x, tokens, gpu, gen)
    append_rows(args.json, device, rows)


def rope_rows(ops, x: torch.Tensor, tokens: int, gpu: bool, gen: torch.Generator) -> list[dict]:
    """The queries' (no past, no bf16 copy kept) and the keys' (a past chunk's cached keys joined, the rotated
    rows kept) norm + RoPE + float8: the product's compiled op against the one-read kernel, where it runs."""
    heads, head_dim = DIM // 128, 128
    weight = (1 + 0.1 * torch.randn(DIM, device=x.device, generator=gen)).to(torch.bfloat16)
    angles = torch.rand(tokens, head_dim // 2, device=x.device, generator=gen) * 6.28
    cos, sin = angles.cos(), angles.sin()
    past = torch.randn(1, tokens, heads, head_dim, device=x.device, generator=gen).to(torch.bfloat16)
    args = (x, weight, cos, sin, EPS, heads)
    out = []
    for name, extra, keep in (("rms_rope_fp8 queries", (), False), ("rms_rope_fp8 keys", (past,), True)):
        product = partial(ops.rms_rope_fp8, *args, *extra, keep_roped=keep)
        row = {"tokens": tokens, "op": name}
        if gpu:
            row["product_ms"], row["product_gpu_ms"] = timed(product), gpu_ms(product)
        if rms_rope_fp8_usable(*args, *extra):
            kernel = partial(rms_rope_fp8, *args, *extra, keep_roped=keep)
            row["kernel"] = agreement(kernel()[1:], product()[1:])
            if gpu:
                row["kernel"]["ms"], row["kernel"]["gpu_ms"] = timed(kernel), gpu_ms(kernel)
        out.append(row)
        print(json.dumps(row), flush=True)
    return out


if __name__ == "__main__":
    main()
