"""The film loop: reader -> scene stream -> pipeline -> writer, one chunk at a time, in flat memory.

The command line and the file node both upscale a whole video this way, so the
loop lives here once: what counts as progress, when the user may stop it, what
is kept when it stops early (always the finished frames, as a valid file) and
what a damaged input does (the frames before the damage are finished and kept).
Front ends only say what to read, where to write and how to report.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from .errors import DamagedVideoError, UsageError
from .memory.plan import check_fits
from .pipeline import InfVSRPipeline
from .scene_stream import SceneStream
from .schedule import CHUNK_FRAMES


class FrameWriter(Protocol):
    """What the loop writes to: the core's BackgroundWriter, or the nodes' VideoSink."""

    @property
    def frames_written(self) -> int: ...

    def write(self, frames: torch.Tensor, timestamps: list[float] | None = None) -> None: ...

    def close(self) -> Path: ...

    def finalize_partial(self) -> Path | None: ...

    def abort(self) -> None: ...


@dataclass
class FilmProgress:
    """Reported after every finished core chunk; a callback may raise to stop the film (Cancel)."""

    frames_done: int
    frames_total: int | None
    chunks_done: int
    seconds: float

    @property
    def fps(self) -> float:
        return self.frames_done / self.seconds if self.seconds > 0 and self.frames_done else 0.0

    @property
    def eta(self) -> float | None:
        if self.frames_total is None or not self.fps:
            return None
        return max(0.0, (self.frames_total - self.frames_done) / self.fps)


@dataclass
class FilmResult:
    """A finished film: where it went, and whether the input ended early (the frames before were kept)."""

    path: Path
    frames: int
    scenes: int
    seconds: float
    damage: DamagedVideoError | None = None


def frames_to_read(frame_count: int | None, start: int, max_frames: int | None) -> int | None:
    """How many frames a run over a video of `frame_count` frames reads from `start` (None: unknown length)."""
    if frame_count is None:
        return None
    left = max(0, frame_count - start)
    return min(left, max_frames) if max_frames else left


class Film:
    """One run of the film loop; after it ends (even by an exception) `kept` says what was saved."""

    def __init__(
        self,
        pipe: InfVSRPipeline,
        reader: Any,
        open_writer: Callable[[Any], FrameWriter],
        *,
        scale: int = 4,
        detect_scenes: bool = True,
        scene_threshold: float = 27.0,
        prompt: torch.Tensor | None = None,
        read_frames: int = CHUNK_FRAMES,
        strict: bool = False,
        on_progress: Callable[[FilmProgress], None] | None = None,
        detector: Any | None = None,
    ) -> None:
        """`detector`: the scene-cut detector to use instead of a fresh one (`SceneStream`'s), e.g. a film job's
        segment replaying the cuts of its first pass."""
        self.pipe, self.reader, self.open_writer = pipe, reader, open_writer
        self.scale, self.read_frames, self.strict = scale, read_frames, strict
        self.on_progress = on_progress
        session = pipe.new_session(scale, prompt=prompt)
        self.stream = SceneStream(
            pipe, session, detect_scenes=detect_scenes, threshold=scene_threshold, detector=detector
        )
        self.writer: FrameWriter | None = None
        self.kept: Path | None = None
        info = reader.info
        check_fits(pipe, info.height, info.width, scale)  # before any work: a size that cannot fit says so now
        self.frames_total = frames_to_read(info.frame_count, reader.start, reader.max_frames)
        self._timestamps: deque[float] = deque()
        self._chunks = 0
        self._started = time.perf_counter()

    @property
    def frames_written(self) -> int:
        return 0 if self.writer is None else self.writer.frames_written

    def run(self) -> FilmResult:
        """Upscale the whole input. On any exception (Ctrl-C, Cancel, an error) the finished frames are kept as a
        valid file (`self.kept`) before the exception goes on; a damaged input is finished and reported instead."""
        self._started = time.perf_counter()
        damage = None
        try:
            try:
                for chunk in self.reader.read_chunks(self.read_frames):
                    self._push(chunk)
            except DamagedVideoError as e:
                if self.strict or self.writer is None:
                    raise
                damage = e  # every frame decoded before the damage is upscaled and kept
            if self.writer is None:
                where = f"{self.reader.path}: no frames to upscale"
                raise UsageError(f"{where} (start {self.reader.start} is past the end?)")
            self._write(self.stream.close())
            path = self.writer.close()
        except BaseException as e:
            self._keep_finished(strict_damage=isinstance(e, DamagedVideoError))
            raise
        self.kept = path
        seconds = time.perf_counter() - self._started
        return FilmResult(path, self.writer.frames_written, self.stream.session.scenes, seconds, damage)

    def _push(self, chunk: Any) -> None:
        if self.writer is None:
            self.writer = self.open_writer(chunk)
        self._timestamps.extend(chunk.pts_seconds)
        frames = chunk.frames
        for begin in range(0, int(frames.shape[0]), CHUNK_FRAMES):  # a stop request is honoured every core chunk
            # Deferred: a chunk's frames come back while the next one computes (close() has the rest).
            self._write(self.stream.push(frames[begin : begin + CHUNK_FRAMES], defer=True))
            self._chunks += 1

    def _write(self, frames: torch.Tensor) -> None:
        count = int(frames.shape[0])
        if not count:
            return
        assert self.writer is not None
        stamps = [self._timestamps.popleft() for _ in range(count)]
        self.writer.write(frames, timestamps=stamps)  # the input's own timing: variable frame rate survives
        if self.on_progress is not None:
            seconds = time.perf_counter() - self._started
            self.on_progress(FilmProgress(self.writer.frames_written, self.frames_total, self._chunks, seconds))

    def _keep_finished(self, strict_damage: bool) -> None:
        """After an exception: write the chunk a deferred push held back, then finish the file with what it has
        (nothing at all for a damaged input under `strict`)."""
        if self.writer is None:
            return
        if strict_damage:
            self.writer.abort()
            return
        on_progress, self.on_progress = self.on_progress, None  # a Cancel check must not stop the saving itself
        try:
            self._write(self.stream.collect())
        except Exception:  # noqa: BLE001 - the frames already written are kept whatever this fails on
            pass
        finally:
            self.on_progress = on_progress
        self.kept = self.writer.finalize_partial()
