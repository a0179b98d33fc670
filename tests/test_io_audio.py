"""Audio: the source's soundtrack follows the written video (copied or re-encoded), and waveforms go through files."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from infvsr_core.io import VideoReader, VideoWriter, probe


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("io")


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


@pytest.mark.parametrize("container, suffix", [("mp4", ".m4a"), ("mov", ".wav"), ("matroska", ".wav")])
def test_waveform_goes_through_a_file_the_container_copies(tmp_path: Path, container: str, suffix: str) -> None:
    """A waveform becomes the file a writer of that container copies (mp4 cannot hold PCM: AAC there), and
    reads back: the WAV to 16 bits, the AAC within its loss; more than two channels are cut to two."""
    from infvsr_core.io.audio import can_copy, read_waveform, write_waveform

    rate = 16000
    t = torch.arange(rate) / rate
    tone = torch.stack([0.5 * torch.sin(2 * torch.pi * 440 * t), 0.3 * torch.sin(2 * torch.pi * 660 * t), t])
    path = write_waveform(tone, rate, tmp_path, container)
    assert path.suffix == suffix and path.parent == tmp_path
    with av.open(str(path)) as file:
        assert can_copy(container, file.streams.audio[0].codec_context.name)
    back, back_rate = read_waveform(path, 0.0, None)
    assert back_rate == rate and back.shape[0] == 2 and back.dtype == torch.float32
    if suffix == ".wav":
        assert back.shape[1] == rate and torch.allclose(back, tone[:2], atol=1 / 32767)
    else:  # AAC pads to whole frames of 1024 samples, in time with the source
        assert rate <= back.shape[1] <= rate + 1024
        assert float((back[:, :rate] - tone[:2]).abs().mean()) < 0.01
    middle, _ = read_waveform(path, 0.25, 0.5)
    assert abs(middle.shape[1] - rate // 2) <= 1
    assert read_waveform(tmp_path / "missing.wav", 0.0, None) is None
