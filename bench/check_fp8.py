"""fp8 check (issue 21): each quantized layer's error, and each product's speed, at full size.

    python bench/check_fp8.py [--size 720p] [--json FILE]

Errors: a full-size random DiT runs one steady chunk of the bench's synthetic clip (encoded by the VAE, as
the pipeline does); every layer the fp8 mode quantizes (and every one it keeps, for comparison) is fed the
bf16 model's real input, and its fp8 output is compared with the float32 product of the float32 weights
(relative Frobenius error), beside the bf16 layer's own error. Speed: each distinct (tokens x in -> out)
block operation (q/k/v projections, o projection, FFN), bf16 against fp8 as the DiT runs them (activation
quantization included), CUDA events.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_pipeline import SIZES, random_pipeline, synthetic_clip  # noqa: E402
from check_scaled_mm import timed  # noqa: E402

from infvsr_core.fp8 import QUANTIZED_LINEARS, FP8Linear, fp8_matmul_supported, project  # noqa: E402


def layer_kind(name: str) -> str:
    return ".".join(name.split(".")[2:])  # blocks.<i>.self_attn.q -> self_attn.q


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", default="720p", choices=sorted(SIZES))
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    device = torch.device("cuda")
    height, width = SIZES[args.size]
    pipe = random_pipeline(device, torch.bfloat16)
    pipe.dit.cuda_graphs = False
    full32 = {n: (m.weight.detach().float().clone(), None if m.bias is None else m.bias.detach().float().clone())
              for n, m in pipe.dit.named_modules() if isinstance(m, nn.Linear) and n.startswith("blocks.")}
    inputs: dict[str, torch.Tensor] = {}

    def keep(name):
        def hook(_module, args_, _out):
            inputs[name] = args_[0].detach()
        return hook

    handles = [m.register_forward_hook(keep(n)) for n, m in pipe.dit.named_modules() if n in full32]
    clip = synthetic_clip(21, height, width, device)
    session = pipe.new_session(scale=4)
    pipe.push(session, clip[:9])
    inputs.clear()  # keep the steady (second) chunk's inputs: with a KV cache, as most chunks run
    pipe.push(session, clip[9:21])
    for h in handles:
        h.remove()

    errors: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for name, x in inputs.items():
        w, b = full32[name]
        reference = F.linear(x.float(), w, b)
        fp8 = FP8Linear.from_linear(_as_linear(w, b))
        fp8.bias.data = fp8.bias.data.to(torch.bfloat16)
        out8 = fp8(x.to(torch.bfloat16)).float()
        out16 = F.linear(x.to(torch.bfloat16), w.to(torch.bfloat16), b.to(torch.bfloat16)).float()
        norm = reference.norm().item()
        err8, err16 = (out8 - reference).norm().item() / norm, (out16 - reference).norm().item() / norm
        errors[layer_kind(name)].append((err8, err16))
        del reference, out8, out16
    report = {
        kind: {
            "quantized": kind in QUANTIZED_LINEARS,
            "fp8_rel_err_mean": round(statistics.mean(e[0] for e in errs), 5),
            "fp8_rel_err_max": round(max(e[0] for e in errs), 5),
            "bf16_rel_err_mean": round(statistics.mean(e[1] for e in errs), 5),
        }
        for kind, errs in sorted(errors.items())
    }
    print(json.dumps({"size": args.size, "native_fp8": fp8_matmul_supported(device), "layers": report}))

    speed = []
    tokens = next(x for x in inputs.values()).reshape(-1, pipe.dit.config.dim).shape[0]
    block = pipe.dit.blocks[0]
    ops = pipe.dit._ops(device)
    x = torch.randn(1, tokens, pipe.dit.config.dim, device=device, dtype=torch.bfloat16)
    qkv16 = tuple(nn.Linear(*m.weight.shape[::-1], device=device, dtype=torch.bfloat16)
                  for m in (block.self_attn.q, block.self_attn.k, block.self_attn.v))
    ffn16 = nn.Sequential(nn.Linear(*block.ffn[0].weight.shape[::-1]), nn.GELU(approximate="tanh"),
                          nn.Linear(*block.ffn[2].weight.shape[::-1])).to(device, torch.bfloat16)
    qkv8 = tuple(FP8Linear.from_linear(m) for m in qkv16)
    ffn8 = nn.Sequential(FP8Linear.from_linear(ffn16[0]), ffn16[1], FP8Linear.from_linear(ffn16[2]))
    cases = {
        "q,k,v projections": (lambda: [m(x) for m in qkv16], lambda: project(qkv8, x, ops.quantize)),
        "o projection": (lambda: qkv16[0](x), lambda: qkv8[0](x)),
        "ffn (up, gelu, down)": (lambda: ops.ffn(ffn16, x), lambda: ops.ffn(ffn8, x)),
    }
    for name, (plain, fp8_fn) in cases.items():
        plain(), fp8_fn()
        bf16_ms, fp8_ms = timed(plain), timed(fp8_fn)
        speed.append({"op": f"{name} ({tokens} tokens)", "bf16_ms": round(bf16_ms, 3), "fp8_ms": round(fp8_ms, 3),
                      "speedup": round(bf16_ms / fp8_ms, 2)})
    print(json.dumps({"size": args.size, "products": speed}))
    if args.json:
        with args.json.open("a") as f:
            f.write(json.dumps({"size": args.size, "layers": report, "products": speed}) + "\n")


def _as_linear(w: torch.Tensor, b: torch.Tensor | None) -> nn.Linear:
    layer = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, device=w.device)
    layer.weight.data.copy_(w)
    if b is not None:
        layer.bias.data.copy_(b)
    return layer


if __name__ == "__main__":
    main()
