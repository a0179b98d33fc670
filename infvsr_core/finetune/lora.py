"""Trainable LoRA adapters on the DiT's linears, through peft, and their export to the LoRA file format.

peft replaces each targeted `nn.Linear` of the DiT by its LoRA layer (base weight frozen, A and B trainable,
output W x + alpha / rank * B A x); the model stays a `CausalWanDiT` and its forward is unchanged. Targets by
group: `self_attn` (q, k, v, o of the self-attention), `cross_attn` (the same of the cross-attention to the
visual prompt), `ffn` (both linears of the feed-forward): all three by default, in every block.

The adapters are written in the project's LoRA file format (`infvsr_core/lora.py`: module names of the DiT,
`lora_A` / `lora_B`, rank and alpha in the metadata), which `load_pipeline(lora=...)` merges at load with
`lora.merge_lora`; peft is needed for training only, never for inference.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import UsageError
from ..lora import LoRAWeights

ADAPTER = "default"
TARGET_GROUPS: dict[str, str] = {
    "self_attn": r"self_attn\.(q|k|v|o)",
    "cross_attn": r"cross_attn\.(q|k|v|o)",
    "ffn": r"ffn\.(0|2)",
}
"""Target group -> the linears it adapts in each block (a regular expression under `blocks.N.`)."""


@dataclass(frozen=True)
class LoRASettings:
    """Rank, alpha (the update is scaled by alpha / rank) and target groups (`TARGET_GROUPS`)."""

    rank: int = 16
    alpha: float = 16.0
    targets: tuple[str, ...] = ("self_attn", "cross_attn", "ffn")

    def __post_init__(self) -> None:
        unknown = [t for t in self.targets if t not in TARGET_GROUPS]
        if unknown or not self.targets:
            raise UsageError(
                f"LoRA targets {', '.join(unknown) or '(none)'}: choose from {', '.join(TARGET_GROUPS)}"
            )
        if self.rank < 1 or self.alpha <= 0:
            raise UsageError(f"LoRA rank must be >= 1 and alpha > 0, got rank {self.rank}, alpha {self.alpha}")

    def pattern(self) -> str:
        """peft's `target_modules` as a regular expression over full module names."""
        return r"blocks\.\d+\.(" + "|".join(TARGET_GROUPS[t] for t in self.targets) + ")"


def require_peft():
    """The peft package, or a UsageError saying how to get it."""
    try:
        import peft
    except ImportError:
        raise UsageError(
            "LoRA fine-tuning needs the peft package: pip install peft (or fine-tune all weights with --full)"
        ) from None
    return peft


def attach_lora(model: nn.Module, settings: LoRASettings) -> list[nn.Parameter]:
    """Add LoRA adapters to `model` in place (peft; B starts at zero, so the model is unchanged) and freeze the
    rest; returns the adapters' parameters, in module order. They are float32 whatever the model's dtype."""
    peft = require_peft()
    config = peft.LoraConfig(
        r=settings.rank,
        lora_alpha=settings.alpha,
        target_modules=settings.pattern(),
        lora_dropout=0.0,
        init_lora_weights=True,
    )
    model.requires_grad_(False)
    peft.inject_adapter_in_model(config, model, adapter_name=ADAPTER)
    params = []
    for _, layer in lora_layers(model):
        for part in (layer.lora_A[ADAPTER], layer.lora_B[ADAPTER]):
            part.float().requires_grad_(True)
            params.append(part.weight)
    if not params:
        raise UsageError(f"no linear of the model matches the LoRA targets {', '.join(settings.targets)}")
    return params


def lora_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(module name, peft LoRA layer) of every adapted linear."""
    from peft.tuners.lora import LoraLayer

    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            yield name, module


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters as the LoRA file holds them: `{module}.lora_A.weight` and `.lora_B.weight`, CPU copies."""
    state = {}
    for name, layer in lora_layers(model):
        state[f"{name}.lora_A.weight"] = layer.lora_A[ADAPTER].weight.detach().cpu().clone().contiguous()
        state[f"{name}.lora_B.weight"] = layer.lora_B[ADAPTER].weight.detach().cpu().clone().contiguous()
    return state


def load_lora_into(model: nn.Module, lora: LoRAWeights, settings: LoRASettings) -> None:
    """Copy a LoRA file's pairs into the adapters attached with `settings` (to resume, or to start stage 2 from
    stage 1); the modules, rank and alpha must be the same."""
    where = f"LoRA file '{lora.path}'" if lora.path is not None else "the LoRA"
    if lora.rank != settings.rank or lora.alpha != settings.alpha:
        raise UsageError(
            f"{where} has rank {lora.rank} and alpha {lora.alpha:g}, the adapters being trained rank "
            f"{settings.rank} and alpha {settings.alpha:g}: pass the same --lora-rank and --lora-alpha"
        )
    layers = dict(lora_layers(model))
    if set(layers) != set(lora.pairs):
        extra, missing = sorted(set(lora.pairs) - set(layers)), sorted(set(layers) - set(lora.pairs))
        raise UsageError(
            f"{where} adapts other modules than the targets {', '.join(settings.targets)} "
            f"(only in the file: {extra[:3]}; only in the targets: {missing[:3]}): pass the same --lora-targets"
        )
    with torch.no_grad():
        for name, (a, b) in lora.pairs.items():
            layers[name].lora_A[ADAPTER].weight.copy_(a)
            layers[name].lora_B[ADAPTER].weight.copy_(b)


@contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[None]:
    """Run `model` as its base weights alone (stage 2: the frozen real-score model is the fake-score model
    without its adapters, so both share one copy of the teacher's weights)."""
    layers = [layer for _, layer in lora_layers(model)]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)
