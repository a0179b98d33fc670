"""The workers of a film job: one Ray actor per device, each holding one loaded pipeline, upscaling segments.

A segment is an ordinary `Film` run (the same loop as the command line) over a frame range of the input, with
the first pass's cuts replayed (`KnownCuts`) and the output written to the segment's file in the job's codec.
The file appears under its final name only when complete (the writer's temporary-then-rename); a segment that
stops early leaves nothing there, so only whole segments are ever recorded and joined.

Ray restarts an actor whose process dies (reloading its pipeline in a new process) and retries the segment it
was running there; the driver hands a segment whose actor is gone for good to another one. Actors are threaded
(two calls at once) so that the driver can ask for progress, or ask a segment to stop, while it runs.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import InfVSRError, UsageError, VideoError
from .cuts import READ_FRAMES, KnownCuts
from .segments import Segment
from .spec import EncodeOptions, LoadOptions

MAX_RESTARTS = 3
"""Times Ray restarts a dead worker (and retries its segment there) before the driver gives the segment away."""
CRASH_HOOK = "INFVSR_JOBS_TEST_CRASH"
"""Test hook: a file holding `SEGMENT FRAMES`; the first worker to pass FRAMES output frames of SEGMENT renames
it (appending its pid) and kills its own process, as a crash or a lost machine would."""
READY_NOTICE_SECONDS = 30.0
"""How long workers may take to start and load before the driver says it is waiting for them."""
FORWARDED_ENV = ("PYTORCH_CUDA_ALLOC_CONF", "HF_HUB_OFFLINE", "HF_HUB_CACHE", "HF_HOME")


class SegmentStopped(InfVSRError):
    """The driver asked the worker to stop (Ctrl-C, Cancel): the segment's file is not written."""


@dataclass(frozen=True)
class SegmentTask:
    """Everything a worker needs to upscale one segment (sent through Ray, so plain data)."""

    input: str
    fps: float | None
    scale: int
    detect_scenes: bool
    scene_threshold: float
    segment: Segment
    path: str
    """The segment file's final name (in the job folder, on storage every worker sees)."""
    encode: EncodeOptions
    origin_pts: int | None = None
    """The video's first frame's pts, with `segment.seek`: the reader starts at that keyframe."""


@dataclass(frozen=True)
class SegmentResult:
    """A finished segment: what the manifest records and the driver checks."""

    index: int
    frames: int
    scenes: int
    seconds: float
    bytes: int
    first_time: float
    worker: str


class SegmentOutput:
    """The segment's writer as `Film` sees it: warm-up frames dropped, and never a partial file under the final name
    (`finalize_partial`, which a stopped film calls to keep its frames, throws them away instead)."""

    def __init__(self, writer: Any, skip: int) -> None:
        self.writer, self.skip = writer, skip
        self.first_time: float | None = None

    @property
    def frames_written(self) -> int:
        return self.writer.frames_written

    def write(self, frames: Any, timestamps: list[float] | None = None) -> None:
        if self.skip:
            drop = min(self.skip, int(frames.shape[0]))
            frames = frames[drop:]
            timestamps = None if timestamps is None else list(timestamps)[drop:]
            self.skip -= drop
        if int(frames.shape[0]):
            if self.first_time is None and timestamps:
                self.first_time = float(timestamps[0])
            self.writer.write(frames, timestamps)

    def close(self) -> Path:
        return self.writer.close()

    def finalize_partial(self) -> None:
        self.writer.abort()
        return None

    def abort(self) -> None:
        self.writer.abort()


def run_segment(
    pipe: Any, task: SegmentTask, on_frames: Callable[[int], None] | None = None, worker: str = ""
) -> SegmentResult:
    """Upscale one segment into its file with the film loop. `on_frames(frames written)` is called after every
    chunk; it may raise to stop the segment (nothing is then left under the segment's name)."""
    from ..io.reader import SeekError

    segment = task.segment
    started = time.perf_counter()
    seek = None
    if segment.seek is not None and task.origin_pts is not None:
        seek = (segment.seek[0], segment.seek[1], task.origin_pts)
    try:
        return _run_film(pipe, task, seek, on_frames, worker, started)
    except SeekError:  # the keyframe is not where the first pass saw it: decode from the film's first frame
        return _run_film(pipe, task, None, on_frames, worker, started)


def _run_film(
    pipe: Any,
    task: SegmentTask,
    seek: tuple[int, int, int] | None,
    on_frames: Callable[[int], None] | None,
    worker: str,
    started: float,
) -> SegmentResult:
    from ..film import Film, FilmProgress
    from ..io import BackgroundWriter, VideoReader, VideoWriter

    segment = task.segment
    with VideoReader(task.input, start=segment.read_from, max_frames=segment.work, fps=task.fps, seek=seek) as reader:
        output: SegmentOutput | None = None

        def open_writer(first: Any) -> SegmentOutput:
            nonlocal output
            writer = VideoWriter(
                task.path,
                reader.info.fps,
                codec=task.encode.codec,
                crf=task.encode.crf,
                pix_fmt=task.encode.pix_fmt,
                prores_profile=task.encode.prores_profile,
                overwrite=True,  # a file the manifest does not list is an unrecorded run's: redone
            )
            output = SegmentOutput(BackgroundWriter(writer), segment.warmup)
            return output

        def progress(state: FilmProgress) -> None:
            if on_frames is not None:
                on_frames(state.frames_done)

        film = Film(
            pipe,
            reader,
            open_writer,
            scale=task.scale,
            detect_scenes=task.detect_scenes,
            scene_threshold=task.scene_threshold,
            read_frames=READ_FRAMES,
            on_progress=progress,
            detector=KnownCuts(segment.local_cuts()) if task.detect_scenes else None,
        )
        result = film.run()  # damage past the segment's last frame is the first pass's to report, not ours
    assert output is not None
    if result.frames != segment.frames:
        with contextlib.suppress(OSError):
            os.unlink(result.path)
        raise VideoError(
            f"{task.input}: segment {segment.index} (frames {segment.start}-{segment.end - 1}) gave {result.frames} "
            "frames; the input changed since the job's first pass? pass --fresh to start over"
        )
    return SegmentResult(
        segment.index,
        result.frames,
        result.scenes,
        time.perf_counter() - started,
        Path(result.path).stat().st_size,
        float(output.first_time if output.first_time is not None else segment.first_time),
        worker,
    )


def load_worker_pipeline(load: LoadOptions, device: str) -> Any:
    """The pipeline of one worker: the driver's files and settings (as the command line loads them)."""
    from ..loader import load_pipeline

    if load.gpu_memory_gib is not None and device.startswith("cuda"):
        from ..memory.plan import cap_device_memory

        cap_device_memory(device, load.gpu_memory_gib)
    files = load.file_map()
    extra = {"lora": files["lora"]} if "lora" in files else {}  # a LoRA merged at load, as --lora does
    pipe = load_pipeline(
        None,
        **extra,
        dit=files.get("dit"),
        vae=files.get("vae"),
        ram=files.get("ram"),
        dape=files.get("dape"),
        device=device,
        dtype=load.dtype,
        offload=load.offload,
        vae_seams=load.seams,
        vae_tiling=load.tiling,
        spill_dir=load.spill_dir,
        host_memory_gib=load.host_memory_gib,
    )
    pipe.dit.attention_backend = load.attention
    return pipe


def _crash_if_asked(segment: int, frames: int) -> None:
    """The test hook (CRASH_HOOK): kill this process for real, mid-segment, once."""
    hook = os.environ.get(CRASH_HOOK)
    if not hook:
        return
    try:
        wanted, after = (int(x) for x in Path(hook).read_text().split())
    except (OSError, ValueError):
        return
    if wanted == segment and frames >= after:
        try:
            os.rename(hook, f"{hook}.{os.getpid()}")  # only one worker wins the rename
        except OSError:
            return
        os._exit(70)


class SegmentWorker:
    """A Ray actor (made remote in `start_workers`): one device, one pipeline, one segment at a time."""

    def __init__(self, load: LoadOptions, device: str) -> None:
        self.device = device
        self.name = f"{socket.gethostname()}:{os.getpid()}"
        self._lock = threading.Lock()
        self._current: dict[str, Any] | None = None
        self._stop = threading.Event()
        self.error: BaseException | None = None
        self.pipe = None
        try:
            import torch

            cpus = _assigned_cpus()
            if cpus:
                torch.set_num_threads(cpus)
            self.pipe = load_worker_pipeline(load, device)
            self.device_name = device
            if device.startswith("cuda"):
                self.device_name = f"{device} ({torch.cuda.get_device_name(torch.device(device))})"
        except BaseException as e:  # noqa: BLE001 - raised by ready(), where the driver gets it as itself
            self.error = e

    def ready(self) -> dict[str, Any]:
        """Who this worker is, once its pipeline is loaded (or the error that loading raised)."""
        if self.error is not None:
            raise self.error
        return {"name": self.name, "device": self.device_name, "pid": os.getpid(), "host": socket.gethostname()}

    def run(self, task: SegmentTask) -> SegmentResult:
        if self.error is not None:
            raise self.error
        folder = Path(task.path).parent
        if not folder.is_dir():
            raise UsageError(
                f"{socket.gethostname()}: the job folder {folder} is not there: the output's folder must be on "
                "storage every machine of the cluster mounts at the same path"
            )
        self._stop.clear()
        segment = task.segment
        with self._lock:
            self._current = {"segment": segment.index, "frames": 0, "total": segment.frames}

        def on_frames(done: int) -> None:
            with self._lock:
                if self._current is not None:
                    self._current["frames"] = done
            _crash_if_asked(segment.index, done)
            if self._stop.is_set():
                raise SegmentStopped(f"segment {segment.index} stopped")

        try:
            return run_segment(self.pipe, task, on_frames, worker=f"{self.name} {self.device}")
        finally:
            with self._lock:
                self._current = None

    def progress(self) -> dict[str, Any] | None:
        """The segment running now: {segment, frames, total}, or None when idle."""
        with self._lock:
            return None if self._current is None else dict(self._current)

    def stop(self) -> None:
        """Stop the running segment at its next chunk (its file is not written)."""
        self._stop.set()


def _assigned_cpus() -> int:
    """CPU cores Ray gave this actor (0 outside Ray): torch's thread count, so workers do not fight over cores."""
    try:
        import ray

        return int(ray.get_runtime_context().get_assigned_resources().get("CPU", 0))
    except Exception:  # noqa: BLE001 - not in a Ray worker
        return 0


def import_ray() -> Any:
    """Ray, or a clear error naming the install command."""
    try:
        import ray
    except ImportError as e:
        raise UsageError(
            "running on several devices (--devices with more than one, or --ray-address) needs Ray: "
            "pip install 'ray>=2.9' (or pip install -r requirements-dev.txt)"
        ) from e
    return ray


def worker_env() -> dict[str, str]:
    """Environment for the actors: this package importable (the driver's copy, wherever it lives), and the
    driver's InfVSR and PyTorch settings."""
    root = str(Path(__file__).resolve().parents[2])
    paths = [root, *(p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p != root)]
    env = {"PYTHONPATH": os.pathsep.join(paths)}
    for name, value in os.environ.items():
        if name.startswith("INFVSR_") or name in FORWARDED_ENV:
            env[name] = value
    return env


def connect(address: str | None, devices: tuple[str, ...]) -> bool:
    """Join the cluster at `address`, or start a local one that sees exactly the named GPUs; True if this call
    started Ray (the caller then shuts it down). A Ray already initialised in this process is used as it is."""
    ray = import_ray()
    if ray.is_initialized():
        return False
    import logging

    options: dict[str, Any] = {"logging_level": logging.WARNING, "log_to_driver": False}
    if address:
        ray.init(address=address, **options)
        return True
    gpus = [int(d.partition(":")[2]) for d in devices if d.startswith("cuda")]
    saved = os.environ.get("CUDA_VISIBLE_DEVICES")
    if gpus:  # Ray hands out the GPUs it sees: let it see the named ones only (as numbered in this process)
        visible = [v.strip() for v in saved.split(",")] if saved else None
        if visible is not None and max(gpus) >= len(visible):
            raise UsageError(f"--devices names cuda:{max(gpus)}, but CUDA_VISIBLE_DEVICES={saved} shows {len(visible)}")
        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(visible[g] if visible else str(g) for g in gpus)
    try:
        ray.init(num_cpus=os.cpu_count() or 1, num_gpus=len(gpus), include_dashboard=False, **options)
    finally:
        if gpus:
            if saved is None:
                os.environ.pop("CUDA_VISIBLE_DEVICES", None)
            else:
                os.environ["CUDA_VISIBLE_DEVICES"] = saved
    return True


class WorkerPool:
    """The job's actors, one per device, each with its pipeline loaded (`ready` waits for all of them)."""

    def __init__(self, devices: tuple[str, ...], load: LoadOptions) -> None:
        ray = import_ray()
        self.devices, self.load = devices, load
        cpus = float(ray.cluster_resources().get("CPU", 1))
        per_worker = max(1, int(cpus // max(1, len(devices))))
        remote = ray.remote(SegmentWorker)
        env = worker_env()
        self.actors = []
        self.cpus, self.gpu = per_worker, any(d.startswith("cuda") for d in devices)
        for device in devices:
            gpu = device.startswith("cuda")
            options = {
                "num_cpus": per_worker,
                "num_gpus": 1 if gpu else 0,
                "max_restarts": MAX_RESTARTS,
                "max_task_retries": MAX_RESTARTS,
                "max_concurrency": 2,
                "runtime_env": {"env_vars": env},
            }
            # Inside the actor Ray shows it only its own GPU, as cuda:0.
            self.actors.append(remote.options(**options).remote(load, "cuda:0" if gpu else "cpu"))
        self.infos: list[dict[str, Any]] = []

    def ready(self, log: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
        """Wait until every worker has loaded its pipeline; a loading error is raised as itself. A cluster without
        the resources for all of them (busy, or still scaling up) is said once, then waited for."""
        ray = import_ray()
        refs = [actor.ready.remote() for actor in self.actors]
        waited = 0.0
        while True:
            done, pending = ray.wait(refs, num_returns=len(refs), timeout=READY_NOTICE_SECONDS)
            if not pending:
                break
            waited += READY_NOTICE_SECONDS
            if log is not None and waited == READY_NOTICE_SECONDS:
                log(
                    f"{len(done)} of {len(refs)} workers ready after {waited:.0f} s; waiting for the rest (each needs "
                    f"{self.cpus} CPU(s){' and a GPU' if self.gpu else ''}; the cluster has "
                    f"{ray.available_resources()} free)"
                )
        try:
            self.infos = ray.get(refs)
        except ray.exceptions.RayTaskError as e:
            raise unwrap(e) from e  # the chain keeps the remote traceback for --debug
        return self.infos

    def close(self) -> None:
        ray = import_ray()
        for actor in self.actors:
            with contextlib.suppress(Exception):
                ray.kill(actor)
        self.actors = []


def unwrap(error: BaseException) -> BaseException:
    """A worker's exception as itself (Ray wraps it with the remote traceback, which --debug shows)."""
    cause = getattr(error, "cause", None)
    return cause if isinstance(cause, BaseException) else error
