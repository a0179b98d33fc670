"""The layers of the fast VAE forward (fast_forward.py), channels-last, over diffusers' Wan2.1 modules.

Why these are not diffusers' forwards: its causal conv concatenates the
2-frame cache to the input and pads every dim (two full copies per conv), its
RMS norm makes several float32 passes, and it runs NCDHW. Here a causal conv
reads one staged buffer [zero pad | cached frames | norm + SiLU of x] that the
previous pass writes directly (`stage`), conv3d pads space itself, and bias,
residual and the next norm are fused into as few passes as the kernels allow.
Every function keeps diffusers' `feat_cache` entries exactly (`Cursor`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.models.autoencoders.autoencoder_kl_wan import (
    WanAttentionBlock,
    WanCausalConv3d,
    WanResample,
    WanResidualBlock,
    WanRMS_norm,
)
from torch import nn

from ..derived import derived
from ..fp8 import FP8_DTYPE
from ..kernels.fp8_conv import cast_into, fp8_conv_accepts, holds_pixel
from ..kernels.mid_attention import mid_attention, mid_attention_usable
from ..kernels.norm_silu import bias_add_rows_, rms_norm_rows, triton_usable
from ..kernels.rgb_in import few_in_conv, few_in_fits, pack_few_in
from ..kernels.rgb_out import few_out_conv, few_out_fits, pack_few_out
from ..kernels.split_conv import pack_split, split_conv, split_conv_usable
from ..kernels.subpixel import interleave
from ..memory.host import ArrivingCache
from .fp8_convs import (
    FP8_CONV_OUTPUTS,
    conv_fp8,
    fp8_candidate,
    input_scale,
    scaled_gamma,
    staged_values,
    takes_fp8,
)

CACHE_T = 2  # frames of history each causal 3x3x3 (or 3x1x1) conv keeps
CL3 = torch.channels_last_3d
CL2 = torch.channels_last
# cuDNN has no fast channels-last kernel for 3 channels (RGB in, RGB out): the first and last convs get zero
# channels up to this many (exact: zeros add nothing). In (where Triton is missing; kernels/rgb_in.py otherwise):
# 16 input channels are faster than 8; out: 8, 16 and 32 are alike (bench/check_kernels.py --sections rgb).
PADDED_RGB = 8
PADDED_RGB_IN = 16
# Output channels a causal conv computes with zero kernels appended: cuDNN's tiles are 64 or 128 outputs wide,
# so 96 -> 128 takes less time than 96 -> 96 (bench/check_kernels.py --sections split). The result is read as a
# channel slice (no copy).
PADDED_OUT = {96: 128}
# Most bytes one block of the mid attention's scores may take, counted as float32: the full score matrix grows
# with the square of a frame's tokens (32,400 for 1080p latents); queries go in blocks that fit this.
ATTENTION_SCORE_BYTES = 256 * 2**20


@dataclass(frozen=True)
class FastForwardOptions:
    """The fast forward's switches, passed explicitly to every call (`StreamingVAE.fast_options`).

    The defaults are the product's; the others exist for the tests (which run
    the GPU's code paths on the CPU) and for the benchmarks' A/B comparisons.
    """

    # The 192-channel causal convs with their epilogues through the Triton kernel (kernels/split_conv.py) where it
    # runs (Hopper); off: cuDNN and the separate passes.
    split_conv: bool = True
    # The mid attention through the flash-style Triton kernel (kernels/mid_attention.py) where Triton runs; off:
    # blocked GEMMs with a float32 softmax on every device.
    mid_attention_kernel: bool = True
    # When the full-resolution stages run in pieces, the decoder's spatial-only upsampler before them runs on those
    # pieces too, so its full-resolution output never exists for all frames at once; off: on all frames (other
    # conv calls, same arithmetic).
    piece_upsampler: bool = True
    # The zero-padded convs (RGB in and out, PADDED_OUT widths) off CUDA too, where nothing gains from them: lets
    # the CPU tests run the code the GPU runs.
    pad_off_cuda: bool = False
    # cuDNN times its algorithms once per shape during the forward (streamed chunks repeat a few shapes).
    cudnn_benchmark: bool = True
    # Causal convs with these output widths in float8 (kernels/fp8_conv.py) where its kernel runs (Hopper: see
    # `fp8_conv_usable`): the bf16 default keeps them off; `dtype="fp8"` turns on `FP8_CONV_OUTPUTS` (`FP8_OPTIONS`).
    fp8_conv_outputs: frozenset[int] = frozenset()
    # The norm + SiLU pass stores those convs' staged inputs in float8 itself (no cast pass after it; the
    # histories in the model's dtype unless `fp8_history`): on with the float8 convs (`FP8_OPTIONS`), where it
    # measured faster than the cast pass after the norm (bench/check_norm_fp8.py).
    fp8_norm_store: bool = False
    # The float8 convs with padded taps (96 input channels) read each row of three taps as one run of channels in
    # the tiles inside a frame's rows (`fp8_conv.row_taps_fit`; no padding there): on with the float8 convs
    # (`FP8_OPTIONS`), where it measured faster end to end (bench/bench_pipeline.py --fp8-row-taps on|off).
    fp8_row_taps: bool = False
    # The cache entries of the convs staged in float8 (`fp8_norm_store`) hold float8 too: the values the next call
    # would cast its history frames to, written by the pass that writes act (the same staged bytes), so that the
    # next call copies them instead of casting, and the entries take half the memory. Off: the entries stay in
    # the model's dtype (diffusers' own VAE can then read them).
    fp8_history: bool = False
    # The RGB head (96 -> 3) as one product of every tap and one gather of the contributions (kernels/rgb_out.py)
    # where Triton runs: reads its input once where cuDNN's kernels read it once per tap. The contributions round
    # to the model's dtype before the sum (cuDNN rounds the sum only): on with the float8 convs (`FP8_OPTIONS`),
    # where it measured faster (bench/bench_pipeline.py --rgb-out-taps on|off); the faithful bf16 default keeps
    # cuDNN.
    rgb_out_taps: bool = False


FP8_OPTIONS = FastForwardOptions(
    fp8_conv_outputs=FP8_CONV_OUTPUTS, fp8_norm_store=True, fp8_row_taps=True, fp8_history=True, rgb_out_taps=True
)
"""The fast forward of `dtype="fp8"`: the product's defaults with the float8 convs on, their inputs and cache
entries stored in float8 by the norm that makes them, and the RGB head's taps in one product."""


def to_cl3(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous(memory_format=CL3)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """(B, C, T, H, W) channels_last_3d -> (B*T*H*W, C) view (copies only if the layout is not channels-last;
    a channel slice of wider channels-last rows stays a view)."""
    rows = _channel_rows(x)
    return rows if rows is not None else x.permute(0, 2, 3, 4, 1).reshape(-1, x.shape[1])


def _channel_rows(x: torch.Tensor) -> torch.Tensor | None:
    """(B, C, ...) channels-last -> a (N, C) view (rows may be wider: a channel slice), or None if it has none."""
    moved = x.movedim(1, -1)
    if moved.stride(-1) != 1:
        return None
    try:
        return moved.view(-1, x.shape[1])
    except RuntimeError:  # pixels not evenly spaced in memory
        return None


def _add_bias(
    y: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor | None = None, out: torch.Tensor | None = None
) -> torch.Tensor:
    """y + bias [+ residual], one fused pass when both are channels-last: in place, or into a new compact tensor
    when y is a channel slice of a conv computed with padded outputs (`_padded_out_conv`), or into `out` (a
    channels-last view, e.g. the inside of a zero-bordered buffer: `zero_bordered`) when given."""
    rows = _channel_rows(y)
    res_rows = None if residual is None else _channel_rows(residual)
    fused = rows is not None and (residual is None or res_rows is not None)
    if out is not None:
        frames = out.permute(0, 2, 3, 4, 1)
        if fused and out.shape[0] == 1 and frames.stride(-1) == 1:
            bias_add_rows_(rows, bias, res_rows, out=frames[0])
        else:
            out.copy_(_add_bias(y, bias, residual))
        return out
    if bias is None and residual is None:
        return y
    if not fused:
        y.add_(bias.view(1, -1, *([1] * (y.ndim - 2))).to(y.dtype)) if bias is not None else None
        return y.add_(residual) if residual is not None else y
    if rows.stride(0) == y.shape[1]:
        bias_add_rows_(rows, bias, res_rows)
        return y
    result = torch.empty_like(y, memory_format=CL3 if y.ndim == 5 else CL2)
    bias_add_rows_(rows, bias, res_rows, out=_channel_rows(result))
    return result


def zero_bordered(shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    """A (B, C, T, H+1, W+1) channels-last buffer whose last row and column are zero: a downsampler's
    ZeroPad2d((0, 1, 0, 1)) input, which the previous layer writes inside (no padding copy)."""
    b, c, t, h, w = shape
    out = torch.empty((b, c, t, h + 1, w + 1), dtype=like.dtype, device=like.device, memory_format=CL3)
    out[:, :, :, h].zero_()
    out[:, :, :, :h, w].zero_()
    return out


def _norm(
    norm: WanRMS_norm,
    x: torch.Tensor,
    silu: bool,
    out: torch.Tensor | None = None,
    pre_bias: torch.Tensor | None = None,
    tail: torch.Tensor | None = None,
    out_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """WanRMS_norm of (x + pre_bias) over channels (then SiLU), channels-last in and out; into `out` if given.

    `tail` (B, C, k, H, W) channels-last: also receives the last k frames (one pass, when B is 1). An `out` in
    float8 receives the result / `out_scale` (`rms_norm_rows`); its pixels must be dense (a staged buffer)."""
    target = torch.empty_like(x, memory_format=CL3) if out is None else out
    rows_out = target.permute(0, 2, 3, 4, 1)
    flat = rows_out.view(-1, x.shape[1]) if rows_out.is_contiguous() else None
    if flat is None and target.dtype == FP8_DTYPE:
        raise ValueError("a float8 norm output must have dense pixels")
    tail_rows = tail.permute(0, 2, 3, 4, 1).view(-1, x.shape[1]) if tail is not None and flat is not None else None
    result = rms_norm_rows(
        _rows(x), norm.gamma, norm.scale, norm.bias, silu=silu, out=flat, pre_bias=pre_bias, tail=tail_rows,
        out_scale=out_scale,
    )  # fmt: skip
    if flat is None:
        rows_out.copy_(result.view(rows_out.shape))
    if tail is not None and tail_rows is None:
        tail.copy_(target[:, :, target.shape[2] - tail.shape[2] :])
    return target


class Cursor:
    """Walks a feat_cache list in diffusers' order (its `feat_idx`).

    `writable`: the list's tensors are its own (an offloaded history's upload: `ArrivingCache.owns_entries`), so a
    new entry may be written into the storage of the entry it replaces. Resident histories share their tensors
    with forked sessions (`VAEHistory.fork`) and are never written into."""

    def __init__(self, cache: list) -> None:
        self.cache = cache
        self.index = 0
        self.writable = isinstance(cache, ArrivingCache) and cache.owns_entries

    def peek(self):
        return self.cache[self.index]

    def put(self, value) -> None:
        self.cache[self.index] = value
        self.index += 1


def _stage(
    conv: WanCausalConv3d,
    x: torch.Tensor,
    cursor: Cursor,
    norm: WanRMS_norm | None,
    pre_bias: torch.Tensor | None = None,
    channels: int | None = None,
    options: FastForwardOptions | None = None,
) -> torch.Tensor:
    """The causal conv's input [zero pad | cached frames | act(x)] as one channels-last buffer.

    act is norm + SiLU of (x + pre_bias) when `norm` is given, else x itself;
    with `channels`, the buffer has that many channels, the extra ones zero
    (the cache keeps x's own channels). Stores the next
    cache entry exactly as diffusers does: the last 2 frames of act, or, when
    act has one frame, that frame behind the previous last one (or behind a
    zero frame after a temporal upsampler's "Rep").
    Where `options.fp8_norm_store` and the conv runs in float8 (`_fp8_stage_scale`),
    the buffer is float8, written by the norm pass itself; the cache entry
    keeps x's dtype, or is float8 too with `options.fp8_history`.
    """
    scale = None if options is None else _fp8_stage_scale(conv, tuple(x.shape), x, norm, channels, options)
    fp8_entry = options is not None and options.fp8_history  # applies where the buffer is float8 (`scale`)
    full, new, had_past = _open_stage(conv, x.shape, x, cursor, channels, fp8_scale=scale, fp8_entry=fp8_entry,
                                      norm=norm)  # fmt: skip
    c = x.shape[1]
    buf = full[:, :c]
    act = buf[:, :, CACHE_T:]
    if norm is None:
        act.copy_(x)
        if new is not None:
            new.copy_(act[:, :, -CACHE_T:])
    else:  # the cache's frames in the same pass
        _norm(norm, x, silu=True, out=act, pre_bias=pre_bias, tail=new, out_scale=scale)
    if new is None:  # act has 1 frame
        new = buf[:, :, CACHE_T - 1 :].clone() if had_past else act.clone()
    cursor.put(new)
    return full


def _fp8_stage_scale(
    conv: WanCausalConv3d,
    shape: tuple[int, ...],
    like: torch.Tensor,
    norm: WanRMS_norm | None,
    channels: int | None,
    options: FastForwardOptions,
) -> torch.Tensor | None:
    """The scale to stage act(x) (x: `shape`, on `like`'s device) in float8 with, where `options.fp8_norm_store`
    and the conv will run in float8 on it (else None): a norm's output (its static scale), x's own channels, at
    least CACHE_T frames (the cache entry then comes from the norm pass in x's dtype, never from the float8
    buffer)."""
    if not options.fp8_norm_store or channels is not None or len(shape) != 5 or shape[2] < CACHE_T:
        return None
    if not fp8_candidate(conv, norm, options.fp8_conv_outputs):
        return None
    b, c, t, h, w = shape
    if not fp8_conv_accepts(conv, (b, c, t + CACHE_T, h, w), like.device):
        return None
    return input_scale(norm)


def _open_stage(
    conv: WanCausalConv3d,
    shape: tuple[int, ...],
    like: torch.Tensor,
    cursor: Cursor,
    channels: int | None = None,
    fp8_scale: torch.Tensor | None = None,
    *,
    fp8_entry: bool = False,
    norm: WanRMS_norm | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, bool]:
    """A staged buffer for an act of `shape`, its zero pad and cached frames written, act's frames not yet.

    Returns (buffer, the tensor the next 2-frame cache entry goes into, or None
    when act has fewer frames, whether there was history). The cursor stays on
    this conv's entry: the caller writes act, then puts the entry. With
    `fp8_scale` the buffer is float8 (the cached frames cast with that scale,
    or copied where they are float8 already); the entry keeps `like`'s dtype,
    or is float8 with `fp8_entry` (`FastForwardOptions.fp8_history`). `norm`:
    the norm that makes act, whose scale reads a float8 entry back into a
    buffer in `like`'s dtype (a call the float8 kernel does not take).
    """
    if conv._padding[4] != CACHE_T:
        raise ValueError(f"causal conv with time padding {conv._padding[4]} is not supported")
    past = cursor.peek()
    rep = isinstance(past, str)
    past = None if rep else past
    b, c, t, h, w = shape
    kept = 0 if past is None else min(past.shape[2], CACHE_T)
    total = c if channels is None else channels
    dtype = like.dtype if fp8_scale is None else FP8_DTYPE
    full = torch.empty((b, total, CACHE_T + t, h, w), dtype=dtype, device=like.device, memory_format=CL3)
    if total > c:
        full[:, c:].zero_()
    buf = full[:, :c]
    if kept < CACHE_T:
        buf[:, :, : CACHE_T - kept].zero_()
    if kept:
        _put_history(buf[:, :, CACHE_T - kept : CACHE_T], past[:, :, past.shape[2] - kept :], fp8_scale, norm)
    new = None
    if t >= CACHE_T:
        # The new entry goes into the old one's storage where that is this call's own (after the copy above, in
        # stream order): an offloaded tile's history then lives in the blocks its upload took, not in fresh ones
        # scattered among the activations, which fragmented the allocator's pool (allocation retries under a
        # memory cap).
        entry = (b, c, CACHE_T, h, w)
        entry_dtype = FP8_DTYPE if fp8_entry and fp8_scale is not None else like.dtype
        new = past if cursor.writable and _fits(past, entry_dtype, like.device, entry) else None
        if new is None:
            new = torch.empty(entry, dtype=entry_dtype, device=like.device, memory_format=CL3)
    return full, new, past is not None or rep


def _put_history(
    target: torch.Tensor, frames: torch.Tensor, fp8_scale: torch.Tensor | None, norm: WanRMS_norm | None
) -> None:
    """A cache entry's frames into a staged buffer's history slots: copied where both have one dtype, cast to
    float8 with `fp8_scale`, or a float8 entry (`fp8_history`) read back with its norm's scale."""
    fp8_in, fp8_out = frames.dtype == FP8_DTYPE, target.dtype == FP8_DTYPE
    if fp8_out and not fp8_in:
        cast_into(target, frames.contiguous(memory_format=CL3), fp8_scale)
    elif fp8_in and not fp8_out:
        if norm is None:
            raise ValueError("a float8 cache entry is read back with the scale of the norm that wrote it")
        target.copy_(staged_values(frames, norm))
    else:
        target.copy_(frames)


def _fits(past: torch.Tensor | None, dtype: torch.dtype, device: torch.device, shape: tuple[int, ...]) -> bool:
    """Whether `past` can take a new cache entry of `shape` in place (channels-last, that dtype and device)."""
    if past is None or tuple(past.shape) != shape or past.dtype != dtype or past.device != device:
        return False
    if past.is_inference() and not torch.is_inference_mode_enabled():
        return False
    return past.is_contiguous(memory_format=CL3)


def _padded(conv: nn.Conv3d, in_channels: int | None, out_channels: int | None) -> torch.Tensor:
    """conv's weight with zero input/output channels appended (cached on the module)."""

    def build(w: torch.Tensor, in_channels: int | None, out_channels: int | None):
        o, i = w.shape[:2]
        padded = w.new_zeros((out_channels or o, in_channels or i, *w.shape[2:]))
        padded[:o, :i] = w
        return padded.contiguous(memory_format=CL3)

    return derived(conv, "_infvsr_padded", build, in_channels, out_channels)


def _conv(conv: WanCausalConv3d, buf: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """The causal conv on a staged buffer, without its bias (the caller adds it, fused with other work).

    Time is already padded in the buffer; the spatial zero padding is conv3d's own.
    """
    pad_w, _, pad_h = conv._padding[:3]
    return F.conv3d(buf, conv.weight if weight is None else weight, None, conv.stride, (0, pad_h, pad_w))


def causal_conv(
    conv: WanCausalConv3d, x: torch.Tensor, cursor: Cursor, norm: WanRMS_norm | None, options: FastForwardOptions
) -> torch.Tensor:
    """diffusers' causal conv of act(x) (norm + SiLU when `norm` is given), with its cache entry; channels-last."""
    buf = _stage(conv, x, cursor, norm, options=options)
    del x
    return _conv_plus(conv, buf, options, norm, conv.bias)


def _conv_plus(
    conv: WanCausalConv3d,
    buf: torch.Tensor,
    options: FastForwardOptions,
    norm: WanRMS_norm | None,
    bias: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """The causal conv on its staged buffer + bias [+ residual] (into `out` when given; `norm`: what made buf).
    In float8 where `options.fp8_conv_outputs` and the kernel take it (the additions in its epilogue); else
    cuDNN (`_padded_out_conv`) and one fused pass for the additions (none when there are none)."""
    if takes_fp8(conv, buf, norm, options.fp8_conv_outputs):
        result = conv_fp8(conv, buf, norm, bias, residual, out, row_taps=options.fp8_row_taps)
        if result is not None:
            return result
    if buf.dtype == FP8_DTYPE:  # staged in float8, but no kernel configuration ran: back to the norm's values
        buf = staged_values(buf, norm).to(conv.weight.dtype).contiguous(memory_format=CL3)
    if options.rgb_out_taps and residual is None and out is None and few_out_fits(conv.weight) and triton_usable(buf):
        return few_out_conv(buf, conv.weight, derived(conv, "_infvsr_few_out", pack_few_out), bias, use_triton=True)
    return _add_bias(_padded_out_conv(conv, buf, options), bias, residual, out)


def _padded_out_conv(conv: WanCausalConv3d, buf: torch.Tensor, options: FastForwardOptions) -> torch.Tensor:
    """The causal conv without its bias, computed with PADDED_OUT outputs when that is faster (PADDED_RGB when it
    has fewer: the RGB head); its real channels, a slice of the padded ones that the next pass reads in place."""
    out = conv.out_channels
    wide = None
    if buf.is_cuda or options.pad_off_cuda:
        wide = PADDED_OUT.get(out, PADDED_RGB if out < PADDED_RGB else None)
    if wide is None:
        return _conv(conv, buf)
    return _conv(conv, buf, _padded(conv, None, wide))[:, :out]


def resblock(
    block: WanResidualBlock,
    x: torch.Tensor,
    cursor: Cursor,
    options: FastForwardOptions,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """x + h in one pass at the end: conv2's bias, the shortcut's bias and the residual add share it (written into
    `out` when given). 192-channel convs on Hopper run as one Triton kernel each (kernels/split_conv.py): conv1
    writes norm2 + SiLU straight into conv2's staged buffer, conv2 adds the biases and the residual itself. In
    float8 (`fp8_conv_outputs`) conv1 does the same through the float8 kernel (`_fp8_into_next_norm`)."""
    shortcut = block.conv_shortcut
    bias = block.conv2.bias
    if isinstance(shortcut, nn.Identity):
        h = x
    else:
        h = F.conv3d(x, shortcut.weight, None)
        bias = bias.float() + shortcut.bias.float()
    buf = _stage(block.conv1, x, cursor, block.norm1, options=options)
    del x
    if (
        _split(block.conv1, buf, block.norm1, options)
        and buf.shape[2] >= 2 * CACHE_T
        and not isinstance(block.norm2.bias, torch.Tensor)
    ):
        b, _, frames, height, width = buf.shape
        shape = (b, block.conv1.out_channels, frames - CACHE_T, height, width)
        staged, new, _ = _open_stage(block.conv2, shape, buf, cursor, norm=block.norm2)
        act = staged[:, :, CACHE_T:]
        conv1, norm2 = block.conv1, block.norm2
        gamma = scaled_gamma(norm2)
        if split_conv(buf, _split_weight(conv1), conv1.bias.float(), gamma=gamma, act=act, tail=new) is None:
            _norm(norm2, _padded_out_conv(conv1, buf, options), silu=True, out=act, pre_bias=conv1.bias, tail=new)
        cursor.put(new)
        buf = staged
    elif (staged := _fp8_into_next_norm(block, buf, cursor, options)) is not None:
        buf = staged
    else:
        y = _conv_plus(block.conv1, buf, options, block.norm1)  # its bias goes into norm2's pass
        del buf
        buf = _stage(block.conv2, y, cursor, block.norm2, pre_bias=block.conv1.bias, options=options)
        del y
    if _split(block.conv2, buf, block.norm2, options):
        result = split_conv(buf, _split_weight(block.conv2), bias.float(), h, out=out)
        if result is not None:
            return result
    return _conv_plus(block.conv2, buf, options, block.norm2, bias, h, out)


def _fp8_into_next_norm(
    block: WanResidualBlock, buf: torch.Tensor, cursor: Cursor, options: FastForwardOptions
) -> torch.Tensor | None:
    """conv2's float8 staged buffer, written by conv1's float8 kernel with norm2 + SiLU in its epilogue (conv1's
    output is never stored, and norm2 makes no pass of its own), and conv2's cache entry; None where that does
    not apply (the caller runs conv1, then norm2's pass). Applies where both convs run in float8, norm2 stores
    float8 (`fp8_norm_store`), conv1's outputs fit one program (`holds_pixel`) and the entry comes whole from
    this call (at least 2 new frames)."""
    conv1, conv2, norm2 = block.conv1, block.conv2, block.norm2
    if (
        isinstance(norm2.bias, torch.Tensor)
        or buf.shape[2] < 2 * CACHE_T
        or not holds_pixel(conv1.out_channels)
        or not takes_fp8(conv1, buf, block.norm1, options.fp8_conv_outputs)
    ):
        return None
    b, _, frames, height, width = buf.shape
    shape = (b, conv1.out_channels, frames - CACHE_T, height, width)
    model = conv1.weight  # the model's dtype and device: what conv2's cache entry keeps
    scale = _fp8_stage_scale(conv2, shape, model, norm2, None, options)
    if scale is None:
        return None
    staged, new, _ = _open_stage(conv2, shape, model, cursor, fp8_scale=scale, fp8_entry=options.fp8_history,
                                 norm=norm2)  # fmt: skip
    act = staged[:, :, CACHE_T:]
    done = conv_fp8(conv1, buf, block.norm1, conv1.bias, next_norm=norm2, act=act, tail=new,
                    row_taps=options.fp8_row_taps)  # fmt: skip
    if done is None:
        y = _conv_plus(conv1, buf, options, block.norm1)  # no kernel configuration ran: the float path
        _norm(norm2, y, silu=True, out=act, pre_bias=conv1.bias, tail=new, out_scale=scale)
    cursor.put(new)
    return staged


def _split(conv: WanCausalConv3d, buf: torch.Tensor, norm: WanRMS_norm, options: FastForwardOptions) -> bool:
    widths = options.fp8_conv_outputs
    return options.split_conv and split_conv_usable(conv, buf) and not takes_fp8(conv, buf, norm, widths)


def _split_weight(conv: WanCausalConv3d) -> torch.Tensor:
    return derived(conv, "_infvsr_split", pack_split)


def _attention_blocks(frames: int, tokens: int) -> tuple[int, int]:
    """(frames, query rows) per attention block, so that its float32 scores fit ATTENTION_SCORE_BYTES.

    Whole frames are grouped while one frame's scores fit; otherwise one frame's
    queries are split (so every block's slice of the output stays contiguous).
    """
    per_frame = 4 * tokens * tokens
    if per_frame <= ATTENTION_SCORE_BYTES:
        return max(1, min(frames, ATTENTION_SCORE_BYTES // per_frame)), tokens
    return 1, max(1, ATTENTION_SCORE_BYTES // (4 * tokens))


def _scores(queries: torch.Tensor, keys: torch.Tensor, scale: float) -> torch.Tensor:
    """scale * queries @ keys as float32 (float32 accumulation, no rounding to the inputs' half dtype)."""
    empty = torch.empty((*queries.shape[:2], keys.shape[-1]), dtype=torch.float32, device=queries.device)
    if queries.dtype == torch.float32:
        return torch.baddbmm(empty, queries, keys, beta=0.0, alpha=scale)
    if queries.is_cuda and not _NO_OUT_DTYPE:
        try:
            return torch.baddbmm(empty, queries, keys, beta=0.0, alpha=scale, out_dtype=torch.float32)
        except (TypeError, RuntimeError, NotImplementedError):  # a torch without half -> float32 GEMMs
            _NO_OUT_DTYPE.append(True)
    return torch.baddbmm(empty, queries.float(), keys.float(), beta=0.0, alpha=scale)


# Not a switch: remembers that this torch's baddbmm refused out_dtype, so that it is not tried (and raised) again.
_NO_OUT_DTYPE: list[bool] = []


def _blocked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax(scale * q k^T) v over (frames, tokens, C), queries in blocks whose scores fit ATTENTION_SCORE_BYTES:
    the GEMM writes its float32 accumulators with the scale applied (`out_dtype`, on CUDA), the softmax runs on
    them (the path where the kernel of kernels/mid_attention.py cannot run)."""
    n, hw, c = q.shape
    keys = k.transpose(1, 2)
    out = torch.empty((n, hw, c), dtype=v.dtype, device=v.device)
    frames, rows = _attention_blocks(n, hw)
    for f in range(0, n, frames):
        for r in range(0, hw, rows):
            queries = q[f : f + frames, r : r + rows]
            scores = _scores(queries, keys[f : f + frames], scale)
            probs = torch.softmax(scores, dim=-1).to(v.dtype)
            del scores
            torch.matmul(probs, v[f : f + frames], out=out[f : f + frames, r : r + rows])
            del probs
    return out


def attention(block: WanAttentionBlock, x: torch.Tensor, options: FastForwardOptions) -> torch.Tensor:
    """The mid block's single-head attention over each frame's pixels, in token layout (no NCHW copies).

    Not SDPA, whose only kernel for a head dim of 384 is slow: the flash-style
    Triton kernel (kernels/mid_attention.py) where Triton runs and
    `options.mid_attention_kernel` allows, else explicit matmuls
    (`_blocked_attention`). Either way the scores stay float32 as in
    SDPA's kernels (bf16 scores would round logits of ~50 by ~0.1, i.e. move
    attention weights by ~10 %) and the probabilities go to v's dtype for the
    second product.
    """
    b, c, t, h, w = x.shape
    n, hw = b * t, h * w
    tokens = x.permute(0, 2, 3, 4, 1).reshape(n, hw, c)
    normed = rms_norm_rows(tokens.reshape(-1, c), block.norm.gamma, block.norm.scale, block.norm.bias, silu=False)
    qkv = F.linear(normed.view(n, hw, c), block.to_qkv.weight.reshape(3 * c, c), block.to_qkv.bias)
    del normed
    scale = c**-0.5  # SDPA's default
    out = mid_attention(qkv, scale) if options.mid_attention_kernel and mid_attention_usable(qkv) else None
    if out is None:
        out = _blocked_attention(*qkv.chunk(3, dim=-1), scale)
    del qkv
    out = F.linear(out, block.proj.weight.reshape(c, c), block.proj.bias)
    out = out.view(b, t, h, w, c).permute(0, 4, 1, 2, 3)
    return out.add_(x)


def _per_frame(x: torch.Tensor) -> torch.Tensor:
    """(B, C, T, H, W) channels_last_3d -> (B*T, C, H, W) channels_last, a view."""
    b, c, t, h, w = x.shape
    return x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)


def _from_frames(y: torch.Tensor, b: int, t: int) -> torch.Tensor:
    return to_cl3(y.unflatten(0, (b, t)).permute(0, 2, 1, 3, 4))


def downsample(
    layer: WanResample, x: torch.Tensor, cursor: Cursor, bordered: torch.Tensor | None = None
) -> torch.Tensor:
    """ZeroPad2d((0, 1, 0, 1)) + stride-2 conv2d per frame; then, for downsample3d, the causal time conv.

    `bordered`: a `zero_bordered` buffer already holding x inside (else x is copied into a new one)."""
    b, c, t, h, w = x.shape
    if bordered is None:
        bordered = zero_bordered(x.shape, x)
        bordered[:, :, :, :h, :w].copy_(x)
    del x
    padded = _per_frame(bordered)
    del bordered
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


# Nearest 2x then a 3x3 tap per axis, seen from the low-res input: output phase p (pixel 2i + p) reads
# low-res offsets (-1, 0) for p = 0 and (0, +1) for p = 1, each with these sums of the 3 taps.
_PHASE_TAPS = (((1.0, 0.0, 0.0), (0.0, 1.0, 1.0)), ((1.0, 1.0, 0.0), (0.0, 0.0, 1.0)))


def _is_subpixel(conv: nn.Module) -> bool:
    """Whether conv is the plain 3x3, padding-1 conv2d that the sub-pixel form reproduces."""
    return (
        isinstance(conv, nn.Conv2d)
        and conv.kernel_size == (3, 3)
        and conv.padding == (1, 1)
        and conv.stride == (1, 1)
        and conv.dilation == (1, 1)
        and conv.groups == 1
        and conv.padding_mode == "zeros"
    )


def _subpixel_weight(conv: nn.Conv2d) -> torch.Tensor:
    """The 3x3 kernel as four 2x2 low-res kernels, phase (a, b) in output channels group 2a + b (cached on conv).

    Taps are summed in float32, then cast once to the weight's dtype.
    """

    def build(w: torch.Tensor) -> torch.Tensor:
        taps = torch.tensor(_PHASE_TAPS, dtype=torch.float32, device=w.device)  # (phase, low-res tap, 3x3 tap)
        combined = torch.einsum("aur,bvs,oirs->aboiuv", taps, taps, w.detach().float())
        combined = combined.reshape(4 * w.shape[0], w.shape[1], 2, 2).to(w.dtype)
        return combined.contiguous(memory_format=CL2)

    return derived(conv, "_infvsr_subpixel", build)


def _subpixel_conv(conv: nn.Conv2d, frames: torch.Tensor) -> torch.Tensor:
    """conv(nearest-exact 2x of frames) for (N, C, H, W) channels-last frames, computed at low resolution.

    One 2x2 conv (padding 1) gives each phase's (H+1)x(W+1) map; phase (a, b)
    at (i + a, j + b) is output pixel (2i + a, 2j + b). The interleave and the
    bias add are one pass into the channels-last output (kernels/subpixel.py).
    """
    y = F.conv2d(frames, _subpixel_weight(conv), None, padding=1).permute(0, 2, 3, 1)  # (N, H+1, W+1, 4*Cout)
    return interleave(y, conv.bias, conv.out_channels)


def upsample(layer: WanResample, x: torch.Tensor, cursor: Cursor, options: FastForwardOptions) -> torch.Tensor:
    """(upsample3d: causal time conv doubling the frames, then) nearest-exact 2x and conv2d per frame."""
    if layer.mode == "upsample3d":
        if cursor.peek() is None:
            cursor.put("Rep")  # a scene's first latent frame: no temporal upsampling
        else:
            b, c, t, h, w = x.shape
            y = causal_conv(layer.time_conv, x, cursor, None, options)  # (B, 2C, T, H, W)
            # channel half j becomes frame 2i + j: (B, T, H, W, 2, C) -> (B, T, 2, H, W, C)
            y = y.permute(0, 2, 3, 4, 1).view(b, t, h, w, 2, c).permute(0, 1, 4, 2, 3, 5).reshape(b, 2 * t, h, w, c)
            x = y.permute(0, 4, 1, 2, 3)
    b, c, t, h, w = x.shape
    conv = layer.resample[1]
    if _is_subpixel(conv):
        frames = _per_frame(x)
        del x
        return _from_frames(_subpixel_conv(conv, frames), b, t)
    # nearest-exact at exactly 2x maps output pixel i to input pixel i // 2: a repeat, value-exact.
    nhwc = _per_frame(x).permute(0, 2, 3, 1)
    up = nhwc[:, :, None, :, None, :].expand(b * t, h, 2, w, 2, c).reshape(b * t, 2 * h, 2 * w, c)
    del nhwc, x
    y = _add_bias(F.conv2d(up.permute(0, 3, 1, 2), conv.weight, None, padding=conv.padding), conv.bias)
    del up
    return _from_frames(y, b, t)


def rgb_in_conv(conv: WanCausalConv3d, x: torch.Tensor, cursor: Cursor, options: FastForwardOptions) -> torch.Tensor:
    """The encoder's first conv (RGB input): the Triton kernel for few inputs (cuDNN is slow on 3 channels), else
    cuDNN with the input channels zero-padded."""
    if few_in_fits(conv.weight) and triton_usable(x):
        buf = _stage(conv, x, cursor, None)
        return few_in_conv(buf, conv.weight, derived(conv, "_infvsr_few_in", pack_few_in), conv.bias)
    pad = PADDED_RGB_IN if (x.is_cuda or options.pad_off_cuda) and x.shape[1] < PADDED_RGB_IN else None
    buf = _stage(conv, x, cursor, None, channels=pad)
    weight = None if pad is None else _padded(conv, pad, None)
    return _add_bias(_conv(conv, buf, weight), conv.bias)
