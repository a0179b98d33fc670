"""The file node on several GPUs of this machine: the core's film job (infvsr_core/jobs) from ComfyUI's types.

The job's workers are Ray actors in processes of their own, each loading the model's files on its GPU; they
import the core by its top-level name, `infvsr_core`, which ComfyUI does not use for this pack (it loads the
pack under its folder's name). So the driver side runs the core under that name too: the pack's root is put at
the end of `sys.path` (ComfyUI's own `nodes` module keeps its name) and checked to be this pack's copy.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from . import comfy
from ._core import SEAMS
from .sink import FORMATS, free_output_path
from .types import InfVSRModel

ROOT = Path(__file__).resolve().parents[1]
DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def core_jobs() -> ModuleType:
    """`infvsr_core.jobs`, imported by the name the workers use, from this pack."""
    if str(ROOT) not in sys.path:
        sys.path.append(str(ROOT))
    jobs = importlib.import_module("infvsr_core.jobs")
    if Path(jobs.__file__).resolve().parents[2] != ROOT:
        raise RuntimeError(
            f"another installed infvsr_core ({jobs.__file__}) shadows this pack's; uninstall it to use devices"
        )
    return jobs


def load_options(model: InfVSRModel, jobs: ModuleType) -> Any:
    """What each worker loads: the model's files with its settings (the weights in ComfyUI stay where they are)."""
    pipe = model.pipeline
    fp8 = any(p.dtype in (torch.float8_e4m3fn, torch.float8_e5m2) for p in pipe.dit.parameters())
    vae = pipe.vae
    seams = next((name for name, pair in SEAMS.items() if pair == (vae.tile_stride, vae.tile_margin)), "release")
    return jobs.LoadOptions(
        files=tuple((role, str(Path(path).resolve())) for role, path in model.files.items()),
        dtype="fp8" if fp8 else DTYPE_NAMES.get(pipe.dtype),
        attention=model.attention,
        offload=pipe.offload,
        seams=seams,
        tiling=vae.tiling,
    )


def run_file_job(
    model: InfVSRModel,
    source: Path,
    devices: str,
    *,
    scale: int,
    format_name: str,
    crf: int,
    filename_prefix: str,
    keep_audio: bool,
    detect_scenes: bool,
    start_frame: int,
    max_frames: int,
    node: str,
) -> tuple[Path, dict[str, Any]]:
    """Upscale `source` on `devices` as one film job; returns the output and its preview entry. Cancel stops the
    workers at their next chunk; the node does not resume (each run picks a new name), so its job folder goes."""
    jobs = core_jobs()
    from infvsr_core.jobs.manifest import job_folder, remove_job_folder
    from infvsr_core.jobs.spec import parse_devices

    fmt = FORMATS[format_name]
    path, subfolder, filename = free_output_path(comfy.output_directory(), filename_prefix, fmt.extension)
    spec = jobs.JobSpec(
        source,
        path,
        parse_devices(devices),
        load_options(model, jobs),
        jobs.EncodeOptions(fmt.codec, int(crf) if fmt.uses_crf else None, None, fmt.prores_profile or "hq"),
        scale=scale,
        detect_scenes=detect_scenes,
        start=start_frame,
        frames=max_frames or None,
        audio=keep_audio,
    )
    bar = comfy.ProgressBar(1)

    def progress(state: Any) -> None:
        total = state.frames_total if state.stage == "upscale" else None
        if total:
            bar.update_absolute(state.frames_done, total)
        comfy.report_progress(comfy.Progress(node, state.frames_done, total))  # raises on Cancel

    try:
        result = jobs.run_job(spec, on_progress=progress)
    except BaseException:
        remove_job_folder(job_folder(path))
        raise
    preview = {
        "filename": filename,
        "subfolder": subfolder,
        "type": "output",
        "format": fmt.mime,
        "format_name": format_name,
        "playable": fmt.browser_playable,
        "frames": result.frames,
        "finished": True,
        "poster": None,
    }
    if fmt.codec == "png":
        folder = f"{subfolder}/{filename}" if subfolder else filename
        preview.update(subfolder=folder, filename=f"frame_{result.frames:06d}.png", sequence=True)
    return result.path, preview
