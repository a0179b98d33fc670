"""LoRA files for the DiT: their format, their checks, and the one function that folds a LoRA pair into a weight.

A fine-tuned adapter (`python -m infvsr_core finetune`) is a `.safetensors` file with, for each adapted linear
of the DiT (`blocks.3.self_attn.q`, `blocks.3.ffn.0`, ...), the pair `{module}.lora_A.weight` (rank, in) and
`{module}.lora_B.weight` (out, rank), and string metadata: `format` = "infvsr-lora", `rank`, `alpha` (the update
is W + alpha / rank * B @ A, as in peft), `targets`, and the training configuration. Loading merges it into the
DiT's weights once (`merge_lora`), as the DAPE LoRA is merged into RAM's Swin (`guidance.merge_dape`), so
inference runs the plain DiT at its usual speed.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import WeightFileError
from .weights import StateDict, read_state_dict

LORA_FORMAT = "infvsr-lora"
"""The `format` metadata value of the files `finetune` writes."""
LORA_WHAT = "the InfVSR LoRA file"
_PAIR = re.compile(r"^(?P<module>.+)\.(?P<part>lora_A|lora_B)\.weight$")


def merge_lora_weight(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    """`weight + scaling * b @ a` in float32: one LoRA pair folded into the weight it adapts.

    `weight` (out, in), `a` (rank, in), `b` (out, rank). The one place LoRA updates are merged: the DAPE LoRA of
    RAM's Swin and the DiT's fine-tuned adapters both go through it.
    """
    return weight.float() + (b.float() @ a.float()) * scaling


@dataclass(frozen=True)
class LoRAWeights:
    """A LoRA file's pairs by module name, with the rank and alpha that scale them."""

    pairs: dict[str, tuple[torch.Tensor, torch.Tensor]]
    """module -> (A (rank, in), B (out, rank))."""
    rank: int
    alpha: float
    metadata: dict[str, str] = field(default_factory=dict)
    path: Path | None = None

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


def lora_from_state_dict(
    state: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str] | None,
    *,
    path: str | os.PathLike | None = None,
) -> LoRAWeights:
    """Group `{module}.lora_A.weight` / `lora_B.weight` keys into pairs and read rank and alpha from the metadata.

    Every key must belong to a pair, every pair must be complete and of the metadata's rank."""
    where = f"{LORA_WHAT} ('{path}')" if path is not None else LORA_WHAT
    metadata = dict(metadata or {})
    if metadata.get("format") != LORA_FORMAT:
        raise WeightFileError(
            f"{where}: its metadata names no '{LORA_FORMAT}' format (found {metadata.get('format')!r}); "
            "use a LoRA written by `python -m infvsr_core finetune`"
        )
    try:
        rank, alpha = int(metadata["rank"]), float(metadata["alpha"])
    except (KeyError, ValueError) as exc:
        raise WeightFileError(f"{where}: its metadata lacks a valid 'rank' and 'alpha' ({exc})") from None
    if rank < 1:
        raise WeightFileError(f"{where}: rank {rank} in its metadata; expected a positive rank")
    found: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        match = _PAIR.match(key)
        if match is None:
            raise WeightFileError(f"{where}: unexpected key '{key}' (expected '<module>.lora_A.weight' / 'lora_B')")
        found.setdefault(match["module"], {})[match["part"]] = tensor
    if not found:
        raise WeightFileError(f"{where}: holds no LoRA pairs")
    pairs = {}
    for module, parts in found.items():
        if set(parts) != {"lora_A", "lora_B"}:
            missing = ({"lora_A", "lora_B"} - set(parts)).pop()
            raise WeightFileError(f"{where}: '{module}.{missing}.weight' is missing (each module needs both)")
        a, b = parts["lora_A"], parts["lora_B"]
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != rank or b.shape[1] != rank:
            raise WeightFileError(
                f"{where}: '{module}' has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}; "
                f"expected (rank, in) and (out, rank) with the metadata's rank {rank}"
            )
        pairs[module] = (a, b)
    return LoRAWeights(pairs, rank, alpha, metadata, Path(path) if path is not None else None)


def read_lora(path: str | os.PathLike) -> LoRAWeights:
    """A LoRA `.safetensors` file, checked (its format, pairs and rank); errors name the file."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise WeightFileError(f"{LORA_WHAT} '{path}': expected a .safetensors file (as `finetune` writes)")
    state = read_state_dict(path, what=LORA_WHAT)
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
    return lora_from_state_dict(state, metadata, path=path)


def merge_lora(state: Mapping[str, torch.Tensor], lora: LoRAWeights, *, what: str) -> StateDict:
    """The DiT state dict with every LoRA pair folded into its `{module}.weight` (float32 merged weights; the
    others untouched). A module the state dict lacks, or of other shapes, is an error naming both files."""
    where = f"{LORA_WHAT} ('{lora.path}')" if lora.path is not None else LORA_WHAT
    merged = dict(state)
    for module, (a, b) in lora.pairs.items():
        key = f"{module}.weight"
        if key not in state:
            raise WeightFileError(f"{where}: adapts '{module}', which {what} does not have (a LoRA of another model?)")
        weight = state[key]
        if weight.ndim != 2 or tuple(weight.shape) != (b.shape[0], a.shape[1]):
            raise WeightFileError(
                f"{where}: '{module}' pairs lora_A {tuple(a.shape)} with lora_B {tuple(b.shape)}, but {what} has "
                f"'{key}' of shape {tuple(weight.shape)} (a LoRA of a model of another size?)"
            )
        merged[key] = merge_lora_weight(weight, a, b, lora.scaling)
    return merged


def lora_metadata(rank: int, alpha: float, targets: list[str], **extra: object) -> dict[str, str]:
    """The metadata strings of a LoRA file (safetensors metadata holds strings only)."""
    meta = {"format": LORA_FORMAT, "rank": str(rank), "alpha": repr(float(alpha)), "targets": ",".join(targets)}
    meta.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in extra.items()})
    return meta
