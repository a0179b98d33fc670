"""Streams that span queue runs: one chunk of a video per run, state kept server-side.

A stream is opened by the InfVSRVideoStream node under a stream name. The
registry keeps what must survive between runs: the open reader (and the next
chunk, read ahead so the last run is known), each chunk node's core session
(the cache) and each combine node's open writer. While a chunk is not the
last, the loader queues the same prompt again at the front of the queue with a
continuation marker in its own inputs (`MARKER_KEY`), so the next run reads
the next chunk; the last chunk queues nothing and the loop ends by itself.

Stopping:
* the Stop button (POST /infvsr/streams/stop) removes the queued continuation;
  the chunk in progress is finished and the file closed;
* Cancel (ComfyUI's interrupt) raised inside an InfVSR node finalizes the
  writers at once (a valid file of the chunks finished) and marks the stream
  interrupted; a continuation that was already queued then finds its stream
  ended and blocks its outputs, so it does nothing;
* a run that failed or was interrupted anywhere else, or a continuation that
  was removed from the queue, is noticed by `poll()` (a watchdog thread inside
  ComfyUI), which finalizes the writers the same way.
"""

from __future__ import annotations

import logging
import math
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import audio as audio_io
from . import comfy
from ._core import VideoReader, frames_to_read
from .prompt_queue import ComfyQueue, QueueBackend
from .sink import VideoSink
from .types import StreamCache

log = logging.getLogger("infvsr")

EVENT = "infvsr.progress"
"""Websocket event the web extension listens to."""


# -- streams --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StreamHandle:
    """INFVSR_STREAM: which stream and which chunk of it this run carries."""

    stream_id: str
    stream_name: str
    chunk: int
    """1-based index of this run's chunk."""
    chunks: int | None
    first_frame: int
    frames: int
    is_last: bool
    fps: float


@dataclass(eq=False)
class Stream:
    stream_name: str
    stream_id: str
    loader_node: str
    source: Path
    frames_per_run: int
    frames_total: int | None
    fps: float
    info: Any
    reader: VideoReader | None
    chunks_iter: Iterator[Any] | None = None
    lookahead: Any = None
    chunk: int = 0
    frames_read: int = 0
    emitted_last: bool = False
    caches: dict[str, StreamCache] = field(default_factory=dict)
    sinks: dict[str, VideoSink] = field(default_factory=dict)
    outputs: dict[str, dict] = field(default_factory=dict)
    state: str = "running"
    message: str = ""
    stop_requested: bool = False
    started: float = field(default_factory=time.monotonic)
    ended: float | None = None
    last_prompt_id: str | None = None
    continuation: tuple[str, str] | None = None
    lock: threading.RLock = field(default_factory=threading.RLock, repr=False)

    @property
    def running(self) -> bool:
        return self.state == "running"

    @property
    def chunks_total(self) -> int | None:
        if self.frames_total is None:
            return None
        return max(1, math.ceil(self.frames_total / self.frames_per_run))

    @property
    def frames_done(self) -> int:
        """Frames finished downstream: upscaled if a chunk node is attached, else written, else read."""
        if self.caches:
            return max(c.session.frames_out for c in self.caches.values())
        if self.sinks:
            return max(s.frames_written for s in self.sinks.values())
        return self.frames_read

    def summary(self) -> dict[str, Any]:
        elapsed = (self.ended or time.monotonic()) - self.started
        done = self.frames_done
        fps = done / elapsed if elapsed > 0.5 and done else 0.0  # no rate until there is something to measure
        eta = None
        if self.running and self.frames_total is not None and fps > 0:
            eta = max(0.0, (self.frames_total - done) / fps)
        return {
            "stream_name": self.stream_name,
            "stream_id": self.stream_id,
            "node": self.loader_node,
            "state": self.state,
            "message": self.message,
            "source": self.source.name,
            "chunk": self.chunk,
            "chunks": self.chunks_total,
            "frames_read": self.frames_read,
            "frames_done": done,
            "frames_total": self.frames_total,
            "fps": round(fps, 3),
            "eta": None if eta is None else round(eta, 1),
            "elapsed": round(elapsed, 2),
            "stop_requested": self.stop_requested,
            "outputs": list(self.outputs.values()),
            "state_bytes": sum(c.session.state_bytes() for c in self.caches.values()),
        }


class StreamEnded(RuntimeError):
    """A node was given a stream that has already ended (stopped, interrupted, failed or finished)."""


class StreamRegistry:
    """All streams of this server, by stream name (one running stream per name)."""

    def __init__(self, backend: QueueBackend | None = None) -> None:
        self.backend = backend or QueueBackend()
        self.streams: dict[str, Stream] = {}
        self.lock = threading.RLock()
        self._watchdog: threading.Thread | None = None
        self.poll_interval = 0.5

    # -- lookup ------------------------------------------------------------------------------------

    def by_id(self, stream_id: str) -> Stream | None:
        with self.lock:
            return next((s for s in self.streams.values() if s.stream_id == stream_id), None)

    def require(self, handle: StreamHandle) -> Stream:
        """The running stream of a handle, or a clear error."""
        if not isinstance(handle, StreamHandle):
            raise TypeError(f"stream must come from an InfVSR Video Stream node, got {type(handle).__name__}")
        stream = self.by_id(handle.stream_id)
        if stream is None:
            raise StreamEnded(f"InfVSR stream '{handle.stream_name}' is gone (the server restarted or it was replaced)")
        if not stream.running:
            raise StreamEnded(f"InfVSR stream '{handle.stream_name}' has already ended ({stream.state})")
        return stream

    def summary(self) -> list[dict[str, Any]]:
        with self.lock:
            return [s.summary() for s in self.streams.values()]

    # -- the loader's step ---------------------------------------------------------------------------

    def begin_run(self, stream_name: str, node_id: str, marker: str | None, open_stream: Any) -> Stream | None:
        """The stream this run continues (marker) or a new one (`open_stream()`); None means: do nothing.

        A continuation whose stream has ended, or whose previous run failed or
        was interrupted, returns None (and finalizes what the stream wrote).
        """
        with self.lock:
            if marker:
                stream = self.by_id(marker.split(":", 1)[0])
                if stream is None or not stream.running:
                    return None
                if stream.continuation is None or stream.continuation[1] != marker:
                    return None  # a stale copy of an older continuation
                previous = self.backend.status(stream.last_prompt_id)
                if previous == "error":
                    self.finish(stream, "interrupted", "the previous run failed or was cancelled")
                    return None
                if stream.stop_requested:
                    self.finish(stream, "stopped", "stopped by the user")
                    return None
                stream.continuation = None
            else:
                old = self.streams.get(stream_name)
                if old is not None and old.running:
                    self.finish(old, "stopped", "replaced by a new run of the same stream name")
                stream = open_stream()
                self.streams[stream_name] = stream
            stream.last_prompt_id = self.backend.current_prompt_id()
            stream.loader_node = node_id
        self._ensure_watchdog()
        return stream

    def next_chunk(self, stream: Stream) -> tuple[Any, bool]:
        """The next chunk of frames and whether it is the last one (one chunk is read ahead)."""
        with stream.lock:
            try:
                chunk = stream.lookahead if stream.lookahead is not None else next(stream.chunks_iter)
                stream.lookahead = next(stream.chunks_iter, None)
            except StopIteration:
                chunk = None
            except BaseException as e:
                self.finish(stream, "error", f"reading {stream.source.name} failed: {e}")
                raise
            if chunk is None:
                self.finish(stream, "done", "the video has no more frames")
                raise StreamEnded(f"InfVSR stream '{stream.stream_name}': {stream.source.name} has no frames left")
            stream.chunk += 1
            stream.frames_read += len(chunk)
            is_last = stream.lookahead is None
            stream.emitted_last = is_last
            if is_last and stream.frames_total != stream.frames_read:
                stream.frames_total = stream.frames_read  # the container's count was wrong
            return chunk, is_last

    def continue_after(self, stream: Stream, node_id: str) -> None:
        """Queue the next run of this stream (unless this was its last chunk or a stop was asked)."""
        with stream.lock:
            if stream.emitted_last or stream.stop_requested or not stream.running:
                return
            marker = f"{stream.stream_id}:{stream.chunk}"
            prompt_id = self.backend.requeue(node_id, marker)
            stream.continuation = (prompt_id, marker) if prompt_id is not None else None
            if prompt_id is None:
                stream.continuation = ("", marker)

    # -- ending ---------------------------------------------------------------------------------------

    def finish(self, stream: Stream, state: str, message: str = "") -> None:
        """End a stream: close (done) or finalize (anything else) every writer, free every cache."""
        with stream.lock:
            if not stream.running:
                return
            for node_id, sink in stream.sinks.items():
                if not sink.closed:
                    if state == "done":
                        try:
                            sink.close()
                        except Exception as e:  # noqa: BLE001
                            log.error("closing %s failed: %s", sink.path, e)
                            sink.finalize_partial()
                    else:
                        sink.finalize_partial()
                stream.outputs[node_id] = sink.preview()
            stream.sinks.clear()
            stream.caches.clear()
            stream.lookahead = None
            if stream.chunks_iter is not None and hasattr(stream.chunks_iter, "close"):
                try:
                    stream.chunks_iter.close()  # the reading generator releases its container now
                except Exception as e:  # noqa: BLE001
                    log.debug("closing the reader of %s: %s", stream.source, e)
            stream.chunks_iter = None
            if stream.reader is not None:
                stream.reader.close()
                stream.reader = None
            if stream.continuation and stream.continuation[0]:
                self.backend.cancel(stream.continuation[0])
            stream.continuation = None
            stream.state, stream.message = state, message
            stream.ended = time.monotonic()
        log.info("InfVSR stream '%s' %s%s", stream.stream_name, state, f": {message}" if message else "")
        self.notify(stream)

    def fail(self, stream: Stream, error: BaseException) -> None:
        """Called by a node whose work for this stream raised: interrupted or failed."""
        if isinstance(error, comfy.InterruptProcessingException):
            self.finish(stream, "interrupted", "cancelled")
        else:
            self.finish(stream, "error", f"{type(error).__name__}: {error}")

    def request_stop(self, stream_name: str) -> bool:
        """Stop after the chunk in progress (or now, if none is running)."""
        with self.lock:
            stream = self.streams.get(stream_name)
            if stream is None or not stream.running:
                return False
            stream.stop_requested = True
            if stream.continuation and stream.continuation[0]:
                self.backend.cancel(stream.continuation[0])
                stream.continuation = None
        self.poll()
        self.notify(stream)
        return True

    def poll(self) -> None:
        """Finalize streams that nothing will continue: no run of theirs running or queued."""
        with self.lock:
            active = [s for s in self.streams.values() if s.running]
        for stream in active:
            last = self.backend.status(stream.last_prompt_id)
            if last in ("running", "pending"):
                continue
            following = self.backend.status(stream.continuation[0]) if stream.continuation else "unknown"
            if following in ("running", "pending"):
                continue
            if stream.emitted_last and last in ("success", "unknown"):
                self.finish(stream, "done")
            elif stream.stop_requested:
                self.finish(stream, "stopped", "stopped by the user")
            elif "error" in (last, following):  # a Cancel may land on the continuation before its loader ran
                self.finish(stream, "interrupted", "the run failed or was cancelled")
            else:
                self.finish(stream, "stopped", "its next run was removed from the queue")

    def _ensure_watchdog(self) -> None:
        if not self.backend.live:
            return
        with self.lock:
            if self._watchdog is not None and self._watchdog.is_alive():
                return
            self._watchdog = threading.Thread(target=self._watch, name="infvsr-stream-watchdog", daemon=True)
            self._watchdog.start()

    def _watch(self) -> None:
        while True:
            time.sleep(self.poll_interval)
            try:
                self.poll()
            except Exception as e:  # noqa: BLE001 - the watchdog must survive anything
                log.error("InfVSR stream watchdog: %s", e)
            with self.lock:
                if not any(s.running for s in self.streams.values()):
                    self._watchdog = None
                    return

    def notify(self, stream: Stream, node: str | None = None) -> None:
        """Send the stream's progress to the web extension."""
        data = stream.summary()
        data["kind"] = "stream"
        if node is not None:
            data["reporter"] = node
        comfy.send_event(EVENT, data)


def open_stream(
    stream_name: str,
    node_id: str,
    source: Path,
    frames_per_run: int,
    start_frame: int = 0,
    max_frames: int | None = None,
) -> Stream:
    """A new stream over `source` (nothing decoded yet beyond the first frame for probing)."""
    reader = VideoReader(source, start=start_frame, max_frames=max_frames)
    info = reader.info
    total = frames_to_read(info.frame_count, start_frame, max_frames)
    stream = Stream(
        stream_name=stream_name,
        stream_id=uuid.uuid4().hex[:16],
        loader_node=node_id,
        source=source,
        frames_per_run=frames_per_run,
        frames_total=total,
        fps=float(info.fps),
        info=info,
        reader=reader,
    )
    stream.chunks_iter = reader.read_chunks(frames_per_run)
    return stream


def chunk_audio(stream_or_info: Any, source: Path, first_time: float, frames: int, fps: float) -> dict | None:
    """The audio under a chunk's frames, as AUDIO (None when the video has none)."""
    info = stream_or_info.info if hasattr(stream_or_info, "info") else stream_or_info
    if not getattr(info, "has_audio", False):
        return None
    return audio_io.read_audio(source, first_time, frames / fps, video_start_time=info.start_time)


def video_info_dict(info: Any, frames: torch.Tensor, fps: float, total: int | None) -> dict[str, Any]:
    """VideoHelperSuite's VHS_VIDEOINFO for a chunk (so VHS nodes can consume our outputs)."""
    duration = info.duration if info.duration is not None else (total / fps if total else None)
    return {
        "source_fps": float(info.fps),
        "source_frame_count": info.frame_count if info.frame_count is not None else (total or 0),
        "source_duration": duration or 0.0,
        "source_width": info.width,
        "source_height": info.height,
        "loaded_fps": fps,
        "loaded_frame_count": int(frames.shape[0]),
        "loaded_duration": int(frames.shape[0]) / fps,
        "loaded_width": int(frames.shape[2]),
        "loaded_height": int(frames.shape[1]),
    }


REGISTRY = StreamRegistry()
"""The server-wide registry (its backend becomes ComfyUI's queue when the pack loads inside ComfyUI)."""


def install_comfy_backend() -> None:
    instance = comfy.server_instance()
    if instance is not None and hasattr(instance, "prompt_queue"):
        REGISTRY.backend = ComfyQueue(instance)
