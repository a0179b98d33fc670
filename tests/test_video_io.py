"""Video input/output: real clips, colour accuracy against a float reference, every writer format, bad inputs."""

from __future__ import annotations

import os
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from infvsr_core.video_io import BackgroundWriter, VideoError, VideoReader, VideoWriter, probe

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
if not DATA.is_dir():
    DATA = Path("/work/shared/data")
BIKES = DATA / "real_bikes_cuts_640x272.mp4"
DOG = DATA / "real_dog_phone_1080p.mp4"

pytestmark = pytest.mark.skipif(not BIKES.exists(), reason="shared test clips are missing")


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = float(torch.mean((a.double() - b.double()) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(1 / mse)


@pytest.fixture(scope="module")
def bikes() -> torch.Tensor:
    """The first 24 frames of the cut clip (640x272), read once for the writer tests."""
    with VideoReader(BIKES, max_frames=24) as reader:
        return reader.read_all().frames


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("video_io")


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


def make_clip(
    path: Path,
    frames: list[list[np.ndarray]] | list[np.ndarray],
    *,
    pix_fmt: str = "yuv420p",
    codec: str = "ffv1",
    options: dict[str, str] | None = None,
    colorspace: int | None = None,
    color_range: int | None = None,
    rate: Fraction = Fraction(25),
    pts: list[int] | None = None,
    time_base: Fraction | None = None,
    rotation: float | None = None,
) -> None:
    """Encode raw planes (or RGB uint8 frames) with PyAV, setting tags, pts and rotation as a camera would."""
    out = av.open(str(path), "w")
    stream = out.add_stream(codec, rate=rate, options=options or {})
    first = frames[0]
    h, w = first[0].shape if isinstance(first, list) else first.shape[:2]
    stream.width, stream.height, stream.pix_fmt = w, h, pix_fmt
    if colorspace is not None:
        stream.codec_context.colorspace = colorspace
    if color_range is not None:
        stream.codec_context.color_range = color_range
    if time_base is not None:
        stream.codec_context.time_base = time_base
        stream.time_base = time_base
    if rotation is not None:
        stream.set_display_rotation(rotation)
    for i, data in enumerate(frames):
        if isinstance(data, list):
            frame = av.VideoFrame(w, h, pix_fmt)
            for plane, array in zip(frame.planes, data, strict=False):
                np.frombuffer(plane, array.dtype).reshape(plane.height, -1)[:, : plane.width] = array
        else:
            frame = av.VideoFrame.from_ndarray(data, format="rgb24").reformat(format=pix_fmt)
        if colorspace is not None:
            frame.colorspace = colorspace
        if color_range is not None:
            frame.color_range = color_range
        frame.pts = pts[i] if pts is not None else i
        if time_base is not None:
            frame.time_base = time_base
        out.mux(stream.encode(frame))
    out.mux(stream.encode())
    out.close()


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
# Real clips
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, size, count, fps, tags",
    [
        ("real_bikes_cuts_640x272.mp4", (640, 272), 100, Fraction(25), ("bt601", "tv", False)),
        ("real_bikes_street_640x272.mp4", (640, 272), 61, Fraction(25), ("bt601", "tv", False)),
        ("real_cockatoo_720p.mp4", (1280, 720), 120, Fraction(20), ("bt709", "tv", False)),
        ("real_dog_phone_1080p.mp4", (1920, 1080), 41, Fraction(369000, 13657), ("bt709", "tv", True)),
        ("synthetic_pan_trees_720p.mp4", (1280, 720), 96, Fraction(24), ("bt709", "tv", True)),
    ],
)
def test_probe_real_clips(name: str, size: tuple[int, int], count: int, fps: Fraction, tags: tuple) -> None:
    """Size, count and exact rate; bikes_cuts has all-zero timestamps (its average rate reads 2500 fps) and
    the dog is VFR (average rate 41 frames / 1.517 s); untagged clips get the player's guess."""
    info = probe(DATA / name)
    assert (info.width, info.height) == size
    assert info.frame_count == count
    assert info.fps == fps and isinstance(info.fps, Fraction)
    assert (info.color_matrix, info.color_range, info.color_tagged) == tags
    assert info.pix_fmt == "yuv420p" and info.bit_depth == 8 and info.rotation == 0
    assert not info.has_audio and info.audio_codec is None
    assert info.duration == pytest.approx(count / float(fps), rel=0.05)


def test_read_bikes_chunks_timestamps_and_colours() -> None:
    """All 100 frames stream in chunks with exact indices; the broken (all zero) pts are rebuilt at 1/fps; the
    colours agree with swscale's own rgb24 decode (independent code, other chroma siting) to > 38 dB."""
    with VideoReader(BIKES) as reader:
        chunks = list(reader.read_chunks(16))
    assert [c.index for c in chunks] == list(range(0, 100, 16))
    assert [len(c) for c in chunks] == [16] * 6 + [4]
    frames = torch.cat([c.frames for c in chunks])
    assert frames.shape == (100, 272, 640, 3) and frames.dtype == torch.float32
    assert 0.0 <= float(frames.min()) and float(frames.max()) <= 1.0
    pts = [t for c in chunks for t in c.pts_seconds]
    assert pts == pytest.approx([i / 25 for i in range(100)], abs=1e-9)
    with av.open(str(BIKES)) as container:
        swscale = [f.to_ndarray(format="rgb24") for _, f in zip(range(8), container.decode(video=0), strict=False)]
    assert psnr(frames[:8], torch.from_numpy(np.stack(swscale)).float() / 255) > 38


def test_start_and_max_frames_select_exact_frames() -> None:
    with VideoReader(BIKES, max_frames=40) as reader:
        full = reader.read_all()
        part = list(reader.read_chunks(3, start=20, max_frames=7))
    assert [c.index for c in part] == [20, 23, 26]
    assert sum(len(c) for c in part) == 7
    assert torch.equal(torch.cat([c.frames for c in part]), full.frames[20:27])
    assert [t for c in part for t in c.pts_seconds] == full.pts_seconds[20:27]
    with VideoReader(BIKES, start=98) as reader:  # runs off the end: only what exists
        assert len(reader.read_all()) == 2


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


# ---------------------------------------------------------------------------------------------------------------
# Colour conversion against the float reference
# ---------------------------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------------------------
# Writers
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, kwargs, expect_fmt, min_psnr",
    [
        ("h264.mp4", {"codec": "h264", "crf": 10, "preset": "veryfast"}, "yuv420p", 40),
        ("h264_444.mkv", {"codec": "h264", "crf": 10, "pix_fmt": "yuv444p", "preset": "veryfast"}, "yuv444p", 40),
        ("h265.mp4", {"codec": "h265", "crf": 10, "preset": "ultrafast"}, "yuv420p10le", 40),
        ("prores_hq.mov", {"codec": "prores"}, "yuv422p10le", 45),
        ("prores_4444.mov", {"codec": "prores", "prores_profile": "4444"}, "yuv444p12le", 45),
        ("ffv1.mkv", {"codec": "ffv1"}, "bgr0", None),
        ("png_frames", {"codec": "png"}, "rgb24", None),
    ],
)
def test_writer_formats_round_trip(
    work: Path, bikes: torch.Tensor, name: str, kwargs: dict, expect_fmt: str, min_psnr: float | None
) -> None:
    """Every format, written in several write() calls, reads back with the right size, count, rate, pixel
    format and BT.709 limited tags; lossless formats are exact to 8 bits, lossy ones above a PSNR floor."""
    frames = bikes[:12]
    out = work / name
    with VideoWriter(out, Fraction(25), **kwargs) as writer:
        writer.write(frames[:5])
        writer.write(frames[5:].numpy())  # numpy works too
        assert writer.frames_written == 12
    assert out.exists() and not list(work.glob(f".{out.stem}.*partial*"))
    with VideoReader(out, fps=25) as reader:
        info = reader.info
        back = reader.read_all()
    assert (info.width, info.height, len(back), info.fps) == (640, 272, 12, Fraction(25))
    assert info.pix_fmt == expect_fmt
    if expect_fmt.startswith("yuv"):
        assert (info.color_matrix, info.color_range, info.color_tagged) == ("bt709", "tv", True)
    if min_psnr is None:
        assert torch.equal((back.frames * 255).round(), (frames * 255).round())
    else:
        assert psnr(back.frames, frames) > min_psnr
    if kwargs["codec"] == "png":
        assert sorted(p.name for p in out.iterdir())[:2] == ["frame_000001.png", "frame_000002.png"]
    if kwargs["codec"] == "prores":
        with av.open(str(out)) as container:
            profile = container.streams.video[0].codec_context.profile
        assert profile == {"hq": "HQ", "4444": "4444"}[kwargs.get("prores_profile", "hq")]
    if kwargs["codec"] == "h265":
        with av.open(str(out)) as container:
            assert container.streams.video[0].codec_tag == "hvc1"


def test_h265_keeps_10_bit_precision(work: Path) -> None:
    """A horizontal ramp with 1024 levels survives as far more than 256 distinct values."""
    ramp = torch.linspace(0, 1, 1024).view(1, 1, 1024, 1).expand(3, 64, 1024, 3).contiguous()
    out = work / "ramp10.mkv"
    with VideoWriter(out, 25, codec="h265", crf=4, preset="ultrafast") as writer:
        writer.write(ramp)
    with VideoReader(out) as reader:
        assert reader.info.bit_depth == 10
        back = reader.read_all().frames
    row = back[0, 32, 16:-16, 1]
    assert len(torch.unique((row * 1023).round())) > 600
    assert psnr(back, ramp) > 50


def test_odd_size_is_padded_for_420_and_kept_for_444(work: Path, bikes: torch.Tensor) -> None:
    frames = bikes[:3, :57, :101]
    out = work / "odd.mp4"
    with VideoWriter(out, 25, crf=8, preset="ultrafast") as writer:
        writer.write(frames)
    with VideoReader(out) as reader:
        back = reader.read_all().frames
    assert back.shape == (3, 58, 102, 3)  # one replicated row and column
    assert psnr(back[:, :57, :101], frames) > 40
    assert psnr(back[:, :57, 101], frames[:, :, 100]) > 35
    assert psnr(back[:, 57, :101], frames[:, 56, :]) > 35
    out444 = work / "odd444.mkv"
    with VideoWriter(out444, 25, codec="ffv1") as writer:
        writer.write(frames)
    with VideoReader(out444) as reader:
        assert reader.read_all().frames.shape == (3, 57, 101, 3)


# ---------------------------------------------------------------------------------------------------------------
# Rotation, variable frame rate, image folders
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("degrees, corner", [(90, (-1, 0)), (-90, (0, -1)), (180, (-1, -1))])
def test_rotation_metadata_is_applied(work: Path, degrees: int, corner: tuple[int, int]) -> None:
    """PyAV 18 writes the display matrix (set_display_rotation, counter-clockwise degrees); a white mark in the
    stored top-left corner must end up where a counter-clockwise rotation by that angle puts it."""
    image = np.zeros((32, 64, 3), np.uint8)
    image[:8, :8] = 255
    path = work / f"rot{degrees}.mp4"
    make_clip(path, [image] * 2, codec="libx264", options={"qp": "0"}, rotation=degrees)
    info = probe(path)
    assert info.rotation == degrees % 360
    expect = (32, 64) if degrees == 180 else (64, 32)
    assert (info.height, info.width) == expect
    with VideoReader(path) as reader:
        frame = reader.read_all().frames[0]
    assert frame.shape[:2] == expect
    ys = (0, 7) if corner[0] == 0 else (-8, -1)
    xs = (0, 7) if corner[1] == 0 else (-8, -1)
    assert float(frame[ys[0] : ys[1] or None, xs[0] : xs[1] or None].mean()) > 0.9
    assert float(frame[ys[0], xs[0]].mean()) > 0.9 and float(frame.mean()) < 0.1
    with VideoReader(path, apply_rotation=False) as reader:
        assert reader.read_all().frames.shape[1:3] == (32, 64)


def test_vfr_input_with_explicit_pts(work: Path) -> None:
    """A clip with irregular pts (ms): read pts, write them back, read again: same timing."""
    rng = np.random.default_rng(1)
    images = [rng.integers(0, 255, (48, 64, 3), dtype=np.uint8) for _ in range(6)]
    pts_ms = [0, 40, 80, 200, 240, 250]
    src = work / "vfr_src.mkv"
    make_clip(src, images, codec="libx264", options={"qp": "0"}, pts=pts_ms, time_base=Fraction(1, 1000))
    with VideoReader(src) as reader:
        got = reader.read_all()
    assert got.pts_seconds == pytest.approx([t / 1000 for t in pts_ms], abs=1e-9)
    out = work / "vfr_out.mp4"
    with VideoWriter(out, 25, timestamps=got.pts_seconds, crf=0, preset="ultrafast") as writer:
        writer.write(got.frames)
    with VideoReader(out) as reader:
        assert reader.read_all().pts_seconds == pytest.approx(got.pts_seconds, abs=1e-4)


def test_image_folder_natural_sort_and_fps(work: Path, bikes: torch.Tensor) -> None:
    folder = work / "numbered"
    folder.mkdir()
    u8 = (bikes[:3, :40, :48] * 255).round().to(torch.uint8).numpy()
    for name, image in zip(["img10.png", "img2.png", "img1.png"], [u8[2], u8[1], u8[0]], strict=True):
        av.VideoFrame.from_ndarray(image, format="rgb24").save(str(folder / name))
    av.VideoFrame.from_ndarray(u8[0], format="rgb24").save(str(folder / "img11.jpg"))  # 4th after natural sort
    (folder / "notes.txt").write_text("ignored")
    with VideoReader(folder, fps=Fraction(12)) as reader:
        assert reader.info.is_image_sequence and reader.info.frame_count == 4
        got = reader.read_all()
    assert got.pts_seconds == pytest.approx([0, 1 / 12, 2 / 12, 3 / 12])
    assert np.array_equal((got.frames[:3] * 255).round().numpy().astype(np.uint8), u8)
    assert psnr(got.frames[3], got.frames[0]) > 30  # the JPEG (yuvj, BT.601 full range) decodes correctly
    with VideoReader(folder) as reader:
        assert reader.info.fps == 24
    empty = work / "empty_folder"
    empty.mkdir()
    with pytest.raises(VideoError, match="holds no image frames"):
        VideoReader(empty)


# ---------------------------------------------------------------------------------------------------------------
# Audio
# ---------------------------------------------------------------------------------------------------------------


def make_av_clip(path: Path, acodec: str, rate: int = 48000, seconds: float = 3.0, fps: int = 25) -> None:
    """A video whose sound is silence with 20 ms beeps at 0.5 s and 1.0 s, to check sync after cutting."""
    out = av.open(str(path), "w")
    video = out.add_stream("libx264", rate=fps, options={"preset": "ultrafast"})
    video.width, video.height, video.pix_fmt = 64, 48, "yuv420p"
    audio = out.add_stream(acodec, rate=rate)
    audio.layout = "mono"
    n = int(seconds * rate)
    t = np.arange(n) / rate
    signal = np.zeros(n, np.float32)
    for start in (0.5, 1.0):
        on = (t >= start) & (t < start + 0.02)
        signal[on] = 0.8 * np.sin(2 * np.pi * 1000 * t[on])
    fmt = audio.codec_context.format.name
    step = audio.codec_context.frame_size or 1024
    done = 0
    for i in range(int(seconds * fps)):
        image = np.full((48, 64, 3), (i * 3) % 256, np.uint8)
        frame = av.VideoFrame.from_ndarray(image, format="rgb24")
        frame.pts = i
        out.mux(video.encode(frame))
        while done < n and done / rate < (i + 1) / fps:
            chunk = signal[done : done + step]
            data = (chunk * 32767).astype(np.int16) if fmt.startswith("s16") else chunk
            aframe = av.AudioFrame.from_ndarray(
                data[None, :], format="s16" if fmt.startswith("s16") else "fltp", layout="mono"
            )
            aframe.sample_rate, aframe.pts, aframe.time_base = rate, done, Fraction(1, rate)
            out.mux(audio.encode(aframe))
            done += len(chunk)
    out.mux(video.encode())
    out.mux(audio.encode())
    out.close()


def stream_span(path: Path, kind: str) -> tuple[float, float, str]:
    """(start, end) in seconds of what a player presents, and the codec: video from its packets, audio from
    its decoded frames (AAC's priming samples have negative timestamps and are dropped by the decoder)."""
    with av.open(str(path)) as container:
        stream = getattr(container.streams, kind)[0]
        if kind == "video":
            packets = [p for p in container.demux(stream) if p.pts is not None]
            tb = stream.time_base
            return (
                float(min(p.pts for p in packets) * tb),
                float(max(p.pts + p.duration for p in packets) * tb),
                stream.codec_context.name,
            )
        frames = [(float(f.pts * f.time_base), f.samples / f.sample_rate) for f in container.decode(stream)]
        return frames[0][0], frames[-1][0] + frames[-1][1], stream.codec_context.name


def first_beep(path: Path) -> float:
    """Time of the first loud sample in the decoded audio, on the file's clock."""
    with av.open(str(path)) as container:
        stream = container.streams.audio[0]
        for frame in container.decode(stream):
            data = np.abs(frame.to_ndarray().astype(np.float32)).reshape(-1)
            scale = 32767.0 if frame.format.name.startswith("s16") else 1.0
            loud = np.nonzero(data / scale > 0.3)[0]
            if len(loud):
                return float(frame.pts * frame.time_base) + loud[0] / frame.sample_rate
    raise AssertionError("no beep found")


@pytest.mark.parametrize(
    "source, acodec, rate, output, expect_codec, audio_frame",
    [
        ("src_aac.mp4", "aac", 48000, "out_aac.mp4", "aac", 1024 / 48000),  # stream copy
        ("src_aac.mp4", "aac", 48000, "out_aac.mkv", "aac", 1024 / 48000),  # stream copy, other container
        ("src_mulaw.mov", "pcm_mulaw", 8000, "out_mulaw.mp4", "aac", 1024 / 8000),  # mp4 cannot hold mu-law
        ("src_mulaw.mov", "pcm_mulaw", 8000, "out_mulaw.mkv", "flac", 1 / 8000),  # re-encoded, cut to the sample
    ],
)
def test_audio_follows_the_written_video_span(
    work: Path, source: str, acodec: str, rate: int, output: str, expect_codec: str, audio_frame: float
) -> None:
    """--start 10 --frames 30 at 25 fps: the audio covers source 0.4 s to 1.6 s, starting and ending within one
    audio frame of the video, and the beep at 0.5 s plays at 0.1 s in the output."""
    src = work / source
    if not src.exists():
        make_av_clip(src, acodec, rate)
    info = probe(src)
    assert info.has_audio and info.audio_codec == acodec and info.audio_sample_rate == rate
    with VideoReader(src, start=10, max_frames=30) as reader:
        chunk = reader.read_all()
    out = work / output
    with VideoWriter(out, reader.info.fps, audio_from=src, audio_start=chunk.pts_seconds[0], preset="ultrafast") as w:
        w.write(chunk.frames[:12])
        w.write(chunk.frames[12:])
    v_start, v_end, _ = stream_span(out, "video")
    a_start, a_end, codec = stream_span(out, "audio")
    assert codec == expect_codec
    assert (v_start, v_end) == pytest.approx((0.0, 1.2), abs=1e-6)
    assert 0.0 <= a_start - v_start <= audio_frame
    assert abs(a_end - v_end) <= audio_frame
    assert first_beep(out) == pytest.approx(0.1, abs=0.003)


def test_audio_on_interrupted_write_and_png(work: Path) -> None:
    """Ctrl-C path: close() after 8 frames gives a playable file whose audio stops with the video; PNG
    output ignores audio."""
    src = work / "src_aac.mp4"
    if not src.exists():
        make_av_clip(src, "aac")
    with VideoReader(src, max_frames=8) as reader:
        frames = reader.read_all().frames
    out = work / "interrupted.mp4"
    writer = VideoWriter(out, 25, audio_from=src, audio_duration=3.0, preset="ultrafast")
    writer.write(frames)
    assert writer.finalize_partial() == out
    a_start, a_end, _ = stream_span(out, "audio")
    assert a_start == pytest.approx(0.0, abs=1024 / 48000) and a_end == pytest.approx(0.32, abs=1024 / 48000)
    with VideoReader(out) as reader:
        assert len(reader.read_all()) == 8
    folder = work / "png_with_audio"
    with VideoWriter(folder, 25, codec="png", audio_from=src) as writer:
        writer.write(frames[:2])
    assert sorted(p.name for p in folder.iterdir()) == ["frame_000001.png", "frame_000002.png"]


# ---------------------------------------------------------------------------------------------------------------
# Bad inputs and outputs
# ---------------------------------------------------------------------------------------------------------------


def _small_clip(path: Path, n: int = 30, *, faststart: bool = False) -> None:
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (48, 64, 3), dtype=np.uint8) for _ in range(n)]
    out = av.open(str(path), "w", options={"movflags": "faststart"} if faststart else {})
    stream = out.add_stream("libx264", rate=25, options={"preset": "ultrafast"})
    stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
    for image in images:
        out.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
    out.mux(stream.encode())
    out.close()


def test_bad_inputs_have_clear_messages(work: Path) -> None:
    with pytest.raises(VideoError, match="does not exist"):
        VideoReader(work / "missing.mp4")
    (work / "empty.mp4").write_bytes(b"")
    with pytest.raises(VideoError, match=r"is empty \(0 bytes\)"):
        VideoReader(work / "empty.mp4")
    (work / "notes.mp4").write_text("this is not a video\n" * 20)
    with pytest.raises(VideoError, match="is not a video file"):
        probe(work / "notes.mp4")
    assert issubclass(VideoError, ValueError)

    good = work / "good.mp4"
    _small_clip(good)
    data = good.read_bytes()
    (work / "cut_index.mp4").write_bytes(data[: len(data) // 2])  # index (moov) at the end is gone
    with pytest.raises(VideoError, match="truncated or corrupt"):
        probe(work / "cut_index.mp4")

    fast = work / "faststart.mp4"
    _small_clip(fast, faststart=True)
    data = fast.read_bytes()
    (work / "cut_data.mp4").write_bytes(data[: int(len(data) * 0.6)])  # index intact, frames missing
    with VideoReader(work / "cut_data.mp4") as reader, pytest.raises(VideoError, match=r"truncated.*frame \d+"):
        for _ in reader.read_chunks(4):
            pass

    mkv = work / "good.mkv"
    rng = np.random.default_rng(0)
    make_clip(
        mkv,
        [rng.integers(0, 255, (48, 64, 3), dtype=np.uint8) for _ in range(30)],
        codec="libx264",
        options={"preset": "ultrafast"},
    )
    data = mkv.read_bytes()
    (work / "cut.mkv").write_bytes(data[: len(data) // 2])  # clean end of file, but the header knows better
    with VideoReader(work / "cut.mkv") as reader, pytest.raises(VideoError, match=r"truncated: .*after frame \d+"):
        list(reader.read_chunks(8))
    with VideoReader(work / "cut.mkv", strict=False) as reader:  # lenient mode keeps what decodes
        assert 5 < len(reader.read_all()) < 30

    corrupt = bytearray(good.read_bytes())
    noise = np.random.default_rng(5)
    for offset in range(2000, len(corrupt) // 2, 3000):
        corrupt[offset : offset + 600] = noise.integers(0, 256, 600, dtype=np.uint8).tobytes()
    (work / "corrupt.mp4").write_bytes(bytes(corrupt))
    with pytest.raises(VideoError, match=r"corrupt.*frame \d+"):
        with VideoReader(work / "corrupt.mp4") as reader:
            list(reader.read_chunks(4))


def test_zero_one_frame_and_audio_only_files(work: Path) -> None:
    zero = work / "zero.mkv"
    out = av.open(str(zero), "w")
    stream = out.add_stream("libx264", rate=25)
    stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
    out.start_encoding()
    out.close()
    with pytest.raises(VideoError, match="zero frames"):
        probe(zero)

    one = work / "one.mp4"
    _small_clip(one, n=1)
    with VideoReader(one) as reader:
        assert reader.info.frame_count == 1
        chunk = reader.read_all()
    assert chunk.frames.shape == (1, 48, 64, 3) and chunk.pts_seconds == [0.0]

    audio_only = work / "audio_only.m4a"
    out = av.open(str(audio_only), "w", format="mp4")
    stream = out.add_stream("aac", rate=48000)
    frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
    frame.sample_rate = 48000
    out.mux(stream.encode(frame))
    out.mux(stream.encode())
    out.close()
    with pytest.raises(VideoError, match="has no video stream"):
        probe(audio_only)


def test_writer_refuses_bad_destinations(work: Path, bikes: torch.Tensor) -> None:
    existing = work / "exists.mp4"
    existing.write_bytes(b"keep me")
    with pytest.raises(VideoError, match=f"output {existing} already exists"):
        VideoWriter(existing, 25)
    assert existing.read_bytes() == b"keep me"
    with VideoWriter(existing, 25, overwrite=True, preset="ultrafast") as writer:
        writer.write(bikes[:2])
    assert probe(existing).frame_count == 2

    with pytest.raises(VideoError, match="does not exist"):
        VideoWriter(work / "no_such_folder" / "out.mp4", 25)
    with pytest.raises(VideoError, match="is not a folder"):
        VideoWriter(existing / "out.mp4", 25)
    with pytest.raises(VideoError, match="cannot hold prores"):
        VideoWriter(work / "prores.mp4", 25, codec="prores")
    with pytest.raises(VideoError, match="extension"):
        VideoWriter(work / "out.xyz", 25)

    if os.geteuid() != 0:
        locked = work / "locked"
        locked.mkdir()
        locked.chmod(0o500)
        target = locked / "out.mp4"
    else:  # root ignores permission bits: use a read-only filesystem instead
        target = Path("/sys/infvsr_test_out.mp4")
        try:
            os.close(os.open(target, os.O_CREAT | os.O_WRONLY))
            os.unlink(target)
            pytest.skip("no unwritable folder available")
        except OSError:
            pass
    with pytest.raises(VideoError, match=f"cannot write to output folder {target.parent}"):
        VideoWriter(target, 25)


def test_writer_exception_leaves_nothing_and_partial_close_is_valid(work: Path, bikes: torch.Tensor) -> None:
    out = work / "aborted.mp4"
    with pytest.raises(RuntimeError, match="boom"):
        with VideoWriter(out, 25, preset="ultrafast") as writer:
            writer.write(bikes[:4])
            assert writer.temp_path.exists() and writer.temp_path.name.startswith(".aborted.") and not out.exists()
            raise RuntimeError("boom")
    assert not out.exists() and not list(work.glob(".aborted.*partial*"))

    folder = work / "aborted_png"
    with pytest.raises(KeyboardInterrupt):
        with VideoWriter(folder, 25, codec="png") as writer:
            writer.write(bikes[:2])
            raise KeyboardInterrupt
    assert not folder.exists() and not list(work.glob(".aborted_png.*partial*"))
    with pytest.raises(VideoError, match="aborted; nothing was saved"):
        writer.close()  # no path of a file that was deleted
    assert writer.finalize_partial() is None

    kept = work / "kept.mkv"
    writer = VideoWriter(kept, 25, codec="ffv1")
    writer.write(bikes[:2])
    assert writer.close() == kept
    writer.abort()  # after a completed close: the file stays
    assert kept.exists() and writer.close() == kept

    partial = work / "partial.mkv"
    writer = VideoWriter(partial, 25, codec="ffv1")
    writer.write(bikes[:3])
    assert not partial.exists()
    writer.close()  # what the CLI does on Ctrl-C
    assert probe(partial).frame_count is None or probe(partial).frame_count == 3
    with VideoReader(partial) as reader:
        assert len(reader.read_all()) == 3

    nothing = work / "nothing.mp4"
    writer = VideoWriter(nothing, 25)
    with pytest.raises(VideoError, match="no frames were written"):
        writer.close()
    assert not nothing.exists() and not list(work.glob(".nothing.*partial*"))
    assert VideoWriter(work / "nothing2.mp4", 25).finalize_partial() is None
    assert not list(work.glob(".nothing2*"))


def test_background_writer_writes_what_the_writer_does(work: Path, bikes: torch.Tensor) -> None:
    """Encoding on a worker thread: the same file content, in order, chunk by chunk; a bounded queue."""
    direct, queued = work / "direct.mkv", work / "queued.mkv"
    writer = VideoWriter(direct, 25, codec="ffv1")
    background = BackgroundWriter(VideoWriter(queued, 25, codec="ffv1"), depth=1)
    for start in range(0, 24, 5):
        writer.write(bikes[start : start + 5])
        background.write(bikes[start : start + 5])
        assert background._queue.qsize() <= 1
    assert background.frames_written == 24  # queued ones counted: what the file will hold
    assert writer.close() == direct and background.close() == queued and background.writer.frames_written == 24
    with VideoReader(direct) as a, VideoReader(queued) as b:
        assert torch.equal(a.read_all().frames, b.read_all().frames)
    with pytest.raises(VideoError, match="already closed"):
        background.write(bikes[:1])


def test_background_writer_raises_the_workers_error_and_leaves_nothing(work: Path, bikes: torch.Tensor) -> None:
    out = work / "bg_error.mkv"
    background = BackgroundWriter(VideoWriter(out, 25, codec="ffv1"))
    background.write(bikes[:3])
    background.write(bikes[:2, :100])  # a size change: the worker's VideoWriter refuses it
    with pytest.raises(VideoError, match="frame size changed"):
        background.close()
    assert not out.exists() and not list(work.glob(".bg_error*"))
    with pytest.raises(VideoError, match="failed earlier"):
        background.close()  # never a success after a failure

    raised = work / "bg_error_on_write.mkv"  # the error comes back on the next write, once the worker is done
    background = BackgroundWriter(VideoWriter(raised, 25, codec="ffv1"))
    background.write(bikes[:3])
    background.write(bikes[:2, :100])
    background._stop()  # (let the worker reach the bad chunk)
    with pytest.raises(VideoError, match="frame size changed"):
        background.write(bikes[:1])
    with pytest.raises(VideoError, match="already closed"):
        background.write(bikes[:1])
    assert background.finalize_partial() is None and not raised.exists() and not list(work.glob(".bg_error_on*"))

    kept = work / "bg_partial.mkv"  # Ctrl-C: the queued frames are encoded and kept
    background = BackgroundWriter(VideoWriter(kept, 25, codec="ffv1"))
    background.write(bikes[:4])
    assert background.finalize_partial() == kept
    with VideoReader(kept) as reader:
        assert len(reader.read_all()) == 4

    dropped = work / "bg_abort.mkv"
    with pytest.raises(RuntimeError, match="boom"):
        with BackgroundWriter(VideoWriter(dropped, 25, codec="ffv1")) as background:
            background.write(bikes[:2])
            raise RuntimeError("boom")
    assert not dropped.exists() and not list(work.glob(".bg_abort*"))


@pytest.mark.parametrize("suffix", [".mp4", ".mkv", ".mov"])
def test_pcm_wav_audio_is_reencoded_where_it_cannot_be_copied(work: Path, suffix: str) -> None:
    """FFmpeg accepts a PCM stream into mp4 and fails only when the file is finalized: re-encode instead."""
    wav = work / f"tone{suffix}.wav"
    with av.open(str(wav), "w") as out:
        stream = out.add_stream("pcm_s16le", rate=16000)
        stream.layout = "mono"
        t = np.arange(16000) / 16000
        samples = (0.4 * np.sin(2 * np.pi * 300 * t) * 32767).astype(np.int16)[None]
        frame = av.AudioFrame.from_ndarray(samples, format="s16", layout="mono")
        frame.sample_rate = 16000
        out.mux(stream.encode(frame))
        out.mux(stream.encode())
    path = work / f"with_wav_audio{suffix}"
    with VideoWriter(path, Fraction(10), codec="h264" if suffix != ".mkv" else "ffv1", audio_from=wav) as writer:
        writer.write(torch.rand(10, 16, 16, 3))
    with av.open(str(path)) as container:
        audio = container.streams.audio[0]
        codec = audio.codec_context.name
        seconds = sum(f.samples for f in container.decode(audio=0)) / audio.rate
    assert codec == {".mp4": "aac", ".mkv": "pcm_s16le", ".mov": "pcm_s16le"}[suffix]  # copied where allowed
    assert seconds == pytest.approx(1.0, abs=0.07)
