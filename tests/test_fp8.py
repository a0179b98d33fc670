"""dtype="fp8" (fp8.py): quantization against float64, the scaled product against a float64 product of the
quantized operands, the fp8 DiT against the full-precision one, and the fp8 copy on disk (quantize command)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from infvsr_core import cli
from infvsr_core.dit import CausalWanDiT, DiTConfig, random_dit_state_dict
from infvsr_core.errors import UsageError
from infvsr_core.fp8 import (
    FP8_DTYPE,
    FP8_MAX,
    QUANTIZED_LINEARS,
    FP8Linear,
    dequantize_rows,
    quantize_dit,
    quantize_rows,
)
from infvsr_core.loader import load_pipeline, save_fp8_dit
from infvsr_core.vae import FP8_OPTIONS
from tests.conftest import make_clip

# float8_e4m3fn keeps 3 mantissa bits: a normal value rounds to within 2^-4 of itself; below 2^-6 (in units of
# the row's scale) values are subnormal, spaced 2^-9 apart, so they round to within 2^-10 absolutely.
RELATIVE_ROUNDING = 2.0**-4
SUBNORMAL_ROUNDING = 2.0**-10


def test_round_trip_is_within_the_format_rounding():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 96, generator=g, dtype=torch.float64) * torch.logspace(-3, 3, 64, dtype=torch.float64)[:, None]
    x[3, 5] = 1e4  # an outlier costs only its own row
    values, scale = quantize_rows(x.float())
    assert values.dtype == FP8_DTYPE and scale.shape == (64, 1) and scale.dtype == torch.float32
    back = dequantize_rows(values, scale, torch.float64)
    bound = x.abs() * RELATIVE_ROUNDING + scale.double() * SUBNORMAL_ROUNDING
    assert ((back - x).abs() <= bound * (1 + 1e-6)).all()
    amax = x.abs().amax(dim=1)
    assert torch.allclose(back.abs().amax(dim=1), amax, rtol=RELATIVE_ROUNDING)  # each row's extreme is kept
    assert (values.float().abs().amax(dim=1) == FP8_MAX).all()  # each row uses the format's full range
    others = torch.cat([x[:3], x[4:]])
    assert torch.equal(quantize_rows(others.float())[1], torch.cat([scale[:3], scale[4:]]))


def _gelu64(x: torch.Tensor) -> torch.Tensor:
    x = x.double()
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def test_gelu_tanh_is_the_tanh_gelu():
    """fp8.gelu_tanh (x * sigmoid(2u)) against the tanh form in float64, to a few float32 steps (where float64's
    1 + tanh(u) cancels to 0, far out on the negative side, both are below 1e-12)."""
    from infvsr_core.fp8 import gelu_tanh

    x = torch.cat([torch.linspace(-20, 20, 4001), torch.randn(1000, generator=torch.Generator().manual_seed(1))])
    got = gelu_tanh(x.to(torch.bfloat16))
    assert got.dtype == torch.float32
    want = _gelu64(x.to(torch.bfloat16))
    assert torch.allclose(got.double(), want, rtol=2e-6, atol=1e-12)  # a few float32 steps


def test_the_gelu_row_scale_bounds_every_row_and_is_exact_on_ordinary_ones():
    """gelu_row_scale (from the row's extremes) against a float64 loop over each row's GELU values: never below
    the row's largest magnitude (no saturation), equal to it wherever gelu(max) reaches the minimum's bound, and
    the constants bracket the tanh GELU's minimum (found on a float64 grid)."""
    from infvsr_core.fp8 import GELU_ARGMIN, GELU_MIN_BOUND, gelu_row_scale

    grid = torch.linspace(-3, 0, 300_001, dtype=torch.float64)
    values = _gelu64(grid)
    assert grid[values.argmin()] <= GELU_ARGMIN and -values.min() <= GELU_MIN_BOUND < -values.min() + 1e-4
    g = torch.Generator().manual_seed(3)
    rows = [
        torch.randn(64, 96, generator=g) * 2,  # ordinary rows: the scale is the row's own
        torch.randn(16, 96, generator=g) * 1e-3,  # tiny rows: GELU_MIN_BOUND need not be reached
        -torch.rand(16, 96, generator=g) * 5,  # no positive entry
        torch.full((4, 96), GELU_ARGMIN) + torch.linspace(-0.01, 0.01, 96),  # around the minimum
        torch.linspace(-0.7, 0.2, 96).expand(4, 96),  # min above the argmin: gelu(min) is the negative extreme
    ]
    h = torch.cat(rows).to(torch.bfloat16)
    scale = gelu_row_scale(h)
    assert scale.shape == (h.shape[0], 1) and scale.dtype == torch.float32
    true_amax = torch.stack([_gelu64(row).abs().max() for row in h])  # a plain loop, row by row
    bound = scale.double().squeeze(1) * FP8_MAX
    assert (bound >= true_amax * (1 - 1e-6)).all()
    ordinary = _gelu64(h.amax(dim=1)) >= GELU_MIN_BOUND
    assert ordinary[:64].all() and not ordinary[64:80].any()
    assert torch.allclose(bound[ordinary], true_amax[ordinary], rtol=1e-6)
    assert (bound[64:80] <= GELU_MIN_BOUND * (1 + 1e-6)).all()  # tiny rows: at most the minimum's bound


def test_zero_rows_stay_zero():
    x = torch.zeros(3, 16)
    x[1] = torch.linspace(-1, 1, 16)
    values, scale = quantize_rows(x)
    back = dequantize_rows(values, scale, torch.float32)
    assert torch.equal(back[0], x[0]) and torch.equal(back[2], x[2]) and torch.isfinite(scale).all()


def _linear(seed: int, k: int = 64, n: int = 48) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(k, n)


@pytest.mark.parametrize("native", [False, True])
def test_fp8_linear_against_a_float64_product(native):
    """Both paths compute (x quantized?) @ (w quantized).T + b: the expanded path with x as is, the scaled product
    with x quantized per token; each is compared with float64 arithmetic on the same operands."""
    linear = _linear(1)
    layer = FP8Linear.from_linear(linear)
    layer.native = native
    x = torch.randn(2, 10, 64, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    w64 = dequantize_rows(layer.weight, layer.weight_scale, torch.float64)
    flat = x.reshape(-1, 64)
    if native:
        xq, xs = quantize_rows(flat)
        operand = dequantize_rows(xq, xs, torch.float64)
    else:
        operand = flat.double()
    expected = (operand @ w64.t() + layer.bias.double()).view(2, 10, 48)
    out = layer(x)
    assert out.dtype == torch.bfloat16 and out.shape == (2, 10, 48)
    # bf16 output rounding (2^-8 relative) is the only difference from float64 on these operands.
    assert torch.allclose(out.double(), expected, rtol=2.0**-8, atol=1e-3 * expected.abs().max().item())
    # ... and the layer approximates the original full-precision linear to fp8's precision.
    full = linear(x.float()).double()
    relative = ((out.double() - full).norm() / full.norm()).item()
    assert relative < (0.08 if native else 0.04), relative


def test_quantize_dit_replaces_exactly_the_named_layers():
    config = DiTConfig.tiny()
    dit = CausalWanDiT(config)
    dit.load_state_dict(random_dit_state_dict(config, seed=3))
    before = {name for name, m in dit.named_modules() if isinstance(m, nn.Linear)}
    quantize_dit(dit)
    fp8 = {name for name, m in dit.named_modules() if isinstance(m, FP8Linear)}
    expected = {f"blocks.{i}.{path}" for i in range(config.num_layers) for path in QUANTIZED_LINEARS}
    assert fp8 == expected
    still_linear = {name for name, m in dit.named_modules() if isinstance(m, nn.Linear)}
    assert still_linear == before - expected
    assert any(name.endswith("cross_attn.k") for name in still_linear)  # the prompt's few tokens stay bf16


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = torch.mean((a.double() - b.double()) ** 2).item()
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


def _run(pipe, clip: torch.Tensor) -> torch.Tensor:
    session = pipe.new_session(scale=2)
    out = [pipe.push(session, clip)]
    out.append(pipe.close(session))
    return torch.cat(out)


@pytest.fixture(scope="module")
def fp8_copy(tiny_models, tmp_path_factory):
    out = tmp_path_factory.mktemp("fp8") / "InfVSR_fp8.safetensors"
    return save_fp8_dit(tiny_models / "InfVSR.ckpt", out)


def test_fp8_pipeline_is_close_to_full_precision_and_the_copy_matches(tiny_models, fp8_copy):
    """fp8 at load and the fp8 copy on disk are the same model; both are close to float32 (random tiny weights:
    the bound is looser than the full-size figure in bench/RESULTS.md, and still far from chance)."""
    clip = make_clip(21, 12, 20, seed=6)
    full = _run(load_pipeline(tiny_models, device="cpu", dtype="fp32"), clip)
    at_load = load_pipeline(tiny_models, device="cpu", dtype="fp8")
    assert sum(isinstance(m, FP8Linear) for m in at_load.dit.modules()) > 0
    out = _run(at_load, clip)
    from_copy = load_pipeline(tiny_models, dit=fp8_copy, device="cpu")
    assert torch.equal(_run(from_copy, clip), out)
    # the VAE's float8 convs come with fp8 (both ways of loading it), never with the other dtypes
    widths = FP8_OPTIONS.fp8_conv_outputs
    assert widths and at_load.vae.fast_options == from_copy.vae.fast_options == FP8_OPTIONS
    assert load_pipeline(tiny_models, device="cpu", dtype="fp32").vae.fast_options.fp8_conv_outputs == frozenset()
    assert at_load.model_id != load_pipeline(tiny_models, device="cpu", dtype="fp32").model_id
    assert 30.0 < _psnr(out, full) < math.inf


def test_fp8_copy_is_smaller_and_refuses_misuse(tiny_models, fp8_copy, tmp_path):
    from safetensors.torch import load_file

    state = load_file(fp8_copy)
    assert state["blocks.0.ffn.0.weight"].dtype == FP8_DTYPE
    assert state["blocks.0.ffn.0.weight_scale"].dtype == torch.float32
    assert state["blocks.0.cross_attn.k.weight"].dtype != FP8_DTYPE
    with pytest.raises(UsageError, match="already an fp8 copy"):
        save_fp8_dit(fp8_copy, tmp_path / "again.safetensors")
    with pytest.raises(UsageError, match=".safetensors"):
        save_fp8_dit(tiny_models / "InfVSR.ckpt", tmp_path / "copy.ckpt")
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_quantize_command_and_upscale_with_the_copy(tiny_models, tmp_path, capsys):
    from infvsr_core.fixtures import write_demo_clip

    small_clip = write_demo_clip(tmp_path / "in.mp4", frames=14, width=32, height=24)
    copy = tmp_path / "InfVSR_fp8.safetensors"
    assert cli.main(["quantize", str(tiny_models / "InfVSR.ckpt"), "-o", str(copy)]) == 0
    assert "wrote" in capsys.readouterr().out and copy.is_file()
    out = tmp_path / "up.mkv"
    argv = ["upscale", str(small_clip), "-o", str(out), "--models", str(tiny_models), "--dit", str(copy)]
    assert cli.main([*argv, "--scale", "2", "--codec", "ffv1", "--quiet"]) == 0
    assert out.is_file()
    assert cli.main(["quantize", str(tmp_path / "missing.ckpt"), "-o", str(tmp_path / "x.safetensors")]) == 1
    assert "missing.ckpt" in capsys.readouterr().err


def test_shared_quantization_and_the_fused_ffn_match_their_plain_forms():
    """q, k, v sharing one quantization of x give what each layer gives alone; the fp8 FFN (GELU fused with the
    hidden quantization) matches a float64 evaluation of the same quantized operands."""
    from infvsr_core.fp8 import ffn_fp8, project

    layers = [FP8Linear.from_linear(_linear(seed, 64, 32)) for seed in (4, 5, 6)]
    for layer in layers:
        layer.native = True
    x = torch.randn(3, 7, 64, generator=torch.Generator().manual_seed(7)).to(torch.bfloat16)
    assert all(torch.equal(a, layer(x)) for a, layer in zip(project(tuple(layers), x), layers, strict=True))

    ffn = nn.Sequential(_linear(8, 64, 96), nn.GELU(approximate="tanh"), _linear(9, 96, 64))
    ffn = nn.Sequential(FP8Linear.from_linear(ffn[0]), ffn[1], FP8Linear.from_linear(ffn[2]))
    ffn[0].native = ffn[2].native = True
    out = ffn_fp8(ffn, x)
    up, down = ffn[0], ffn[2]
    xq = dequantize_rows(*quantize_rows(x.reshape(-1, 64)), torch.float64)
    hidden = (xq @ dequantize_rows(up.weight, up.weight_scale, torch.float64).t() + up.bias.double()).bfloat16()
    hq = dequantize_rows(*quantize_rows(torch.nn.functional.gelu(hidden, approximate="tanh")), torch.float64)
    expected = hq @ dequantize_rows(down.weight, down.weight_scale, torch.float64).t() + down.bias.double()
    assert out.shape == (3, 7, 64)
    # The hidden activations are rounded to bf16 in both (the product's output dtype); then bf16 output rounding.
    assert torch.allclose(out.double().reshape(-1, 64), expected, rtol=2.0**-7, atol=2e-2 * expected.abs().max().item())


def test_the_fused_block_path_is_close_to_expanded_weights():
    """With native products (forced on the CPU), each block quantizes the modulated norm in the same op that
    makes it and hands it to q, k, v and the FFN; against the expanded-weight path (activations not quantized)
    the only difference is the activations' fp8 rounding."""
    config = DiTConfig.tiny()
    dit = CausalWanDiT(config)
    dit.load_state_dict(random_dit_state_dict(config, seed=11))
    quantize_dit(dit).eval()
    g = torch.Generator().manual_seed(12)
    latents = torch.randn(1, config.in_dim, 3, 4, 6, generator=g)
    context = torch.randn(1, 5, config.text_dim, generator=g)
    timestep = torch.tensor([500.0])
    layers = [m for m in dit.modules() if isinstance(m, FP8Linear)]
    with torch.no_grad():
        for layer in layers:
            layer.native = False
        expanded, _ = dit(latents, context, timestep)
        for layer in layers:
            layer.native = True
        fused, _ = dit(latents, context, timestep)
    relative = ((fused - expanded).norm() / expanded.norm()).item()
    assert 0 < relative < 0.05, relative
