"""The causal Wan2.1 VAE of InfVSR, streamed chunk by chunk (SPEC sections 1, 2, 5, 6).

- weights.py: the release's `Wan2.1_VAE.pth` into diffusers' `AutoencoderKLWan` (key renaming, config, random
  test weights)
- tiles.py: the spatial tiles of large frames and their blending weights (`SEAMS`)
- history.py: the causal state a scene carries from chunk to chunk (`VAEHistory`, `TileHistory`)
- stream.py: `StreamingVAE`, which encodes and decodes chunks with that state
- fast_forward.py, fast_blocks.py: the GPU's faster forward over the same weights and state
- fp8_convs.py: which of its causal convs run in float8 under dtype "fp8", and their float reference
- (../derived.py: the weights' packed / padded / quantized forms that forward uses, cached on the modules)
"""

from __future__ import annotations

from .fast_blocks import FP8_OPTIONS
from .fast_forward import FastForwardOptions
from .history import TileHistory, VAEHistory
from .stream import FULL_RES_FRAMES, WHOLE_CHUNK_PIXELS, WHOLE_CHUNK_PIXELS_FP8, CallPlan, StreamingVAE, Tiling
from .tiles import SEAMS, TileRegion, tile_regions
from .weights import (
    SPATIAL_FACTOR,
    TEMPORAL_FACTOR,
    TINY_VAE_BASE_DIM,
    WAN21_LATENTS_MEAN,
    WAN21_LATENTS_STD,
    build_vae,
    random_vae_state_dict,
    vae_config_from_state_dict,
    vae_state_dict_to_original,
)

__all__ = [
    "FP8_OPTIONS",
    "FULL_RES_FRAMES",
    "SEAMS",
    "SPATIAL_FACTOR",
    "TEMPORAL_FACTOR",
    "TINY_VAE_BASE_DIM",
    "WAN21_LATENTS_MEAN",
    "WAN21_LATENTS_STD",
    "WHOLE_CHUNK_PIXELS",
    "WHOLE_CHUNK_PIXELS_FP8",
    "CallPlan",
    "FastForwardOptions",
    "StreamingVAE",
    "TileHistory",
    "TileRegion",
    "Tiling",
    "VAEHistory",
    "build_vae",
    "random_vae_state_dict",
    "tile_regions",
    "vae_config_from_state_dict",
    "vae_state_dict_to_original",
]
