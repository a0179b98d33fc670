"""`--make-lr`: low-resolution test inputs from high-resolution footage, by one documented protocol.

The protocol (the "BI" degradation of the VSR test sets): every frame, as decoded to RGB in [0, 1], is reduced by
the scale factor (4) with bicubic interpolation (a = -0.5), antialiased (the kernel widened by the factor, as
PIL's and MATLAB's imresize do), in RGB, without gamma conversion, then clipped to [0, 1]. A frame size that is
not a multiple of the factor is first cut to the largest multiple (right and bottom edges dropped, BasicSR's
"mod crop"), so that the upscaled result has the reference's size less those few pixels (compare with `--crop`).
The frames keep their timestamps; audio is not copied. The file is written by the project's writer: under a
temporary name until it is complete, so an interrupted run leaves nothing.

Then `upscale LR -o OUT` and `evaluate OUT --reference HR` make a two-command benchmark on any clip.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import UsageError

_READ = 8


@dataclass
class LowResolution:
    path: Path
    frames: int
    width: int
    height: int
    cropped: bool  # the HR size was not a multiple of the scale


def downscale(frames: torch.Tensor, scale: int) -> torch.Tensor:
    """The protocol on (T, H, W, 3) float frames: mod-crop, then antialiased bicubic by 1/scale."""
    h, w = (int(frames.shape[1]) // scale) * scale, (int(frames.shape[2]) // scale) * scale
    planar = frames[:, :h, :w].permute(0, 3, 1, 2).to(torch.float32)
    small = F.interpolate(planar, size=(h // scale, w // scale), mode="bicubic", antialias=True, align_corners=False)
    return small.clamp_(0.0, 1.0).permute(0, 2, 3, 1)


def _codec_for(path: Path, codec: str) -> str:
    if codec != "auto":
        return codec
    if path.suffix == "" or path.is_dir():
        return "png"
    return "ffv1" if path.suffix.lower() == ".mkv" else "h264"


def make_lr(
    source: str | os.PathLike[str],
    destination: str | os.PathLike[str],
    *,
    scale: int = 4,
    codec: str = "auto",
    crf: int | None = None,
    frames: int | None = None,
    overwrite: bool = False,
    progress: Callable[[int, int | None], None] | None = None,
) -> LowResolution:
    """Write the low-resolution version of `source` to `destination` (a video file, or a folder for PNG frames).

    `codec` "auto": PNG frames for a path without extension, FFV1 (lossless) for .mkv, else h264; the lossless
    forms keep the protocol exact, h264 adds its own compression.
    """
    from ..io import VideoReader, VideoWriter

    source, destination = Path(source), Path(destination)
    if scale < 2:
        raise UsageError(f"--scale must be >= 2 to make a low-resolution input, got {scale}")
    if destination.resolve() == source.resolve():
        raise UsageError(f"--make-lr {destination} is the input itself: choose another name")
    with VideoReader(source, max_frames=frames) as reader:
        info = reader.info
        width, height = info.width // scale, info.height // scale
        if width < 1 or height < 1:
            raise UsageError(f"{source} is {info.width}x{info.height}: too small to reduce {scale}x")
        chosen = _codec_for(destination, codec)
        if chosen not in ("png", "ffv1") and (width % 2 or height % 2):
            raise UsageError(
                f"the low-resolution size {width}x{height} is odd, which {chosen} video cannot hold (4:2:0 chroma): "
                "write a folder of PNG frames or an .mkv (FFV1, lossless)"
            )
        total = info.frame_count if frames is None or info.frame_count is None else min(frames, info.frame_count)
        done = 0
        timed = not info.is_image_sequence
        with VideoWriter(destination, info.fps, codec=chosen, crf=crf, overwrite=overwrite) as writer:
            for chunk in reader.read_chunks(_READ):
                writer.write(downscale(chunk.frames, scale), chunk.pts_seconds if timed else None)
                done += len(chunk)
                if progress is not None:
                    progress(done, total)
            if done == 0:
                raise UsageError(f"{source} has no frames to reduce")
    return LowResolution(destination, done, width, height, (width * scale, height * scale) != (info.width, info.height))
