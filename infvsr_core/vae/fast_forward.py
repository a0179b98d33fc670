"""A fast forward of diffusers' Wan2.1 VAE encoder and decoder, over the same parameters and feat_cache.

Why: the VAE is most of an InfVSR chunk's time, and most of that is not its
convolutions. diffusers' causal conv concatenates the 2-frame cache to the
full-resolution input and then pads every dim (two full copies per conv), its
RMS norm makes several float32 passes, and everything runs NCDHW, which is
cuDNN's slower layout for these shapes. This forward (its layers in
fast_blocks.py)

- keeps activations channels_last_3d (cuDNN's faster 3D-conv layout),
- writes norm + SiLU (one fused kernel) straight into a buffer that already
  holds the 2 cached frames in front, and lets conv3d do the spatial zero
  padding itself (no cat, no F.pad of the activation),
- runs the downsampler's conv2d per frame in channels_last without the
  float32 round trip, and the upsampler's nearest 2x + 3x3 conv2d as one 2x2
  conv at low resolution (sub-pixel form: no 4x-sized upsampled copy, and
  4/9 of the multiply-adds),
- computes the mid block's single-head attention (head dim = channels, 384)
  with a flash-style Triton kernel (kernels/mid_attention.py; elsewhere as two
  matmuls and a float32 softmax over blocks of queries): SDPA has no fast
  kernel for that head dim and falls back to a slow one,
- on Hopper, runs the 192-channel causal convs as one Triton kernel each
  (kernels/split_conv.py: exactly 192 outputs, where cuDNN computes 256),
  whose epilogue adds bias and residual or writes the next norm + SiLU
  straight into the next conv's staged buffer,
- runs the full-resolution stages (the encoder's first level, the decoder's
  last block and head) on a few frames at a time, which bounds peak memory
  (their activations are the largest) without changing the result.

The `feat_cache` lists have exactly diffusers' meaning and order (one entry
per causal conv, "Rep" for a temporal upsampler's first call, the same
1- or 2-frame tensors), so a VAEHistory is interchangeable between the two
paths (except with `FastForwardOptions.fp8_history`, whose float8 entries
only this forward reads). Only Wan2.1's architecture (no residual down/up
blocks) is supported.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from diffusers import AutoencoderKLWan
from diffusers.models.autoencoders.autoencoder_kl_wan import WanAttentionBlock, WanResample, WanResidualBlock
from torch import nn

from .fast_blocks import (
    CL2,
    CL3,
    Cursor,
    FastForwardOptions,
    attention,
    causal_conv,
    downsample,
    resblock,
    rgb_in_conv,
    to_cl3,
    upsample,
    zero_bordered,
)


def supports_fast_forward(vae: AutoencoderKLWan) -> bool:
    """Whether `vae` has the Wan2.1 layout this forward reproduces."""
    return not bool(getattr(vae.config, "is_residual", False)) and getattr(vae.config, "patch_size", None) is None


def prepare_channels_last(vae: AutoencoderKLWan) -> None:
    """Store the VAE's conv kernels channels-last, in place (same values; the plain path accepts them too).

    In place rather than a second copy, so the fast path costs no extra weight memory.
    """
    for module in vae.modules():
        if isinstance(module, nn.Conv3d) and not module.weight.is_contiguous(memory_format=CL3):
            module.weight.data = module.weight.data.contiguous(memory_format=CL3)
        elif isinstance(module, nn.Conv2d) and not module.weight.is_contiguous(memory_format=CL2):
            module.weight.data = module.weight.data.contiguous(memory_format=CL2)


class _CudnnBenchmark:
    """cuDNN's algorithm search on (when `enabled`), for the duration of a fast forward (restored after)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled

    def __enter__(self) -> None:
        self.saved = torch.backends.cudnn.benchmark
        torch.backends.cudnn.benchmark = self.saved or self.enabled

    def __exit__(self, *exc) -> None:
        torch.backends.cudnn.benchmark = self.saved


def fast_encoder(
    vae: AutoencoderKLWan,
    x: torch.Tensor,
    cache: list,
    piece_frames: int | None = None,
    options: FastForwardOptions = FastForwardOptions(),
) -> torch.Tensor:
    """Same as `vae.encoder(x, feat_cache=cache, feat_idx=[0])`; output channels_last_3d.

    `piece_frames`: run the full-resolution stage that many frames at a time
    (lower peak memory, a little slower); None runs every stage on all frames.
    """
    with _CudnnBenchmark(options.cudnn_benchmark):
        return _encoder(vae, x, cache, piece_frames, options)


def fast_decoder(
    vae: AutoencoderKLWan,
    x: torch.Tensor,
    cache: list,
    piece_frames: int | None = None,
    options: FastForwardOptions = FastForwardOptions(),
) -> torch.Tensor:
    """Same as `vae.decoder(x, feat_cache=cache, feat_idx=[0])` for Wan2.1; output channels_last_3d.

    `piece_frames` as for `fast_encoder`.
    """
    with _CudnnBenchmark(options.cudnn_benchmark):
        return _decoder(vae, x, cache, piece_frames, options)


def _in_pieces(
    x: torch.Tensor, cursor: Cursor, run: Callable[[torch.Tensor], torch.Tensor], step: int | None
) -> torch.Tensor:
    """run(x) on pieces of at most `step` frames (None: all at once), concatenated in time (channels_last_3d).

    Every piece walks the same cache entries (the cursor goes back for each):
    a piece's causal convs read the history the previous piece stored, so the
    result and the final cache equal one call on all frames. `run` must keep
    the frame count (no temporal resampling inside).
    """
    t = x.shape[2]
    if step is None or t <= step:
        return run(x)
    step = max(1, step)
    start = cursor.index
    out = None
    for i in range(0, t, step):
        cursor.index = start
        y = run(x[:, :, i : i + step])
        if out is None:
            out = torch.empty((*y.shape[:2], t, *y.shape[3:]), dtype=y.dtype, device=y.device, memory_format=CL3)
        out[:, :, i : i + step].copy_(y)
        del y
    return out


def _full_res_layers(layers: list[nn.Module]) -> int:
    """How many leading encoder down_blocks may run in pieces: up to and including the first downsample2d.

    Those act per frame apart from their causal convs' caches. A downsample3d
    ends the split part before it: its cache and stride-2 time conv depend on
    how the frames are grouped into calls.
    """
    for i, layer in enumerate(layers):
        if isinstance(layer, WanResample):
            return i + 1 if layer.mode == "downsample2d" else i
    return len(layers)


def _down_layers(layers: list[nn.Module], x: torch.Tensor, cursor: Cursor, options: FastForwardOptions) -> torch.Tensor:
    bordered = None
    for i, layer in enumerate(layers):
        if isinstance(layer, WanResidualBlock):
            following = layers[i + 1] if i + 1 < len(layers) else None
            if isinstance(following, WanResample) and following.mode.startswith("downsample"):
                b, _, t, h, w = x.shape  # the downsampler's zero border: written around the block's output
                bordered = zero_bordered((b, layer.conv2.out_channels, t, h, w), x)
                x = resblock(layer, x, cursor, options, out=bordered[:, :, :, :h, :w])
            else:
                x = resblock(layer, x, cursor, options)
        elif isinstance(layer, WanResample):
            x = downsample(layer, x, cursor, bordered)
            bordered = None
        elif isinstance(layer, WanAttentionBlock):  # per frame (over its pixels), not over time
            x = attention(layer, x, options)
        else:
            raise TypeError(f"unsupported encoder layer {type(layer).__name__}")
    return x


def _mid(mid: nn.Module, x: torch.Tensor, cursor: Cursor, options: FastForwardOptions) -> torch.Tensor:
    x = resblock(mid.resnets[0], x, cursor, options)
    for attn, resnet in zip(mid.attentions, mid.resnets[1:], strict=True):
        x = attention(attn, x, options)
        x = resblock(resnet, x, cursor, options)
    return x


def _encoder(
    vae: AutoencoderKLWan, x: torch.Tensor, cache: list, piece_frames: int | None, options: FastForwardOptions
) -> torch.Tensor:
    encoder = vae.encoder
    cursor = Cursor(cache)
    layers = list(encoder.down_blocks)
    split = _full_res_layers(layers)

    def full_res(piece: torch.Tensor) -> torch.Tensor:
        return _down_layers(layers[:split], rgb_in_conv(encoder.conv_in, piece, cursor, options), cursor, options)

    x = _in_pieces(x, cursor, full_res, piece_frames)
    x = _down_layers(layers[split:], x, cursor, options)
    x = _mid(encoder.mid_block, x, cursor, options)
    return causal_conv(encoder.conv_out, x, cursor, encoder.norm_out, options)


def _up_block(
    block: nn.Module, x: torch.Tensor, cursor: Cursor, options: FastForwardOptions, with_upsampler: bool = True
) -> torch.Tensor:
    for resnet in block.resnets:
        x = resblock(resnet, x, cursor, options)
    if block.upsamplers is not None and with_upsampler:
        x = upsample(block.upsamplers[0], x, cursor, options)
    return x


def _decoder(
    vae: AutoencoderKLWan, x: torch.Tensor, cache: list, piece_frames: int | None, options: FastForwardOptions
) -> torch.Tensor:
    decoder = vae.decoder
    cursor = Cursor(cache)
    x = causal_conv(decoder.conv_in, to_cl3(x), cursor, None, options)
    x = _mid(decoder.mid_block, x, cursor, options)
    *body, last = decoder.up_blocks
    # The last block (no upsampler) and the head run at full resolution: in pieces, with the spatial upsampler
    # before them (per frame, no cache), so that its full-resolution output never exists for all frames at once
    # (the largest block of a tile's decode, which the allocator under a memory cap had to make room for).
    pieces = last.upsamplers is None and piece_frames is not None
    before = body[-1].upsamplers[0] if body and body[-1].upsamplers is not None else None
    piece_up = pieces and options.piece_upsampler and before is not None and before.mode == "upsample2d"
    per_piece_up = before if piece_up else None
    for block in body:
        x = _up_block(block, x, cursor, options, with_upsampler=per_piece_up is None or block is not body[-1])

    def tail(piece: torch.Tensor) -> torch.Tensor:
        if per_piece_up is not None:
            piece = upsample(per_piece_up, piece, cursor, options)
        return causal_conv(decoder.conv_out, _up_block(last, piece, cursor, options), cursor, decoder.norm_out, options)

    return _in_pieces(x, cursor, tail, piece_frames) if last.upsamplers is None else tail(x)
