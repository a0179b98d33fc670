"""The fast channels-last VAE forward against diffusers' modules (CPU, float32, tiny VAE), and its norm kernel."""

from __future__ import annotations

import copy

import pytest
import torch

import infvsr_core.fast_vae as fast_vae_module
from infvsr_core.fast_vae import fast_decoder, fast_encoder, prepare_channels_last
from infvsr_core.kernels.norm_silu import rms_norm_rows, rms_norm_rows_reference
from infvsr_core.vae import TINY_VAE_BASE_DIM, StreamingVAE, build_vae, random_vae_state_dict

from .conftest import smooth_vae_clip

# Same ops in float32; only the conv algorithm (padding folded into conv3d,
# channels-last) and the norm's op order differ: last-bit differences.
TOL = 2e-5


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-6)).item()


@pytest.fixture(scope="module")
def vae():
    return build_vae(random_vae_state_dict(TINY_VAE_BASE_DIM, seed=3))


@pytest.fixture(scope="module")
def clip() -> torch.Tensor:
    return smooth_vae_clip(13, seed=5)


@pytest.mark.parametrize("pad_rgb", [False, True])
def test_encoder_and_decoder_match_diffusers_call_by_call(vae, clip, pad_rgb, monkeypatch):
    """Frame groups 1, 4, 4, 4 (encoder) and single latent frames (decoder): outputs and every cache entry.

    With `pad_rgb` the RGB-in and RGB-out convs run with zero-padded channels, as they do on CUDA.
    """
    monkeypatch.setattr(fast_vae_module, "PAD_OFF_CUDA", pad_rgb)
    fast_vae = copy.deepcopy(vae)
    prepare_channels_last(fast_vae)
    n_enc = len(StreamingVAE(vae).new_history().encoder_cache)
    plain_cache, fast_cache = [None] * n_enc, [None] * n_enc
    latents = []
    for start, stop in ((0, 1), (1, 5), (5, 9), (9, 13)):
        piece = clip[:, :, start:stop]
        ref = vae.encoder(piece, feat_cache=plain_cache, feat_idx=[0])
        out = fast_encoder(fast_vae, piece, fast_cache)
        assert out.shape == ref.shape and max_err(out, ref) < TOL
        latents.append(ref)
        for a, b in zip(fast_cache, plain_cache, strict=True):
            assert type(a) is type(b)
            if isinstance(b, torch.Tensor):
                assert a.shape == b.shape and max_err(a, b) < TOL
    z = vae.post_quant_conv(vae.quant_conv(torch.cat(latents, 2))[:, :16])
    n_dec = len(StreamingVAE(vae).new_history().decoder_cache)
    plain_cache, fast_cache = [None] * n_dec, [None] * n_dec
    for i in range(z.shape[2]):
        ref = vae.decoder(z[:, :, i : i + 1], feat_cache=plain_cache, feat_idx=[0], first_chunk=i == 0)
        out = fast_decoder(fast_vae, z[:, :, i : i + 1], fast_cache)
        assert out.shape == ref.shape and max_err(out, ref) < TOL
        for a, b in zip(fast_cache, plain_cache, strict=True):
            assert (a == b) if isinstance(b, str) else (a is None and b is None) or max_err(a, b) < TOL


def test_streaming_vae_fast_flag(vae, clip):
    """StreamingVAE(fast=True) through whole chunks (9 then 12 frames), untiled and tiled."""
    for kwargs in ({}, {"tiling": "always", "tile_size": 3, "tile_stride": 2}):
        outs = []
        for fast in (False, True):
            sv = StreamingVAE(copy.deepcopy(vae) if fast else vae, fast=fast, **kwargs)
            history = sv.new_history()
            lat = [sv.encode_chunk(clip[:, :, :9], history), sv.encode_chunk(clip[:, :, 9:13], history)]
            dec = [sv.decode_chunk(z, history) for z in lat]
            outs.append(lat + dec)
        for a, b in zip(outs[1], outs[0], strict=True):
            assert a.shape == b.shape and max_err(a, b) < TOL


def test_fast_is_off_on_cpu_by_default(vae):
    assert not StreamingVAE(vae)._use_fast(torch.device("cpu"))


@pytest.mark.parametrize("silu", [True, False])
def test_norm_rows_fallback_matches_reference(silu):
    gen = torch.Generator().manual_seed(0)
    rows, gamma = torch.randn(50, 24, generator=gen), 1 + 0.1 * torch.randn(24, 1, 1, 1, generator=gen)
    ref = rms_norm_rows_reference(rows, gamma, 24**0.5, 0.0, silu)
    out = torch.empty_like(rows)
    got = rms_norm_rows(rows, gamma, 24**0.5, silu=silu, out=out, use_triton=False)
    assert got is out and torch.allclose(got, ref, atol=1e-6, rtol=1e-6)
    manual = torch.nn.functional.normalize(rows, dim=-1) * 24**0.5 * gamma.flatten()
    assert torch.allclose(ref, torch.nn.functional.silu(manual) if silu else manual, atol=1e-6)
