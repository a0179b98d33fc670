"""`python -m infvsr_core finetune`: the command line over the trainer.

    python -m infvsr_core finetune --data DIR --output my_footage.safetensors [--models DIR] [--steps N] ...
    torchrun --nproc-per-node 2 -m infvsr_core finetune ...     (data parallel, one process per GPU)

The parser imports nothing heavy (`--help` is instant); `run` loads the networks and trains.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

TARGETS = ("self_attn", "cross_attn", "ffn")


def _size(text: str) -> tuple[int, int]:
    """`WIDTHxHEIGHT` (or one number for a square) -> (height, width)."""
    parts = text.lower().split("x")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected WIDTHxHEIGHT, e.g. 832x480") from None
    if len(values) == 1:
        values *= 2
    if len(values) != 2 or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected WIDTHxHEIGHT, e.g. 832x480")
    return values[1], values[0]


def _range(text: str) -> tuple[float, float]:
    """`LOW,HIGH`, or `off` for (0, 0)."""
    if text.strip().lower() in ("off", "0", "none"):
        return (0.0, 0.0)
    try:
        low, high = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected LOW,HIGH (e.g. 1,30) or off") from None
    if not 0 <= low <= high:
        raise argparse.ArgumentTypeError(f"{text!r}: expected 0 <= LOW <= HIGH")
    return (low, high)


def _targets(text: str) -> tuple[str, ...]:
    names = tuple(dict.fromkeys(t.strip() for t in text.split(",") if t.strip()))
    unknown = [n for n in names if n not in TARGETS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"{text!r}: choose from {', '.join(TARGETS)}, comma-separated")
    return names


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register the `finetune` command and its options."""
    p = subparsers.add_parser(
        "finetune",
        help="adapt InfVSR to your footage (LoRA, the paper's training recipe)",
        description="Fine-tune the InfVSR DiT on a folder of high-resolution clips (video files or folders of "
        "PNG/JPEG frames): low-resolution inputs are made on the fly by a RealBasicVSR-style degradation, samples "
        "are streamed chunk by chunk as inference streams a scene, and the loss is the paper's patch-wise pixel "
        "loss on decoded windows (stage 1); with --teacher, also the cross-chunk distribution matching against "
        "Wan2.1-T2V-1.3B (stage 2). Writes a LoRA (.safetensors) that `upscale --lora`, load_pipeline(lora=...) "
        "and the ComfyUI loader node merge at load. Several GPUs: torchrun --nproc-per-node N -m infvsr_core "
        "finetune ... (data parallel).",
    )
    io = p.add_argument_group("data and files")
    io.add_argument("--data", type=Path, required=True, help="folder of high-resolution training clips")
    io.add_argument("--output", type=Path, required=True, help="the LoRA (or --full DiT) to write, .safetensors")
    io.add_argument("--models", type=Path, help="folder with the four InfVSR files (default: as for upscale)")
    io.add_argument("--resume", action="store_true", help="continue from OUTPUT's checkpoint (OUTPUT.state.pt)")
    io.add_argument("--overwrite", action="store_true", help="start anew even if OUTPUT exists")
    io.add_argument("--init-lora", type=Path, help="start the adapters from this LoRA (e.g. stage 1's, for stage 2)")
    run_group = p.add_argument_group("run")
    run_group.add_argument("--steps", type=int, default=1000, help="optimizer steps in all (default 1000)")
    run_group.add_argument("--save-every", type=int, default=100, help="checkpoint interval in steps (default 100)")
    run_group.add_argument("--seed", type=int, default=0, help="random seed of sampling and noise (default 0)")
    run_group.add_argument("--device", help="cuda, cuda:1 or cpu (default: cuda when available)")
    run_group.add_argument(
        "--dtype", choices=("bf16", "fp32"), help="frozen weights' dtype (default: bf16 on cuda, fp32 on cpu)"
    )
    run_group.add_argument("--quiet", action="store_true", help="no progress bar")
    run_group.add_argument("--debug", action="store_true", help="print the full traceback of an error")
    model = p.add_argument_group("what is trained")
    model.add_argument("--full", action="store_true", help="train every DiT weight instead of LoRA adapters")
    model.add_argument("--lora-rank", type=int, default=16, help="LoRA rank (default 16)")
    model.add_argument("--lora-alpha", type=float, default=16.0, help="LoRA alpha; the scale is alpha/rank (16)")
    model.add_argument(
        "--lora-targets", type=_targets, default=TARGETS, help="comma-separated: self_attn, cross_attn, ffn (all)"
    )
    model.add_argument("--no-gradient-checkpointing", action="store_true", help="keep activations (more memory)")
    model.add_argument("--no-mixed-precision", action="store_true", help="no bf16 autocast on cuda")
    optim = p.add_argument_group("optimizer (AdamW)")
    optim.add_argument("--lr", type=float, help="learning rate (default 1e-4 with LoRA, 1e-5 with --full)")
    optim.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (default 0)")
    optim.add_argument("--warmup", type=int, default=0, help="steps of linear learning-rate warm-up (default 0)")
    optim.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping, 0 = off (default 1)")
    optim.add_argument(
        "--clips-per-step", type=int, default=1, help="samples per optimizer step and process (default 1)"
    )
    sample = p.add_argument_group("samples")
    sample.add_argument(
        "--chunks", type=int, default=3, help="chunks per sample: 9 + 12 (N-1) frames (default 3: 33 frames)"
    )
    sample.add_argument(
        "--crop", type=_size, default=(480, 832), help="HR crop WIDTHxHEIGHT, multiples of 16 (default 832x480)"
    )
    sample.add_argument(
        "--patch", type=_size, default=(192, 192), help="decoded, supervised window WIDTHxHEIGHT, multiples of 8 (192)"
    )
    sample.add_argument(
        "--patch-context", type=int, default=8, help="latent pixels decoded around the window (default 8)"
    )
    sample.add_argument("--no-flip", action="store_true", help="no random horizontal mirroring")
    deg = p.add_argument_group("degradation (LOW,HIGH ranges, or off)")
    deg.add_argument(
        "--degradation", choices=("realbasicvsr", "bicubic"), default="realbasicvsr", help="preset (realbasicvsr)"
    )
    deg.add_argument("--blur-sigma", type=_range, help="Gaussian blur sigma, HR pixels (0.2,3)")
    deg.add_argument("--noise-sigma", type=_range, help="Gaussian noise sigma, 8-bit levels (1,30)")
    deg.add_argument("--jpeg-quality", type=_range, help="JPEG quality (30,95)")
    deg.add_argument("--crf", type=_range, help="H.264 CRF of the final video compression (18,35)")
    deg.add_argument("--no-second-order", action="store_true", help="one round of blur, resize and noise")
    loss = p.add_argument_group("patch loss weights")
    loss.add_argument("--mse", type=float, default=1.0, help="MSE (default 1)")
    loss.add_argument("--l1", type=float, default=0.0, help="L1 (default 0)")
    loss.add_argument("--temporal", type=float, default=1.0, help="temporal frame-difference term (default 1)")
    loss.add_argument(
        "--dists", type=float, default=0.0, help="DISTS perceptual term (default 0; needs its weights locally)"
    )
    dmd = p.add_argument_group("stage 2: cross-chunk distribution matching")
    dmd.add_argument("--teacher", type=Path, help="Wan2.1-T2V-1.3B DiT (diffusion_pytorch_model.safetensors)")
    dmd.add_argument("--teacher-context", type=Path, help="safetensors with the teacher's text context (L, 4096)")
    dmd.add_argument("--dmd-weight", type=float, default=1.0, help="weight of the DMD loss (default 1)")
    dmd.add_argument("--dmd-guidance", type=float, default=1.0, help="real score's CFG scale (default 1: none)")
    dmd.add_argument("--fake-lr", type=float, default=1e-5, help="fake score's learning rate (default 1e-5)")
    dmd.add_argument("--fake-rank", type=int, default=16, help="fake score's LoRA rank (default 16)")
    dmd.add_argument("--fake-steps", type=int, default=1, help="fake score updates per step (default 1)")
    return p


def build_config(args: argparse.Namespace):
    """The `TrainConfig` the options describe (values checked here, before anything loads)."""
    from ..errors import UsageError
    from .degrade import Degradation
    from .dmd import DMDSettings
    from .lora import LoRASettings
    from .losses import LossWeights
    from .trainer import TrainConfig

    positive = {"--steps": args.steps, "--save-every": args.save_every, "--chunks": args.chunks}
    positive.update({"--clips-per-step": args.clips_per_step, "--fake-steps": args.fake_steps})
    for name, value in positive.items():
        if value < 1:
            raise UsageError(f"{name} must be >= 1, got {value}")
    if args.patch_context < 0:
        raise UsageError(f"--patch-context must be >= 0, got {args.patch_context}")
    base = Degradation.bicubic() if args.degradation == "bicubic" else Degradation()
    degradation = base.with_overrides(
        blur_sigma=args.blur_sigma,
        noise_sigma=args.noise_sigma,
        jpeg_quality=args.jpeg_quality,
        crf=args.crf,
        second_order=False if args.no_second_order else None,
    )
    if degradation.jpeg_quality[1] > 100:
        raise UsageError("--jpeg-quality goes up to 100")
    lora = None if args.full else LoRASettings(args.lora_rank, args.lora_alpha, tuple(args.lora_targets))
    dmd = None
    if args.teacher is not None:
        dmd = DMDSettings(
            weight=args.dmd_weight,
            guidance=args.dmd_guidance,
            fake_lora=LoRASettings(args.fake_rank, float(args.fake_rank)),
            fake_lr=args.fake_lr,
            fake_steps=args.fake_steps,
        )
    elif args.teacher_context is not None:
        raise UsageError("--teacher-context is for stage 2: give --teacher too")
    return TrainConfig(
        steps=args.steps,
        lr=args.lr if args.lr is not None else (1e-5 if args.full else 1e-4),
        weight_decay=args.weight_decay,
        warmup=args.warmup,
        max_grad_norm=args.max_grad_norm,
        seed=args.seed,
        chunks=args.chunks,
        crop=tuple(args.crop),
        patch=tuple(args.patch),
        context=args.patch_context,
        clips_per_step=args.clips_per_step,
        flip=not args.no_flip,
        lora=lora,
        losses=LossWeights(mse=args.mse, l1=args.l1, temporal=args.temporal, dists=args.dists),
        degradation=degradation,
        dmd=dmd,
        gradient_checkpointing=not args.no_gradient_checkpointing,
        mixed_precision=not args.no_mixed_precision,
        save_every=args.save_every,
    )


def _check_output(args: argparse.Namespace) -> None:
    from ..errors import UsageError

    output = args.output
    if output.suffix != ".safetensors":
        raise UsageError(f"--output {output}: the weights are written as .safetensors; name it NAME.safetensors")
    if not output.resolve().parent.is_dir():
        raise UsageError(f"--output {output}: its folder does not exist")
    if output.exists() and not (args.resume or args.overwrite):
        raise UsageError(f"{output} exists: --resume continues its training, --overwrite starts anew")
    if args.resume and args.overwrite:
        raise UsageError("--resume and --overwrite contradict each other")


def _require(module: str, why: str) -> None:
    import importlib.util

    from ..errors import UsageError

    if importlib.util.find_spec(module) is None:
        raise UsageError(f"fine-tuning needs the package {module} ({why}): pip install {module}")


def _setup_distributed(device_name: str | None):
    """torchrun's environment -> (distributed, device): one process per GPU (NCCL), or gloo on the CPU."""
    import torch

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return False, torch.device(device_name or ("cuda" if torch.cuda.is_available() else "cpu"))
    import torch.distributed as dist

    local = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = (device_name or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    if use_cuda:
        torch.cuda.set_device(local)
    dist.init_process_group("nccl" if use_cuda else "gloo")
    return True, torch.device(f"cuda:{local}" if use_cuda else "cpu")


def run(args: argparse.Namespace) -> int:
    """Train; returns the exit code (0, or 128 + signal when stopped: steps done are saved when possible)."""
    config = build_config(args)
    _check_output(args)
    if config.lora is not None or config.dmd is not None:
        _require("peft", "the LoRA adapters")
    _require("matplotlib", "the loss curve")
    from ..loader import load_pipeline, parse_dtype
    from .checkpoint import plot_path
    from .data import find_clips
    from .trainer import Trainer

    distributed, device = _setup_distributed(args.device)
    try:
        dtype = parse_dtype(args.dtype, device)
        clips = find_clips(args.data)  # before the weights: a wrong folder is reported at once
        pipe = load_pipeline(args.models, device=device, dtype=dtype)
        if config.lora is None:
            pipe.dit.float()  # the optimizer's master weights
        teacher = context = dists = init = None
        if config.dmd is not None:
            from .dmd import load_teacher, teacher_context

            teacher = load_teacher(args.teacher, device=device, dtype=dtype)
            context = teacher_context(args.teacher_context, teacher.config.text_dim, device=device, dtype=dtype)
        if config.losses.dists > 0:
            from .losses import load_dists

            dists = load_dists(device)
        if args.init_lora is not None:
            from ..lora import read_lora

            init = read_lora(args.init_lora)
        trainer = Trainer(
            pipe, clips, config, teacher=teacher, teacher_context=context, dists=dists, init_lora=init,
            distributed=distributed,
        )  # fmt: skip
        if args.resume:
            trainer.resume(args.output)
        rank0 = trainer.rank == 0
        try:
            trainer.fit(args.output, progress=not args.quiet, report=lambda line: print(line, file=sys.stderr))
        except KeyboardInterrupt as stop:
            signum = getattr(stop, "signum", signal.SIGINT)
            if rank0:
                print(f"stopped at step {trainer.step}", file=sys.stderr)
            return 128 + signum
        if rank0 and not args.quiet:
            print(
                f"wrote {args.output} (step {trainer.step}), loss curve {plot_path(args.output)}; use it with "
                f"`python -m infvsr_core upscale INPUT -o OUTPUT --lora {args.output}`",
                file=sys.stderr,
            )
        return 0
    finally:
        if distributed:
            import torch.distributed as dist

            dist.destroy_process_group()
