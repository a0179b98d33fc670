"""The fp8 DiT's activation quantizations: the product's compiled passes against one Triton pass per row block.

    python3 bench/check_dit_quantize.py [--tokens 4680 10800 24480] [--json FILE]
    TRITON_INTERPRET=1 python bench/check_dit_quantize.py --device cpu --tokens 64   # a dry run of the logic

(The interpreter's float32 -> float8 cast does not round as the GPU's does, kernels/fp8_conv.py says how: in a
dry run the scales agree and the float8 bytes mostly do; only the GPU's agreement columns mean anything.)

Why (issue 21): a steady 720p fp8 chunk spends ~18 ms in the three quantizations that feed the DiT's float8
products (bench/RESULTS.md round 16: the FFN's GELU + quantize 10.4 ms, the modulated norm + quantize 4.5, the plain
quantize 3.0), under a third of the memory rate; these are `dit.compiled_ops()`'s `gelu_quantize`,
`ln_modulate_quantize` and `quantize` (torch.compile'd reductions over rows of 8960 and 1536). The candidate
here reads each row once, in registers, and writes float8 values and the row's scale: the same arithmetic as
`fp8.quantize_rows` after the op (the op's result rounded to the input's dtype first, as the eager ops do).

Per token count (480p 4680, 720p 10800, 1080p 24480 tokens a chunk) and op, milliseconds per call of each
(`check_scaled_mm.timed`), and how the candidate agrees with the product's pass: the share of equal float8
bytes, the largest difference in float8 steps of the row's scale, the largest relative difference of the scales.
Nothing here is the product's yet: a candidate that wins goes into fp8.py / dit.py with its tests.
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
from infvsr_core.fp8 import FP8_DTYPE, FP8_MAX  # noqa: E402
from infvsr_core.kernels.norm_silu import tl, triton  # noqa: E402

DIM, FFN_DIM, EPS = 1536, 8960, 1e-6
PLAIN, GELU, LN_MODULATE = 0, 1, 2

if triton is not None:

    @triton.jit
    def _row_quantize_kernel(
        x_ptr, shift_ptr, scale_ptr, out_ptr, row_scale_ptr, n_rows, tokens, C, eps,
        MODE: tl.constexpr, ROWS: tl.constexpr, BLOCK_C: tl.constexpr, FP8_MAX: tl.constexpr,
    ):  # fmt: skip
        r = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        c = tl.arange(0, BLOCK_C)
        rmask, cmask = r < n_rows, c < C
        mask = rmask[:, None] & cmask[None, :]
        at = r.to(tl.int64)[:, None] * C + c[None, :]
        x = tl.load(x_ptr + at, mask=mask, other=0.0).to(tl.float32)
        if MODE == 1:  # Wan's tanh GELU, 0.5 x (1 + tanh(u)) = x sigmoid(2u)
            u = 0.7978845608028654 * (x + 0.044715 * x * x * x)
            y = x * tl.sigmoid(2.0 * u)
        elif MODE == 2:  # layer norm without affine, then x * (1 + scale) + shift (one vector per batch)
            mean = tl.sum(x, axis=1) / C
            d = tl.where(mask, x - mean[:, None], 0.0)
            normed = d * tl.rsqrt(tl.sum(d * d, axis=1) / C + eps)[:, None]
            batch = (r // tokens).to(tl.int64)[:, None] * C + c[None, :]
            y = normed * (1.0 + tl.load(scale_ptr + batch, mask=mask, other=0.0))
            y += tl.load(shift_ptr + batch, mask=mask, other=0.0)
        else:
            y = x
        y = y.to(x_ptr.dtype.element_ty).to(tl.float32)  # the eager op's result in the input's dtype
        amax = tl.max(tl.where(mask, tl.abs(y), 0.0), axis=1)
        s = tl.where(amax > 0, tl.math.div_rn(amax, FP8_MAX), 1.0)
        q = tl.clamp(tl.math.div_rn(y, s[:, None]), -FP8_MAX, FP8_MAX)
        tl.store(out_ptr + at, q.to(out_ptr.dtype.element_ty, fp_downcast_rounding="rtne"), mask=mask)
        tl.store(row_scale_ptr + r, s, mask=rmask)


def row_quantize(
    x: torch.Tensor, mode: int, shift: torch.Tensor | None = None, scale: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(float8 (M, C), float32 scales (M, 1)) of op(x) for x (B, L, C) or (M, C), one Triton pass."""
    c = x.shape[-1]
    rows = x.reshape(-1, c)
    tokens = x.shape[-2] if x.ndim == 3 else rows.shape[0]
    out = torch.empty(rows.shape, dtype=FP8_DTYPE, device=x.device)
    row_scale = torch.empty(rows.shape[0], 1, dtype=torch.float32, device=x.device)
    block_c = triton.next_power_of_2(c)
    per_row = max(1, 8192 // block_c)
    shift = rows if shift is None else shift.float().contiguous()
    scale = rows if scale is None else scale.float().contiguous()
    _row_quantize_kernel[(triton.cdiv(rows.shape[0], per_row),)](
        rows, shift, scale, out, row_scale, rows.shape[0], tokens, c, EPS,
        MODE=mode, ROWS=per_row, BLOCK_C=block_c, FP8_MAX=FP8_MAX, num_warps=8 if block_c >= 4096 else 4,
    )  # fmt: skip
    return out, row_scale


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
