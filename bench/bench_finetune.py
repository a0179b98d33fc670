"""Step time and peak GPU memory of fine-tuning at full size (random weights in the published formats).

    python bench/bench_finetune.py [--crop 832x480] [--patch 192] [--context 8] [--chunks 3] [--steps 4]
        [--full] [--stage 2] [--cap-gib 24] [--no-checkpointing] [--json FILE]

Speed and memory do not depend on the weights' values, so the networks are built in memory from random state
dicts in the published formats (bench_pipeline.random_pipeline, as the loader builds them); stage 2 adds a
random Wan2.1-T2V-1.3B-shaped teacher (text_dim 4096). The training clip is a synthetic moving pattern with
noise, written once as PNG frames at the crop size, and the full RealBasicVSR-style degradation runs as in
training. The first `--warmup` steps are excluded (cuDNN algorithm search, allocator growth). `--cap-gib`
limits this process to that much GPU memory (torch.cuda.set_per_process_memory_fraction), to check the 24 GB
plan on a larger card. Prints one JSON line: median step time, the data part (reading + degradation), peak
allocated and reserved memory, the settings, device and commit; a run out of memory prints `"oom": true`.
Results go to bench/RESULTS.md by hand.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_pipeline import commit_id, random_pipeline, synthetic_clip  # noqa: E402

from infvsr_core.dit import CausalWanDiT, DiTConfig, random_dit_state_dict  # noqa: E402
from infvsr_core.finetune.command import _size  # noqa: E402
from infvsr_core.finetune.data import find_clips, training_frames  # noqa: E402
from infvsr_core.finetune.dmd import DMDSettings  # noqa: E402
from infvsr_core.finetune.lora import LoRASettings  # noqa: E402
from infvsr_core.finetune.trainer import TrainConfig, Trainer  # noqa: E402
from infvsr_core.memory.plan import cap_device_memory  # noqa: E402
from infvsr_core.weights import load_checked  # noqa: E402


def random_teacher(device: torch.device, dtype: torch.dtype, tiny: bool = False) -> CausalWanDiT:
    """A Wan2.1-T2V-1.3B-shaped DiT (umT5's 4096-d text input) with random weights, frozen."""
    config = DiTConfig(text_dim=4096)
    if tiny:
        config = DiTConfig(dim=256, ffn_dim=512, num_heads=2, num_layers=2, text_dim=4096)
    with torch.device("meta"):
        model = CausalWanDiT(config)
    model = model.to_empty(device="cpu")
    load_checked(model, random_dit_state_dict(config, seed=7), what="random teacher")
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


def write_clip(folder: Path, frames: int, height: int, width: int) -> Path:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    clip = synthetic_clip(frames, height, width, torch.device("cpu"))
    for index, frame in enumerate(clip):
        Image.fromarray((frame * 255).round().to(torch.uint8).numpy()).save(folder / f"{index:04d}.png")
    return folder


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--crop", type=_size, default=(480, 832), help="HR crop WIDTHxHEIGHT (832x480)")
    parser.add_argument("--patch", type=_size, default=(192, 192), help="supervised window WIDTHxHEIGHT (192)")
    parser.add_argument("--context", type=int, default=8, help="latent context around the window (8)")
    parser.add_argument("--chunks", type=int, default=3, help="chunks per sample (3: 33 frames)")
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank (16)")
    parser.add_argument("--full", action="store_true", help="full fine-tuning instead of LoRA")
    parser.add_argument("--stage", type=int, choices=(1, 2), default=1, help="2: with DMD against a random teacher")
    parser.add_argument("--steps", type=int, default=4, help="timed steps (4)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (2)")
    parser.add_argument("--cap-gib", type=float, help="limit this process to this much GPU memory")
    parser.add_argument("--no-checkpointing", action="store_true", help="keep all activations")
    parser.add_argument("--json", type=Path, help="also append the JSON line to this file")
    parser.add_argument("--tiny", action="store_true", help="the tiny test networks (a smoke test, e.g. on the CPU)")
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (with --tiny: a smoke test)")
    args = parser.parse_args()

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if args.cap_gib and cuda:
        cap_device_memory(device, args.cap_gib)
    dtype = torch.bfloat16 if cuda else torch.float32
    config = TrainConfig(
        crop=args.crop,
        patch=args.patch,
        context=args.context,
        chunks=args.chunks,
        lora=None if args.full else LoRASettings(args.rank, float(args.rank)),
        lr=1e-5 if args.full else 1e-4,
        dmd=DMDSettings() if args.stage == 2 else None,
        gradient_checkpointing=not args.no_checkpointing,
    )
    row = {
        "bench": "finetune",
        "stage": args.stage,
        "mode": "full" if args.full else f"lora r{args.rank}",
        "crop": f"{args.crop[1]}x{args.crop[0]}",
        "patch": f"{args.patch[1]}x{args.patch[0]}",
        "context": args.context,
        "chunks": args.chunks,
        "checkpointing": not args.no_checkpointing,
        "cap_gib": args.cap_gib,
        "device": torch.cuda.get_device_name(device) if cuda else "cpu",
        "tiny": args.tiny,
        "torch": torch.__version__,
        "commit": commit_id(),
    }
    try:
        with tempfile.TemporaryDirectory() as tmp:
            data = write_clip(Path(tmp) / "clip", training_frames(args.chunks) + 4, *args.crop)
            pipe = random_pipeline(device, dtype, tiny=args.tiny)
            if args.full:
                pipe.dit.float()
            teacher = random_teacher(device, dtype, args.tiny) if args.stage == 2 else None
            trainer = Trainer(pipe, find_clips(data), config, teacher=teacher)
            sample, data_seconds = trainer.sampler.sample, []

            def timed_sample(gen):
                start = time.perf_counter()
                clip = sample(gen)
                data_seconds.append(time.perf_counter() - start)
                return clip

            trainer.sampler.sample = timed_sample
            steps = []
            sync = torch.cuda.synchronize if cuda else (lambda _device: None)
            for index in range(args.warmup + args.steps):
                if index == args.warmup and cuda:
                    torch.cuda.reset_peak_memory_stats(device)
                sync(device)
                start = time.perf_counter()
                trainer.train_step()
                sync(device)
                if index >= args.warmup:
                    steps.append(time.perf_counter() - start)
            row.update(
                step_s=round(statistics.median(steps), 3),
                steps_s=[round(s, 3) for s in steps],
                data_s=round(statistics.mean(data_seconds[args.warmup :]), 3),
            )
            if cuda:
                row.update(
                    peak_alloc_gib=round(torch.cuda.max_memory_allocated(device) / 2**30, 2),
                    peak_reserved_gib=round(torch.cuda.max_memory_reserved(device) / 2**30, 2),
                )
    except torch.OutOfMemoryError as error:
        row.update(oom=True, error=str(error).splitlines()[0][:200])
    line = json.dumps(row)
    print(line)
    if args.json:
        with args.json.open("a") as handle:
            handle.write(line + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
