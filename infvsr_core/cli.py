"""Command line: upscale a whole film, streaming, in constant memory.

    python -m infvsr_core upscale INPUT -o OUTPUT [options]

Frames are decoded, upscaled and encoded chunk by chunk; the output appears
under its final name only when complete (Ctrl-C keeps a valid file of what was
finished). Any error ends with one line on stderr and a non-zero exit code.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import deque
from pathlib import Path

EXIT_ERROR = 1
EXIT_INTERRUPTED = 130
READ_CHUNK = 12
CODECS = ("auto", "h264", "h265", "prores", "ffv1", "png")


def build_parser() -> argparse.ArgumentParser:
    from .attention import backend_names
    from .loader import default_models_dir

    parser = argparse.ArgumentParser(
        prog="python -m infvsr_core", description="InfVSR streaming video super-resolution."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    up = commands.add_parser(
        "upscale",
        help="upscale a video file or a folder of frames",
        description="Upscale INPUT (a video file, or a folder of numbered PNG/JPEG frames) into OUTPUT "
        "(a video file, or a folder that receives frame_000001.png, ...). Audio is copied when the input has any.",
    )
    up.add_argument("input", type=Path, help="video file (mp4, mkv, mov, webm, avi, mpeg, ...) or frame folder")
    up.add_argument("-o", "--output", type=Path, required=True, help="output video file, or folder for --codec png")
    up.add_argument(
        "--models",
        type=Path,
        default=None,
        help=f"folder with InfVSR.ckpt, Wan2.1_VAE.pth, ram_swin_large_14m.pth, DAPE.pth "
        f"(default: $INFVSR_MODELS, else models/infvsr of the ComfyUI tree this is installed in, "
        f"else ./models/infvsr, else ~/.cache/infvsr; now: {default_models_dir()})",
    )
    up.add_argument("--scale", type=int, default=4, help="upscaling factor (default 4, as trained)")
    up.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), help="default: bf16 on cuda, fp32 on cpu")
    up.add_argument("--device", help="cuda, cuda:1, cpu (default: cuda when available)")
    up.add_argument(
        "--attention",
        choices=backend_names(),
        default="auto",
        help="the DiT's attention kernel: auto = FlashAttention-3 where installed (Hopper, bf16), else PyTorch's "
        "SDPA; flash3 (listed where installed) = FlashAttention-3 always; math = plain float32 (slow, a reference)",
    )
    up.add_argument(
        "--offload",
        choices=("none", "histories", "state", "all"),
        default="none",
        help="keep stream state in host memory between uses, same output, less GPU memory (H100 with "
        "FlashAttention-3, 720p: none 15.3 GiB 25.8 fps; state 9.5 GiB 20.1 fps; all 6.8 GiB 17.8 fps; 1080p: none "
        "37.6 GiB 8.4 fps, state 14.4 GiB 8.0 fps; 4K: state 15.7 GiB 1.2 fps + ~93 GiB host). On a small card, set "
        "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True",
    )
    up.add_argument(
        "--spill-dir",
        type=Path,
        help="with --offload histories/state/all: folder for the VAE histories that do not fit --host-memory "
        "(4K tiles need ~93 GiB of host memory otherwise; same output, slower by the disk's time)",
    )
    up.add_argument(
        "--host-memory", type=float, metavar="GIB", help="host memory for offloaded VAE histories (with --spill-dir)"
    )
    up.add_argument(
        "--seams",
        choices=("release", "smooth"),
        default="release",
        help="how tiled frames (taller than 1024) are blended: release = the authors' tiling (default); smooth = "
        "wider overlaps, no visible seams, ~1.5x the VAE time and memory",
    )
    up.add_argument("--codec", choices=CODECS, default="auto", help="default: png for a folder output, else h264")
    up.add_argument("--crf", type=int, help="quality for h264/h265 (lower is better; default 18 / 20)")
    up.add_argument("--pix-fmt", help="override the pixel format (e.g. yuv444p for h264)")
    up.add_argument("--prores-profile", choices=("hq", "4444"), default="hq", help="ProRes 422 HQ or 4444")
    up.add_argument("--no-scene-detect", action="store_true", help="one scene: never reset caches or the reference")
    up.add_argument("--scene-threshold", type=float, default=27.0, help="content detector threshold (default 27)")
    up.add_argument("--start", type=int, default=0, help="first input frame to upscale (default 0)")
    up.add_argument("--frames", type=int, help="upscale at most this many frames")
    up.add_argument("--fps", type=float, help="frame rate of a frame-folder input (default 24)")
    up.add_argument("--no-audio", action="store_true", help="do not copy the input's audio")
    up.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")
    up.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return upscale_command(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:  # one clear line, whatever went wrong
        name = type(exc).__name__
        print(
            f"error: {exc}" if name in ("VideoError", "WeightFileError") else f"error: {name}: {exc}", file=sys.stderr
        )
        return EXIT_ERROR


def upscale_command(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .loader import load_pipeline
    from .stream import SceneStream
    from .video_io import BackgroundWriter, VideoReader, VideoWriter

    if args.scale < 1:
        raise ValueError(f"--scale must be >= 1, got {args.scale}")
    if args.start < 0 or (args.frames is not None and args.frames < 1):
        raise ValueError("--start must be >= 0 and --frames >= 1")
    codec = args.codec
    if codec == "auto":
        codec = "png" if args.output.suffix == "" or args.output.is_dir() else "h264"

    reader = VideoReader(args.input, start=args.start, max_frames=args.frames, fps=args.fps)
    with reader:
        info = reader.info
        total = info.frame_count
        if total is not None:
            total = max(0, total - args.start)
            total = min(total, args.frames) if args.frames else total
        # Check the output before loading several GB of weights.
        if args.output.exists() and not args.overwrite:
            raise ValueError(f"output {args.output} already exists (use --overwrite to replace it)")
        if (args.spill_dir is None) != (args.host_memory is None):
            raise ValueError("--spill-dir and --host-memory go together")
        if args.spill_dir is not None and args.offload == "none":
            raise ValueError("--spill-dir needs --offload histories, state or all (with 'none' nothing is offloaded)")
        pipe = load_pipeline(
            args.models,
            device=args.device,
            dtype=args.dtype,
            offload=args.offload,
            vae_seams=args.seams,
            spill_dir=args.spill_dir,
            host_memory_gib=args.host_memory,
        )
        pipe.dit.attention_backend = args.attention
        stream = SceneStream(
            pipe, scale=args.scale, detect_scenes=not args.no_scene_detect, threshold=args.scene_threshold
        )
        chunks = reader.read_chunks(READ_CHUNK)
        first = next(chunks, None)
        if first is None:
            raise ValueError(f"{args.input}: no frames to upscale (start {args.start} is past the end?)")
        audio = info.has_audio and not args.no_audio and codec != "png" and not info.is_image_sequence
        # Encoding runs on a worker thread, under the next chunk's GPU work.
        writer = BackgroundWriter(
            VideoWriter(
                args.output,
                info.fps,
                codec=codec,
                crf=args.crf,
                pix_fmt=args.pix_fmt,
                prores_profile=args.prores_profile,
                audio_from=args.input if audio else None,
                audio_start=first.pts_seconds[0] if audio else 0.0,
                overwrite=args.overwrite,
            )
        )
        timestamps: deque[float] = deque()
        bar = tqdm(total=total, unit="frame", disable=args.quiet, dynamic_ncols=True, desc="upscaling")
        started = time.perf_counter()
        try:
            for chunk in _chain(first, chunks):
                timestamps.extend(chunk.pts_seconds)
                # Deferred: a chunk's frames come back while the next one computes (the GPU never waits on us).
                _write(writer, stream.push(chunk.frames, defer=True), timestamps, bar)
            _write(writer, stream.close(), timestamps, bar)
        except KeyboardInterrupt:
            try:  # the chunk that completed before Ctrl-C but was not handed out yet
                _write(writer, stream.collect(), timestamps, bar)
            except Exception:  # noqa: BLE001 - keep what is written whatever this fails on
                pass
            bar.close()
            kept = writer.finalize_partial()
            where = f"kept the {writer.frames_written} finished frames in {kept}" if kept else "nothing was written"
            print(f"interrupted: {where}", file=sys.stderr)
            return EXIT_INTERRUPTED
        except BaseException:
            bar.close()
            writer.abort()
            raise
        bar.close()
        path = writer.close()
    seconds = time.perf_counter() - started
    if not args.quiet:
        print(
            f"wrote {path}: {writer.frames_written} frames, {stream.session.scenes} scene(s), "
            f"{writer.frames_written / max(seconds, 1e-9):.2f} fps",
            file=sys.stderr,
        )
    return 0


def _chain(first, rest):
    yield first
    yield from rest


def _write(writer, frames, timestamps: deque[float], bar) -> None:
    count = int(frames.shape[0])
    if not count:
        return
    stamps = [timestamps.popleft() for _ in range(count)]
    writer.write(frames, timestamps=stamps)  # the input's own timing: variable frame rate survives
    bar.update(count)
