"""Command line: upscale a whole film, streaming, in constant memory.

    python -m infvsr_core upscale INPUT -o OUTPUT [options]
    python -m infvsr_core download [--models DIR] [--only dit,vae,ram,dape]
    python -m infvsr_core evaluate OUTPUT --reference HR   (and --make-lr, --suite: infvsr_core/evaluate/)

Frames are decoded, upscaled and encoded chunk by chunk; the output appears
under its final name only when complete. Ctrl-C and SIGTERM (kill, docker stop,
systemd, Slurm) keep a valid file of what was finished. Any error ends with one
line on stderr that names the file and what to do, and a non-zero exit code;
`--debug` adds the traceback. Building the parser imports nothing heavy, so
`--help` is instant.
"""

from __future__ import annotations

import argparse
import errno
import os
import signal
import sys
import tempfile
from pathlib import Path

from .exits import EXIT_DAMAGED_INPUT, EXIT_ERROR, report_damage, stop_word
from .io.formats import CODECS as WRITER_CODECS
from .io.formats import PRORES_PROFILES

READ_CHUNK = 12
CODECS = ("auto", *WRITER_CODECS)
"""--codec: "auto" (png for a folder output, else h264) or one of the writer's codecs (the format table's)."""
ATTENTION_CHOICES = ("auto", "flash3", "math", "sdpa")
"""Known backend names: the parser offers them without importing torch; `main` then refuses those this machine lacks."""
OFFLOAD_MODES = ("none", "histories", "state", "all")
"""`memory.OFFLOAD_MODES`, named here without importing torch (`OffloadPolicy` says what each keeps)."""
OFFLOAD_CHOICES = ("auto", *OFFLOAD_MODES)
"""--offload: `memory.OFFLOAD_CHOICES` ("auto" picks the fastest mode that fits the GPU, `memory.plan`)."""
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name))


class Stopped(KeyboardInterrupt):
    """A stop signal (SIGTERM, SIGHUP) raised where Ctrl-C would be, so every Ctrl-C path keeps what is done."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_stopped(signum: int, _frame: object) -> None:
    raise Stopped(signum)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m infvsr_core", description="InfVSR streaming video super-resolution."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    up = commands.add_parser(
        "upscale",
        help="upscale a video file or a folder of frames",
        description="Upscale INPUT (a video file, or a folder of numbered PNG/JPEG frames) into OUTPUT "
        "(a video file, or a folder that receives frame_000001.png, ...). Audio is copied when the input has any.",
    )
    up.add_argument("input", type=Path, help="video file (mp4, mkv, mov, webm, avi, mpeg, ...) or frame folder")
    up.add_argument("-o", "--output", type=Path, required=True, help="output video file, or folder for --codec png")
    up.add_argument(
        "--models",
        type=Path,
        default=None,
        help="folder with InfVSR.ckpt, Wan2.1_VAE.pth, ram_swin_large_14m.pth, DAPE.pth "
        "(default: $INFVSR_MODELS, else models/infvsr of the ComfyUI tree this is installed in, "
        "else ./models/infvsr, else ~/.cache/infvsr)",
    )
    up.add_argument(
        "--dit",
        type=Path,
        metavar="FILE",
        help="the DiT file to use instead of the models folder's InfVSR.ckpt (e.g. an fp8 copy from `quantize`)",
    )
    up.add_argument("--scale", type=int, default=4, help="upscaling factor (default 4, as trained)")
    up.add_argument(
        "--lora", type=Path, metavar="FILE", help="a DiT LoRA from `finetune` (.safetensors), merged in at load"
    )
    up.add_argument(
        "--dtype",
        choices=("bf16", "fp16", "fp32", "fp8"),
        help="default: bf16 on cuda, fp32 on cpu. fp8: the DiT's linear layers in float8 (half their memory, faster "
        "on GPUs with fp8 tensor cores) and, on Hopper GPUs, the VAE's convolutions too, and the DiT's attention where "
        "FlashAttention-3 is installed; the rest as the default; close to bf16, not identical",
    )
    up.add_argument("--device", help="cuda, cuda:1, cpu (default: cuda when available)")
    up.add_argument(
        "--gpu-memory",
        type=float,
        metavar="GIB",
        help="use at most this much GPU memory (a GPU shared with other programs); --offload auto plans for it",
    )
    up.add_argument(
        "--attention",
        choices=ATTENTION_CHOICES,
        default="auto",
        help="the DiT's attention kernel: auto = FlashAttention-3 where installed (Hopper, bf16), else PyTorch's "
        "SDPA; flash3 = FlashAttention-3 always (where installed); math = plain float32 (slow, a reference)",
    )
    up.add_argument(
        "--offload",
        choices=OFFLOAD_CHOICES,
        default="auto",
        help="auto (default): the fastest mode that fits the GPU's free memory, chosen at the first chunk and "
        "stepped down (the chunk redone) if the GPU runs out of memory anyway; or keep stream state in host memory "
        "between uses: same output, less GPU memory, somewhat slower; each "
        "mode keeps more there than the one before (all = low VRAM). What each keeps: OffloadPolicy in "
        "infvsr_core/memory/policy.py; each mode's memory and speed: README.md's speed table. "
        "The command line runs with PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True unless that variable is set",
    )
    up.add_argument(
        "--spill-dir",
        type=Path,
        help="folder for offloaded VAE histories that host memory cannot hold (default: the system's temporary "
        "folder, $TMPDIR). They go there past a share of the available memory, or past --host-memory: same "
        "output, slower by the disk's time (4K tiles' histories outgrow most hosts' memory)",
    )
    up.add_argument(
        "--host-memory",
        type=float,
        metavar="GIB",
        help="host memory for offloaded VAE histories, the rest to --spill-dir (default: chosen from the "
        "available memory)",
    )
    up.add_argument(
        "--seams",
        choices=("release", "smooth"),
        default="release",
        help="how tiled frames (taller than 1024) are blended: release = the authors' tiling (default); smooth = "
        "wider overlaps, no visible seams, more VAE time and memory",
    )
    up.add_argument("--codec", choices=CODECS, default="auto", help="default: png for a folder output, else h264")
    up.add_argument("--crf", type=int, help="quality for h264/h265 (lower is better; default 18 / 20)")
    up.add_argument("--pix-fmt", help="override the pixel format (e.g. yuv444p for h264)")
    up.add_argument(
        "--prores-profile", choices=PRORES_PROFILES, default=PRORES_PROFILES[0], help="ProRes 422 HQ or 4444"
    )
    up.add_argument("--no-scene-detect", action="store_true", help="one scene: never reset caches or the reference")
    up.add_argument("--scene-threshold", type=float, default=27.0, help="content detector threshold (default 27)")
    up.add_argument("--start", type=int, default=0, help="first input frame to upscale (default 0)")
    up.add_argument("--frames", type=int, help="upscale at most this many frames")
    up.add_argument("--fps", type=float, help="frame rate of a frame-folder input (default 24)")
    up.add_argument("--no-audio", action="store_true", help="do not copy the input's audio")
    up.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")
    up.add_argument(
        "--strict",
        action="store_true",
        help="on a truncated or corrupt input keep nothing (default: keep the frames upscaled before the damage, "
        f"exit code {EXIT_DAMAGED_INPUT})",
    )
    up.add_argument("--quiet", action="store_true", help="no progress bar")
    up.add_argument("--debug", action="store_true", help="print the full traceback of an error")
    from .jobs.command import add_job_arguments  # torch-free, like the rest of the parser

    add_job_arguments(up)
    _add_download_parser(commands)
    from .evaluate.command import add_parser as add_evaluate_parser

    add_evaluate_parser(commands)
    from .finetune.command import add_parser as add_finetune_parser

    add_finetune_parser(commands)
    return parser


def _add_download_parser(commands: argparse._SubParsersAction) -> None:
    """The `download` command's options (the table of files is data in weight_files, which needs no torch)."""
    from .weight_files import WEIGHT_FILES

    table = "; ".join(f"{role}: {spec.hub_files[0].label}" for role, spec in WEIGHT_FILES.items())
    down = commands.add_parser(
        "download",
        help="fetch the missing weight files from Hugging Face into the models folder",
        description="Put the four weight files into the models folder: files already there are skipped; files in "
        "the local Hugging Face cache are hard-linked (else copied) with no network; the rest are downloaded with "
        f"huggingface_hub (an interrupted download resumes). Sources: {table}. INFVSR_HF_REPO and "
        "INFVSR_DAPE_HF_REPO replace the InfVSR and DAPE repositories; HF_HOME / HF_HUB_CACHE / HF_HUB_OFFLINE "
        "and HF_TOKEN are huggingface_hub's.",
    )
    down.add_argument(
        "--models",
        type=Path,
        default=None,
        metavar="DIR",
        help="folder to put the files in (default: $INFVSR_MODELS, else models/infvsr of the ComfyUI tree this is "
        "installed in, else ./models/infvsr, else ~/.cache/infvsr)",
    )
    down.add_argument(
        "--only",
        type=_roles,
        default=None,
        metavar="ROLES",
        help=f"comma-separated subset of {','.join(WEIGHT_FILES)} (default: all four)",
    )
    down.add_argument("--debug", action="store_true", help="print the full traceback of an error")

    quant = commands.add_parser(
        "quantize",
        help="write an fp8 copy of the DiT (half the size on disk and in GPU memory)",
        description="Write the DiT's linear layers in float8 with per-channel scales (the rest unchanged) as a "
        "safetensors file, which `upscale --dit FILE` and the loader node use in fp8 (the same model as "
        "--dtype fp8 makes at each load, without the full-precision file).",
    )
    quant.add_argument("dit", type=Path, help="the DiT file (InfVSR.ckpt or a safetensors copy)")
    quant.add_argument("-o", "--output", type=Path, required=True, help="the fp8 copy (.safetensors)")
    quant.add_argument("--debug", action="store_true", help="print the full traceback of an error")


def _roles(text: str) -> list[str]:
    """`--only`: known roles, comma-separated, each once."""
    from .weight_files import WEIGHT_FILES

    roles = [r.strip().lower() for r in text.split(",") if r.strip()]
    unknown = [r for r in roles if r not in WEIGHT_FILES]
    if unknown or not roles:
        raise argparse.ArgumentTypeError(
            f"{', '.join(unknown) or 'nothing'}: choose from {', '.join(WEIGHT_FILES)}, comma-separated"
        )
    return list(dict.fromkeys(roles))


def main(argv: list[str] | None = None) -> int:
    """Run the command; returns the exit code (0, 1 on error, 3 on a damaged input, 128 + signal when stopped)."""
    handlers = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS}
    try:
        for signum in STOP_SIGNALS:
            signal.signal(signum, _raise_stopped)
    except ValueError:  # not the main thread: leave signals to whoever owns them
        handlers = {}
    # Before torch is imported: a growable allocator keeps a tight GPU from failing on fragmentation (offloaded
    # modes allocate and free blocks of many sizes). A value the user set wins.
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    args = None
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        if args.command == "download":
            return download_command(args)
        if args.command == "quantize":
            return quantize_command(args)
        if args.command == "evaluate":
            from .evaluate.command import run as evaluate_command

            return evaluate_command(args)
        if args.command == "finetune":
            from .finetune.command import run as finetune_command

            return finetune_command(args)
        _check_attention_installed(parser, args.attention)
        return upscale_command(args)
    except KeyboardInterrupt as stop:
        print(f"{stop_word(stop)}: nothing was written", file=sys.stderr)
        return 128 + getattr(stop, "signum", signal.SIGINT)
    except Exception as exc:  # one clear line, whatever went wrong
        return _report_error(exc, args)
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)


def _report_error(error: Exception, args: argparse.Namespace | None, suffix: str = "") -> int:
    print(f"error: {describe_error(error)}{suffix}", file=sys.stderr)
    if args is not None and args.debug:
        import traceback

        traceback.print_exception(error)
    return EXIT_ERROR


def _kept(film) -> str:
    return f"kept the {film.frames_written} finished frames in {film.kept}" if film.kept else "nothing was written"


def _check_attention_installed(parser: argparse.ArgumentParser, name: str) -> None:
    from .attention import backend_names

    available = backend_names()
    if name not in available:
        parser.error(f"argument --attention: invalid choice: {name!r} (choose from {', '.join(available)})")


def describe_error(exc: BaseException) -> str:
    """The error as one line a user can act on: our own errors as written; OS errors with the file and the fix."""
    from .errors import InfVSRError

    if isinstance(exc, InfVSRError):
        return str(exc)
    if isinstance(exc, OSError) and exc.errno is not None:
        where = exc.filename or ""
        advice = {
            errno.ENOSPC: "free some space or write the output to another disk",
            errno.EDQUOT: "free some space or write the output to another disk",
            errno.EFBIG: "the file system or a size limit refuses a file this large; write to another disk",
            errno.EACCES: "check the permissions of that file or folder",
            errno.EPERM: "check the permissions of that file or folder",
            errno.EROFS: "the disk is read-only; write the output elsewhere",
            errno.ENOENT: "check the path",
        }.get(exc.errno, "")
        text = f"{exc.strerror or exc}: {where}" if where else str(exc.strerror or exc)
        return f"{text}; {advice}" if advice else text
    return f"{type(exc).__name__}: {exc} (rerun with --debug for the traceback)"


def check_output(args: argparse.Namespace) -> None:
    """Refuse an output that cannot or must not be written, before any input is read or weights load."""
    from .errors import UsageError

    output, source = args.output, args.input
    same = output.resolve() == source.resolve() or (
        source.exists() and output.exists() and os.path.samefile(source, output)
    )
    if same:
        raise UsageError(f"output {output} is the input itself: choose another output name")
    if output.exists() and not args.overwrite:
        raise UsageError(f"output {output} already exists: choose another name, or pass --overwrite to replace it")
    folder = output.resolve().parent
    if not folder.is_dir():
        raise UsageError(f"output folder {folder} does not exist: create it first or choose another output")
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".infvsr-write-check-"):
            pass
    except OSError as e:
        raise UsageError(f"cannot write into the output folder {folder} ({e.strerror}): choose another output") from e


def upscale_command(args: argparse.Namespace) -> int:
    """The `upscale` command: checks first, then the film loop, then one line saying what was written."""
    check_arguments(args)
    check_output(args)  # before the input is decoded and several GB of weights load
    from .jobs.command import job_command, wants_job

    if wants_job(args):  # several devices or a Ray cluster: the film job (infvsr_core/jobs)
        return job_command(args)

    from tqdm import tqdm

    from .film import Film, FilmProgress
    from .io import VideoReader

    with VideoReader(args.input, start=args.start, max_frames=args.frames, fps=args.fps) as reader:
        film = Film(
            _load_pipeline(args),
            reader,
            _writer_factory(args, reader.info),
            scale=args.scale,
            detect_scenes=not args.no_scene_detect,
            scene_threshold=args.scene_threshold,
            read_frames=READ_CHUNK,
            strict=args.strict,
        )
        bar = tqdm(total=film.frames_total, unit="frame", disable=args.quiet, dynamic_ncols=True, desc="upscaling")

        def show(progress: FilmProgress) -> None:
            bar.update(progress.frames_done - bar.n)

        film.on_progress = show
        try:
            result = film.run()
        except KeyboardInterrupt as stop:
            print(f"{stop_word(stop)}: {_kept(film)}", file=sys.stderr)
            return 128 + getattr(stop, "signum", signal.SIGINT)
        except Exception as error:
            if not film.kept:
                raise
            return _report_error(error, args, f"; {_kept(film)}")
        finally:
            bar.close()
    if result.damage is not None:
        return report_damage(result)
    if not args.quiet:
        print(
            f"wrote {result.path}: {result.frames} frames, {result.scenes} scene(s), "
            f"{result.frames / max(result.seconds, 1e-9):.2f} fps",
            file=sys.stderr,
        )
    return 0


def download_command(args: argparse.Namespace) -> int:
    """The `download` command: one line per file (its source and size), then where the files are."""
    from .download import download_weights
    from .weight_files import default_models_dir

    folder = args.models if args.models is not None else default_models_dir()
    try:
        done = download_weights(folder, args.only, report=print)
    except KeyboardInterrupt as stop:
        print(f"{stop_word(stop)}: an unfinished download resumes when this command runs again", file=sys.stderr)
        return 128 + getattr(stop, "signum", signal.SIGINT)
    fetched = sum(f.how != "present" for f in done)
    print(f"{len(done)} file(s) in {folder}: {fetched} placed now, {len(done) - fetched} already there")
    return 0


def quantize_command(args: argparse.Namespace) -> int:
    """The `quantize` command: the fp8 copy of a DiT file (`loader.save_fp8_dit`)."""
    from .loader import save_fp8_dit

    path = save_fp8_dit(args.dit, args.output)
    print(f"wrote {path} ({path.stat().st_size / 2**30:.2f} GiB; {args.dit.stat().st_size / 2**30:.2f} GiB before)")
    return 0


def check_arguments(args: argparse.Namespace) -> None:
    """Option values that cannot work together, refused before anything is opened."""
    from .errors import UsageError

    if args.scale < 1:
        raise UsageError(f"--scale must be >= 1, got {args.scale}")
    if args.start < 0 or (args.frames is not None and args.frames < 1):
        raise UsageError("--start must be >= 0 and --frames >= 1")
    if args.host_memory is not None and args.spill_dir is None:
        raise UsageError("--host-memory needs --spill-dir: the folder for the histories past it")
    if args.host_memory is not None and args.host_memory < 0:
        raise UsageError(f"--host-memory must be >= 0 GiB, got {args.host_memory}")
    if args.spill_dir is not None and args.offload == "none":
        raise UsageError("--spill-dir needs --offload auto, histories, state or all (with 'none' nothing is offloaded)")


def _load_pipeline(args: argparse.Namespace):
    from .loader import load_pipeline

    if args.gpu_memory is not None:
        from .memory.plan import cap_device_memory

        cap_device_memory(args.device, args.gpu_memory)
    pipe = load_pipeline(
        args.models,
        dit=args.dit,
        lora=args.lora,
        device=args.device,
        dtype=args.dtype,
        offload=args.offload,
        vae_seams=args.seams,
        spill_dir=args.spill_dir,
        host_memory_gib=args.host_memory,
    )
    pipe.dit.attention_backend = args.attention
    if not args.quiet:
        pipe.on_plan = lambda line: print(f"memory plan: {line}", file=sys.stderr)
    return pipe


def _writer_factory(args: argparse.Namespace, info):
    """The film loop opens the writer on its first chunk: the audio is cut from that chunk's first timestamp."""
    from .io import BackgroundWriter, VideoWriter

    codec = args.codec
    if codec == "auto":
        codec = "png" if args.output.suffix == "" or args.output.is_dir() else "h264"
    audio = info.has_audio and not args.no_audio and codec != "png" and not info.is_image_sequence

    def open_writer(first) -> BackgroundWriter:
        # Encoding runs on a worker thread, under the next chunk's GPU work.
        return BackgroundWriter(
            VideoWriter(
                args.output,
                info.fps,
                codec=codec,
                crf=args.crf,
                pix_fmt=args.pix_fmt,
                prores_profile=args.prores_profile,
                audio_from=args.input if audio else None,
                audio_start=first.pts_seconds[0] if audio else 0.0,
                overwrite=args.overwrite,
            )
        )

    return open_writer
