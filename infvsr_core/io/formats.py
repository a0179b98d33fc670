"""The output formats, as data: one table that the writer, the command line and the ComfyUI node all read.

Each entry is keyed by the node's format name and says everything a front end offers (the codec name of
``--codec``, the file extension, the mime type the browser preview needs) and everything the writer needs (the
FFmpeg encoder, the pixel formats, the options always given to the encoder, the default quality). The command
line derives its ``--codec`` and ``--prores-profile`` choices from it and the node its format list, so a format
added here appears everywhere at once.

This module imports nothing but the standard library (and the error classes): the command line builds its
parser from it, and ``--help`` must not wait for torch or PyAV.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from ..errors import VideoError

__all__ = [
    "CODECS",
    "CONTAINERS",
    "FORMATS",
    "PRORES_PROFILES",
    "OutputFormat",
    "format_for",
]

_YUV_8_10 = ("yuv420p", "yuv422p", "yuv444p", "yuv420p10le", "yuv422p10le", "yuv444p10le")
_PRORES = ("yuv422p10le", "yuv444p10le")
_FFV1 = ("bgr0", "gbrp10le", "gbrp16le", "yuv420p", "yuv444p", "yuv444p10le", "yuv444p16le")


def _options(**options: str) -> Mapping[str, str]:
    return MappingProxyType(options)


@dataclass(frozen=True)
class OutputFormat:
    """One way to write a video: a codec with its settings, in a container (or as a folder of images)."""

    codec: str  # the writer's and --codec's name for it
    encoder: str  # the FFmpeg encoder
    extension: str  # of the file a front end names; "" for an image-sequence folder
    container: str  # the FFmpeg muxer of that extension; "" for an image sequence
    mime: str  # for the browser preview
    pix_fmt: str  # the pixel format written unless one is asked for
    pix_fmts: tuple[str, ...]  # the pixel formats the writer accepts for this codec
    options: Mapping[str, str] = field(default_factory=_options, hash=False)  # always given to the encoder
    prores_profile: str | None = None  # the --prores-profile name, for ProRes
    crf: int | None = None  # default quality; None when the codec takes no crf
    preset: str | None = None  # default speed preset of the x264/x265 encoders
    fits: tuple[str, ...] = ()  # extensions suggested when the output's container cannot hold the codec
    codec_tag: str | None = None  # the tag mp4/mov players need ("hvc1": Apple's players refuse HEVC without it)
    browser_playable: bool = False  # whether browsers play the file in the node's preview

    @property
    def uses_crf(self) -> bool:
        """Whether the quality setting means anything for this format."""
        return self.crf is not None


FORMATS: Mapping[str, OutputFormat] = MappingProxyType(
    {
        "h264-mp4": OutputFormat(
            codec="h264",
            encoder="libx264",
            extension="mp4",
            container="mp4",
            mime="video/mp4",
            pix_fmt="yuv420p",
            pix_fmts=_YUV_8_10,
            crf=18,
            preset="medium",
            fits=("mp4", "mkv", "mov"),
            browser_playable=True,
        ),
        "h265-mp4": OutputFormat(
            codec="h265",
            encoder="libx265",
            extension="mp4",
            container="mp4",
            mime="video/mp4",
            pix_fmt="yuv420p10le",
            pix_fmts=_YUV_8_10,
            options=_options(**{"x265-params": "log-level=error"}),  # x265 prints its settings to stderr otherwise
            crf=20,
            preset="medium",
            fits=("mp4", "mkv", "mov"),
            codec_tag="hvc1",
        ),
        "prores-422hq-mov": OutputFormat(
            codec="prores",
            encoder="prores_ks",
            extension="mov",
            container="mov",
            mime="video/quicktime",
            pix_fmt="yuv422p10le",
            pix_fmts=_PRORES,
            options=_options(profile="3", vendor="apl0"),  # apl0: the vendor id Apple's own encoder writes
            prores_profile="hq",
            fits=("mov",),
        ),
        "prores-4444-mov": OutputFormat(
            codec="prores",
            encoder="prores_ks",
            extension="mov",
            container="mov",
            mime="video/quicktime",
            pix_fmt="yuv444p10le",
            pix_fmts=_PRORES,
            options=_options(profile="4", vendor="apl0"),
            prores_profile="4444",
            fits=("mov",),
        ),
        "ffv1-mkv": OutputFormat(
            codec="ffv1",
            encoder="ffv1",
            extension="mkv",
            container="matroska",
            mime="video/x-matroska",
            pix_fmt="bgr0",  # lossless 8-bit RGB: no YUV conversion at all
            pix_fmts=_FFV1,
            fits=("mkv",),
        ),
        "png-sequence": OutputFormat(
            codec="png",
            encoder="png",
            extension="",
            container="",
            mime="image/png",
            pix_fmt="rgb24",
            pix_fmts=("rgb24", "rgb48be"),
        ),
    }
)
"""Output formats by the node's names, in the order the node lists them (the first is its default)."""

CODECS: tuple[str, ...] = tuple(dict.fromkeys(f.codec for f in FORMATS.values()))
"""The writer's codec names, in table order: what --codec offers besides "auto"."""

PRORES_PROFILES: tuple[str, ...] = tuple(f.prores_profile for f in FORMATS.values() if f.prores_profile)
"""The ProRes profiles, the first being the default."""

CONTAINERS: Mapping[str, str] = MappingProxyType(
    {".mp4": "mp4", ".m4v": "mp4", ".mov": "mov", ".mkv": "matroska", ".webm": "webm", ".avi": "avi"}
)
"""Output file extensions the writer knows -> the FFmpeg muxer that writes them."""


def format_for(codec: str, prores_profile: str | None = None) -> OutputFormat:
    """The table entry of a codec (and ProRes profile: the first when None); VideoError for unknown names."""
    rows = [f for f in FORMATS.values() if f.codec == codec]
    if not rows:
        raise VideoError(f"unknown codec {codec!r}; use one of {', '.join(CODECS)}")
    if rows[0].prores_profile is None or prores_profile is None:
        return rows[0]
    for row in rows:
        if row.prores_profile == prores_profile:
            return row
    raise VideoError(f"unknown ProRes profile {prores_profile!r}; use {' or '.join(map(repr, PRORES_PROFILES))}")
