"""ComfyUI AUDIO values ({"waveform": (1, C, S) float, "sample_rate": int}) to and from the core's audio.

The loaders cut the source's audio to the frames they return and remember
where it came from (`SOURCE_KEY`), so the combine node can copy the original
audio packets instead of re-encoding a waveform; any other AUDIO (core
LoadAudio, VideoHelperSuite's lazy audio) is written to a temporary file and
muxed from there. Reading, writing and muxing live in `infvsr_core.io.audio`;
this module only translates ComfyUI's type.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ._core import core_audio

SOURCE_KEY = "infvsr_source"
"""Extra key in the AUDIO dicts made by this pack: {"path", "start", "duration"} in video seconds."""


def read_audio(path: Path, start: float, duration: float | None, video_start_time: float = 0.0) -> dict | None:
    """The first audio stream of `path` from `start` for `duration` seconds (video clock), as AUDIO.

    Times are relative to the video's first frame (`video_start_time` is that
    frame's container time), the clock of `VideoReader`'s timestamps. None when
    the file has no audio.
    """
    read = core_audio.read_waveform(path, start, duration, video_start_time)
    if read is None:
        return None
    waveform, rate = read
    return {
        "waveform": waveform.unsqueeze(0),
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


def write_audio_file(audio: Any, folder: Path, container: str) -> Path:
    """Write an AUDIO to a temporary file in `folder` that the FFmpeg muxer `container` can take as it is.

    mp4 gets AAC in an .m4a (mp4 cannot hold PCM), everything else a 16-bit
    WAV. The caller deletes the file.
    """
    waveform, rate = check_audio(audio)
    return core_audio.write_waveform(waveform, rate, folder, container)
