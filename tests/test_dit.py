"""The causal DiT against diffusers' Wan, an independent float64 streaming reference, and the SPEC's numbers."""

from __future__ import annotations

import json
import math
import sys

import pytest
import torch

from infvsr_core import attention as attention_module
from infvsr_core.attention import ATTENTION_BACKENDS, attention, register_attention_backend
from infvsr_core.dit import CausalWanDiT, DiTConfig, KVCache, random_dit_state_dict, timestep_embedding
from infvsr_core.rope import apply_rope, rope_axis_dims, rope_cos_sin
from infvsr_core.weights import WeightFileError
from tests.dit_reference import (
    reference_stream,
    rope_apply_complex,
    rope_complex,
    sinusoid_reference,
    to_diffusers_state_dict,
)

TINY = DiTConfig.tiny()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def strong_state_dict(cfg: DiTConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random float32 weights with large modulation, so every gate/shift/scale visibly moves the output."""
    sd = random_dit_state_dict(cfg, seed=seed, dtype=torch.float32)
    for k in sd:
        if k.endswith("modulation"):
            sd[k] = sd[k] * 10
        elif k.endswith("weight") and sd[k].ndim >= 2:
            sd[k] = sd[k] * 2.5
    return sd


@pytest.fixture(scope="module")
def tiny_model() -> CausalWanDiT:
    model = CausalWanDiT(TINY).eval()
    model.load_state_dict(strong_state_dict(TINY), strict=True)
    return model


def inputs(frames: int = 3, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(1, 16, frames, 8, 8, generator=g)
    context = torch.randn(1, 145, 512, generator=g)
    return latents, context, torch.tensor([400.0])


# ---------------------------------------------------------------- attention seam


def test_attention_backends() -> None:
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, n, 3, 64, generator=g) for n in (5, 7, 7))
    out = attention(q, k, v)
    assert out.shape == (2, 5, 3, 64)
    assert torch.allclose(out, attention(q, k, v, "math"), atol=1e-5)
    with pytest.raises(ValueError, match="sdpa"):
        attention(q, k, v, "nope")
    register_attention_backend("test_double", lambda q, k, v: 2 * ATTENTION_BACKENDS["math"](q, k, v))
    try:
        assert torch.allclose(attention(q, k, v, "test_double"), 2 * out, atol=1e-5)
    finally:
        del ATTENTION_BACKENDS["test_double"]


def _fake_flash3(tmp_path, monkeypatch, body: str, name: str = "fa3_fwd_interface") -> None:
    """A stand-in FlashAttention-3 module on sys.path (the real one needs a Hopper GPU), loader state reset."""
    (tmp_path / f"{name}.py").write_text(body)
    (tmp_path / "fa3_fwd_config.py").write_text("CONFIG = {'build_flags': {}}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(attention_module, "_flash3", [])
    for module in (name, "flash_attn_config", "fa3_fwd_config"):
        monkeypatch.delitem(sys.modules, module, raising=False)


FAKE_FA3 = """
import torch, torch.nn.functional as F
def flash_attn_func(q, k, v):
    from flash_attn_config import CONFIG  # the wheel's helpers import its config under the upstream name
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
    return out, torch.zeros(q.shape[0], q.shape[2], q.shape[1])  # older builds also return the log-sum-exp
"""


def test_flash3_loader_and_adapter(tmp_path, monkeypatch) -> None:
    _fake_flash3(tmp_path, monkeypatch, FAKE_FA3)
    assert attention_module.flash3_installed() == "fa3_fwd_interface"
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, n, 2, 32, generator=g) for n in (6, 9, 9))
    out = attention_module._flash3_attention(q, k, v)  # the tuple's output, the config alias in place
    assert out.shape == q.shape and torch.allclose(out, attention(q, k, v, "math"), atol=1e-5)
    # "auto" takes it only where it has kernels: a CUDA tensor in bf16 on a Hopper GPU; here SDPA.
    assert not attention_module.flash3_supports(q.bfloat16(), k.bfloat16())
    assert torch.equal(attention(q, k, v, "auto"), attention(q, k, v, "sdpa"))


def test_flash3_broken_build_falls_back(tmp_path, monkeypatch, capsys) -> None:
    _fake_flash3(tmp_path, monkeypatch, "raise OSError('undefined symbol: aoti_torch_x')\n", "flash_attn_interface")
    assert attention_module._flash3_module() is None
    assert "undefined symbol" in capsys.readouterr().err
    q = torch.randn(1, 4, 2, 32)
    with pytest.raises(RuntimeError, match="FlashAttention-3"):
        attention_module._flash3_attention(q, q, q)


# ---------------------------------------------------------------- 1. against diffusers


def test_matches_diffusers_wan(tiny_model: CausalWanDiT) -> None:
    from diffusers import WanTransformer3DModel

    ref = WanTransformer3DModel(
        patch_size=TINY.patch_size,
        num_attention_heads=TINY.num_heads,
        attention_head_dim=128,
        in_channels=TINY.in_dim,
        out_channels=TINY.out_dim,
        text_dim=TINY.text_dim,
        freq_dim=TINY.freq_dim,
        ffn_dim=TINY.ffn_dim,
        num_layers=TINY.num_layers,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        eps=TINY.eps,
    ).eval()
    ref.load_state_dict(to_diffusers_state_dict(tiny_model.state_dict()), strict=True)
    latents, context, t = inputs()
    with torch.no_grad():
        ours, _ = tiny_model(latents, context, t)
        theirs = ref(latents, t, context, return_dict=False)[0]
    assert ours.shape == theirs.shape == (1, 16, 3, 8, 8)
    err = rel_err(ours, theirs)
    assert err < 1e-4, f"max relative error vs diffusers WanTransformer3DModel: {err:.3e}"


# ---------------------------------------------------------------- 2. rolling KV cache


def test_rolling_cache_matches_banded_reference(tiny_model: CausalWanDiT) -> None:
    """Three streamed chunks == one float64 pass where chunk c attends to chunks c-1 and c only."""
    latents, context, t = inputs(frames=9)
    sd = tiny_model.state_dict()
    expected = reference_stream(sd, TINY, latents, context, t, chunk_frames=3)
    cache = None
    with torch.no_grad():
        for c in range(3):
            out, cache = tiny_model(latents[:, :, 3 * c : 3 * c + 3], context, t, time_offset=3 * c, kv_cache=cache)
            err = rel_err(out, expected[:, :, 3 * c : 3 * c + 3])
            assert err < 1e-5, f"chunk {c}: max relative error vs banded float64 reference: {err:.3e}"


def test_cache_changes_output_and_stays_constant(tiny_model: CausalWanDiT) -> None:
    latents, context, t = inputs(frames=15)
    chunks = latents.split(3, dim=2)
    with torch.no_grad():
        _, cache = tiny_model(chunks[0], context, t)
        with_cache, _ = tiny_model(chunks[1], context, t, time_offset=3, kv_cache=cache)
        without, _ = tiny_model(chunks[1], context, t, time_offset=3)
        assert rel_err(with_cache, without) > 1e-2, "the cache has no effect on the next chunk"
        cache = None
        sizes = []
        for c, chunk in enumerate(chunks):
            _, cache = tiny_model(chunk, context, t, time_offset=3 * c, kv_cache=cache)
            sizes.append(sum(k.numel() + v.numel() for k, v in zip(cache.keys, cache.values, strict=True)))
    assert isinstance(cache, KVCache) and cache.latent_frames == 3
    assert len(cache.keys) == len(cache.values) == TINY.num_layers
    assert cache.keys[0].shape == (1, 3 * 4 * 4, TINY.num_heads, 128)
    assert len(set(sizes)) == 1, f"cache size grows: {sizes}"


# ---------------------------------------------------------------- 3. RoPE / 4. timestep embedding


@pytest.mark.parametrize("offset", [0, 5, 1500])
def test_rope_matches_complex_reference(offset: int) -> None:
    assert rope_axis_dims(128) == (44, 42, 42)
    f, h, w = 3, 4, 5
    x = torch.randn(2, f * h * w, 3, 128, generator=torch.Generator().manual_seed(offset))
    cos, sin = rope_cos_sin(f, h, w, 128, time_offset=offset)
    assert cos.shape == sin.shape == (f * h * w, 64) and cos.dtype == torch.float32
    ours = apply_rope(x, cos, sin)
    ref = rope_apply_complex(x, rope_complex(f, h, w, 128, offset))
    assert (ours.double() - ref).abs().max() < 1e-5
    assert apply_rope(x.bfloat16(), cos, sin).dtype == torch.bfloat16


def test_timestep_embedding_cos_then_sin() -> None:
    t = torch.tensor([400.0])
    emb = timestep_embedding(t, 256)
    assert emb.dtype == torch.float64 and emb.shape == (1, 256)
    assert torch.allclose(emb, sinusoid_reference(t, 256), rtol=0, atol=1e-12)
    # k = 0 has frequency 1: slot 0 is cos(400), slot 128 is sin(400) ([cos, sin] order, not diffusers' default).
    assert emb[0, 0].item() == pytest.approx(math.cos(400.0), abs=1e-12)
    assert emb[0, 128].item() == pytest.approx(math.sin(400.0), abs=1e-12)
    assert emb[0, 127].item() == pytest.approx(math.cos(400.0 * 10000 ** (-127 / 128)), abs=1e-12)


# ---------------------------------------------------------------- 5. configs and dtypes


def full_meta_state_dict() -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        return CausalWanDiT(DiTConfig.full()).state_dict()


def test_config_from_state_dict() -> None:
    assert DiTConfig.from_state_dict(random_dit_state_dict(TINY)) == TINY
    sd = full_meta_state_dict()
    assert all(v.device.type == "meta" for v in sd.values())
    # SPEC section 1 shapes, written out independently of the module.
    assert sd["patch_embedding.weight"].shape == (1536, 16, 1, 2, 2)
    assert sd["blocks.29.ffn.0.weight"].shape == (8960, 1536)
    assert sd["blocks.0.modulation"].shape == (1, 6, 1536)
    assert sd["time_projection.1.weight"].shape == (6 * 1536, 1536)
    assert sd["head.head.weight"].shape == (64, 1536) and sd["head.modulation"].shape == (1, 2, 1536)
    assert sd["text_embedding.0.weight"].shape == (1536, 512)
    assert "blocks.30.modulation" not in sd
    assert DiTConfig.from_state_dict(sd) == DiTConfig.full()

    with pytest.raises(WeightFileError, match="patch_embedding.weight"):
        DiTConfig.from_state_dict({k: v for k, v in sd.items() if not k.startswith("patch_embedding")}, path="x.ckpt")
    bad = dict(sd, **{"patch_embedding.weight": torch.empty(1500, 16, 1, 2, 2, device="meta")})
    with pytest.raises(WeightFileError, match="multiple"):
        DiTConfig.from_state_dict(bad)


def test_config_from_json(tmp_path) -> None:
    wan = {
        "_class_name": "WanModel",
        "dim": 1536,
        "eps": 1e-06,
        "ffn_dim": 8960,
        "freq_dim": 256,
        "in_dim": 16,
        "model_type": "t2v",
        "num_heads": 12,
        "num_layers": 30,
        "out_dim": 16,
        "text_len": 512,
    }
    (tmp_path / "config.json").write_text(json.dumps(wan))
    assert DiTConfig.from_json(tmp_path / "config.json") == DiTConfig.full()
    (tmp_path / "tiny.json").write_text(json.dumps({"dim": 256, "ffn_dim": 512, "num_heads": 2, "num_layers": 2}))
    assert DiTConfig.from_json(tmp_path / "tiny.json") == TINY
    (tmp_path / "p.json").write_text(json.dumps({"patch_size": [1, 2, 2]}))
    assert DiTConfig.from_json(tmp_path / "p.json").patch_size == (1, 2, 2)
    # The InfVSR release nests its values under "model_config" (with has_image_input, text_dim 512).
    nested = {"model_config": {**wan, "text_dim": 512, "has_image_input": False, "num_layers": 2, "dim": 256}}
    (tmp_path / "release.json").write_text(json.dumps(nested))
    assert DiTConfig.from_json(tmp_path / "release.json") == DiTConfig(dim=256, num_layers=2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_forward(dtype: torch.dtype) -> None:
    sd = random_dit_state_dict(TINY, seed=3)
    ref_model = CausalWanDiT(TINY).eval()
    ref_model.load_state_dict(sd)
    model = CausalWanDiT(TINY).to(dtype).eval()
    model.load_state_dict(sd)
    latents, context, t = inputs(frames=6)
    with torch.no_grad():
        expected, ref_cache = ref_model(latents[:, :, 3:], context, t, time_offset=3, kv_cache=None)
        _, cache = model(latents[:, :, :3].to(dtype), context.to(dtype), t)
        out, cache = model(latents[:, :, 3:].to(dtype), context.to(dtype), t, time_offset=3, kv_cache=cache)
        out_nc, _ = model(latents[:, :, 3:].to(dtype), context.to(dtype), t, time_offset=3)
    assert out.dtype == dtype and cache.keys[0].dtype == dtype
    assert torch.isfinite(out).all() and torch.isfinite(out_nc).all()
    assert rel_err(out_nc, expected) < 2e-2  # same computation in float32 (bf16 measured ~6e-3)


# ---------------------------------------------------------------- 6. random weights in the published format


def test_random_state_dict_format() -> None:
    sd = random_dit_state_dict(TINY, seed=7)
    own = CausalWanDiT(TINY).state_dict()
    assert list(sd) == list(own)
    assert all(sd[k].shape == own[k].shape and sd[k].dtype == torch.bfloat16 for k in own)
    again = random_dit_state_dict(TINY, seed=7)
    assert all(torch.equal(sd[k], again[k]) for k in sd)
    other = random_dit_state_dict(TINY, seed=8)
    assert not torch.equal(sd["blocks.0.self_attn.q.weight"], other["blocks.0.self_attn.q.weight"])
    assert 0.9 < sd["blocks.0.self_attn.norm_q.weight"].float().mean() < 1.1


def test_released_cache_is_dropped_layer_by_layer(tiny_model: CausalWanDiT) -> None:
    """release_cache: same outputs, and layer i's old entries are gone before layer i+1's new ones exist."""
    latents, context, t = inputs(frames=6)
    with torch.no_grad():
        _, cache = tiny_model(latents[:, :, :3], context, t)
        expected, expected_cache = tiny_model(latents[:, :, 3:], context, t, time_offset=3, kv_cache=cache)
        handed = KVCache(keys=list(cache.keys), values=list(cache.values), latent_frames=cache.latent_frames)
        seen = []

        def keep(tensor: torch.Tensor) -> torch.Tensor:
            seen.append([k is None for k in handed.keys])
            return tensor.clone()

        out, new_cache = tiny_model(
            latents[:, :, 3:], context, t, time_offset=3, kv_cache=handed, release_cache=True, keep=keep
        )
    assert torch.equal(out, expected)
    for got, want in zip(new_cache.keys + new_cache.values, expected_cache.keys + expected_cache.values, strict=True):
        assert torch.equal(got, want)
    assert all(k is None for k in handed.keys + handed.values)
    layers = TINY.num_layers
    # keep() runs for each layer's key then value: by then exactly the layers up to it were dropped.
    assert seen == [[j <= i for j in range(layers)] for i in range(layers) for _ in (0, 1)]
    assert all(k is not None for k in cache.keys)  # the caller's own lists were not touched
