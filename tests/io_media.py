"""Shared by the tests of `infvsr_core.io`: the real clips, PSNR, and a clip encoder that sets tags as cameras do."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import torch

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
if not DATA.is_dir():
    DATA = Path("/work/shared/data")
BIKES = DATA / "real_bikes_cuts_640x272.mp4"
DOG = DATA / "real_dog_phone_1080p.mp4"


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = float(torch.mean((a.double() - b.double()) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(1 / mse)


def make_clip(
    path: Path,
    frames: list[list[np.ndarray]] | list[np.ndarray],
    *,
    pix_fmt: str = "yuv420p",
    codec: str = "ffv1",
    options: dict[str, str] | None = None,
    colorspace: int | None = None,
    color_range: int | None = None,
    rate: Fraction = Fraction(25),
    pts: list[int] | None = None,
    time_base: Fraction | None = None,
    rotation: float | None = None,
) -> None:
    """Encode raw planes (or RGB uint8 frames) with PyAV, setting tags, pts and rotation as a camera would."""
    out = av.open(str(path), "w")
    stream = out.add_stream(codec, rate=rate, options=options or {})
    first = frames[0]
    h, w = first[0].shape if isinstance(first, list) else first.shape[:2]
    stream.width, stream.height, stream.pix_fmt = w, h, pix_fmt
    if colorspace is not None:
        stream.codec_context.colorspace = colorspace
    if color_range is not None:
        stream.codec_context.color_range = color_range
    if time_base is not None:
        stream.codec_context.time_base = time_base
        stream.time_base = time_base
    if rotation is not None:
        stream.set_display_rotation(rotation)
    for i, data in enumerate(frames):
        if isinstance(data, list):
            frame = av.VideoFrame(w, h, pix_fmt)
            for plane, array in zip(frame.planes, data, strict=False):
                np.frombuffer(plane, array.dtype).reshape(plane.height, -1)[:, : plane.width] = array
        else:
            frame = av.VideoFrame.from_ndarray(data, format="rgb24").reformat(format=pix_fmt)
        if colorspace is not None:
            frame.colorspace = colorspace
        if color_range is not None:
            frame.color_range = color_range
        frame.pts = pts[i] if pts is not None else i
        if time_base is not None:
            frame.time_base = time_base
        out.mux(stream.encode(frame))
    out.mux(stream.encode())
    out.close()
