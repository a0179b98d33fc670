"""Colour conversion of the reader against an independent float64 reference, on real and synthetic clips."""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np
import pytest
import torch

from infvsr_core.io import VideoReader, VideoWriter
from tests.io_media import BIKES, DOG, make_clip

pytestmark = pytest.mark.skipif(not BIKES.exists(), reason="shared test clips are missing")


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("io")


# ---------------------------------------------------------------------------------------------------------------
# An independent float64 YUV -> RGB reference, computed from raw planes
# ---------------------------------------------------------------------------------------------------------------

KR_KB = {"bt709": (0.2126, 0.0722), "bt601": (0.299, 0.114), "bt2020": (0.2627, 0.0593)}


def _interp(c: np.ndarray, n: int, axis: int, centred: bool) -> np.ndarray:
    """Linear upsampling by 2 along axis to n samples; chroma sample j sits at 2j (co-sited) or 2j + 0.5."""
    m = c.shape[axis]
    x = np.arange(n, dtype=np.float64)
    src = np.clip((x - 0.5) / 2 if centred else x / 2, 0, m - 1)
    i0 = np.floor(src).astype(int)
    i1 = np.minimum(i0 + 1, m - 1)
    f = src - i0
    shape = [1, 1]
    shape[axis] = n
    f = f.reshape(shape)
    return np.take(c, i0, axis=axis) * (1 - f) + np.take(c, i1, axis=axis) * f


def reference_rgb(planes: list[np.ndarray], bits: int, matrix: str, full: bool, centred_h: bool = False) -> np.ndarray:
    y, u, v = (p.astype(np.float64) for p in planes)
    h, w = y.shape
    if u.shape[0] != h:
        u, v = _interp(u, h, 0, True), _interp(v, h, 0, True)
    if u.shape[1] != w:
        u, v = _interp(u, w, 1, centred_h), _interp(v, w, 1, centred_h)
    if full:
        peak = 2**bits - 1
        y, u, v = y / peak, (u - 2 ** (bits - 1)) / peak, (v - 2 ** (bits - 1)) / peak
    else:
        k = 2 ** (bits - 8)
        y, u, v = (y / k - 16) / 219, (u / k - 128) / 224, (v / k - 128) / 224
    kr, kb = KR_KB[matrix]
    r = y + 2 * (1 - kr) * v
    b = y + 2 * (1 - kb) * u
    g = (y - kr * r - kb * b) / (1 - kr - kb)
    return np.clip(np.stack([r, g, b], -1), 0, 1)


def raw_planes(frame: av.VideoFrame) -> list[np.ndarray]:
    dt = np.uint16 if frame.format.components[0].bits > 8 else np.uint8
    out = []
    for p in frame.planes[:3]:
        out.append(np.frombuffer(p, dt).reshape(p.height, -1)[:, : p.width].copy())
    return out


def random_planes(pix_fmt: str, w: int, h: int, rng: np.random.Generator, full: bool) -> list[np.ndarray]:
    """Saturated colours: smooth chroma ramps plus noise, across the whole legal code range."""
    frame = av.VideoFrame(w, h, pix_fmt)
    bits = frame.format.components[0].bits
    unit = 2 ** (bits - 8)
    out = []
    for i, p in enumerate(frame.planes):
        lo, hi = (0, 2**bits - 1) if full else ((16 * unit, 235 * unit) if i == 0 else (16 * unit, 240 * unit))
        yy, xx = np.mgrid[0 : p.height, 0 : p.width]
        smooth = (xx / max(p.width - 1, 1) + (yy / max(p.height - 1, 1) if i != 1 else 0)) / (2 if i != 1 else 1)
        value = lo + (hi - lo) * (0.8 * smooth + 0.2 * rng.random((p.height, p.width)))
        out.append(np.round(value).astype(np.uint16 if bits > 8 else np.uint8))
    return out


# ---------------------------------------------------------------------------------------------------------------
# Colour conversion against the float reference
# ---------------------------------------------------------------------------------------------------------------


def test_dog_bt709_limited_matches_float_reference_and_vfr_survives_writing(work: Path) -> None:
    """Real phone clip: frame 0 equals a float64 BT.709 limited-range conversion of its raw planes; the
    variable timestamps (first gap 185 ms, then 33.3 ms) come back identical from a written copy."""
    with VideoReader(DOG, max_frames=12) as reader:
        assert (reader.info.color_matrix, reader.info.color_range) == ("bt709", "tv")
        chunks = list(reader.read_chunks(6))
    frames = torch.cat([c.frames for c in chunks])
    pts = [t for c in chunks for t in c.pts_seconds]
    assert pts[1] == pytest.approx(16610 / 90000, abs=1e-9)  # 184.6 ms
    assert np.diff(pts[1:]) == pytest.approx(2999 / 90000, abs=1e-6)
    with av.open(str(DOG)) as container:
        raw = raw_planes(next(container.decode(video=0)))
    ref = reference_rgb(raw, 8, "bt709", full=False)
    assert np.abs(frames[0].numpy() - ref).max() < 1e-4

    out = work / "dog_vfr.mp4"
    with VideoWriter(out, reader.info.fps, codec="h264", preset="ultrafast") as writer:
        for c in chunks:
            writer.write(c.frames[:, ::4, ::4], timestamps=c.pts_seconds)
    with VideoReader(out) as back:
        again = back.read_all()
        assert (back.info.width, back.info.height) == (480, 270)
    assert len(again) == 12
    assert again.pts_seconds == pytest.approx(pts, abs=1.5 / 90000)


@pytest.mark.parametrize(
    "pix_fmt, codec, matrix, full",
    [
        ("yuv420p", "libx264", "bt601", True),  # full-range H.264 decodes as yuvj420p
        ("yuv420p", "ffv1", "bt709", False),
        ("yuv444p", "ffv1", "bt601", True),
        ("yuv422p", "ffv1", "bt709", False),
        ("yuv420p10le", "ffv1", "bt709", False),
        ("yuv422p10le", "ffv1", "bt601", True),
        ("yuv444p10le", "ffv1", "bt2020", False),
    ],
)
def test_colour_conversion_matches_float_reference(
    work: Path, pix_fmt: str, codec: str, matrix: str, full: bool
) -> None:
    """Losslessly stored test planes (odd width and height) with tags set through PyAV decode to the float64
    reference within float32 precision; a wrong matrix or range would be off by far more (checked too)."""
    rng = np.random.default_rng(7)
    w, h = 66, 38 if "420" in pix_fmt else 37
    clip = [random_planes(pix_fmt, w, h, rng, full) for _ in range(2)]
    path = work / f"colour_{pix_fmt}_{matrix}_{codec}.mkv"
    spc = {"bt709": 1, "bt601": 6, "bt2020": 9}[matrix]
    options = {"qp": "0", "preset": "ultrafast"} if codec == "libx264" else {}
    make_clip(path, clip, pix_fmt=pix_fmt, codec=codec, options=options, colorspace=spc, color_range=2 if full else 1)
    with av.open(str(path)) as container:
        decoded = [raw_planes(f) for f in container.decode(video=0)]
    for a, b in zip(decoded[0], clip[0], strict=True):
        np.testing.assert_array_equal(a, b)  # really lossless: the reference sees what was written
    with VideoReader(path) as reader:
        assert (reader.info.color_matrix, reader.info.color_range) == (matrix, "pc" if full else "tv")
        got = reader.read_all().frames.numpy()
    bits = 10 if "10" in pix_fmt else 8
    for i in range(2):
        ref = reference_rgb(decoded[i], bits, matrix, full)
        assert np.abs(got[i] - ref).max() < 2e-5
    wrong_matrix = reference_rgb(decoded[0], bits, "bt709" if matrix != "bt709" else "bt601", full)
    wrong_range = reference_rgb(decoded[0], bits, matrix, not full)
    assert np.abs(got[0] - wrong_matrix).max() > 0.02
    assert np.abs(got[0] - wrong_range).max() > 0.02


def test_colour_override_and_untagged_guess(work: Path) -> None:
    rng = np.random.default_rng(3)
    clip = [random_planes("yuv444p", 32, 16, rng, False)]
    path = work / "untagged.mkv"
    make_clip(path, clip, pix_fmt="yuv444p")
    with VideoReader(path) as reader:
        assert (reader.info.color_matrix, reader.info.color_range, reader.info.color_tagged) == ("bt601", "tv", False)
    with VideoReader(path, color_matrix="bt709", color_range="pc") as reader:
        got = reader.read_all().frames[0].numpy()
    assert np.abs(got - reference_rgb(clip[0], 8, "bt709", True)).max() < 2e-5
