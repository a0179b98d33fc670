"""The command line's film job: `python -m infvsr_core upscale ... --devices cuda:0,cuda:1` (or `--ray-address`).

`add_job_arguments` puts the job's options on the `upscale` parser (no torch, no Ray: `--help` stays instant);
`wants_job` says when the command runs as a job; `job_command` builds the JobSpec, shows the whole job's
progress and says what was written, with the command line's exit codes.
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

from ..errors import UsageError
from ..exits import report_damage, stop_word
from .spec import DEFAULT_SEGMENT_FRAMES, DEFAULT_WARMUP_FRAMES, EncodeOptions, JobSpec, LoadOptions, parse_devices


def add_job_arguments(up: argparse.ArgumentParser) -> None:
    """The options of a film job on several devices or machines (README: "Many GPUs and machines")."""
    jobs = up.add_argument_group(
        "many GPUs and machines",
        "With --devices naming several devices, or --ray-address, the film is cut at its scene cuts and the scenes "
        "are upscaled in parallel on Ray workers (pip install ray), each segment into a file of the job folder "
        "OUTPUT.infvsr-job/, then joined by stream copy: exactly the frames of one run. Running the same command "
        "again resumes an interrupted job without redoing its finished segments.",
    )
    jobs.add_argument(
        "--devices",
        metavar="LIST",
        help="one worker per device, comma-separated: cuda:0,cuda:1,... or cpu,cpu (with --ray-address: GPUs "
        "anywhere in the cluster; default there: all of them)",
    )
    jobs.add_argument(
        "--ray-address",
        metavar="ADDR",
        help="join this Ray cluster (e.g. ray://head:10001, or auto) instead of "
        "starting one on this machine; the input, the output's folder and the weights must be on storage every "
        "machine mounts at the same path",
    )
    jobs.add_argument(
        "--segment-frames",
        type=int,
        default=DEFAULT_SEGMENT_FRAMES,
        metavar="N",
        help=f"group neighbouring scenes into segments of at least N frames (default {DEFAULT_SEGMENT_FRAMES}); "
        "a longer scene stays whole",
    )
    jobs.add_argument(
        "--split-long-scenes",
        action="store_true",
        help="also split scenes longer than --segment-frames, each piece after the first rebuilding its state "
        "from --warmup-frames frames before it: faster on many GPUs, no longer exactly one run's frames",
    )
    jobs.add_argument(
        "--warmup-frames",
        type=int,
        default=DEFAULT_WARMUP_FRAMES,
        metavar="N",
        help=f"with --split-long-scenes: frames upscaled and dropped before each split (default "
        f"{DEFAULT_WARMUP_FRAMES}, rounded up to 9 + 12 k)",
    )
    jobs.add_argument(
        "--fresh",
        action="store_true",
        help="discard the finished segments of an earlier run of this job (default: resume from them when the "
        "input, options and weights are the same; refuse when they differ)",
    )


def wants_job(args: argparse.Namespace) -> bool:
    """A job when --devices names several devices or --ray-address is given; one device is the plain run on it."""
    if getattr(args, "ray_address", None):
        return True
    devices = getattr(args, "devices", None)
    if not devices:
        return False
    names = parse_devices(devices)
    if len(names) > 1:
        return True
    if args.device is not None and args.device != names[0]:
        raise UsageError(f"--device {args.device} and --devices {devices} disagree; give one of them")
    args.device = names[0]
    return False


def output_codec(args: argparse.Namespace) -> str:
    """--codec "auto" as the command line resolves it: png for a folder output, else h264."""
    if args.codec != "auto":
        return args.codec
    return "png" if args.output.suffix == "" or args.output.is_dir() else "h264"


def spec_from_args(args: argparse.Namespace) -> JobSpec:
    """The JobSpec of an `upscale` command line; the weight files are resolved here, once, for every worker."""
    from ..weight_files import WEIGHT_FILES, default_models_dir, find_weight_file

    folders = [args.models] if args.models is not None else [default_models_dir()]
    files = []
    for role in WEIGHT_FILES:
        chosen = getattr(args, role, None) if role == "dit" else None
        files.append((role, str(Path(chosen or find_weight_file(role, folders)).resolve())))
    if getattr(args, "lora", None) is not None:
        files.append(("lora", str(Path(args.lora).resolve())))
    load = LoadOptions(
        files=tuple(files),
        dtype=args.dtype,
        attention=args.attention,
        offload=args.offload,
        seams=args.seams,
        spill_dir=str(args.spill_dir) if args.spill_dir is not None else None,
        host_memory_gib=args.host_memory,
        gpu_memory_gib=getattr(args, "gpu_memory", None),
    )
    encode = EncodeOptions(output_codec(args), args.crf, args.pix_fmt, args.prores_profile)
    return JobSpec(
        input=args.input,
        output=args.output,
        devices=parse_devices(args.devices) if args.devices else (),
        load=load,
        encode=encode,
        scale=args.scale,
        detect_scenes=not args.no_scene_detect,
        scene_threshold=args.scene_threshold,
        start=args.start,
        frames=args.frames,
        fps=args.fps,
        audio=not args.no_audio,
        overwrite=args.overwrite,
        strict=args.strict,
        ray_address=args.ray_address,
        segment_frames=args.segment_frames,
        split_long_scenes=args.split_long_scenes,
        warmup_frames=args.warmup_frames,
        fresh=args.fresh,
    )


def job_command(args: argparse.Namespace) -> int:
    """Run the job with a progress bar over the whole film (frames, fps, ETA, what each worker does)."""
    from tqdm import tqdm

    from .job import JobProgress, run_job
    from .manifest import job_folder

    spec = spec_from_args(args)
    bar: tqdm | None = None

    def say(line: str) -> None:
        if not args.quiet:
            (bar.write if bar is not None else print)(line, file=sys.stderr)

    def show(progress: JobProgress) -> None:
        nonlocal bar
        if args.quiet or progress.stage != "upscale":
            return
        if bar is None:
            bar = tqdm(total=progress.frames_total, unit="frame", dynamic_ncols=True, desc="upscaling")
        bar.update(progress.frames_done - bar.n)
        busy = [f"#{i} seg {w.segment} {w.frames}/{w.total}" for i, w in enumerate(progress.workers) if w.total]
        bar.set_postfix_str(f"{progress.segments_done}/{progress.segments_total} segments; " + "; ".join(busy))

    try:
        try:
            result = run_job(spec, on_progress=show, log=say)
        finally:
            if bar is not None:
                bar.close()
    except KeyboardInterrupt as stop:
        folder = job_folder(spec.output)
        kept = "the finished segments are kept in " + str(folder) if folder.exists() else "nothing was kept"
        print(f"{stop_word(stop)}: {kept}; run the same command again to resume", file=sys.stderr)
        return 128 + getattr(stop, "signum", signal.SIGINT)
    if result.damage is not None:
        return report_damage(result)
    if not args.quiet:
        redone = f", {len(result.computed)} upscaled now" if len(result.computed) < result.segments else ""
        print(
            f"wrote {result.path}: {result.frames} frames, {result.scenes} scene(s), {result.segments} segment(s)"
            f"{redone}, {result.seconds:.1f} s on {len(result.workers)} worker(s)",
            file=sys.stderr,
        )
    return 0
