"""Writing: every format round trip, precision and padding, bad destinations, aborts and the background writer."""

from __future__ import annotations

import os
from fractions import Fraction
from pathlib import Path

import av
import pytest
import torch

from infvsr_core.io import BackgroundWriter, VideoError, VideoReader, VideoWriter, probe
from tests.io_media import BIKES, psnr

pytestmark = pytest.mark.skipif(not BIKES.exists(), reason="shared test clips are missing")


# ---------------------------------------------------------------------------------------------------------------
# Formats
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
# Bad outputs, aborts, partial files
# ---------------------------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------------------------
# Background writer
# ---------------------------------------------------------------------------------------------------------------


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
