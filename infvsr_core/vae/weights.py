"""The Wan2.1 VAE's weights: the published `Wan2.1_VAE.pth` (original Wan key names) into diffusers' model.

The network is diffusers' `AutoencoderKLWan`; the release's file uses the
original Wan names. Keys and shapes are checked under those names, so that a
wrong file is reported with the keys the user's file actually has rather than
as a diffusers load failure.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

import torch
from diffusers import AutoencoderKLWan
from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

from ..weights import WeightFileError, check_state_dict, require

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
