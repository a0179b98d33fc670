"""Colour science: decoded frames to float RGB (reading) and float RGB to frames to encode (writing).

Frames in the core are float32 tensors ``(T, H, W, 3)`` in ``[0, 1]`` (ComfyUI's IMAGE layout).

Reading converts samples to float RGB here, from the raw planes, not by swscale: with the FFmpeg 8 build PyAV 18
ships, ``to_ndarray(format="rgb48le" / "gbrpf32le")`` truncates YUV results to the input's bit depth (a mean bias
of -0.5 code value), puts 4:2:0 chroma at the centre instead of H.264's co-sited position, gives garbage for some
flag combinations (``FULL_CHR_H_INT`` with rgb48le), and even maps 8-bit ``bgr0`` to ``rgb48le`` inexactly. This
path is exact (float32) and explicit:

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

Writing converts YUV outputs with the BT.709 limited-range matrix and tags them BT.709 / limited. 4:2:0 chroma
is filtered [1 2 1]/4 horizontally around the even columns (co-sited) and averaged vertically, matching the
siting the reader assumes. Odd sizes are padded by replicating the last row/column up to what the pixel format
needs (even width and height for 4:2:0, even width for 4:2:2).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from typing import Any

import av
import numpy as np
import torch

from ..errors import VideoError

log = logging.getLogger(__name__)


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
    full-size intermediate: this conversion is memory-bound, so every full-resolution pass counts.
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


def _plane_array(plane: Any, dtype: Any, samples_per_pixel: int = 1) -> np.ndarray:
    """A copy of one plane's visible samples (FFmpeg pads each line to line_size bytes)."""
    dt = np.dtype(dtype)
    buf = np.frombuffer(plane, dtype=dt).reshape(plane.height, plane.line_size // dt.itemsize)
    return buf[:, : plane.width * samples_per_pixel].copy()


_PACKED_RGB = re.compile(r"^(rgb|bgr|rgba|bgra|argb|abgr|rgb0|bgr0|0rgb|0bgr)(24|48|64)?(le|be)?$")
_PLANAR_RGB = re.compile(r"^gbra?p(\d+)?(le|be)?$")
_GRAY = re.compile(r"^gray(\d+)?(le|be)?$")


class FrameConverter:
    """Turns decoded frames of one stream into float RGB, batch by batch (the module docstring says how).

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
        """Chroma subsampling, and the planar format swscale repacks into when the samples are not planar."""
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
        """How to read RGB or grey samples directly; anything else goes through swscale to rgb24."""
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
        """Repacking only: the same matrix and range on both sides, so swscale changes no colour."""
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


def to_float_rgb(frames: Any) -> torch.Tensor:
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


class FrameEncoder:
    """RGB float -> av.VideoFrame of a given pixel format (BT.709 limited for YUV, as the module docstring says).

    Samples are computed with few full-resolution passes and written straight into FFmpeg's frame buffers: an
    upscaled frame is large enough that extra passes would cost as much as the encoder's own colour work.
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
        """The frame size the chroma layout needs (even width and/or height for subsampled chroma)."""
        return width + (-width % self.sub_w), height + (-height % self.sub_h)

    def _buffer(self, name: str, *shape: int) -> torch.Tensor:
        """Scratch tensors reused from frame to frame (fresh frame-sized allocations cost page faults each time)."""
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
        """Y at full resolution, then Cb/Cr from the low-passed RGB, quantised into the frame's planes."""
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
        """Quantised RGB samples in the layout of the frame's packed or planar (G, B, R) format."""
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
