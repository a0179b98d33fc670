"""A film job from start to end: lock, first pass (or resume), segments on Ray workers, join.

The driver (this process) is the only one that writes the manifest and the output; workers only write their
segment files. Segments go out longest first (the classic longest-processing-time order: the job's tail is the
shortest segments), to whichever worker is free, through `ray.wait` on the running ones. A worker whose process
dies is restarted by Ray, which reruns its segment there; a segment whose worker is gone for good goes to another
worker. Ctrl-C (or any error) stops the workers at their next chunk: the finished segments stay recorded, and the
same command resumes from them.
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..errors import UsageError, VideoError
from .cuts import FilmScan, scan_film
from .manifest import SEGMENTS, JobLock, Manifest, differences, job_folder, remove_job_folder
from .segments import Segment, plan_segments
from .spec import JobSpec
from .workers import MAX_RESTARTS, SegmentResult, SegmentTask, WorkerPool, connect, import_ray, unwrap

POLL_SECONDS = 0.5
"""How often the driver looks at the workers while segments run (progress, and Ctrl-C between looks)."""
STOP_GRACE_SECONDS = 20.0
"""How long stopped workers get to leave their segment (at the end of a chunk) before they are left to Ray."""


@dataclass
class WorkerState:
    """One worker as the progress display shows it."""

    name: str
    device: str
    segment: int | None = None
    frames: int = 0
    total: int = 0


@dataclass
class JobProgress:
    """The whole job's progress: frames finished (whole segments plus the running ones' frames so far)."""

    stage: str
    """"scan" (first pass), "upscale", "join" or "done"."""
    frames_done: int
    frames_total: int
    segments_done: int
    segments_total: int
    seconds: float
    frames_this_run: int = 0
    """Frames upscaled by this run (not counting segments finished by an earlier one): what fps counts."""
    workers: list[WorkerState] = field(default_factory=list)

    @property
    def fps(self) -> float:
        return self.frames_this_run / self.seconds if self.seconds > 0 else 0.0

    @property
    def eta(self) -> float | None:
        if not self.fps or self.stage != "upscale":
            return None
        return max(0.0, (self.frames_total - self.frames_done) / self.fps)


@dataclass
class JobResult:
    """A finished job."""

    path: Path
    frames: int
    scenes: int
    segments: int
    computed: list[int]
    """Indices of the segments upscaled by this run (the others were finished by an earlier run)."""
    seconds: float
    damage: str | None = None
    workers: list[str] = field(default_factory=list)
    records: dict[int, dict[str, Any]] = field(default_factory=dict)
    """The manifest's record of every segment (file, frames, seconds, the worker that finished it)."""


def resolve_devices(spec: JobSpec) -> tuple[str, ...]:
    """The job's devices; on a cluster without --devices, one GPU worker per GPU the cluster has."""
    if spec.devices:
        return spec.devices
    ray = import_ray()
    gpus = int(ray.cluster_resources().get("GPU", 0))
    if gpus < 1:
        raise UsageError(f"the Ray cluster at {spec.ray_address} has no GPUs; pass --devices cpu,cpu,... to use CPUs")
    return tuple(f"cuda:{i}" for i in range(gpus))


def run_job(
    spec: JobSpec,
    *,
    on_progress: Callable[[JobProgress], None] | None = None,
    pool: WorkerPool | None = None,
    log: Callable[[str], None] | None = None,
) -> JobResult:
    """Upscale `spec.input` into `spec.output` on Ray workers (`pool`, else one actor per device of `spec.devices`,
    closed at the end), resuming from the job folder's manifest when it matches. `on_progress` may raise (e.g.
    KeyboardInterrupt) to stop the job; the finished segments stay for the next run."""
    say = log or (lambda line: None)
    started = time.perf_counter()
    folder = job_folder(spec.output)
    lock = JobLock(folder).acquire()
    started_ray = False
    owned_pool = pool is None
    try:
        identity = spec.identity()
        manifest = _manifest(spec, folder, identity, say, on_progress, started)
        (folder / SEGMENTS).mkdir(exist_ok=True)
        segments = manifest.segments
        todo = sorted((s for s in segments if not manifest.finished(s, folder)), key=lambda s: (-s.work, s.index))
        for index in [i for i in manifest.done if not manifest.finished(segments[i], folder)]:
            del manifest.done[index]  # recorded, but its file is gone or not whole: redone
        if len(todo) < len(segments):
            say(f"resuming {folder}: {len(segments) - len(todo)} of {len(segments)} segments already finished")
        workers: list[str] = []
        if todo:
            started_ray = connect(spec.ray_address, spec.devices)
            if pool is None:
                pool = WorkerPool(resolve_devices(spec), spec.load)
            elif pool.load.output_settings(spec.device_type) != spec.load.output_settings(spec.device_type):
                raise UsageError("the workers given to this job loaded other weights or settings than it asks for")
            infos = pool.ready(say)
            workers = [f"{i['name']} {i['device']}" for i in infos]
            _dispatch(spec, manifest, folder, todo, pool, on_progress, started)
        total = sum(s.frames for s in segments)
        _report(on_progress, "join", total, total, len(segments), len(segments), started)
        path = _join(spec, manifest, folder)
        computed = sorted(s.index for s in todo)
        scenes = len(manifest.scan["cuts"]) + 1
        result = JobResult(
            path,
            total,
            scenes,
            len(segments),
            computed,
            time.perf_counter() - started,
            manifest.scan["damage"],
            workers,
            dict(manifest.done),
        )
        lock.release()
        remove_job_folder(folder)  # the segments are in the output now
        return result
    finally:
        lock.release()
        if not Manifest.path_in(folder).exists():  # stopped before the first pass was recorded: nothing to keep
            remove_job_folder(folder)
        if owned_pool and pool is not None:
            pool.close()
        if started_ray:
            import_ray().shutdown()


def _manifest(
    spec: JobSpec,
    folder: Path,
    identity: dict[str, Any],
    say: Callable[[str], None],
    on_progress: Callable[[JobProgress], None] | None,
    started: float,
) -> Manifest:
    """The job's manifest: the folder's own when it is this job's, else a new one from a first pass."""
    manifest = Manifest.load(folder)
    if manifest is not None and manifest.identity != identity:
        changed = ", ".join(differences(manifest.identity, identity)) or "its format"
        if not spec.fresh:
            raise UsageError(
                f"{folder} holds the finished segments of a job with other settings (changed: {changed}); "
                "pass --fresh to discard them and start over, or delete that folder"
            )
        say(f"discarding the segments of an earlier job with other settings in {folder} (changed: {changed})")
        manifest = None
    elif manifest is not None and spec.fresh:
        manifest = None
    if manifest is not None:
        return manifest
    for stale in (folder / SEGMENTS).glob("*") if (folder / SEGMENTS).is_dir() else ():
        _remove(stale)

    def scanned(frames: int) -> None:
        _report(on_progress, "scan", frames, frames, 0, 0, started)

    scan = scan_film(
        spec.input,
        start=spec.start,
        max_frames=spec.frames,
        fps=spec.fps,
        detect_scenes=spec.detect_scenes,
        threshold=spec.scene_threshold,
        strict=spec.strict,
        on_frames=scanned,
    )
    segments = plan_segments(
        scan.start,
        scan.end,
        scan.cuts,
        scan.times,
        target=spec.segment_frames,
        split_long=spec.split_long_scenes,
        warmup=spec.warmup_frames,
    )
    segments = [replace(s, seek=scan.seek_before(s.read_from)) for s in segments]
    manifest = Manifest(identity, _scan_record(scan), segments)
    manifest.save(folder)
    say(f"{scan.frames} frames, {len(scan.cuts) + 1} scene(s), {len(segments)} segment(s); job state in {folder}")
    return manifest


def _scan_record(scan: FilmScan) -> dict[str, Any]:
    return {
        "start": scan.start,
        "frames": scan.frames,
        "cuts": scan.cuts,
        "first_time": scan.times[0],
        "duration": scan.duration,
        "fps": scan.fps,
        "has_audio": scan.has_audio,
        "damage": scan.damage,
        "origin_pts": scan.origin_pts,
    }


def segment_file(spec: JobSpec, segment: Segment) -> str:
    """A segment's file name in the job folder: the output's own container (or a PNG folder)."""
    suffix = "" if spec.encode.codec == "png" else spec.output.suffix
    return f"{SEGMENTS}/segment_{segment.index:05d}{suffix}"


def _dispatch(
    spec: JobSpec,
    manifest: Manifest,
    folder: Path,
    todo: list[Segment],
    pool: WorkerPool,
    on_progress: Callable[[JobProgress], None] | None,
    started: float,
) -> None:
    """Run `todo` (longest first) on the pool's workers until all are finished; each finished segment is recorded
    in the manifest at once."""
    ray = import_ray()
    queue = deque(todo)
    idle = list(pool.actors)
    infos = list(pool.infos)
    running: dict[Any, tuple[Any, Segment]] = {}
    attempts: dict[int, int] = {}
    total = sum(s.frames for s in manifest.segments)
    done_before = sum(s.frames for s in manifest.segments if s.index in manifest.done)
    run_started = time.perf_counter()
    states: dict[int, dict[str, Any] | None] = {}
    try:
        while queue or running:
            while queue and idle:
                actor, segment = idle.pop(0), queue.popleft()
                task = SegmentTask(
                    str(spec.input),
                    spec.fps,
                    spec.scale,
                    spec.detect_scenes,
                    spec.scene_threshold,
                    segment,
                    str(folder / segment_file(spec, segment)),
                    spec.encode,
                    manifest.scan.get("origin_pts"),
                )
                running[actor.run.remote(task)] = (actor, segment)
            ready, _ = ray.wait(list(running), num_returns=1, timeout=POLL_SECONDS)
            for ref in ready:
                actor, segment = running.pop(ref)
                try:
                    result: SegmentResult = ray.get(ref)
                except ray.exceptions.RayActorError:
                    # Dead for good (Ray's restarts used up): its segment goes to another worker.
                    attempts[segment.index] = attempts.get(segment.index, 0) + 1
                    if attempts[segment.index] > MAX_RESTARTS or not (idle or running):
                        raise VideoError(
                            f"segment {segment.index} (frames {segment.start}-{segment.end - 1}) lost its worker "
                            f"{attempts[segment.index]} time(s) and no worker is left to take it; see Ray's logs"
                        ) from None
                    queue.appendleft(segment)
                    continue
                except ray.exceptions.RayTaskError as e:
                    raise unwrap(e) from e
                idle.append(actor)
                _record(spec, manifest, folder, segment, result)
            states = _poll(ray, pool, states)
            if on_progress is not None:
                done = sum(s.frames for s in manifest.segments if s.index in manifest.done)
                workers = [
                    _worker_state(info, states.get(id(actor))) for actor, info in zip(pool.actors, infos, strict=True)
                ]
                running_frames = sum(w.frames for w in workers)
                on_progress(
                    JobProgress(
                        "upscale",
                        done + running_frames,
                        total,
                        len(manifest.done),
                        len(manifest.segments),
                        time.perf_counter() - run_started,
                        done - done_before + running_frames,
                        workers,
                    )
                )
    except BaseException:
        _stop(ray, pool, running)
        raise


def _worker_state(info: dict[str, Any], state: dict[str, Any] | None) -> WorkerState:
    worker = WorkerState(info["name"], info["device"])
    if state:
        worker.segment, worker.frames, worker.total = state["segment"], state["frames"], state["total"]
    return worker


def _report(
    on_progress: Callable[[JobProgress], None] | None,
    stage: str,
    done: int,
    total: int,
    segments_done: int,
    segments_total: int,
    started: float,
) -> None:
    if on_progress is not None:
        on_progress(JobProgress(stage, done, total, segments_done, segments_total, time.perf_counter() - started))


def _poll(ray: Any, pool: WorkerPool, previous: dict[int, Any]) -> dict[int, Any]:
    """Each worker's running segment and frames; a worker that does not answer at once keeps its last state."""
    refs = {actor.progress.remote(): id(actor) for actor in pool.actors}
    ready, _ = ray.wait(list(refs), num_returns=len(refs), timeout=POLL_SECONDS)
    states = dict(previous)
    for ref in ready:
        try:
            states[refs[ref]] = ray.get(ref)
        except ray.exceptions.RayError:
            states[refs[ref]] = None
    return states


def _stop(ray: Any, pool: WorkerPool, running: dict[Any, tuple[Any, Segment]]) -> None:
    """Ask the running workers to drop their segments, and give them a moment to do it (their files are never
    installed: a stopped segment leaves nothing under its name)."""
    for actor, _ in running.values():
        try:
            actor.stop.remote()
        except Exception:  # noqa: BLE001 - a dead worker has nothing to stop
            pass
    if running:
        ray.wait(list(running), num_returns=len(running), timeout=STOP_GRACE_SECONDS)


def _record(spec: JobSpec, manifest: Manifest, folder: Path, segment: Segment, result: SegmentResult) -> None:
    """A finished segment: checked against the first pass, then recorded (the manifest rewritten whole)."""
    if result.frames != segment.frames or abs(result.first_time - segment.first_time) > 1e-6:
        raise VideoError(
            f"segment {segment.index} of {spec.input} gave {result.frames} frames from {result.first_time:.6f} s, the "
            f"first pass saw {segment.frames} from {segment.first_time:.6f} s: the input changed? pass --fresh"
        )
    name = segment_file(spec, segment)
    manifest.done[segment.index] = {
        "file": name,
        "bytes": (folder / name).stat().st_size,
        "frames": result.frames,
        "scenes": result.scenes,
        "seconds": round(result.seconds, 3),
        "worker": result.worker,
    }
    manifest.save(folder)


def _join(spec: JobSpec, manifest: Manifest, folder: Path) -> Path:
    """The output from the finished segments, with the source's audio over the film's span."""
    scan = manifest.scan
    first = scan["first_time"]
    segments = manifest.segments
    audio = spec.audio and scan["has_audio"] and spec.encode.codec != "png"
    from .join import join_segments

    return join_segments(
        [folder / manifest.done[s.index]["file"] for s in segments],
        spec.output,
        starts=[s.first_time - first for s in segments],
        frames=sum(s.frames for s in segments),
        audio_from=spec.input if audio else None,
        audio_start=first,
        duration=scan["duration"],
        overwrite=spec.overwrite,
    )


def _remove(path: Path) -> None:
    import shutil

    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            os.unlink(path)
        except OSError:
            pass
