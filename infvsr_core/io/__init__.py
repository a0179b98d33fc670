"""Video input and output through PyAV, streaming: no ffmpeg subprocess, never a whole video in memory.

    reader.py   VideoReader, probe, VideoInfo, FrameChunk: files and image folders as float RGB chunks
    writer.py   VideoWriter, BackgroundWriter: encoding, installed under the final name only when complete
    outputs.py  the writers' temporary names, stale temporaries of killed runs, the exclusive rename
    color.py    YUV/RGB conversion both ways, exact and explicit about matrix, range and chroma siting
    audio.py    the source's audio carried into the output (copied or re-encoded), waveforms to and from files
    formats.py  the table of output formats that the writer, the command line and the node read

Names are resolved on first use, so that importing `infvsr_core.io.formats` (the command line's parser does)
does not import torch or PyAV.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..errors import VideoError
    from .outputs import unfinished_outputs
    from .reader import IMAGE_EXTENSIONS, FrameChunk, VideoInfo, VideoReader, probe
    from .writer import BackgroundWriter, VideoWriter

_EXPORTS = {
    "VideoReader": "reader",
    "VideoInfo": "reader",
    "FrameChunk": "reader",
    "probe": "reader",
    "IMAGE_EXTENSIONS": "reader",
    "VideoWriter": "writer",
    "BackgroundWriter": "writer",
    "unfinished_outputs": "outputs",
}

__all__ = [
    "IMAGE_EXTENSIONS",
    "BackgroundWriter",
    "FrameChunk",
    "VideoError",
    "VideoInfo",
    "VideoReader",
    "VideoWriter",
    "probe",
    "unfinished_outputs",
]


def __getattr__(name: str) -> Any:
    if name == "VideoError":
        from ..errors import VideoError

        return VideoError
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
