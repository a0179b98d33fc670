"""Video in and out: InfVSRLoadVideoFrames, InfVSRVideoStream (one chunk per queue run), InfVSRVideoCombine."""

from __future__ import annotations

import hashlib
from typing import Any

import torch

from . import comfy
from ._core import VideoReader
from .common import check_images, input_videos, resolve_source, validate_video_name
from .prompt_queue import MARKER_KEY
from .sink import VideoSink, output_inputs
from .streams import (
    REGISTRY,
    StreamHandle,
    chunk_audio,
    install_comfy_backend,
    open_stream,
    video_info_dict,
)
from .types import STREAM_TYPE

CATEGORY = "InfVSR"
VIDEO_COMBO_TOOLTIP = "A video in ComfyUI's input folder (upload with the button)."


def _video_input() -> tuple:
    return (input_videos(), {"video_upload": True, "tooltip": VIDEO_COMBO_TOOLTIP})


class InfVSRLoadVideoFrames:
    """A range of frames of a video as an IMAGE batch, with its audio, fps and VideoHelperSuite info."""

    DESCRIPTION = (
        "Decodes frames start_frame .. start_frame + frame_count - 1 only (frame_count 0: to the end of the clip). "
        "Use it for a guidance reference frame or for hand-made chunks; for a whole film use InfVSR Video Stream "
        "or InfVSR Upscale Video File."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = ("IMAGE", "AUDIO", "FLOAT", "VHS_VIDEOINFO")
    RETURN_NAMES = ("frames", "audio", "fps", "video_info")
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {
            "required": {
                "video": _video_input(),
                "start_frame": ("INT", {"default": 0, "min": 0, "max": 2**31 - 1}),
                "frame_count": ("INT", {"default": 48, "min": 0, "max": 100000,
                                        "tooltip": "Frames to decode, 0 = to the end of the clip (all of them "
                                        "are held in memory)."}),
            },
            "optional": {"video_input": ("VIDEO", {"tooltip": "A ComfyUI VIDEO; replaces the file picked above."})},
        }

    @classmethod
    def VALIDATE_INPUTS(cls, video: str) -> bool | str:
        return validate_video_name(video)

    @classmethod
    def IS_CHANGED(cls, video: str, start_frame: int = 0, frame_count: int = 48, video_input: Any = None) -> str:
        try:
            path = resolve_source(video, None)
            stat = path.stat()
            key = f"{path}:{stat.st_size}:{stat.st_mtime_ns}:{start_frame}:{frame_count}"
        except (OSError, ValueError):
            key = f"{video}:{start_frame}:{frame_count}"
        return hashlib.sha256(key.encode()).hexdigest()

    def load(self, video: str, start_frame: int = 0, frame_count: int = 48, video_input: Any = None) -> tuple:
        source = resolve_source(video, video_input)
        with VideoReader(source, start=start_frame, max_frames=frame_count or None) as reader:
            info = reader.info
            chunk = reader.read_all()
        if len(chunk) == 0:
            raise ValueError(
                f"{source.name} has no frames from frame {start_frame} on"
                + (f" (it has {info.frame_count}): lower start_frame or pick a longer clip" if info.frame_count else "")
            )
        fps = float(info.fps)
        audio = chunk_audio(info, source, chunk.pts_seconds[0], len(chunk), fps)
        return (chunk.frames, audio, fps, video_info_dict(info, chunk.frames, fps, info.frame_count))


class InfVSRVideoStream:
    """Streams a video one chunk per queue run; the run re-queues itself until the video ends."""

    DESCRIPTION = (
        "Each queue run outputs the next frames_per_run frames. The stream's state (open reader, chunk caches, "
        "open writers) stays on the server under the stream name, and the next run is queued automatically "
        "until the last chunk. Connect its stream output to InfVSR Chunk Upscale and InfVSR Video Combine."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = ("IMAGE", "AUDIO", "FLOAT", "VHS_VIDEOINFO", STREAM_TYPE)
    RETURN_NAMES = ("frames", "audio", "fps", "video_info", "stream")
    FUNCTION = "next_chunk"

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {
            "required": {
                "video": _video_input(),
                "frames_per_run": ("INT", {"default": 12, "min": 1, "max": 100000,
                                           "tooltip": "Frames per queue run. The run's upscaled frames are held in "
                                           "memory: at 4x from 1080p, each frame is ~100 MB."}),
                "stream_name": ("STRING", {"default": "infvsr",
                                       "tooltip": "Name of the stream on the server (one running stream per name)."}),
            },
            "optional": {
                "video_input": ("VIDEO", {"tooltip": "A ComfyUI VIDEO; replaces the file picked above."}),
                "start_frame": ("INT", {"default": 0, "min": 0, "max": 2**31 - 1}),
                "max_frames": ("INT", {"default": 0, "min": 0, "max": 2**31 - 1, "tooltip": "0 = to the end."}),
            },
            "hidden": {"queued_prompt": "PROMPT", "unique_id": "UNIQUE_ID"},
        }

    @classmethod
    def VALIDATE_INPUTS(cls, video: str) -> bool | str:
        return validate_video_name(video)

    @classmethod
    def IS_CHANGED(cls, **kwargs: Any) -> float:
        return float("nan")  # every run reads the next chunk

    def next_chunk(
        self,
        video: str,
        frames_per_run: int = 12,
        stream_name: str = "infvsr",
        video_input: Any = None,
        start_frame: int = 0,
        max_frames: int = 0,
        queued_prompt: dict | None = None,
        unique_id: str | None = None,
    ) -> Any:
        node = str(unique_id) if unique_id is not None else "stream"
        stream_name = stream_name.strip() or "infvsr"
        marker = None
        if isinstance(queued_prompt, dict):  # ComfyUI's PROMPT: the graph this run was queued with
            marker = (queued_prompt.get(node) or {}).get("inputs", {}).get(MARKER_KEY)
        if not REGISTRY.backend.live:
            install_comfy_backend()

        def new_stream() -> Any:
            source = resolve_source(video, video_input)
            return open_stream(stream_name, node, source, frames_per_run, start_frame, max_frames or None)

        stream = REGISTRY.begin_run(stream_name, node, marker, new_stream)
        if stream is None:  # a queued continuation of a stream that has ended: do nothing, quietly
            blocked = comfy.execution_blocker()
            return tuple(blocked for _ in self.RETURN_TYPES)
        chunk, is_last = REGISTRY.next_chunk(stream)
        REGISTRY.continue_after(stream, node)
        fps = stream.fps
        frames = chunk.frames
        handle = StreamHandle(
            stream_id=stream.stream_id, stream_name=stream_name, chunk=stream.chunk, chunks=stream.chunks_total,
            first_frame=chunk.index, frames=len(chunk), is_last=is_last, fps=fps,
        )
        audio = chunk_audio(stream, stream.source, chunk.pts_seconds[0], len(chunk), fps)
        info = video_info_dict(stream.info, frames, fps, stream.frames_total)
        REGISTRY.notify(stream, node)
        return {"ui": {"infvsr_stream": [stream.summary()]}, "result": (frames, audio, fps, info, handle)}


class InfVSRVideoCombine:
    """Writes frames to a video file (or PNG folder) in the output folder, with audio; previews it."""

    DESCRIPTION = (
        "Encodes through PyAV. With a stream connected, every queue run appends its chunk to the same file, "
        "which is finalized (moved to its name) after the last chunk, or with what was done on Cancel."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = ("STRING", "VIDEO")
    RETURN_NAMES = ("filename", "video")
    OUTPUT_NODE = True
    FUNCTION = "combine"

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {
            "required": {
                "images": ("IMAGE",),
                "fps": ("FLOAT", {"default": 24.0, "min": 0.01, "max": 1000.0, "step": 0.001}),
                **output_inputs(),
            },
            "optional": {
                "audio": ("AUDIO", {"tooltip": "Muxed in; audio from the InfVSR loaders is copied, not re-encoded. "
                                               "With a stream, audio from elsewhere must be the whole soundtrack."}),
                "stream": (STREAM_TYPE, {"tooltip": "Append every queue run of this stream to one file."}),
                "video_info": ("VHS_VIDEOINFO", {"tooltip": "VideoHelperSuite info: its loaded_fps replaces fps."}),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    def combine(
        self,
        images: torch.Tensor,
        fps: float = 24.0,
        filename_prefix: str = "InfVSR/upscaled",
        format: str = "h264-mp4",
        crf: int = 18,
        audio: Any = None,
        stream: StreamHandle | None = None,
        video_info: dict | None = None,
        unique_id: str | None = None,
    ) -> dict[str, Any]:
        if isinstance(video_info, dict) and video_info.get("loaded_fps"):
            fps = float(video_info["loaded_fps"])
        frames = check_images(images)
        node = str(unique_id) if unique_id is not None else "combine"
        if stream is None:
            if frames.shape[0] == 0:
                raise ValueError("images is an empty batch (0 frames); nothing to write")
            sink = VideoSink(filename_prefix, format, fps, crf, audio)
            try:
                sink.write(frames)
                comfy.check_interrupt()
                path = sink.close()
            except BaseException:
                if not sink.closed:
                    sink.finalize_partial()
                raise
            return self._result(sink, path)
        state = REGISTRY.require(stream)
        try:
            sink = state.sinks.get(node)
            if sink is None:
                sink = VideoSink(filename_prefix, format, fps, crf, audio)
                state.sinks[node] = sink
            sink.write(frames)
            comfy.check_interrupt()
            path = sink.close() if stream.is_last else None
        except BaseException as e:
            REGISTRY.fail(state, e)
            raise
        state.outputs[node] = sink.preview()
        REGISTRY.notify(state, node)
        return self._result(sink, path)

    @staticmethod
    def _result(sink: VideoSink, path: Any) -> dict[str, Any]:
        video = comfy.video_from_file(path) if path is not None and sink.format.codec != "png" else None
        return {"ui": {"infvsr_video": [sink.preview()]}, "result": (str(path or sink.path), video)}
