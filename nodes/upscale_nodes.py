"""InfVSRChunkUpscale (IMAGE in, IMAGE out, cache carried) and InfVSRUpscaleVideoFile (file to file)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from . import comfy
from ._core import Film, FilmProgress, InfVSRPipeline, VideoReader
from .audio import SOURCE_KEY
from .common import (
    check_guidance,
    check_images,
    check_model,
    chunk_count,
    input_videos,
    resolve_source,
    validate_video_name,
)
from .jobs import run_file_job
from .sink import FORMATS, VideoSink, output_inputs
from .streams import EVENT, REGISTRY, StreamHandle
from .types import CACHE_TYPE, GUIDANCE_TYPE, MODEL_TYPE, STREAM_TYPE, DAPEGuidance, InfVSRModel, StreamCache

CATEGORY = "InfVSR"
SCALE = ("INT", {"default": 4, "min": 1, "max": 8, "tooltip": "Upscaling factor (InfVSR is trained for 4x)."})


def advance(
    pipe: InfVSRPipeline,
    cache: StreamCache,
    frames: torch.Tensor,
    final: bool,
    on_chunk: Callable[[int], None],
) -> torch.Tensor:
    """Push frames into the cache's session one core chunk at a time; flush it when `final`.

    Feeding the core exactly one chunk's worth per call lets the node check
    for Cancel after every chunk; the core's output does not depend on how
    frames are batched, so this is the same as one push of everything.
    """
    session = cache.session
    outputs: list[torch.Tensor] = []
    start, total = 0, int(frames.shape[0])
    while start < total:
        need = max(1, session.next_chunk_length - session.pending_frames)
        piece = frames[start : start + need]
        start += int(piece.shape[0])
        # Deferred: each chunk's frames come back while the next one computes; the call's last ones below.
        out = pipe.push(session, piece, defer=True)
        if out.shape[0]:
            outputs.append(out)
            on_chunk(int(out.shape[0]))
    out = pipe.close(session) if final else pipe.collect(session)
    if out.shape[0]:
        outputs.append(out)
        on_chunk(int(out.shape[0]))
    cache.chunks += 1
    if outputs:
        return torch.cat(outputs)
    return pipe.empty_output(session, (int(frames.shape[1]), int(frames.shape[2])))


def _compatible(cache: StreamCache, model: InfVSRModel, guidance: DAPEGuidance, scale: int) -> None:
    if not isinstance(cache, StreamCache):
        raise TypeError(f"cache must come from another InfVSR Chunk Upscale node, got {type(cache).__name__}")
    if cache.model_id != model.model_id:
        raise ValueError("this cache was made by a different InfVSR model; a stream must keep one model")
    if cache.session.closed:
        raise ValueError(
            "this cache belongs to a stream that has ended (the node that made it had last_chunk on); "
            "turn last_chunk off on every chunk node but the last"
        )
    if cache.session.scale != scale:
        raise ValueError(f"scale {scale} differs from the stream's scale {cache.session.scale}")
    if cache.guidance is not None and not cache.guidance.same_as(guidance):
        raise ValueError(
            "the guidance differs from the one this stream started with; feed every chunk node the same "
            "InfVSR DAPE Guidance (taken from a fixed reference frame, not from the streaming loader)"
        )


class InfVSRChunkUpscale:
    """Upscales a batch of frames as the next part of a stream; chain the cache to continue it."""

    DESCRIPTION = (
        "Upscales any number of frames. Frames are processed in InfVSR chunks (9, then 12); frames that do "
        "not fill a chunk wait in the cache for the next node unless last_chunk is on, so a chain of these "
        "nodes gives exactly the frames of one run over all of them."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = ("IMAGE", CACHE_TYPE)
    RETURN_NAMES = ("images", "cache")
    FUNCTION = "upscale"

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {
            "required": {
                "model": (MODEL_TYPE,),
                "guidance": (GUIDANCE_TYPE,),
                "images": ("IMAGE", {"tooltip": "Low-resolution frames, any count."}),
                "scale": SCALE,
                "last_chunk": ("BOOLEAN", {
                    "default": True, "label_on": "last: flush", "label_off": "more chunks follow",
                    "tooltip": "On: upscale the frames still waiting as a padded final chunk. Off on every node "
                    "of a chain but the last. Ignored with a stream (the stream knows its last chunk)."}),
            },
            "optional": {
                "cache": (CACHE_TYPE, {"tooltip": "The previous chunk node's cache: continue its stream."}),
                "stream": (STREAM_TYPE, {"tooltip": "From InfVSR Video Stream: the cache lives on the server "
                                                    "between queue runs."}),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    def upscale(
        self,
        model: InfVSRModel,
        guidance: DAPEGuidance,
        images: torch.Tensor,
        scale: int = 4,
        last_chunk: bool = True,
        cache: StreamCache | None = None,
        stream: StreamHandle | None = None,
        unique_id: str | None = None,
    ) -> dict[str, Any]:
        model = check_model(model)
        guidance = check_guidance(guidance, model)
        frames = check_images(images)
        scale = int(scale)
        node = str(unique_id) if unique_id is not None else "chunk"
        if stream is not None:
            if cache is not None:
                raise ValueError("connect either a cache (chained nodes) or a stream (queue-run loop), not both")
            state = REGISTRY.require(stream)
            try:
                current = state.caches.get(node)
                if current is None:
                    current = StreamCache(model.pipeline.new_session(scale, prompt=guidance.prompt), guidance)
                else:
                    _compatible(current, model, guidance, scale)
                out = self._run(model, current, frames, stream.is_last, node, lambda: REGISTRY.notify(state, node))
                state.caches[node] = current
            except BaseException as e:
                REGISTRY.fail(state, e)
                raise
            REGISTRY.notify(state, node)
            result = current.fork()
        else:
            if cache is not None:
                _compatible(cache, model, guidance, scale)
                current = cache.fork()  # never advance a value ComfyUI may still hold in its cache
            else:
                current = StreamCache(model.pipeline.new_session(scale, prompt=guidance.prompt), guidance)
            if frames.shape[0] == 0 and not (last_chunk and current.session.pending_frames):
                raise ValueError("images is an empty batch (0 frames); nothing to upscale")
            out = self._run(model, current, frames, bool(last_chunk), node, None)
            result = current
        return {"ui": {"infvsr_cache": [result.summary()]}, "result": (out, result)}

    @staticmethod
    def _run(
        model: InfVSRModel,
        cache: StreamCache,
        frames: torch.Tensor,
        final: bool,
        node: str,
        notify: Callable[[], None] | None,
    ) -> torch.Tensor:
        expected = int(frames.shape[0]) + cache.session.pending_frames
        bar = comfy.ProgressBar(expected)
        done = 0

        def on_chunk(count: int) -> None:
            nonlocal done
            done += count
            bar.update_absolute(done, expected)
            comfy.report_progress(comfy.Progress(node, done, expected if final else None))
            if notify is not None:
                notify()

        session = cache.session
        size = (int(frames.shape[1]), int(frames.shape[2])) if frames.shape[0] else session.input_size
        with model.active(size, session.scale, new_stream=session.scene is None) as pipe:
            return advance(pipe, cache, frames, final, on_chunk)


class FileReport:
    """The file node's progress: ComfyUI's bar and progress hooks (where Cancel is noticed) and the web event."""

    def __init__(self, node: str, source_name: str, film: Film, read_frames: int) -> None:
        self.node, self.source_name, self.film = node, source_name, film
        self.chunks = chunk_count(film.frames_total, read_frames)
        self.bar = comfy.ProgressBar(film.frames_total or 1)
        self.last: FilmProgress | None = None

    def progress(self, progress: FilmProgress) -> None:
        self.last = progress
        self.bar.update_absolute(progress.frames_done, progress.frames_total)
        comfy.report_progress(comfy.Progress(self.node, progress.frames_done, progress.frames_total))
        self.send()

    def send(self, state: str = "running", message: str = "") -> None:
        last, sink = self.last, self.film.writer
        eta = last.eta if last is not None and state == "running" else None
        comfy.send_event(EVENT, {
            "kind": "file", "node": self.node, "stream_name": None, "state": state, "message": message,
            "source": self.source_name, "chunk": last.chunks_done if last else 0, "chunks": self.chunks,
            "frames_done": self.film.frames_written, "frames_total": self.film.frames_total,
            "fps": round(last.fps, 3) if last else 0.0, "eta": None if eta is None else round(eta, 1),
            "elapsed": round(last.seconds, 2) if last else 0.0,
            "outputs": [sink.preview()] if sink is not None else [],
        })


class InfVSRUpscaleVideoFile:
    """Upscales a whole video file to a video file in one run, holding a few chunks at a time."""

    DESCRIPTION = (
        "Reads the video chunk by chunk, upscales, and writes as it goes: memory stays flat however long the "
        "film. Cancel stops after the chunk in progress and keeps a valid file of what was finished."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = ("STRING", "VIDEO")
    RETURN_NAMES = ("filename", "video")
    OUTPUT_NODE = True
    FUNCTION = "upscale_file"

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {
            "required": {
                "model": (MODEL_TYPE,),
                "video": (input_videos(), {"video_upload": True, "tooltip": "A video in ComfyUI's input folder."}),
                "scale": SCALE,
                **output_inputs(),
                "read_frames": ("INT", {"default": 12, "min": 1, "max": 4096,
                                        "tooltip": "Frames decoded at a time; upscaled frames are written as each "
                                        "InfVSR chunk finishes, so memory holds one read plus one chunk."}),
                "keep_audio": ("BOOLEAN", {"default": True, "tooltip": "Copy the source's audio track."}),
                "detect_scenes": ("BOOLEAN", {"default": False,
                                              "tooltip": "Reset the stream at hard scene cuts (as the release)."}),
            },
            "optional": {
                "guidance": (GUIDANCE_TYPE, {"tooltip": "Fixed DAPE prompt; without it each scene takes its "
                                                        "first frame as reference."}),
                "video_input": ("VIDEO", {"tooltip": "A ComfyUI VIDEO; replaces the file picked above."}),
                "start_frame": ("INT", {"default": 0, "min": 0, "max": 2**31 - 1}),
                "max_frames": ("INT", {"default": 0, "min": 0, "max": 2**31 - 1, "tooltip": "0 = to the end."}),
                "devices": ("STRING", {"default": "", "tooltip": "Empty: this process, the model as loaded. Several "
                                       "GPUs of this machine (cuda:0,cuda:1,...): the film's scenes are upscaled "
                                       "in parallel, one worker per GPU loading the model's files (needs Ray: pip "
                                       "install ray), and joined: exactly the frames of one run."}),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    @classmethod
    def VALIDATE_INPUTS(cls, video: str) -> bool | str:
        return validate_video_name(video)

    def upscale_file(
        self,
        model: InfVSRModel,
        video: str,
        scale: int = 4,
        format: str = "h264-mp4",
        crf: int = 18,
        filename_prefix: str = "InfVSR/upscaled",
        read_frames: int = 12,
        keep_audio: bool = True,
        detect_scenes: bool = False,
        guidance: DAPEGuidance | None = None,
        video_input: Any = None,
        start_frame: int = 0,
        max_frames: int = 0,
        devices: str = "",
        unique_id: str | None = None,
    ) -> dict[str, Any]:
        model = check_model(model)
        if guidance is not None:
            check_guidance(guidance, model)
        if format not in FORMATS:
            raise ValueError(f"unknown format {format!r}; choose one of {', '.join(FORMATS)}")
        source = resolve_source(video, video_input)
        node = str(unique_id) if unique_id is not None else "file"
        if devices.strip():
            if guidance is not None:
                raise ValueError("devices: a fixed guidance does not reach the workers; disconnect it (each scene "
                                 "then takes its first frame) or leave devices empty")
            path, preview = run_file_job(
                model, source, devices, scale=int(scale), format_name=format, crf=crf, filename_prefix=filename_prefix,
                keep_audio=keep_audio, detect_scenes=detect_scenes, start_frame=start_frame, max_frames=max_frames,
                node=node)
            return {"ui": {"infvsr_video": [preview]},
                    "result": (str(path), comfy.video_from_file(path) if FORMATS[format].codec != "png" else None)}

        def open_sink(first: Any) -> VideoSink:
            audio = None
            if keep_audio and reader.info.has_audio:
                audio = {SOURCE_KEY: {"path": str(source), "start": first.pts_seconds[0]}}
            return VideoSink(filename_prefix, format, float(reader.info.fps), crf, audio)

        with (
            VideoReader(source, start=start_frame, max_frames=max_frames or None) as reader,
            model.active((reader.info.height, reader.info.width), int(scale)) as pipe,
        ):
            film = Film(
                pipe,
                reader,
                open_sink,
                scale=int(scale),
                detect_scenes=detect_scenes,
                prompt=guidance.prompt if guidance is not None else None,
                read_frames=int(read_frames),
            )
            report = FileReport(node, source.name, film, int(read_frames))
            film.on_progress = report.progress
            try:
                result = film.run()
            except BaseException as e:
                interrupted = isinstance(e, comfy.InterruptProcessingException)
                report.send("interrupted" if interrupted else "error", "cancelled" if interrupted else str(e))
                raise
        report.send("done")
        sink = film.writer
        path = result.path
        return {
            "ui": {"infvsr_video": [sink.preview()]},
            "result": (str(path), comfy.video_from_file(path) if FORMATS[format].codec != "png" else None),
        }
