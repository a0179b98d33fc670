"""Training clips: high-resolution footage from a folder, cut into the chunks streaming inference sees.

A sample is one stretch of `training_frames(chunks)` consecutive frames of one clip (9 for the scene's first
chunk, then 12 per chunk, as `schedule.py` cuts a scene), cropped to the training size at a random place
(optionally mirrored), with its low-resolution twin made on the fly (`degrade.py`). The trainer then streams the
twin through the model chunk by chunk, first chunk at the scene start: the KV cache, the time position and the
VAE histories carry across the chunks exactly as in inference.

`--data` holds video files (any PyAV reads) and/or folders of numbered PNG/JPEG frames, one clip each (a folder
of frames directly in `--data` counts as one clip). Clips shorter than a sample or smaller than the crop are
skipped with a warning.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import UsageError
from ..schedule import CHUNK_FRAMES, FIRST_CHUNK_FRAMES
from .degrade import Degradation, degrade

log = logging.getLogger(__name__)

VIDEO_EXTENSIONS = (".mp4", ".mkv", ".mov", ".webm", ".avi", ".mpeg", ".mpg", ".m4v", ".ts", ".y4m")


def training_frames(chunks: int) -> int:
    """Frames of a sample of `chunks` chunks: 9 + 12 (chunks - 1) (the paper's 33 for 3 chunks)."""
    if chunks < 1:
        raise UsageError(f"a sample needs at least one chunk, got {chunks}")
    return FIRST_CHUNK_FRAMES + CHUNK_FRAMES * (chunks - 1)


def chunk_spans(chunks: int) -> list[tuple[int, int]]:
    """(start, stop) frame indices of the chunks of a sample, in streaming order."""
    spans, start = [], 0
    for index in range(chunks):
        stop = start + (FIRST_CHUNK_FRAMES if index == 0 else CHUNK_FRAMES)
        spans.append((start, stop))
        start = stop
    return spans


@dataclass(frozen=True)
class ClipSource:
    """One clip of the training folder, as probed."""

    path: Path
    frames: int
    height: int
    width: int


@dataclass
class TrainingClip:
    """One sample: `hr` (T, H, W, 3) and its degraded `lr` (T, H/4, W/4, 3), both in [0, 1] on the CPU."""

    hr: torch.Tensor
    lr: torch.Tensor
    source: Path
    start: int


def _frame_folder(path: Path) -> bool:
    from ..io import IMAGE_EXTENSIONS

    return path.is_dir() and any(p.suffix.lower() in IMAGE_EXTENSIONS for p in path.iterdir())


def find_clips(folder: str | os.PathLike) -> list[ClipSource]:
    """The clips of the training folder (sorted by name), probed for their length and size."""
    from ..io import VideoReader

    folder = Path(folder)
    if not folder.is_dir():
        raise UsageError(f"training data folder {folder} does not exist (give --data a folder of clips)")
    candidates = [folder] if _frame_folder(folder) else []
    for entry in sorted(folder.iterdir()):
        if (entry.is_file() and entry.suffix.lower() in VIDEO_EXTENSIONS) or _frame_folder(entry):
            candidates.append(entry)
    clips = []
    for path in candidates:
        with VideoReader(path) as reader:
            count = reader.info.frame_count
            if count is None:  # the container does not say: count by decoding once
                count = sum(len(chunk) for chunk in reader.read_chunks(64))
            clips.append(ClipSource(path, int(count), reader.info.height, reader.info.width))
    if not clips:
        raise UsageError(
            f"no clip in {folder}: put video files ({', '.join(VIDEO_EXTENSIONS)}) or folders of numbered "
            "PNG/JPEG frames there"
        )
    return clips


class ClipSampler:
    """Random training samples from the clips that are long and large enough, degraded on the fly.

    `crop` (height, width) is the high-resolution training size: multiples of 16 (the VAE and the DiT's patch).
    All randomness comes from the generator given to `sample`, so a seeded run draws the same samples.
    """

    def __init__(
        self,
        clips: list[ClipSource],
        *,
        chunks: int,
        crop: tuple[int, int],
        degradation: Degradation = Degradation(),
        flip: bool = True,
        device: torch.device | str = "cpu",
    ) -> None:
        height, width = crop
        if height % 16 or width % 16 or height < 16 or width < 16:
            raise UsageError(f"the crop must be at least 16 and a multiple of 16 on each side, got {height}x{width}")
        self.frames = training_frames(chunks)
        self.crop = crop
        self.degradation = degradation
        self.flip = flip
        self.device = torch.device(device)
        self.clips = [c for c in clips if c.frames >= self.frames and c.height >= height and c.width >= width]
        for clip in clips:
            if clip not in self.clips:
                log.warning(
                    "skipping %s: %d frames of %dx%d, a sample needs %d frames of at least %dx%d",
                    clip.path, clip.frames, clip.width, clip.height, self.frames, width, height,
                )  # fmt: skip
        if not self.clips:
            raise UsageError(
                f"no training clip has {self.frames} frames ({chunks} chunks) of at least {width}x{height} pixels: "
                "use longer or larger clips, fewer --chunks or a smaller --crop"
            )

    def sample(self, gen: torch.Generator) -> TrainingClip:
        """One random sample: clip, start frame, crop position and mirror, then the degradation."""
        from ..io import VideoReader

        clip = self.clips[int(torch.randint(len(self.clips), (), generator=gen))]
        start = int(torch.randint(clip.frames - self.frames + 1, (), generator=gen))
        height, width = self.crop
        top = int(torch.randint(clip.height - height + 1, (), generator=gen))
        left = int(torch.randint(clip.width - width + 1, (), generator=gen))
        mirror = self.flip and bool(torch.randint(2, (), generator=gen))
        with VideoReader(clip.path, start=start, max_frames=self.frames) as reader:
            frames = reader.read_all().frames
        if frames.shape[0] != self.frames:
            raise UsageError(f"{clip.path}: read {frames.shape[0]} frames from frame {start}, expected {self.frames}")
        hr = frames[:, top : top + height, left : left + width]
        if mirror:
            hr = hr.flip(2)
        hr = hr.contiguous()
        return TrainingClip(hr, degrade(hr, gen, self.degradation, self.device), clip.path, start)
