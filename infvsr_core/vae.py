"""The causal Wan2.1 VAE of InfVSR, streamed chunk by chunk (SPEC sections 1, 2, 5, 6).

The network itself is diffusers' `AutoencoderKLWan`; this module only
(a) loads the published `Wan2.1_VAE.pth` (original Wan key names) into it with
errors that name the original keys, and (b) drives its encoder and decoder the
way the InfVSR release does: the per-conv temporal histories (`feat_cache`)
live in a `VAEHistory` owned by the caller and survive across the chunks of a
scene, so a clip streamed in chunks gives exactly the whole-clip result while
memory stays constant.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import torch
from diffusers import AutoencoderKLWan
from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers
from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d

from .fast_vae import FULL_RES_FRAMES, fast_decoder, fast_encoder, prepare_channels_last, supports_fast_forward
from .offload import HostOffload, SpilledCache, copy_cache
from .spill import DiskSpill
from .weights import WeightFileError, check_state_dict, require

__all__ = [
    "TINY_VAE_BASE_DIM",
    "WAN21_LATENTS_MEAN",
    "WAN21_LATENTS_STD",
    "StreamingVAE",
    "TileRegion",
    "VAEHistory",
    "build_vae",
    "random_vae_state_dict",
    "tile_regions",
    "vae_config_from_state_dict",
    "vae_state_dict_to_original",
]

WHAT = "the Wan2.1 VAE checkpoint (Wan2.1_VAE.pth)"

# Wan2.1's per-channel latent statistics (16 channels): the DiT was trained on
# latents normalized with exactly these numbers.
WAN21_LATENTS_MEAN: tuple[float, ...] = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)  # fmt: skip
WAN21_LATENTS_STD: tuple[float, ...] = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)  # fmt: skip

# Smallest channel width that keeps every layer of the architecture valid and
# the CPU tests fast.
TINY_VAE_BASE_DIM = 8

SPATIAL_FACTOR = 8  # pixels per latent, each axis
TEMPORAL_FACTOR = 4  # frames per latent frame (after the scene's first frame)
# Largest frame (output pixels, per tile when tiled) for which whole_chunks="auto" groups a chunk's VAE calls: on
# an H100, 480p (0.4 MP) gains 3 % for +1.1 GiB, 720p (0.9 MP) 1.3 % for +2.5 GiB (bench/RESULTS.md round 5).
WHOLE_CHUNK_PIXELS = 600_000


# --------------------------------------------------------------------------- weights


def vae_config_from_state_dict(sd: Mapping[str, torch.Tensor], *, path: str | os.PathLike | None = None) -> dict:
    """AutoencoderKLWan config for an original-format state dict, built locally (no hub access).

    base_dim is read from `encoder.conv1.weight` and z_dim from `conv2.weight`
    so that narrower test VAEs load too; everything else is Wan2.1's.
    """
    conv_in = require(sd, "encoder.conv1.weight", what=WHAT, path=path)
    post_quant = require(sd, "conv2.weight", what=WHAT, path=path)
    where = f"{WHAT} ('{path}')" if path is not None else WHAT
    if conv_in.ndim != 5 or post_quant.ndim != 5:
        raise WeightFileError(
            f"{where}: 'encoder.conv1.weight' {tuple(conv_in.shape)} / 'conv2.weight' {tuple(post_quant.shape)} "
            "are not 3D-conv weights: this is not a Wan2.1 VAE"
        )
    z_dim = int(post_quant.shape[0])
    if z_dim != len(WAN21_LATENTS_MEAN):
        raise WeightFileError(
            f"{where}: latent channels (z_dim, from 'conv2.weight' {tuple(post_quant.shape)}) is {z_dim}, "
            f"expected {len(WAN21_LATENTS_MEAN)}: this is not a Wan2.1 VAE (Wan2.2's VAE has 48)"
        )
    return {
        "base_dim": int(conv_in.shape[0]),
        "decoder_base_dim": None,
        "z_dim": z_dim,
        "dim_mult": [1, 2, 4, 4],
        "num_res_blocks": 2,
        "attn_scales": [],
        "temperal_downsample": [False, True, True],
        "dropout": 0.0,
        "latents_mean": list(WAN21_LATENTS_MEAN),
        "latents_std": list(WAN21_LATENTS_STD),
        "is_residual": False,
        "in_channels": 3,
        "out_channels": 3,
        "patch_size": None,
        "scale_factor_temporal": TEMPORAL_FACTOR,
        "scale_factor_spatial": SPATIAL_FACTOR,
    }


# diffusers name -> original Wan name, for the parts with a fixed rename.
_RESNET_PARTS = {"norm1": "residual.0", "conv1": "residual.2", "norm2": "residual.3", "conv2": "residual.6"}
_FIXED_RENAMES = {
    "quant_conv.": "conv1.",
    "post_quant_conv.": "conv2.",
    "encoder.conv_in.": "encoder.conv1.",
    "decoder.conv_in.": "decoder.conv1.",
    "encoder.norm_out.": "encoder.head.0.",
    "encoder.conv_out.": "encoder.head.2.",
    "decoder.norm_out.": "decoder.head.0.",
    "decoder.conv_out.": "decoder.head.2.",
}
_MID_RESNET = re.compile(
    r"^(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(norm1|conv1|norm2|conv2|conv_shortcut)\.(.+)$"
)
_MID_ATTN = re.compile(r"^(encoder|decoder)\.mid_block\.attentions\.0\.(.+)$")
_DOWN = re.compile(r"^encoder\.down_blocks\.(\d+)\.(.+)$")
_UP_RESNET = re.compile(r"^decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(norm1|conv1|norm2|conv2|conv_shortcut)\.(.+)$")
_UP_SAMPLER = re.compile(r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.(.+)$")
_UP_PER_LEVEL = 4  # original decoder.upsamples: 3 residual blocks then 1 resample per level


def _resnet_part(part: str) -> str:
    return "shortcut" if part == "conv_shortcut" else _RESNET_PARTS[part]


def _key_to_original(key: str) -> str:
    for new, old in _FIXED_RENAMES.items():
        if key.startswith(new):
            return old + key[len(new) :]
    if m := _MID_RESNET.match(key):
        side, idx, part, rest = m.groups()
        # original middle = [residual, attention, residual]
        return f"{side}.middle.{2 * int(idx)}.{_resnet_part(part)}.{rest}"
    if m := _MID_ATTN.match(key):
        return f"{m.group(1)}.middle.1.{m.group(2)}"
    if m := _DOWN.match(key):
        idx, rest = m.groups()
        head, _, tail = rest.partition(".")
        if head in _RESNET_PARTS or head == "conv_shortcut":
            rest = f"{_resnet_part(head)}.{tail}"
        return f"encoder.downsamples.{idx}.{rest}"
    if m := _UP_RESNET.match(key):
        block, resnet, part, rest = m.groups()
        return f"decoder.upsamples.{_UP_PER_LEVEL * int(block) + int(resnet)}.{_resnet_part(part)}.{rest}"
    if m := _UP_SAMPLER.match(key):
        block, rest = m.groups()
        return f"decoder.upsamples.{_UP_PER_LEVEL * int(block) + _UP_PER_LEVEL - 1}.{rest}"
    raise KeyError(f"no original Wan2.1 VAE name known for diffusers key '{key}'")


def vae_state_dict_to_original(diffusers_sd: Mapping[str, Any]) -> dict[str, Any]:
    """Rename a diffusers AutoencoderKLWan state dict to the original Wan2.1 key names.

    The inverse of diffusers' `convert_wan_vae_to_diffusers`; values (tensors or
    shapes) pass through untouched. Used to state the expected original keys and
    shapes, so that load errors name the keys the user's file actually has.
    """
    return {_key_to_original(k): v for k, v in diffusers_sd.items()}


def _meta_vae(config: dict) -> AutoencoderKLWan:
    # Built on the meta device: no memory and no random init for weights that
    # are about to be replaced.
    with torch.device("meta"):
        return AutoencoderKLWan(**config)


def build_vae(
    sd_original: Mapping[str, torch.Tensor],
    *,
    path: str | os.PathLike | None = None,
    dtype: torch.dtype = torch.float32,
) -> AutoencoderKLWan:
    """Check an original-format Wan2.1 VAE state dict and load it into diffusers' AutoencoderKLWan.

    `sd_original` is the already unwrapped `Wan2.1_VAE.pth` content (bf16 or
    fp32). Keys and shapes are checked under their original names first, so a
    wrong file is reported as such rather than as a diffusers load failure.
    """
    config = vae_config_from_state_dict(sd_original, path=path)
    model = _meta_vae(config)
    expected = vae_state_dict_to_original({k: v.shape for k, v in model.state_dict().items()})
    check_state_dict(sd_original, expected, what=WHAT, path=path)
    converted = convert_wan_vae_to_diffusers(dict(sd_original))
    converted = {k: v.to(dtype=dtype) for k, v in converted.items()}
    model.load_state_dict(converted, strict=True, assign=True)
    return model.eval().requires_grad_(False)


def random_vae_state_dict(base_dim: int = 96, seed: int = 0) -> dict[str, torch.Tensor]:
    """A deterministic random Wan2.1 VAE state dict in the original published format (float32).

    Weights have variance 1/fan_in so activations keep a sane scale through the
    network; the decoder's output conv is scaled down so decoded frames mostly
    stay inside [-1, 1] (as a trained VAE's do) and clamping is rare. The
    global RNG is not touched.
    """
    config = vae_config_from_state_dict(
        {"encoder.conv1.weight": torch.empty(base_dim, 3, 3, 3, 3), "conv2.weight": torch.empty(16, 16, 1, 1, 1)}
    )
    shapes = {k: v.shape for k, v in _meta_vae(config).state_dict().items()}
    gen = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}
    for name, shape in shapes.items():
        if name.endswith(".gamma"):
            value = 1.0 + 0.1 * torch.randn(shape, generator=gen)
        elif name.endswith(".bias"):
            value = 0.05 * torch.randn(shape, generator=gen)
        else:
            fan_in = shape[1:].numel()
            value = torch.randn(shape, generator=gen) / fan_in**0.5
            if name == "decoder.conv_out.weight":
                value = value * 0.2
        sd[name] = value
    return vae_state_dict_to_original(sd)


# --------------------------------------------------------------------------- streaming

# Tile (stride, margin) in latent pixels at the tile size 128, by name. "release" is the authors' tiling
# (SPEC section 5). "smooth" is wider overlaps whose outer 16 latent pixels get no weight: tiled vs untiled
# at 1080p its error on the overlaps equals the error inside the tiles (1.04x, release 1.84x; largest
# difference 4 vs 13 8-bit levels) for ~1.5x the VAE work and histories (bench/RESULTS.md, round 4).
SEAMS: dict[str, tuple[int, int]] = {"release": (110, 0), "smooth": (80, 16)}

TileRegion = tuple[int, int, int, int]
"""(top, bottom, left, right) of a tile, in latent pixels."""


def _starts(length: int, size: int, stride: int) -> list[int]:
    # A tile is added only while the previous one has not reached the end.
    starts = [0]
    while starts[-1] + size < length:
        starts.append(starts[-1] + stride)
    return starts


def tile_regions(latent_height: int, latent_width: int, size: int, stride: int) -> list[TileRegion]:
    """Overlapping latent tiles covering the frame, row-major; edge tiles are clipped to the frame."""
    if not 0 < stride <= size:
        raise ValueError(f"tile stride must be in (0, tile size]; got size {size}, stride {stride}")
    return [
        (top, min(top + size, latent_height), left, min(left + size, latent_width))
        for top in _starts(latent_height, size, stride)
        for left in _starts(latent_width, size, stride)
    ]


def _ramp(
    length: int, border: int, ramp_start: bool, ramp_end: bool, device: torch.device, margin: int = 0
) -> torch.Tensor:
    """1D blend weights: on each inner edge, `margin` zeros, then a linear ramp over the rest of the overlap."""
    weights = torch.ones(length, device=device)
    border = min(border, length)
    ramp = border - 2 * margin
    if border <= 0 or ramp <= 0:
        return weights
    up = torch.arange(1, ramp + 1, device=device, dtype=torch.float32) / ramp
    if ramp_start:
        weights[:margin] = 0
        weights[margin : margin + ramp] = up
    if ramp_end:
        weights[length - margin :] = 0
        weights[length - margin - ramp : length - margin] = up.flip(0)
    return weights


def _tile_weights(
    region: TileRegion, frame: tuple[int, int], border: int, factor: int, device: torch.device, margin: int = 0
) -> torch.Tensor:
    """Blending weights of one tile, (1, 1, 1, h, w), float32.

    Linear ramps (1/border ... 1) over the overlap on every side that is not a
    frame edge, the minimum of the row and column ramps at the corners; the
    blended value is the weight-normalized sum of the tiles (the release's
    scheme). With a `margin` (latent pixels), the outermost pixels of each
    inner edge get weight 0 and the ramp spans the rest of the overlap: those
    pixels lacked the context beyond the tile, so only their neighbour's count.
    """
    top, bottom, left, right = region
    rows = _ramp((bottom - top) * factor, border * factor, top > 0, bottom < frame[0], device, margin * factor)
    cols = _ramp((right - left) * factor, border * factor, left > 0, right < frame[1], device, margin * factor)
    return torch.minimum(rows[:, None], cols[None, :])[None, None, None]


def _cache_nbytes(cache: list) -> int:
    return sum(t.numel() * t.element_size() for t in cache if isinstance(t, torch.Tensor))


def _before_largest(cache: list) -> int:
    """The index of the first entry at the cache's largest spatial size (its full-resolution convs'), or its
    length if it holds no tensor."""
    sizes = [t.shape[-2] * t.shape[-1] if isinstance(t, torch.Tensor) else -1 for t in cache]
    return sizes.index(max(sizes)) if any(size >= 0 for size in sizes) else len(cache)


@dataclass
class TileHistory:
    """Encoder and decoder `feat_cache` lists of one spatial tile (entries: None, "Rep" or tensors)."""

    encoder_cache: list = field(default_factory=list)
    decoder_cache: list = field(default_factory=list)

    def nbytes(self) -> int:
        return _cache_nbytes(self.encoder_cache) + _cache_nbytes(self.decoder_cache)

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
        total = _cache_nbytes(self.encoder_cache) + _cache_nbytes(self.decoder_cache)
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


Tiling = Literal["auto", "always", "never"]


class StreamingVAE:
    """Encode/decode the chunks of a scene through diffusers' AutoencoderKLWan, carrying the causal history.

    Encoding sends the scene's very first frame alone, then groups of 4 frames,
    through `vae.encoder` with the history's feat_cache (feat_idx reset per
    call), applies `quant_conv`, keeps the posterior mean and normalizes it with
    Wan2.1's constants. Decoding de-normalizes, applies `post_quant_conv` and
    decodes one latent frame at a time (1 output frame for the scene's first, 4
    for every later one), then clamps to [-1, 1].

    Spatial tiling (SPEC section 5): with `tiling="auto"` a scene is tiled when
    its output frame is taller than `tile_threshold` pixels, as in the release;
    pass `threshold_axes="either"` to also tile frames that are only wider than
    that (the release does not; this saves memory on very wide video at the
    cost of differing from it). A tiled frame is split on both axes into latent
    tiles of `tile_size` with `tile_stride` (defaults 128 / 110, i.e. 1024 /
    880 pixels); each tile keeps its own encoder and decoder history, and
    overlaps are blended linearly (weights ramping over the overlap,
    normalized by their sum). `tile_margin` > 0 (not the release's) gives each
    tile's outermost latent pixels on inner edges zero weight, for smoother
    seams; `SEAMS` names the settings measured in bench/RESULTS.md. `tiling="always"` tiles any frame (a frame that
    fits one tile then gives the untiled result); `"never"` never tiles.

    Host offload: with `history_device="cpu"` the causal histories live in
    host memory (pinned on CUDA) between uses: the encoder's while the DiT and
    the decoder run and vice versa, and, when tiled, every tile's but the one
    being processed (as in the release). Copies run on side streams and are
    waited for per cache entry; `prefetch_decoder` (the pipeline calls it before
    the DiT) starts the decoder's upload early, and the next tile's history is
    uploaded while the current tile runs when `prefetch` is True (a decoder
    history without its full-resolution entries, which come when that tile
    starts: `defer_full_res`). The values are bit for bit those of the
    resident path.

    `piece_frames` (fast forward only): the full-resolution stages (and the
    decoder's spatial upsampler into them) run that many frames at a time,
    which lowers the peak by ~0.8 GiB at 720p for a few percent of speed;
    None never splits. "auto": untiled frames run in pieces
    of 2 when offloading (the memory-saving modes) and of 4 with
    `whole_chunks` (the peak of diffusers' calls), whole otherwise; tiles run
    in pieces of 4 when offloading, whole otherwise.

    `whole_chunks` (fast forward only): the encoder and decoder take a chunk's
    frames in one call (after a scene's first frame, which goes alone) rather
    than diffusers' 4 frames / 1 latent frame per call. The result is the same
    (the causal caches carry the same frames across calls; each downsampler
    sees an even frame count), with a third of the launches and of the
    cache copies below full resolution, for ~3x their activation memory.
    "auto" does so for untiled frames when not offloading and small
    (`WHOLE_CHUNK_PIXELS`: where the host's launches set the pace), and for
    tiles (~1 MP at most, whatever the frame) unless `lean`: at 1080p on an
    H100, 7.8 instead of 7.5 fps without offload, 7.45 instead of 6.6 with
    "state" (19 instead of 15 GiB; bench/RESULTS.md round 6).

    `lean` (the pipeline's low-VRAM offload "all"): the smallest calls everywhere.
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
        self.vae = vae
        self.tiling = tiling
        self.tile_threshold = tile_threshold
        self.tile_size = tile_size
        self.tile_stride = tile_stride
        self.tile_margin = tile_margin
        self.threshold_axes = threshold_axes
        self.fast = fast
        self.history_device = history_device
        self.prefetch = prefetch
        self.lean = lean
        self.piece_frames = piece_frames
        self.whole_chunks = whole_chunks
        self.spill: DiskSpill | None = None
        # The next tile's decoder history is prefetched without its full-resolution entries (`_prefetch`).
        self.defer_full_res = True
        self._offload = HostOffload()
        self.z_dim = int(vae.config.z_dim)
        self._encoder_convs = sum(isinstance(m, WanCausalConv3d) for m in vae.encoder.modules())
        self._decoder_convs = sum(isinstance(m, WanCausalConv3d) for m in vae.decoder.modules())
        self._mean = torch.tensor(vae.config.latents_mean, dtype=torch.float32).view(1, -1, 1, 1, 1)
        # The release multiplies by 1/std (computed in float32, then cast), which
        # rounds differently from dividing by std in bf16.
        self._inv_std = 1.0 / torch.tensor(vae.config.latents_std, dtype=torch.float32).view(1, -1, 1, 1, 1)
        self._stats_on: dict[tuple[torch.device, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}

    # ----------------------------------------------------------------- state

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

    def _use_fast(self, device: torch.device) -> bool:
        wanted = device.type == "cuda" if self.fast is None else self.fast
        if wanted and not supports_fast_forward(self.vae):
            if self.fast:
                raise ValueError("the fast VAE forward supports Wan2.1's architecture only")
            return False
        if wanted:
            prepare_channels_last(self.vae)
        return wanted

    def _pieces(self, pixels: int = 0, tiled: bool = False) -> int | None:
        """Frames per piece of the full-resolution stages for frames (tiles) of `pixels` output pixels (None: whole)."""
        if self.piece_frames != "auto":
            return self.piece_frames
        if self.history_device is not None:
            return TEMPORAL_FACTOR if tiled and self._whole(pixels, tiled) else FULL_RES_FRAMES
        if tiled:
            return None
        # Whole-chunk calls on untiled frames: the full-resolution stages keep diffusers' 4 frames per call (its peak).
        return TEMPORAL_FACTOR if self._whole(pixels, tiled) else None

    def _whole(self, pixels: int, tiled: bool = False) -> bool:
        if self.whole_chunks != "auto":
            return bool(self.whole_chunks)
        if tiled:  # a tile's activations are bounded by the tile (~1 MP), whatever the frame size
            return not self.lean
        return self.history_device is None and pixels <= WHOLE_CHUNK_PIXELS

    def _call_frames(self, frames: int, pixels: int, tiled: bool) -> int:
        """Input frames per fast-forward call: `frames` (all the chunk's) or 1 (diffusers' grouping)."""
        return max(frames, 1) if self._whole(pixels, tiled) else 1

    def _with_cache(self, owner: Any, attr: str, run: Any) -> torch.Tensor:
        """run(cache) with `owner.attr`'s cache on the VAE's device; back to host memory after, if offloading
        (or to the spill folder, when the offloaded state is past the host memory budget)."""
        cache = getattr(owner, attr)
        if isinstance(cache, SpilledCache):
            cache = cache.spill.read(cache)
        # A cache left in host memory is brought back even if offloading was switched off since.
        cache = self._offload.to_device(cache, self._params()[0])
        setattr(owner, attr, cache)
        out = run(cache)
        if self.history_device is not None:
            host = self._offload.to_host(cache)
            del cache
            if self.spill is not None and self._offload.host_memory()[0] > self.spill.budget:
                host = self.spill.write(host)
            setattr(owner, attr, host)
        return out

    def _prefetch(self, owner: Any, attr: str, ahead: bool = False) -> None:
        """Queue the upload of `owner.attr`'s cache. `ahead` (the next tile's decoder history, under the current
        tile's decode): all but the entries at full resolution, which the decoder reads last; they are queued
        when that tile starts, so that the current tile's peak does not hold two tiles' whole histories."""
        cache = getattr(owner, attr)
        if isinstance(cache, SpilledCache):
            cache.spill.read_ahead(cache)  # the disk is the slow part: the upload waits for its turn
        else:
            count = _before_largest(cache) if ahead else None
            setattr(owner, attr, self._offload.to_device(cache, self._params()[0], count))

    def set_spill(self, folder: str | os.PathLike | None, host_budget_gib: float | None = None) -> None:
        """Cap the host memory of offloaded histories at `host_budget_gib`, spilling the rest to files in `folder`
        (spill.py); None turns it off for what is offloaded next. Needs `history_device="cpu"` to matter."""
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
        if self.history_device is None or not self.prefetch:
            return
        if history.tiles is None:
            self._prefetch(history, "decoder_cache")
        elif history.tiles:
            self._prefetch(next(iter(history.tiles.values())), "decoder_cache")

    def host_memory(self) -> tuple[int, int]:
        """(bytes of offloaded history in host memory, bytes of page-locked blocks kept for reuse)."""
        return self._offload.host_memory()

    def trim_host_memory(self) -> int:
        """Free the offload's unused page-locked host blocks (see `HostOffload.trim`); bytes freed."""
        return self._offload.trim()

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
        fast = self._use_fast(frames.device)
        start = 1 if first else 0
        pixels = frames.shape[-2] * frames.shape[-1]
        step = TEMPORAL_FACTOR * (
            self._call_frames((frames.shape[2] - start) // TEMPORAL_FACTOR, pixels, tiled) if fast else 1
        )
        pieces = [frames[:, :, :1]] if first else []
        pieces += [frames[:, :, i : i + step] for i in range(start, frames.shape[2], step)]
        if fast:
            feats = [fast_encoder(self.vae, piece, cache, self._pieces(pixels, tiled)) for piece in pieces]
        else:
            feats = [self.vae.encoder(piece, feat_cache=cache, feat_idx=[0]) for piece in pieces]
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
        offset, inv_std = self._stats(latents.device, latents.dtype)
        x = self.vae.post_quant_conv(latents / inv_std + offset)
        if self._use_fast(x.device):
            # Wan2.1's decoder ignores first_chunk (it only matters for Wan2.2's residual up blocks). A scene's
            # first latent frame goes alone: its temporal upsamplers mark their caches "Rep" and do not upsample.
            start = 1 if first else 0
            pixels = x.shape[-2] * x.shape[-1] * SPATIAL_FACTOR**2
            step = self._call_frames(x.shape[2] - start, pixels, tiled)
            bounds = ([(0, 1)] if first else []) + [(i, i + step) for i in range(start, x.shape[2], step)]
            frames = [fast_decoder(self.vae, x[:, :, a:b], cache, self._pieces(pixels, tiled)) for a, b in bounds]
        else:
            frames = [
                self.vae.decoder(x[:, :, i : i + 1], feat_cache=cache, feat_idx=[0], first_chunk=first and i == 0)
                for i in range(x.shape[2])
            ]
        return torch.cat(frames, dim=2)

    # ----------------------------------------------------------------- tiling

    def _run(self, value: torch.Tensor, history: VAEHistory, attr: str, run: Any, pixels_in: bool) -> torch.Tensor:
        """run(value, cache) with the history's `attr` cache, or per tile (blended) when the scene is tiled."""
        if history.tiles is None:
            return self._with_cache(history, attr, lambda cache: run(value, cache))
        return self._blend(value, history, attr, run, pixels_in)

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
            if self.prefetch and self.history_device is not None and index + 1 < len(tiles):
                self._prefetch(tile, attr)  # this tile's upload is queued before the next one's
                self._prefetch(tiles[index + 1][1], attr, ahead=attr == "decoder_cache" and self.defer_full_res)
            out = self._with_cache(tile, attr, lambda cache: run(piece, cache))  # noqa: B023
            if total is None:
                total = out.new_zeros(
                    (*out.shape[:3], latent_frame[0] * out_factor, latent_frame[1] * out_factor), dtype=torch.float32
                )
            weights = _tile_weights(region, latent_frame, border, out_factor, value.device, self.tile_margin)
            rows = slice(top * out_factor, bottom * out_factor)
            cols = slice(left * out_factor, right * out_factor)
            total[..., rows, cols] += out.float() * weights
            weight_sum[rows, cols] += weights[0, 0, 0]
        assert total is not None
        return (total / weight_sum).to(value.dtype)
