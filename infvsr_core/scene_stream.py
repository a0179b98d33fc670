"""Scene-aware streaming: the release's online scene handling over a pipeline session.

Frames go through an online content detector as they arrive; frames are held
back while the detector may still place a cut among them, and chunks never
straddle a cut. At a cut the scene's last chunk is padded and every cache is
reset (`InfVSRPipeline.cut`). Within a scene, the DAPE reference is refreshed
(caches kept) when at least 15 frames have passed since it was taken and a
fresh detector sees a cut between it and the chunk's first frame (SPEC 3, 4).
"""

from __future__ import annotations

from collections import deque

import torch

from .pipeline import InfVSRPipeline, check_frame_dtype, check_frame_values
from .scenes import ContentDetector, reference_changed
from .session import InfVSRSession

REFERENCE_MIN_AGE = 15
"""Frames that must pass after the reference frame before it may be refreshed."""


class SceneStream:
    """Feed frames in any batch sizes; get upscaled frames back in order, cut-aware.

    With `detect_scenes=False` this is exactly `pipeline.push`/`close` over one
    scene (the release's `--no_scene_detection`). `detector` replaces the fresh
    `ContentDetector` (anything with its `push`, `finish` and `safe_count`): a film job
    replays there the cuts its first pass found (`jobs.cuts.KnownCuts`), so a segment
    of the film is cut exactly where one run over the whole film cuts it.
    """

    def __init__(
        self,
        pipeline: InfVSRPipeline,
        session: InfVSRSession | None = None,
        *,
        scale: int = 4,
        detect_scenes: bool = True,
        threshold: float = 27.0,
        reference_threshold: float = 27.0,
        min_scene_len: int = 15,
        detector: ContentDetector | None = None,
    ) -> None:
        self.pipeline = pipeline
        self.session = session if session is not None else pipeline.new_session(scale)
        self.detect_scenes = detect_scenes
        self.reference_threshold = reference_threshold
        if detect_scenes and detector is None:
            detector = ContentDetector(threshold=threshold, min_scene_len=min_scene_len)
        self.detector = detector if detect_scenes else None
        self._held: deque[torch.Tensor] = deque()  # frames not yet given to the session
        self._cuts: deque[int] = deque()  # detected scene starts not yet reached
        self._received = 0  # frames received so far
        self._start = 0  # stream index of the first held frame
        self._reference: torch.Tensor | None = None
        self._reference_index = 0
        self._size: tuple[int, int] | None = None
        self.cuts_seen: list[int] = []
        self.chunks: list[tuple[int, int, str]] = []
        """(first frame index, frame count, "scene" | "refresh" | "") of every chunk handed over."""

    def push(self, frames: torch.Tensor, defer: bool = False) -> torch.Tensor:
        """Add low-resolution frames (T, H, W, 3) in [0, 1]; returns the frames finished so far.

        `defer`: as for `InfVSRPipeline.push`, the last chunk computed is returned by the next call (or
        `collect`), its frames coming to host memory while that call's chunk computes."""
        if frames.ndim == 3:
            frames = frames.unsqueeze(0)
        # Refused here, not when the held frames reach the pipeline: by then earlier frames were taken from the queue.
        check_frame_dtype(frames)
        check_frame_values(frames)
        if self._size is None and frames.ndim == 4 and frames.shape[0]:
            self._size = (int(frames.shape[1]), int(frames.shape[2]))
        if not self.detect_scenes:
            return self.pipeline.push(self.session, frames, defer=defer)
        outputs = []
        for frame in frames:
            self._held.append(frame)
            assert self.detector is not None
            found = self.detector.push(frame)
            self._cuts.extend(found)
            self.cuts_seen.extend(found)
            self._received += 1
            outputs.extend(self._drain(self.detector.safe_count))
        if not defer:
            outputs.append(self.pipeline.collect(self.session))
        return self._cat(outputs)

    def collect(self) -> torch.Tensor:
        """The frames a deferred push held back (`InfVSRPipeline.collect`)."""
        return self._cat([self.pipeline.collect(self.session)])

    def close(self) -> torch.Tensor:
        """End of stream: drain what is held and upscale the padded final chunk."""
        outputs = []
        if self.detect_scenes:
            assert self.detector is not None
            found = self.detector.finish()
            self._cuts.extend(found)
            self.cuts_seen.extend(found)
            outputs.extend(self._drain(self._received, final=True))
        outputs.append(self.pipeline.close(self.session))
        return self._cat(outputs)

    def _drain(self, limit: int, final: bool = False) -> list[torch.Tensor]:
        outputs = []
        pipe, session = self.pipeline, self.session
        while self._held and self._start < limit:
            if self._cuts and self._cuts[0] <= self._start:
                self._cuts.popleft()
                if self._start > 0:
                    outputs.append(pipe.cut(session))
            boundary = self._cuts[0] if self._cuts else None
            stop = min(limit, boundary) if boundary is not None else limit
            size = session.next_chunk_length
            available = stop - self._start
            if available < size and not (final or boundary == stop):
                break
            count = min(size, available)
            batch = torch.stack([self._held.popleft() for _ in range(count)])
            event = ""
            if session.scene is None:
                self._reference, self._reference_index = batch[0], self._start
                event = "scene"
            elif (
                self._start - self._reference_index >= REFERENCE_MIN_AGE
                and not session.prompt_fixed
                and reference_changed(self._reference, batch[0], threshold=self.reference_threshold)
            ):
                pipe.refresh_prompt(session, batch[0], index=self._start)
                self._reference, self._reference_index = batch[0], self._start
                event = "refresh"
            self.chunks.append((self._start, count, event))
            outputs.append(pipe.push(session, batch, defer=True))  # the caller's push collects unless deferring
            self._start += count
        return outputs

    def _cat(self, outputs: list[torch.Tensor]) -> torch.Tensor:
        outputs = [o for o in outputs if o.shape[0]]
        if outputs:
            return torch.cat(outputs)
        return self.pipeline.empty_output(self.session, self._size)
