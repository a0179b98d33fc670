"""The DiT's self-attention shapes through each attention kernel: time, rate and error against float32.

    python bench/check_attention.py [--sizes 480p 720p 1080p]

One steady chunk's self-attention of the full-size DiT (12 heads of 128, bf16):
3 latent frames of queries against the previous chunk's and this chunk's keys.
Kernels: cuDNN's and PyTorch's flash (FA2) kernels through SDPA, and
FlashAttention-3 where it is installed (`attention.py`'s "flash3"), and its
float8 kernel (the fp8 DiT's `float8_attention`): "flash3 fp8" times the kernel
on operands already in float8, "flash3 fp8 + quantize" adds the compiled
`quantize_heads` of q, k and v (the keys joined from two halves, as the
DiT's previous and current chunk; the product quantizes q and k in the
pass that norms them instead, and only v so: an upper bound). The error
is ||out - ref|| / ||ref|| against SDPA's memory-efficient kernel on float32
copies of the same inputs (a kernel none of the timed ones share).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from infvsr_core.attention import _flash3_attention as flash3  # noqa: E402
from infvsr_core.attention import flash3_float8, flash3_installed, flash3_supports, float8_attention  # noqa: E402
from infvsr_core.fp8 import quantize_heads  # noqa: E402

# Output size -> DiT tokens per latent frame (the latent is output / 8, patches 2x2; rows padded to 16 px).
TOKENS = {"480p": 30 * 52, "720p": 45 * 80, "1080p": 68 * 120, "2160p": 135 * 240}
HEADS, HEAD_DIM, LATENT_FRAMES = 12, 128, 3


def sdpa_with(backend: SDPBackend):
    def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        with sdpa_kernel([backend]):
            return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(
                1, 2
            )

    return run


def median_ms(fn, inputs: tuple[torch.Tensor, ...], reps: int) -> float:
    fn(*inputs)
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(*inputs)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


@torch.inference_mode()
def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["480p", "720p", "1080p"], choices=sorted(TOKENS))
    parser.add_argument("--reps", type=int, default=20)
    args = parser.parse_args()
    device = torch.device("cuda")
    print(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}, FlashAttention-3: {flash3_installed()}")
    kernels = {"cudnn": sdpa_with(SDPBackend.CUDNN_ATTENTION), "fa2": sdpa_with(SDPBackend.FLASH_ATTENTION)}
    rows = []
    for size in args.sizes:
        lq = LATENT_FRAMES * TOKENS[size]
        lk = 2 * lq
        gen = torch.Generator(device=device).manual_seed(0)
        q, k, v = (
            torch.randn((1, n, HEADS, HEAD_DIM), generator=gen, device=device).mul_(s).to(torch.bfloat16)
            for n, s in ((lq, 2.0), (lk, 2.0), (lk, 1.0))
        )
        ref = sdpa_with(SDPBackend.EFFICIENT_ATTENTION)(q.float(), k.float(), v.float())
        flop = 4 * lq * lk * HEADS * HEAD_DIM
        available = dict(kernels)
        if flash3_supports(q, k):
            available["flash3"] = flash3
        if flash3_float8(q):
            quantize = torch.compile(quantize_heads, fullgraph=True)

            def operands(q, k, v, quantize=quantize, half=lk // 2):
                parts = [quantize(q), quantize(k[:, :half], k[:, half:]), quantize(v[:, :half], v[:, half:])]
                return tuple(x for x, _ in parts), tuple(s for _, s in parts)

            values, scales = operands(q, k, v)

            def fp8_kernel(q, k, v, values=values, scales=scales):
                return float8_attention(*values, scales)

            def fp8_with_quantize(q, k, v):
                values, scales = operands(q, k, v)
                return float8_attention(*values, scales)

            available["flash3 fp8"] = fp8_kernel
            available["flash3 fp8 + quantize"] = fp8_with_quantize
        for name, fn in available.items():
            out = fn(q, k, v)
            err = ((out.float() - ref).norm() / ref.norm()).item()
            ms = median_ms(fn, (q, k, v), args.reps)
            rows.append((size, lq, lk, name, ms, flop / ms / 1e9, err))
            del out
        del q, k, v, ref
        torch.cuda.empty_cache()
    print("| size | queries x keys | kernel | ms | TFLOP/s | rel. error vs float32 |")
    print("|---|---|---|---|---|---|")
    for size, lq, lk, name, ms, rate, err in rows:
        print(f"| {size} | {lq} x {lk} | {name} | {ms:.3f} | {rate:.0f} | {err:.2e} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
