"""Which stream state and weights live in host memory between uses: the offload modes, as one policy object.

Why a policy: one mode name ("none", "histories", "state", "all": what
`load_pipeline(offload=...)`, `InfVSRPipeline.offload`, the command line's
`--offload` and the model loader node's `state_offload` take) decides things
in several places (the VAE's histories and calls, the DiT's KV cache and CUDA
graphs, which weights move). Each place reads the field it needs here instead
of comparing mode names, so a mode's meaning is written once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

OffloadMode = Literal["none", "histories", "state", "all"]
OFFLOAD_MODES: tuple[OffloadMode, ...] = ("none", "histories", "state", "all")
AUTO_MODE = "auto"
"""Not a policy but a choice of one: the pipeline picks the fastest mode that fits (`memory.plan.choose_mode`)."""
OFFLOAD_CHOICES: tuple[str, ...] = (AUTO_MODE, *OFFLOAD_MODES)
"""What the command line and the loader node offer."""
"""The modes from the most device memory to the least; each keeps in host memory what the one before keeps."""


@dataclass(frozen=True)
class OffloadPolicy:
    """What lives in host memory between uses (made from a mode name by `from_mode`); the one description of the
    offload modes.

    Host memory is page-locked on CUDA and copies run on side streams, waited for
    per tensor where it is read, so they overlap the compute. Moving state gives
    bit for bit the same frames; on the GPU the modes also group the VAE's calls
    differently and only "none" replays CUDA graphs (`StreamingVAE._plan`,
    `dit_cuda_graphs`): the same arithmetic, so last-bit differences at most.

    - "none": everything stays on the device (the fastest, the most memory); the
      DiT may replay its blocks as CUDA graphs.
    - "histories": the VAE's causal histories (the largest state), the
      encoder's while the DiT and the decoder run and vice versa, and every
      tile's but the one being processed; the decoder's upload overlaps the DiT.
    - "state": also the DiT's rolling KV cache, streamed through the DiT a
      layer at a time, and the visual guidance's weights outside prompt
      extraction.
    - "all" (low VRAM): also the DiT's weights outside the DiT step, no upload
      ahead of its use, and the VAE's smallest calls, so that only the running
      stage's state is on the device.

    With the histories in host memory, the VAE's full-resolution stages also run a
    few frames at a time (`StreamingVAE.piece_frames`), for a lower peak. Each
    mode's memory and speed: the README's speed table.
    """

    mode: str = "none"
    """The mode this policy was made from (`InfVSRPipeline.offload` reports it)."""
    vae_histories_on_host: bool = False
    """The VAE's causal histories between uses (`StreamingVAE.history_device` "cpu")."""
    kv_cache_on_host: bool = False
    """The DiT's KV cache between chunks, streamed through the DiT layer by layer (`memory.kv.WindowedUpload`)."""
    guidance_weights_on_host: bool = False
    """The visual guidance's weights, on the device only while it extracts a prompt."""
    dit_weights_on_host: bool = False
    """The DiT's weights, on the device only for the DiT step."""
    prefetch: bool = True
    """Uploads queued ahead of their use (the next tile's history under the current tile; the decoder's history
    under the DiT): faster, but two stages' state on the device at once."""
    lean: bool = False
    """The VAE's smallest calls (tiles in diffusers' calls, full-resolution stages in the smallest pieces)."""
    pinned: bool = True
    """Host copies in page-locked memory, moved asynchronously; False: pageable memory and synchronous copies
    (an A/B for measurements, or a host that cannot lock that much)."""

    @classmethod
    def from_mode(cls, mode: str) -> OffloadPolicy:
        """The policy of a mode name of `OFFLOAD_MODES` (a ValueError names the modes otherwise)."""
        if mode not in OFFLOAD_MODES:
            raise ValueError(f"offload must be one of {', '.join(OFFLOAD_MODES)}, got {mode!r}")
        rank = OFFLOAD_MODES.index(mode)
        return cls(
            mode=mode,
            vae_histories_on_host=rank >= 1,
            kv_cache_on_host=rank >= 2,
            guidance_weights_on_host=rank >= 2,
            dit_weights_on_host=rank >= 3,
            prefetch=rank < 3,
            lean=rank >= 3,
        )

    @property
    def all_resident(self) -> bool:
        """Whether nothing is kept in host memory (the fast mode)."""
        return not (
            self.vae_histories_on_host
            or self.kv_cache_on_host
            or self.guidance_weights_on_host
            or self.dit_weights_on_host
        )

    @property
    def dit_cuda_graphs(self) -> bool:
        """Whether the DiT may replay its blocks as CUDA graphs: their static buffers hold a KV cache's worth of
        device memory, worth it only in the fast mode, where the DiT's launches are what the GPU waits on."""
        return self.all_resident

    @property
    def prefetch_decoder_under_dit(self) -> bool:
        """Whether the decoder history's upload starts under the DiT. Not with the KV cache streamed: its
        per-layer uploads would queue behind the history's copies and stall every layer; the history then comes
        in at decode time, entry by entry as the decoder reaches them."""
        return self.prefetch and self.vae_histories_on_host and not self.kv_cache_on_host

    def lighter_mode(self) -> str | None:
        """The mode to suggest after running out of device memory: the next of "state" and "all" past this one
        (None: none is lighter). "histories" is not suggested: "state" needs less memory and was as fast or
        faster where measured (bench/RESULTS.md)."""
        rank = OFFLOAD_MODES.index(self.mode) if self.mode in OFFLOAD_MODES else -1
        lighter = [mode for mode in ("state", "all") if OFFLOAD_MODES.index(mode) > rank]
        return lighter[0] if lighter else None
