"""The hand-written kernels (kernels/) against independent references.

In a plain run these check the PyTorch fallbacks the kernels stand in for. The
same tests run again in a subprocess under Triton's interpreter
(test_triton_interpreted.py: TRITON_INTERPRET=1), where every kernel runs on CPU
tensors: then they check the Triton code itself. bfloat16 products are left to
the GPU check (bench/check_kernels.py): the interpreter has no bfloat16 matmul.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from infvsr_core.fp8 import FP8_MAX
from infvsr_core.kernels import norm_silu
from infvsr_core.kernels.norm_silu import bias_add_rows_, rms_norm_rows, rms_norm_rows_reference
from infvsr_core.kernels.rgb_in import few_in_conv, few_in_fits, pack_few_in
from infvsr_core.kernels.rgb_out import (
    few_out_conv,
    few_out_fits,
    pack_few_out,
    tap_contributions,
    tap_sum,
    tap_sum_reference,
)
from infvsr_core.kernels.subpixel import interleave, interleave_reference

CL3 = torch.channels_last_3d
# Relative to the output's largest magnitude: float32 sums in another order; float16 rounds inputs and output.
REL_TOL = {torch.float32: 1e-5, torch.float16: 2e-3}


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want.double()).abs().max() / want.double().abs().max()).item()


def staged(b: int, c: int, frames: int, h: int, w: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(b, c, frames, h, w, generator=gen).to(dtype).contiguous(memory_format=CL3)


def conv_reference(buf: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The causal conv on a staged buffer in float64: time already padded, spatial zero padding 1."""
    return F.conv3d(buf.double(), weight.double(), None if bias is None else bias.double(), 1, (0, 1, 1))


def test_kernels_run_through_triton_when_interpreted():
    """Under TRITON_INTERPRET=1 the kernels must take CPU tensors (else the interpreted run checks nothing)."""
    if norm_silu.INTERPRETED:
        assert norm_silu.triton_usable(torch.zeros(1))
    else:
        assert not norm_silu.triton_usable(torch.zeros(1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", [(1, 3, 5, 7, 37), (2, 3, 3, 33, 4)])
def test_few_in_conv_matches_conv3d(dtype, shape):
    """RGB in (3 -> 24 here; 96 in the full model): every border pixel, several frames and batch entries."""
    buf = staged(*shape, dtype, seed=1)
    gen = torch.Generator().manual_seed(2)
    weight = torch.randn(24, 3, 3, 3, 3, generator=gen).to(dtype)
    bias = torch.randn(24, generator=gen).to(dtype)
    assert few_in_fits(weight)
    out = few_in_conv(buf, weight, pack_few_in(weight), bias)
    want = conv_reference(buf, weight, bias)
    assert out.shape == want.shape and out.dtype == dtype and out.is_contiguous(memory_format=CL3)
    assert rel_err(out, want) < REL_TOL[dtype]
    assert not norm_silu._TRITON_BROKEN


def test_few_in_conv_refuses_other_shapes():
    assert not few_in_fits(torch.zeros(96, 16, 3, 3, 3))  # 27 x 16 gathered inputs: too many for one row
    assert not few_in_fits(torch.zeros(96, 3, 3, 1, 1))


# The RGB head's contributions round to the dtype before the sum (27 of them per output): float16's rounding of
# each, against the output's largest magnitude (the float path rounds only the sum: REL_TOL).
TAP_SUM_TOL = {torch.float32: 1e-5, torch.float16: 4e-3}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape, cout", [((1, 16, 5, 7, 37), 3), ((2, 8, 3, 33, 4), 1), ((1, 12, 4, 1, 130), 3)])
def test_few_out_conv_matches_conv3d(dtype, shape, cout):
    """The taps' product and gather against the float64 conv: through the kernel where Triton runs (under the
    interpreter), and the decomposition itself in PyTorch ops on every run."""
    gen = torch.Generator().manual_seed(17)
    buf = staged(*shape, dtype, seed=18)
    weight = (torch.randn(cout, shape[1], 3, 3, 3, generator=gen) / (27 * shape[1]) ** 0.5).to(dtype)
    bias = torch.randn(cout, generator=gen).to(dtype)
    assert few_out_fits(weight)
    packed = pack_few_out(weight)
    want = conv_reference(buf, weight, bias)
    out = few_out_conv(buf, weight, packed, bias)
    decomposed = tap_sum_reference(tap_contributions(buf, packed), bias, cout)
    for got in (out, decomposed):
        assert got.shape == want.shape and got.dtype == dtype and got.is_contiguous(memory_format=CL3)
        assert rel_err(got, want) < TAP_SUM_TOL[dtype]
    if norm_silu.triton_usable(buf):  # the kernel sums the contributions in the reference's order
        assert torch.equal(out, decomposed)


@pytest.mark.parametrize("with_bias", [False, True])
def test_tap_sum_reads_contributions_with_padded_columns(with_bias):
    """The gather reads each output's 27 contributions at their neighbours (zero outside the frame), from rows
    wider than the taps (the packed weight's padded columns), against a plain loop over pixels and taps."""
    gen = torch.Generator().manual_seed(5)
    b, frames, h, w, cout = 1, 4, 3, 5, 3
    y = torch.randn(b, frames, h, w, 88, generator=gen)
    bias = torch.randn(cout, generator=gen) if with_bias else None
    out = tap_sum(y, bias, cout)
    want = torch.zeros(b, cout, frames - 2, h, w, dtype=torch.float64)
    for t in range(frames - 2):
        for i in range(h):
            for j in range(w):
                for tap in range(27):
                    dt, dh, dw = tap // 9, (tap // 3) % 3, tap % 3
                    ii, jj = i + dh - 1, j + dw - 1
                    if 0 <= ii < h and 0 <= jj < w:
                        want[0, :, t, i, j] += y[0, t + dt, ii, jj, tap * cout : (tap + 1) * cout].double()
                if bias is not None:
                    want[0, :, t, i, j] += bias.double()
    assert (out.double() - want).abs().max().item() < 1e-5


def test_pack_few_out_layout_and_refusals():
    weight = torch.randn(3, 4, 3, 3, 3)
    packed = pack_few_out(weight)
    assert packed.shape == (4, 88)  # 81 columns, zero-padded to a multiple of 8
    for tap in range(27):
        dt, dh, dw = tap // 9, (tap // 3) % 3, tap % 3
        assert torch.equal(packed[:, tap * 3 : tap * 3 + 3], weight[:, :, dt, dh, dw].t())
    assert not packed[:, 81:].any()
    assert not few_out_fits(torch.zeros(8, 96, 3, 3, 3))  # more outputs than one product packs
    assert not few_out_fits(torch.zeros(3, 96, 3, 1, 1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("with_bias", [True, False])
def test_interleave_matches_a_plain_loop(dtype, with_bias):
    """Phase (a, b) of low-res pixel (i + a, j + b) is output pixel (2i + a, 2j + b), bias added once."""
    gen = torch.Generator().manual_seed(5)
    n, h, w, c = 2, 3, 5, 24
    y = torch.randn(n, h + 1, w + 1, 4 * c, generator=gen).to(dtype)
    bias = torch.randn(c, generator=gen).to(dtype) if with_bias else None
    out = interleave(y, bias, c)
    want = torch.empty(n, c, 2 * h, 2 * w, dtype=torch.float64)
    for i in range(h):
        for j in range(w):
            for a in (0, 1):
                for b in (0, 1):
                    group = 2 * a + b
                    value = y[:, i + a, j + b, group * c : (group + 1) * c].double()
                    want[:, :, 2 * i + a, 2 * j + b] = value + (bias.double() if with_bias else 0)
    assert out.shape == want.shape and out.is_contiguous(memory_format=torch.channels_last)
    # One rounding of an exact sum: within an ulp of the output dtype, element by element.
    ulp = torch.finfo(dtype).eps * want.abs().clamp_min(torch.finfo(dtype).tiny)
    assert ((out.double() - want).abs() <= ulp).all()
    if not (norm_silu.INTERPRETED and dtype == torch.bfloat16):  # the interpreter's bfloat16 rounding of ties
        assert torch.equal(out, interleave_reference(y, bias, c))  # bit for bit the PyTorch ops' result
    assert not norm_silu._TRITON_BROKEN


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("silu", [True, False])
def test_norm_rows_on_channel_slices(dtype, silu):
    """The norm reads a channel slice of wider rows (a conv computed with padded outputs) and writes into
    a slice of a wider buffer: equal to the reference on compact copies, to the output dtype's rounding."""
    gen = torch.Generator().manual_seed(6)
    wide = torch.randn(70, 32, generator=gen).to(dtype)
    rows = wide[:, :24]
    gamma, pre = 1 + 0.1 * torch.randn(24, generator=gen), torch.randn(24, generator=gen)
    bias = torch.randn(24, generator=gen)
    target = torch.zeros(70, 40, dtype=dtype)
    got = rms_norm_rows(rows, gamma, 24**0.5, bias, silu=silu, out=target[:, 8:32])
    want = rms_norm_rows_reference(rows.double(), gamma.double(), 24**0.5, bias.double(), silu)
    assert rel_err(got, want) < (1e-5 if dtype == torch.float32 else 2**-7)
    assert torch.equal(target[:, :8], torch.zeros(70, 8, dtype=dtype))  # untouched around the slice
    assert torch.equal(target[:, 32:], torch.zeros(70, 8, dtype=dtype))
    # pre_bias (the producing conv's bias) is added before the norm.
    got = rms_norm_rows(rows, gamma, 24**0.5, silu=silu, pre_bias=pre)
    want = rms_norm_rows_reference(rows.double(), gamma.double(), 24**0.5, 0.0, silu, pre_bias=pre.double())
    assert rel_err(got, want) < (1e-5 if dtype == torch.float32 else 2**-7)
    assert not norm_silu._TRITON_BROKEN


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bias_add_rows(dtype):
    """In place, and from a channel slice into compact rows, with and without the residual."""
    gen = torch.Generator().manual_seed(7)
    wide = torch.randn(50, 32, generator=gen).to(dtype)
    bias, residual = torch.randn(24, generator=gen), torch.randn(50, 24, generator=gen).to(dtype)
    want = wide[:, :24].double() + bias.double() + residual.double()
    out = torch.empty(50, 24, dtype=dtype)
    bias_add_rows_(wide[:, :24], bias, residual, out=out)
    tol = 0 if dtype == torch.float32 else 2**-7
    assert rel_err(out, want) <= max(tol, 1e-7)
    rows = wide[:, :24].contiguous()
    bias_add_rows_(rows, bias)
    assert rel_err(rows, wide[:, :24].double() + bias.double()) <= max(tol, 1e-7)
    assert not norm_silu._TRITON_BROKEN


def test_norm_rows_tail_receives_the_last_rows():
    """A causal conv's cache (its input's last frames) written by the norm in the same pass."""
    gen = torch.Generator().manual_seed(8)
    rows, gamma = torch.randn(60, 24, generator=gen), 1 + 0.1 * torch.randn(24, generator=gen)
    tail = torch.full((20, 24), float("nan"))
    out = rms_norm_rows(rows, gamma, 24**0.5, silu=True, tail=tail)
    want = rms_norm_rows_reference(rows.double(), gamma.double(), 24**0.5, 0.0, True)
    assert rel_err(out, want) < 1e-5
    assert torch.equal(tail, out[40:])
    assert not norm_silu._TRITON_BROKEN


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_norm_rows_into_float8_are_the_cast_of_the_rows_dtype_result(dtype):
    """A float8 output (a float8 conv's staged input): result / scale in float8, from the result rounded to the
    rows' dtype, saturated and rounded to nearest even (PyTorch's float8 cast of the rows-dtype result, bit for
    bit), with a scale small enough that some values saturate; the tail keeps the rows' dtype, or in float8 takes
    the output's values (`fp8_history`). No scale, or a float8 tail beside a wide output: refused.
    (The GPU writes float8 in the kernel itself: bench/check_fp8_conv.py compares it bit for bit there.)"""
    from infvsr_core.fp8 import FP8_DTYPE, FP8_MAX

    gen = torch.Generator().manual_seed(9)
    rows = torch.randn(70, 32, generator=gen).to(dtype)
    gamma, pre = 1 + 0.1 * torch.randn(32, generator=gen), torch.randn(32, generator=gen)
    scale = torch.tensor(0.004)  # |y| up to ~6: some exceed 448 * 0.004 = 1.8 and saturate
    tail = torch.full((20, 32), float("nan"), dtype=dtype)
    out = torch.empty(70, 32, dtype=FP8_DTYPE)
    rms_norm_rows(rows, gamma, 32**0.5, silu=True, out=out, pre_bias=pre, tail=tail, out_scale=scale)
    wide = rms_norm_rows(rows, gamma, 32**0.5, silu=True, pre_bias=pre)
    want = (wide.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    assert torch.equal(out.view(torch.uint8), want.view(torch.uint8))
    assert (out.float().abs() == FP8_MAX).any() and (out.float() != 0).sum() > 0.9 * out.numel()
    assert tail.dtype == dtype and torch.equal(tail, wide[50:])
    fp8_tail, again = torch.empty(20, 32, dtype=FP8_DTYPE), torch.empty(70, 32, dtype=FP8_DTYPE)
    rms_norm_rows(rows, gamma, 32**0.5, silu=True, out=again, pre_bias=pre, tail=fp8_tail, out_scale=scale)
    assert torch.equal(fp8_tail.view(torch.uint8), want[50:].view(torch.uint8))  # a float8 history: out's values
    assert torch.equal(again.view(torch.uint8), want.view(torch.uint8))
    with pytest.raises(ValueError, match="out_scale"):
        rms_norm_rows(rows, gamma, 32**0.5, silu=True, out=torch.empty(70, 32, dtype=FP8_DTYPE))
    with pytest.raises(ValueError, match="float8 tail"):
        rms_norm_rows(rows, gamma, 32**0.5, silu=True, tail=fp8_tail)
    assert not norm_silu._TRITON_BROKEN


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bias_add_rows_into_a_bordered_buffer(dtype):
    """Rows of 3 frames of 4x5 pixels written inside a buffer with a zero last row and column (a downsampler's
    padding): the border stays zero, the inside holds rows + bias + residual in pixel order."""
    gen = torch.Generator().manual_seed(9)
    f, h, w, c = 3, 4, 5, 24
    rows = torch.randn(f * h * w, 32, generator=gen).to(dtype)[:, :c]  # a channel slice, as after a padded conv
    bias, residual = torch.randn(c, generator=gen), torch.randn(f * h * w, c, generator=gen).to(dtype)
    buffer = torch.zeros(f, h + 1, w + 1, c, dtype=dtype)
    bias_add_rows_(rows, bias, residual, out=buffer[:, :h, :w])
    want = (rows.double() + bias.double() + residual.double()).view(f, h, w, c)
    tol = 1e-7 if dtype == torch.float32 else 2**-7
    assert rel_err(buffer[:, :h, :w], want) <= tol
    assert not buffer[:, h].any() and not buffer[:, :, w].any()
    assert not norm_silu._TRITON_BROKEN


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(("frames", "tokens", "channels"), [(2, 37, 16), (1, 70, 48), (3, 33, 40)])
def test_mid_attention_matches_a_float64_softmax(dtype, frames, tokens, channels):
    """The VAE's single-head attention per frame: token counts off the kernel's blocks (37, 70, 33 against 32/64),
    channels in three slices with padding (16, 40) or none (48); the kernel where it runs, else the blocked GEMMs."""
    from infvsr_core.kernels.mid_attention import mid_attention, mid_attention_usable
    from infvsr_core.vae.fast_blocks import _blocked_attention

    gen = torch.Generator().manual_seed(10)
    qkv = (2 * torch.randn(frames, tokens, 3 * channels, generator=gen)).to(dtype)
    scale = channels**-0.5
    q, k, v = qkv.double().chunk(3, dim=-1)
    want = torch.softmax(scale * q @ k.transpose(1, 2), dim=-1) @ v
    assert mid_attention_usable(qkv) == norm_silu.INTERPRETED
    out = mid_attention(qkv, scale) if mid_attention_usable(qkv) else _blocked_attention(*qkv.chunk(3, -1), scale)
    assert out.shape == want.shape and out.dtype == dtype
    assert rel_err(out, want) < REL_TOL[dtype]
    assert not norm_silu._TRITON_BROKEN


def test_mid_attention_tries_smaller_blocks_and_gives_up_alone(monkeypatch):
    """Blocks the GPU cannot take (here: 24 rows, not a power of two) make the kernel try the next ones and keep
    the first that runs; when none runs (here, without the interpreter: CPU tensors) it returns None for the
    caller's own path, and the other Triton kernels stay in use."""
    from infvsr_core.kernels import mid_attention as module

    gen = torch.Generator().manual_seed(11)
    qkv = torch.randn(1, 20, 3 * 16, generator=gen)
    monkeypatch.setattr(module, "CONFIGS", {4: ((24, 32, 4, 1), (16, 16, 4, 1))})
    monkeypatch.setattr(module, "_chosen", {})
    monkeypatch.setattr(module, "_failures", [])
    key = (qkv.device, qkv.dtype, 16)
    out = module.mid_attention(qkv, 0.25)
    if norm_silu.INTERPRETED:
        q, k, v = qkv.double().chunk(3, dim=-1)
        assert rel_err(out, torch.softmax(0.25 * q @ k.transpose(1, 2), dim=-1) @ v) < 1e-5
        assert module._chosen[key] == 1 and len(module._failures) == 1
    else:
        assert out is None and module._chosen[key] == -1 and len(module._failures) == 2
        assert module.mid_attention(qkv, 0.25) is None and len(module._failures) == 2  # not tried again
    assert not norm_silu._TRITON_BROKEN


def _split_reference(buf, weight, bias, residual=None, gamma=None):
    """The conv (+ residual) in float64; with gamma, SiLU(F.normalize over channels x gamma) of it."""
    y = conv_reference(buf, weight, bias)
    if residual is not None:
        y = y + residual.double()
    if gamma is not None:
        y = F.normalize(y, dim=1) * gamma.double().view(1, -1, 1, 1, 1)
        y = y * torch.sigmoid(y)
    return y


@pytest.mark.parametrize(("cin", "split", "width", "block_m"), [(32, (32, 16), 5, 128), (16, (128, 64), 20, 16)])
def test_split_conv_matches_conv3d(monkeypatch, cin, split, width, block_m):
    """The 192-channel conv kernel (here also 48 = 32 + 16): plain output, output with a residual into a
    zero-bordered buffer's inside (the border stays 0), and the norm epilogue into a staged buffer's frames plus
    a cache entry; rows wider than a block (20 pixels, blocks of 16) and narrower (5 of 128). Float32 under the
    interpreter (its tensor-memory loads mishandle bfloat16); bfloat16 is checked on the GPU (check_conv.py)."""
    from infvsr_core.kernels import split_conv as module

    cout = sum(split)
    monkeypatch.setattr(module, "SPLITS", {cout: split})
    monkeypatch.setattr(module, "CONFIGS", ((block_m, 1, 4),))
    monkeypatch.setattr(module, "ROW_MULTIPLE", 1)
    monkeypatch.setattr(module, "_chosen", {})
    gen = torch.Generator().manual_seed(12)
    t, h = 3, 4
    buf = staged(1, cin, t + 2, h, width, torch.float32, seed=13)
    weight = torch.randn(cout, cin, 3, 3, 3, generator=gen) / (27 * cin) ** 0.5
    bias = torch.randn(cout, generator=gen)
    residual = torch.randn(1, cout, t, h, width, generator=gen).contiguous(memory_format=CL3)
    gamma = torch.rand(cout, generator=gen) + 0.5
    packed = module.pack_split(weight)
    conv = torch.nn.Conv3d(cin, cout, 3)
    conv._padding = (1, 1, 1, 1, 2, 0)
    assert module.split_conv_usable(conv, buf) == norm_silu.INTERPRETED
    out = module.split_conv(buf, packed, bias)
    if not norm_silu.INTERPRETED:  # no kernel runs on CPU tensors: None, for the caller's cuDNN path
        assert out is None and module._chosen[(buf.device, buf.dtype, cin, cout)] == -1
        return
    assert out.is_contiguous(memory_format=CL3) and rel_err(out, _split_reference(buf, weight, bias)) < 1e-5
    bordered = torch.zeros(1, cout, t, h + 1, width + 1).contiguous(memory_format=CL3)
    got = module.split_conv(buf, packed, bias, residual, out=bordered[:, :, :, :h, :width])
    assert rel_err(got, _split_reference(buf, weight, bias, residual)) < 1e-5
    assert not bordered[:, :, :, h].any() and not bordered[:, :, :, :, width].any()
    next_buf = torch.full((1, cout, t + 2, h, width), 7.0).contiguous(memory_format=CL3)
    tail = torch.empty(1, cout, 2, h, width).contiguous(memory_format=CL3)
    act = module.split_conv(buf, packed, bias, gamma=gamma, act=next_buf[:, :, 2:], tail=tail)
    want = _split_reference(buf, weight, bias, gamma=gamma)
    assert rel_err(act, want) < 1e-5 and torch.equal(tail, next_buf[:, :, -2:])
    assert (next_buf[:, :, :2] == 7.0).all()  # the history frames in front are not written
    assert not norm_silu._TRITON_BROKEN


def test_split_conv_is_only_for_its_shapes(monkeypatch):
    """Other widths, kernel shapes, batches, layouts or rows that do not fill the pixel blocks keep cuDNN."""
    from infvsr_core.kernels import split_conv as module
    from infvsr_core.kernels.split_conv import split_conv_usable

    monkeypatch.setattr(module, "ROW_MULTIPLE", 5)
    buf = staged(1, 32, 4, 3, 5, torch.float32, seed=14)
    for conv in (torch.nn.Conv3d(32, 96, 3), torch.nn.Conv3d(32, 192, 1), torch.nn.Conv3d(16, 192, 3)):
        conv._padding = (1, 1, 1, 1, 2, 0)
        assert not split_conv_usable(conv, buf)
    conv = torch.nn.Conv3d(32, 192, 3)
    conv._padding = (1, 1, 1, 1, 2, 0)
    assert split_conv_usable(conv, buf) == norm_silu.INTERPRETED
    assert not split_conv_usable(conv, buf.contiguous())  # not channels-last
    assert not split_conv_usable(conv, staged(2, 32, 4, 3, 5, torch.float32, seed=14))
    assert not split_conv_usable(conv, buf.to(torch.bfloat16))  # interpreted: float32 only; else: CPU
    assert not split_conv_usable(conv, staged(1, 32, 4, 3, 6, torch.float32, seed=14))  # 6 pixels: blocks of 5


# ----------------------------------------------------------------------------- the fp8 DiT's row quantizations
# float8_e4m3fn: a normal value rounds to within 2^-4 of itself, a subnormal (below 2^-6 scales) to within 2^-10
# scales; float32's exponential and square root may round apart from PyTorch's by a step, which can move a code
# by one where a value falls on a float8 midpoint.
FP8_RELATIVE, FP8_SUBNORMAL = 2.0**-4, 2.0**-10


def _quantizing_rows(k: int, rows: int = 9, seed: int = 20) -> torch.Tensor:
    """bf16 rows of k with varied magnitudes, an all-zero row, an outlier and an all-negative row."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, k, generator=g) * torch.logspace(-2, 1, rows)[:, None]
    x[2] = 0
    x[4, k // 3] = 300.0
    x[5] = -x[5].abs()
    return x.to(torch.bfloat16)


def _codes_close(got: tuple[torch.Tensor, torch.Tensor], want: tuple[torch.Tensor, torch.Tensor]) -> None:
    """Equal scales (to float32 rounding), and the float8 values equal but for rare one-step differences."""
    (values, scale), (ref_values, ref_scale) = got, want
    assert values.dtype == ref_values.dtype and values.shape == ref_values.shape and scale.shape == ref_scale.shape
    assert torch.allclose(scale, ref_scale, rtol=1e-6, atol=0)
    steps = (values.float() - ref_values.float()).abs() / ref_values.float().abs().clamp_min(2.0**-9)
    assert (steps <= 2.0**-3 + 1e-6).all()  # one float8 step at most (relative spacing 2^-3)
    assert (values.view(torch.uint8) == ref_values.view(torch.uint8)).float().mean() >= 0.99


def _within_fp8(values: torch.Tensor, scale: torch.Tensor, want: torch.Tensor, slack: float = 1e-6) -> None:
    """Dequantized values against float64 `want` to float8's rounding (plus `slack` relative), and no row's
    largest magnitude beyond its scale's range (to `slack`: no saturation)."""
    back = values.double() * scale.double()
    bound = want.abs() * (FP8_RELATIVE + slack) + scale.double() * FP8_SUBNORMAL
    assert ((back - want).abs() <= bound * (1 + 1e-6)).all()
    assert (scale.double().squeeze(1) * FP8_MAX >= want.abs().amax(dim=1) * (1 - slack)).all()


@pytest.mark.parametrize("launch", [(1, 4), (4, 4)])
@pytest.mark.parametrize("k", [48, 64, 100])
def test_row_quantize_plain_is_quantize_rows(launch, k):
    """The plain quantization: the same codes and scales as fp8.quantize_rows (both IEEE: the scale by division,
    the values times its reciprocal), within float8's rounding of float64; a head of 32/64 and a tail of 16/none/
    64 (36 used), rows packed 1 or 4 to a program (9 rows: the last program partly empty)."""
    from infvsr_core.fp8 import quantize_rows
    from infvsr_core.kernels.row_quantize import PLAIN, kernel_or, row_quantize, row_quantize_usable

    x = _quantizing_rows(k)
    assert row_quantize_usable(x) == norm_silu.INTERPRETED
    got = row_quantize(x, PLAIN, launch=launch) if norm_silu.INTERPRETED else kernel_or("quantize", quantize_rows)(x)
    want = quantize_rows(x)
    assert torch.equal(got[1], want[1]) and torch.equal(got[0].view(torch.uint8), want[0].view(torch.uint8))
    _within_fp8(*got, x.double())
    assert torch.equal(got[0][2].float(), torch.zeros(k)) and got[1][2].item() == 1.0  # a zero row: scale 1


@pytest.mark.parametrize("k", [96, 160])
def test_row_quantize_gelu_against_float64(k):
    """The FFN's GELU + quantize: the float8 values of Wan's tanh GELU (float64) to float8's rounding, the row
    scale never below the GELU's largest magnitude (fp8.gelu_row_scale's bound from the input's extremes), and
    the codes of fp8.gelu_quantize_rows but for one-step differences."""
    from infvsr_core.fp8 import gelu_quantize_rows
    from infvsr_core.kernels.row_quantize import GELU, kernel_or, row_quantize

    x = _quantizing_rows(k, seed=21)
    got = row_quantize(x, GELU) if norm_silu.INTERPRETED else kernel_or("gelu_quantize", gelu_quantize_rows)(x)
    xd = x.double()
    gelu = 0.5 * xd * (1 + torch.tanh((2 / torch.pi) ** 0.5 * (xd + 0.044715 * xd**3)))
    _within_fp8(*got, gelu)
    _codes_close(got, gelu_quantize_rows(x))


@pytest.mark.parametrize("launch", [(1, 4), (2, 4)])
def test_row_quantize_ln_modulate_against_float64(launch):
    """The modulated norm + quantize of two batch entries with their own shift and scale (rows of 48: a head of
    32 and a tail of 16): against a float64 layer norm * (1 + scale) + shift rounded to bf16 (as the op's output
    is; the interpreter's bf16 cast may truncate), to float8's rounding plus one bf16 step; the codes of the
    DiT's op but for one-step differences."""
    from infvsr_core.dit import _ln_modulate_quantize_op
    from infvsr_core.kernels.row_quantize import LN_MODULATE, kernel_or, row_quantize

    g = torch.Generator().manual_seed(22)
    x = (torch.randn(2, 7, 48, generator=g) * 3 + 1).to(torch.bfloat16)
    shift, scale = 0.3 * torch.randn(2, 1, 48, generator=g), 0.5 * torch.randn(2, 1, 48, generator=g)
    eps = 1e-6
    if norm_silu.INTERPRETED:
        got = row_quantize(x, LN_MODULATE, shift, scale, eps, launch=launch)
    else:
        got = kernel_or("ln_modulate_quantize", _ln_modulate_quantize_op)(x, shift, scale, eps)
    xd = x.double()
    normed = (xd - xd.mean(-1, keepdim=True)) / (xd.var(-1, unbiased=False, keepdim=True) + eps).sqrt()
    want = (normed * (1 + scale.double()) + shift.double()).reshape(-1, 48)
    _within_fp8(*got, want, slack=2.0**-7)  # one bf16 step: the op's output is rounded to x's dtype
    ref_values, ref_scale = _ln_modulate_quantize_op(x, shift, scale, eps)
    assert torch.allclose(got[1], ref_scale, rtol=2.0**-7)  # the row's extreme, one bf16 step apart at most
    steps = (got[0].double() * got[1] - ref_values.double() * ref_scale).abs()
    assert (steps <= want.abs() * 2.0**-3 + ref_scale * FP8_SUBNORMAL).all()


def test_row_quantize_refuses_misuse():
    from infvsr_core.kernels.row_quantize import LN_MODULATE, row_quantize, row_quantize_usable

    assert not row_quantize_usable(torch.zeros(4, 16).t())  # not contiguous
    assert not row_quantize_usable(torch.zeros(2, 20000))  # a row beyond one program's registers
    assert not row_quantize_usable(torch.zeros(2, 16, dtype=torch.int32))
    if norm_silu.INTERPRETED:
        with pytest.raises(ValueError, match="LN_MODULATE"):
            row_quantize(torch.zeros(3, 16), LN_MODULATE)


def test_the_dit_with_row_kernels_matches_its_ops(monkeypatch):
    """A one-block fp8 DiT (native products, forced on the CPU, in float32; widths 384 and 640: heads and tails
    in every row) with every quantization by the row kernel against its own ops: the same output but for the float8
    codes the exponential and square root move by one step. Under the interpreter the kernel ran for each of its
    ops; in a plain run no kernel runs and the output is the ops' own, bit for bit."""
    from infvsr_core.dit import CausalWanDiT, DiTConfig, random_dit_state_dict
    from infvsr_core.fp8 import FP8Linear, quantize_dit
    from infvsr_core.kernels import row_quantize as module

    config = DiTConfig(dim=384, ffn_dim=640, num_heads=3, num_layers=1)
    dit = CausalWanDiT(config)
    dit.load_state_dict(random_dit_state_dict(config, seed=23))
    quantize_dit(dit).eval()
    for layer in dit.modules():
        if isinstance(layer, FP8Linear):
            layer.native = True
    g = torch.Generator().manual_seed(24)
    latents = torch.randn(1, config.in_dim, 2, 4, 6, generator=g)
    context = torch.randn(1, 5, config.text_dim, generator=g)
    timestep = torch.tensor([500.0])
    ran: list[int] = []
    real = module.row_quantize
    monkeypatch.setattr(module, "row_quantize", lambda x, op, *rest, **kw: ran.append(op) or real(x, op, *rest, **kw))
    assert dit.row_quantize_kernels == module.ROW_QUANTIZE_DEFAULT  # the product's
    with torch.no_grad():
        dit.row_quantize_kernels = ()
        plain, _ = dit(latents, context, timestep)
        assert not ran
        dit.row_quantize_kernels = tuple(module.ROW_QUANTIZE_OPS)
        kernels, _ = dit(latents, context, timestep)
    if norm_silu.INTERPRETED:
        assert set(ran) == {module.PLAIN, module.GELU, module.LN_MODULATE}
        assert 0 < (kernels - plain).abs().max()  # the kernel's codes, not the ops' (some differ by a step)
        relative = ((kernels.float() - plain.float()).norm() / plain.float().norm()).item()
        assert relative < 0.02, relative
    else:
        assert not ran and torch.equal(kernels, plain)


def _bf16(t: torch.Tensor) -> torch.Tensor:
    """float32 t through a kernel's cast to bf16 and back: the interpreter truncates toward zero, the GPU and
    PyTorch round to nearest even."""
    if norm_silu.INTERPRETED:
        return (t.float().contiguous().view(torch.int32) & -65536).view(torch.float32)
    return t.to(torch.bfloat16).float()


@pytest.mark.parametrize(("dim", "heads", "past_tokens"), [(384, 3, 12), (256, 2, 0)])
def test_rms_rope_fp8_against_float64(dim, heads, past_tokens):
    """The queries'/keys' norm + RoPE + float8 (rows of 384: 128 + 64 pairs; of 256: one masked tail pair):
    against a float64 RMS norm, weight and rotation by each token's own angles, the rotated rows to three bf16
    roundings (the interpreter's bf16 cast truncates) and the float8 codes to float8's rounding on top; the cached
    rows' codes exactly `to_fp8` of them; the same per-head scales as the DiT's op."""
    from infvsr_core.dit import _rms_rope_fp8_op
    from infvsr_core.fp8 import to_fp8
    from infvsr_core.kernels.row_quantize import kernel_or, rms_rope_fp8, rms_rope_fp8_usable
    from infvsr_core.rope import rope_cos_sin

    g = torch.Generator().manual_seed(25)
    tokens, head_dim = 12, dim // heads
    x = (3 * torch.randn(2, tokens, dim, generator=g)).to(torch.bfloat16)
    weight = (1 + 0.3 * torch.randn(dim, generator=g)).to(torch.bfloat16)
    cos, sin = rope_cos_sin(2, 2, 3, head_dim, time_offset=5)  # 12 tokens, each its own angles
    past = [torch.randn(2, past_tokens, heads, head_dim, generator=g).to(torch.bfloat16)] if past_tokens else []
    eps = 1e-6
    assert rms_rope_fp8_usable(x, weight, cos, sin, eps, heads, *past) == norm_silu.INTERPRETED
    if norm_silu.INTERPRETED:
        roped, codes, scale = rms_rope_fp8(x, weight, cos, sin, eps, heads, *past)
    else:
        roped, codes, scale = kernel_or("rms_rope_fp8", _rms_rope_fp8_op)(x, weight, cos, sin, eps, heads, *past)
    xd = x.double()
    normed = xd / (xd.pow(2).mean(-1, keepdim=True) + eps).sqrt() * weight.double()
    pairs = normed.unflatten(-1, (heads, -1, 2))
    c, s = cos.double()[:, None, :], sin.double()[:, None, :]
    want = torch.stack([pairs[..., 0] * c - pairs[..., 1] * s, pairs[..., 0] * s + pairs[..., 1] * c], -1)
    want = want.flatten(-2)
    size = want.abs().amax()
    assert roped.shape == want.shape and roped.dtype == torch.bfloat16
    row_size = normed.abs().amax(-1)[..., None, None]
    assert ((roped.double() - want).abs() <= 3 * 2.0**-7 * (want.abs() + 2 * row_size)).all()
    assert (roped.double() - want).abs().amax() < 0.05 * size
    # Tighter: the same arithmetic in float32 with the kernel's three casts to bf16, to one bf16 step.
    xf = x.float()
    rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    y = _bf16(_bf16(xf * rstd) * weight.float()).unflatten(-1, (heads, -1, 2))
    c, s = cos[:, None, :], sin[:, None, :]
    emulated = _bf16(torch.stack([y[..., 0] * c - y[..., 1] * s, y[..., 0] * s + y[..., 1] * c], -1).flatten(-2))
    assert ((roped.float() - emulated).abs() <= 2.0**-7 * emulated.abs() + 1e-6 * row_size.float()).all()
    _, want_codes, want_scale = _rms_rope_fp8_op(x, weight, cos, sin, eps, heads, *past)
    assert torch.equal(scale, want_scale)
    assert codes.shape == want_codes.shape == (2, past_tokens + tokens, heads, head_dim)
    inv = scale[0].reciprocal()[None, None, :, None]
    if past:
        assert torch.equal(codes[:, :past_tokens].view(torch.uint8), to_fp8(past[0], 1 / inv).view(torch.uint8))
    new = codes[:, past_tokens:].double() / inv.double()
    assert ((new - roped.double()).abs() <= roped.double().abs() * 2.0**-4 + FP8_SUBNORMAL / inv.double()).all()
    without, codes_only, _ = (rms_rope_fp8 if norm_silu.INTERPRETED else kernel_or("rms_rope_fp8", _rms_rope_fp8_op))(
        x, weight, cos, sin, eps, heads, *past, keep_roped=False
    )
    assert without is None and torch.equal(codes_only.view(torch.uint8), codes.view(torch.uint8))


def test_head_scales_follow_the_weight():
    """The RoPE kernel's per-head scales are kept on the norm's weight, and recomputed when it changes in place
    (a fine-tune or a LoRA step between chunks) or is asked for another head count."""
    from infvsr_core.fp8 import normed_head_scale
    from infvsr_core.kernels.row_quantize import head_scales

    weight = torch.linspace(0.5, 2.0, 256).to(torch.bfloat16)
    first, inverse = head_scales(weight, 2)
    assert torch.equal(first, normed_head_scale(weight, 2)) and torch.equal(inverse, first.reciprocal())
    assert head_scales(weight, 2)[0] is first  # kept, not recomputed
    with torch.no_grad():
        weight.mul_(3)
    again, inverse = head_scales(weight, 2)
    assert torch.equal(again, normed_head_scale(weight, 2)) and torch.allclose(again, 3 * first, rtol=1e-2)
    assert torch.equal(inverse, again.reciprocal())
    assert head_scales(weight, 4)[0].shape == (4,)
    moved = torch.nn.Parameter(weight.clone())  # module.to() keeps the Parameter and swaps its data
    kept = head_scales(moved, 2)[0]
    with torch.no_grad():
        moved.data = weight.float().to(torch.bfloat16) * 2  # other storage, same version counter
    fresh = head_scales(moved, 2)[0]
    assert torch.equal(fresh, normed_head_scale(moved, 2)) and not torch.equal(fresh, kept)
