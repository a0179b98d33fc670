"""The float8 causal conv (kernels/fp8_conv.py) against float64 convs, and its quantization helpers.

The kernel tests need Triton's interpreter (TRITON_INTERPRET=1 before triton is imported): the last test runs this
file again in a subprocess with it, where the kernel runs on CPU tensors with real float8 operands (the
interpreter's float8 loads and products are exact). In the plain run the kernel cannot launch on CPU tensors, and
those tests check that the caller is told so (None: cuDNN's path).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from infvsr_core.fp8 import FP8_DTYPE, FP8_MAX
from infvsr_core.kernels import fp8_conv as module
from infvsr_core.kernels.fp8_conv import (
    Config,
    fp8_conv,
    fp8_conv_usable,
    pack_fp8_conv_weight,
    quantize_staged,
    static_activation_scale,
)
from infvsr_core.kernels.norm_silu import INTERPRETED, rms_norm_rows, rms_norm_rows_reference

ROOT = Path(__file__).resolve().parents[1]
CL3 = torch.channels_last_3d
# The kernel against a float64 conv of the same float8 values: only float32 sums in another order and the
# float32 scale products differ (relative to the output's largest magnitude).
SAME_OPERANDS_TOL = 1e-5
# bfloat16 output: one bf16 step (2**-7 of a value): the interpreter's float32 -> bfloat16 cast truncates (the
# GPU's rounds to nearest, half that).
BF16_OUT_TOL = 2.0**-7 * 1.01
# Against the unquantized operands: both operands rounded to float8 (3 mantissa bits, a relative error of a few
# percent per operand) give a relative Frobenius error of a few percent on these random convs.
END_TO_END_TOL = 6e-2

# (input channels, outputs, frames out, H, W, configuration): every way the kernel covers pixels and outputs.
CASES = {
    "one product, one row per block": (32, 32, 2, 3, 32, Config(32, 32, 0, 128, 1, 4)),
    "96 as 64 + 32 sharing the input tile; blocks of 4 rows x 16 (past H); K in 2 blocks per tap": (
        64, 96, 3, 3, 16, Config(64, 64, 32, 32, 1, 4)
    ),
    "112 in two groups of 32 + 32 (the second's last 16 empty)": (32, 112, 2, 3, 32, Config(32, 32, 32, 128, 1, 4)),
    "96 in one 128-wide product; one row per block, its end masked; each tap one 128-deep block past Cin": (
        96, 96, 1, 2, 48, Config(128, 128, 0, 128, 1, 4, rows=False)
    ),
    "96 in: each tap in 3 blocks of 32 (the packed weight's padding columns never read)": (
        96, 96, 2, 2, 16, Config(32, 64, 32, 32, 1, 4)
    ),
    "96 in: each tap in 2 blocks of 64, the second half past Cin": (96, 32, 1, 3, 16, Config(32, 32, 0, 64, 1, 4)),
}  # fmt: skip


def staged(c: int, frames: int, h: int, w: int, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(1, c, frames, h, w, generator=gen).to(dtype).contiguous(memory_format=CL3)


def channels_last(*shape: int) -> torch.Tensor:
    """A float32 output buffer with adjacent channels, NaN until written (an unwritten pixel shows)."""
    return torch.full(shape, float("nan")).contiguous(memory_format=CL3)


def norm_output(c: int, frames: int, h: int, w: int, gamma: torch.Tensor, seed: int) -> torch.Tensor:
    """A staged buffer as the VAE's norm pass writes it: SiLU(RMS norm(x) x gamma) of random x."""
    x = staged(c, frames, h, w, seed)
    rows = rms_norm_rows_reference(x.permute(0, 2, 3, 4, 1).reshape(-1, c), gamma, c**0.5, 0.0, silu=True)
    return rows.view(1, frames, h, w, c).permute(0, 4, 1, 2, 3)


def unpack(packed: torch.Tensor, w_scale: torch.Tensor, cin: int) -> torch.Tensor:
    """The float64 (Cout, Cin, 3, 3, 3) weight that packed float8 rows stand for (tap-major, channels inside,
    each tap's columns past Cin dropped)."""
    rows = packed.double() * w_scale.double()[:, None]
    return rows.view(-1, 27, module.tap_depth(cin))[:, :, :cin].reshape(-1, 3, 3, 3, cin).permute(0, 4, 1, 2, 3)


def conv64(buf: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, residual=None) -> torch.Tensor:
    y = F.conv3d(buf.double(), weight.double(), bias.double(), 1, (0, 1, 1))
    return y if residual is None else y + residual.double()


def rel_max(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want).abs().max() / want.abs().max()).item()


def rel_frobenius(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want).norm() / want.norm()).item()


@pytest.fixture
def fresh(monkeypatch):
    """The module's remembered configurations, empty for each test (and restored after)."""
    monkeypatch.setattr(module, "_chosen", {})
    monkeypatch.setattr(module, "_failures", [])
    monkeypatch.setattr(module, "CONFIGS", {})
    return module


@pytest.mark.parametrize("tma_out", [True, False], ids=["copy-engine stores", "element stores"])
@pytest.mark.parametrize("case", list(CASES))
def test_fp8_conv_matches_conv3d_on_its_quantized_operands(fresh, case, tma_out):
    """Output with bias (float32, to see the kernel's own error), and bias + residual into a zero-bordered
    buffer's inside (the border stays zero: the copy engine's boxes stop at the view's edges)."""
    cin, cout, t, h, w, config = CASES[case]
    fresh.CONFIGS[cout] = (config,)
    gen = torch.Generator().manual_seed(3)
    buf8, x_scale = quantize_staged(staged(cin, t + 2, h, w, seed=4))
    packed, w_scale = pack_fp8_conv_weight(torch.randn(cout, cin, 3, 3, 3, generator=gen) / (27 * cin) ** 0.5)
    bias = torch.randn(cout, generator=gen)
    residual = torch.randn(1, cout, t, h, w, generator=gen).contiguous(memory_format=CL3)
    out = channels_last(1, cout, t, h, w)
    got = fp8_conv(buf8, x_scale, packed, w_scale, bias, out=out, tma_out=tma_out)
    if not INTERPRETED:  # no kernel runs on CPU tensors: None, for the caller's cuDNN path
        assert got is None and fresh._chosen[(buf8.device, cin, cout, w & -w)] == -1
        return
    want = conv64(buf8.double() * x_scale.double(), unpack(packed, w_scale, cin), bias)
    assert got is out and rel_max(got, want) < SAME_OPERANDS_TOL
    bordered = torch.zeros(1, cout, t, h + 1, w + 1).contiguous(memory_format=CL3)
    got = fp8_conv(buf8, x_scale, packed, w_scale, bias, residual, out=bordered[:, :, :, :h, :w], tma_out=tma_out)
    want = conv64(buf8.double() * x_scale.double(), unpack(packed, w_scale, cin), bias, residual)
    assert rel_max(got, want) < SAME_OPERANDS_TOL
    assert not bordered[:, :, :, h].any() and not bordered[:, :, :, :, w].any()
    assert not fresh._failures


def test_fp8_conv_writes_bf16_by_default(fresh):
    cin, cout, t, h, w, config = CASES["one product, one row per block"]
    fresh.CONFIGS[cout] = (config,)
    buf8, x_scale = quantize_staged(staged(cin, t + 2, h, w, seed=14))
    packed, w_scale = pack_fp8_conv_weight(torch.randn(cout, cin, 3, 3, 3) / (27 * cin) ** 0.5)
    bias = torch.randn(cout)
    got = fp8_conv(buf8, x_scale, packed, w_scale, bias)
    if not INTERPRETED:
        assert got is None
        return
    assert got.dtype == torch.bfloat16 and got.shape == (1, cout, t, h, w) and got.is_contiguous(memory_format=CL3)
    assert rel_max(got, conv64(buf8.double() * x_scale.double(), unpack(packed, w_scale, cin), bias)) < BF16_OUT_TOL


@pytest.mark.parametrize("scale", ["static", "dynamic"])
def test_fp8_conv_error_against_the_unquantized_conv(fresh, scale):
    """Norm outputs, quantized with the norm's static scale or the dynamic one, against the float64 conv of the
    unquantized values: the error of float8 operands, within END_TO_END_TOL (and not zero: they are float8)."""
    cin, cout, t, h, w = 64, 96, 2, 3, 32
    fresh.CONFIGS[cout] = (Config(64, 64, 32, 128, 1, 4),)
    gen = torch.Generator().manual_seed(5)
    gamma = torch.rand(cin, generator=gen) + 0.5
    buf = norm_output(cin, t + 2, h, w, gamma, seed=6)
    weight = torch.randn(cout, cin, 3, 3, 3, generator=gen) / (27 * cin) ** 0.5
    bias = torch.randn(cout, generator=gen) * 0.1
    buf8, x_scale = quantize_staged(buf, static_activation_scale(gamma, cin) if scale == "static" else None)
    got = fp8_conv(buf8, x_scale, *pack_fp8_conv_weight(weight), bias, out=channels_last(1, cout, t, h, w))
    if not INTERPRETED:
        assert got is None
        return
    error = rel_frobenius(got, conv64(buf, weight, bias))
    assert 1e-3 < error < END_TO_END_TOL


def test_fp8_conv_row_form_for_padded_taps(fresh):
    """96 input channels (taps padded to 128): the tiles inside their row read each (dt, dh) row of taps as one
    288-channel run (`row_packed`), the tiles at a row's ends take the padded taps. Both against the float64 conv
    of the same operands; with a zero row weight, the inside tiles give the bias alone and the end tiles are
    untouched: each kind of tile took its own path."""
    cin, cout, t, h, w = 96, 96, 2, 3, 64
    assert module.row_taps_fit(cin) and not module.row_taps_fit(128) and not module.row_taps_fit(64)
    fresh.CONFIGS[cout] = (Config(16, 64, 32, 128, 1, 4),)  # 16-pixel tiles: 0 and 48 at the ends, 16, 32 inside
    gen = torch.Generator().manual_seed(31)
    buf8, x_scale = quantize_staged(staged(cin, t + 2, h, w, seed=32))
    weight = torch.randn(cout, cin, 3, 3, 3, generator=gen) / (27 * cin) ** 0.5
    packed, w_scale = pack_fp8_conv_weight(weight)
    rows = module.pack_fp8_row_weight(weight)
    bias = torch.randn(cout, generator=gen)
    got = fp8_conv(buf8, x_scale, packed, w_scale, bias, out=channels_last(1, cout, t, h, w), row_packed=rows)
    if not INTERPRETED:
        assert got is None
        return
    want = conv64(buf8.double() * x_scale.double(), unpack(packed, w_scale, cin), bias)
    assert rel_max(got, want) < SAME_OPERANDS_TOL
    poisoned = fp8_conv(buf8, x_scale, packed, w_scale, bias, out=channels_last(1, cout, t, h, w),
                        row_packed=torch.zeros_like(rows))  # fmt: skip
    ends, inside = [*range(16), *range(48, 64)], list(range(16, 48))
    assert torch.equal(poisoned[..., ends], got[..., ends])
    assert torch.allclose(poisoned[..., inside], bias.view(1, -1, 1, 1, 1).expand_as(poisoned[..., inside]))
    with pytest.raises(ValueError, match="row-packed"):
        fp8_conv(buf8, x_scale, packed, w_scale, bias, row_packed=rows[:, :-32])


@pytest.mark.parametrize("tma_out", [True, False], ids=["copy-engine stores", "element stores"])
@pytest.mark.parametrize("cout, config", [(96, Config(64, 64, 32, 128, 1, 4)), (32, Config(32, 32, 0, 128, 1, 4))])
def test_fp8_conv_with_the_next_norm_in_its_epilogue(fresh, cout, config, tma_out):
    """A resblock's first conv with norm2 + SiLU in its epilogue (`gamma`): act holds SiLU(normalize(conv + bias)
    x gamma) / act_scale in float8 (against a float64 conv, norm and SiLU of the same float8 operands, then
    PyTorch's float8 cast: codes equal but where float32's rounding crosses a float8 midpoint, one step apart
    there), the cache entry (tail) the last 2 frames of those values in the output dtype, or in float8 act's
    own bytes; the staged buffer's history frames are not touched."""
    cin, t, h, w = 64, 3, 3, 16
    fresh.CONFIGS[cout] = (config,)
    gen = torch.Generator().manual_seed(21)
    gamma1 = torch.rand(cin, generator=gen) + 0.5
    x = norm_output(cin, t + 2, h, w, gamma1, seed=22)
    buf8, x_scale = quantize_staged(x, static_activation_scale(gamma1, cin))
    packed, w_scale = pack_fp8_conv_weight(torch.randn(cout, cin, 3, 3, 3, generator=gen) / (27 * cin) ** 0.5)
    bias = torch.randn(cout, generator=gen) * 0.1
    gamma2 = torch.rand(cout, generator=gen) + 0.5
    act_scale = static_activation_scale(gamma2, cout)
    history = torch.full((1, cout, t + 2, h, w), 1.0).to(FP8_DTYPE).contiguous(memory_format=CL3)
    act, tail = history[:, :, 2:], channels_last(1, cout, 2, h, w)
    got = fp8_conv(buf8, x_scale, packed, w_scale, bias, out_dtype=torch.float32, gamma=gamma2 * cout**0.5,
                   act=act, act_scale=act_scale, tail=tail, tma_out=tma_out)  # fmt: skip
    if not INTERPRETED:
        assert got is None
        return
    y = conv64(buf8.double() * x_scale.double(), unpack(packed, w_scale, cin), bias)
    z = F.normalize(y, dim=1) * (gamma2.double() * cout**0.5)[None, :, None, None, None]
    z = z * torch.sigmoid(z)
    assert got is act and rel_max(tail, z[:, :, -2:]) < SAME_OPERANDS_TOL
    want = (z / act_scale.double()).clamp(-FP8_MAX, FP8_MAX).float().to(FP8_DTYPE)
    steps = (act.view(torch.uint8).int() - want.view(torch.uint8).int()).abs()
    assert steps.max() <= 1 and (steps > 0).float().mean() < 1e-2
    assert (history[:, :, :2].float() == 1.0).all()
    # A float8 cache entry (`fp8_history`): act's last 2 frames, byte for byte.
    fp8_tail = torch.zeros(1, cout, 2, h, w).to(FP8_DTYPE).contiguous(memory_format=CL3)
    fp8_conv(buf8, x_scale, packed, w_scale, bias, out_dtype=torch.float32, gamma=gamma2 * cout**0.5, act=act,
             act_scale=act_scale, tail=fp8_tail, tma_out=tma_out)  # fmt: skip
    assert torch.equal(fp8_tail.view(torch.uint8), act[:, :, -2:].contiguous(memory_format=CL3).view(torch.uint8))
    assert not fresh._failures


def test_fp8_conv_with_the_next_norm_refuses_what_it_cannot_hold():
    """The norm in the epilogue needs a float8 act and all of a pixel's outputs in one program (<= 256)."""
    buf8, x_scale = quantize_staged(staged(32, 3, 2, 16, seed=23))
    act = torch.zeros(1, 384, 1, 2, 16).to(FP8_DTYPE).contiguous(memory_format=CL3)
    packed, w_scale = pack_fp8_conv_weight(torch.randn(384, 32, 3, 3, 3))
    with pytest.raises(ValueError, match="too many"):
        fp8_conv(buf8, x_scale, packed, w_scale, None, gamma=torch.ones(384), act=act, act_scale=torch.ones(()))
    packed, w_scale = pack_fp8_conv_weight(torch.randn(32, 32, 3, 3, 3))
    with pytest.raises(ValueError, match="float8 act"):
        fp8_conv(buf8, x_scale, packed, w_scale, None, gamma=torch.ones(32), act=act[:, :32].float(),
                 act_scale=torch.ones(()))  # fmt: skip


def test_fp8_conv_keeps_the_first_configuration_that_runs(fresh):
    """A configuration that cannot compile (24 outputs: not a power of two) is skipped and reported; the next
    one is kept for the shape. Where none runs (no GPU), None, remembered: not tried again."""
    cin, cout, t, h, w = 32, 32, 1, 2, 32
    fresh.CONFIGS[cout] = (Config(32, 24, 0, 128, 1, 4), Config(32, 32, 0, 128, 1, 4))
    buf8, x_scale = quantize_staged(staged(cin, t + 2, h, w, seed=7))
    packed, w_scale = pack_fp8_conv_weight(torch.randn(cout, cin, 3, 3, 3))
    key = (buf8.device, cin, cout, w & -w)
    got = fp8_conv(buf8, x_scale, packed, w_scale, None, out=channels_last(1, cout, t, h, w))
    if INTERPRETED:
        want = conv64(buf8.double() * x_scale.double(), unpack(packed, w_scale, cin), torch.zeros(cout))
        assert rel_max(got, want) < SAME_OPERANDS_TOL
        assert fresh._chosen[key] == 1 and len(fresh._failures) == 1
    else:
        assert got is None and fresh._chosen[key] == -1 and len(fresh._failures) == 2
        assert fp8_conv(buf8, x_scale, packed, w_scale, None) is None and len(fresh._failures) == 2


def test_fp8_conv_refuses_operands_that_are_not_float8():
    buf = staged(32, 3, 2, 16, seed=8)
    packed, w_scale = pack_fp8_conv_weight(torch.randn(32, 32, 3, 3, 3))
    with pytest.raises(ValueError, match="float8"):
        fp8_conv(buf, torch.ones(()), packed, w_scale, None)
    buf8, x_scale = quantize_staged(staged(64, 3, 2, 16, seed=8))
    with pytest.raises(ValueError, match="does not match"):
        fp8_conv(buf8, x_scale, packed, w_scale, None)


def _causal(cin: int, cout: int, kernel: int = 3) -> torch.nn.Conv3d:
    conv = torch.nn.Conv3d(cin, cout, kernel)
    conv._padding = (1, 1, 1, 1, 2, 0)  # WanCausalConv3d's: (W, W, H, H, 2 frames before, 0 after)
    return conv


def test_fp8_conv_is_only_for_its_shapes():
    """Under the interpreter CPU tensors of the VAE's shapes qualify; a plain CPU run never does. Other kernels,
    widths, batches, layouts, rows or frame counts never."""
    buf = staged(32, 4, 3, 16, seed=9)
    assert fp8_conv_usable(_causal(32, 96), buf) == INTERPRETED
    assert fp8_conv_usable(_causal(32, 384), buf) == INTERPRETED
    assert fp8_conv_usable(_causal(32, 96), quantize_staged(buf)[0]) == INTERPRETED
    for conv in (_causal(32, 96, kernel=1), _causal(32, 40), _causal(32, 400), _causal(16, 96)):
        assert not fp8_conv_usable(conv, buf)
    assert not fp8_conv_usable(_causal(16, 96), staged(16, 4, 3, 16, seed=9))  # 16 input channels
    other = _causal(32, 96)
    other._padding = (1, 1, 1, 1, 1, 1)  # not causal
    assert not fp8_conv_usable(other, buf)
    assert not fp8_conv_usable(_causal(32, 96), buf.contiguous())  # not channels-last
    assert not fp8_conv_usable(_causal(32, 96), torch.cat([buf, buf]).contiguous(memory_format=CL3))
    assert not fp8_conv_usable(_causal(32, 96), staged(32, 4, 3, 24, seed=9))  # rows of 24 pixels
    assert not fp8_conv_usable(_causal(32, 96), staged(32, 2, 3, 16, seed=9))  # no output frame


def test_pack_round_trip():
    """Each output channel's row holds its 27 taps x Cin (pack_split's order), scaled so its largest magnitude
    is float8's largest value; dequantized, every weight is within half a float8 step of the original (its
    relative 2**-4, or the subnormal step 2**-9 x scale near zero). An all-zero channel dequantizes to zeros."""
    gen = torch.Generator().manual_seed(10)
    cout, cin = 48, 32
    weight = torch.randn(cout, cin, 3, 3, 3, generator=gen) * torch.rand(cout, 1, 1, 1, 1, generator=gen)
    weight[3, 5, 1, 2, 0] = 40.0  # an outlier: only its own channel's precision pays
    weight[7] = 0.0
    packed, w_scale = pack_fp8_conv_weight(weight)
    assert packed.dtype == FP8_DTYPE and packed.shape == (cout, 27 * cin) and packed.is_contiguous()
    assert w_scale.dtype == torch.float32 and w_scale.shape == (cout,)
    back = unpack(packed, w_scale, cin)
    step = torch.maximum(weight.double().abs() * 2.0**-4, w_scale.double().view(-1, 1, 1, 1, 1) * 2.0**-10)
    assert ((back - weight.double()).abs() <= step * (1 + 1e-6)).all()
    peaks = packed.float().abs().amax(dim=1)
    assert (peaks[torch.arange(cout) != 7] == FP8_MAX).all()
    assert w_scale[7] == 1.0 and not back[7].any()
    assert back[3, 5, 1, 2, 0].item() == pytest.approx(40.0, rel=1e-6)  # the row's largest value: no rounding


def test_pack_pads_each_tap_of_96_channels_to_128_with_zeros():
    """96 input channels: each tap takes 128 columns, its first 96 the weights (the same values as an unpadded
    pack would hold), the other 32 zero bytes, so a 128-deep block reaching past Cin adds nothing."""
    weight = torch.randn(16, 96, 3, 3, 3, generator=torch.Generator().manual_seed(11))
    packed, w_scale = pack_fp8_conv_weight(weight)
    assert module.tap_depth(96) == 128 and packed.shape == (16, 27 * 128) and packed.is_contiguous()
    taps = packed.view(16, 27, 128)
    assert not taps[:, :, 96:].view(torch.uint8).any()
    values, scales = module.quantize_rows(module.pack_split(weight))
    assert torch.equal(taps[:, :, :96].reshape(16, -1).view(torch.uint8), values.view(torch.uint8))
    assert torch.equal(w_scale, scales.reshape(-1))
    assert [module.tap_depth(c) for c in (32, 64, 96, 128, 192, 384)] == [32, 64, 128, 128, 192, 384]
    assert [module.block_depth(96, d) for d in (32, 64, 128)] == [32, 64, 128]
    assert [module.block_depth(192, d) for d in (32, 64, 128)] == [32, 64, 64]  # 128 would read the next tap


def test_static_scale_never_saturates():
    """All of a pixel's mass in the channel of the largest gamma reaches the bound exactly (so it is as tight as
    a static bound can be); no input exceeds it, through the diffusers-order norm or the kernel's (with a norm
    bias too), and the quantized buffer holds it without clamping."""
    c = 64
    gen = torch.Generator().manual_seed(11)
    gamma = torch.rand(c, generator=gen) + 0.5
    gamma[9] = -3.0  # the largest magnitude, negative: its one-hot pixel is y = -sqrt(C) x 3 before SiLU
    gamma[20] = 2.9
    bias = torch.randn(c, generator=gen) * 0.1
    rows = torch.randn(400, c, generator=gen) * torch.rand(400, 1, generator=gen) * 100
    for channel, value in ((9, -1e4), (9, 1e4), (20, 7.0), (20, 1e-30), (0, 1.0)):
        rows = torch.cat([rows, torch.zeros(1, c)])
        rows[-1, channel] = value
    for b in (0.0, bias):
        scale = static_activation_scale(gamma, c, b)
        assert scale.dtype == torch.float32 and scale.ndim == 0
        for y in (rms_norm_rows_reference(rows, gamma, c**0.5, b, silu=True),
                  rms_norm_rows(rows, gamma, c**0.5, b, silu=True)):  # fmt: skip
            ratio = (y.abs() / scale).max().item()
            assert ratio <= FP8_MAX * (1 + 1e-6)
            assert ratio >= FP8_MAX * 0.95  # (9, -1e4): SiLU(sqrt(C) x 3 + bias) ~ the bound
            buf = y.view(1, -1, 1, 1, c).permute(0, 4, 1, 2, 3)  # as (1, C, T, 1, 1) channels-last
            values, same = quantize_staged(buf, scale)
            assert same == scale and not values.float().isnan().any()
            back = values.double() * scale.double()
            assert ((back - buf.double()).abs() <= buf.double().abs() * 2.0**-4 + scale.double() * 2.0**-10).all()


def test_quantize_staged():
    """Dynamic scale: the largest magnitude maps to float8's largest value and everything is within half a
    float8 step; layout kept; an all-zero buffer gets scale 1; bfloat16 input too."""
    buf = staged(32, 4, 3, 16, seed=12) * 5
    buf[0, 3, 1, 2, 7] = -60.0
    for x in (buf, buf.to(torch.bfloat16)):
        values, scale = quantize_staged(x)
        assert values.dtype == FP8_DTYPE and values.shape == x.shape and values.is_contiguous(memory_format=CL3)
        assert scale.item() == pytest.approx(60.0 / FP8_MAX, rel=1e-6)
        assert values[0, 3, 1, 2, 7].float() == -FP8_MAX
        back, ref = values.double() * scale.double(), x.double()
        assert ((back - ref).abs() <= ref.abs() * 2.0**-4 + scale.double() * 2.0**-10).all()
    values, scale = quantize_staged(torch.zeros(1, 32, 3, 2, 16).contiguous(memory_format=CL3))
    assert scale.item() == 1.0 and not values.float().any()
    with pytest.raises(ValueError, match="channels-last"):
        quantize_staged(buf.contiguous())
    if INTERPRETED:  # the CUDA cast kernel: its indexing, scale and saturation, on values it need not round (the
        # interpreter's float8 rounding is not the GPU's; bench/check_fp8_conv.py compares the roundings on the GPU)
        grid = staged(32, 4, 3, 16, seed=13).to(FP8_DTYPE).float()  # float8 values, exactly
        exact = (grid * 0.125).contiguous(memory_format=CL3)  # a power-of-two scale: exact / scale is exact
        exact[0, 0, 0, 0, :2] = torch.tensor([1e4, -1e4])  # saturate to +-448
        scale = torch.tensor(0.125)
        got, _ = quantize_staged(exact, scale, use_triton=True)
        want, _ = quantize_staged(exact, scale, use_triton=False)
        assert torch.equal(got.view(torch.uint8), want.view(torch.uint8))
        assert got[0, 0, 0, 0, :2].float().tolist() == [FP8_MAX, -FP8_MAX]


def test_the_kernels_under_the_triton_interpreter():
    """This file again with TRITON_INTERPRET=1: the float8 kernel itself on CPU tensors (nothing skipped)."""
    if INTERPRETED:  # this run is that run
        return
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k",
               "not under_the_triton_interpreter"]  # fmt: skip
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    assert " passed" in result.stdout and "skipped" not in result.stdout
