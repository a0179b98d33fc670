"""The `evaluate` command: its options (built without importing torch or OpenCV, so --help is instant) and its run.

python -m infvsr_core evaluate OUTPUT --reference HR [--report DIR]
python -m infvsr_core evaluate HR --make-lr LR [--scale 4]
python -m infvsr_core evaluate --suite DIR [--outputs output]
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

from ..io.formats import CODECS

_PROTOCOL_HELP = (
    "bicubic (a = -0.5), antialiased (the kernel widened by the factor, as PIL and MATLAB imresize), in RGB as "
    "decoded, by 1/--scale; a size not a multiple of the scale is first cut to one (right/bottom edges)"
)


def add_parser(commands: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `evaluate` on the command line's sub-parsers."""
    ev = commands.add_parser(
        "evaluate",
        help="measure an upscaled video against its reference (PSNR, SSIM, E*warp, tOF, ...)",
        description="Measure OUTPUT (a video file or a folder of frames) against --reference HR, frame by frame, "
        "streaming: PSNR on RGB and on luma (Y), SSIM, the flow-warping error E*warp (OpenCV's DIS flow; the paper's "
        "table uses learned flows, so values are not comparable with it) and TecoGAN's tOF; VBench's subject and "
        "background consistency when --dino / --clip name local weights, VBench's motion smoothness when --amt does, "
        "LPIPS and DISTS when --alexnet / --vgg16 do (nothing is ever downloaded). Writes "
        "summary.json, frames.csv and plot.png (each metric over time, scene cuts marked) into --report, and prints "
        "the summary. Without --reference only the no-reference metrics run. "
        f"--make-lr writes the low-resolution test input of HR footage instead: {_PROTOCOL_HELP}. "
        "--suite DIR evaluates every pair of a test set laid out as DIR/GT/<clip> and DIR/output/<clip>.",
    )
    ev.add_argument(
        "video",
        type=Path,
        nargs="?",
        help="the upscaled video to measure; with --make-lr, the high-resolution footage to reduce",
    )
    ev.add_argument("--reference", "-r", type=Path, help="the high-resolution original (video file or frame folder)")
    ev.add_argument(
        "--report",
        type=Path,
        metavar="DIR",
        help="folder for summary.json, frames.csv, plot.png (default: OUTPUT's name + .eval beside it; with --suite "
        "DIR/<outputs>.eval)",
    )
    ev.add_argument("--overwrite", action="store_true", help="replace an existing report (or --make-lr output)")
    fit = ev.add_mutually_exclusive_group()
    fit.add_argument(
        "--resize", action="store_true", help="frame sizes differ: resample the output to the reference's size"
    )
    fit.add_argument("--crop", action="store_true", help="frame sizes differ: compare the common top-left area")
    ev.add_argument(
        "--align",
        action="store_true",
        help="frame counts or frame rates differ: pair frames by index over the shorter video",
    )
    ev.add_argument("--frames", type=int, metavar="N", help="evaluate (or reduce) the first N frames only")
    ev.add_argument(
        "--crop-border", type=int, default=0, metavar="N", help="leave N pixels all round out of PSNR/SSIM (default 0)"
    )
    ev.add_argument("--no-temporal", action="store_true", help="skip E*warp and tOF (the optical flows: the slow part)")
    ev.add_argument(
        "--scene-threshold", type=float, default=27.0, help="content detector threshold for the cuts (default 27)"
    )
    ev.add_argument("--device", help="where PSNR/SSIM and the networks run: cuda, cpu (default: cuda when available)")
    ev.add_argument(
        "--dino",
        type=Path,
        metavar="DIR",
        help="local Hugging Face folder of DINO ViT-B/16 (facebook/dino-vitb16): subject consistency",
    )
    ev.add_argument(
        "--clip",
        type=Path,
        metavar="DIR",
        help="local Hugging Face folder of CLIP ViT-B/32 (openai/clip-vit-base-patch32): background consistency",
    )
    ev.add_argument(
        "--amt",
        type=Path,
        metavar="FILE",
        help="VBench's AMT-S frame-interpolation checkpoint (amt-s.pth; VBench keeps it in "
        "~/.cache/vbench/amt_model/): VBench's motion smoothness",
    )
    ev.add_argument(
        "--alexnet",
        type=Path,
        metavar="FILE",
        help="torchvision's ImageNet AlexNet weights (alexnet-owt-7be5be79.pth): LPIPS (AlexNet)",
    )
    ev.add_argument(
        "--vgg16",
        type=Path,
        metavar="FILE",
        help="torchvision's ImageNet VGG16 weights (vgg16-397923af.pth): LPIPS (VGG) and DISTS",
    )
    ev.add_argument(
        "--lpips-heads",
        type=Path,
        metavar="DIR",
        help="folder of the LPIPS v0.1 linear heads alex.pth / vgg.pth (default: those inside the installed lpips "
        "package)",
    )
    ev.add_argument(
        "--dists",
        type=Path,
        metavar="FILE",
        help="DISTS' alpha/beta weights.pt (default: the one inside the installed DISTS_pytorch package)",
    )
    ev.add_argument(
        "--make-lr",
        type=Path,
        metavar="LR",
        help=f"write the low-resolution test input of the given HR footage to LR: {_PROTOCOL_HELP}. LR is a folder "
        "(PNG frames), an .mkv (FFV1, lossless) or another video file (--codec)",
    )
    ev.add_argument("--scale", type=int, default=4, help="--make-lr reduction factor (default 4)")
    ev.add_argument(
        "--codec",
        choices=("auto", *CODECS),
        default="auto",
        help="--make-lr encoding (default: png for a folder, ffv1 for .mkv, else h264)",
    )
    ev.add_argument("--crf", type=int, help="--make-lr quality for h264/h265")
    ev.add_argument(
        "--suite",
        type=Path,
        metavar="DIR",
        help="evaluate every clip of a test set: DIR/GT/<clip> (or DIR/HR/) against DIR/<outputs>/<clip>",
    )
    ev.add_argument(
        "--outputs", default="output", metavar="NAME", help="--suite: the results folder in DIR (default output)"
    )
    ev.add_argument("--quiet", action="store_true", help="no progress bar")
    ev.add_argument("--debug", action="store_true", help="print the full traceback of an error")
    return ev


def _check(args: argparse.Namespace) -> None:
    from ..errors import UsageError

    if args.suite is not None:
        if args.video is not None or args.reference is not None or args.make_lr is not None:
            raise UsageError("--suite takes the whole test set: give no OUTPUT, --reference or --make-lr with it")
        return
    if args.video is None:
        raise UsageError("give the video to evaluate (OUTPUT --reference HR), or --make-lr, or --suite DIR")
    if args.make_lr is not None and args.reference is not None:
        raise UsageError("--make-lr reduces the given video; it takes no --reference")
    if args.frames is not None and args.frames < 1:
        raise UsageError(f"--frames must be >= 1, got {args.frames}")


def _options(args: argparse.Namespace):
    from .run import EvaluateOptions

    weights = {}
    if args.dino is not None:
        weights["subject_consistency"] = args.dino
    if args.clip is not None:
        weights["background_consistency"] = args.clip
    # perceptual.PERCEPTUAL_OPTIONS and motion.MOTION_OPTIONS (not imported: the parser stays light)
    for name in ("alexnet", "vgg16", "lpips_heads", "dists", "amt"):
        if getattr(args, name) is not None:
            weights[name] = getattr(args, name)
    return EvaluateOptions(
        temporal=not args.no_temporal,
        crop_border=args.crop_border,
        resize=args.resize,
        crop=args.crop,
        align=args.align,
        frames=args.frames,
        scene_threshold=args.scene_threshold,
        device=args.device,
        weights=weights,
    )


class _Bar:
    """tqdm on stderr, opened at the first progress: an input refused before any frame prints only its error."""

    def __init__(self, args: argparse.Namespace, what: str) -> None:
        self.quiet, self.what, self.bar = args.quiet, what, None

    def update(self, done: int, total: int | None) -> None:
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="frame", disable=self.quiet, dynamic_ncols=True, desc=self.what)
        if total is not None and self.bar.total != total:
            self.bar.total = total
        self.bar.update(done - self.bar.n)

    def write(self, line: str) -> None:
        if self.bar is not None:
            self.bar.write(line, file=sys.stderr)
            self.bar.close()
            self.bar = None
        elif not self.quiet:
            print(line, file=sys.stderr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def default_report(video: Path) -> Path:
    """OUTPUT's report folder when --report is not given: `<name>.eval` beside it."""
    return video.with_name(f"{video.name}.eval")


def run(args: argparse.Namespace) -> int:
    """Run `evaluate` (or --make-lr, or --suite); returns the exit code."""
    _check(args)
    if args.make_lr is not None:
        return _make_lr(args)
    if args.suite is not None:
        return _suite(args)
    from .report import check_report_folder, summarize, summary_text, write_report
    from .run import evaluate

    report = args.report or default_report(args.video)
    check_report_folder(report, args.overwrite)  # before a long evaluation, not after it
    bar = _Bar(args, "evaluating")
    try:
        evaluation = evaluate(args.video, args.reference, _options(args), bar.update)
    finally:
        bar.close()
    files = write_report(evaluation, report)
    print(summary_text(summarize(evaluation)))
    if not args.quiet:
        print(f"wrote {files.summary}, {files.frames.name} and {files.plot.name}", file=sys.stderr)
    return 0


def _make_lr(args: argparse.Namespace) -> int:
    from .degrade import make_lr

    bar = _Bar(args, "reducing")
    try:
        made = make_lr(
            args.video,
            args.make_lr,
            scale=args.scale,
            codec=args.codec,
            crf=args.crf,
            frames=args.frames,
            overwrite=args.overwrite,
            progress=bar.update,
        )
    finally:
        bar.close()
    cut = "; the HR size is not a multiple of the scale, compare with --crop" if made.cropped else ""
    print(
        f"wrote {made.path}: {made.frames} frames, {made.width}x{made.height} ({args.scale}x bicubic, antialiased){cut}"
    )
    return 0


def _suite(args: argparse.Namespace) -> int:
    from ..errors import UsageError
    from .suite import SUITE_CSV, run_suite, suite_table

    report = args.report or args.suite / f"{args.outputs}.eval"
    if (report / SUITE_CSV).exists() and not args.overwrite:
        raise UsageError(f"a suite report already exists in {report}: choose another --report folder or --overwrite")
    bar = _Bar(args, "evaluating")

    def on_pair(name: str, evaluation, error: str | None) -> None:
        bar.write(f"{name}: {'done' if error is None else 'failed: ' + error}")

    try:
        result = run_suite(
            args.suite, report, _options(args), outputs=args.outputs, on_pair=on_pair, progress=bar.update
        )
    except KeyboardInterrupt as stop:
        print(f"interrupted: the reports of the clips finished so far are in {report}", file=sys.stderr)
        return 128 + getattr(stop, "signum", signal.SIGINT)
    finally:
        bar.close()
    print(suite_table(result))
    if not args.quiet:
        print(f"wrote {report / SUITE_CSV} and a report per clip in {report}", file=sys.stderr)
    return 1 if result.failed else 0
