"""Film jobs (infvsr_core/jobs) on a local Ray cluster of 2 CPU workers, on the real clip with cuts (downscaled).

The reference is one single-process `upscale` run: a job's joined output must hold exactly its frames (FFV1,
lossless: decoded frames compared bit for bit), at its timestamps, with its audio packets; also after a worker
is killed mid-segment, and after an interrupted job is resumed.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import ray
import torch

from infvsr_core import cli
from infvsr_core.errors import UsageError
from infvsr_core.io.formats import FORMATS
from infvsr_core.io.reader import SeekError, VideoReader
from infvsr_core.io.writer import VideoWriter
from infvsr_core.jobs import EncodeOptions, JobSpec, LoadOptions, run_job
from infvsr_core.jobs.cuts import scan_film
from infvsr_core.jobs.join import join_segments
from infvsr_core.jobs.manifest import JobLock, Manifest, job_folder
from infvsr_core.jobs.segments import plan_segments, warmup_length
from infvsr_core.jobs.workers import CRASH_HOOK, WorkerPool
from infvsr_core.weight_files import WEIGHT_FILES, find_weight_file
from tests.conftest import make_clip
from tests.io_media import BIKES

FIRST, COUNT = 10, 82
"""Clip frames 10-91 of the bikes clip: its hard cuts (clip frames 27 and 77, MANIFEST.md) at 17 and 67."""
CUTS = [17, 67]
SCALE = 2


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """One local Ray cluster for the module (starting one takes seconds): 2 CPUs, as CI has."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    """The cut clip at 64x28 (h264, a keyframe every 12 frames at most, B-frames), 25 fps, with a 440 Hz AAC track
    longer than the video."""
    path = tmp_path_factory.mktemp("jobclip") / "bikes_cuts.mp4"
    with av.open(str(BIKES)) as src, av.open(str(path), "w") as out:
        video = out.add_stream("libx264", rate=25, options={"crf": "8", "g": "12"})
        video.width, video.height, video.pix_fmt = 64, 28, "yuv420p"
        audio = out.add_stream("aac", rate=48000)
        audio.layout = "mono"
        for index, frame in enumerate(src.decode(video=0)):
            if FIRST <= index < FIRST + COUNT:
                small = frame.reformat(width=64, height=28, format="yuv420p")
                small.pts, small.time_base = index - FIRST, Fraction(1, 25)
                out.mux(video.encode(small))
        out.mux(video.encode())
        t = np.arange(48000 * 4) / 48000
        samples = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)[None]
        for k in range(0, samples.shape[1], 1024):
            block = av.AudioFrame.from_ndarray(samples[:, k : k + 1024], format="flt", layout="mono")
            block.sample_rate, block.pts = 48000, k
            out.mux(audio.encode(block))
        out.mux(audio.encode())
    return path


def decode(path: Path) -> tuple[list[np.ndarray], list[float], list[bytes]]:
    """Decoded frames (RGB), their times in seconds, and the audio packets' bytes."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames, times = [], []
        for frame in container.decode(video=0):
            frames.append(frame.to_ndarray(format="rgb24"))
            times.append(float(frame.pts * stream.time_base))
    audio: list[bytes] = []
    with av.open(str(path)) as container:
        if container.streams.audio:
            audio = [bytes(p) for p in container.demux(container.streams.audio[0]) if p.size]
    return frames, times, audio


@pytest.fixture(scope="module")
def single_run(clip, tiny_models, tmp_path_factory):
    """The reference: one `upscale` run (FFV1), and the cuts its scene stream found."""
    from infvsr_core import film

    seen: list[list[int]] = []

    class Recording(film.SceneStream):
        def close(self):
            seen.append(list(self.cuts_seen))
            return super().close()

    out = tmp_path_factory.mktemp("single") / "single.mkv"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(film, "SceneStream", Recording)
        args = ["upscale", str(clip), "-o", str(out), "--models", str(tiny_models), "--scale", str(SCALE)]
        assert cli.main([*args, "--codec", "ffv1", "--quiet"]) == 0
    return decode(out), seen[0]


@pytest.fixture(scope="module")
def pool(cluster, tiny_models, tmp_path_factory):
    """Two CPU workers with the tiny pipeline, shared by the module's jobs (each would otherwise load its own).
    The crash hook points at a file that only the killed-worker test creates."""
    os.environ[CRASH_HOOK] = str(tmp_path_factory.mktemp("hook") / "crash")
    workers = WorkerPool(("cpu", "cpu"), load_options(tiny_models))
    workers.ready()
    yield workers
    workers.close()
    os.environ.pop(CRASH_HOOK, None)


def load_options(models: Path) -> LoadOptions:
    return LoadOptions(files=tuple((r, str(find_weight_file(r, [models]).resolve())) for r in WEIGHT_FILES))


def job(clip: Path, output: Path, models: Path, **options) -> JobSpec:
    return JobSpec(clip, output, ("cpu", "cpu"), load_options(models), EncodeOptions("ffv1"), scale=SCALE, **options)


def assert_same_as_single(output: Path, single_run) -> None:
    (frames, times, audio), _ = single_run
    got_frames, got_times, got_audio = decode(output)
    assert len(got_frames) == len(frames) == COUNT
    assert all((a == b).all() for a, b in zip(got_frames, frames, strict=True))
    assert got_times == times
    assert got_audio == audio and audio


def test_first_pass_finds_the_single_runs_cuts(clip, single_run):
    scan = scan_film(clip)
    assert scan.cuts == single_run[1] == CUTS
    assert (scan.frames, scan.duration) == (COUNT, pytest.approx(COUNT / 25))


@pytest.mark.parametrize("name", list(FORMATS))
def test_join_by_stream_copy_for_every_format(name, tmp_path):
    """Segments written by the writer, joined: the frame count and timestamps of one writer over all the frames
    (at 24000/1001 fps, whose frame times fall between ticks of the clock), each segment's frames as it decodes
    alone (every one starts with a keyframe), and for a lossless codec the frames of the single file."""
    fmt = FORMATS[name]
    frames = (make_clip(30, 16, 24, seed=2) * 255).round() / 255
    times = [i * 1001 / 24000 for i in range(30)]
    suffix = f".{fmt.extension}" if fmt.extension else ""

    def write(path: Path, first: int, end: int) -> Path:
        with VideoWriter(path, Fraction(24000, 1001), codec=fmt.codec, prores_profile=fmt.prores_profile) as w:
            w.write(frames[first:end], timestamps=times[first:end])
        return path

    whole = write(tmp_path / f"whole{suffix}", 0, 30)
    bounds = [(0, 7), (7, 19), (19, 30)]
    parts = [write(tmp_path / f"part{i}{suffix}", a, b) for i, (a, b) in enumerate(bounds)]
    joined = join_segments(parts, tmp_path / f"joined{suffix}", starts=[times[a] for a, _ in bounds], frames=30)
    if fmt.codec == "png":
        names = sorted(p.name for p in joined.iterdir())
        assert names == sorted(p.name for p in whole.iterdir()) and len(names) == 30
        assert all((joined / n).read_bytes() == (whole / n).read_bytes() for n in names)
        return
    got, expected = decode(joined), decode(whole)
    assert len(got[0]) == len(expected[0]) == 30
    assert got[1] == pytest.approx(expected[1], abs=1.5e-3)  # within a tick of the container's clock
    alone = [frame for part in parts for frame in decode(part)[0]]
    assert all((a == b).all() for a, b in zip(got[0], alone, strict=True))
    if fmt.codec == "ffv1":
        assert all((a == b).all() for a, b in zip(got[0], expected[0], strict=True))


def test_reader_starts_at_the_keyframe_before_a_segment(clip):
    """A worker decodes from the keyframe the first pass found before its segment: the same frames and
    timestamps as a read from the first frame; a position that is no keyframe is refused, not misread."""
    scan = scan_film(clip)
    index, pts = scan.seek_before(40)
    assert 0 < index <= 40 and len(scan.keyframes) >= COUNT // 12
    with VideoReader(clip, start=40, max_frames=20) as whole:
        expected = whole.read_all()
    with VideoReader(clip, start=40, max_frames=20, seek=(index, pts, scan.origin_pts)) as seeking:
        got = seeking.read_all()
    assert torch.equal(got.frames, expected.frames) and got.pts_seconds == expected.pts_seconds
    with pytest.raises(SeekError), VideoReader(clip, start=40, seek=(index + 1, pts + 1, scan.origin_pts)) as wrong:
        wrong.read_all()


def test_segments_group_short_scenes_and_split_long_ones_on_chunk_boundaries():
    times = [i / 25 for i in range(100)]
    grouped = plan_segments(0, 100, [10, 30, 45, 90], times, target=20)
    assert [(s.start, s.end, s.cuts) for s in grouped] == [(0, 30, (10,)), (30, 90, (45,)), (90, 100, ())]
    assert all(s.read_from == s.start and s.first_time == s.start / 25 for s in grouped)
    split = plan_segments(0, 100, [10], times, target=30, split_long=True, warmup=20)
    assert [(s.read_from, s.start, s.end) for s in split] == [(0, 0, 10), (10, 10, 43), (22, 43, 67), (46, 67, 100)]
    for piece in split[2:]:  # starts on the single run's chunk boundaries (10 + 9 + 12 j), warm-up 9 + 12 k
        assert (piece.start - 10 - 9) % 12 == 0 and piece.warmup == warmup_length(20) == 21


def test_command_line_job_default_codec(clip, tiny_models, single_run, cluster, tmp_path, capsys):
    """`--devices cpu,cpu` on the command line (its own workers): h264, every frame at the single run's time,
    the same audio packets. First of the module's jobs: its workers need the cluster's CPUs, which the shared pool
    holds from the next test on."""
    out = tmp_path / "job.mp4"
    args = ["upscale", str(clip), "-o", str(out), "--models", str(tiny_models), "--scale", str(SCALE)]
    assert cli.main([*args, "--devices", "cpu,cpu", "--segment-frames", "1"]) == 0, capsys.readouterr().err
    assert "3 segment(s)" in capsys.readouterr().err
    (frames, times, audio), _ = single_run
    got_frames, got_times, got_audio = decode(out)
    assert len(got_frames) == COUNT and got_frames[0].shape == frames[0].shape
    assert got_times == pytest.approx(times, abs=1e-9) and got_audio == audio
    with av.open(str(out)) as container:
        assert Fraction(container.streams.video[0].average_rate) == 25


def test_job_gives_the_single_runs_file(clip, tiny_models, single_run, pool, tmp_path):
    """Two segments (the first holding two scenes, cut where the single run cuts), on two workers, joined."""
    out = tmp_path / "job.mkv"
    result = run_job(job(clip, out, tiny_models, segment_frames=20), pool=pool)
    assert (result.segments, result.computed, result.scenes) == (2, [0, 1], 3)
    assert_same_as_single(out, single_run)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["job.mkv"]  # job folder and temporaries gone


def test_file_node_with_devices(clip, tiny_models, single_run, pool, tmp_path, monkeypatch):
    """The file node's `devices`: the model's files and settings go to the workers (here the module's pool, which
    loaded the same), the output lands in ComfyUI's output folder."""
    import nodes
    from infvsr_core.jobs import job as job_module
    from nodes import comfy

    for name in ("output", "input", "temp"):
        (tmp_path / name).mkdir()
    (tmp_path / "input" / "bikes.mp4").write_bytes(clip.read_bytes())
    monkeypatch.setattr(comfy, "_overrides", dict(comfy._overrides))
    comfy.set_directories(models=tiny_models, **{n: tmp_path / n for n in ("output", "input", "temp")})
    run = job_module.run_job
    monkeypatch.setattr(job_module, "run_job", lambda spec, **kw: run(spec, pool=pool, **kw))
    (model,) = nodes.LoadInfVSRModel().load(*(Path(f).name for _, f in load_options(tiny_models).files), dtype="fp32")
    node = nodes.InfVSRUpscaleVideoFile()
    out = node.upscale_file(
        model, "bikes.mp4", SCALE, "ffv1-mkv", 18, "jobs/film", detect_scenes=True, devices="cpu,cpu"
    )
    path = Path(out["result"][0])
    assert path.parent == tmp_path / "output" / "jobs" and out["ui"]["infvsr_video"][0]["frames"] == COUNT
    assert_same_as_single(path, single_run)


def test_killed_worker_segment_is_redone(clip, tiny_models, single_run, pool, tmp_path):
    """The worker running the longest segment (the 50-frame scene) kills its own process mid-segment: Ray restarts
    it and runs the segment again in the new process; the output is still the single run's."""
    hook = Path(os.environ[CRASH_HOOK])
    hook.write_text("1 12")
    out = tmp_path / "job.mkv"
    result = run_job(job(clip, out, tiny_models, segment_frames=1), pool=pool)
    killed = [p for p in hook.parent.iterdir() if p.name.startswith("crash.")]
    assert len(killed) == 1 and not hook.exists()
    dead_pid = killed[0].name.split(".")[-1]
    assert f":{dead_pid} " not in result.records[1]["worker"]
    assert_same_as_single(out, single_run)


def test_interrupted_job_resumes_without_redoing_finished_segments(clip, tiny_models, single_run, pool, tmp_path):
    out = tmp_path / "job.mkv"
    spec = job(clip, out, tiny_models, segment_frames=1)

    def interrupt(progress):
        if progress.segments_done >= 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_job(spec, on_progress=interrupt, pool=pool)
    folder = job_folder(out)
    manifest = Manifest.load(folder)
    assert manifest is not None and list(manifest.done) == [0]  # the 17-frame scene finished first
    assert [p.name for p in (folder / "segments").iterdir()] == ["segment_00000.mkv"]  # the stopped one left nothing
    assert not (folder / "lock").exists() and not out.exists()
    with pytest.raises(UsageError, match=r"other settings \(changed: options.segment_frames\).*--fresh"):
        run_job(job(clip, out, tiny_models, segment_frames=2), pool=pool)  # refused: the segments stay
    result = run_job(spec, pool=pool)
    assert result.computed == [1, 2]
    assert_same_as_single(out, single_run)


def test_split_long_scenes_measured(clip, tiny_models, single_run, pool, tmp_path):
    """Opt-in: the 50-frame scene split in three pieces at chunk boundaries. The first piece is the single run's
    frames exactly; a piece whose warm-up reaches back to the scene's start is too; the pieces whose state is
    rebuilt from 9 frames differ, by what this test prints (random tiny weights: a bound, not a quality figure)."""
    out = tmp_path / "split.mkv"
    spec = job(clip, out, tiny_models, segment_frames=24, split_long_scenes=True, warmup_frames=9)
    run_job(spec, pool=pool)
    (frames, _, _), _ = single_run
    got, _, _ = decode(out)
    pieces = plan_segments(0, COUNT, CUTS, [i / 25 for i in range(COUNT)], target=24, split_long=True, warmup=9)
    rebuilt = [s for s in pieces if s.read_from > CUTS[0] and s.warmup]
    assert [(s.start, s.end) for s in rebuilt] == [(38, 50), (50, 67)]
    exact = [i for i in range(COUNT) if not any(s.start <= i < s.end for s in rebuilt)]
    assert all((got[i] == frames[i]).all() for i in exact)
    diff = np.stack([got[i] for i in range(38, 67)]).astype(float) - np.stack(frames[38:67]).astype(float)
    psnr = 10 * np.log10(255**2 / max(np.mean(diff**2), 1e-12))
    print(f"split pieces vs single run: PSNR {psnr:.1f} dB, largest difference {np.abs(diff).max():.0f} levels")
    assert np.abs(diff).max() > 0 and psnr > 15


HOLD_LOCK = """
import sys, time
from pathlib import Path
from infvsr_core.jobs.manifest import JobLock
JobLock(Path(sys.argv[1])).acquire()
print("locked", flush=True)
time.sleep(60)
"""


def test_a_second_job_on_the_same_output_is_refused(clip, tiny_models, tmp_path, capsys):
    """A live job's lock refuses another (nothing touched); once its process has ended, the lock is taken over."""
    out = tmp_path / "film.mkv"
    folder = job_folder(out)
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(folder)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        args = ["upscale", str(clip), "-o", str(out), "--models", str(tiny_models), "--devices", "cpu,cpu"]
        assert cli.main(args) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "another job is writing" in err[0] and f"process {holder.pid}" in err[0]
        assert json.loads((folder / "lock").read_text())["pid"] == holder.pid and not out.exists()
    finally:
        holder.kill()
        holder.wait()
    with JobLock(folder) as lock:  # the holder was killed: its lock is stale
        assert json.loads(lock.path.read_text())["pid"] == os.getpid()
    (folder / "lock").write_text(json.dumps({"pid": 1, "host": "render-07", "host_tag": "ffffff"}))
    assert cli.main(args) == 1
    assert "render-07" in capsys.readouterr().err and (folder / "lock").exists()  # another host's: never taken


def test_help_imports_neither_ray_nor_torch():
    code = "import sys; from infvsr_core import cli; cli.build_parser(); print({'ray', 'torch'} & set(sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert out.stdout.strip() == "set()", out.stderr
