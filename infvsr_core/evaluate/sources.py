"""The two videos an evaluation compares, streamed side by side in chunks, after checking that they correspond.

A source is a video file or a folder of numbered frames (read by the same :class:`~infvsr_core.io.VideoReader` as
`upscale`), or frames already in memory (the ComfyUI node's IMAGE batches). :func:`check_pair` refuses pairs that
cannot be compared frame by frame, with one line naming both files and the option that would make them comparable;
:func:`paired_chunks` then yields equal chunks of both and notices a length mismatch that no header announced.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F

from ..errors import UsageError

_FPS_TOLERANCE = 1e-3  # relative: 24000/1001 and 23.976 are one rate


@dataclass
class SourceInfo:
    """What the pairing checks need to know about a source."""

    name: str
    width: int
    height: int
    fps: Fraction | None  # None when frames carry no timing (an IMAGE batch; a frame folder's rate is a default)
    frame_count: int | None  # None when the container does not say


class FrameSource(Protocol):
    info: SourceInfo

    def chunks(self, size: int) -> Iterator[torch.Tensor]: ...

    def close(self) -> None: ...


class VideoSource:
    """A video file or a frame folder, decoded chunk by chunk: never the whole video in memory."""

    def __init__(self, path: str | os.PathLike[str], max_frames: int | None = None) -> None:
        from ..io import VideoReader

        self.path = Path(path)
        self._reader = VideoReader(self.path, max_frames=max_frames)
        info = self._reader.info
        count = info.frame_count
        if count is not None and max_frames is not None:
            count = min(count, max_frames)
        self.info = SourceInfo(
            name=str(self.path),
            width=info.width,
            height=info.height,
            fps=None if info.is_image_sequence else Fraction(info.fps),
            frame_count=count,
        )

    def chunks(self, size: int) -> Iterator[torch.Tensor]:
        for chunk in self._reader.read_chunks(size):
            yield chunk.frames

    def close(self) -> None:
        self._reader.close()


class TensorSource:
    """Frames already in memory, (T, H, W, 3) float in [0, 1]."""

    def __init__(self, frames: torch.Tensor, name: str = "frames", fps: float | None = None) -> None:
        if frames.ndim != 4 or frames.shape[-1] != 3:
            raise UsageError(f"{name}: expected frames of shape (T, H, W, 3), got {tuple(frames.shape)}")
        if frames.shape[0] == 0:
            raise UsageError(f"{name} holds no frames")
        self.frames = frames
        self.info = SourceInfo(
            name, int(frames.shape[2]), int(frames.shape[1]), Fraction(fps) if fps else None, int(frames.shape[0])
        )

    def chunks(self, size: int) -> Iterator[torch.Tensor]:
        for start in range(0, int(self.frames.shape[0]), size):
            yield self.frames[start : start + size].to(torch.float32)

    def close(self) -> None:
        pass


def open_source(source: str | os.PathLike[str] | torch.Tensor | FrameSource, max_frames: int | None = None):
    """A FrameSource for a path, a tensor, or a source already made."""
    if isinstance(source, torch.Tensor):
        frames = source if max_frames is None else source[:max_frames]
        return TensorSource(frames)
    if isinstance(source, (str, os.PathLike)):
        return VideoSource(source, max_frames)
    return source


@dataclass
class Pairing:
    """How the output is brought to the reference's frames: the checks' outcome, and what they changed."""

    width: int  # the compared frame size
    height: int
    resize: bool = False  # the output is resampled to the reference's size
    crop: bool = False  # both are cut to the common top-left area
    align: bool = False  # frames are paired by index over the shorter video
    notes: list[str] = field(default_factory=list)


def _same_rate(a: Fraction, b: Fraction) -> bool:
    return abs(float(a) / float(b) - 1.0) <= _FPS_TOLERANCE


def check_pair(
    output: SourceInfo, reference: SourceInfo, *, resize: bool = False, crop: bool = False, align: bool = False
) -> Pairing:
    """Refuse two videos that do not correspond (size, frame count, frame rate) unless an option says how."""
    if resize and crop:
        raise UsageError("--resize and --crop are two answers to one question: choose one")
    notes: list[str] = []
    size_out, size_ref = (output.width, output.height), (reference.width, reference.height)
    width, height = size_ref
    if size_out != size_ref:
        if resize:
            notes.append(
                f"output resampled from {size_out[0]}x{size_out[1]} to the reference's {width}x{height} "
                "(bicubic, antialiased)"
            )
        elif crop:
            width, height = min(size_out[0], size_ref[0]), min(size_out[1], size_ref[1])
            notes.append(f"both compared over their common top-left {width}x{height}")
        else:
            hint = ""
            if size_out[0] >= 2 * size_ref[0] and size_out[1] >= 2 * size_ref[1]:
                hint = "; the reference looks like the low-resolution input: give the high-resolution original"
            elif 2 * size_out[0] <= size_ref[0] and 2 * size_out[1] <= size_ref[1]:
                hint = "; the output looks like the low-resolution input: evaluate the upscaled result"
            raise UsageError(
                f"frame sizes differ: output {output.name} is {size_out[0]}x{size_out[1]}, reference "
                f"{reference.name} is {size_ref[0]}x{size_ref[1]} (--resize resamples the output to the reference's "
                f"size, --crop compares the common top-left area){hint}"
            )
    if output.fps is not None and reference.fps is not None and not _same_rate(output.fps, reference.fps):
        if not align:
            raise UsageError(
                f"frame rates differ: output {output.name} is {float(output.fps):.3f} fps, reference {reference.name} "
                f"{float(reference.fps):.3f} fps, so frame k of one is not frame k of the other "
                "(--align pairs frames by index anyway)"
            )
        notes.append(f"frame rates differ ({float(output.fps):.3f} / {float(reference.fps):.3f} fps): paired by index")
    counts = (output.frame_count, reference.frame_count)
    if None not in counts and counts[0] != counts[1]:
        if not align:
            raise UsageError(
                f"frame counts differ: output {output.name} has {counts[0]} frames, reference {reference.name} "
                f"{counts[1]} (--align compares the first {min(counts)}, --frames N the first N)"
            )
        notes.append(f"frame counts differ ({counts[0]} / {counts[1]}): the first {min(counts)} compared")
    return Pairing(width, height, resize and size_out != size_ref, crop and size_out != size_ref, align, notes)


def _fit(frames: torch.Tensor, pairing: Pairing, is_output: bool) -> torch.Tensor:
    """A chunk brought to the compared size: resampled (output only) or cropped."""
    h, w = int(frames.shape[1]), int(frames.shape[2])
    if (w, h) == (pairing.width, pairing.height):
        return frames
    if pairing.crop:
        return frames[:, : pairing.height, : pairing.width]
    if pairing.resize and is_output:
        planar = frames.permute(0, 3, 1, 2)
        resized = F.interpolate(planar, size=(pairing.height, pairing.width), mode="bicubic", antialias=True)
        return resized.clamp_(0.0, 1.0).permute(0, 2, 3, 1)
    return frames


def paired_chunks(
    output: FrameSource, reference: FrameSource | None, pairing: Pairing | None, size: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    """Equal chunks of both videos (the reference None when there is none), fitted to the compared size.

    A video that ends before the other is an error unless the pairing aligns them; that is only noticed here when
    a header did not give the frame count.
    """
    out_chunks = output.chunks(size)
    if reference is None:
        for chunk in out_chunks:
            yield chunk, None
        return
    assert pairing is not None
    ref_chunks = reference.chunks(size)
    out_buffer: torch.Tensor | None = None
    ref_buffer: torch.Tensor | None = None
    out_done = ref_done = False
    out_seen = ref_seen = 0
    while True:
        # Both readers deliver `size` frames per chunk until their last; buffers keep it exact anyway.
        while not out_done and (out_buffer is None or out_buffer.shape[0] < size):
            piece = next(out_chunks, None)
            if piece is None:
                out_done = True
            else:
                out_seen += int(piece.shape[0])
                out_buffer = piece if out_buffer is None else torch.cat([out_buffer, piece])
        while not ref_done and (ref_buffer is None or ref_buffer.shape[0] < size):
            piece = next(ref_chunks, None)
            if piece is None:
                ref_done = True
            else:
                ref_seen += int(piece.shape[0])
                ref_buffer = piece if ref_buffer is None else torch.cat([ref_buffer, piece])
        n_out = 0 if out_buffer is None else int(out_buffer.shape[0])
        n_ref = 0 if ref_buffer is None else int(ref_buffer.shape[0])
        take = min(size, n_out, n_ref)
        if take == 0:
            if n_out or n_ref:
                if not pairing.align:
                    longer, shorter = (output, reference) if n_out else (reference, output)
                    ended = out_seen if shorter is output else ref_seen
                    raise UsageError(
                        f"frame counts differ: {shorter.info.name} ends after {ended} frames, {longer.info.name} has "
                        f"more (--align compares the first {ended})"
                    )
                pairing.notes.append(f"the longer video was cut to the shorter one's {min(out_seen, ref_seen)} frames")
            return
        assert out_buffer is not None and ref_buffer is not None
        yield _fit(out_buffer[:take], pairing, True), _fit(ref_buffer[:take], pairing, False)
        out_buffer, ref_buffer = out_buffer[take:], ref_buffer[take:]
