"""Writing video: :class:`VideoWriter` encodes float RGB frames into a file, or a folder of PNG frames.

Codec settings come from the table in :mod:`.formats`; samples are converted in :mod:`.color` and the source's
audio is carried by :mod:`.audio`. The output goes to a hidden temporary name of its own in the same folder
(``.name.<pid>-<host>-<random>.partial.ext``) and is moved into place by :meth:`VideoWriter.close` only, so a
half-written file never carries the final name; :class:`VideoWriter` says what happens when several runs write
one output, and what a full disk does.
"""

from __future__ import annotations

import errno
import logging
import os
import queue
import re
import secrets
import shutil
import threading
from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, Any

import av

from ..errors import VideoError
from .audio import AudioMuxer
from .color import FrameEncoder, to_float_rgb
from .formats import CONTAINERS, format_for
from .outputs import is_disk_full, move_exclusive, new_token, remove_stale_temps
from .reader import as_fraction

if TYPE_CHECKING:  # typing.Self is Python 3.11+; ComfyUI users often run 3.10
    from typing_extensions import Self

log = logging.getLogger(__name__)

# Variable-frame-rate output is timed in MPEG's 90 kHz clock, the one camera and phone files use.
_VFR_TIME_BASE = Fraction(1, 90000)


class _Finishing:
    """`with` for the writers: close() on success, abort() (no output left) on an exception."""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is not None:
            self.abort()
        else:
            self.close()

    def close(self) -> Any:
        raise NotImplementedError

    def abort(self) -> None:
        raise NotImplementedError


class VideoWriter(_Finishing):
    """Encodes frames to a video file (or a PNG folder), appearing under its final name only when complete.

    ``codec``: ``"h264"`` (yuv420p default, or yuv444p), ``"h265"`` (yuv420p10le), ``"prores"``
    (``prores_profile`` ``"hq"`` = 422 HQ yuv422p10le, ``"4444"`` = yuv444p10le, in .mov), ``"ffv1"`` (lossless,
    .mkv, 8-bit RGB ``bgr0`` by default) or ``"png"`` (``path`` is a folder receiving frame_000001.png, ...):
    the codecs of :data:`.formats.FORMATS`, which holds each one's settings. ``crf`` defaults to 18 (h264) / 20
    (h265). ``timestamps`` (seconds, one per frame, e.g. a reader's ``pts_seconds``) make the output
    variable-frame-rate with the same timing (shifted so the first frame is at 0); they can also be passed per
    :meth:`write` call. ``audio_from`` copies the first audio stream of that file (re-encoding it where the
    container cannot hold its codec), covering ``[audio_start, audio_start + min(audio_duration, written video
    duration)]`` of the source, where ``audio_start`` is in the same clock as the reader's ``pts_seconds``.

    Use it as a context manager: an exception inside ``with`` aborts (no output, temp file removed); a normal
    exit closes. :meth:`close` after fewer frames than planned (e.g. on Ctrl-C) still gives a valid file.

    Several runs may write the same output at once, so each writer fills its own hidden temporary,
    ``.stem.<pid>-<host>-<random>.partial.ext`` (``.name.<pid>-<host>-<random>.partial`` for a PNG folder), and
    the rename in :meth:`close` decides. With ``overwrite`` the last run to finish wins: one atomic replace, so the
    output is always one complete result. Without it the name is taken only if still free (a hard link, or an
    exclusive folder claim); if another run created the output meanwhile it is left untouched, our finished frames
    are moved to the visible sibling ``stem.conflict-<pid>-<random>.ext`` and close() raises a VideoError naming
    both. A new writer deletes the temporaries of its output that killed runs left: a unique name whose process no
    longer runs on this host, or the fixed ``.stem.partial.ext`` of earlier versions once untouched for a minute.
    A full disk (or quota, or file size limit) raises a VideoError naming the output; the partial file is removed.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        fps: Fraction | float | int = Fraction(24),
        *,
        codec: str = "h264",
        crf: int | None = None,
        pix_fmt: str | None = None,
        prores_profile: str | None = "hq",
        audio_from: str | os.PathLike[str] | None = None,
        audio_start: float = 0.0,
        audio_duration: float | None = None,
        overwrite: bool = False,
        timestamps: Sequence[float] | None = None,
        preset: str | None = None,
        encoder_options: dict[str, str] | None = None,
    ) -> None:
        self.path = Path(path)
        self.fps = as_fraction(fps)
        self.codec = codec.lower()
        self._spec = format_for(self.codec, prores_profile)
        self.pix_fmt = pix_fmt or self._spec.pix_fmt
        if self.pix_fmt not in self._spec.pix_fmts:
            raise VideoError(
                f"pixel format {self.pix_fmt!r} is not available for {codec}; use one of {self._spec.pix_fmts}"
            )
        self._options = self._encoder_options(crf, preset, encoder_options)
        self._timestamps = list(timestamps) if timestamps is not None else None
        self.overwrite = overwrite
        self.frames_written = 0
        self._closed = False
        self._aborted = False  # closed without output: close() then raises, it has no file to name
        self._kept: Path | None = None  # where our frames went when another run took the output name first
        self._size: tuple[int, int] | None = None
        self._container: Any = None
        self._stream: Any = None
        self._frame_encoder = FrameEncoder(self.pix_fmt)
        self._pts: list[int] = []
        self._t0: float | None = None
        self._last_t: float | None = None
        self._last_gap: float | None = None
        self._audio: AudioMuxer | None = None

        self._check_destination()
        if self.codec == "png":
            self._start_sequence(audio_from)
        else:
            self._start_file(audio_from, audio_start, audio_duration)

    # -- setup -----------------------------------------------------------------------------------------------

    def _encoder_options(self, crf: int | None, preset: str | None, extra: dict[str, str] | None) -> dict[str, str]:
        """The format's fixed encoder options, its quality and speed settings, then the caller's own."""
        options = dict(self._spec.options)
        if self._spec.crf is not None:
            options["crf"] = str(self._spec.crf if crf is None else crf)
        elif crf is not None:
            log.warning("crf is ignored for %s", self.codec)
        if self._spec.preset is not None:
            options["preset"] = preset or self._spec.preset
        options.update(extra or {})
        return options

    def _start_sequence(self, audio_from: str | os.PathLike[str] | None) -> None:
        """A PNG sequence fills a hidden temporary folder of its own."""
        self._format = "png"
        remove_stale_temps(self.path)
        self.temp_path = self.path.with_name(f".{self.path.name}.{new_token()}.partial")
        if audio_from is not None:
            log.info("PNG sequence output: audio from %s is not written", audio_from)
        self._make_temp_dir()

    def _start_file(
        self, audio_from: str | os.PathLike[str] | None, audio_start: float, audio_duration: float | None
    ) -> None:
        """Open the container (named by the extension) on a hidden temporary file of our own, and the audio."""
        ext = self.path.suffix.lower()
        if ext not in CONTAINERS:
            raise VideoError(
                f"cannot tell the container of {self.path} from its extension; use one of {', '.join(CONTAINERS)}"
            )
        self._format = CONTAINERS[ext]
        remove_stale_temps(self.path)
        self.temp_path = self.path.with_name(f".{self.path.stem}.{new_token()}.partial{self.path.suffix}")
        self._touch_temp()
        try:
            self._container = av.open(str(self.temp_path), mode="w", format=self._format)
            if self._spec.encoder not in self._container.supported_codecs:
                hint = "/".join(f".{e}" for e in self._spec.fits)
                raise VideoError(f"{self._format} ({ext}) cannot hold {self.codec} video; write a {hint} file")
            if audio_from is not None:
                try:
                    self._audio = AudioMuxer(Path(audio_from), audio_start, audio_duration)
                except LookupError:
                    log.warning("%s has no audio stream; writing video only", audio_from)
                except av.error.FFmpegError as e:
                    raise VideoError(f"cannot read audio from {audio_from} ({e})") from e
        except BaseException:
            self.abort()
            raise

    def _check_destination(self) -> None:
        """Refuse a missing folder, or an existing output without overwrite, before anything is written."""
        folder = self.path.parent
        if not folder.exists():
            raise VideoError(f"cannot write {self.path}: folder {folder} does not exist")
        if not folder.is_dir():
            raise VideoError(f"cannot write {self.path}: {folder} is not a folder")
        if self.path.exists() and not self.overwrite:
            raise VideoError(
                f"output {self.path} already exists: choose another name or allow replacing it (--overwrite on the "
                "command line, overwrite=True in Python)"
            )

    def _touch_temp(self) -> None:
        """Create our temporary file, exclusively: an unwritable folder is reported here, in plain words."""
        try:
            with open(self.temp_path, "xb"):  # the name is ours alone: never truncate another writer's file
                pass
        except OSError as e:
            raise VideoError(f"cannot write to output folder {self.path.parent}: {e.strerror or e}") from e

    def _make_temp_dir(self) -> None:
        """Create our temporary folder for a PNG sequence."""
        try:
            self.temp_path.mkdir()
        except OSError as e:
            raise VideoError(f"cannot write to output folder {self.path.parent}: {e.strerror or e}") from e

    def _open_stream(self, width: int, height: int) -> None:
        """Set up the encoder once the first frames give the size (and add the audio stream after the video's)."""
        pw, ph = self._frame_encoder.padded_size(width, height)
        if (pw, ph) != (width, height):
            log.info("padding %dx%d to %dx%d for %s", width, height, pw, ph, self.pix_fmt)
        if self.codec == "png":
            ctx = av.CodecContext.create("png", "w")
            ctx.width, ctx.height, ctx.pix_fmt = pw, ph, self.pix_fmt
            ctx.time_base = Fraction(self.fps.denominator, self.fps.numerator)
            self._stream = ctx
            return
        vfr = self._timestamps is not None
        stream = self._container.add_stream(self._spec.encoder, rate=self.fps, options=dict(self._options))
        stream.width, stream.height, stream.pix_fmt = pw, ph, self.pix_fmt
        ctx = stream.codec_context
        ctx.time_base = _VFR_TIME_BASE if vfr else Fraction(self.fps.denominator, self.fps.numerator)
        stream.time_base = ctx.time_base
        ctx.framerate = self.fps
        if self._frame_encoder.yuv:
            ctx.color_range, ctx.colorspace, ctx.color_primaries, ctx.color_trc = 1, 1, 1, 1
        if self._spec.codec_tag and self._format in ("mp4", "mov"):
            stream.codec_tag = self._spec.codec_tag
        self._stream = stream
        if self._audio is not None:
            try:
                self._audio.add_to(self._container, self._format)
            except (ValueError, av.error.FFmpegError) as e:
                raise VideoError(f"cannot add the audio of {self._audio.source} to {self.path} ({e})") from e

    # -- writing ---------------------------------------------------------------------------------------------

    def write(self, frames: Any, timestamps: Sequence[float] | None = None) -> None:
        """Append frames (T, H, W, 3) float in [0, 1] (torch or numpy; uint8 is accepted too)."""
        if self._closed:
            raise VideoError(f"writer for {self.path} is already closed")
        rgb = to_float_rgb(frames)
        t, h, w, _ = rgb.shape
        if t == 0:
            return
        if self._size is None:
            if self.frames_written == 0 and timestamps is not None and self._timestamps is None:
                self._timestamps = []
            self._size = (w, h)
            self._open_stream(w, h)
        elif self._size != (w, h):
            raise VideoError(f"frame size changed from {self._size[0]}x{self._size[1]} to {w}x{h} in {self.path}")
        times = self._frame_times(t, timestamps)
        try:
            for i, frame in enumerate(self._frame_encoder.frames(rgb)):
                if self.codec == "png":
                    self._write_png(frame)
                else:
                    frame.pts = times[i]
                    frame.time_base = self._stream.codec_context.time_base
                    self._container.mux(self._stream.encode(frame))
                self.frames_written += 1
            if self._audio is not None:
                self._audio.advance(self._container, self.duration)
        except OSError as e:
            if not is_disk_full(e):
                raise
            # The muxer lost bytes mid-packet: what is on disk is no longer a file worth keeping.
            doing = f"writing frame {self.frames_written + 1}"
            self.abort()
            raise self._space_error(e, doing) from e

    def _frame_times(self, count: int, timestamps: Sequence[float] | None) -> list[int]:
        """pts in the codec time base: frame numbers (constant rate) or rounded timestamps (variable rate)."""
        if self._timestamps is None:
            return list(range(self.frames_written, self.frames_written + count))
        if timestamps is not None:
            if len(timestamps) != count:
                raise ValueError(f"got {len(timestamps)} timestamps for {count} frames")
            self._timestamps.extend(float(x) for x in timestamps)
        if len(self._timestamps) < self.frames_written + count:
            raise VideoError(
                f"{self.path}: no timestamp for frame {len(self._timestamps)} (give one per frame, in the "
                "constructor or to write())"
            )
        out = []
        for i in range(self.frames_written, self.frames_written + count):
            t = float(self._timestamps[i])
            if self._t0 is None:
                self._t0 = t
            if self._last_t is not None:
                if t <= self._last_t:
                    raise VideoError(f"{self.path}: timestamps must increase (frame {i}: {t} after {self._last_t})")
                self._last_gap = t - self._last_t
            self._last_t = t
            pts = round((t - self._t0) / _VFR_TIME_BASE)
            if self._pts and pts <= self._pts[-1]:
                pts = self._pts[-1] + 1
            self._pts.append(pts)
            out.append(pts)
        del self._pts[:-1]
        return out

    def _write_png(self, frame: av.VideoFrame) -> None:
        """One numbered PNG file per frame in the temporary folder."""
        data = b"".join(bytes(p) for p in self._stream.encode(frame))
        with open(self.temp_path / f"frame_{self.frames_written + 1:06d}.png", "wb") as f:
            f.write(data)

    @property
    def duration(self) -> float:
        """Seconds of video written so far (last timestamp plus one frame for variable-rate output)."""
        if self.frames_written == 0:
            return 0.0
        if self._timestamps is None or self._t0 is None or self._last_t is None:
            return self.frames_written / float(self.fps)
        step = self._last_gap if self._last_gap is not None else 1.0 / float(self.fps)
        return self._last_t - self._t0 + step

    # -- finishing -------------------------------------------------------------------------------------------

    def close(self) -> Path:
        """Flush the encoder, finish the file and move it to its final name; returns that path."""
        if self._aborted:
            if self._kept is not None:
                raise VideoError(f"{self.path} was created by another run; this run's frames are in {self._kept}")
            raise VideoError(f"writing {self.path} was aborted; nothing was saved")
        if self._closed:
            return self.path
        if self.frames_written == 0:
            self.abort()
            raise VideoError(f"no frames were written to {self.path}; nothing was saved")
        try:
            if self.codec == "png":
                pass
            else:
                self._container.mux(self._stream.encode(None))
                if self._audio is not None:
                    self._audio.advance(self._container, self.duration, final=True)
                self._container.close()
                self._container = None
            self._install()
        except OSError as e:
            self.abort()
            if is_disk_full(e):
                raise self._space_error(e, f"finishing the file after {self.frames_written} frames") from e
            raise
        except BaseException:
            self.abort()
            raise
        finally:
            if self._audio is not None:
                self._audio.close()
                self._audio = None
        self._closed = True
        return self.path

    def finalize_partial(self) -> Path | None:
        """For interrupt handlers: keep what was written as a valid file, or nothing if no frame was."""
        if self._aborted:
            return None
        if self._closed:
            return self.path
        if self.frames_written == 0:
            self.abort()
            return None
        return self.close()

    def _space_error(self, error: OSError, doing: str) -> VideoError:
        """A full device, quota or file size limit in plain words, naming the output rather than the hidden temp."""
        if error.errno == errno.EFBIG:
            what = f"{self.path} reached the largest file size allowed there (a file system or process size limit)"
        elif error.errno == errno.ENOSPC:
            what = f"no space left on the device holding {self.path}"
        else:
            what = f"the disk quota (space allowed to this user) is used up on the device holding {self.path}"
        kind = "folder" if self.codec == "png" else "file"
        return VideoError(f"{what} ({doing}); the partial {kind} was removed")

    def _install(self) -> None:
        """Give the finished temporary its final name: the one step where runs writing the same output meet."""
        if self.overwrite:
            self._install_replacing()
            return
        try:
            move_exclusive(self.temp_path, self.path)
        except FileExistsError:
            raise self._keep_after_conflict() from None

    def _install_replacing(self) -> None:
        """Last one to finish wins. A folder in the way (a PNG sequence) is first renamed aside, as nothing can be
        renamed onto a non-empty folder; if another run installs between the two renames, its folder goes aside
        too, and the folders set aside are deleted once ours is in place."""
        aside: list[Path] = []
        try:
            for _ in range(8):
                if self.path.is_dir() and not self.path.is_symlink():
                    stray = [p.name for p in self.path.iterdir() if not re.fullmatch(r"frame_\d+\.png", p.name)]
                    if stray:
                        raise VideoError(f"refusing to replace folder {self.path}: it holds other files ({stray[0]})")
                    # A temporary name with our pid: if we die before deleting it, the next writer does.
                    hidden = self.path.with_name(f".{self.path.name}.{new_token()}.partial")
                    try:
                        os.rename(self.path, hidden)
                        aside.append(hidden)
                    except FileNotFoundError:  # another run moved it first
                        continue
                try:
                    os.replace(self.temp_path, self.path)
                    return
                except OSError:
                    if not self.path.is_dir():
                        raise
            raise VideoError(f"could not replace {self.path}: other runs kept installing a folder there")
        finally:
            for folder in aside:
                shutil.rmtree(folder, ignore_errors=True)

    def _keep_after_conflict(self) -> VideoError:
        """The output appeared while we were writing: leave it alone, and keep our finished frames under a visible
        sibling name rather than discard them."""
        base, ext = (self.path.name, "") if self.codec == "png" else (self.path.stem, self.path.suffix)
        kept = self.path.with_name(f"{base}.conflict-{os.getpid()}-{secrets.token_hex(3)}{ext}")
        try:
            move_exclusive(self.temp_path, kept)
        except OSError:
            kept = self.temp_path  # still complete under its hidden name; the message says where
        self._kept = kept
        return VideoError(
            f"output {self.path} was created by another run while this one was writing, so it was left as it is; "
            f"the {self.frames_written} finished frames were kept in {kept}"
        )

    def abort(self) -> None:
        """Stop without output: close everything and delete the temporary file or folder (after a completed
        close() this does nothing: the finished file stays)."""
        if self._closed and not self._aborted:
            return
        self._closed = self._aborted = True
        if self._container is not None:
            try:
                self._container.close()
            except Exception:  # noqa: BLE001 - the file is being thrown away anyway
                pass
            self._container = None
        if self._audio is not None:
            self._audio.close()
            self._audio = None
        temp = getattr(self, "temp_path", None)
        if temp is not None and getattr(self, "_kept", None) is None:  # kept frames are the user's, not ours
            if temp.is_dir():
                shutil.rmtree(temp, ignore_errors=True)
            elif temp.exists():
                try:
                    temp.unlink()
                except OSError:
                    pass

    def __del__(self) -> None:  # a writer dropped without close() must not leave a temp file behind
        if not getattr(self, "_closed", True):
            try:
                self.abort()
            except Exception:  # noqa: BLE001
                pass


class BackgroundWriter(_Finishing):
    """A VideoWriter fed through a worker thread: a chunk's frames are converted and encoded while the GPU computes
    the next chunk, not between chunks (where encoding would leave the GPU idle for a large share of a chunk's
    time). At most `depth` chunks wait in the queue, so memory stays bounded. An error in the worker (disk full, a
    size change) is raised by the next call here, and the partial file is then thrown away as VideoWriter does.
    `close`, `finalize_partial` and `abort` first let the worker finish (`abort` drops what still waits)."""

    def __init__(self, writer: VideoWriter, depth: int = 2) -> None:
        self.writer = writer
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._error: BaseException | None = None
        self._dropping = False
        self._failed = False
        self._accepted = 0
        self._thread = threading.Thread(target=self._work, name="infvsr-video-writer", daemon=True)
        self._thread.start()

    @property
    def path(self) -> Path:
        """The final output name."""
        return self.writer.path

    @property
    def frames_written(self) -> int:
        """Frames handed over so far, queued ones included: what close() or finalize_partial() will have written
        (a progress or preview count taken now then matches the finished file)."""
        return self._accepted

    def _work(self) -> None:
        """The worker: write queued chunks in order; after an error keep taking them (so write() never blocks)."""
        while True:
            item = self._queue.get()
            if item is None:
                return
            if self._error is None and not self._dropping:
                try:
                    self.writer.write(*item)
                except BaseException as error:  # noqa: BLE001 - handed to the caller's thread
                    self._error = error

    def _check(self) -> None:
        """Raise the worker's error, once the worker has stopped: the partial output is thrown away."""
        if self._error is None:
            return
        error, self._dropping, self._failed = self._error, True, True
        self._stop()
        self._error = None
        self.writer.abort()
        raise error

    def _stop(self) -> None:
        """Let the worker finish what is queued, and wait for it."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()

    def write(self, frames: Any, timestamps: Sequence[float] | None = None) -> None:
        """Queue frames (as VideoWriter.write takes them); blocks while `depth` chunks already wait."""
        self._check()
        if self._failed or not self._thread.is_alive():
            raise VideoError(f"writer for {self.path} is already closed")
        self._queue.put((frames, None if timestamps is None else list(timestamps)))
        self._accepted += len(frames)

    def close(self) -> Path:
        """Encode what is queued, then VideoWriter.close (flush, finish, move to the final name)."""
        self._stop()
        self._check()
        if self._failed:
            raise VideoError(f"writing {self.path} failed earlier; nothing was saved")
        return self.writer.close()

    def finalize_partial(self) -> Path | None:
        """For interrupt handlers: encode what is queued and keep it all as a valid file (None if no frame)."""
        self._stop()
        if self._failed:
            return None
        if self._error is not None:  # not raised yet: the caller is busy with an interrupt, so say it here
            log.warning("%s", self._error)
            self._error = None  # what was written before it stays usable (a full disk already removed the file)
        return self.writer.finalize_partial()

    def abort(self) -> None:
        """Drop what is queued and delete the temporary output."""
        self._dropping = True
        self._stop()
        self._error = None
        self.writer.abort()
