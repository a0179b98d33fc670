"""The reader on every container/codec pair artists bring (made here with PyAV, checked against the source)."""

from fractions import Fraction

import av
import numpy as np
import pytest
import torch

from infvsr_core.io import VideoReader
from tests.conftest import make_clip


@pytest.mark.parametrize(
    ("suffix", "codec", "pix_fmt"),
    [
        (".mp4", "libx264", "yuv420p"),
        (".mov", "libx264", "yuv420p"),
        (".mkv", "libx264", "yuv444p"),
        (".webm", "libvpx-vp9", "yuv420p"),
        (".avi", "mpeg4", "yuv420p"),
        (".mpeg", "mpeg2video", "yuv420p"),
    ],
)
def test_reads_container(tmp_path, suffix, codec, pix_fmt):
    # Smooth content (no per-pixel noise) so that every lossy codec reproduces it closely.
    source = torch.nn.functional.avg_pool2d(make_clip(10, 48, 64, seed=4).permute(0, 3, 1, 2), 5, 1, 2, False)
    source = source.permute(0, 2, 3, 1).contiguous()
    path = tmp_path / f"clip{suffix}"
    with av.open(str(path), "w") as out:
        stream = out.add_stream(codec, rate=25)
        stream.width, stream.height, stream.pix_fmt = 64, 48, pix_fmt
        stream.bit_rate = 4_000_000
        for frame in (source.numpy() * 255).round().astype(np.uint8):
            out.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        out.mux(stream.encode())
    with VideoReader(path) as reader:
        assert (reader.info.width, reader.info.height) == (64, 48)
        assert reader.info.fps == Fraction(25)
        chunks = list(reader.read_chunks(4))
    frames = torch.cat([c.frames for c in chunks])
    assert [c.index for c in chunks] == [0, 4, 8] and frames.shape == (10, 48, 64, 3)
    mse = torch.mean((frames - source) ** 2).item()
    assert 10 * np.log10(1 / mse) > 30, f"{suffix}/{codec}: PSNR {10 * np.log10(1 / mse):.1f} dB"
