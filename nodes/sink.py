"""Writing upscaled frames to a file in ComfyUI's output folder, chunk after chunk.

`VideoSink` names the file (never outside the output folder), picks the codec
settings of a format preset, attaches audio, and keeps a small preview still
in the temp folder for the node's preview widget. The file appears under its
final name only when closed (the core writer's temporary-name-then-rename),
and `finalize_partial` turns an interrupted run into a valid, shorter file.
"""

from __future__ import annotations

import logging
import re
import threading
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import torch
import torch.nn.functional as F

from . import audio as audio_io
from . import comfy
from ._core import FORMATS, BackgroundWriter, VideoWriter, remove_stale_temps, unfinished_outputs
from .common import FILE_FORMAT_TOOLTIP
from .paths import next_output_path
from .shutdown import OPEN_OUTPUTS

log = logging.getLogger("infvsr")


def output_inputs() -> dict[str, tuple]:
    """The file widgets every writing node shares: prefix, format and quality."""
    return {
        "filename_prefix": ("STRING", {"default": "InfVSR/upscaled",
                                       "tooltip": "Relative to ComfyUI's output folder; '..' is refused."}),
        "format": (list(FORMATS), {"default": "h264-mp4", "tooltip": FILE_FORMAT_TOOLTIP}),
        "crf": ("INT", {"default": 18, "min": 0, "max": 51,
                        "tooltip": "h264/h265 quality (lower is better); other formats ignore it."}),
    }

PREVIEW_MAX_WIDTH = 640


def fps_fraction(fps: float) -> Fraction:
    """Common NTSC rates given as floats (23.976...) become their exact fractions."""
    if fps <= 0:
        raise ValueError(f"fps must be positive, got {fps}")
    for exact in (Fraction(24000, 1001), Fraction(30000, 1001), Fraction(60000, 1001)):
        if abs(float(exact) - fps) < 5e-4:
            return exact
    return Fraction(fps).limit_denominator(1001)


def free_output_path(output_dir: Path, prefix: str, extension: str) -> tuple[Path, str, str]:
    """`next_output_path`, skipping counters that another open writer is still filling.

    Each core writer fills a temporary of its own (`.name.<pid>-<host>-<random>.partial.ext`), which the counter
    scan does not read as `name`: two saves with one prefix (two nodes, or a sink kept open across queue runs)
    would otherwise pick the same name, and the second to finish would find it taken. Temporaries of runs that
    were killed (their process is gone) are removed on the way.
    """
    path, subfolder, filename = next_output_path(output_dir, prefix, extension)
    suffix = f".{extension}" if extension else ""
    while True:
        remove_stale_temps(path)  # a killed run's temporary goes (said in the log): the folder never collects them
        match = re.fullmatch(r"(?P<stem>.+)_(?P<n>\d+)", filename[: len(filename) - len(suffix)])
        if not unfinished_outputs(path) or match is None:  # free, or not a name next_output_path makes
            return path, subfolder, filename
        filename = f"{match['stem']}_{int(match['n']) + 1:05d}{suffix}"
        path = path.with_name(filename)


def _png_bytes(frame: torch.Tensor) -> bytes:
    """One (H, W, 3) [0, 1] frame as PNG, scaled down for the preview."""
    image = frame.detach().float().cpu().clamp(0, 1)
    height, width = image.shape[:2]
    if width > PREVIEW_MAX_WIDTH:
        new_h = max(1, round(height * PREVIEW_MAX_WIDTH / width))
        image = F.interpolate(image.permute(2, 0, 1)[None], size=(new_h, PREVIEW_MAX_WIDTH), mode="area")[0]
        image = image.permute(1, 2, 0)
    array = (image * 255).round().to(torch.uint8).contiguous().numpy()
    frame_av = av.VideoFrame.from_ndarray(array, format="rgb24")
    codec = av.CodecContext.create("png", "w")
    codec.width, codec.height, codec.pix_fmt = frame_av.width, frame_av.height, "rgb24"
    codec.time_base = Fraction(1, 25)
    return b"".join(bytes(p) for p in codec.encode(frame_av)) + b"".join(bytes(p) for p in codec.encode(None))


class VideoSink:
    """One output video (or PNG folder) that frames are appended to."""

    def __init__(
        self,
        filename_prefix: str,
        format_name: str,
        fps: float,
        crf: int,
        audio: Any = None,
        *,
        output_dir: Path | None = None,
    ) -> None:
        if format_name not in FORMATS:
            raise ValueError(f"unknown format {format_name!r}; choose one of {', '.join(FORMATS)}")
        self.format = FORMATS[format_name]
        self.format_name = format_name
        self.fps = fps_fraction(float(fps))
        self.output_dir = Path(output_dir) if output_dir is not None else comfy.output_directory()
        self.path, self.subfolder, self.filename = free_output_path(
            self.output_dir, filename_prefix, self.format.extension
        )
        self._temp_audio: Path | None = None
        audio_from, audio_start = None, 0.0
        if audio is not None and self.format.codec != "png":
            source = audio_io.audio_source(audio)
            if source is not None:  # the writer copies its audio, or re-encodes what the container cannot hold
                audio_from, audio_start = source["path"], float(source.get("start") or 0.0)
            else:
                self._temp_audio = audio_io.write_audio_file(audio, comfy.temp_directory(), self.format.container)
                audio_from = str(self._temp_audio)
        self.has_audio = audio_from is not None
        self.preview_name = f"infvsr_preview_{self.path.stem}_{id(self):x}.png"
        try:
            # Encoded on a worker thread while the GPU computes the next chunk.
            self.writer = BackgroundWriter(
                VideoWriter(
                    self.path,
                    self.fps,
                    codec=self.format.codec,
                    crf=int(crf) if self.format.uses_crf else None,
                    prores_profile=self.format.prores_profile,
                    audio_from=audio_from,
                    audio_start=audio_start,
                )
            )
        except BaseException:
            self._drop_temp_audio()
            raise
        self.closed = False
        self.final_path: Path | None = None
        self._last_frame: torch.Tensor | None = None
        # A stop signal finalizes from the main thread while a node may be writing from ComfyUI's worker thread.
        self._lock = threading.Lock()
        OPEN_OUTPUTS.add(self)

    @property
    def frames_written(self) -> int:
        return self.writer.frames_written

    def write(self, frames: torch.Tensor, timestamps: list[float] | None = None) -> None:
        """Append (T, H, W, 3) frames in [0, 1]; T may be 0. `timestamps` (seconds) keep a variable frame rate."""
        if frames.shape[0] == 0:
            return
        with self._lock:
            self.writer.write(frames, timestamps=timestamps)
        self._last_frame = frames[-1].detach().cpu()
        self._write_preview()

    def close(self) -> Path:
        """Finish the file under its final name."""
        try:
            with self._lock:
                self.final_path = self.writer.close()
        finally:
            self.closed = True
            self._drop_temp_audio()
        self._write_preview()
        return self.final_path

    def finalize_partial(self, wait: float = -1) -> Path | None:
        """Keep what was written as a valid file (None when nothing was); for interrupts and errors.

        `wait` bounds the wait for a write in progress on another thread (seconds; negative: no bound)."""
        if not self._lock.acquire(timeout=wait):
            log.error("could not finalize %s: a write did not finish within %.0f s", self.path, wait)
            return None
        try:
            if self.closed:
                return self.final_path
            return self._finalize_partial()
        finally:
            self._lock.release()

    def _finalize_partial(self) -> Path | None:
        try:
            self.final_path = self.writer.finalize_partial()
        except Exception as e:  # noqa: BLE001 - never mask the interrupt that brought us here
            log.error("could not finalize %s: %s", self.path, e)
            self.writer.abort()
            self.final_path = None
        finally:
            self.closed = True
            self._drop_temp_audio()
        self._write_preview()
        return self.final_path

    def abort(self) -> None:
        self.writer.abort()
        self.closed = True
        self._drop_temp_audio()

    def _drop_temp_audio(self) -> None:
        if self._temp_audio is not None:
            self._temp_audio.unlink(missing_ok=True)
            self._temp_audio = None

    def _write_preview(self) -> None:
        if self._last_frame is None:
            return
        try:
            folder = comfy.temp_directory()
            folder.mkdir(parents=True, exist_ok=True)
            (folder / self.preview_name).write_bytes(_png_bytes(self._last_frame))
        except Exception as e:  # noqa: BLE001 - a missing preview is cosmetic
            log.debug("preview still failed: %s", e)

    def preview(self) -> dict[str, Any]:
        """What the web extension needs to show the result (ComfyUI's /view addresses)."""
        finished = self.final_path is not None
        entry: dict[str, Any] = {
            "filename": self.filename,
            "subfolder": self.subfolder,
            "type": "output",
            "format": self.format.mime,
            "format_name": self.format_name,
            "playable": self.format.browser_playable,
            "frames": self.frames_written,
            "fps": float(self.fps),
            "finished": finished,
            "has_audio": self.has_audio,
            "poster": {"filename": self.preview_name, "subfolder": "", "type": "temp"}
            if self._last_frame is not None
            else None,
        }
        if self.format.codec == "png" and finished:
            folder = f"{self.subfolder}/{self.filename}" if self.subfolder else self.filename
            entry.update(subfolder=folder, filename=f"frame_{self.frames_written:06d}.png", sequence=True)
        return entry
