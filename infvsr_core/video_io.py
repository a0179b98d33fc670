"""Streaming video input/output through PyAV (no ffmpeg subprocess, never the whole video in memory).

Frames in the core are float32 tensors ``(T, H, W, 3)`` in ``[0, 1]`` (ComfyUI's IMAGE layout).

Reading: :class:`VideoReader` decodes a file (anything PyAV/FFmpeg demuxes: mp4, mkv, mov, webm, avi,
mpeg, ...) or a folder of numbered PNG/JPEG frames and yields :class:`FrameChunk` objects as the frames
decode. Samples are converted to float RGB here, from the raw planes, not by swscale: with the FFmpeg 8 build
PyAV 18 ships, ``to_ndarray(format="rgb48le" / "gbrpf32le")`` truncates YUV results to the input's bit depth
(a mean bias of -0.5 code value), puts 4:2:0 chroma at the centre instead of H.264's co-sited position,
gives garbage for some flag combinations (``FULL_CHR_H_INT`` with rgb48le), and even maps 8-bit ``bgr0`` to
``rgb48le`` inexactly. This path is exact (float32) and explicit:

* matrix from the frame's colorspace tag (BT.601, BT.709, BT.2020, SMPTE 240M, FCC); untagged video uses
  BT.709 when it is HD (width >= 1280 or height >= 720) and BT.601 otherwise, as players do;
* range from the tag (``tv`` = limited, ``pc`` = full); untagged means limited except ``yuvj*`` formats;
* any bit depth (8, 10, 12, 16) by scaling the code values exactly;
* 4:2:0 / 4:2:2 / 4:4:0 chroma is upsampled bilinearly with MPEG-2/H.264 siting (horizontally co-sited with
  the even luma columns, vertically centred); JPEG/MJPEG chroma is centred both ways (FFmpeg does not expose
  the chroma-location tag through PyAV, so the codec decides);
* packed/planar RGB and grey samples are read directly; semi-planar/packed YUV (nv12, p010, yuyv422) is
  first repacked by swscale into the planar layout of the same subsampling and depth (no resampling);
  palette and other rare formats go through swscale to rgb24.

The display rotation (display-matrix side data, or the legacy ``rotate`` tag) is applied to the frames, in
multiples of 90 degrees; flips in the display matrix are not applied.

Writing: :class:`VideoWriter` encodes h264, h265 (10 bit), ProRes 422 HQ / 4444, FFV1 (lossless) or a PNG
sequence. YUV outputs are converted here with the BT.709 limited-range matrix and tagged BT.709 / limited.
4:2:0 chroma is filtered [1 2 1]/4 horizontally around the even columns (co-sited) and averaged vertically,
matching the siting the reader assumes. Odd sizes are padded by replicating the last row/column up to what
the pixel format needs (even width and height for 4:2:0, even width for 4:2:2): the file is then one pixel
larger than the frames, and the reader returns the padded size. The output goes to a temporary name of its own
in the same folder (``.name.<pid>-<host>-<random>.partial.ext``) and is moved into place by
:meth:`VideoWriter.close` only; see :class:`VideoWriter` for what happens when several runs write one output.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import secrets
import shutil
import socket
import time
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, Any

import av
import numpy as np
import torch

from .errors import DamagedVideoError, VideoError

if TYPE_CHECKING:  # typing.Self is Python 3.11+; ComfyUI users often run 3.10
    from typing_extensions import Self

log = logging.getLogger(__name__)

__all__ = [
    "IMAGE_EXTENSIONS",
    "FrameChunk",
    "VideoError",
    "VideoInfo",
    "VideoReader",
    "VideoWriter",
    "probe",
]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


# --------------------------------------------------------------------------------------------------------------
# Colour science
# --------------------------------------------------------------------------------------------------------------

# (Kr, Kb) luma coefficients of the YCbCr matrices.
_KR_KB: dict[str, tuple[float, float]] = {
    "bt709": (0.2126, 0.0722),
    "bt601": (0.299, 0.114),
    "bt2020": (0.2627, 0.0593),
    "smpte240m": (0.212, 0.087),
    "fcc": (0.30, 0.11),
}
# FFmpeg AVColorSpace values -> matrix names.
_AVCOL_SPC: dict[int, str] = {
    0: "rgb",
    1: "bt709",
    2: "unknown",
    4: "fcc",
    5: "bt601",
    6: "bt601",
    7: "smpte240m",
    8: "ycgco",
    9: "bt2020",
    10: "bt2020",
}
_AVCOL_RANGE = {1: "tv", 2: "pc"}
_PLANAR_YUV = re.compile(r"^yuv(j?)a?(420|422|440|444)p(\d+)?(le)?$")


def _guess_matrix(width: int, height: int) -> str:
    """Players treat untagged HD video as BT.709 and SD as BT.601; do the same."""
    return "bt709" if width >= 1280 or height >= 720 else "bt601"


def _yuv_scales(bits: int, color_range: str) -> tuple[float, float, float, float]:
    """(y_scale, y_offset, c_scale, c_offset) mapping code values to Y in [0,1] and Cb/Cr in [-0.5,0.5]."""
    if color_range == "pc":
        peak = float((1 << bits) - 1)
        return 1.0 / peak, 0.0, 1.0 / peak, -float(1 << (bits - 1)) / peak
    unit = float(1 << (bits - 8))  # limited range: 16..235 / 16..240 at 8 bits, times 2^(bits-8)
    return 1.0 / (219.0 * unit), -16.0 / 219.0, 1.0 / (224.0 * unit), -128.0 / 224.0


def _upsample_rows(c: torch.Tensor) -> torch.Tensor:
    """(T, h, w, C) -> (T, 2h, w, C), chroma rows centred between luma rows: 3/4 nearer + 1/4 farther."""
    h = c.shape[1]
    out = c.new_empty(c.shape[0], 2 * h, *c.shape[2:])
    out[:, 0] = c[:, 0]
    out[:, -1] = c[:, -1]
    if h > 1:
        torch.lerp(c[:, 1:], c[:, :-1], 0.25, out=out[:, 2::2])
        torch.lerp(c[:, :-1], c[:, 1:], 0.25, out=out[:, 1:-1:2])
    return out


def _upsample_cols(c: torch.Tensor, centred: bool = True) -> torch.Tensor:
    """(T, h, w, C) -> (T, h, 2w, C) with centred (JPEG) or co-sited (MPEG-2/H.264 "left") chroma columns."""
    w = c.shape[2]
    out = c.new_empty(*c.shape[:2], 2 * w, *c.shape[3:])
    out[:, :, -1] = c[:, :, -1]  # right edge replicated
    if not centred:
        out[:, :, 0::2] = c  # even luma columns carry the chroma sample itself
        if w > 1:
            torch.lerp(c[:, :, :-1], c[:, :, 1:], 0.5, out=out[:, :, 1:-1:2])
        return out
    out[:, :, 0] = c[:, :, 0]
    if w > 1:
        torch.lerp(c[:, :, 1:], c[:, :, :-1], 0.25, out=out[:, :, 2::2])
        torch.lerp(c[:, :, :-1], c[:, :, 1:], 0.25, out=out[:, :, 1:-1:2])
    return out


def _add_cosited(terms: torch.Tensor, luma: torch.Tensor, scale: float, width: int) -> torch.Tensor:
    """luma * scale + co-sited horizontal upsampling of terms, written straight into the output frame.

    Same result as ``_upsample_cols(terms, centred=False)[:, :, :width] + luma * scale`` but without the
    full-size intermediate: at 1080p this conversion is memory-bound, so passes matter.
    """
    t, h, w, ch = terms.shape
    out = torch.empty(t, h, width, ch)
    torch.add(terms[:, :, : (width + 1) // 2], luma[:, :, 0::2], alpha=scale, out=out[:, :, 0::2])
    n_odd = width // 2
    if n_odd:
        odd = terms.new_empty(t, h, n_odd, ch)
        inner = min(n_odd, w - 1)
        if inner:
            torch.lerp(terms[:, :, :inner], terms[:, :, 1 : inner + 1], 0.5, out=odd[:, :, :inner])
        if inner < n_odd:
            odd[:, :, inner:] = terms[:, :, w - 1 : w]  # right edge replicated
        torch.add(odd, luma[:, :, 1::2], alpha=scale, out=out[:, :, 1::2])
    return out


# --------------------------------------------------------------------------------------------------------------
# Data classes
# --------------------------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------------------------
# Input
# --------------------------------------------------------------------------------------------------------------


def _natural_key(name: str) -> list[Any]:
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


def _list_images(folder: Path) -> list[Path]:
    files = [p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")]
    return sorted((p for p in files if p.is_file()), key=lambda p: _natural_key(p.name))


def _check_input_path(path: Path) -> None:
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


def _plane_array(plane: Any, dtype: Any, samples_per_pixel: int = 1) -> np.ndarray:
    """A copy of one plane's visible samples (FFmpeg pads each line to line_size bytes)."""
    dt = np.dtype(dtype)
    buf = np.frombuffer(plane, dtype=dt).reshape(plane.height, plane.line_size // dt.itemsize)
    return buf[:, : plane.width * samples_per_pixel].copy()


_PACKED_RGB = re.compile(r"^(rgb|bgr|rgba|bgra|argb|abgr|rgb0|bgr0|0rgb|0bgr)(24|48|64)?(le|be)?$")
_PLANAR_RGB = re.compile(r"^gbra?p(\d+)?(le|be)?$")
_GRAY = re.compile(r"^gray(\d+)?(le|be)?$")


class _FrameConverter:
    """Turns decoded frames of one stream into float RGB, batch by batch (see the module docstring).

    ``mode``: "yuv" (planar Y, Cb, Cr at any depth/subsampling), "rgb" (packed or planar RGB, samples read
    directly), "gray", or "other" (palette, Bayer, ...: swscale to rgb24, an exact lookup for those).
    """

    def __init__(
        self,
        frame: av.VideoFrame,
        rotation: int,
        matrix: str | None = None,
        color_range: str | None = None,
        codec: str | None = None,
    ) -> None:
        self.width, self.height = frame.width, frame.height
        self.rotation = rotation
        fmt = frame.format
        self.src_fmt = fmt.name
        self.bits = max((c.bits for c in fmt.components), default=8)
        self.reformat_to: str | None = None
        self.sub_w = self.sub_h = 1
        tag_matrix = _AVCOL_SPC.get(int(frame.colorspace), "unknown")
        tag_range = _AVCOL_RANGE.get(int(frame.color_range))
        # yuvj* means full range; JPEG's centred chroma siting applies to JPEG codecs only (full-range H.264
        # also decodes to yuvj* but keeps H.264's co-sited chroma).
        jpeg = self.src_fmt.startswith("yuvj")
        self.centred_h = codec in ("mjpeg", "jpegls") if codec is not None else jpeg
        self.tagged = tag_matrix not in ("unknown", "ycgco") and tag_range is not None
        is_yuv = not fmt.is_rgb and len(fmt.components) >= 3 and not fmt.has_palette and not fmt.is_bayer
        if is_yuv:
            self.mode = "yuv"
            if matrix is None:
                matrix = tag_matrix if tag_matrix in _KR_KB else _guess_matrix(self.width, self.height)
                if tag_matrix not in _KR_KB and tag_matrix != "unknown":
                    log.warning("colour matrix %s is not supported; decoding as %s", tag_matrix, matrix)
            if color_range is None:
                color_range = tag_range or ("pc" if jpeg else "tv")
            self._setup_yuv(fmt)
        else:
            self._setup_rgb(fmt)
            if self.mode == "gray":
                color_range = color_range or tag_range or "pc"
            else:
                color_range = "pc"
            matrix = "rgb"
        if matrix != "rgb" and matrix not in _KR_KB:
            raise VideoError(f"unknown colour matrix {matrix!r}; use one of {sorted(_KR_KB)}")
        if color_range not in ("tv", "pc"):
            raise VideoError(f"unknown colour range {color_range!r}; use 'tv' (limited) or 'pc' (full)")
        self.matrix, self.color_range = matrix, color_range

    def _setup_yuv(self, fmt: Any) -> None:
        match = _PLANAR_YUV.match(fmt.name)
        comps = fmt.components
        sub_w = 2 if comps[1].width * 2 <= comps[0].width + 1 and comps[0].width > 1 else 1
        sub_h = 2 if comps[1].height * 2 <= comps[0].height + 1 and comps[0].height > 1 else 1
        if match and not fmt.is_big_endian and self.bits <= 16:
            self.sub_w = 2 if match.group(2) in ("420", "422") else 1
            self.sub_h = 2 if match.group(2) in ("420", "440") else 1
            return
        # Semi-planar (nv12, p010), packed (yuyv422) or big-endian: swscale repacks the samples without
        # resampling into the planar format of the same layout and depth; 4:1:1 and others go to 4:4:4.
        layout = {(2, 2): "420", (2, 1): "422", (1, 2): "440", (1, 1): "444"}.get((sub_w, sub_h))
        bits = self.bits if self.bits in (8, 10, 12, 16) else 16
        if layout is None or (bits == 12 and layout == "440") or (bits == 16 and layout == "440"):
            layout, bits = "444", 16
        self.reformat_to = f"yuv{layout}p" + (f"{bits}le" if bits > 8 else "")
        self.bits = bits
        self.sub_w = 2 if layout in ("420", "422") else 1
        self.sub_h = 2 if layout in ("420", "440") else 1

    def _setup_rgb(self, fmt: Any) -> None:
        name = fmt.name
        self.mode = "other"
        packed, planar, gray = _PACKED_RGB.match(name), _PLANAR_RGB.match(name), _GRAY.match(name)
        if packed:
            letters = packed.group(1)
            self.mode, self.order = "rgb", [letters.index(ch) for ch in "rgb"]
            self.channels = len(letters)
            self.bits = 16 if packed.group(2) in ("48", "64") else 8
            self.np_dtype = np.dtype(">u2" if packed.group(3) == "be" else "<u2") if self.bits == 16 else np.uint8
        elif planar:
            self.mode = "gbrp"
            self.bits = int(planar.group(1) or 8)
            self.np_dtype = np.dtype(">u2" if planar.group(2) == "be" else "<u2") if self.bits > 8 else np.uint8
        elif gray:
            self.mode = "gray"
            self.bits = int(gray.group(1) or 8)
            self.np_dtype = np.dtype(">u2" if gray.group(2) == "be" else "<u2") if self.bits > 8 else np.uint8
        if self.mode == "other":
            self.bits, self.reformat_to = 8, "rgb24"

    def _swscale_args(self) -> dict[str, Any]:
        if self.mode != "yuv":
            return {"format": self.reformat_to}
        cs = {"bt709": "ITU709", "bt601": "ITU601", "bt2020": "BT2020", "smpte240m": "SMPTE240M", "fcc": "FCC"}
        rng = "MPEG" if self.color_range == "tv" else "JPEG"
        return {
            "format": self.reformat_to,
            "src_colorspace": cs[self.matrix],
            "dst_colorspace": cs[self.matrix],
            "src_color_range": rng,
            "dst_color_range": rng,
        }

    def extract(self, frame: av.VideoFrame) -> tuple[np.ndarray, ...]:
        """Copy the frame's samples out of FFmpeg's buffers (the frame may be reused by the decoder)."""
        if frame.width != self.width or frame.height != self.height:
            raise VideoError(
                f"frame size changed mid-stream from {self.width}x{self.height} to {frame.width}x{frame.height}"
            )
        if self.reformat_to is not None:
            frame = frame.reformat(**self._swscale_args())
        if self.mode == "yuv":
            dtype = np.uint8 if self.bits <= 8 else np.uint16
            return tuple(_plane_array(frame.planes[i], dtype) for i in range(3))
        if self.mode == "rgb":
            data = _plane_array(frame.planes[0], self.np_dtype, self.channels)
            data = data.reshape(self.height, self.width, self.channels)[..., self.order]
            return (np.ascontiguousarray(data.astype(np.uint16 if self.bits > 8 else np.uint8)),)
        if self.mode == "gbrp":
            g, b, r = (_plane_array(frame.planes[i], self.np_dtype) for i in range(3))
            return (np.stack((r, g, b), axis=-1).astype(np.uint16 if self.bits > 8 else np.uint8),)
        if self.mode == "gray":
            return (_plane_array(frame.planes[0], self.np_dtype).astype(np.uint16 if self.bits > 8 else np.uint8),)
        return (_plane_array(frame.planes[0], np.uint8, 3).reshape(self.height, self.width, 3),)

    def convert(self, batch: list[tuple[np.ndarray, ...]]) -> torch.Tensor:
        """Float RGB (T, H, W, 3) in [0, 1] for a list of extracted frames, rotation applied.

        The chroma terms of the matrix are formed at chroma resolution and upsampled (both steps are linear,
        so the order does not change the result), then luma is added: few full-resolution passes.
        """
        if self.mode == "gray":
            ys, yo, _, _ = _yuv_scales(self.bits, self.color_range)
            gray = _as_tensor(np.stack([b[0] for b in batch])).to(torch.float32).mul_(ys).add_(yo)
            rgb = gray.unsqueeze(-1).expand(-1, -1, -1, 3).clamp(0.0, 1.0)
        elif self.mode != "yuv":
            peak = float((1 << self.bits) - 1)
            rgb = _as_tensor(np.stack([b[0] for b in batch])).to(torch.float32).mul_(1.0 / peak)
        else:
            ys, yo, cs, co = _yuv_scales(self.bits, self.color_range)
            kr, kb = _KR_KB[self.matrix]
            kg = 1.0 - kr - kb
            cb = _as_tensor(np.stack([b[1] for b in batch])).to(torch.float32).mul_(cs).add_(co)
            cr = _as_tensor(np.stack([b[2] for b in batch])).to(torch.float32).mul_(cs).add_(co)
            terms = torch.stack(
                (
                    cr * (2.0 * (1.0 - kr)) + yo,
                    cb * (-2.0 * kb * (1.0 - kb) / kg) - cr * (2.0 * kr * (1.0 - kr) / kg) + yo,
                    cb * (2.0 * (1.0 - kb)) + yo,
                ),
                dim=-1,
            )  # (T, h, w, 3): what R, G, B add to the scaled luma
            if self.sub_h == 2:
                terms = _upsample_rows(terms)
            terms = terms[:, : self.height]
            luma = _as_tensor(np.stack([b[0] for b in batch])).unsqueeze(-1)
            if self.sub_w == 2 and not self.centred_h:
                rgb = _add_cosited(terms, luma, ys, self.width)
            else:
                if self.sub_w == 2:
                    terms = _upsample_cols(terms, centred=True)
                rgb = torch.add(terms[:, :, : self.width], luma, alpha=ys)
            rgb.clamp_(0.0, 1.0)
        if self.rotation:
            rgb = torch.rot90(rgb, k=self.rotation // 90, dims=(1, 2)).contiguous()
        return rgb


def _as_tensor(a: np.ndarray) -> torch.Tensor:
    """uint8 stays uint8; 10/12-bit samples fit int16 (no copy); 16-bit goes to int32."""
    if a.dtype == np.uint16:
        return torch.from_numpy(a.astype(np.int32) if a.max(initial=0) > 32767 else a.view(np.int16))
    return torch.from_numpy(a)


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
    tags (e.g. for a mis-tagged file); ``apply_rotation=False`` returns frames as stored.
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
    ) -> None:
        if start < 0:
            raise ValueError(f"start must be >= 0, got {start}")
        if max_frames is not None and max_frames < 0:
            raise ValueError(f"max_frames must be >= 0, got {max_frames}")
        self.path = Path(path)
        self.start, self.max_frames, self.strict = start, max_frames, strict
        self._fps_override = _as_fraction(fps) if fps is not None else None
        self._matrix, self._range, self._apply_rotation = color_matrix, color_range, apply_rotation
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
        try:
            container.close()
        finally:
            if container in self._containers:
                self._containers.remove(container)

    def _probe(self) -> VideoInfo:
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
            conv = _FrameConverter(first, rotation, self._matrix, self._range, stream.codec_context.name)
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
        assert self._images is not None
        frame = self._decode_image(self._images[0])
        rotation = _rotation_of(frame, None) if self._apply_rotation else 0
        conv = _FrameConverter(frame, rotation, self._matrix, self._range, self._image_codec)
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
        packets = container.demux(stream)
        while True:
            try:
                packet = next(packets)
            except StopIteration:
                break
            except av.error.EOFError:
                break
            except av.error.FFmpegError as e:
                if self.strict:
                    raise DamagedVideoError(
                        f"video file {self.path} is truncated or corrupt: demuxing failed after frame {index} ({e})"
                    ) from e
                log.warning("%s: demuxing failed after frame %d (%s); stopping there", self.path, index, e)
                break
            try:
                frames = packet.decode()
            except av.error.FFmpegError as e:
                if self.strict:
                    raise DamagedVideoError(
                        f"video file {self.path} is truncated or corrupt: decoding failed at frame {index} ({e})"
                    ) from e
                log.warning("%s: skipping an undecodable packet at frame %d (%s)", self.path, index, e)
                continue
            for frame in frames:
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
        conv: _FrameConverter | None = None
        pending: list[Any] = []
        pts: list[float] = []
        first_index = start

        def flush() -> FrameChunk:
            if self._images is not None:  # images were converted one by one (formats may differ)
                frames = torch.stack(pending)
            else:
                assert conv is not None
                frames = conv.convert(pending)
            return FrameChunk(frames, list(pts), first_index)

        try:
            while True:
                try:
                    item = next(source, None)
                except VideoError:
                    if pending:  # hand out what decoded before the damage, then report it
                        yield flush()
                    raise
                if item is None:
                    break
                index, t, frame = item
                if index < start:
                    continue
                if stop is not None and index >= stop:
                    break
                if not pending:
                    first_index = index
                try:
                    if self._images is not None:
                        pending.append(self._image_to_rgb(frame))
                    else:
                        if conv is None:
                            conv = _FrameConverter(
                                frame, self.info.rotation, self._matrix, self._range, self.info.codec
                            )
                        pending.append(conv.extract(frame))
                except VideoError as e:
                    raise VideoError(f"{self.path}: {e} (frame {index})") from e
                pts.append(t)
                if len(pending) == chunk_size:
                    yield flush()
                    pending, pts = [], []
                    if stop is not None and index + 1 >= stop:
                        break
            if pending:
                yield flush()
        finally:
            if container is not None:
                self._release(container)

    def _image_to_rgb(self, frame: av.VideoFrame) -> torch.Tensor:
        rotation = _rotation_of(frame, None) if self._apply_rotation else 0
        conv = _FrameConverter(frame, rotation, self._matrix, self._range, self._image_codec)
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
        for container in list(self._containers):
            self._release(container)

    def __enter__(self) -> VideoReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def probe(path: str | os.PathLike[str], fps: Fraction | float | int | None = None) -> VideoInfo:
    """Describe a video file or image folder (decodes only its first frame)."""
    with VideoReader(path, fps=fps) as reader:
        return reader.info


# --------------------------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------------------------

_CONTAINER_FORMATS = {
    ".mp4": "mp4",
    ".m4v": "mp4",
    ".mov": "mov",
    ".mkv": "matroska",
    ".webm": "webm",
    ".avi": "avi",
}
# codec -> (encoder, default pix_fmt, allowed pix_fmts)
_CODECS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "h264": ("libx264", "yuv420p", ("yuv420p", "yuv422p", "yuv444p", "yuv420p10le", "yuv422p10le", "yuv444p10le")),
    "h265": ("libx265", "yuv420p10le", ("yuv420p", "yuv422p", "yuv444p", "yuv420p10le", "yuv422p10le", "yuv444p10le")),
    "prores": ("prores_ks", "yuv422p10le", ("yuv422p10le", "yuv444p10le")),
    "ffv1": ("ffv1", "bgr0", ("bgr0", "gbrp10le", "gbrp16le", "yuv420p", "yuv444p", "yuv444p10le", "yuv444p16le")),
    "png": ("png", "rgb24", ("rgb24", "rgb48be")),
}
_DEFAULT_CRF = {"h264": 18, "h265": 20}
_PRORES_PROFILES = {"hq": ("3", "yuv422p10le"), "4444": ("4", "yuv444p10le")}
_REENCODE_AUDIO = {"mp4": "aac", "mov": "aac", "matroska": "flac", "webm": "libopus", "avi": "libmp3lame"}
_NAMED_LAYOUTS = {1: "mono", 2: "stereo", 3: "2.1", 4: "quad", 5: "5.0", 6: "5.1", 7: "6.1", 8: "7.1"}
# Audio codecs each container takes as a stream copy. FFmpeg accepts some others when the stream is added
# (PCM into mp4, for one) and fails only when the file is finalized, so copying is decided here instead.
_COPYABLE_AUDIO = {
    "mp4": {"aac", "mp3", "alac", "ac3", "eac3", "opus", "flac"},
    "mov": {"aac", "mp3", "alac", "ac3", "eac3", "pcm_s16le", "pcm_s16be", "pcm_s24le", "pcm_s24be", "pcm_f32le"},
    "webm": {"opus", "vorbis"},
    "avi": {"mp3", "ac3", "pcm_s16le"},
}
_VFR_TIME_BASE = Fraction(1, 90000)


def _as_fraction(fps: Fraction | float | int) -> Fraction:
    value = fps if isinstance(fps, Fraction) else Fraction(fps).limit_denominator(100_000)
    if value <= 0:
        raise ValueError(f"fps must be positive, got {fps}")
    return value


def _to_numpy_rgb(frames: Any) -> torch.Tensor:
    """(T, H, W, 3) float32 CPU tensor in [0, 1] from torch/numpy, float or uint8, single frame or batch."""
    if isinstance(frames, np.ndarray):
        tensor = torch.from_numpy(np.ascontiguousarray(frames))
    elif isinstance(frames, torch.Tensor):
        tensor = frames.detach().cpu()
    else:
        raise TypeError(f"frames must be a torch tensor or numpy array, got {type(frames).__name__}")
    if tensor.dim() == 3:
        tensor = tensor.unsqueeze(0)
    if tensor.dim() != 4 or tensor.shape[-1] != 3:
        raise ValueError(f"frames must have shape (T, H, W, 3), got {tuple(tensor.shape)}")
    if tensor.dtype == torch.uint8:
        return tensor.to(torch.float32).div_(255.0)
    return tensor.to(torch.float32).clamp(0.0, 1.0)


def _plane_view(plane: Any, width: int, dtype: torch.dtype) -> torch.Tensor:
    """A writable tensor over the visible part of an FFmpeg plane (lines are padded to line_size bytes)."""
    np_dtype = {torch.uint8: np.uint8, torch.int16: np.int16}[dtype]
    itemsize = np.dtype(np_dtype).itemsize
    buf = np.frombuffer(plane, dtype=np_dtype).reshape(plane.height, plane.line_size // itemsize)
    return torch.from_numpy(buf)[:, :width]


class _FrameEncoder:
    """RGB float -> av.VideoFrame of a given pixel format (BT.709 limited for YUV, see module docstring).

    Samples are computed with few full-resolution passes and written straight into FFmpeg's frame buffers:
    an upscaled 4K frame is 25 M floats, so this costs as much as the encoder's own colour work otherwise.
    Chroma is formed from the low-passed RGB (the filter and the matrix are both linear, so the order does
    not matter), which keeps the chroma matrix at chroma resolution.
    """

    def __init__(self, pix_fmt: str) -> None:
        self.pix_fmt = pix_fmt
        m = _PLANAR_YUV.match(pix_fmt)
        self.yuv = m is not None
        self.bits = int(m.group(3) or 8) if m else 8
        self.sub_w = 2 if m and m.group(2) in ("420", "422") else 1
        self.sub_h = 2 if m and m.group(2) == "420" else 1
        if self.yuv:
            kr, kb = _KR_KB["bt709"]
            kg = 1.0 - kr - kb
            unit = float(1 << (self.bits - 8))
            self.luma_weights = torch.tensor([kr, kg, kb]) * (219.0 * unit)
            cb = torch.tensor([-kr, -kg, 1.0 - kb]) / (2.0 * (1.0 - kb))
            cr = torch.tensor([1.0 - kr, -kg, -kb]) / (2.0 * (1.0 - kr))
            gain = 1.0 / (self.sub_w * 2 if self.sub_w == 2 else 1) / self.sub_h  # the box/[1 2 1] sums below
            self.chroma_weights = torch.stack((cb, cr)) * (224.0 * unit * gain)
            self.unit, self.top = unit, float((1 << self.bits) - 1)
        elif pix_fmt not in ("bgr0", "rgb24", "rgb48be", "gbrp10le", "gbrp16le"):
            raise VideoError(f"pixel format {pix_fmt} is not supported by the writer")

        self._scratch: dict[str, torch.Tensor] = {}

    def padded_size(self, width: int, height: int) -> tuple[int, int]:
        return width + (-width % self.sub_w), height + (-height % self.sub_h)

    def _buffer(self, name: str, *shape: int) -> torch.Tensor:
        """Scratch tensors reused from frame to frame (fresh 100 MB allocations cost page faults each time)."""
        buf = self._scratch.get(name)
        if buf is None or tuple(buf.shape) != shape:
            buf = self._scratch[name] = torch.empty(shape)
        return buf

    def frames(self, rgb: torch.Tensor) -> Iterator[av.VideoFrame]:
        """One av.VideoFrame per input frame, padded by edge replication where the chroma layout needs it."""
        t, h, w, _ = rgb.shape
        pw, ph = self.padded_size(w, h)
        if (pw, ph) != (w, h):
            rgb = torch.nn.functional.pad(rgb.permute(0, 3, 1, 2), (0, pw - w, 0, ph - h), mode="replicate")
            rgb = rgb.permute(0, 2, 3, 1)
        for i in range(t):
            frame = av.VideoFrame(pw, ph, self.pix_fmt)
            x = rgb[i].contiguous()
            if self.yuv:
                self._fill_yuv(frame, x)
                frame.colorspace = 1  # AVCOL_SPC_BT709
                frame.color_range = 1  # AVCOL_RANGE_MPEG
            else:
                self._fill_rgb(frame, x)
                frame.color_range = 2
            yield frame

    def _fill_yuv(self, frame: av.VideoFrame, x: torch.Tensor) -> None:
        dtype = torch.int16 if self.bits > 8 else torch.uint8  # <= 12-bit samples fit int16
        h, w, _ = x.shape
        y = torch.matmul(x, self.luma_weights, out=self._buffer("y", h, w))
        y.add_(16.0 * self.unit).round_().clamp_(0.0, self.top)
        _plane_view(frame.planes[0], w, dtype).copy_(y)
        c = x
        if self.sub_h == 2:  # vertical pairs (chroma centred between rows)
            c = torch.add(c[0::2], c[1::2], out=self._buffer("rows", h // 2, w, 3))
        if self.sub_w == 2:  # [1 2 1] around the even columns (co-sited), left edge replicated
            pairs = c.view(c.shape[0], c.shape[1] // 2, 2, 3)
            even, odd = pairs[:, :, 0], pairs[:, :, 1]
            low = torch.add(odd, even, alpha=2.0, out=self._buffer("cols", c.shape[0], c.shape[1] // 2, 3))
            low[:, 1:] += odd[:, :-1]
            low[:, :1] += even[:, :1]
            c = low
        chroma = torch.einsum("hwc,kc->khw", c, self.chroma_weights).add_(128.0 * self.unit)
        chroma.round_().clamp_(0.0, self.top)
        for k in (0, 1):
            _plane_view(frame.planes[k + 1], chroma.shape[2], dtype).copy_(chroma[k])

    def _fill_rgb(self, frame: av.VideoFrame, x: torch.Tensor) -> None:
        h, w, _ = x.shape
        if self.pix_fmt in ("bgr0", "rgb24"):
            n = 4 if self.pix_fmt == "bgr0" else 3
            dst = _plane_view(frame.planes[0], w * n, torch.uint8).view(h, w, n)
            q = torch.mul(x, 255.0, out=self._buffer("q", h, w, 3)).round_()
            if n == 4:
                for k in range(3):
                    dst[..., k].copy_(q[..., 2 - k])
                dst[..., 3] = 0
            else:
                dst.copy_(q)
            return
        top = 1023.0 if self.pix_fmt == "gbrp10le" else 65535.0
        q = torch.mul(x, top, out=self._buffer("q", h, w, 3)).round_().to(torch.int32)
        if self.pix_fmt == "rgb48be":
            dst = _plane_view(frame.planes[0], w * 6, torch.uint8).view(h, w, 3, 2)
            dst[..., 0].copy_(q >> 8)
            dst[..., 1].copy_(q & 255)
            return
        for plane, channel in zip(frame.planes, (1, 2, 0), strict=True):  # planes are G, B, R
            _plane_view(plane, w, torch.int16).copy_(q[..., channel].to(torch.int16))  # 16-bit wraps as intended


class _AudioMuxer:
    """Carries the first audio stream of a file into the output, cut to the written video's time span.

    Packets are copied when the output container accepts the codec (cut at packet boundaries: the first
    packet starts at or after ``start``, keeping its exact offset), otherwise decoded, trimmed to the
    sample, and re-encoded (AAC for mp4/mov, FLAC for mkv). Packets are muxed as the video advances, so
    the file is interleaved and nothing accumulates in memory.
    """

    def __init__(self, source: Path, start: float, duration: float | None) -> None:
        self.source, self.start, self.duration = source, max(0.0, start), duration
        self.input = av.open(str(source))
        audio = self.input.streams.audio
        if not audio:
            self.input.close()
            raise LookupError(f"{source} has no audio stream")
        self.in_stream = audio[0]
        video = self.input.streams.video
        origin = 0.0
        if video and video[0].start_time is not None and video[0].time_base:
            origin = float(video[0].start_time * video[0].time_base)
        self.abs_start = origin + self.start  # in the source container's clock
        self.copy = True
        self.out_stream: Any = None
        self.packets: Iterator[Any] | None = None
        self.lookahead: Any = None
        self.done = False
        self.samples_out = 0
        self.rate = 0
        self.first_out: float | None = None
        self.last_end: float = 0.0

    def add_to(self, output: Any, fmt: str) -> None:
        try:
            allowed = _COPYABLE_AUDIO.get(fmt)
            if allowed is not None and self.in_stream.codec_context.name not in allowed:
                raise ValueError(f"{fmt} does not take {self.in_stream.codec_context.name} as a stream copy")
            self.out_stream = output.add_stream_from_template(self.in_stream)
        except ValueError:
            self.copy = False
            name = _REENCODE_AUDIO.get(fmt, "aac")
            ctx = self.in_stream.codec_context
            rate = int(ctx.sample_rate) or 48000
            if name == "libopus" and rate not in (8000, 12000, 16000, 24000, 48000):
                rate = 48000
            self.out_stream = output.add_stream(name, rate=rate)
            # A WAV's layout can be "1 channels" (no order); encoders want a named layout of that size.
            channels = len(ctx.layout.channels) if ctx.layout else 2
            self.out_stream.layout = _NAMED_LAYOUTS.get(channels, ctx.layout.name if ctx.layout else "stereo")
            if name in ("aac", "libopus", "libmp3lame"):
                self.out_stream.bit_rate = 192_000
            self.out_stream.time_base = Fraction(1, rate)
            self.rate = rate
            log.info("re-encoding audio %s -> %s (the container cannot hold %s)", ctx.name, name, ctx.name)

    def _end(self, video_duration: float) -> float:
        span = video_duration if self.duration is None else min(self.duration, video_duration)
        return self.abs_start + max(0.0, span)

    def advance(self, output: Any, video_duration: float, final: bool = False) -> None:
        """Mux audio up to the video's current end (everything of the selected span when final)."""
        if self.done:
            return
        end = self._end(video_duration)
        if self.packets is None:
            self.packets = self.input.demux(self.in_stream)
        tb = self.in_stream.time_base
        while True:
            packet = self.lookahead
            self.lookahead = None
            if packet is None:
                try:
                    packet = next(self.packets)
                except (StopIteration, av.error.EOFError):
                    packet = None
                except av.error.FFmpegError as e:
                    log.warning("audio of %s stops early: %s", self.source, e)
                    packet = None
            if packet is None or (packet.pts is None and packet.size == 0):
                self._finish(output, end)
                return
            if packet.pts is None:
                continue
            p_start = float(packet.pts * tb)
            p_end = p_start + float((packet.duration or 0) * tb)
            if p_start >= end - 1e-9 or (not final and p_end > end):
                if final:
                    self._finish(output, end)
                else:
                    self.lookahead = packet  # reaches past the video written so far: wait for more
                return
            if self.copy:
                if p_start < self.abs_start - 1e-9:
                    continue
                shift = round(self.abs_start / tb)
                packet.pts -= shift
                if packet.dts is not None:
                    packet.dts -= shift
                packet.stream = self.out_stream
                output.mux(packet)
                if self.first_out is None:
                    self.first_out = p_start - self.abs_start
                self.last_end = max(self.last_end, p_end - self.abs_start)
            else:
                self._encode_packet(output, packet, end)

    def _encode_packet(self, output: Any, packet: Any, end: float) -> None:
        try:
            frames = self.in_stream.codec_context.decode(packet)
        except av.error.FFmpegError as e:
            log.warning("skipping an undecodable audio packet of %s: %s", self.source, e)
            return
        for frame in frames:
            if frame.pts is None:
                continue
            rate = frame.sample_rate
            f_start = float(frame.pts * frame.time_base)
            first = max(0, int(round((self.abs_start - f_start) * rate)))
            last = min(frame.samples, int(round((end - f_start) * rate)))
            if last <= first:
                continue
            if first > 0 or last < frame.samples:
                data = frame.to_ndarray()
                data = (
                    data[:, first:last]
                    if frame.format.is_planar
                    else data[:, first * len(frame.layout.channels) : last * len(frame.layout.channels)]
                )
                cut = av.AudioFrame.from_ndarray(
                    np.ascontiguousarray(data), format=frame.format.name, layout=frame.layout.name
                )
                cut.sample_rate = rate
                frame = cut
            begin = f_start + first / rate - self.abs_start
            if self.first_out is None:
                self.first_out = begin
                self.samples_out = int(round(begin * self.rate))
            if rate != self.rate:  # only for Opus at odd rates: let the encoder's resampler count samples
                frame.pts = None
            else:
                frame.pts = self.samples_out
                frame.time_base = Fraction(1, self.rate)
            self.samples_out += frame.samples
            for out_packet in self.out_stream.encode(frame):
                output.mux(out_packet)
            self.last_end = max(self.last_end, begin + frame.samples / rate)

    def _finish(self, output: Any, end: float) -> None:
        if not self.copy and self.out_stream is not None:
            for out_packet in self.out_stream.encode(None):
                output.mux(out_packet)
        self.done = True

    def close(self) -> None:
        self.input.close()


# -- temporary output names, shared by every writer of one output ------------------------------------------------

# The fixed temporary name of earlier versions names no owner: untouched for this long, no writer is filling it.
_LEGACY_STALE_S = 60.0
# errno values meaning "the device (or a quota, or a file size limit) cannot take more bytes".
_DISK_FULL = {errno.ENOSPC, errno.EFBIG, getattr(errno, "EDQUOT", errno.ENOSPC)}


def _host_tag() -> str:
    """Six hex digits naming this machine: a process id in a temporary name only means something on the host that
    wrote it (an output folder can be shared between machines or containers)."""
    return f"{zlib.crc32(socket.gethostname().encode()) & 0xFFFFFF:06x}"


_HOST_TAG = _host_tag()


def _new_token() -> str:
    """`<pid>-<host>-<random>`: unique per writer, and tells a later run whether the owner may still be alive."""
    return f"{os.getpid()}-{_HOST_TAG}-{secrets.token_hex(4)}"


def _temp_candidates(path: Path) -> Iterator[tuple[Path, int | None, str | None]]:
    """Temporary outputs of `path` in its folder, as (temp, pid, host); pid and host are None for the legacy fixed
    name. Both shapes are matched, file (`.stem.<token>.partial.ext`) and folder (`.name.<token>.partial`): either
    one is a writer aiming at this very name."""
    forms = {(path.stem, path.suffix), (path.name, "")}
    legacy = {f".{base}.partial{ext}" for base, ext in forms}
    patterns = [
        re.compile(rf"\.{re.escape(base)}\.(\d+)-([0-9a-f]{{6}})-[0-9a-f]{{8}}\.partial{re.escape(ext)}")
        for base, ext in forms
    ]
    try:
        names = os.listdir(path.parent)
    except OSError:
        return
    for name in names:
        if name in legacy:
            yield path.parent / name, None, None
            continue
        for pattern in patterns:
            match = pattern.fullmatch(name)
            if match:
                yield path.parent / name, int(match[1]), match[2]
                break


def unfinished_outputs(path: str | os.PathLike[str]) -> list[Path]:
    """Temporary files or folders of writers aiming at `path` (running, or left by a killed run): a caller choosing
    a fresh output name skips a name that another writer is still filling."""
    return sorted(temp for temp, _, _ in _temp_candidates(Path(path)))


def _pid_alive(pid: int) -> bool:
    """Whether process `pid` runs on this machine; when unsure, alive (a live writer's temp is never removed)."""
    if pid <= 0:
        return True
    if os.name == "nt":  # os.kill(pid, 0) would terminate the process on Windows
        import ctypes

        kernel32 = ctypes.WinDLL("kernel32", use_last_error=True)  # type: ignore[attr-defined]
        kernel32.OpenProcess.restype = ctypes.c_void_p  # a HANDLE is pointer-sized; the int default truncates it
        kernel32.GetExitCodeProcess.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_ulong)]
        kernel32.CloseHandle.argtypes = [ctypes.c_void_p]
        handle = kernel32.OpenProcess(0x1000, False, pid)  # PROCESS_QUERY_LIMITED_INFORMATION
        if not handle:
            return ctypes.get_last_error() != 87  # type: ignore[attr-defined]  # ERROR_INVALID_PARAMETER: no such id
        try:
            code = ctypes.c_ulong()
            return not kernel32.GetExitCodeProcess(handle, ctypes.byref(code)) or code.value == 259  # STILL_ACTIVE
        finally:
            kernel32.CloseHandle(handle)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists, under another user
        return True
    return True


def _newest_mtime(path: Path) -> float:
    """Last change of a temp file, or of a temp folder and the frames in it (now when it cannot be read: kept)."""
    try:
        newest = path.stat().st_mtime
        if path.is_dir():
            with os.scandir(path) as entries:
                for entry in entries:
                    newest = max(newest, entry.stat(follow_symlinks=False).st_mtime)
        return newest
    except OSError:
        return time.time()


def _stale_reason(temp: Path, pid: int | None, host: str | None) -> str | None:
    """Why `temp` belongs to no running writer, or None if it may (then it must stay)."""
    if pid is None:
        if time.time() - _newest_mtime(temp) > _LEGACY_STALE_S:
            return "an earlier version's temporary name, no longer being written"
        return None
    if host != _HOST_TAG:  # another machine's writer: its process id cannot be checked from here
        return None
    if pid == os.getpid() or _pid_alive(pid):
        return None
    return f"the run that wrote it (process {pid}) has ended"


def _remove_stale_temps(path: Path) -> None:
    """Delete what killed runs (SIGKILL, power cut) left behind for this output, saying so."""
    for temp, pid, host in _temp_candidates(path):
        reason = _stale_reason(temp, pid, host)
        if reason is None:
            continue
        log.warning("removing %s, an unfinished temporary output for %s: %s", temp, path, reason)
        try:
            if temp.is_dir() and not temp.is_symlink():
                shutil.rmtree(temp)
            else:
                temp.unlink()
        except FileNotFoundError:  # another writer starting now removed it first
            pass
        except OSError as e:
            log.warning("could not remove %s: %s", temp, e.strerror or e)


def _move_exclusive(src: Path, dst: Path) -> None:
    """Rename `src` to `dst` only if nothing is at `dst`, atomically: FileExistsError otherwise (a plain POSIX
    rename would replace a file or an empty folder that another run put there)."""
    if os.name == "nt":  # Windows renames never replace an existing name
        os.rename(src, dst)
        return
    if src.is_dir():
        os.mkdir(dst)  # claims the name; fails if anything, an empty folder included, is there
        try:
            os.rename(src, dst)  # replaces only the empty folder claimed just above
        except OSError as e:
            try:
                os.rmdir(dst)
            except OSError:  # someone wrote into the claimed folder: it is theirs now
                pass
            if e.errno in (errno.ENOTEMPTY, errno.EEXIST):
                raise FileExistsError(e.errno, "another run wrote into it meanwhile", str(dst)) from e
            raise
        return
    try:
        os.link(src, dst)
    except FileExistsError:
        raise
    except OSError:  # no hard links on this file system (FAT, some network shares): check, then rename
        if os.path.lexists(dst):
            raise FileExistsError(errno.EEXIST, "exists", str(dst)) from None
        os.rename(src, dst)
        return
    try:
        os.unlink(src)
    except OSError:  # only a hidden second name of the finished file; removed as stale once this process ends
        pass


def _is_disk_full(error: BaseException) -> bool:
    return isinstance(error, OSError) and error.errno in _DISK_FULL


class _Finishing:
    """`with` for the writers: close() on success, abort() (no output left) on an exception."""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is not None:
            self.abort()
        else:
            self.close()

    def close(self) -> Any:
        raise NotImplementedError

    def abort(self) -> None:
        raise NotImplementedError


class VideoWriter(_Finishing):
    """Encodes frames to a video file (or a PNG folder), appearing under its final name only when complete.

    ``codec``: ``"h264"`` (yuv420p default, or yuv444p), ``"h265"`` (yuv420p10le), ``"prores"``
    (``prores_profile`` ``"hq"`` = 422 HQ yuv422p10le, ``"4444"`` = yuv444p10le, in .mov), ``"ffv1"`` (lossless,
    .mkv, 8-bit RGB ``bgr0`` by default) or ``"png"`` (``path`` is a folder receiving frame_000001.png, ...).
    ``crf`` defaults to 18 (h264) / 20 (h265). ``timestamps`` (seconds, one per frame, e.g. a reader's
    ``pts_seconds``) make the output variable-frame-rate with the same timing (shifted so the first frame is at
    0); they can also be passed per :meth:`write` call. ``audio_from`` copies the first audio stream of that
    file, covering ``[audio_start, audio_start + min(audio_duration, written video duration)]`` of the source,
    where ``audio_start`` is in the same clock as the reader's ``pts_seconds``.

    Use it as a context manager: an exception inside ``with`` aborts (no output, temp file removed); a normal
    exit closes. :meth:`close` after fewer frames than planned (e.g. on Ctrl-C) still gives a valid file.

    Several runs may write the same output at once, so each writer fills its own hidden temporary,
    ``.stem.<pid>-<host>-<random>.partial.ext`` (``.name.<pid>-<host>-<random>.partial`` for a PNG folder), and
    the rename in :meth:`close` decides. With ``overwrite`` the last run to finish wins: one atomic replace, so the
    output is always one complete result. Without it the name is taken only if still free (a hard link, or an
    exclusive folder claim); if another run created the output meanwhile it is left untouched, our finished frames
    are moved to the visible sibling ``stem.conflict-<pid>-<random>.ext`` and close() raises a VideoError naming
    both. A new writer deletes the temporaries of its output that killed runs left: a unique name whose process no
    longer runs on this host, or the fixed ``.stem.partial.ext`` of earlier versions once untouched for a minute.
    A full disk (or quota, or file size limit) raises a VideoError naming the output; the partial file is removed.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        fps: Fraction | float | int = Fraction(24),
        *,
        codec: str = "h264",
        crf: int | None = None,
        pix_fmt: str | None = None,
        prores_profile: str = "hq",
        audio_from: str | os.PathLike[str] | None = None,
        audio_start: float = 0.0,
        audio_duration: float | None = None,
        overwrite: bool = False,
        timestamps: Sequence[float] | None = None,
        preset: str | None = None,
        encoder_options: dict[str, str] | None = None,
    ) -> None:
        self.path = Path(path)
        self.fps = _as_fraction(fps)
        self.codec = codec.lower()
        if self.codec not in _CODECS:
            raise VideoError(f"unknown codec {codec!r}; use one of {', '.join(_CODECS)}")
        encoder, default_fmt, allowed = _CODECS[self.codec]
        self._options: dict[str, str] = {}
        if self.codec == "prores":
            if prores_profile not in _PRORES_PROFILES:
                raise VideoError(f"unknown ProRes profile {prores_profile!r}; use 'hq' or '4444'")
            profile, default_fmt = _PRORES_PROFILES[prores_profile]
            self._options.update({"profile": profile, "vendor": "apl0"})
        self.pix_fmt = pix_fmt or default_fmt
        if self.pix_fmt not in allowed:
            raise VideoError(f"pixel format {self.pix_fmt!r} is not available for {codec}; use one of {allowed}")
        if self.codec in ("h264", "h265"):
            self._options["crf"] = str(_DEFAULT_CRF[self.codec] if crf is None else crf)
            self._options["preset"] = preset or "medium"
            if self.codec == "h265":
                self._options["x265-params"] = "log-level=error"
        elif crf is not None:
            log.warning("crf is ignored for %s", self.codec)
        self._options.update(encoder_options or {})
        self._encoder_name = encoder
        self._timestamps = list(timestamps) if timestamps is not None else None
        self.overwrite = overwrite
        self.frames_written = 0
        self._closed = False
        self._aborted = False  # closed without output: close() then raises, it has no file to name
        self._kept: Path | None = None  # where our frames went when another run took the output name first
        self._size: tuple[int, int] | None = None
        self._container: Any = None
        self._stream: Any = None
        self._frame_encoder = _FrameEncoder(self.pix_fmt)
        self._pts: list[int] = []
        self._t0: float | None = None
        self._last_t: float | None = None
        self._last_gap: float | None = None
        self._audio: _AudioMuxer | None = None

        self._check_destination()
        if self.codec == "png":
            self._format = "png"
            _remove_stale_temps(self.path)
            self.temp_path = self.path.with_name(f".{self.path.name}.{_new_token()}.partial")
            if audio_from is not None:
                log.info("PNG sequence output: audio from %s is not written", audio_from)
            self._make_temp_dir()
        else:
            ext = self.path.suffix.lower()
            if ext not in _CONTAINER_FORMATS:
                raise VideoError(
                    f"cannot tell the container of {self.path} from its extension; use one of "
                    f"{', '.join(_CONTAINER_FORMATS)}"
                )
            self._format = _CONTAINER_FORMATS[ext]
            _remove_stale_temps(self.path)
            self.temp_path = self.path.with_name(f".{self.path.stem}.{_new_token()}.partial{self.path.suffix}")
            self._touch_temp()
            try:
                self._container = av.open(str(self.temp_path), mode="w", format=self._format)
                if encoder not in self._container.supported_codecs:
                    hint = {"prores": ".mov", "ffv1": ".mkv"}.get(self.codec, ".mp4/.mkv/.mov")
                    raise VideoError(f"{self._format} ({ext}) cannot hold {codec} video; write a {hint} file")
                if audio_from is not None:
                    try:
                        self._audio = _AudioMuxer(Path(audio_from), audio_start, audio_duration)
                    except LookupError:
                        log.warning("%s has no audio stream; writing video only", audio_from)
                    except av.error.FFmpegError as e:
                        raise VideoError(f"cannot read audio from {audio_from} ({e})") from e
            except BaseException:
                self.abort()
                raise

    # -- setup -----------------------------------------------------------------------------------------------

    def _check_destination(self) -> None:
        folder = self.path.parent
        if not folder.exists():
            raise VideoError(f"cannot write {self.path}: folder {folder} does not exist")
        if not folder.is_dir():
            raise VideoError(f"cannot write {self.path}: {folder} is not a folder")
        if self.path.exists() and not self.overwrite:
            raise VideoError(
                f"output {self.path} already exists: choose another name or allow replacing it (--overwrite on the "
                "command line, overwrite=True in Python)"
            )

    def _touch_temp(self) -> None:
        try:
            with open(self.temp_path, "xb"):  # the name is ours alone: never truncate another writer's file
                pass
        except OSError as e:
            raise VideoError(f"cannot write to output folder {self.path.parent}: {e.strerror or e}") from e

    def _make_temp_dir(self) -> None:
        try:
            self.temp_path.mkdir()
        except OSError as e:
            raise VideoError(f"cannot write to output folder {self.path.parent}: {e.strerror or e}") from e

    def _open_stream(self, width: int, height: int) -> None:
        pw, ph = self._frame_encoder.padded_size(width, height)
        if (pw, ph) != (width, height):
            log.info("padding %dx%d to %dx%d for %s", width, height, pw, ph, self.pix_fmt)
        if self.codec == "png":
            ctx = av.CodecContext.create("png", "w")
            ctx.width, ctx.height, ctx.pix_fmt = pw, ph, self.pix_fmt
            ctx.time_base = Fraction(self.fps.denominator, self.fps.numerator)
            self._stream = ctx
            return
        vfr = self._timestamps is not None
        stream = self._container.add_stream(self._encoder_name, rate=self.fps, options=dict(self._options))
        stream.width, stream.height, stream.pix_fmt = pw, ph, self.pix_fmt
        ctx = stream.codec_context
        ctx.time_base = _VFR_TIME_BASE if vfr else Fraction(self.fps.denominator, self.fps.numerator)
        stream.time_base = ctx.time_base
        ctx.framerate = self.fps
        if self._frame_encoder.yuv:
            ctx.color_range, ctx.colorspace, ctx.color_primaries, ctx.color_trc = 1, 1, 1, 1
        if self.codec == "h265" and self._format in ("mp4", "mov"):
            stream.codec_tag = "hvc1"  # what Apple players require for HEVC
        self._stream = stream
        if self._audio is not None:
            try:
                self._audio.add_to(self._container, self._format)
            except (ValueError, av.error.FFmpegError) as e:
                raise VideoError(f"cannot add the audio of {self._audio.source} to {self.path} ({e})") from e

    # -- writing ---------------------------------------------------------------------------------------------

    def write(self, frames: Any, timestamps: Sequence[float] | None = None) -> None:
        """Append frames (T, H, W, 3) float in [0, 1] (torch or numpy; uint8 is accepted too)."""
        if self._closed:
            raise VideoError(f"writer for {self.path} is already closed")
        rgb = _to_numpy_rgb(frames)
        t, h, w, _ = rgb.shape
        if t == 0:
            return
        if self._size is None:
            if self.frames_written == 0 and timestamps is not None and self._timestamps is None:
                self._timestamps = []
            self._size = (w, h)
            self._open_stream(w, h)
        elif self._size != (w, h):
            raise VideoError(f"frame size changed from {self._size[0]}x{self._size[1]} to {w}x{h} in {self.path}")
        times = self._frame_times(t, timestamps)
        try:
            for i, frame in enumerate(self._frame_encoder.frames(rgb)):
                if self.codec == "png":
                    self._write_png(frame)
                else:
                    frame.pts = times[i]
                    frame.time_base = self._stream.codec_context.time_base
                    self._container.mux(self._stream.encode(frame))
                self.frames_written += 1
            if self._audio is not None:
                self._audio.advance(self._container, self.duration)
        except OSError as e:
            if not _is_disk_full(e):
                raise
            # The muxer lost bytes mid-packet: what is on disk is no longer a file worth keeping.
            doing = f"writing frame {self.frames_written + 1}"
            self.abort()
            raise self._space_error(e, doing) from e

    def _frame_times(self, count: int, timestamps: Sequence[float] | None) -> list[int]:
        """pts in the codec time base: frame numbers (constant rate) or rounded timestamps (variable rate)."""
        if self._timestamps is None:
            return list(range(self.frames_written, self.frames_written + count))
        if timestamps is not None:
            if len(timestamps) != count:
                raise ValueError(f"got {len(timestamps)} timestamps for {count} frames")
            self._timestamps.extend(float(x) for x in timestamps)
        if len(self._timestamps) < self.frames_written + count:
            raise VideoError(
                f"{self.path}: no timestamp for frame {len(self._timestamps)} (give one per frame, in the "
                "constructor or to write())"
            )
        out = []
        for i in range(self.frames_written, self.frames_written + count):
            t = float(self._timestamps[i])
            if self._t0 is None:
                self._t0 = t
            if self._last_t is not None:
                if t <= self._last_t:
                    raise VideoError(f"{self.path}: timestamps must increase (frame {i}: {t} after {self._last_t})")
                self._last_gap = t - self._last_t
            self._last_t = t
            pts = round((t - self._t0) / _VFR_TIME_BASE)
            if self._pts and pts <= self._pts[-1]:
                pts = self._pts[-1] + 1
            self._pts.append(pts)
            out.append(pts)
        del self._pts[:-1]
        return out

    def _write_png(self, frame: av.VideoFrame) -> None:
        data = b"".join(bytes(p) for p in self._stream.encode(frame))
        with open(self.temp_path / f"frame_{self.frames_written + 1:06d}.png", "wb") as f:
            f.write(data)

    @property
    def duration(self) -> float:
        """Seconds of video written so far (last timestamp plus one frame for variable-rate output)."""
        if self.frames_written == 0:
            return 0.0
        if self._timestamps is None or self._t0 is None or self._last_t is None:
            return self.frames_written / float(self.fps)
        step = self._last_gap if self._last_gap is not None else 1.0 / float(self.fps)
        return self._last_t - self._t0 + step

    # -- finishing -------------------------------------------------------------------------------------------

    def close(self) -> Path:
        """Flush the encoder, finish the file and move it to its final name; returns that path."""
        if self._aborted:
            if self._kept is not None:
                raise VideoError(f"{self.path} was created by another run; this run's frames are in {self._kept}")
            raise VideoError(f"writing {self.path} was aborted; nothing was saved")
        if self._closed:
            return self.path
        if self.frames_written == 0:
            self.abort()
            raise VideoError(f"no frames were written to {self.path}; nothing was saved")
        try:
            if self.codec == "png":
                pass
            else:
                self._container.mux(self._stream.encode(None))
                if self._audio is not None:
                    self._audio.advance(self._container, self.duration, final=True)
                self._container.close()
                self._container = None
            self._install()
        except OSError as e:
            self.abort()
            if _is_disk_full(e):
                raise self._space_error(e, f"finishing the file after {self.frames_written} frames") from e
            raise
        except BaseException:
            self.abort()
            raise
        finally:
            if self._audio is not None:
                self._audio.close()
                self._audio = None
        self._closed = True
        return self.path

    def finalize_partial(self) -> Path | None:
        """For interrupt handlers: keep what was written as a valid file, or nothing if no frame was."""
        if self._aborted:
            return None
        if self._closed:
            return self.path
        if self.frames_written == 0:
            self.abort()
            return None
        return self.close()

    def _space_error(self, error: OSError, doing: str) -> VideoError:
        """A full device, quota or file size limit in plain words, naming the output rather than the hidden temp."""
        if error.errno == errno.EFBIG:
            what = f"{self.path} reached the largest file size allowed there (a file system or process size limit)"
        elif error.errno == errno.ENOSPC:
            what = f"no space left on the device holding {self.path}"
        else:
            what = f"the disk quota (space allowed to this user) is used up on the device holding {self.path}"
        kind = "folder" if self.codec == "png" else "file"
        return VideoError(f"{what} ({doing}); the partial {kind} was removed")

    def _install(self) -> None:
        """Give the finished temporary its final name: the one step where runs writing the same output meet."""
        if self.overwrite:
            self._install_replacing()
            return
        try:
            _move_exclusive(self.temp_path, self.path)
        except FileExistsError:
            raise self._keep_after_conflict() from None

    def _install_replacing(self) -> None:
        """Last one to finish wins. A folder in the way (a PNG sequence) is first renamed aside, as nothing can be
        renamed onto a non-empty folder; if another run installs between the two renames, its folder goes aside
        too, and the folders set aside are deleted once ours is in place."""
        aside: list[Path] = []
        try:
            for _ in range(8):
                if self.path.is_dir() and not self.path.is_symlink():
                    stray = [p.name for p in self.path.iterdir() if not re.fullmatch(r"frame_\d+\.png", p.name)]
                    if stray:
                        raise VideoError(f"refusing to replace folder {self.path}: it holds other files ({stray[0]})")
                    # A temporary name with our pid: if we die before deleting it, the next writer does.
                    hidden = self.path.with_name(f".{self.path.name}.{_new_token()}.partial")
                    try:
                        os.rename(self.path, hidden)
                        aside.append(hidden)
                    except FileNotFoundError:  # another run moved it first
                        continue
                try:
                    os.replace(self.temp_path, self.path)
                    return
                except OSError:
                    if not self.path.is_dir():
                        raise
            raise VideoError(f"could not replace {self.path}: other runs kept installing a folder there")
        finally:
            for folder in aside:
                shutil.rmtree(folder, ignore_errors=True)

    def _keep_after_conflict(self) -> VideoError:
        """The output appeared while we were writing: leave it alone, and keep our finished frames under a visible
        sibling name rather than discard them."""
        base, ext = (self.path.name, "") if self.codec == "png" else (self.path.stem, self.path.suffix)
        kept = self.path.with_name(f"{base}.conflict-{os.getpid()}-{secrets.token_hex(3)}{ext}")
        try:
            _move_exclusive(self.temp_path, kept)
        except OSError:
            kept = self.temp_path  # still complete under its hidden name; the message says where
        self._kept = kept
        return VideoError(
            f"output {self.path} was created by another run while this one was writing, so it was left as it is; "
            f"the {self.frames_written} finished frames were kept in {kept}"
        )

    def abort(self) -> None:
        """Stop without output: close everything and delete the temporary file or folder (after a completed
        close() this does nothing: the finished file stays)."""
        if self._closed and not self._aborted:
            return
        self._closed = self._aborted = True
        if self._container is not None:
            try:
                self._container.close()
            except Exception:  # noqa: BLE001 - the file is being thrown away anyway
                pass
            self._container = None
        if self._audio is not None:
            self._audio.close()
            self._audio = None
        temp = getattr(self, "temp_path", None)
        if temp is not None and getattr(self, "_kept", None) is None:  # kept frames are the user's, not ours
            if temp.is_dir():
                shutil.rmtree(temp, ignore_errors=True)
            elif temp.exists():
                try:
                    temp.unlink()
                except OSError:
                    pass

    def __del__(self) -> None:  # a writer dropped without close() must not leave a temp file behind
        if not getattr(self, "_closed", True):
            try:
                self.abort()
            except Exception:  # noqa: BLE001
                pass


class BackgroundWriter(_Finishing):
    """A VideoWriter fed through a worker thread: a chunk's frames are converted and encoded while the GPU computes
    the next chunk, not between chunks (x264 at 1080p takes a large share of a chunk's GPU time, which the GPU spent
    idle). At most `depth` chunks wait in the queue, so memory stays bounded. An error in the worker (disk full, a
    size change) is raised by the next call here, and the partial file is then thrown away as VideoWriter does.
    `close`, `finalize_partial` and `abort` first let the worker finish (`abort` drops what still waits)."""

    def __init__(self, writer: VideoWriter, depth: int = 2) -> None:
        import queue
        import threading

        self.writer = writer
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._error: BaseException | None = None
        self._dropping = False
        self._failed = False
        self._accepted = 0
        self._thread = threading.Thread(target=self._work, name="infvsr-video-writer", daemon=True)
        self._thread.start()

    @property
    def path(self) -> Path:
        return self.writer.path

    @property
    def frames_written(self) -> int:
        """Frames handed over so far, queued ones included: what close() or finalize_partial() will have written
        (a progress or preview count taken now then matches the finished file)."""
        return self._accepted

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            if self._error is None and not self._dropping:
                try:
                    self.writer.write(*item)
                except BaseException as error:  # noqa: BLE001 - handed to the caller's thread
                    self._error = error

    def _check(self) -> None:
        """Raise the worker's error, once the worker has stopped: the partial output is thrown away."""
        if self._error is None:
            return
        error, self._dropping, self._failed = self._error, True, True
        self._stop()
        self._error = None
        self.writer.abort()
        raise error

    def _stop(self) -> None:
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()

    def write(self, frames: Any, timestamps: Sequence[float] | None = None) -> None:
        """Queue frames (as VideoWriter.write takes them); blocks while `depth` chunks already wait."""
        self._check()
        if self._failed or not self._thread.is_alive():
            raise VideoError(f"writer for {self.path} is already closed")
        self._queue.put((frames, None if timestamps is None else list(timestamps)))
        self._accepted += len(frames)

    def close(self) -> Path:
        """Encode what is queued, then VideoWriter.close (flush, finish, move to the final name)."""
        self._stop()
        self._check()
        if self._failed:
            raise VideoError(f"writing {self.path} failed earlier; nothing was saved")
        return self.writer.close()

    def finalize_partial(self) -> Path | None:
        """For interrupt handlers: encode what is queued and keep it all as a valid file (None if no frame)."""
        self._stop()
        if self._failed:
            return None
        if self._error is not None:  # not raised yet: the caller is busy with an interrupt, so say it here
            log.warning("%s", self._error)
            self._error = None  # what was written before it stays usable (a full disk already removed the file)
        return self.writer.finalize_partial()

    def abort(self) -> None:
        """Drop what is queued and delete the temporary output."""
        self._dropping = True
        self._stop()
        self._error = None
        self.writer.abort()
