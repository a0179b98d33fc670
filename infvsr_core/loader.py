"""Find and load the four published InfVSR weight files into an `InfVSRPipeline`.

The table of the files and the search (folders, then the Hugging Face cache) live in `weight_files`,
which needs no torch; their names are re-exported here.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import fields
from pathlib import Path

import torch

from .dit import CausalWanDiT, DiTConfig
from .errors import UsageError
from .fp8 import cast_except_fp8, is_fp8_state_dict, prepare_for_fp8_state, quantize_dit
from .guidance import build_guidance
from .lora import merge_lora, read_lora
from .pipeline import InfVSRPipeline
from .vae import FP8_OPTIONS, StreamingVAE, build_vae
from .weight_files import WEIGHT_FILES, default_models_dir, find_weight_file
from .weight_files import WEIGHT_SUFFIXES as WEIGHT_SUFFIXES  # re-exported: the nodes list files by it
from .weight_files import WeightFile as WeightFile  # re-exported, as before the table moved to weight_files
from .weights import WeightFileError, load_checked, read_state_dict, state_dict_problems


def _autodetect_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
FP8 = "fp8"
"""dtype="fp8": the DiT's linear layers in float8 (`fp8.py`), everything else in the device's default dtype."""


def parse_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """bf16 on a GPU and fp32 on the CPU unless asked otherwise."""
    if dtype is None or dtype in ("auto", FP8):  # fp8 computes in the default dtype around its fp8 products
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return DTYPES[dtype]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join([*DTYPES, FP8])}") from None


def load_pipeline(
    models_dir: str | os.PathLike | list[str | os.PathLike] | None = None,
    *,
    dit: str | os.PathLike | None = None,
    vae: str | os.PathLike | None = None,
    ram: str | os.PathLike | None = None,
    dape: str | os.PathLike | None = None,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    output_device: str | torch.device = "cpu",
    vae_tiling: str = "auto",
    vae_seams: str = "release",
    offload: str | None = None,
    low_vram: bool = False,
    spill_dir: str | os.PathLike | None = None,
    host_memory_gib: float | None = None,
    lora: str | os.PathLike | None = None,
) -> InfVSRPipeline:
    """Load the four published files (explicit paths win over `models_dir` look-up).

    A file not in `models_dir` (default: `default_models_dir()`) is taken from the local Hugging Face cache
    when a repository that publishes it is cached there (`weight_files.find_weight_file`); nothing is
    downloaded: `python -m infvsr_core download` (`download.download_weights`) does that on request.

    Each file is checked (keys and shapes against the architecture inferred from
    it) before anything is built, and every error names the file. `offload`
    ("none", "histories", "state", "all"; see `memory.OffloadPolicy`) keeps state
    in host memory between uses; `low_vram=True` is `offload="all"`. `vae_seams`
    ("release" or "smooth", see `vae.SEAMS`) sets how tiled frames are blended.
    Offloaded VAE histories that host memory cannot hold go to files (memory/spill.py) in `spill_dir`
    (default: the system's temporary folder), past a budget taken from the available memory
    (`memory.plan.plan_spill`), or past `host_memory_gib` when given.
    `lora`: a DiT LoRA file written by `python -m infvsr_core finetune`, merged into the DiT's weights here, once
    (`lora.merge_lora`); without it the DiT is the published one, untouched.
    """
    device = torch.device(device) if device is not None else _autodetect_device()
    fp8 = dtype == FP8
    dtype = parse_dtype("auto" if fp8 else dtype, device)
    if models_dir is None:
        folders = [default_models_dir()]
    elif isinstance(models_dir, (list, tuple)):
        folders = [Path(f) for f in models_dir]
    else:
        folders = [Path(models_dir)]
    explicit = {"dit": dit, "vae": vae, "ram": ram, "dape": dape}
    paths = {role: Path(p) if p is not None else find_weight_file(role, folders) for role, p in explicit.items()}

    adapter = read_lora(lora) if lora is not None else None  # checked before the large files are read
    states = {
        role: read_state_dict(
            paths[role],
            what=WEIGHT_FILES[role].description,
            unwrap=WEIGHT_FILES[role].unwrap,
            source=WEIGHT_FILES[role].source,
        )
        for role in ("dit", "vae", "ram", "dape")
    }

    dit_config = _dit_config(states["dit"], paths["dit"])
    fp8_file = is_fp8_state_dict(states["dit"])
    if adapter is not None:
        if fp8_file:
            raise UsageError(
                f"the LoRA '{lora}' cannot be merged into the fp8 copy '{paths['dit']}': load the full-precision "
                "DiT with dtype fp8 instead (the LoRA is merged first, then the DiT quantized)"
            )
        paths["lora"] = Path(lora)
        states["dit"] = merge_lora(states["dit"], adapter, what=f"the DiT checkpoint '{paths['dit']}'")
    with torch.device("meta"):
        dit_model = CausalWanDiT(dit_config)
    dit_model = dit_model.to_empty(device="cpu")
    if fp8_file:
        prepare_for_fp8_state(dit_model, torch.float32)
    load_checked(dit_model, states["dit"], what=WEIGHT_FILES["dit"].description, path=paths["dit"])
    if fp8 or fp8_file:
        if not fp8_file:
            quantize_dit(dit_model)  # from the file's own precision, not from a bf16 copy
        dit_model = cast_except_fp8(dit_model, device, dtype)
    else:
        dit_model = dit_model.to(device=device, dtype=dtype)

    vae_model = build_vae(states["vae"], path=paths["vae"], dtype=dtype).to(device)
    guidance = build_guidance(
        states["ram"], states["dape"], ram_path=paths["ram"], dape_path=paths["dape"], dtype=dtype
    ).to(device)
    del states

    streaming_vae = StreamingVAE(vae_model, tiling=vae_tiling)
    if fp8 or fp8_file:
        streaming_vae.fast_options = FP8_OPTIONS  # the VAE's float8 convs, where the kernel runs (Hopper)
    streaming_vae.set_seams(vae_seams)
    if host_memory_gib is not None:
        if spill_dir is None:
            raise UsageError("host_memory_gib caps the offloaded histories: give the spill_dir they go to past it")
        streaming_vae.set_spill(spill_dir, host_memory_gib)
    pipe = InfVSRPipeline(
        dit_model,
        streaming_vae,
        guidance,
        device=device,
        dtype=dtype,
        output_device=output_device,
        model_id=_model_id(paths, dtype, fp8 or fp8_file),
        offload="all" if low_vram else (offload or "none"),
    )
    pipe.spill_dir = Path(spill_dir) if spill_dir is not None else None
    return pipe


def _dit_config(state: dict[str, torch.Tensor], path: Path) -> DiTConfig:
    """`config.json` beside the checkpoint when present, else inferred from tensor shapes.

    config.json wins when present, so a wrong one is named as the culprit rather
    than letting the checkpoint's shape check blame the (good) checkpoint.
    """
    config_json = path.parent / "config.json"
    if not config_json.is_file():
        return DiTConfig.from_state_dict(state, path=path)
    config = _read_config_json(config_json, path)
    _check_config_matches(config, config_json, state, path)
    return config


def _read_config_json(config_json: Path, path: Path) -> DiTConfig:
    """`DiTConfig.from_json`, with every way the file can be wrong reported as a `WeightFileError` naming it."""
    advice = f"fix or delete it (without it the DiT's size is inferred from {path.name})"
    try:
        config = DiTConfig.from_json(config_json)
    except json.JSONDecodeError as exc:
        raise WeightFileError(
            f"{config_json}: not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg}); {advice}"
        ) from exc
    except UnicodeDecodeError as exc:
        raise WeightFileError(f"{config_json}: not a UTF-8 text file ({exc.reason}); {advice}") from exc
    except (TypeError, ValueError, AttributeError) as exc:
        found = f"{type(exc).__name__}: {exc}"
        raise WeightFileError(f"{config_json}: not a DiT config object ({found}); {advice}") from exc
    for field in fields(DiTConfig):
        value = getattr(config, field.name)
        if field.name == "eps":
            valid = isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0
        elif field.name == "patch_size":
            valid = len(value) == 3 and all(_positive_int(v) for v in value)
        else:
            valid = _positive_int(value)
        if not valid:
            kind = "three positive integers" if field.name == "patch_size" else "a positive number"
            raise WeightFileError(f"{config_json}: '{field.name}' is {value!r}, expected {kind}; {advice}")
    return config


def _positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


# The DiTConfig fields that set tensor shapes (num_heads and eps do not).
_SHAPE_FIELDS = ("dim", "ffn_dim", "num_layers", "in_dim", "out_dim", "patch_size", "freq_dim", "text_dim")


def _check_config_matches(config: DiTConfig, config_json: Path, state: dict[str, torch.Tensor], path: Path) -> None:
    """Blame config.json when the checkpoint is consistent on its own but not with it.

    A checkpoint that matches neither is left to `load_checked`, which names the checkpoint.
    """
    expected = _dit_shapes(config)
    if not state_dict_problems(state, expected):
        return
    try:
        inferred = DiTConfig.from_state_dict(state, path=path)
    except WeightFileError:
        return
    if state_dict_problems(state, _dit_shapes(inferred)):
        return
    differ = [name for name in _SHAPE_FIELDS if getattr(config, name) != getattr(inferred, name)]
    says = ", ".join(f"{name}={getattr(config, name)}" for name in differ)
    has = ", ".join(f"{name}={getattr(inferred, name)}" for name in differ)
    raise WeightFileError(
        f"{config_json}: this config.json does not match the DiT checkpoint '{path}' beside it "
        f"(it says {says} where the checkpoint has {has}; {_first_mismatch(state, expected, path.name)}); "
        f"fix config.json or delete it (without it the DiT's size is inferred from {path.name})"
    )


def _first_mismatch(state: dict[str, torch.Tensor], expected: dict[str, torch.Size], name: str) -> str:
    """The first tensor that gives the mismatch away, as a phrase."""
    for key, shape in expected.items():
        if key not in state:
            return f"{name} has no {key}, which config.json's size implies"
        if tuple(state[key].shape) != tuple(shape):
            return f"{name} has {key} of shape {tuple(state[key].shape)}, config.json implies {tuple(shape)}"
    extra = next(key for key in state if key not in expected)
    return f"{name} has {extra}, which config.json's size does not have"


def _dit_shapes(config: DiTConfig) -> dict[str, torch.Size]:
    """Every tensor shape of a DiT of this configuration (built on the meta device: no memory)."""
    with torch.device("meta"):
        model = CausalWanDiT(config)
    return {k: v.shape for k, v in model.state_dict().items()}


def _model_id(paths: dict[str, Path], dtype: torch.dtype, fp8: bool = False) -> str:
    digest = hashlib.sha1()
    for role in sorted(paths):
        stat = paths[role].stat()
        digest.update(f"{paths[role].resolve()}:{stat.st_size}:{stat.st_mtime_ns};".encode())
    digest.update(f"{dtype}{':fp8' if fp8 else ''}".encode())
    return digest.hexdigest()[:16]


def save_fp8_dit(dit_path: str | os.PathLike, output: str | os.PathLike) -> Path:
    """Write an fp8 copy of a DiT file (`fp8.quantize_dit`: float8 weights with their float32 scales, the rest
    in the file's precision) as safetensors; its size is inferred from its shapes as the original's is.
    Loaded like the original (`load_pipeline(dit=...)`), it gives the same DiT as quantizing at load time. The
    copy appears under its name only when complete."""
    import tempfile

    from safetensors.torch import save_file

    source, output = Path(dit_path), Path(output)
    if output.suffix != ".safetensors":
        raise UsageError(f"{output}: the fp8 copy is written as .safetensors (name it e.g. InfVSR_fp8.safetensors)")
    if output.resolve() == source.resolve():
        raise UsageError(f"{output}: the fp8 copy must not replace its source")
    spec = WEIGHT_FILES["dit"]
    state = read_state_dict(source, what=spec.description, unwrap=spec.unwrap, source=spec.source)
    if is_fp8_state_dict(state):
        raise UsageError(f"{source} is already an fp8 copy")
    with torch.device("meta"):
        model = CausalWanDiT(_dit_config(state, source))
    model = model.to_empty(device="cpu")
    load_checked(model, state, what=spec.description, path=source)
    del state
    quantized = {k: v.contiguous() for k, v in quantize_dit(model).state_dict().items()}
    output.parent.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(prefix=f".{output.name}.", suffix=".partial", dir=output.parent)
    os.close(fd)
    try:
        save_file(quantized, temp, metadata={"format": "pt", "infvsr": "fp8 copy of " + source.name})
        os.replace(temp, output)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    return output
