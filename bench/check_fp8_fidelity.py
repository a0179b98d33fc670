"""fp8 against the float32 plain path on a real clip (issue 21's fidelity target: >= 40 dB), on any device.

    python bench/check_fp8_fidelity.py [--clip FILE] [--frames 21] [--size 80x34] [--device cpu|cuda] [--json F]

The clip's first frames are reduced to the input size by `evaluate --make-lr`'s protocol (antialiased bicubic),
then upscaled x4 by five pipelines with the same random full-size weights in the published formats: float32
through the plain path (the reference), bf16, fp8 with the VAE in bf16 ("fp8 DiT only": the DiT's linear layers
in float8), fp8 as the product runs it (the VAE's causal convs of `--widths` in float8 too), and that with the
DiT's self-attention in float8 (FlashAttention-3's kernel where it runs, else its float32 reference on the
float8 operands). The fp8 layers
are made to multiply natively (`FP8Linear.native = True`: PyTorch's scaled product with the activations
quantized per token, as on a GPU with float8 tensor cores) rather than expanding their weights, so the figure is
the fp8 mode's arithmetic on a CPU too. The VAE's float8 convs run through the kernel on a GPU with float8
tensor cores (the product's path); elsewhere `emulate_fp8_convs` (the kernel's reference: the same
float8-rounded operands) stands in. Prints one JSON line with each PSNR against float32.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_pipeline import commit_id, psnr, random_pipeline, run_stream  # noqa: E402

from infvsr_core.attention import float8_attention_runs  # noqa: E402
from infvsr_core.evaluate.degrade import downscale  # noqa: E402
from infvsr_core.fp8 import FP8Linear, fp8_matmul_supported, set_float8_attention  # noqa: E402
from infvsr_core.vae.fp8_convs import FP8_CONV_OUTPUTS, emulate_fp8_convs  # noqa: E402

DEFAULT_CLIP = ROOT.parent / "shared" / "data" / "real_bikes_street_640x272.mp4"


def _widths(text: str) -> frozenset[int]:
    return frozenset(int(part) for part in text.split(","))


def _size(text: str) -> tuple[int, int]:
    width, height = (int(v) for v in text.lower().split("x"))
    return width, height


def real_input(path: Path, frames: int, width: int, height: int) -> torch.Tensor:
    """The clip's first `frames` frames resized to (4 * width, 4 * height), then reduced 4x by the protocol."""
    from infvsr_core.io import VideoReader  # PyAV: only where a clip is decoded (see --input-cache)

    with VideoReader(path, max_frames=frames) as reader:
        clip = torch.cat([chunk.frames for chunk in reader.read_chunks(frames)])[:frames]
    planar = clip.permute(0, 3, 1, 2).float()
    hr = torch.nn.functional.interpolate(planar, size=(4 * height, 4 * width), mode="bicubic", antialias=True)
    return downscale(hr.clamp(0, 1).permute(0, 2, 3, 1), 4)


def attention_fp8(device: torch.device) -> str:
    """How the "fp8_attention" variant's self-attention runs: FlashAttention-3's float8 kernel, or emulated."""
    probe = torch.zeros(1, 1, 1, 128, dtype=torch.bfloat16, device=device)
    return "flash3" if float8_attention_runs(probe, "auto") else "emulated"


def upscaled(variant: str, clip: torch.Tensor, device: torch.device, widths: frozenset[int]) -> torch.Tensor:
    """The clip through one pipeline (same weights each time): "fp32" the plain path; "bf16"; "fp8_dit" fp8 with
    the VAE's convs in bf16; "fp8" fp8 with the VAE's convs of `widths` in float8: through the kernel where the
    GPU has float8 tensor cores (the product's path), else emulated on the plain path (`emulate_fp8_convs`);
    "fp8_attention" the same with the DiT's self-attention in float8 (`attention_fp8`). The fp8 variants other than
    "fp8_attention" keep bf16 attention whatever the product's default."""
    kernel = fp8_matmul_supported(device) and device.type == "cuda"
    if variant == "fp32":
        pipe = random_pipeline(device, torch.float32, fast=False)
    elif variant in ("fp8", "fp8_attention") and not kernel:
        pipe = random_pipeline(device, torch.bfloat16, fp8=True, fast=False)
        assert emulate_fp8_convs(pipe.vae.vae, widths) > 0, "no VAE conv of the float8 widths"
    else:
        pipe = random_pipeline(device, torch.bfloat16, fp8=variant.startswith("fp8"))
        convs = widths if variant in ("fp8", "fp8_attention") else frozenset()
        pipe.vae.fast_options = dataclasses.replace(pipe.vae.fast_options, fp8_conv_outputs=convs)
    if variant.startswith("fp8"):
        layers = [m for m in pipe.dit.modules() if isinstance(m, FP8Linear)]
        assert layers, "the fp8 pipeline has no float8 layers"
        for layer in layers:
            layer.native = True
        set_float8_attention(pipe.dit, variant == "fp8_attention")
        if variant == "fp8_attention" and attention_fp8(device) == "emulated":
            pipe.dit.attention_backend = "math"  # float8 operands through the float32 reference
    out, _ = run_stream(pipe, clip.to(device), 4)
    del pipe
    return out.float().cpu()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clip", type=Path, default=DEFAULT_CLIP)
    parser.add_argument("--frames", type=int, default=21, help="frames upscaled (9 + 12: two chunks)")
    parser.add_argument("--size", type=_size, default=(80, 34), help="input WIDTHxHEIGHT (output x4)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", type=Path, help="also append the JSON line to this file")
    parser.add_argument(
        "--input-cache",
        type=Path,
        help="the reduced input: written here on first use, read from here after (a machine without PyAV reads "
        "what one with it wrote)",
    )
    parser.add_argument(
        "--widths", type=_widths, default=FP8_CONV_OUTPUTS, help="VAE conv output widths in float8, e.g. 96,192,384"
    )
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.input_cache and args.input_cache.exists():
        clip = torch.load(args.input_cache, weights_only=True)
    else:
        clip = real_input(args.clip, args.frames, *args.size)
        if args.input_cache:
            torch.save(clip, args.input_cache)
    started = time.perf_counter()
    variants = ("fp32", "bf16", "fp8_dit", "fp8", "fp8_attention")
    outputs = {v: upscaled(v, clip, device, args.widths) for v in variants}
    row = {
        "bench": "fp8_fidelity",
        "clip": args.clip.name,
        "input": f"{args.size[0]}x{args.size[1]}",
        "frames": len(outputs["fp32"]),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "commit": commit_id() or "unknown",
        "psnr_bf16_vs_fp32_db": round(psnr(outputs["bf16"], outputs["fp32"]), 2),
        "vae_fp8_widths": sorted(args.widths),
        "vae_fp8_convs": "kernel" if fp8_matmul_supported(device) and device.type == "cuda" else "emulated",
        "psnr_fp8_dit_only_vs_fp32_db": round(psnr(outputs["fp8_dit"], outputs["fp32"]), 2),
        "psnr_fp8_vs_fp32_db": round(psnr(outputs["fp8"], outputs["fp32"]), 2),
        "attention_fp8": attention_fp8(device),
        "psnr_fp8_attention_vs_fp32_db": round(psnr(outputs["fp8_attention"], outputs["fp32"]), 2),
        "seconds": round(time.perf_counter() - started, 1),
    }
    print(json.dumps(row))
    if args.json:
        with args.json.open("a") as f:
            f.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
