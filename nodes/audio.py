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


def write_wav(audio: Any, folder: Path) -> Path:
    """Write an AUDIO to a 16-bit WAV in `folder` (for muxing); the caller deletes it."""
    waveform, rate = check_audio(audio)
    channels = waveform.shape[0]
    if channels > 2:
        log.info("audio has %d channels; muxing the first two", channels)
        waveform, channels = waveform[:2], 2
    layout = "mono" if channels == 1 else "stereo"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"infvsr_audio_{uuid.uuid4().hex[:12]}.wav"
    samples = (waveform.clamp(-1, 1) * 32767).round().to(torch.int16).numpy()
    with av.open(str(path), "w", format="wav") as out:
        stream = out.add_stream("pcm_s16le", rate=rate)
        stream.layout = layout
        step = rate  # one second per frame
        for begin in range(0, samples.shape[1], step):
            block = np.ascontiguousarray(samples[:, begin : begin + step].T).reshape(1, -1)
            frame = av.AudioFrame.from_ndarray(block, format="s16", layout=layout)
            frame.sample_rate = rate
            frame.pts = begin
            frame.time_base = Fraction(1, rate)
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    return path
