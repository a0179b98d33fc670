"""Audio: carrying a source's soundtrack into the output, and audio files for the writer to take it from.

:class:`AudioMuxer` follows the written video: it copies the source's audio packets where the output container
takes the codec (:data:`COPYABLE_AUDIO`, the one table of that) and re-encodes them elsewhere (AAC for mp4/mov,
FLAC for mkv, ...), cut to the video's time span. A waveform (from ComfyUI, or any other tensor) goes through a
file: :func:`write_waveform` writes one the container can copy, and :func:`read_waveform` reads a span back.
Times are in the video's clock: seconds from the source video's first frame, as the reader's timestamps are.
"""

from __future__ import annotations

import logging
import math
import uuid
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import numpy as np
import torch

log = logging.getLogger(__name__)

# Audio codecs each container takes as a stream copy. FFmpeg accepts some others when the stream is added
# (PCM into mp4, for one) and fails only when the file is finalized, so copying is decided here instead.
# A container not listed is tried with any codec.
COPYABLE_AUDIO: dict[str, frozenset[str]] = {
    "mp4": frozenset({"aac", "mp3", "alac", "ac3", "eac3", "opus", "flac"}),
    "mov": frozenset(
        {"aac", "mp3", "alac", "ac3", "eac3", "pcm_s16le", "pcm_s16be", "pcm_s24le", "pcm_s24be", "pcm_f32le"}
    ),
    "webm": frozenset({"opus", "vorbis"}),
    "avi": frozenset({"mp3", "ac3", "pcm_s16le"}),
}
REENCODE_AUDIO = {"mp4": "aac", "mov": "aac", "matroska": "flac", "webm": "libopus", "avi": "libmp3lame"}
"""The encoder for audio a container cannot copy (AAC elsewhere)."""
NAMED_LAYOUTS = {1: "mono", 2: "stereo", 3: "2.1", 4: "quad", 5: "5.0", 6: "5.1", 7: "6.1", 8: "7.1"}
LOSSY_BIT_RATE = 192_000


def can_copy(container: str, codec: str | None) -> bool:
    """Whether the FFmpeg muxer `container` takes audio in `codec` as it is."""
    allowed = COPYABLE_AUDIO.get(container)
    return allowed is None or codec in allowed


def add_encoder(output: Any, codec: str, rate: int, channels: int, fallback_layout: str = "stereo") -> Any:
    """An audio encoder stream in `output`, timed in samples.

    Encoders want a named channel layout of the right size; the lossy ones get a bit rate above FFmpeg's defaults.
    """
    stream = output.add_stream(codec, rate=rate)
    stream.layout = NAMED_LAYOUTS.get(channels, fallback_layout)
    if codec in ("aac", "libopus", "libmp3lame"):
        stream.bit_rate = LOSSY_BIT_RATE
    stream.time_base = Fraction(1, rate)
    return stream


class AudioMuxer:
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
        self.first_out: float | None = None  # output time of the first sample muxed

    def add_to(self, output: Any, fmt: str) -> None:
        """Add the audio stream to `output` (FFmpeg muxer `fmt`): a copy when the container takes the codec."""
        ctx = self.in_stream.codec_context
        if can_copy(fmt, ctx.name):
            try:
                self.out_stream = output.add_stream_from_template(self.in_stream)
                return
            except ValueError:  # FFmpeg refuses the codec in this container after all
                pass
        self.copy = False
        name = REENCODE_AUDIO.get(fmt, "aac")
        rate = int(ctx.sample_rate) or 48000
        if name == "libopus" and rate not in (8000, 12000, 16000, 24000, 48000):
            rate = 48000
        # A WAV's layout can be "1 channels" (no order): the size decides the named layout.
        channels = len(ctx.layout.channels) if ctx.layout else 2
        self.out_stream = add_encoder(output, name, rate, channels, ctx.layout.name if ctx.layout else "stereo")
        self.rate = rate
        log.info("re-encoding audio %s -> %s (the container cannot hold %s)", ctx.name, name, ctx.name)

    def _end(self, video_duration: float) -> float:
        """Where the audio stops, in the source's clock: the written video's end, or the asked duration."""
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
            else:
                self._encode_packet(output, packet, end)

    def _encode_packet(self, output: Any, packet: Any, end: float) -> None:
        """Decode a packet, trim its samples to [abs_start, end) and encode them, timed from the first sample."""
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

    def _finish(self, output: Any, end: float) -> None:
        """Flush a re-encoding encoder; nothing more is muxed after this."""
        if not self.copy and self.out_stream is not None:
            for out_packet in self.out_stream.encode(None):
                output.mux(out_packet)
        self.done = True

    def close(self) -> None:
        """Close the source file."""
        self.input.close()


def read_waveform(
    path: Path, start: float, duration: float | None, video_start_time: float = 0.0
) -> tuple[torch.Tensor, int] | None:
    """The first audio stream of `path` from `start` for `duration` seconds, as ((C, S) float32, sample rate).

    Times are relative to the video's first frame (`video_start_time` is that frame's container time), the clock
    of `VideoReader`'s timestamps. None when the file has no audio or cannot be opened.
    """
    try:
        container = av.open(str(path))
    except av.error.FFmpegError as e:
        log.warning("cannot read audio of %s: %s", path, e)
        return None
    with container:
        if not container.streams.audio:
            return None
        stream = container.streams.audio[0]
        rate = int(stream.codec_context.sample_rate or stream.rate or 48000)
        begin = video_start_time + max(0.0, start)
        end = math.inf if duration is None else begin + max(0.0, duration)
        if begin > 1.0 and stream.time_base:
            try:
                container.seek(int((begin - 1.0) / stream.time_base), stream=stream, backward=True)
            except av.error.FFmpegError:
                container.seek(0)
        pieces = _decode_span(container, stream, rate, begin, end, path)
        channels = stream.codec_context.channels or 1
    waveform = np.concatenate(pieces, axis=1) if pieces else np.zeros((channels, 0), np.float32)
    return torch.from_numpy(np.ascontiguousarray(waveform, dtype=np.float32)), rate


def _decode_span(container: Any, stream: Any, rate: int, begin: float, end: float, path: Path) -> list[np.ndarray]:
    """Planar float samples of [begin, end) in the container's clock, piece by piece as they decode."""
    resampler = av.AudioResampler(format="fltp", layout=stream.codec_context.layout, rate=rate)
    pieces: list[np.ndarray] = []
    clock: float | None = None
    try:
        for frame in container.decode(stream):
            if frame.pts is not None and frame.time_base:
                clock = float(frame.pts * frame.time_base)
            elif clock is None:
                clock = 0.0
            for out in resampler.resample(frame):
                data = out.to_ndarray()  # (C, n) float32
                n = data.shape[1]
                first = max(0, int(round((begin - clock) * rate)))
                last = min(n, int(round((end - clock) * rate))) if end != math.inf else n
                if last > first:
                    pieces.append(data[:, first:last])
                clock += n / rate
            if clock >= end:
                break
    except av.error.FFmpegError as e:
        log.warning("audio of %s stops early: %s", path, e)
    return pieces


def write_waveform(waveform: torch.Tensor, rate: int, folder: Path, container: str) -> Path:
    """Write (C, S) samples in [-1, 1] to a new file in `folder` that the FFmpeg muxer `container` can copy.

    A 16-bit WAV where the container takes PCM, else AAC in an .m4a (mp4 cannot hold PCM): the writer then
    copies it without a second encode. More than two channels are cut to the first two. The caller deletes it.
    """
    channels = waveform.shape[0]
    if channels > 2:
        log.info("audio has %d channels; muxing the first two", channels)
        waveform, channels = waveform[:2], 2
    folder.mkdir(parents=True, exist_ok=True)
    aac = not can_copy(container, "pcm_s16le")
    path = folder / f"infvsr_audio_{uuid.uuid4().hex[:12]}.{'m4a' if aac else 'wav'}"
    if aac:
        samples, fmt = waveform.clamp(-1, 1).contiguous().numpy(), "fltp"
    else:
        samples, fmt = (waveform.clamp(-1, 1) * 32767).round().to(torch.int16).numpy(), "s16"
    layout = NAMED_LAYOUTS.get(channels, "stereo")
    with av.open(str(path), "w", format="ipod" if aac else "wav") as out:
        stream = add_encoder(out, "aac" if aac else "pcm_s16le", rate, channels)
        for begin in range(0, samples.shape[1], rate):  # one second per frame
            block = samples[:, begin : begin + rate]
            block = np.ascontiguousarray(block if aac else block.T.reshape(1, -1))
            frame = av.AudioFrame.from_ndarray(block, format=fmt, layout=layout)
            frame.sample_rate = rate
            frame.pts = begin
            frame.time_base = Fraction(1, rate)
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    return path
