"""ComfyUI AUDIO values ({"waveform": (1, C, S) float, "sample_rate": int}) to and from files.

The loaders cut the source's audio to the frames they return and remember
where it came from (`SOURCE_KEY`), so the combine node can copy the original
audio packets instead of re-encoding a waveform; any other AUDIO (core
LoadAudio, VideoHelperSuite's lazy audio) is written to a temporary WAV and
muxed from there.
"""

from __future__ import annotations

import logging
import math
import uuid
from collections.abc import Mapping
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import numpy as np
import torch

log = logging.getLogger("infvsr")

SOURCE_KEY = "infvsr_source"
"""Extra key in the AUDIO dicts made by this pack: {"path", "start", "duration"} in video seconds."""


def read_audio(path: Path, start: float, duration: float | None, video_start_time: float = 0.0) -> dict | None:
    """The first audio stream of `path` from `start` for `duration` seconds (video clock), as AUDIO.

    Times are relative to the video's first frame (`video_start_time` is that
    frame's container time), the clock of `VideoReader`'s timestamps. None when
    the file has no audio.
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
        channels = stream.codec_context.channels or 1
    waveform = np.concatenate(pieces, axis=1) if pieces else np.zeros((channels, 0), np.float32)
    return {
        "waveform": torch.from_numpy(np.ascontiguousarray(waveform, dtype=np.float32)).unsqueeze(0),
        "sample_rate": rate,
        SOURCE_KEY: {"path": str(path), "start": float(start), "duration": duration},
    }


def audio_source(audio: Any) -> dict | None:
    """The source file record of an AUDIO made by this pack, or None."""
    if isinstance(audio, Mapping) and SOURCE_KEY in audio:
        source = audio[SOURCE_KEY]
        if isinstance(source, Mapping) and Path(str(source.get("path", ""))).is_file():
            return dict(source)
    return None


def check_audio(audio: Any) -> tuple[torch.Tensor, int]:
    """(waveform (C, S), sample_rate) of any ComfyUI AUDIO, with a clear error for anything else."""
    if not isinstance(audio, Mapping) or "waveform" not in audio or "sample_rate" not in audio:
        raise ValueError("audio must be a ComfyUI AUDIO ({'waveform': (1, C, S) tensor, 'sample_rate': int})")
    waveform, rate = audio["waveform"], int(audio["sample_rate"])
    if not isinstance(waveform, torch.Tensor) or waveform.ndim not in (2, 3):
        raise ValueError(f"audio waveform must be a (1, C, S) tensor, got {getattr(waveform, 'shape', waveform)}")
    if waveform.ndim == 3:
        waveform = waveform[0]
    if rate <= 0:
        raise ValueError(f"audio sample_rate must be positive, got {rate}")
    return waveform.detach().float().cpu(), rate


MP4_AUDIO_CODECS = {"aac", "mp3", "alac", "ac3", "eac3", "opus", "flac"}
"""Audio codecs an mp4 can carry as they are; anything else (PCM, ...) is turned into AAC first."""


def _layout(channels: int) -> str:
    return "mono" if channels == 1 else "stereo"


def write_audio_file(audio: Any, folder: Path, container: str) -> Path:
    """Write an AUDIO to a temporary file the `container` (mp4, mov, matroska, ...) can take as it is.

    mp4 gets AAC in an .m4a (mp4 cannot hold PCM), everything else a 16-bit
    WAV. The caller deletes the file.
    """
    waveform, rate = check_audio(audio)
    channels = waveform.shape[0]
    if channels > 2:
        log.info("audio has %d channels; muxing the first two", channels)
        waveform, channels = waveform[:2], 2
    layout = _layout(channels)
    folder.mkdir(parents=True, exist_ok=True)
    aac = container == "mp4"
    path = folder / f"infvsr_audio_{uuid.uuid4().hex[:12]}.{'m4a' if aac else 'wav'}"
    if aac:
        samples, fmt = waveform.clamp(-1, 1).contiguous().numpy(), "fltp"
    else:
        samples, fmt = (waveform.clamp(-1, 1) * 32767).round().to(torch.int16).numpy(), "s16"
    with av.open(str(path), "w", format="ipod" if aac else "wav") as out:
        stream = out.add_stream("aac" if aac else "pcm_s16le", rate=rate)
        stream.layout = layout
        if aac:
            stream.bit_rate = 192_000
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


def write_wav(audio: Any, folder: Path) -> Path:
    """Write an AUDIO to a 16-bit WAV in `folder`; the caller deletes it."""
    return write_audio_file(audio, folder, "wav")


def source_audio_codec(path: Path) -> str | None:
    try:
        with av.open(str(path)) as container:
            return container.streams.audio[0].codec_context.name if container.streams.audio else None
    except av.error.FFmpegError:
        return None


def transcode_to_m4a(source: Path, folder: Path) -> Path:
    """The first audio stream of `source` as AAC in an .m4a, packet by packet (flat memory, any length).

    Timestamps are kept, so the caller's `start` (in the source's video clock)
    still points at the same audio.
    """
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"infvsr_audio_{uuid.uuid4().hex[:12]}.m4a"
    with av.open(str(source)) as container, av.open(str(path), "w", format="ipod") as out:
        stream = container.streams.audio[0]
        rate = int(stream.codec_context.sample_rate or 48000)
        layout = _layout(min(2, stream.codec_context.channels or 2))
        encoder = out.add_stream("aac", rate=rate)
        encoder.layout = layout
        encoder.bit_rate = 192_000
        resampler = av.AudioResampler(format="fltp", layout=layout, rate=rate)
        written = None
        for frame in container.decode(stream):
            if written is None:  # keep the source's offset from its video (silence before the first sample)
                first = float(frame.pts * frame.time_base) if frame.pts is not None and frame.time_base else 0.0
                video = container.streams.video
                origin = float(video[0].start_time * video[0].time_base) if video and video[0].start_time else 0.0
                written = max(0, int(round((first - origin) * rate)))
            for out_frame in resampler.resample(frame):
                out_frame.pts = written
                out_frame.time_base = Fraction(1, rate)
                written += out_frame.samples
                out.mux(encoder.encode(out_frame))
        out.mux(encoder.encode(None))
    return path
