"""The command line end to end on the GPU (read, upscale, encode, write), with and without the background writer.

    python bench/bench_cli.py --models /tmp/m --size 720p --frames 96

Writes the four full-size files in the published formats (random weights) into --models when they are not
there, and a synthetic input clip (h264) of --frames frames; runs `python -m infvsr_core upscale` in this
process four times on it: once to warm up (torch.compile, cuDNN's search), then as the command runs (the video
encoded on a worker thread, `infvsr_core.io.BackgroundWriter`, and deferred pushes), without deferred pushes (each push
waits for its chunk), and with the video also encoded between chunks (the writer called directly). The command
prints the frames per second of its loop (loading excluded); this script adds each run's wall time.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from infvsr_core import cli  # noqa: E402
from infvsr_core import io as video_io  # noqa: E402
from infvsr_core.fixtures import write_fixtures  # noqa: E402
from infvsr_core.scene_stream import SceneStream  # noqa: E402

INPUTS = {"480p": (120, 208), "720p": (180, 320), "1080p": (270, 480)}


def synthetic_input(path: Path, frames: int, height: int, width: int) -> None:
    """A moving smooth pattern with some grain, encoded as h264 at 24 fps."""
    g = torch.Generator().manual_seed(0)
    base = torch.rand(1, 3, height // 8 + 2, width // 8 + 2, generator=g)
    big = torch.nn.functional.interpolate(base, size=(height + 16, width + 16), mode="bicubic").clamp(0, 1)
    clip = torch.stack([big[0, :, i % 16 : i % 16 + height, i % 16 : i % 16 + width] for i in range(frames)])
    clip = (clip.permute(0, 2, 3, 1) + 0.03 * torch.rand(frames, height, width, 3, generator=g)).clamp(0, 1)
    with video_io.VideoWriter(path, 24, overwrite=True) as writer:
        writer.write(clip)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=Path, required=True)
    parser.add_argument("--size", default="720p", choices=sorted(INPUTS))
    parser.add_argument("--frames", type=int, default=96)
    parser.add_argument("--work", type=Path, default=Path("/tmp/infvsr_cli_bench"))
    parser.add_argument("--tiny", action="store_true", help="tiny networks (a CPU smoke run of this script)")
    parser.add_argument("cli_args", nargs="*", help="more arguments for the command line (after --)")
    args = parser.parse_args()
    if not (args.models / "InfVSR.ckpt").exists():
        started = time.perf_counter()
        write_fixtures(args.models, tiny=args.tiny)
        print(f"wrote the full-size files in {time.perf_counter() - started:.1f} s")
    args.work.mkdir(parents=True, exist_ok=True)
    source = args.work / f"input_{args.size}.mp4"
    synthetic_input(source, args.frames, *INPUTS[args.size])
    background, push = video_io.BackgroundWriter, SceneStream.push
    results = {}
    for label in ("warm-up", "background writer", "without deferred pushes", "writer between chunks"):
        video_io.BackgroundWriter = (lambda writer: writer) if label == "writer between chunks" else background
        # Deferred pushes (a chunk's frames come back while the next one computes) off: each push waits its chunk.
        SceneStream.push = push if label in ("warm-up", "background writer") else _undeferred(push)
        out = args.work / f"out_{args.size}.mp4"
        started = time.perf_counter()
        print(f"== {label} (the command's own line: fps of its read-upscale-write loop, loading excluded)")
        code = cli.main(["upscale", str(source), "-o", str(out), "--models", str(args.models), "--overwrite",
                         *args.cli_args])  # fmt: skip
        seconds = time.perf_counter() - started
        assert code == 0 and video_io.probe(out).frame_count in (None, args.frames), (code, out)
        results[label] = seconds
        print(f"{label}: {seconds:.2f} s with loading", flush=True)
    video_io.BackgroundWriter, SceneStream.push = background, push
    return 0


def _undeferred(push):
    def undeferred(self, frames, defer=False):
        return push(self, frames, defer=False)

    return undeferred


if __name__ == "__main__":
    raise SystemExit(main())
