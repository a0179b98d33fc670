"""A fast forward of diffusers' Wan2.1 VAE encoder and decoder, over the same parameters and feat_cache.

Why: the VAE is most of an InfVSR chunk's time, and most of that is not its
convolutions. diffusers' causal conv concatenates the 2-frame cache to the
full-resolution input and then pads every dim (two full copies per conv), its
RMS norm makes several float32 passes, and everything runs NCDHW, which is
cuDNN's slower layout for these shapes. This forward

- keeps activations channels_last_3d (cuDNN's faster 3D-conv layout),
- writes norm + SiLU (one fused kernel) straight into a buffer that already
  holds the 2 cached frames in front, and lets conv3d do the spatial zero
  padding itself (no cat, no F.pad of the activation),
- runs the upsampler's nearest 2x + conv2d and the downsampler's conv2d per
  frame in channels_last without the float32 round trip.

The `feat_cache` lists have exactly diffusers' meaning and order (one entry
per causal conv, "Rep" for a temporal upsampler's first call, the same
1- or 2-frame tensors), so a VAEHistory is interchangeable between the two
paths. Only Wan2.1's architecture (no residual down/up blocks) is supported.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKLWan
from diffusers.models.autoencoders.autoencoder_kl_wan import (
    WanAttentionBlock,
    WanCausalConv3d,
    WanResample,
    WanResidualBlock,
    WanRMS_norm,
)
from torch import nn

from .kernels.norm_silu import bias_add_rows_, rms_norm_rows

CACHE_T = 2  # frames of history each causal 3x3x3 (or 3x1x1) conv keeps
CL3 = torch.channels_last_3d
CL2 = torch.channels_last
# cuDNN has no fast channels-last kernel for 3 channels (RGB in, RGB out): the
# first and last convs get zero channels up to this many (exact: zeros add nothing).
PADDED_RGB = 8
PAD_OFF_CUDA = False  # tests set this to exercise the padded convs on the CPU
# Let cuDNN time its algorithms once per shape (streamed chunks repeat a few shapes).
CUDNN_BENCHMARK = True


def supports_fast_forward(vae: AutoencoderKLWan) -> bool:
    """Whether `vae` has the Wan2.1 layout this forward reproduces."""
    return not bool(getattr(vae.config, "is_residual", False)) and getattr(vae.config, "patch_size", None) is None


def _to_cl3(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous(memory_format=CL3)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """(B, C, T, H, W) channels_last_3d -> (B*T*H*W, C) view (copies only if the layout is not channels-last)."""
    return x.permute(0, 2, 3, 4, 1).reshape(-1, x.shape[1])


def _channel_rows(x: torch.Tensor) -> torch.Tensor | None:
    """(B, C, ...) channels-last -> a (N, C) view, or None if its memory is not channels-last."""
    moved = x.movedim(1, -1)
    return moved.view(-1, x.shape[1]) if moved.is_contiguous() else None


def _add_bias(y: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor | None = None) -> torch.Tensor:
    """y += bias [+ residual] in place, one fused pass when both are channels-last."""
    if bias is None and residual is None:
        return y
    rows = _channel_rows(y)
    res_rows = None if residual is None else _channel_rows(residual)
    if rows is None or (residual is not None and res_rows is None):
        y.add_(bias.view(1, -1, *([1] * (y.ndim - 2))).to(y.dtype)) if bias is not None else None
        return y.add_(residual) if residual is not None else y
    if bias is None:
        bias = torch.zeros(y.shape[1], device=y.device)
    bias_add_rows_(rows, bias, res_rows)
    return y


def _norm(
    norm: WanRMS_norm,
    x: torch.Tensor,
    silu: bool,
    out: torch.Tensor | None = None,
    pre_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """WanRMS_norm of (x + pre_bias) over channels (then SiLU), channels-last in and out; into `out` if given."""
    target = torch.empty_like(x, memory_format=CL3) if out is None else out
    rows_out = target.permute(0, 2, 3, 4, 1)
    flat = rows_out.view(-1, x.shape[1]) if rows_out.is_contiguous() else None
    result = rms_norm_rows(_rows(x), norm.gamma, norm.scale, norm.bias, silu=silu, out=flat, pre_bias=pre_bias)
    if flat is None:
        rows_out.copy_(result.view(rows_out.shape))
    return target


class _Cursor:
    """Walks a feat_cache list in diffusers' order (its `feat_idx`)."""

    def __init__(self, cache: list) -> None:
        self.cache = cache
        self.index = 0

    def peek(self):
        return self.cache[self.index]

    def put(self, value) -> None:
        self.cache[self.index] = value
        self.index += 1


def _stage(
    conv: WanCausalConv3d,
    x: torch.Tensor,
    cursor: _Cursor,
    norm: WanRMS_norm | None,
    pre_bias: torch.Tensor | None = None,
    channels: int | None = None,
) -> torch.Tensor:
    """The causal conv's input [zero pad | cached frames | act(x)] as one channels-last buffer.

    act is norm + SiLU of (x + pre_bias) when `norm` is given, else x itself;
    with `channels`, the buffer has that many channels, the extra ones zero
    (the cache keeps x's own channels). Stores the next
    cache entry exactly as diffusers does: the last 2 frames of act, or, when
    act has one frame, that frame behind the previous last one (or behind a
    zero frame after a temporal upsampler's "Rep").
    """
    if conv._padding[4] != CACHE_T:
        raise ValueError(f"causal conv with time padding {conv._padding[4]} is not supported")
    past = cursor.peek()
    rep = isinstance(past, str)
    past = None if rep else past
    b, c, t, h, w = x.shape
    kept = 0 if past is None else min(past.shape[2], CACHE_T)
    total = c if channels is None else channels
    full = torch.empty((b, total, CACHE_T + t, h, w), dtype=x.dtype, device=x.device, memory_format=CL3)
    if total > c:
        full[:, c:].zero_()
    buf = full[:, :c]
    if kept < CACHE_T:
        buf[:, :, : CACHE_T - kept].zero_()
    if kept:
        buf[:, :, CACHE_T - kept : CACHE_T].copy_(past[:, :, past.shape[2] - kept :])
    act = buf[:, :, CACHE_T:]
    if norm is None:
        act.copy_(x)
    else:
        _norm(norm, x, silu=True, out=act, pre_bias=pre_bias)
    if t >= CACHE_T:
        new = buf[:, :, -CACHE_T:].clone()
    elif past is not None or rep:
        new = buf[:, :, CACHE_T - 1 :].clone()
    else:
        new = act.clone()
    cursor.put(new)
    return full


def _padded(conv: nn.Conv3d, in_channels: int | None, out_channels: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """conv's weight and bias with zero input/output channels appended (cached on the module)."""
    w = conv.weight
    # Inference tensors (weights loaded under torch.inference_mode, as in ComfyUI) have no version counter.
    version = None if w.is_inference() else w._version
    key = (w.data_ptr(), version, w.dtype, w.device, in_channels, out_channels)
    cached = getattr(conv, "_infvsr_padded", None)
    if cached is None or cached[0] != key:
        o, i = w.shape[:2]
        padded = w.new_zeros((out_channels or o, in_channels or i, *w.shape[2:]))
        padded[:o, :i] = w
        bias = w.new_zeros(out_channels or o)
        bias[:o] = conv.bias
        cached = (key, padded.contiguous(memory_format=CL3), bias)
        conv._infvsr_padded = cached
    return cached[1], cached[2]


def _conv(conv: WanCausalConv3d, buf: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """The causal conv on a staged buffer, without its bias (the caller adds it, fused with other work).

    Time is already padded in the buffer; the spatial zero padding is conv3d's own.
    """
    pad_w, _, pad_h = conv._padding[:3]
    return F.conv3d(buf, conv.weight if weight is None else weight, None, conv.stride, (0, pad_h, pad_w))


def _causal(conv: WanCausalConv3d, x: torch.Tensor, cursor: _Cursor, norm: WanRMS_norm | None) -> torch.Tensor:
    buf = _stage(conv, x, cursor, norm)
    del x
    return _add_bias(_conv(conv, buf), conv.bias)


def _resblock(block: WanResidualBlock, x: torch.Tensor, cursor: _Cursor) -> torch.Tensor:
    """x + h in one pass at the end: conv2's bias, the shortcut's bias and the residual add share it."""
    shortcut = block.conv_shortcut
    bias = block.conv2.bias
    if isinstance(shortcut, nn.Identity):
        h = x
    else:
        h = F.conv3d(x, shortcut.weight, None)
        bias = bias.float() + shortcut.bias.float()
    buf = _stage(block.conv1, x, cursor, block.norm1)
    del x
    y = _conv(block.conv1, buf)
    del buf
    buf = _stage(block.conv2, y, cursor, block.norm2, pre_bias=block.conv1.bias)
    del y
    y = _conv(block.conv2, buf)
    del buf
    return _add_bias(y, bias, h)


def _attention(block: WanAttentionBlock, x: torch.Tensor) -> torch.Tensor:
    """The mid block's single-head attention over each frame's pixels, in token layout (no NCHW copies)."""
    b, c, t, h, w = x.shape
    tokens = x.permute(0, 2, 3, 4, 1).reshape(b * t, h * w, c)
    normed = rms_norm_rows(tokens.reshape(-1, c), block.norm.gamma, block.norm.scale, block.norm.bias, silu=False)
    qkv = F.linear(normed.view(b * t, h * w, c), block.to_qkv.weight.reshape(3 * c, c), block.to_qkv.bias)
    q, k, v = qkv.unsqueeze(1).chunk(3, dim=-1)
    out = F.scaled_dot_product_attention(q, k, v).squeeze(1)
    out = F.linear(out, block.proj.weight.reshape(c, c), block.proj.bias)
    out = out.view(b, t, h, w, c).permute(0, 4, 1, 2, 3)
    return out.add_(x)


def _per_frame(x: torch.Tensor) -> torch.Tensor:
    """(B, C, T, H, W) channels_last_3d -> (B*T, C, H, W) channels_last, a view."""
    b, c, t, h, w = x.shape
    return x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)


def _from_frames(y: torch.Tensor, b: int, t: int) -> torch.Tensor:
    return _to_cl3(y.unflatten(0, (b, t)).permute(0, 2, 1, 3, 4))


def _downsample(layer: WanResample, x: torch.Tensor, cursor: _Cursor) -> torch.Tensor:
    """ZeroPad2d((0, 1, 0, 1)) + stride-2 conv2d per frame; then, for downsample3d, the causal time conv."""
    b, c, t, h, w = x.shape
    frames = _per_frame(x)
    padded = torch.empty((b * t, c, h + 1, w + 1), dtype=x.dtype, device=x.device, memory_format=CL2)
    padded[:, :, h].zero_()
    padded[:, :, :h, w].zero_()
    padded[:, :, :h, :w].copy_(frames)
    del frames
    conv = layer.resample[1]
    y = _add_bias(F.conv2d(padded, conv.weight, None, conv.stride), conv.bias)
    del padded
    x = _from_frames(y, b, t)
    if layer.mode == "downsample3d":
        past = cursor.peek()
        if past is None:
            cursor.put(x.clone())
        else:
            new = x[:, :, -1:].clone()
            tc = layer.time_conv
            x = _add_bias(F.conv3d(torch.cat([past[:, :, -1:], x], 2), tc.weight, None, tc.stride), tc.bias)
            cursor.put(new)
    return x


def _upsample(layer: WanResample, x: torch.Tensor, cursor: _Cursor) -> torch.Tensor:
    """(upsample3d: causal time conv doubling the frames, then) nearest-exact 2x and conv2d per frame."""
    if layer.mode == "upsample3d":
        if cursor.peek() is None:
            cursor.put("Rep")  # a scene's first latent frame: no temporal upsampling
        else:
            b, c, t, h, w = x.shape
            y = _causal(layer.time_conv, x, cursor, None)  # (B, 2C, T, H, W)
            # channel half j becomes frame 2i + j: (B, T, H, W, 2, C) -> (B, T, 2, H, W, C)
            y = y.permute(0, 2, 3, 4, 1).view(b, t, h, w, 2, c).permute(0, 1, 4, 2, 3, 5).reshape(b, 2 * t, h, w, c)
            x = y.permute(0, 4, 1, 2, 3)
    b, c, t, h, w = x.shape
    # nearest-exact at exactly 2x maps output pixel i to input pixel i // 2: a repeat, value-exact.
    nhwc = _per_frame(x).permute(0, 2, 3, 1)
    up = nhwc[:, :, None, :, None, :].expand(b * t, h, 2, w, 2, c).reshape(b * t, 2 * h, 2 * w, c)
    del nhwc, x
    conv = layer.resample[1]
    y = _add_bias(F.conv2d(up.permute(0, 3, 1, 2), conv.weight, None, padding=conv.padding), conv.bias)
    del up
    return _from_frames(y, b, t)


def _mid(mid: nn.Module, x: torch.Tensor, cursor: _Cursor) -> torch.Tensor:
    x = _resblock(mid.resnets[0], x, cursor)
    for attn, resnet in zip(mid.attentions, mid.resnets[1:], strict=True):
        x = _attention(attn, x)
        x = _resblock(resnet, x, cursor)
    return x


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
    """cuDNN's algorithm search on, for the duration of a fast forward (restored after)."""

    def __enter__(self) -> None:
        self.saved = torch.backends.cudnn.benchmark
        torch.backends.cudnn.benchmark = self.saved or CUDNN_BENCHMARK

    def __exit__(self, *exc) -> None:
        torch.backends.cudnn.benchmark = self.saved


def _rgb_in(conv: WanCausalConv3d, x: torch.Tensor, cursor: _Cursor) -> torch.Tensor:
    """The first conv (RGB or latent input) with its input channels zero-padded when there are too few."""
    pad = PADDED_RGB if (x.is_cuda or PAD_OFF_CUDA) and x.shape[1] < PADDED_RGB else None
    buf = _stage(conv, x, cursor, None, channels=pad)
    weight = None if pad is None else _padded(conv, pad, None)[0]
    return _add_bias(_conv(conv, buf, weight), conv.bias)


def _rgb_out(conv: WanCausalConv3d, x: torch.Tensor, cursor: _Cursor, norm: WanRMS_norm) -> torch.Tensor:
    """The last conv (few output channels) computed with zero output channels appended, then sliced."""
    out = conv.out_channels
    if not (x.is_cuda or PAD_OFF_CUDA) or out >= PADDED_RGB:
        return _causal(conv, x, cursor, norm)
    weight, bias = _padded(conv, None, PADDED_RGB)
    buf = _stage(conv, x, cursor, norm)
    del x
    return _add_bias(_conv(conv, buf, weight), bias)[:, :out]


def fast_encoder(vae: AutoencoderKLWan, x: torch.Tensor, cache: list) -> torch.Tensor:
    """Same as `vae.encoder(x, feat_cache=cache, feat_idx=[0])`; output channels_last_3d."""
    with _CudnnBenchmark():
        return _encoder(vae, x, cache)


def fast_decoder(vae: AutoencoderKLWan, x: torch.Tensor, cache: list) -> torch.Tensor:
    """Same as `vae.decoder(x, feat_cache=cache, feat_idx=[0])` for Wan2.1; output channels_last_3d."""
    with _CudnnBenchmark():
        return _decoder(vae, x, cache)


def _encoder(vae: AutoencoderKLWan, x: torch.Tensor, cache: list) -> torch.Tensor:
    encoder = vae.encoder
    cursor = _Cursor(cache)
    x = _rgb_in(encoder.conv_in, x, cursor)
    for layer in encoder.down_blocks:
        if isinstance(layer, WanResidualBlock):
            x = _resblock(layer, x, cursor)
        elif isinstance(layer, WanResample):
            x = _downsample(layer, x, cursor)
        elif isinstance(layer, WanAttentionBlock):
            x = _attention(layer, x)
        else:
            raise TypeError(f"unsupported encoder layer {type(layer).__name__}")
    x = _mid(encoder.mid_block, x, cursor)
    return _causal(encoder.conv_out, x, cursor, encoder.norm_out)


def _decoder(vae: AutoencoderKLWan, x: torch.Tensor, cache: list) -> torch.Tensor:
    decoder = vae.decoder
    cursor = _Cursor(cache)
    x = _causal(decoder.conv_in, _to_cl3(x), cursor, None)
    x = _mid(decoder.mid_block, x, cursor)
    for block in decoder.up_blocks:
        for resnet in block.resnets:
            x = _resblock(resnet, x, cursor)
        if block.upsamplers is not None:
            x = _upsample(block.upsamplers[0], x, cursor)
    return _rgb_out(decoder.conv_out, x, cursor, decoder.norm_out)
