"""The causal state of a scene's VAE calls: diffusers' per-conv `feat_cache` lists, whole-frame or per tile.

Why a separate object: the histories belong to the caller's scene, not to the
VAE. They survive across the chunks of a scene (so chunked equals whole-clip),
are dropped at a scene cut, and are forked with a session; the VAE only reads
and replaces their entries.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from ..memory.host import copy_cache
from .tiles import TileRegion


def cache_nbytes(cache: list) -> int:
    """Bytes held by the tensors of one feat_cache list (entries may also be None or "Rep")."""
    return sum(t.numel() * t.element_size() for t in cache if isinstance(t, torch.Tensor))


def full_resolution_start(cache: list) -> int:
    """The index of the first entry at the cache's largest spatial size (its full-resolution convs'), or its
    length if it holds no tensor. The decoder reads those entries last."""
    sizes = [t.shape[-2] * t.shape[-1] if isinstance(t, torch.Tensor) else -1 for t in cache]
    return sizes.index(max(sizes)) if any(size >= 0 for size in sizes) else len(cache)


@dataclass
class TileHistory:
    """Encoder and decoder `feat_cache` lists of one spatial tile (entries: None, "Rep" or tensors)."""

    encoder_cache: list = field(default_factory=list)
    decoder_cache: list = field(default_factory=list)

    def nbytes(self) -> int:
        return cache_nbytes(self.encoder_cache) + cache_nbytes(self.decoder_cache)

    def fork(self) -> TileHistory:
        """An independent copy; cached tensors are shared, as the VAE only ever replaces them."""
        return TileHistory(copy_cache(self.encoder_cache), copy_cache(self.decoder_cache))


@dataclass
class VAEHistory:
    """Causal VAE state of one scene; start a new one at every scene cut.

    `encoder_cache`/`decoder_cache` are diffusers' per-conv `feat_cache` lists
    for the untiled case; when the frame is tiled, each tile has its own pair
    in `tiles` (keyed by its latent region) and the top-level lists stay unused.
    `frame_size` (pixels) and the tiling decision are fixed by the scene's first
    chunk. The caches stay on the device the VAE runs on, or, with the VAE's
    `history_device="cpu"`, in host memory between uses (HostCache lists).
    Under `dtype="fp8"` the entries of the float8 convs are float8 (their
    norm's static scale: `FastForwardOptions.fp8_history`), for the fast
    forward only.
    """

    encoder_cache: list = field(default_factory=list)
    decoder_cache: list = field(default_factory=list)
    encoded_first: bool = False
    decoded_first: bool = False
    frame_size: tuple[int, int] | None = None
    tiles: dict[TileRegion, TileHistory] | None = None

    @property
    def tiled(self) -> bool:
        return self.tiles is not None

    def nbytes(self) -> int:
        """Bytes held by the cached activations (constant once a scene is past its second chunk)."""
        total = cache_nbytes(self.encoder_cache) + cache_nbytes(self.decoder_cache)
        return total + sum(t.nbytes() for t in (self.tiles or {}).values())

    def fork(self) -> VAEHistory:
        """An independent copy; cached tensors are shared, as the VAE only ever replaces list entries."""
        tiles = None if self.tiles is None else {region: tile.fork() for region, tile in self.tiles.items()}
        return replace(
            self,
            encoder_cache=copy_cache(self.encoder_cache),
            decoder_cache=copy_cache(self.decoder_cache),
            tiles=tiles,
        )
