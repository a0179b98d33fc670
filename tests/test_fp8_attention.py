"""Float8 self-attention of the fp8 DiT (fp8.quantize_heads, fp8.normed_head_scale, attention.float8_attention):
the per-head quantization against a plain float64 loop, the queries' and keys' bound against adversarial inputs,
the float8 reference against float64 attention, and the DiT's switch.
FlashAttention-3's float8 kernel itself runs on a Hopper GPU only: bench/check_attention.py measures it there."""

from __future__ import annotations

import math

import pytest
import torch

from infvsr_core import fp8
from infvsr_core.attention import float8_attention, float8_attention_runs
from infvsr_core.dit import CausalWanDiT, DiTConfig, _rms_rope_op, random_dit_state_dict
from infvsr_core.fp8 import (
    FP8_DTYPE,
    FP8_MAX,
    NORMED_BOUND_MARGIN,
    normed_head_scale,
    quantize_dit,
    quantize_heads,
    set_float8_attention,
)
from infvsr_core.rope import rope_cos_sin

# float8_e4m3fn: 3 mantissa bits (a normal value within 2^-4 of itself), subnormals 2^-9 apart in scale units.
RELATIVE_ROUNDING = 2.0**-4
SUBNORMAL_ROUNDING = 2.0**-10


def _operand(seed: int, tokens: int, decades: float = 2.0, heads: int = 3, dim: int = 16, batch: int = 2):
    """Gaussian (B, L, H, D) operands whose heads differ in range by up to 10^decades either way."""
    g = torch.Generator().manual_seed(seed)
    spread = torch.logspace(-decades, decades, heads, dtype=torch.float64)[None, None, :, None]
    return torch.randn(batch, tokens, heads, dim, generator=g, dtype=torch.float64) * spread


def test_quantize_heads_scales_each_batch_and_head_by_its_own_extreme():
    past, new = _operand(0, 7), _operand(1, 5)
    values, scale = quantize_heads(past.float(), new.float())
    assert values.dtype == FP8_DTYPE and values.shape == (2, 12, 3, 16) and scale.shape == (2, 3)
    joined = torch.cat([past, new], dim=1)
    for b in range(2):  # a plain loop over (batch, head): the scale maps that slice's extreme to the format's
        for h in range(3):
            part = joined[b, :, h]
            assert math.isclose(scale[b, h].item(), part.abs().max().item() / FP8_MAX, rel_tol=1e-6)
            back = values[b, :, h].double() * scale[b, h].double()
            bound = part.abs() * RELATIVE_ROUNDING + scale[b, h].double() * SUBNORMAL_ROUNDING
            assert ((back - part).abs() <= bound * (1 + 1e-6)).all()
            assert values[b, :, h].float().abs().max().item() == FP8_MAX
    # joining in the call is the same as quantizing the joined tensor
    alone_values, alone_scale = quantize_heads(joined.float())
    assert torch.equal(alone_values.view(torch.uint8), values.view(torch.uint8)) and torch.equal(alone_scale, scale)


def test_quantize_heads_keeps_an_all_zero_head_zero():
    x = _operand(2, 4).float()
    x[1, :, 2] = 0
    values, scale = quantize_heads(x)
    assert scale[1, 2].item() == 1.0 and torch.isfinite(scale).all()
    assert (values[1, :, 2].float() == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_normed_bound_holds_for_any_input_and_is_reached(dtype):
    """No token, however its energy is spread, passes the scale's float8 range after RMSNorm and RoPE: tokens
    with all their energy in one element (the bound's worst case), in one rotated pair, and Gaussian ones."""
    heads, dim = 3, 48
    g = torch.Generator().manual_seed(6)
    weight = (torch.randn(dim, generator=g) * torch.logspace(-1, 1, dim)).to(dtype)
    eye = torch.eye(dim)
    pairs = (eye[0::2] + eye[1::2]) / math.sqrt(2)
    tokens = torch.cat([eye * 3.0, -eye * 1e-3, pairs * 7.0, torch.randn(40, dim, generator=g) * 5]).to(dtype)
    cos, sin = rope_cos_sin(tokens.shape[0], 1, 1, dim // heads)
    roped = _rms_rope_op(tokens[None], weight, cos, sin, 1e-6, heads).float()
    scale = normed_head_scale(weight, heads)
    ratio = roped.abs().amax(dim=(0, 1, 3)) / scale  # in float8 units, per head
    assert (ratio <= FP8_MAX).all(), ratio
    # the one-element tokens reach the bound up to its margin: the scale wastes none of the range
    assert (ratio >= FP8_MAX / NORMED_BOUND_MARGIN * 0.97).all(), ratio


def _attention64(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    scores = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) / math.sqrt(q.shape[-1])
    return torch.einsum("bhqk,bkhd->bqhd", scores.softmax(dim=-1), v.double())


def test_float8_reference_is_attention_of_the_quantized_operands():
    # queries and keys as the DiT's (RMS-normed, order 1: softmax not saturated), values of any range
    q, k, v = _operand(3, 9, decades=0.3), _operand(4, 14, decades=0.3), _operand(5, 14)
    quantized = [quantize_heads(x.float()) for x in (q, k, v)]
    out = float8_attention(*(x for x, _ in quantized), tuple(s for _, s in quantized), "math", torch.float32)
    assert out.dtype == torch.float32 and out.shape == q.shape
    # exactly attention of the dequantized operands (float32 math against float64: 1e-5) ...
    dequantized = [x.double() * s.double()[:, None, :, None] for x, s in quantized]
    exact = _attention64(*dequantized)
    assert torch.allclose(out.double(), exact, rtol=1e-5, atol=1e-5 * exact.abs().max().item())
    # ... and within float8's rounding of attention of the originals
    reference = _attention64(q, k, v)
    relative = ((out.double() - reference).norm() / reference.norm()).item()
    assert 0 < relative < 0.1, relative


def test_a_float8_kernel_runs_only_where_one_exists():
    cpu = torch.zeros(1, 4, 2, 16, dtype=torch.bfloat16)
    assert float8_attention_runs(cpu, "math")
    assert not float8_attention_runs(cpu, "auto") and not float8_attention_runs(cpu, "sdpa")


def _dit() -> tuple[CausalWanDiT, tuple[torch.Tensor, ...]]:
    config = DiTConfig.tiny()
    dit = CausalWanDiT(config)
    dit.load_state_dict(random_dit_state_dict(config, seed=21))
    g = torch.Generator().manual_seed(22)
    latents = torch.randn(1, config.in_dim, 3, 4, 6, generator=g)
    context = torch.randn(1, 5, config.text_dim, generator=g)
    return dit.eval(), (latents, context, torch.tensor([500.0]))


def test_the_dit_switch_changes_only_the_attention_precision():
    dit, inputs = _dit()
    dit.attention_backend = "math"
    with torch.no_grad():
        first, cache = dit(*inputs)
        second, _ = dit(*inputs, kv_cache=cache)  # keys of the previous chunk joined with this chunk's
        set_float8_attention(dit, True)
        first8, cache8 = dit(*inputs)
        second8, _ = dit(*inputs, kv_cache=cache8)
    for full, quantized in ((first, first8), (second, second8)):
        relative = ((quantized - full).norm() / full.norm()).item()
        assert 0 < relative < 0.05, relative
    # the cache keeps full-precision keys and values
    assert all(k.dtype == torch.float32 for k in cache8.keys) and torch.equal(cache8.keys[0], cache.keys[0])
    # where no float8 kernel runs (SDPA on the CPU), the switch changes nothing
    dit.attention_backend = "sdpa"
    with torch.no_grad():
        on, _ = dit(*inputs)
        set_float8_attention(dit, False)
        off, _ = dit(*inputs)
    assert torch.equal(on, off)


@pytest.mark.parametrize("on", [False, True])
def test_quantize_dit_sets_the_attention_precision(monkeypatch, on):
    monkeypatch.setattr(fp8, "FLOAT8_ATTENTION", on)
    dit, _ = _dit()
    assert not any(block.self_attn.float8_attention for block in dit.blocks)
    quantize_dit(dit)
    assert all(block.self_attn.float8_attention is on for block in dit.blocks)
