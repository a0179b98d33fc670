"""LoadInfVSRModel and ExtractDAPEGuidance."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from . import comfy, model_subfolders
from ._core import SEAMS, WEIGHT_FILES, WeightFileError, download_weights, loader, memory
from ._core import attention as attention_module
from .common import check_model
from .types import GUIDANCE_TYPE, MODEL_TYPE, DAPEGuidance, InfVSRModel

CATEGORY = "InfVSR"

WEIGHTS_LOCATIONS = ("gpu", "offload to cpu when idle")
"""The `weights` choices: where the weights stay while no InfVSR node runs (`InfVSRModel.idle_weights_on_cpu`).
Saved workflows hold these values: they stay as they are."""


def _kinds(role: str) -> tuple[str, ...]:
    """The ComfyUI model folder kinds a slot lists: models/infvsr, and models/vae for the VAE."""
    return (comfy.MODEL_FOLDER, "vae") if role == "vae" else (comfy.MODEL_FOLDER,)


def claimed_by(name: str) -> str | None:
    """The slot whose published stem a listed file carries (InfVSR, Wan2.1_VAE, ram_swin_large_14m, DAPE; any
    suffix, any subfolder, any case), or None for a file named otherwise."""
    stem = Path(name).stem.casefold().removesuffix("_fp8")  # an fp8 copy (`quantize`) is still its slot's file
    return next((role for role, spec in WEIGHT_FILES.items() if spec.stem.casefold() == stem), None)


def _choices(role: str) -> list[str]:
    """The published file name first (a fresh install shows what to get; saved workflows stay valid), then the
    files named for this slot, then the files no slot claims by name, so renamed files still appear; never a
    file named for another slot."""
    default = WEIGHT_FILES[role].filename
    found = [n for n in comfy.list_model_files(_kinds(role)) if n != default and not _in_lora_folder(n)]
    return [default, *[n for n in found if claimed_by(n) == role], *[n for n in found if claimed_by(n) is None]]


LORA_FOLDER = "loras"
"""The DiT LoRAs (`python -m infvsr_core finetune`) live in models/infvsr/loras."""
NO_LORA = model_subfolders.NONE


def _in_lora_folder(name: str) -> bool:
    return Path(name).parts[:1] == (LORA_FOLDER,)


def lora_choices() -> list[str]:
    """"none", then the .safetensors files of the LoRA folders (relative names, any subfolder)."""
    return model_subfolders.choices(LORA_FOLDER, (".safetensors",))


def resolve_lora(name: str) -> Path | None:
    """The LoRA file picked (None for "none"); a name that is in no LoRA folder, or climbs out of one, raises."""
    return model_subfolders.resolve(LORA_FOLDER, name, "LoRA file")


def _slot_tooltip(role: str, what: str) -> str:
    """The slot's tooltip: what the file is, which files the list shows, and the Hugging Face cache fallback."""
    spec = WEIGHT_FILES[role]
    repos = " or ".join(h.repo_id for h in spec.hub_files)
    return (
        f"{what} Lists the files named {spec.stem} (any suffix or subfolder) and the files whose name no other "
        f"slot claims (renamed files). A {spec.stem} choice that is in no model folder is taken from the Hugging "
        f"Face cache ({repos}) when it is there; download_missing fetches it when it is in neither."
    )


def _searched(role: str) -> list[Path]:
    return [folder for kind in _kinds(role) for folder in comfy.model_folders(kind)]


def resolve_weight(role: str, name: str) -> Path:
    """The file picked for `role`: from the model folders; a name of the published file (its stem) also from
    the Hugging Face cache. A missing one raises naming the file, where it was looked for and its source."""
    for kind in _kinds(role):
        path = comfy.resolve_model_file(kind, name)
        if path is not None:
            return path
    spec = WEIGHT_FILES[role]
    folders = _searched(role)
    if claimed_by(name) == role:  # the published file under any accepted name: the folders, then the HF cache
        try:
            return loader.find_weight_file(role, folders)
        except WeightFileError as exc:
            raise WeightFileError(f"{exc}; or switch on this node's download_missing") from None
    searched = ", ".join(f"'{f}'" for f in folders) or "(no model folder is registered)"
    raise WeightFileError(
        f"missing weight file '{name}' for {spec.description}; searched {searched}; "
        f"the published file is '{spec.filename}' from {spec.source}"
    )


def fetch_missing(choices: dict[str, str]) -> list[str]:
    """`download_missing`: fetch the published files that are in no model folder and not in the Hugging Face cache
    into models/infvsr, through the core's `download_weights` (as `python -m infvsr_core download`); returns the
    roles fetched. A renamed file that is missing cannot be fetched: loading reports it."""
    missing = []
    for role, name in choices.items():
        if claimed_by(name) != role:
            continue
        try:
            resolve_weight(role, name)
        except WeightFileError:
            missing.append(role)
    if missing:
        folders = comfy.model_folders(comfy.MODEL_FOLDER)
        if not folders:
            raise WeightFileError("download_missing: no models/infvsr folder is registered, so there is nowhere to "
                                  "put the downloaded files")
        download_weights(folders[0], missing, report=comfy.log.info)
    return missing


def _state_offload_input() -> dict[str, Any]:
    """The core's offload modes (`OffloadPolicy`): which stream state lives in host memory between uses."""
    return {"state_offload": (list(memory.OFFLOAD_CHOICES), {
        "default": "auto",
        "tooltip": "auto: the fastest mode that fits the GPU's free memory (after ComfyUI freed what it could), "
        "chosen at a frame size's first chunk and stepped down if the GPU runs out of memory anyway (the chunk is "
        "redone: no frame lost). Or keep stream state in host memory between uses: same results, less VRAM, each "
        "mode keeping "
        "more there than the one before (all = low VRAM). What each mode keeps where: OffloadPolicy in "
        "infvsr_core/memory/policy.py; each mode's memory and speed: the README's speed table."})}


class LoadInfVSRModel:
    """Loads the four published files from ComfyUI's model folders into one InfVSR pipeline."""

    DESCRIPTION = (
        "Loads InfVSR (causal DiT, Wan2.1 VAE, RAM Swin-L with DAPE) from models/infvsr/ "
        "(the VAE may also sit in models/vae/), else from the Hugging Face cache; download_missing fetches "
        "missing files into models/infvsr/."
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
                "dit": (_choices("dit"), {"tooltip": _slot_tooltip(
                    "dit", "InfVSR.ckpt: the fine-tuned causal DiT (models/infvsr).")}),
                "vae": (_choices("vae"), {"tooltip": _slot_tooltip(
                    "vae", "Wan2.1_VAE.pth (models/infvsr or models/vae).")}),
                "ram": (_choices("ram"), {"tooltip": _slot_tooltip(
                    "ram", "ram_swin_large_14m.pth: RAM (its Swin-L reads the reference).")}),
                "dape": (_choices("dape"), {"tooltip": _slot_tooltip(
                    "dape", "DAPE.pth: the LoRA merged into RAM's attention.")}),
                "dtype": (["auto", "bf16", "fp16", "fp32", "fp8"], {
                    "default": "auto", "tooltip": "auto: bf16 on a GPU, fp32 on the CPU. fp8: the DiT's linear "
                    "layers in float8 (half their memory; faster on GPUs with fp8 tensor cores: RTX 40/50, H100) "
                    "and, on Hopper (H100/H200), the VAE's convolutions too, and the DiT's attention where "
                    "FlashAttention-3 is installed (faster again: README has the figures); "
                    "the rest as auto; output close to bf16, not identical. An fp8 DiT file is always fp8."}),
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
                    "tooltip": "With state_offload: system RAM for the offloaded VAE histories (0 = chosen from "
                    "the RAM available when a video starts). Past it they go to files in ComfyUI's temp folder, "
                    "deleted as they are read back: same output, slower by the disk's time (for 4K, whose "
                    "histories outgrow most hosts' RAM)."}),
                "download_missing": ("BOOLEAN", {
                    "default": False,
                    "tooltip": "Off: never uses the network. On: a slot set to its published file (InfVSR.ckpt, "
                    "...) whose file is in no model folder and not in the Hugging Face cache is downloaded from "
                    "Hugging Face into models/infvsr first (GBs; an interrupted download resumes), as "
                    "`python -m infvsr_core download` does."}),
                "lora": (lora_choices(), {
                    "default": NO_LORA,
                    "tooltip": "A LoRA of the DiT made by `python -m infvsr_core finetune` (your footage), from "
                    "models/infvsr/loras; merged into the DiT's weights at load (no speed cost). none: the "
                    "published model."}),
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
        state_offload: str = "auto",
        vae_seams: str = "release",
        host_memory_gib: float = 0.0,
        download_missing: bool = False,
        lora: str = NO_LORA,
    ) -> tuple[InfVSRModel]:
        if weights not in WEIGHTS_LOCATIONS:
            raise ValueError(f"weights must be one of {WEIGHTS_LOCATIONS}, got {weights!r}")
        choices = {"dit": dit, "vae": vae, "ram": ram, "dape": dape}
        if download_missing:
            fetch_missing(choices)
        paths = {role: resolve_weight(role, name) for role, name in choices.items()}
        lora_path = resolve_lora(lora)
        device = comfy.compute_device()
        torch_dtype = loader.parse_dtype(dtype, device)
        idle_weights_on_cpu = weights != "gpu" and device.type != "cpu"
        if attention not in attention_module.ATTENTION_BACKENDS:
            raise ValueError(f"unknown attention backend {attention!r}; available: "
                             f"{', '.join(sorted(attention_module.ATTENTION_BACKENDS))}")
        # Inside ComfyUI its model manager puts the weights on the device when a node needs them (InfVSRModel).
        load_on_cpu = idle_weights_on_cpu or comfy.manages_models()
        if not load_on_cpu:
            comfy.free_device_memory(sum(p.stat().st_size for p in paths.values()) * 2, device)
        extra = {"offload": state_offload} if state_offload != "none" else {}
        if host_memory_gib > 0 and not extra:
            raise ValueError("host_memory_gib caps the offloaded state: set state_offload (auto, histories, state "
                             "or all) too, or leave it at 0")
        extra["spill_dir"] = comfy.temp_directory() / "infvsr-spill"
        if host_memory_gib > 0:
            extra["host_memory_gib"] = host_memory_gib
        pipe = loader.load_pipeline(
            dit=paths["dit"], vae=paths["vae"], ram=paths["ram"], dape=paths["dape"],
            device="cpu" if load_on_cpu else device, dtype=loader.FP8 if dtype == loader.FP8 else torch_dtype,
            vae_tiling=vae_tiling,
            vae_seams=vae_seams,
            lora=lora_path,
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
