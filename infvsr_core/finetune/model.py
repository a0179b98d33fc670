"""The DiT made trainable: adapters or all weights, gradient checkpointing, kernels that have a backward.

Inference settings that training must not use: the fused CUDA ops (`fuse_elementwise`: the compiled FFN reads
`ffn.0.weight` directly, past a LoRA layer), CUDA graphs, and FlashAttention-3 (the forward-only wheel has no
backward): training runs the eager ops and PyTorch's SDPA.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..dit import CausalWanDiT
from .lora import LoRASettings, attach_lora


def enable_gradient_checkpointing(model: CausalWanDiT) -> None:
    """Recompute each block in the backward pass instead of keeping its activations (when gradients are on).

    The blocks' `forward` is wrapped per instance, so the module tree and state-dict keys stay those of the
    published file. Only each block's input stays in memory between the forward and the backward.
    """
    for block in model.blocks:
        if getattr(block, "_checkpointed", False):
            continue
        plain = block.forward

        def forward(*args, _plain=plain, **kwargs):
            if torch.is_grad_enabled():
                return checkpoint(_plain, *args, use_reentrant=False, **kwargs)
            return _plain(*args, **kwargs)

        block.forward = forward
        block._checkpointed = True


def make_trainable(
    model: CausalWanDiT, lora: LoRASettings | None, *, gradient_checkpointing: bool = True, seed: int = 0
) -> list[nn.Parameter]:
    """Prepare `model` for training; returns the parameters the optimizer updates: the LoRA adapters (`lora`,
    their A initialized from `seed`, without touching the global random state), or every weight (None: full
    fine-tuning; keep the model in float32 for that, the optimizer's master copy)."""
    model.fuse_elementwise = False
    model.cuda_graphs = False
    model.graphs.clear()
    if model.attention_backend in ("auto", "flash3"):
        model.attention_backend = "sdpa"
    if gradient_checkpointing:
        enable_gradient_checkpointing(model)
    if lora is not None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return attach_lora(model, lora)
    model.requires_grad_(True)
    return list(model.parameters())
