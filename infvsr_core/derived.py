"""Tensors derived from weights (packed, padded, quantized forms, scales), cached beside them.

Why: the fast VAE runs its convs from weights in other layouts than the
checkpoint's (split_conv's packing, float8 with scales, zero-padded channels),
and the DiT's RoPE kernel takes per-head float8 scales known from its norm's
weight; building them once per weight, and rebuilding when the weight is
replaced, moved or changed in place, keeps the weights themselves the one
source of truth.
"""

from __future__ import annotations

import torch
from torch import nn

_DERIVED_NAMES: set[str] = set()
"""The attribute names `derived` caches under (for `release_derived`)."""


def derived(conv: nn.Module, name: str, build, *args, source: str = "weight"):
    """build(conv.<source>, *args), cached on the module as `name` until that tensor is replaced or changed."""
    return derived_from(conv, name, getattr(conv, source), build, *args)


def derived_from(owner: object, name: str, w: torch.Tensor, build, *args):
    """build(w, *args), cached on `owner` (a module, or w itself where no module is at hand) as `name` until w
    is replaced, moved (its address) or changed in place (its version).

    Inference tensors (weights loaded under torch.inference_mode, as in ComfyUI) have no version counter.
    """
    key = (w.data_ptr(), None if w.is_inference() else w._version, w.dtype, w.device, *args)
    cached = getattr(owner, name, None)
    if cached is None or cached[0] != key:
        _DERIVED_NAMES.add(name)
        cached = (key, build(w, *args))
        setattr(owner, name, cached)
    return cached[1]


def release_derived(module: nn.Module) -> int:
    """Drop every weight `derived` cached on `module` or its submodules; the bytes dropped.

    Why: the cache is a plain attribute, so it stays where it was built when the weights move (`module.to()`
    moves parameters and buffers only). Its key makes a moved weight rebuild it, but the old copy would hold
    device memory until then: whoever moves the VAE's weights off the device (ComfyUI evicting it) calls this.
    """
    dropped = 0
    for sub in module.modules():
        for name in _DERIVED_NAMES:
            cached = sub.__dict__.pop(name, None)
            if cached is not None:
                tensors = cached[1] if isinstance(cached[1], tuple) else (cached[1],)
                dropped += sum(t.numel() * t.element_size() for t in tensors)
    return dropped
