"""Joining a job's segment files into the output by stream copy, with the audio muxed once over the whole.

Every segment was encoded on its own, in the output's codec and settings, so each starts with a keyframe and
carries the same codec parameters: its packets follow the previous segment's as they are, only their timestamps
moved by the segment's start (the time of its first frame after the film's first frame, in the segment's own
clock, computed as the writer computes a frame's timestamp). Nothing is decoded or encoded again, so the video
is exactly the segments' (bit for bit for lossless codecs) and the join costs a file copy.

The audio is the source's, carried by the writer's own `AudioMuxer` over the film's span, interleaved with the
video as it is copied. The output is written under a hidden temporary name (`io/outputs.py`) and takes its
final name only when complete.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Callable, Sequence
from fractions import Fraction
from pathlib import Path
from typing import Any

import av

from ..errors import VideoError
from ..io.audio import AudioMuxer
from ..io.formats import CONTAINERS
from ..io.outputs import move_exclusive, new_token, remove_stale_temps

AUDIO_EVERY = 12
"""Video packets copied between two audio advances: the file stays interleaved."""


def join_segments(
    parts: Sequence[Path],
    output: Path,
    *,
    starts: Sequence[float],
    frames: int,
    audio_from: Path | None = None,
    audio_start: float = 0.0,
    duration: float | None = None,
    overwrite: bool = False,
    on_frames: Callable[[int], None] | None = None,
) -> Path:
    """Join `parts` (segment files, or PNG folders) into `output`. `starts[i]`: seconds from the film's first frame
    to part i's first frame; `frames`: the total the parts must hold; `audio_from`: the source whose audio covers
    [audio_start, audio_start + duration) of its video clock."""
    if len(parts) != len(starts) or not parts:
        raise ValueError("one start time per part, and at least one part")
    remove_stale_temps(output)
    if parts[0].is_dir():
        temp = output.with_name(f".{output.name}.{new_token()}.partial")
        try:
            _join_frames(parts, temp, frames)
            _install(temp, output, overwrite)
        except BaseException:
            shutil.rmtree(temp, ignore_errors=True)
            raise
        return output
    temp = output.with_name(f".{output.stem}.{new_token()}.partial{output.suffix}")
    try:
        _join_video(parts, temp, starts, frames, audio_from, audio_start, duration, on_frames)
        _install(temp, output, overwrite)
    except BaseException:
        with contextlib.suppress(OSError):
            temp.unlink()
        raise
    return output


def _join_frames(parts: Sequence[Path], temp: Path, frames: int) -> None:
    """PNG folders: the segments' frames hard-linked (copied where links fail) under their numbers in the film."""
    temp.mkdir()
    count = 0
    for part in parts:
        for source in sorted(part.glob("frame_*.png")):
            count += 1
            target = temp / f"frame_{count:06d}.png"
            try:
                os.link(source, target)
            except OSError:
                shutil.copy2(source, target)
    if count != frames:
        raise VideoError(f"the segments hold {count} frames, the job expected {frames}; rerun to redo the job")


def _same_codec(first: Any, other: Any) -> bool:
    a, b = first.codec_context, other.codec_context
    return (a.name, a.width, a.height, a.format.name if a.format else None, bytes(a.extradata or b"")) == (
        b.name,
        b.width,
        b.height,
        b.format.name if b.format else None,
        bytes(b.extradata or b""),
    )


def _join_video(
    parts: Sequence[Path],
    temp: Path,
    starts: Sequence[float],
    frames: int,
    audio_from: Path | None,
    audio_start: float,
    duration: float | None,
    on_frames: Callable[[int], None] | None,
) -> None:
    container = CONTAINERS.get(temp.suffix.lower())
    if container is None:
        raise VideoError(f"cannot tell the container of {temp} from its extension")
    inputs = [av.open(str(p)) for p in parts]
    audio: AudioMuxer | None = None
    try:
        streams = [c.streams.video[0] for c in inputs]
        for path, stream in zip(parts, streams, strict=True):
            if not _same_codec(streams[0], stream):
                raise VideoError(
                    f"segment {path.name} was encoded with other codec settings than {parts[0].name}; "
                    "delete the job folder to redo the job with one setting"
                )
        with av.open(str(temp), "w", format=container) as out:
            video = out.add_stream_from_template(streams[0])
            if streams[0].codec_tag:  # not carried by the template: mov would name ProRes 4444 as 422 HQ
                video.codec_tag = streams[0].codec_tag
            if audio_from is not None:
                try:
                    audio = AudioMuxer(Path(audio_from), audio_start, duration)
                    audio.add_to(out, container)
                except LookupError:
                    audio = None
            count, end = 0, 0.0
            for stream, start in zip(streams, starts, strict=True):
                count, end = _copy_packets(out, video, stream, start, audio, count, end, on_frames)
            if audio is not None:
                audio.advance(out, end if duration is None else duration, final=True)
        if count != frames:
            raise VideoError(f"the segments hold {count} frames, the job expected {frames}; rerun to redo the job")
    finally:
        if audio is not None:
            audio.close()
        for c in inputs:
            c.close()


def _copy_packets(
    out: Any,
    video: Any,
    stream: Any,
    start: float,
    audio: AudioMuxer | None,
    count: int,
    end: float,
    on_frames: Callable[[int], None] | None,
) -> tuple[int, float]:
    """Copy one segment's video packets, moved to the segment's start; returns (packets so far, video end)."""
    tb = Fraction(stream.time_base)
    shift = round(start / tb)  # as VideoWriter times a frame: round(seconds / time base)
    for packet in stream.container.demux(stream):
        if packet.size == 0:  # the demuxer's end-of-stream marker
            continue
        if packet.pts is not None:
            packet.pts += shift
        if packet.dts is not None:
            packet.dts += shift
        if packet.pts is not None:
            end = max(end, float((packet.pts + (packet.duration or 0)) * tb))
        packet.stream = video
        out.mux(packet)
        count += 1
        if count % AUDIO_EVERY == 0:
            if audio is not None:
                audio.advance(out, end)
            if on_frames is not None:
                on_frames(count)
    return count, end


def _install(temp: Path, output: Path, overwrite: bool) -> None:
    """Give the joined temporary its final name: never over another run's output unless `overwrite`."""
    if not overwrite:
        try:
            move_exclusive(temp, output)
        except FileExistsError:
            raise VideoError(
                f"output {output} was created by another run while the job was joining; the finished segments are "
                "kept: rerun with --overwrite to replace it"
            ) from None
        return
    if output.is_dir() and not output.is_symlink():
        aside = output.with_name(f".{output.name}.{new_token()}.partial")  # removed as stale if we die now
        os.rename(output, aside)
        try:
            os.rename(temp, output)
        finally:
            shutil.rmtree(aside, ignore_errors=True)
        return
    os.replace(temp, output)
