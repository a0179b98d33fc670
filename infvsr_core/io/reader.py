"""Reading video: :class:`VideoReader` streams a file or a folder of numbered images as float RGB chunks.

Anything PyAV/FFmpeg demuxes is read (mp4, mkv, mov, webm, avi, mpeg, ...), as is a folder of numbered
PNG/JPEG/... frames; :class:`FrameChunk` objects are yielded as the frames decode, so a film is never held in
memory. Samples become float RGB in :mod:`.color`. The display rotation (display-matrix side data, or the legacy
``rotate`` tag) is applied to the frames, in multiples of 90 degrees; flips in the display matrix are not
applied. A damaged file raises :class:`~infvsr_core.errors.DamagedVideoError` after the frames that decoded.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import torch

from ..errors import DamagedVideoError, VideoError
from .color import FrameConverter

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


class SeekError(VideoError):
    """A `seek` position that is not a keyframe where it was said to be: read from the first frame instead."""


@dataclass
class VideoInfo:
    """What a caller needs to know about a video before streaming it."""

    path: str
    width: int  # after rotation
    height: int  # after rotation
    fps: Fraction
    frame_count: int | None  # None when the container does not say
    duration: float | None  # seconds
    rotation: int  # degrees counter-clockwise applied to the decoded frames (0, 90, 180, 270)
    pix_fmt: str
    bit_depth: int
    color_range: str  # "tv" (limited) or "pc" (full)
    color_matrix: str  # "bt709", "bt601", "bt2020", ..., or "rgb"
    has_audio: bool
    audio_codec: str | None
    audio_sample_rate: int | None
    time_base: Fraction | None
    codec: str | None = None
    audio_channels: int | None = None
    start_time: float = 0.0  # container time of the first frame, seconds
    color_tagged: bool = True  # False when matrix/range were guessed
    is_image_sequence: bool = False


@dataclass
class FrameChunk:
    """Consecutive decoded frames with their timestamps."""

    frames: torch.Tensor  # (T, H, W, 3) float32 in [0, 1]
    pts_seconds: list[float]  # presentation time of every frame, relative to the video's first frame
    index: int  # index of the first frame in the video

    def __len__(self) -> int:
        return int(self.frames.shape[0])


def as_fraction(fps: Fraction | float | int) -> Fraction:
    """A frame rate as an exact fraction (23.976 as 2997/125): timestamps are computed from it."""
    value = fps if isinstance(fps, Fraction) else Fraction(fps).limit_denominator(100_000)
    if value <= 0:
        raise ValueError(f"fps must be positive, got {fps}")
    return value


def _natural_key(name: str) -> list[Any]:
    """Sort key putting img2 before img10."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


def _list_images(folder: Path) -> list[Path]:
    """The visible image files of a folder in natural order."""
    files = [p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")]
    return sorted((p for p in files if p.is_file()), key=lambda p: _natural_key(p.name))


def _check_input_path(path: Path) -> None:
    """A missing or empty input explained before FFmpeg gives a vaguer error."""
    if not path.exists():
        raise VideoError(f"video not found: {path} does not exist")
    if path.is_dir():
        return
    if path.stat().st_size == 0:
        raise VideoError(f"video file {path} is empty (0 bytes)")


def _open_error(path: Path, err: Exception) -> VideoError:
    """Explain why FFmpeg refused to open a file, telling a damaged video apart from a non-video."""
    try:
        with open(path, "rb") as f:
            head = f.read(64)
    except OSError:
        head = b""
    looks_like_video = (
        head[4:8] in (b"ftyp", b"moov", b"mdat", b"free", b"wide")
        or head.startswith(b"\x1a\x45\xdf\xa3")  # Matroska / WebM
        or head.startswith(b"RIFF")
        or head.startswith(b"\x00\x00\x01\xba")  # MPEG-PS
        or head[:1] == b"\x47"  # MPEG-TS sync byte
    )
    if looks_like_video:
        return VideoError(f"video file {path} is truncated or corrupt: its header/index cannot be read ({err})")
    return VideoError(f"{path} is not a video file FFmpeg can read ({err})")


def _rotation_of(frame: av.VideoFrame, stream: Any) -> int:
    """Counter-clockwise display rotation in degrees, a multiple of 90 in [0, 360)."""
    degrees: float = 0.0
    try:
        degrees = float(frame.rotation)
    except (AttributeError, TypeError, ValueError):
        degrees = 0.0
    if degrees == 0.0:
        tag = (stream.metadata or {}).get("rotate") if stream is not None else None
        if tag:
            try:
                degrees = -float(tag)  # the legacy tag is clockwise
            except ValueError:
                degrees = 0.0
    quarter = int(round(degrees / 90.0))
    if abs(degrees - 90.0 * quarter) > 1.0:
        log.warning("rotation of %.1f degrees is not a multiple of 90; using %d", degrees, 90 * quarter)
    return (90 * quarter) % 360


def _pick_fps(stream: Any) -> Fraction | None:
    """The stream's average rate, unless it contradicts the codec's nominal rate (broken timestamps)."""
    avg = stream.average_rate
    guessed = stream.guessed_rate or stream.base_rate
    avg = Fraction(avg) if avg else None
    guessed = Fraction(guessed) if guessed else None
    if avg and avg > 0 and avg <= 1000:
        if guessed is None or guessed <= 0 or Fraction(1, 2) <= avg / guessed <= 2:
            return avg
    if guessed and 0 < guessed <= 1000:
        return guessed
    return avg if avg and avg > 0 else None


class VideoReader:
    """Streams frames of a video file or of a folder of numbered images, chunk by chunk.

    ``start`` and ``max_frames`` select frames by index in presentation order (frames before ``start`` are
    decoded and dropped, which keeps indices exact for variable-frame-rate video). ``fps`` is the rate of an
    image folder (default 24) or, for a video, an override of the detected rate. ``strict=False`` skips
    undecodable packets with a warning instead of raising. ``color_matrix``/``color_range`` override the
    tags (e.g. for a mis-tagged file); ``apply_rotation=False`` returns frames as stored. ``seek=(index, pts,
    origin_pts)`` says that frame ``index`` is a keyframe at ``pts`` and the first frame is at ``origin_pts`` (in the
    stream's time base, as a film job's first pass found them): reading then starts at that keyframe instead of at
    the first frame, with the same indices and timestamps; :class:`SeekError` if the keyframe is not there.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        start: int = 0,
        max_frames: int | None = None,
        fps: Fraction | float | int | None = None,
        strict: bool = True,
        color_matrix: str | None = None,
        color_range: str | None = None,
        apply_rotation: bool = True,
        seek: tuple[int, int, int] | None = None,
    ) -> None:
        if start < 0:
            raise ValueError(f"start must be >= 0, got {start}")
        if max_frames is not None and max_frames < 0:
            raise ValueError(f"max_frames must be >= 0, got {max_frames}")
        self.path = Path(path)
        self.start, self.max_frames, self.strict = start, max_frames, strict
        self._fps_override = as_fraction(fps) if fps is not None else None
        self._matrix, self._range, self._apply_rotation = color_matrix, color_range, apply_rotation
        self._seek = seek
        self._containers: list[Any] = []
        _check_input_path(self.path)
        self._images: list[Path] | None = None
        self._image_codec: str | None = None
        if self.path.is_dir():
            self._images = _list_images(self.path)
            if not self._images:
                raise VideoError(f"folder {self.path} holds no image frames ({', '.join(IMAGE_EXTENSIONS)})")
        self.info = self._probe()

    # -- probing ---------------------------------------------------------------------------------------------

    def _open(self, path: Path | None = None) -> Any:
        """Open the video (or one image), tracked so that close() releases it; FFmpeg errors in plain words."""
        target = path or self.path
        try:
            container = av.open(str(target), mode="r")
        except av.error.EOFError as e:  # a header and nothing after it
            raise VideoError(f"video file {target} contains no video frames (zero frames after its header)") from e
        except av.error.FFmpegError as e:
            raise _open_error(target, e) from e
        self._containers.append(container)
        return container

    def _release(self, container: Any) -> None:
        """Close a container this reader opened."""
        try:
            container.close()
        finally:
            if container in self._containers:
                self._containers.remove(container)

    def _probe(self) -> VideoInfo:
        """The VideoInfo of a file, from its stream headers and its first decoded frame."""
        if self._images is not None:
            return self._probe_images()
        container = self._open()
        try:
            if not container.streams.video:
                kinds = ", ".join(sorted({s.type for s in container.streams})) or "no streams"
                raise VideoError(f"{self.path} has no video stream ({kinds})")
            stream = container.streams.video[0]
            first = None
            for _, _, frame in self._decode(container, stream, limit=1):
                first = frame
                break
            if first is None:
                raise VideoError(f"video file {self.path} contains no decodable video frames (zero frames)")
            rotation = _rotation_of(first, stream) if self._apply_rotation else 0
            conv = FrameConverter(first, rotation, self._matrix, self._range, stream.codec_context.name)
            tb = Fraction(stream.time_base) if stream.time_base else None
            fps = self._fps_override or _pick_fps(stream) or Fraction(24)
            count = int(stream.frames) if stream.frames and stream.frames > 0 else None
            duration = None
            if stream.duration and tb:
                duration = float(stream.duration * tb)
            elif container.duration:
                duration = container.duration / 1_000_000
            if count and duration and not 0.5 <= duration * float(fps) / count <= 2.0:
                duration = count / float(fps)  # timestamps disagree with the frame count (broken muxing)
            audio = container.streams.audio[0] if container.streams.audio else None
            width, height = (first.height, first.width) if rotation in (90, 270) else (first.width, first.height)
            start_time = float(first.pts * tb) if first.pts is not None and tb else 0.0
            return VideoInfo(
                path=str(self.path),
                width=width,
                height=height,
                fps=fps,
                frame_count=count,
                duration=duration,
                rotation=rotation,
                pix_fmt=first.format.name,
                bit_depth=max((c.bits for c in first.format.components), default=8),
                color_range=conv.color_range,
                color_matrix=conv.matrix,
                has_audio=audio is not None,
                audio_codec=audio.codec_context.name if audio is not None else None,
                audio_sample_rate=int(audio.codec_context.sample_rate) if audio is not None else None,
                time_base=tb,
                codec=stream.codec_context.name,
                audio_channels=int(audio.codec_context.channels) if audio is not None else None,
                start_time=start_time,
                color_tagged=conv.tagged,
            )
        finally:
            self._release(container)

    def _probe_images(self) -> VideoInfo:
        """The VideoInfo of an image folder, from its first image."""
        assert self._images is not None
        frame = self._decode_image(self._images[0])
        rotation = _rotation_of(frame, None) if self._apply_rotation else 0
        conv = FrameConverter(frame, rotation, self._matrix, self._range, self._image_codec)
        fps = self._fps_override or Fraction(24)
        width, height = (frame.height, frame.width) if rotation in (90, 270) else (frame.width, frame.height)
        return VideoInfo(
            path=str(self.path),
            width=width,
            height=height,
            fps=fps,
            frame_count=len(self._images),
            duration=len(self._images) / float(fps),
            rotation=rotation,
            pix_fmt=frame.format.name,
            bit_depth=max((c.bits for c in frame.format.components), default=8),
            color_range=conv.color_range,
            color_matrix=conv.matrix,
            has_audio=False,
            audio_codec=None,
            audio_sample_rate=None,
            time_base=1 / fps,
            codec=self._image_codec,
            color_tagged=conv.tagged,
            is_image_sequence=True,
        )

    def _decode_image(self, path: Path) -> av.VideoFrame:
        """The picture of one image file (its codec is kept: JPEG chroma siting depends on it)."""
        _check_input_path(path)
        container = self._open(path)
        try:
            if not container.streams.video:
                raise VideoError(f"{path} is not an image FFmpeg can read")
            self._image_codec = container.streams.video[0].codec_context.name
            for frame in container.decode(video=0):
                return frame
        except av.error.FFmpegError as e:
            raise VideoError(f"image {path} is corrupt or unreadable ({e})") from e
        finally:
            self._release(container)
        raise VideoError(f"image {path} holds no picture")

    # -- decoding --------------------------------------------------------------------------------------------

    def _decode(self, container: Any, stream: Any, limit: int | None = None) -> Iterator[tuple[int, float, Any]]:
        """(index, pts seconds relative to the first frame, frame) in presentation order, checking integrity."""
        stream.thread_type = "AUTO"
        tb = Fraction(stream.time_base) if stream.time_base else None
        fps = self._fps_override or _pick_fps(stream) or Fraction(24)
        step = 1.0 / float(fps)
        index, origin, last = 0, None, None
        keyframe = None
        if self._seek is not None and limit is None and tb is not None:
            index, keyframe, origin_pts = self._seek
            origin = float(origin_pts * tb)
            container.seek(keyframe, stream=stream, backward=True)
        packets = container.demux(stream)
        while True:
            try:
                packet = next(packets)
            except StopIteration:
                break
            except av.error.EOFError:
                break
            except av.error.FFmpegError as e:
                self._damage(f"demuxing failed after frame {index}", e, "stopping there")
                break
            try:
                frames = packet.decode()
            except av.error.FFmpegError as e:
                self._damage(f"decoding failed at frame {index}", e, "skipping the packet")
                continue
            for frame in frames:
                if keyframe is not None:
                    if frame.pts is not None and frame.pts < keyframe:
                        continue  # an open GOP's leading frames, which belong before the keyframe
                    if frame.pts != keyframe:
                        raise SeekError(f"{self.path}: no keyframe at pts {keyframe} (frame {index})")
                    keyframe = None
                t = float(frame.pts * tb) if frame.pts is not None and tb is not None else None
                if origin is None:
                    origin = t if t is not None else 0.0
                t = None if t is None else t - origin
                if t is None or (last is not None and t <= last):
                    t = 0.0 if last is None else last + step  # missing or non-increasing timestamps
                last = t
                yield index, t, frame
                index += 1
                if limit is not None and index >= limit:
                    return
        if limit is None:
            self._check_complete(container, stream, index, last, step)

    def _damage(self, what: str, error: Exception, then: str) -> None:
        """A damaged stream: raise (strict), or warn and go on as `then` says."""
        if self.strict:
            raise DamagedVideoError(f"video file {self.path} is truncated or corrupt: {what} ({error})") from error
        log.warning("%s: %s (%s); %s", self.path, what, error, then)

    def _check_complete(self, container: Any, stream: Any, count: int, last: float | None, step: float) -> None:
        """Raise when the stream's own length says frames are missing at the end (a cut-off download)."""
        if count == 0:
            raise VideoError(f"video file {self.path} contains no decodable video frames (zero frames)")
        fmt = container.format.name
        if "mov" not in fmt and "matroska" not in fmt:
            return  # only these record the length in their header; MPEG-TS/PS and AVI estimates are guesses
        expected = None
        if stream.duration and stream.time_base:
            expected = float(stream.duration * stream.time_base)
        else:
            tag = (stream.metadata or {}).get("DURATION")  # Matroska keeps the length in a tag
            if tag:
                m = re.match(r"^(\d+):(\d+):(\d+(?:\.\d+)?)$", tag.strip())
                if m:
                    expected = int(m.group(1)) * 3600 + int(m.group(2)) * 60 + float(m.group(3))
        if expected is None or last is None:
            return
        got = last + step
        if got < expected - max(0.5, 3 * step):
            if self.strict:
                raise DamagedVideoError(
                    f"video file {self.path} is truncated: the stream stops after frame {count - 1} "
                    f"({got:.3f} s of {expected:.3f} s)"
                )
            log.warning("%s: the stream stops at %.3f s of %.3f s", self.path, got, expected)

    def _iter_images(self, start: int, stop: int | None) -> Iterator[tuple[int, float, Any]]:
        """(index, time, frame) of the selected images, timed at the folder's frame rate."""
        assert self._images is not None
        fps = float(self.info.fps)
        end = len(self._images) if stop is None else min(stop, len(self._images))
        for i in range(start, end):
            yield i, i / fps, self._decode_image(self._images[i])

    def read_chunks(
        self, chunk_size: int = 16, *, start: int | None = None, max_frames: int | None = None
    ) -> Iterator[FrameChunk]:
        """Yield chunks of up to ``chunk_size`` frames as they decode (the last one may be shorter).

        ``start``/``max_frames`` default to the values given to the constructor. Each call decodes from the
        beginning again, so a reader can be iterated several times.
        """
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        start = self.start if start is None else start
        max_frames = self.max_frames if max_frames is None else max_frames
        stop = None if max_frames is None else start + max_frames
        if stop is not None and stop <= start:
            return
        container = None
        if self._images is not None:
            source = self._iter_images(start, stop)
        else:
            container = self._open()
            source = self._decode(container, container.streams.video[0])
        try:
            yield from self._chunks(_selected(source, start, stop), chunk_size, stop)
        finally:
            if container is not None:
                self._release(container)

    def _chunks(
        self, frames: Iterator[tuple[int, float, Any]], chunk_size: int, stop: int | None
    ) -> Iterator[FrameChunk]:
        """Converted frames in chunks of `chunk_size`; on damage, the frames decoded before it, then the error."""
        conv: FrameConverter | None = None
        pending: list[Any] = []
        pts: list[float] = []
        first_index = 0
        while True:
            try:
                item = next(frames, None)
            except VideoError:
                if pending:  # hand out what decoded before the damage, then report it
                    yield self._chunk(conv, pending, pts, first_index)
                raise
            if item is None:
                break
            index, t, frame = item
            if not pending:
                first_index = index
            try:
                if self._images is not None:
                    pending.append(self._image_to_rgb(frame))
                else:
                    if conv is None:
                        conv = FrameConverter(frame, self.info.rotation, self._matrix, self._range, self.info.codec)
                    pending.append(conv.extract(frame))
            except VideoError as e:
                raise VideoError(f"{self.path}: {e} (frame {index})") from e
            pts.append(t)
            if len(pending) == chunk_size:
                yield self._chunk(conv, pending, pts, first_index)
                pending, pts = [], []
                if stop is not None and index + 1 >= stop:
                    return  # the last frame asked for: decode nothing more
        if pending:
            yield self._chunk(conv, pending, pts, first_index)

    def _chunk(self, conv: FrameConverter | None, pending: list[Any], pts: list[float], first_index: int) -> FrameChunk:
        """One chunk of the frames gathered so far."""
        if self._images is not None:  # images were converted one by one (formats may differ)
            frames = torch.stack(pending)
        else:
            assert conv is not None
            frames = conv.convert(pending)
        return FrameChunk(frames, list(pts), first_index)

    def _image_to_rgb(self, frame: av.VideoFrame) -> torch.Tensor:
        """One image as float RGB: each has its own converter, since formats and tags may differ per file."""
        rotation = _rotation_of(frame, None) if self._apply_rotation else 0
        conv = FrameConverter(frame, rotation, self._matrix, self._range, self._image_codec)
        rgb = conv.convert([conv.extract(frame)])[0]
        if (rgb.shape[1], rgb.shape[0]) != (self.info.width, self.info.height):
            raise VideoError(
                f"image size {rgb.shape[1]}x{rgb.shape[0]} differs from the first image's "
                f"{self.info.width}x{self.info.height}"
            )
        return rgb

    def read_all(self, **kwargs: Any) -> FrameChunk:
        """All selected frames as one chunk: only for short clips (tests, previews), it holds them in memory."""
        chunks = list(self.read_chunks(**kwargs))
        if not chunks:
            return FrameChunk(torch.zeros(0, self.info.height, self.info.width, 3), [], self.start)
        return FrameChunk(
            torch.cat([c.frames for c in chunks]), [t for c in chunks for t in c.pts_seconds], chunks[0].index
        )

    def close(self) -> None:
        """Release every container still open (an abandoned read_chunks iteration leaves one)."""
        for container in list(self._containers):
            self._release(container)

    def __enter__(self) -> VideoReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _selected(
    source: Iterator[tuple[int, float, Any]], start: int, stop: int | None
) -> Iterator[tuple[int, float, Any]]:
    """The decoded (index, time, frame) items of `source` whose index is in [start, stop)."""
    for item in source:
        if item[0] < start:
            continue
        if stop is not None and item[0] >= stop:
            return
        yield item


def probe(path: str | os.PathLike[str], fps: Fraction | float | int | None = None) -> VideoInfo:
    """Describe a video file or image folder (decodes only its first frame)."""
    with VideoReader(path, fps=fps) as reader:
        return reader.info
