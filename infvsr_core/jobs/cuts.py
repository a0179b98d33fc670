"""The first pass of a film job: where the upscale itself would cut, found before any segment runs.

The film is decoded once at its input resolution by the same reader, with the same start and frame count, and
every frame goes through the same `ContentDetector` with the same threshold and minimum scene length that
`SceneStream` runs while upscaling: its cuts are the ones a single run makes. Each segment then replays its
share of them with `KnownCuts` in place of a fresh detector, so no segment has to guess where its scenes start.

The pass also lists the video's keyframes (its packets, not decoded), so that a worker can start decoding at
the keyframe before its segment instead of at the film's first frame (`VideoReader(seek=...)`). They are used
only when every frame's timestamp as decoded matches its packet's: then frame i is the i-th packet in
presentation order, and a keyframe's index is known.
"""

from __future__ import annotations

import bisect
import inspect
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import av

from ..errors import DamagedVideoError, UsageError
from ..io import VideoReader
from ..scene_stream import SceneStream
from ..scenes import ContentDetector

READ_FRAMES = 12
"""Frames decoded at a time: the command line's read size, so the first pass decodes as the upscale does."""
MIN_SCENE_LEN: int = inspect.signature(SceneStream).parameters["min_scene_len"].default
"""SceneStream's minimum scene length, read from it so the first pass can never drift from the upscale."""


@dataclass
class FilmScan:
    """What the first pass learnt: the frames read, the scene cuts, and the timing the writer needs."""

    start: int
    """First input frame read (the job's --start)."""
    frames: int
    """Frames read (up to the damage, for a damaged input)."""
    cuts: list[int]
    """Absolute indices of the frames that start a new scene (never `start` itself)."""
    times: list[float]
    """Presentation time of every frame read (seconds from the video's first frame, the reader's clock)."""
    fps: float
    has_audio: bool
    damage: str | None = None
    """The input's damage message (its frames before the damage are the job's), or None."""
    origin_pts: int | None = None
    """The first frame's pts (stream time base), where a seek's timestamps count from; None: no seeking."""
    keyframes: list[tuple[int, int]] = field(default_factory=list)
    """(frame index, pts) of the keyframes a reader can start at."""

    def seek_before(self, frame: int) -> tuple[int, int] | None:
        """The last keyframe at or before `frame` (past the first frame), as (index, pts); None: read from the start."""
        index = bisect.bisect_right(self.keyframes, (frame, math.inf)) - 1
        if index < 0 or self.keyframes[index][0] == 0:
            return None
        return self.keyframes[index]

    @property
    def end(self) -> int:
        return self.start + self.frames

    def time_of(self, frame: int) -> float:
        return self.times[frame - self.start]

    @property
    def duration(self) -> float:
        """Seconds of video the output holds, as `VideoWriter.duration` counts them (last frame plus its gap)."""
        if len(self.times) < 2:
            return 1.0 / self.fps
        return self.times[-1] - self.times[0] + (self.times[-1] - self.times[-2])


def scan_film(
    path: str | os.PathLike[str],
    *,
    start: int = 0,
    max_frames: int | None = None,
    fps: float | None = None,
    detect_scenes: bool = True,
    threshold: float = 27.0,
    strict: bool = False,
    on_frames: Callable[[int], None] | None = None,
) -> FilmScan:
    """Decode the selected frames once and find the cuts. A damaged input ends the scan where it breaks (the frames
    before are the job's, as in a single run) unless `strict`."""
    detector = ContentDetector(threshold=threshold, min_scene_len=MIN_SCENE_LEN) if detect_scenes else None
    cuts: list[int] = []
    times: list[float] = []
    damage = None
    with VideoReader(path, start=start, max_frames=max_frames, fps=fps) as reader:
        info = reader.info
        try:
            for chunk in reader.read_chunks(READ_FRAMES):
                times.extend(chunk.pts_seconds)
                if detector is not None:
                    for frame in chunk.frames:
                        cuts.extend(start + index for index in detector.push(frame))
                if on_frames is not None:
                    on_frames(len(times))
        except DamagedVideoError as e:
            if strict or not times:
                raise
            damage = str(e)
    if detector is not None:
        cuts.extend(start + index for index in detector.finish())
    if not times:
        raise UsageError(f"{Path(path)}: no frames to upscale (start {start} is past the end?)")
    cuts = sorted(c for c in set(cuts) if start < c < start + len(times))
    scan = FilmScan(start, len(times), cuts, times, float(info.fps), bool(info.has_audio), damage)
    if not info.is_image_sequence:  # an image folder is read from the frame asked for anyway
        scan.origin_pts, scan.keyframes = _keyframes(Path(path), start, times)
    return scan


def _keyframes(path: Path, start: int, times: list[float]) -> tuple[int | None, list[tuple[int, int]]]:
    """The first frame's pts and the keyframes (index, pts), from the packets alone; (None, []) unless every frame
    read has the timestamp its packet gives it (then, and only then, indices map to packets exactly)."""
    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            if not stream.time_base:
                return None, []
            tb = Fraction(stream.time_base)
            stamps, keys = [], []
            for packet in container.demux(stream):
                if packet.pts is None:
                    if packet.size:
                        return None, []  # a packet without a timestamp: frames cannot be found by pts
                    continue
                stamps.append(packet.pts)
                if packet.is_keyframe:
                    keys.append(packet.pts)
    except av.error.FFmpegError:
        return None, []
    order = sorted(stamps)
    if len(set(order)) != len(order) or len(order) < start + len(times):
        return None, []
    origin = float(order[0] * tb)
    if any(float(order[start + i] * tb) - origin != t for i, t in enumerate(times)):
        return None, []  # the reader retimed or skipped a frame: indices would not match packets
    rank = {pts: i for i, pts in enumerate(order)}
    return order[0], sorted((rank[pts], pts) for pts in keys)


class KnownCuts:
    """A detector that replays cuts already found: `SceneStream`'s `detector` for a segment of the film.

    `cuts` are indices in the segment's own stream (0 = its first frame). Each is reported as its frame arrives,
    and every frame pushed is final at once (nothing is held back for a detector that might still decide)."""

    def __init__(self, cuts: Sequence[int]) -> None:
        self.cuts = frozenset(int(c) for c in cuts)
        self.frames_seen = 0

    @property
    def event_buffer_length(self) -> int:
        return 0

    @property
    def safe_count(self) -> int:
        return self.frames_seen

    def push(self, frame: Any) -> list[int]:
        index = self.frames_seen
        self.frames_seen += 1
        return [index] if index in self.cuts and index > 0 else []

    def finish(self) -> list[int]:
        return []
