"""What a film job reads, writes and loads: plain data that travels to the workers and into the manifest.

No torch and no Ray here: the command line builds a JobSpec while `--help` stays instant, and the manifest's
identity (what must match for a rerun to resume) is computed from it before anything heavy loads.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import UsageError

DEFAULT_SEGMENT_FRAMES = 1200
"""Frames a segment is grouped up to: about a minute of film, a few minutes of one GPU's time. Small enough that
segments outnumber the GPUs of a machine several times over (longest first then balances them), large enough that
a segment's fixed costs (opening the input, starting the encoder) stay small."""
DEFAULT_WARMUP_FRAMES = 45
"""Frames run before a split point of a long scene (opt-in) to rebuild its state; rounded up to 9 + 12 k."""


@dataclass(frozen=True)
class LoadOptions:
    """How every worker loads its pipeline: the files the driver resolved, and the loader's settings."""

    files: tuple[tuple[str, str], ...]
    """(role, path) of the four weight files (and "lora", a LoRA merged at load, when one is given), resolved once
    by the driver so that every worker loads the same."""
    dtype: str | None = None
    attention: str = "auto"
    offload: str = "auto"
    seams: str = "release"
    tiling: str = "auto"
    spill_dir: str | None = None
    host_memory_gib: float | None = None
    gpu_memory_gib: float | None = None

    def file_map(self) -> dict[str, str]:
        return dict(self.files)

    def output_settings(self, device_type: str) -> dict[str, Any]:
        """The settings that change the frames (files, precision, kernels, tiling), not where state lives: what a
        job's identity records, and what an existing pool must share with a job it runs."""
        return {
            "files": [list(f) for f in self.files],
            "dtype": self.dtype or ("bf16" if device_type == "cuda" else "fp32"),
            "attention": self.attention,
            "seams": self.seams,
            "tiling": self.tiling,
        }


@dataclass(frozen=True)
class EncodeOptions:
    """The output encoding: every segment is written with it, so that the segments join by stream copy."""

    codec: str = "h264"
    crf: int | None = None
    pix_fmt: str | None = None
    prores_profile: str | None = "hq"


@dataclass
class JobSpec:
    """One film job: the command line's `upscale` options with `--devices` (or the file node's)."""

    input: Path
    output: Path
    devices: tuple[str, ...]
    load: LoadOptions
    encode: EncodeOptions = field(default_factory=EncodeOptions)
    scale: int = 4
    detect_scenes: bool = True
    scene_threshold: float = 27.0
    start: int = 0
    frames: int | None = None
    fps: float | None = None
    audio: bool = True
    overwrite: bool = False
    strict: bool = False
    ray_address: str | None = None
    segment_frames: int = DEFAULT_SEGMENT_FRAMES
    split_long_scenes: bool = False
    warmup_frames: int = DEFAULT_WARMUP_FRAMES
    fresh: bool = False

    def __post_init__(self) -> None:
        self.input, self.output = Path(self.input), Path(self.output)
        if self.segment_frames < 1:
            raise UsageError(f"--segment-frames must be >= 1, got {self.segment_frames}")
        if self.warmup_frames < 0:
            raise UsageError(f"--warmup-frames must be >= 0, got {self.warmup_frames}")

    @property
    def device_type(self) -> str:
        return device_type(self.devices)

    def identity(self) -> dict[str, Any]:
        """What must be the same for a rerun to reuse finished segments: the input file, every option that
        changes the output, and the weights (name, size, modification time). Offload and memory settings are
        left out: they change where state lives, not the frames, so a rerun may pick others to fit."""
        stat = os.stat(self.input)
        options = {
            "scale": self.scale,
            "detect_scenes": self.detect_scenes,
            "scene_threshold": self.scene_threshold,
            "start": self.start,
            "frames": self.frames,
            "fps": self.fps,
            "audio": self.audio,
            "strict": self.strict,
            "segment_frames": self.segment_frames,
            "split_long_scenes": self.split_long_scenes,
            "warmup_frames": self.warmup_frames if self.split_long_scenes else None,
            "encode": asdict(self.encode),
            **{k: v for k, v in self.load.output_settings(self.device_type).items() if k != "files"},
            "device_type": self.device_type,
        }
        weights = {}
        for role, path in self.load.files:
            wstat = os.stat(path)
            weights[role] = {"name": Path(path).name, "size": wstat.st_size, "mtime_ns": wstat.st_mtime_ns}
        return {
            "input": {"path": str(self.input.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns},
            "output": str(self.output.resolve()),
            "options": options,
            "weights": weights,
        }


def parse_devices(text: str) -> tuple[str, ...]:
    """`--devices cuda:0,cuda:1` / `cpu,cpu`: one worker per entry, all of one kind.

    One kind only: a GPU and the CPU compute in different precisions, so their scenes would not be those of
    either device's single run."""
    devices = []
    for raw in text.split(","):
        name = raw.strip().lower()
        if not name:
            continue
        if name == "cuda":
            name = "cuda:0"
        kind, _, index = name.partition(":")
        if kind not in ("cuda", "cpu") or (kind == "cuda" and not index.isdigit()) or (kind == "cpu" and index):
            raise UsageError(f"--devices: {raw.strip()!r} is not a device; use cuda:N or cpu, comma-separated")
        devices.append(name)
    if not devices:
        raise UsageError("--devices names no device; e.g. --devices cuda:0,cuda:1 or --devices cpu,cpu")
    device_type(tuple(devices))
    gpus = [d for d in devices if d.startswith("cuda")]
    if len(set(gpus)) != len(gpus):
        raise UsageError(f"--devices names a GPU twice ({text}): one worker per GPU")
    return tuple(devices)


def device_type(devices: tuple[str, ...]) -> str:
    """ "cuda" or "cpu": the kind all the job's devices share (refused when they mix)."""
    if not devices:
        return "cuda"  # a cluster's GPUs, all of them (--ray-address without --devices)
    kinds = {d.partition(":")[0] for d in devices}
    if len(kinds) != 1:
        raise UsageError(
            f"--devices mixes {' and '.join(sorted(kinds))}: their precision differs, so the film would not be one "
            "run's frames; use GPUs only or CPUs only"
        )
    return kinds.pop()
