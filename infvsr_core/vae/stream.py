"""The causal Wan2.1 VAE of InfVSR, streamed chunk by chunk (SPEC sections 1, 2, 5, 6).

The network is diffusers' `AutoencoderKLWan` (weights.py loads the release's
file into it); `StreamingVAE` drives its encoder and decoder the way the
InfVSR release does, with the causal histories held by the caller.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Literal

import torch
from diffusers import AutoencoderKLWan
from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d

from ..memory.host import HostMemory, SpilledCache
from ..memory.policy import OffloadPolicy
from ..memory.spill import DiskSpill
from .fast_forward import FastForwardOptions, fast_decoder, fast_encoder, prepare_channels_last, supports_fast_forward
from .history import TileHistory, VAEHistory, full_resolution_start
from .tiles import SEAMS, tile_regions, tile_weights
from .weights import SPATIAL_FACTOR, TEMPORAL_FACTOR

# Largest frame (output pixels, per tile when tiled) for which whole_chunks="auto" groups a chunk's VAE calls:
# above it the fewer launches gain too little for the larger activations (measured in bench/RESULTS.md).
WHOLE_CHUNK_PIXELS = 600_000
# The same for the float8 forward with float8 histories (`FastForwardOptions.fp8_history`, `dtype="fp8"`): its
# staged buffers and histories take half the bytes, so whole-chunk calls at 720p still peak below the split calls
# of the float8 forward before it (bench/bench_pipeline.py --dtype fp8 --vae-calls whole|split --fp8-history).
WHOLE_CHUNK_PIXELS_FP8 = 1_000_000
# Frames per piece of the full-resolution stages when splitting (`piece_frames`): their causal caches carry the
# history between pieces exactly, so smaller pieces only lower the peak memory.
FULL_RES_FRAMES = 2

Tiling = Literal["auto", "always", "never"]
CallHook = Callable[[str, tuple[int, int]], AbstractContextManager[Any]]
"""`StreamingVAE.call_hook`: given "encode" or "decode" and the call's input (height, width), its context."""


@dataclass(frozen=True)
class CallPlan:
    """How the encoder or decoder runs over one chunk (of one tile, when tiled); `StreamingVAE._plan` decides."""

    fast: bool  # the fast forward (fast_forward.py) rather than diffusers' modules
    whole_chunks: bool  # a chunk's frames in one call (after a scene's first frame) rather than diffusers' grouping
    piece_frames: int | None  # fast forward: frames per piece of the full-resolution stages (None: unsplit)

    def spans(self, frames: int, first: bool, per_latent: int) -> list[tuple[int, int]]:
        """(start, stop) of each call over `frames` input frames, `per_latent` of them per latent frame (encoder:
        TEMPORAL_FACTOR, decoder: 1). A scene's first frame goes alone: the causal timeline starts with it."""
        start = 1 if first else 0
        step = per_latent * (max((frames - start) // per_latent, 1) if self.whole_chunks else 1)
        return ([(0, 1)] if first else []) + [(i, i + step) for i in range(start, frames, step)]


def _check_settings(
    history_device: str | None, tiling: str, threshold_axes: str, tile_size: int, tile_stride: int, tile_margin: int
) -> None:
    if history_device not in (None, "cpu"):
        raise ValueError(f"history_device must be None (the VAE's device) or 'cpu', got {history_device!r}")
    if tiling not in ("auto", "always", "never"):
        raise ValueError(f"tiling must be 'auto', 'always' or 'never', got {tiling!r}")
    if threshold_axes not in ("height", "either"):
        raise ValueError(f"threshold_axes must be 'height' or 'either', got {threshold_axes!r}")
    if not 0 < tile_stride <= tile_size:
        raise ValueError(f"tile stride must be in (0, tile size]; got size {tile_size}, stride {tile_stride}")
    if tile_margin < 0 or (tile_margin and 2 * tile_margin >= tile_size - tile_stride):
        raise ValueError(
            f"tile margin must be >= 0 and leave a ramp inside the overlap (2 x margin < size - stride = "
            f"{tile_size - tile_stride}); got {tile_margin}"
        )


class StreamingVAE:
    """Encode/decode the chunks of a scene through diffusers' AutoencoderKLWan, carrying the causal history.

    Why streamed: InfVSR processes a video chunk by chunk, and the VAE's causal
    convs read the last frames of the previous chunk. Those per-conv caches
    (`feat_cache`) live in a `VAEHistory` owned by the caller's scene and
    survive across its chunks, so a scene streamed in chunks gives exactly the
    whole-clip result while memory stays constant. On top of that: spatial
    tiling of large frames as in the release (tiles.py), histories kept in
    host memory between uses (`policy`), and on CUDA a faster forward over the
    same weights and caches (fast_forward.py); `_plan` decides how each call
    runs. `call_hook` (None by default) is for measurements (bench/): each
    encoder or decoder call over a chunk (a tile's, when tiled) runs inside
    `with call_hook("encode" or "decode", (height, width) of its input):`.
    """

    def __init__(
        self,
        vae: AutoencoderKLWan,
        *,
        tiling: Tiling = "auto",
        tile_threshold: int = 1024,
        tile_size: int = 128,
        tile_stride: int = 110,
        tile_margin: int = 0,
        threshold_axes: Literal["height", "either"] = "height",
        fast: bool | None = None,
        history_device: Literal["cpu"] | None = None,
        prefetch: bool = True,
        lean: bool = False,
        piece_frames: int | None | Literal["auto"] = "auto",
        whole_chunks: bool | Literal["auto"] = "auto",
        fast_options: FastForwardOptions = FastForwardOptions(),
    ) -> None:
        """Tiling (SPEC section 5): `tiling="auto"` tiles a scene whose output frames are taller than
        `tile_threshold` pixels, as the release does; `threshold_axes="either"` also tiles frames only wider than
        that (not the release's: less memory on very wide video). "always" tiles any frame (one that fits a tile
        gives the untiled result), "never" none. Tiles are `tile_size` latent pixels at `tile_stride`, each with
        its own histories, blended over the overlaps (tiles.py); `tile_margin` > 0 (not the release's) gives each
        tile's outermost latent pixels on inner edges zero weight, for smoother seams (`set_seams`).

        Host memory: `history_device="cpu"` keeps the histories in host memory (pinned on CUDA) between uses, as
        the release does with tiles: the encoder's while the DiT and the decoder run and vice versa, and every
        tile's but the one being processed. Copies run on side streams and are waited for per cache entry; with
        `prefetch`, the next tile's history is uploaded while the current tile runs (`_blend`) and the pipeline
        starts the decoder's early (`prefetch_decoder`). The values are bit for bit those of the resident path.
        These three settings make the VAE's first `policy`; a pipeline replaces it with its own.

        `fast` (None: on CUDA), `lean` (the smallest calls: the low-VRAM policy's),
        `piece_frames` and `whole_chunks` (fast forward only): see `_plan`. `fast_options`: the fast forward's
        switches, read at every call (the benchmarks replace them between runs).
        """
        _check_settings(history_device, tiling, threshold_axes, tile_size, tile_stride, tile_margin)
        self.vae = vae
        self.tiling = tiling
        self.tile_threshold = tile_threshold
        self.tile_size = tile_size
        self.tile_stride = tile_stride
        self.tile_margin = tile_margin
        self.threshold_axes = threshold_axes
        self.fast = fast
        self.fast_options = fast_options
        self.piece_frames = piece_frames
        self.whole_chunks = whole_chunks
        self.spill: DiskSpill | None = None
        # The next tile's decoder history is prefetched without its full-resolution entries (`_prefetch`).
        self.defer_full_res = True
        self.call_hook: CallHook | None = None
        self._host_memory = HostMemory()
        self.policy = OffloadPolicy(
            mode="none" if history_device is None else "histories",
            vae_histories_on_host=history_device is not None,
            prefetch=prefetch,
            lean=lean,
        )
        self.z_dim = int(vae.config.z_dim)
        self._encoder_convs = sum(isinstance(m, WanCausalConv3d) for m in vae.encoder.modules())
        self._decoder_convs = sum(isinstance(m, WanCausalConv3d) for m in vae.decoder.modules())
        self._mean = torch.tensor(vae.config.latents_mean, dtype=torch.float32).view(1, -1, 1, 1, 1)
        # The release multiplies by 1/std (computed in float32, then cast), which
        # rounds differently from dividing by std in bf16.
        self._inv_std = 1.0 / torch.tensor(vae.config.latents_std, dtype=torch.float32).view(1, -1, 1, 1, 1)
        self._stats_on: dict[tuple[torch.device, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}

    # ----------------------------------------------------------------- state

    @property
    def policy(self) -> OffloadPolicy:
        """Where the histories live between uses and how they move: the VAE reads `vae_histories_on_host`,
        `prefetch`, `lean` and `pinned` (`OffloadPolicy`). `InfVSRPipeline.policy` sets it to the pipeline's."""
        return self._policy

    @policy.setter
    def policy(self, policy: OffloadPolicy) -> None:
        self._host_memory.pin_memory = policy.pinned
        self._policy = policy

    @property
    def history_device(self) -> Literal["cpu"] | None:
        """Where the histories live between uses: "cpu" (host memory) or None (the VAE's device); see `policy`."""
        return "cpu" if self._policy.vae_histories_on_host else None

    @property
    def prefetch(self) -> bool:
        """Whether uploads are queued ahead of their use (`policy.prefetch`)."""
        return self._policy.prefetch

    @property
    def lean(self) -> bool:
        """Whether the calls are the smallest (`policy.lean`)."""
        return self._policy.lean

    def set_seams(self, name: str) -> None:
        """Tile stride and margin from `SEAMS` by name; takes effect for scenes started after."""
        if name not in SEAMS:
            raise ValueError(f"seams must be one of {', '.join(SEAMS)}, got {name!r}")
        if self.tile_size != 128:
            raise ValueError(f"the seam settings are for 128-pixel latent tiles, not {self.tile_size}")
        self.tile_stride, self.tile_margin = SEAMS[name]

    def new_history(self) -> VAEHistory:
        """Empty causal state for a new scene."""
        return VAEHistory(encoder_cache=[None] * self._encoder_convs, decoder_cache=[None] * self._decoder_convs)

    def _new_tile(self) -> TileHistory:
        return TileHistory([None] * self._encoder_convs, [None] * self._decoder_convs)

    def wants_tiling(self, height: int, width: int) -> bool:
        """Whether a scene with output frames of height x width pixels is tiled."""
        if self.tiling != "auto":
            return self.tiling == "always"
        if self.threshold_axes == "either":
            return max(height, width) > self.tile_threshold
        return height > self.tile_threshold

    def _fix_frame(self, history: VAEHistory, height: int, width: int) -> None:
        if history.frame_size is None:
            history.frame_size = (height, width)
            if self.wants_tiling(height, width):
                regions = tile_regions(
                    height // SPATIAL_FACTOR, width // SPATIAL_FACTOR, self.tile_size, self.tile_stride
                )
                history.tiles = {region: self._new_tile() for region in regions}
        elif history.frame_size != (height, width):
            raise ValueError(
                f"frame size changed within a scene: {history.frame_size} then {(height, width)}; "
                "start a new history for a new frame size"
            )

    def _params(self) -> tuple[torch.device, torch.dtype]:
        p = next(self.vae.parameters())
        return p.device, p.dtype

    def _plan(self, device: torch.device, pixels: int, tiled: bool) -> CallPlan:
        """How the encoder or decoder runs on a chunk of frames (tiles) of `pixels` output pixels on `device`.

        The fast forward where `fast` asks for it (None: on CUDA) and the VAE has Wan2.1's layout; diffusers'
        forward otherwise, in its own calls: 4 frames (encoder) or 1 latent frame (decoder) each.

        The fast forward may take a chunk's frames in one call (`whole_chunks`: same result, as the causal caches
        carry the same frames across calls; fewer launches and cache copies below full resolution, more
        activation memory), and run its full-resolution stages `piece_frames` frames at a time (lower peak, a
        little slower; None: unsplit). "auto" chooses by memory:
        - whole-chunk calls on tiles (bounded by the tile, whatever the frame) unless `lean`, and on untiled
          frames up to WHOLE_CHUNK_PIXELS (WHOLE_CHUNK_PIXELS_FP8 with float8 histories) when the histories stay
          resident (where the host's launches set the pace);
        - pieces when offloading (the memory-saving modes): FULL_RES_FRAMES, or 4 for tiles in whole-chunk calls;
          resident: untiled whole-chunk calls keep diffusers' 4 frames at full resolution (its peak), the rest is
          unsplit.
        """
        fast = device.type == "cuda" if self.fast is None else self.fast
        if fast and not supports_fast_forward(self.vae):
            if self.fast:
                raise ValueError("the fast VAE forward supports Wan2.1's architecture only")
            fast = False
        if not fast:
            return CallPlan(fast=False, whole_chunks=False, piece_frames=None)
        if self.whole_chunks != "auto":
            whole = bool(self.whole_chunks)
        elif tiled:
            whole = not self._policy.lean
        else:
            limit = WHOLE_CHUNK_PIXELS_FP8 if self.fast_options.fp8_history else WHOLE_CHUNK_PIXELS
            whole = not self._policy.vae_histories_on_host and pixels <= limit
        if self.piece_frames != "auto":
            pieces = self.piece_frames
        elif self._policy.vae_histories_on_host:
            pieces = TEMPORAL_FACTOR if tiled and whole else FULL_RES_FRAMES
        else:
            pieces = TEMPORAL_FACTOR if whole and not tiled else None
        return CallPlan(fast=True, whole_chunks=whole, piece_frames=pieces)

    # ----------------------------------------------------------------- histories

    def _with_cache(self, owner: Any, attr: str, run: Callable[[list], torch.Tensor]) -> torch.Tensor:
        """run(cache) with `owner.attr`'s cache on the VAE's device; back to host memory after, if offloading
        (or to the spill folder, when the offloaded state is past the host memory budget)."""
        cache = getattr(owner, attr)
        if isinstance(cache, SpilledCache):
            cache = cache.spill.read(cache)
        # A cache left in host memory is brought back even if offloading was switched off since.
        cache = self._host_memory.to_device(cache, self._params()[0])
        setattr(owner, attr, cache)
        out = run(cache)
        if self._policy.vae_histories_on_host:
            host = self._host_memory.to_host(cache)
            del cache
            if self.spill is not None and self._host_memory.host_memory()[0] > self.spill.budget:
                host = self.spill.write(host)
            setattr(owner, attr, host)
        return out

    def _prefetch(self, owner: Any, attr: str, ahead: bool = False) -> None:
        """Queue the upload of `owner.attr`'s cache. `ahead` (the next tile's decoder history, under the current
        tile's decode, when `defer_full_res`): all but the entries at full resolution, which the decoder reads
        last; they are queued when that tile starts, so that the current tile's peak does not hold two tiles'
        whole histories."""
        cache = getattr(owner, attr)
        if isinstance(cache, SpilledCache):
            cache.spill.read_ahead(cache)  # the disk is the slow part: the upload waits for its turn
        else:
            count = full_resolution_start(cache) if ahead else None
            setattr(owner, attr, self._host_memory.to_device(cache, self._params()[0], count))

    def set_spill(self, folder: str | os.PathLike | None, host_budget_gib: float | None = None) -> None:
        """Cap the host memory of offloaded histories at `host_budget_gib`, spilling the rest to files in `folder`
        (memory/spill.py); None turns it off for what is offloaded next. Needs the histories in host memory
        (`policy.vae_histories_on_host`) to matter."""
        if folder is None:
            self.spill = None
            return
        if host_budget_gib is None or host_budget_gib < 0:
            raise ValueError(f"a host memory budget (GiB, >= 0) is needed with a spill folder, got {host_budget_gib}")
        self.spill = DiskSpill(folder, int(host_budget_gib * 2**30))

    def prefetch_decoder(self, history: VAEHistory) -> None:
        """Start uploading the decoder history (the first tile's when tiled) for the next decode_chunk.

        A no-op unless offloading with `prefetch` on. Call it before work that the copies can overlap (the DiT).
        """
        if not (self._policy.vae_histories_on_host and self._policy.prefetch):
            return
        if history.tiles is None:
            self._prefetch(history, "decoder_cache")
        elif history.tiles:
            self._prefetch(next(iter(history.tiles.values())), "decoder_cache")

    def host_memory(self) -> tuple[int, int]:
        """(bytes of offloaded history in host memory, bytes of page-locked blocks kept for reuse)."""
        return self._host_memory.host_memory()

    def trim_host_memory(self) -> int:
        """Free the unused page-locked host blocks (see `HostMemory.trim`); bytes freed."""
        return self._host_memory.trim()

    def _stats(self, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The latent mean and 1/std on `device` in `dtype` (uploaded once: an upload would wait for the GPU)."""
        key = (device, dtype)
        if key not in self._stats_on:
            self._stats_on[key] = (
                self._mean.to(device=device, dtype=dtype),
                self._inv_std.to(device=device, dtype=dtype),
            )
        return self._stats_on[key]

    # ----------------------------------------------------------------- encode

    @torch.no_grad()
    def encode_chunk(self, frames: torch.Tensor, history: VAEHistory) -> torch.Tensor:
        """(B, 3, T, H, W) frames in [-1, 1] -> normalized latents (B, 16, T', H/8, W/8).

        T must be 1 mod 4 for the scene's first chunk (T' = 1 + (T-1)/4) and
        0 mod 4 afterwards (T' = T/4); H and W multiples of 16 (the caller pads).
        """
        if frames.ndim != 5 or frames.shape[1] != 3:
            raise ValueError(f"expected frames of shape (B, 3, T, H, W), got {tuple(frames.shape)}")
        _, _, t, h, w = frames.shape
        want = 0 if history.encoded_first else 1
        if t == 0 or t % TEMPORAL_FACTOR != want:
            which = "later chunks" if history.encoded_first else "a scene's first chunk"
            raise ValueError(f"{which} need a frame count = {want} mod 4 (the causal VAE timeline), got {t}")
        if h % 16 or w % 16:
            raise ValueError(f"frame height and width must be multiples of 16 (pad first), got {h}x{w}")
        self._fix_frame(history, h, w)
        device, dtype = self._params()
        frames = frames.to(device=device, dtype=dtype)
        first = not history.encoded_first
        tiled = history.tiles is not None
        out = self._run(frames, history, "encoder_cache", lambda x, c: self._encode(x, c, first, tiled), True)
        history.encoded_first = True
        return out

    def _encode(self, frames: torch.Tensor, cache: list, first: bool, tiled: bool) -> torch.Tensor:
        """The encoder over the calls of `_plan` (feat_idx reset per call), then `quant_conv`; keeps the
        posterior mean, normalized with Wan2.1's latent statistics."""
        plan = self._plan(frames.device, frames.shape[-2] * frames.shape[-1], tiled)
        spans = plan.spans(frames.shape[2], first, TEMPORAL_FACTOR)
        if plan.fast:
            prepare_channels_last(self.vae)
            feats = [
                fast_encoder(self.vae, frames[:, :, a:b], cache, plan.piece_frames, self.fast_options) for a, b in spans
            ]
        else:
            feats = [self.vae.encoder(frames[:, :, a:b], feat_cache=cache, feat_idx=[0]) for a, b in spans]
        mean = self.vae.quant_conv(torch.cat(feats, dim=2))[:, : self.z_dim]
        offset, inv_std = self._stats(mean.device, mean.dtype)
        return (mean - offset) * inv_std

    # ----------------------------------------------------------------- decode

    @torch.no_grad()
    def decode_chunk(self, latents: torch.Tensor, history: VAEHistory) -> torch.Tensor:
        """Normalized latents (B, 16, T', h, w) -> frames (B, 3, T, 8h, 8w) in [-1, 1].

        T = 1 + 4 (T' - 1) for the scene's first chunk, 4 T' afterwards.
        """
        if latents.ndim != 5 or latents.shape[1] != self.z_dim:
            raise ValueError(f"expected latents of shape (B, {self.z_dim}, T, h, w), got {tuple(latents.shape)}")
        if latents.shape[2] == 0:
            raise ValueError("empty latent chunk")
        _, _, _, h, w = latents.shape
        self._fix_frame(history, h * SPATIAL_FACTOR, w * SPATIAL_FACTOR)
        device, dtype = self._params()
        latents = latents.to(device=device, dtype=dtype)
        first = not history.decoded_first
        tiled = history.tiles is not None
        out = self._run(latents, history, "decoder_cache", lambda z, c: self._decode(z, c, first, tiled), False)
        history.decoded_first = True
        return out.clamp_(-1.0, 1.0)

    def _decode(self, latents: torch.Tensor, cache: list, first: bool, tiled: bool) -> torch.Tensor:
        """De-normalize, `post_quant_conv`, then the decoder over the calls of `_plan`: a scene's first latent
        frame alone gives 1 frame (its temporal upsamplers mark their caches "Rep"), every later one 4."""
        offset, inv_std = self._stats(latents.device, latents.dtype)
        x = self.vae.post_quant_conv(latents / inv_std + offset)
        plan = self._plan(x.device, x.shape[-2] * x.shape[-1] * SPATIAL_FACTOR**2, tiled)
        spans = plan.spans(x.shape[2], first, 1)
        if plan.fast:
            # Wan2.1's decoder ignores first_chunk (it only matters for Wan2.2's residual up blocks).
            prepare_channels_last(self.vae)
            frames = [
                fast_decoder(self.vae, x[:, :, a:b], cache, plan.piece_frames, self.fast_options) for a, b in spans
            ]
        else:
            frames = [
                self.vae.decoder(x[:, :, a:b], feat_cache=cache, feat_idx=[0], first_chunk=first and a == 0)
                for a, b in spans
            ]
        return torch.cat(frames, dim=2)

    # ----------------------------------------------------------------- tiling

    def _run(self, value: torch.Tensor, history: VAEHistory, attr: str, run: Any, pixels_in: bool) -> torch.Tensor:
        """run(value, cache) with the history's `attr` cache, or per tile (blended) when the scene is tiled."""
        if history.tiles is None:
            return self._call(history, attr, value, lambda cache: run(value, cache))
        return self._blend(value, history, attr, run, pixels_in)

    def _call(self, owner: Any, attr: str, value: torch.Tensor, run: Callable[[list], torch.Tensor]) -> torch.Tensor:
        """`_with_cache(owner, attr, run)` on input `value`, inside `call_hook`'s context when one is set."""
        if self.call_hook is None:
            return self._with_cache(owner, attr, run)
        name = "encode" if attr == "encoder_cache" else "decode"
        with self.call_hook(name, (int(value.shape[-2]), int(value.shape[-1]))):
            return self._with_cache(owner, attr, run)

    def _blend(self, value: torch.Tensor, history: VAEHistory, attr: str, run: Any, pixels_in: bool) -> torch.Tensor:
        """Run `run(tile_input, tile_cache)` per tile (its `attr` cache) and blend the outputs (float32 sums)."""
        assert history.tiles is not None and history.frame_size is not None
        latent_frame = (history.frame_size[0] // SPATIAL_FACTOR, history.frame_size[1] // SPATIAL_FACTOR)
        in_factor = SPATIAL_FACTOR if pixels_in else 1
        out_factor = 1 if pixels_in else SPATIAL_FACTOR
        border = self.tile_size - self.tile_stride
        total: torch.Tensor | None = None
        weight_sum = torch.zeros(
            latent_frame[0] * out_factor, latent_frame[1] * out_factor, device=value.device, dtype=torch.float32
        )
        tiles = list(history.tiles.items())
        for index, (region, tile) in enumerate(tiles):
            top, bottom, left, right = region
            piece = value[..., top * in_factor : bottom * in_factor, left * in_factor : right * in_factor]
            if self._policy.prefetch and self._policy.vae_histories_on_host and index + 1 < len(tiles):
                self._prefetch(tile, attr)  # this tile's upload is queued before the next one's
                self._prefetch(tiles[index + 1][1], attr, ahead=attr == "decoder_cache" and self.defer_full_res)
            out = self._call(tile, attr, piece, lambda cache: run(piece, cache))  # noqa: B023
            if total is None:
                total = out.new_zeros(
                    (*out.shape[:3], latent_frame[0] * out_factor, latent_frame[1] * out_factor), dtype=torch.float32
                )
            weights = tile_weights(region, latent_frame, border, out_factor, value.device, self.tile_margin)
            rows = slice(top * out_factor, bottom * out_factor)
            cols = slice(left * out_factor, right * out_factor)
            total[..., rows, cols] += out.float() * weights
            weight_sum[rows, cols] += weights[0, 0, 0]
        assert total is not None
        return (total / weight_sum).to(value.dtype)
