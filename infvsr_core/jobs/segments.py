"""Scenes grouped into the segments a job hands out: independent streams of a useful length.

A segment always starts at a scene cut (or the film's first frame), where a single run resets all its state, so
upscaling it on its own gives exactly that run's frames. Neighbouring short scenes are grouped until a segment
reaches `target` frames; a scene longer than that stays whole (exact) unless `split_long` asks otherwise.

Split scenes (opt-in, not exact): a long scene is cut at chunk boundaries of the single run (its chunks are 9
frames, then 12), and each piece after the first starts `warmup` frames earlier (9 + 12 k, so that its chunks
fall on the single run's boundaries again): those frames rebuild the KV cache and the VAE histories and are then
dropped. The state is rebuilt, not carried over, and the piece takes its first warm-up frame as the DAPE
reference, so its frames differ slightly from the single run's.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from ..schedule import CHUNK_FRAMES, FIRST_CHUNK_FRAMES


@dataclass(frozen=True)
class Segment:
    """Frames [start, end) of the film, upscaled as one stream that reads from `read_from` (a warm-up before
    `start` for a piece of a split scene, else `start`) and is cut at `cuts`."""

    index: int
    start: int
    end: int
    read_from: int
    cuts: tuple[int, ...] = field(default_factory=tuple)
    """Absolute indices of the scene starts inside (start, end): replayed by `KnownCuts`."""
    first_time: float = 0.0
    """Presentation time of frame `start` (the reader's clock): where the segment goes in the joined output."""
    seek: tuple[int, int] | None = None
    """(index, pts) of the keyframe at or before `read_from` that the worker starts decoding at; None: the start."""

    @property
    def frames(self) -> int:
        """Frames the segment contributes to the output."""
        return self.end - self.start

    @property
    def warmup(self) -> int:
        """Frames upscaled before `start` and dropped."""
        return self.start - self.read_from

    @property
    def work(self) -> int:
        """Frames the segment upscales, warm-up included: what longest-first ordering sorts by."""
        return self.end - self.read_from

    def local_cuts(self) -> list[int]:
        """The cuts in the segment's own stream (0 = frame `read_from`)."""
        return [c - self.read_from for c in self.cuts]

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["cuts"] = list(self.cuts)
        data["seek"] = None if self.seek is None else list(self.seek)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Segment:
        seek = data.get("seek")
        return cls(**{**data, "cuts": tuple(data.get("cuts", ())), "seek": None if seek is None else tuple(seek)})


def warmup_length(frames: int) -> int:
    """Warm-up frames rounded up to a whole first chunk plus whole chunks (9 + 12 k), so that the piece's chunks
    fall on the single run's chunk boundaries."""
    if frames <= 0:
        return 0
    return FIRST_CHUNK_FRAMES + CHUNK_FRAMES * math.ceil(max(0, frames - FIRST_CHUNK_FRAMES) / CHUNK_FRAMES)


def plan_segments(
    start: int,
    end: int,
    cuts: Sequence[int],
    times: Sequence[float],
    *,
    target: int,
    split_long: bool = False,
    warmup: int = 0,
) -> list[Segment]:
    """Segments covering frames [start, end): scenes (cut at `cuts`) grouped in order until each holds at least
    `target` frames (the last may hold fewer); with `split_long`, scenes longer than `target` split into pieces.
    `times` are the frames' presentation times (times[0] is frame `start`)."""
    bounds = [start, *sorted(c for c in set(cuts) if start < c < end), end]
    scenes = list(zip(bounds[:-1], bounds[1:], strict=True))
    pieces: list[tuple[int, int, int, tuple[int, ...]]] = []  # (read_from, start, end, cuts inside)
    group: list[tuple[int, int]] = []

    def close_group() -> None:
        if group:
            inside = tuple(s for s, _ in group[1:])
            pieces.append((group[0][0], group[0][0], group[-1][1], inside))
            group.clear()

    for first, last in scenes:
        if split_long and last - first > target:
            close_group()
            pieces.extend((r, s, e, ()) for r, s, e in split_scene(first, last, target, warmup))
            continue
        group.append((first, last))
        if group[-1][1] - group[0][0] >= target:
            close_group()
    close_group()
    return [Segment(i, s, e, r, inside, float(times[s - start])) for i, (r, s, e, inside) in enumerate(pieces)]


def split_scene(first: int, last: int, target: int, warmup: int) -> list[tuple[int, int, int]]:
    """A scene [first, last) cut into about `target`-frame pieces at the single run's chunk boundaries
    (first + 9 + 12 j), as (read_from, start, end); every piece but the first reads `warmup` frames earlier
    (rounded up to 9 + 12 k, and never before the scene's first frame: a piece that would reach it is exact)."""
    length = last - first
    count = math.ceil(length / target)
    splits: list[int] = []
    for k in range(1, count):
        wanted = first + round(k * length / count)
        j = max(0, round((wanted - first - FIRST_CHUNK_FRAMES) / CHUNK_FRAMES))
        point = first + FIRST_CHUNK_FRAMES + CHUNK_FRAMES * j
        if (splits[-1] if splits else first) < point < last:
            splits.append(point)
    lead = warmup_length(warmup)
    edges = [first, *splits, last]
    return [(max(first, s - lead) if s > first else s, s, e) for s, e in zip(edges[:-1], edges[1:], strict=True)]
