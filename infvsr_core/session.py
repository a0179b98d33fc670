"""Session state: everything that persists between chunks of one stream.

The state is a plain, typed object so that callers (the command line, the
ComfyUI nodes, a server keeping a stream open between queue runs) can hold it,
pass it along and resume. Only the pipeline mutates it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from .dit import KVCache
from .memory.host import PendingFetch, copy_cache
from .schedule import chunk_length
from .vae import VAEHistory


@dataclass
class SceneState:
    """The causal state of the current scene; replaced wholesale at a scene cut."""

    vae_history: VAEHistory
    """Encoder and decoder per-convolution temporal histories (per tile when tiled)."""
    kv_cache: KVCache | None = None
    """Keys and values of the previous chunk only (the rolling cache)."""
    latent_frames: int = 0
    """Latent frames already processed in this scene: the next chunk's RoPE time offset."""
    frames: int = 0
    """Low-resolution frames of this scene already upscaled."""


@dataclass
class InfVSRSession:
    """One video stream being upscaled: feed it frames in any batch sizes, then close it.

    Created by `InfVSRPipeline.new_session`; advanced by `push`, `cut` and `close`.
    """

    model_id: str
    """Identity of the pipeline that owns the state (caches are meaningless for another model)."""
    scale: int = 4
    prompt: torch.Tensor | None = None
    """The DAPE visual prompt (1, 145, 512) shared by the scene's chunks; None until the first frame."""
    prompt_fixed: bool = False
    """True when the caller supplied the prompt: it is then kept across scene cuts."""
    reference_index: int = 0
    """Stream index of the frame the current prompt was taken from."""
    scene: SceneState | None = None
    """None before the first chunk of a scene (start of stream or after a cut)."""
    pending: torch.Tensor | None = None
    """Low-resolution frames (T, H, W, 3) received but not yet upscaled: fewer than one chunk."""
    held: list[PendingFetch] = field(default_factory=list)
    """Chunks upscaled but not yet returned (a deferred push), their frames on the way to host memory."""
    input_size: tuple[int, int] | None = None
    """(height, width) of the low-resolution frames, fixed by the first frame."""
    frames_in: int = 0
    frames_out: int = 0
    scenes: int = 0
    closed: bool = False
    interrupted: str | None = None
    """Why a chunk stopped half-way (its caches are then incomplete and the session unusable), else None."""
    stats: dict[str, float] = field(default_factory=dict)

    @property
    def pending_frames(self) -> int:
        return 0 if self.pending is None else int(self.pending.shape[0])

    @property
    def next_chunk_length(self) -> int:
        """Frames the next chunk takes: 9 at the start of a scene, 12 after."""
        return chunk_length(self.scene is None)

    def fork(self) -> InfVSRSession:
        """An independent copy of the stream state (for callers that must not see a session change,
        e.g. ComfyUI's cached node outputs). Tensors are shared: the pipeline never writes into them,
        it only replaces or drops list entries, so the lists themselves are copied."""
        scene = None
        if self.scene is not None:
            kv = self.scene.kv_cache
            if kv is not None:
                kv = kv.map(copy_cache)
            scene = replace(self.scene, vae_history=self.scene.vae_history.fork(), kv_cache=kv)
        return replace(self, scene=scene, held=list(self.held), stats=dict(self.stats))

    def state_bytes(self) -> int:
        """Bytes held by the causal state (KV cache, VAE histories, prompt, pending frames)."""
        total = 0
        if self.scene is not None:
            total += self.scene.vae_history.nbytes()
            if self.scene.kv_cache is not None:
                total += sum(
                    t.numel() * t.element_size() for t in self.scene.kv_cache.keys + self.scene.kv_cache.values
                )
        for tensor in (self.prompt, self.pending):
            if tensor is not None:
                total += tensor.numel() * tensor.element_size()
        return total
