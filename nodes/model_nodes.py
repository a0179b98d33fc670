"""LoadInfVSRModel and ExtractDAPEGuidance."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from . import comfy
from ._core import SEAMS, WEIGHT_FILES, WeightFileError, loader, memory
from ._core import attention as attention_module
from .common import check_model
from .types import GUIDANCE_TYPE, MODEL_TYPE, DAPEGuidance, InfVSRModel

CATEGORY = "InfVSR"

WEIGHTS_LOCATIONS = ("gpu", "offload to cpu when idle")
"""The `weights` choices: where the weights stay while no InfVSR node runs (`InfVSRModel.idle_weights_on_cpu`).
Saved workflows hold these values: they stay as they are."""


def _choices(role: str) -> list[str]:
    """The published file name first (so a fresh install shows what to download), then what is there."""
    kinds = (comfy.MODEL_FOLDER, "vae") if role == "vae" else (comfy.MODEL_FOLDER,)
    default = WEIGHT_FILES[role].filename
    found = comfy.list_model_files(kinds)
    stem = Path(default).stem
    preferred = [n for n in found if Path(n).stem == stem and n != default]
    return [default, *preferred, *[n for n in found if n != default and n not in preferred]]


def _searched(role: str) -> list[Path]:
    kinds = (comfy.MODEL_FOLDER, "vae") if role == "vae" else (comfy.MODEL_FOLDER,)
    return [folder for kind in kinds for folder in comfy.model_folders(kind)]


def resolve_weight(role: str, name: str) -> Path:
    """The file picked for `role`; a missing one raises naming the file, the folders and its source."""
    kinds = (comfy.MODEL_FOLDER, "vae") if role == "vae" else (comfy.MODEL_FOLDER,)
    for kind in kinds:
        path = comfy.resolve_model_file(kind, name)
        if path is not None:
            return path
    spec = WEIGHT_FILES[role]
    folders = _searched(role)
    if name == spec.filename:  # the published name: also accept the other suffixes (.safetensors, ...)
        return loader.find_weight_file(role, folders)
    searched = ", ".join(f"'{f}'" for f in folders) or "(no model folder is registered)"
    raise WeightFileError(
        f"missing weight file '{name}' for {spec.description}; searched {searched}; "
        f"the published file is '{spec.filename}' from {spec.source}"
    )


def _state_offload_input() -> dict[str, Any]:
    """The core's offload modes (`OffloadPolicy`): which stream state lives in host memory between uses."""
    return {"state_offload": (list(memory.OFFLOAD_MODES), {
        "default": "none",
        "tooltip": "Keep stream state in host memory between uses: same results, less VRAM, each mode keeping "
        "more there than the one before (all = low VRAM). What each mode keeps where: OffloadPolicy in "
        "infvsr_core/memory/policy.py; each mode's memory and speed: the README's speed table."})}


class LoadInfVSRModel:
    """Loads the four published files from ComfyUI's model folders into one InfVSR pipeline."""

    DESCRIPTION = (
        "Loads InfVSR (causal DiT, Wan2.1 VAE, RAM Swin-L with DAPE) from models/infvsr/ "
        "(the VAE may also sit in models/vae/)."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = (MODEL_TYPE,)
    RETURN_NAMES = ("model",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        backends = attention_module.backend_names()
        return {
            "required": {
                "dit": (_choices("dit"), {"tooltip": "InfVSR.ckpt: the fine-tuned causal DiT (models/infvsr)."}),
                "vae": (_choices("vae"), {"tooltip": "Wan2.1_VAE.pth (models/infvsr or models/vae)."}),
                "ram": (_choices("ram"), {"tooltip": "ram_swin_large_14m.pth: RAM (its Swin-L reads the reference)."}),
                "dape": (_choices("dape"), {"tooltip": "DAPE.pth: the LoRA merged into RAM's attention."}),
                "dtype": (["auto", "bf16", "fp16", "fp32"], {
                    "default": "auto", "tooltip": "auto: bf16 on a GPU, fp32 on the CPU."}),
                "attention": (backends, {
                    "default": "auto", "tooltip": "Attention kernel of the DiT. auto: FlashAttention-3 where it is "
                    "installed (flash_attn_3 or fa3_fwd; Hopper GPUs, bf16), else PyTorch's SDPA (cuDNN first)."}),
                "weights": (list(WEIGHTS_LOCATIONS), {
                    "default": "gpu",
                    "tooltip": "Where the weights stay between runs: on the GPU (fastest), or on the CPU, "
                    "moved to the GPU only while an InfVSR node runs."}),
            },
            "optional": {
                "vae_tiling": (["auto", "always", "never"], {
                    "default": "auto", "tooltip": "Spatial VAE tiling: auto tiles outputs above 1024 rows."}),
                **_state_offload_input(),
                "vae_seams": (list(SEAMS), {
                    "default": "release",
                    "tooltip": "How tiles are blended. release: the authors' tiling (their exact output). smooth: "
                    "wider overlaps that hide the seams (on a 1080p test, the tile edges differ from an untiled "
                    "run no more than the tile centres do) for ~1.5x the VAE time and memory."}),
                "host_memory_gib": ("FLOAT", {
                    "default": 0.0, "min": 0.0, "max": 4096.0, "step": 1.0,
                    "tooltip": "With state_offload: system RAM for the offloaded VAE histories (0 = no cap). Past "
                    "it they go to files in ComfyUI's temp folder, deleted as they are read back: same output, "
                    "slower by the disk's time (for 4K, whose histories outgrow most hosts' RAM)."}),
            },
        }

    def load(
        self,
        dit: str,
        vae: str,
        ram: str,
        dape: str,
        dtype: str = "auto",
        attention: str = "auto",
        weights: str = "gpu",
        vae_tiling: str = "auto",
        state_offload: str = "none",
        vae_seams: str = "release",
        host_memory_gib: float = 0.0,
    ) -> tuple[InfVSRModel]:
        if weights not in WEIGHTS_LOCATIONS:
            raise ValueError(f"weights must be one of {WEIGHTS_LOCATIONS}, got {weights!r}")
        paths = {role: resolve_weight(role, name) for role, name in (("dit", dit), ("vae", vae), ("ram", ram),
                                                                        ("dape", dape))}
        device = comfy.compute_device()
        torch_dtype = loader.parse_dtype(dtype, device)
        idle_weights_on_cpu = weights != "gpu" and device.type != "cpu"
        if attention not in attention_module.ATTENTION_BACKENDS:
            raise ValueError(f"unknown attention backend {attention!r}; available: "
                             f"{', '.join(sorted(attention_module.ATTENTION_BACKENDS))}")
        if not idle_weights_on_cpu:
            comfy.free_device_memory(sum(p.stat().st_size for p in paths.values()) * 2, device)
        extra = {"offload": state_offload} if state_offload != "none" else {}
        if host_memory_gib > 0:
            if not extra:
                raise ValueError("host_memory_gib caps the offloaded state: set state_offload (histories, state or "
                                 "all) too, or leave it at 0")
            extra.update(spill_dir=comfy.temp_directory() / "infvsr-spill", host_memory_gib=host_memory_gib)
        pipe = loader.load_pipeline(
            dit=paths["dit"], vae=paths["vae"], ram=paths["ram"], dape=paths["dape"],
            device="cpu" if idle_weights_on_cpu else device, dtype=torch_dtype, vae_tiling=vae_tiling,
            vae_seams=vae_seams,
            **extra,
        )
        pipe.device = device  # inputs go to the compute device; weights follow in InfVSRModel.active()
        pipe.dit.attention_backend = attention
        return (InfVSRModel(pipe, device, idle_weights_on_cpu, paths, attention),)


FRAME_CHOICES = ("first", "middle", "index")


class ExtractDAPEGuidance:
    """The DAPE visual prompt from one reference frame; feed it to every chunk node of a stream."""

    DESCRIPTION = (
        "RAM Swin-L + DAPE prompt from one low-resolution frame. Take it from a fixed frame (for a stream: "
        "InfVSR Load Video Frames at frame 0), not from a streaming loader, so every chunk gets the same one."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = (GUIDANCE_TYPE,)
    RETURN_NAMES = ("guidance",)
    FUNCTION = "extract"

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {
            "required": {
                "model": (MODEL_TYPE,),
                "image": ("IMAGE", {"tooltip": "Low-resolution frames; one of them is the reference."}),
                "frame": (list(FRAME_CHOICES), {"default": "first"}),
                "index": ("INT", {"default": 0, "min": -(2**31), "max": 2**31 - 1,
                                  "tooltip": "Frame index when frame = index (negative counts from the end)."}),
            }
        }

    def extract(self, model: InfVSRModel, image: torch.Tensor, frame: str = "first", index: int = 0) -> tuple:
        check_model(model)
        if not isinstance(image, torch.Tensor) or image.ndim != 4 or image.shape[-1] not in (3, 4):
            raise ValueError(f"image must be an IMAGE batch (B, H, W, 3), got {getattr(image, 'shape', image)}")
        count = int(image.shape[0])
        if count == 0:
            raise ValueError("the reference IMAGE batch is empty (0 frames)")
        if frame == "first":
            chosen = 0
        elif frame == "middle":
            chosen = count // 2
        elif frame == "index":
            chosen = index + count if index < 0 else index
            if not 0 <= chosen < count:
                raise ValueError(f"reference index {index} is outside the batch of {count} frames")
        else:
            raise ValueError(f"frame must be one of {FRAME_CHOICES}, got {frame!r}")
        reference = image[chosen, ..., :3]
        with model.active() as pipe:
            prompt = pipe.extract_prompt(reference)
        guidance = DAPEGuidance(prompt.detach(), model.model_id, f"frame {chosen} of {count}")
        return {"ui": {"infvsr_guidance": [{"reference": guidance.reference,
                                            "tokens": int(prompt.shape[1])}]}, "result": (guidance,)}
