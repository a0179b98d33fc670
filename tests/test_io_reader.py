"""Reading: real clips, exact frame selection, rotation, variable frame rate, image folders, bad inputs."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from infvsr_core.io import VideoError, VideoReader, VideoWriter, probe
from tests.io_media import BIKES, DATA, make_clip, psnr

pytestmark = pytest.mark.skipif(not BIKES.exists(), reason="shared test clips are missing")


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
# Bad inputs
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
