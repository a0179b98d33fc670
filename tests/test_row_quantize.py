"""The fp8 DiT's one-pass row quantization (kernels/row_quantize.py) against float64 forms of its ops.

The kernel runs here under Triton's interpreter (test_triton_interpreted.py runs this file with it). The
interpreter's float32 -> float8 cast does not round as the GPU's does, so the kernel's values are read before
that cast (`float_values`) and PyTorch casts them, as the GPU's cast does (bench/check_dit_quantize.py compares
the bytes on a GPU). Without the interpreter the wrappers fall back to the eager ops: checked equal.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from infvsr_core.dit import EAGER_OPS, _Ops
from infvsr_core.fp8 import FP8_DTYPE, FP8_MAX, quantize_rows
from infvsr_core.kernels import row_quantize as module
from infvsr_core.kernels.norm_silu import INTERPRETED

# One step of bfloat16 (the op's result is rounded to the input's dtype, and the kernel computes the op in
# another order than PyTorch, so a value may land on the neighbouring bfloat16), relative to the value.
BF16_STEP = 2.0**-7


def ln_modulate64(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    return F.layer_norm(x.double(), (x.shape[-1],), eps=eps) * (1 + scale.double()) + shift.double()


def gelu64(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x.double(), approximate="tanh")


def check_against(values: torch.Tensor, scales: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    """The kernel's float values times their row's scale reproduce want (float64) rounded to `dtype` within one
    step of it; each row's scale is its largest magnitude / 448 within that step; nothing past +-448."""
    want = want.to(dtype).double().reshape(values.shape)
    got = values.double() * scales.double()
    assert ((got - want).abs() <= want.abs() * BF16_STEP + 1e-12).all()
    ref_scales = want.abs().amax(dim=1, keepdim=True) / FP8_MAX
    ref_scales = torch.where(ref_scales > 0, ref_scales, torch.ones_like(ref_scales))
    assert ((scales.double() - ref_scales).abs() <= ref_scales * BF16_STEP).all()
    assert values.abs().max() <= FP8_MAX


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_kernel_matches_float64_ops(dtype):
    """Plain, GELU and modulated layer norm, rows of a width that is not a power of two (48 in 64-wide blocks),
    a row count that leaves the last program partly empty, two batches with their own shift and scale, one
    all-zero row (scale 1, values 0). Plain quantization is exactly `fp8.quantize_rows`. (In a plain CPU run
    the kernel does not take CPU tensors: the wrappers' fallback is the last test's.)"""
    gen = torch.Generator().manual_seed(0)
    x = (3 * torch.randn(2, 37, 48, generator=gen)).to(dtype)
    x[1, 5] = 0
    if not INTERPRETED:
        assert not module.row_quantize_usable(x)
        return
    values, scales = module.row_quantize(x, float_values=True)
    want_values, want_scales = quantize_rows(x.reshape(-1, 48))
    assert torch.equal(scales, want_scales)
    assert torch.equal(values.to(FP8_DTYPE).view(torch.uint8), want_values.view(torch.uint8))
    assert scales[37 + 5] == 1 and not values[37 + 5].any()

    values, scales = module.row_quantize(x, module.GELU, float_values=True)
    check_against(values, scales, gelu64(x), dtype)

    shift = 0.2 * torch.randn(2, 1, 48, generator=gen)
    scale = 0.2 * torch.randn(2, 1, 48, generator=gen)
    values, scales = module.row_quantize(x, module.LN_MODULATE, shift, scale, 1e-6, float_values=True)
    check_against(values, scales, ln_modulate64(x, shift, scale, 1e-6), dtype)


def test_kernel_takes_the_ffn_width():
    """Rows of 8960 (the FFN's hidden width): one row per program, a 16384-wide block."""
    x = (2 * torch.randn(3, 8960, generator=torch.Generator().manual_seed(1))).to(torch.bfloat16)
    if not INTERPRETED:
        assert not module.row_quantize_usable(x)
        return
    values, scales = module.row_quantize(x, module.GELU, float_values=True)
    check_against(values, scales, gelu64(x), torch.bfloat16)


def test_ops_fall_back_to_the_eager_ops_where_the_kernel_does_not_run():
    """`_Ops(row_kernel=True)`'s three quantizations take the same arguments as the eager ones and, on a device
    the kernel does not take (a plain CPU run), give their exact results. Refuses a layer norm without its
    modulation."""
    ops = _Ops(row_kernel=True)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(1, 20, 64, generator=gen).to(torch.bfloat16)
    shift, scale = 0.1 * torch.randn(1, 1, 64, generator=gen), 0.1 * torch.randn(1, 1, 64, generator=gen)
    cases = [
        (ops.quantize(x.reshape(-1, 64)), EAGER_OPS.quantize(x.reshape(-1, 64))),
        (ops.gelu_quantize(x.reshape(-1, 64)), EAGER_OPS.gelu_quantize(x.reshape(-1, 64))),
        (ops.ln_modulate_quantize(x, shift, scale, 1e-6), EAGER_OPS.ln_modulate_quantize(x, shift, scale, 1e-6)),
    ]
    for (values, scales), (want_values, want_scales) in cases:
        assert values.shape == want_values.shape and scales.shape == want_scales.shape
        if not INTERPRETED:
            assert torch.equal(values.view(torch.uint8), want_values.view(torch.uint8))
            assert torch.equal(scales, want_scales)
    assert module.row_quantize_usable(x) == INTERPRETED
    with pytest.raises(ValueError, match="LN_MODULATE"):
        module.row_quantize(x.reshape(-1, 64), module.LN_MODULATE, shift, scale)
