"""Streaming causal Wan2.1 VAE: weights, chunked == whole-clip, tiling, precision (CPU, tiny VAE)."""

from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKLWan
from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

from infvsr_core.vae import (
    TINY_VAE_BASE_DIM,
    WAN21_LATENTS_MEAN,
    WAN21_LATENTS_STD,
    StreamingVAE,
    build_vae,
    random_vae_state_dict,
    tile_regions,
    vae_config_from_state_dict,
    vae_state_dict_to_original,
)
from infvsr_core.weights import WeightFileError

MEAN = torch.tensor(WAN21_LATENTS_MEAN).view(1, -1, 1, 1, 1)
STD = torch.tensor(WAN21_LATENTS_STD).view(1, -1, 1, 1, 1)

# float32 streaming vs diffusers' whole clip: the same ops on the same frame
# groups; only the normalization is written as `* (1/std)` (as in the
# release) instead of `/ std`, a last-bit difference.
F32_TOL = 1e-5


@pytest.fixture(scope="module")
def sd() -> dict[str, torch.Tensor]:
    return random_vae_state_dict(TINY_VAE_BASE_DIM, seed=0)


@pytest.fixture(scope="module")
def vae(sd) -> AutoencoderKLWan:
    return build_vae(sd)


@pytest.fixture(scope="module")
def clip() -> torch.Tensor:
    """A smooth-ish random 33-frame clip in [-1, 1] (32x48)."""
    gen = torch.Generator().manual_seed(1)
    low = torch.rand(1, 3, 33, 8, 12, generator=gen) * 2 - 1
    return torch.nn.functional.interpolate(low, size=(33, 32, 48), mode="trilinear")


def _normalize(mean: torch.Tensor) -> torch.Tensor:
    return (mean - MEAN) / STD


def _stream_encode(sv: StreamingVAE, clip: torch.Tensor, sizes: list[int]):
    history = sv.new_history()
    out, start, sizes_after = [], 0, []
    for n in sizes:
        out.append(sv.encode_chunk(clip[:, :, start : start + n], history))
        sizes_after.append(history.nbytes())
        start += n
    assert start == clip.shape[2]
    return torch.cat(out, dim=2), sizes_after


@pytest.fixture(scope="module")
def streamed_9_12_12(vae, clip):
    return _stream_encode(StreamingVAE(vae), clip, [9, 12, 12])[0]


# --------------------------------------------------------------------------- weights


def test_key_round_trip(sd):
    converted = convert_wan_vae_to_diffusers(sd)
    back = vae_state_dict_to_original(converted)
    assert set(back) == set(sd)
    assert all(back[k] is sd[k] for k in sd)
    assert convert_wan_vae_to_diffusers(back).keys() == converted.keys()
    # ... and the diffusers model's own key set maps onto exactly the original keys.
    with torch.device("meta"):
        model = AutoencoderKLWan(**vae_config_from_state_dict(sd))
    diffusers_sd = model.state_dict()
    assert convert_wan_vae_to_diffusers(vae_state_dict_to_original(diffusers_sd)).keys() == diffusers_sd.keys()
    assert {k: v.shape for k, v in vae_state_dict_to_original(diffusers_sd).items()} == {
        k: v.shape for k, v in sd.items()
    }
    # Original names as published.
    for key in (
        "encoder.conv1.weight",
        "decoder.middle.0.residual.0.gamma",
        "conv1.weight",
        "conv2.bias",
        "decoder.upsamples.4.shortcut.weight",
        "decoder.upsamples.3.time_conv.weight",
        "encoder.downsamples.5.time_conv.bias",
        "encoder.head.2.weight",
        "decoder.middle.1.to_qkv.weight",
    ):
        assert key in sd, key


def test_random_state_dict_deterministic(sd):
    again = random_vae_state_dict(TINY_VAE_BASE_DIM, seed=0)
    other = random_vae_state_dict(TINY_VAE_BASE_DIM, seed=1)
    assert all(torch.equal(sd[k], again[k]) for k in sd)
    assert not torch.equal(sd["encoder.conv1.weight"], other["encoder.conv1.weight"])
    assert sd["encoder.conv1.weight"].shape[0] == TINY_VAE_BASE_DIM


def test_build_vae_loads_weights_and_dtypes(sd, vae):
    assert vae.config.base_dim == TINY_VAE_BASE_DIM and vae.config.z_dim == 16
    assert torch.equal(vae.quant_conv.weight, sd["conv1.weight"])
    assert torch.equal(vae.decoder.mid_block.resnets[0].norm1.gamma, sd["decoder.middle.0.residual.0.gamma"])
    bf16 = {k: v.to(torch.bfloat16) for k, v in sd.items()}  # the published file may be bf16
    model = build_vae(bf16, dtype=torch.float32)
    assert next(model.parameters()).dtype == torch.float32
    assert all(not p.is_meta for p in model.parameters())


def test_build_vae_errors(sd):
    missing = dict(sd)
    del missing["decoder.middle.0.residual.0.gamma"]
    with pytest.raises(WeightFileError, match=r"vae\.pth.*missing keys.*decoder\.middle\.0\.residual\.0\.gamma"):
        build_vae(missing, path="vae.pth")

    unexpected = dict(sd, **{"decoder.extra.weight": torch.zeros(1)})
    with pytest.raises(WeightFileError, match=r"unexpected keys.*decoder\.extra\.weight"):
        build_vae(unexpected, path="vae.pth")

    wrong = dict(sd)
    wrong["decoder.head.2.weight"] = torch.zeros(3, 8, 3, 3, 1)
    with pytest.raises(WeightFileError) as err:
        build_vae(wrong, path="vae.pth")
    msg = str(err.value)
    expected = tuple(sd["decoder.head.2.weight"].shape)
    assert "decoder.head.2.weight" in msg and str((3, 8, 3, 3, 1)) in msg and str(expected) in msg and "vae.pth" in msg

    z48 = dict(sd)
    z48["conv2.weight"] = torch.zeros(48, 48, 1, 1, 1)
    with pytest.raises(WeightFileError, match=r"z_dim.*48.*expected 16"):
        build_vae(z48, path="vae.pth")

    without = {k: v for k, v in sd.items() if k != "encoder.conv1.weight"}
    with pytest.raises(WeightFileError, match=r"encoder\.conv1\.weight"):
        build_vae(without)


# --------------------------------------------------------------------------- streaming


def test_streaming_encode_decode_equals_whole_clip(vae, clip, streamed_9_12_12):
    whole = _normalize(vae.encode(clip).latent_dist.mean)
    assert streamed_9_12_12.shape == whole.shape == (1, 16, 9, 4, 6)
    assert (streamed_9_12_12 - whole).abs().max().item() < F32_TOL

    sv = StreamingVAE(vae)
    history = sv.new_history()
    latents = streamed_9_12_12
    chunks = [sv.decode_chunk(latents[:, :, i : i + 3], history) for i in (0, 3, 6)]
    assert [c.shape[2] for c in chunks] == [9, 12, 12]
    streamed = torch.cat(chunks, dim=2)
    reference = vae.decode(latents * STD + MEAN).sample
    assert streamed.shape == reference.shape == clip.shape
    assert (streamed - reference).abs().max().item() < F32_TOL
    assert streamed.abs().max() <= 1.0


def test_chunk_split_invariance_and_constant_history(vae, clip, streamed_9_12_12):
    sv = StreamingVAE(vae)
    fine, sizes = _stream_encode(sv, clip, [1] + [4] * 8)
    assert torch.equal(fine, streamed_9_12_12)
    assert sizes[1] == sizes[5] == sizes[-1] > 0

    history = sv.new_history()
    dec_sizes = []
    for i in range(fine.shape[2]):
        sv.decode_chunk(fine[:, :, i : i + 1], history)
        dec_sizes.append(history.nbytes())
    assert dec_sizes[1] == dec_sizes[5] == dec_sizes[-1]


def test_chunk_frame_counts_are_checked(vae, clip):
    sv = StreamingVAE(vae)
    history = sv.new_history()
    with pytest.raises(ValueError, match="1 mod 4"):
        sv.encode_chunk(clip[:, :, :8], history)
    sv.encode_chunk(clip[:, :, :5], history)
    with pytest.raises(ValueError, match="0 mod 4"):
        sv.encode_chunk(clip[:, :, :5], history)
    with pytest.raises(ValueError, match="frame size changed"):
        sv.encode_chunk(clip[:, :, :4, :16], history)
    with pytest.raises(ValueError, match="multiples of 16"):
        sv.encode_chunk(clip[:, :, :1, :24], sv.new_history())


# --------------------------------------------------------------------------- tiling


def test_tile_grid():
    # Latent 8x12, tiles of 4 with stride 3: a tile is added while the previous one stops short of the edge.
    regions = tile_regions(8, 12, 4, 3)
    rows = sorted({(r[0], r[1]) for r in regions})
    cols = sorted({(r[2], r[3]) for r in regions})
    assert rows == [(0, 4), (3, 7), (6, 8)]
    assert cols == [(0, 4), (3, 7), (6, 10), (9, 12)]
    assert len(regions) == 12
    # Release defaults at 1080p output (136x240 latent): 2 rows, 3 columns.
    assert tile_regions(136, 240, 128, 110) == [
        (0, 128, 0, 128),
        (0, 128, 110, 238),
        (0, 128, 220, 240),
        (110, 136, 0, 128),
        (110, 136, 110, 238),
        (110, 136, 220, 240),
    ]
    assert tile_regions(100, 100, 128, 110) == [(0, 100, 0, 100)]


def test_tiling_decision(vae):
    # Release rule: only the output height counts.
    assert not StreamingVAE(vae).wants_tiling(1024, 4096) and StreamingVAE(vae).wants_tiling(1040, 640)
    either = StreamingVAE(vae, threshold_axes="either")
    assert either.wants_tiling(1024, 1040) and not either.wants_tiling(1024, 1024)
    assert not StreamingVAE(vae, tiling="never").wants_tiling(4096, 4096)
    assert StreamingVAE(vae, tiling="always").wants_tiling(16, 16)
    with pytest.raises(ValueError, match="tiling"):
        StreamingVAE(vae, tiling="sometimes")


def _reference_weights(region, frame, border, factor, margin=0):
    """Blend weights written out by loops: on inner edges `margin` zeros, then a ramp 1/n..1, min at corners."""
    top, bottom, left, right = region
    h, w, b, m = (bottom - top) * factor, (right - left) * factor, border * factor, margin * factor
    n = b - 2 * m  # ramp length

    def ramp(length, inner_start, inner_end):
        v = [1.0] * length
        for i in range(b):
            value = 0.0 if i < m else min(1.0, (i - m + 1) / n)
            if inner_start:
                v[i] = value
            if inner_end:
                v[length - 1 - i] = value
        return v

    r = ramp(h, top > 0, bottom < frame[0])
    c = ramp(w, left > 0, right < frame[1])
    return torch.tensor([[min(a, bb) for bb in c] for a in r])


@pytest.mark.parametrize(("size", "stride", "margin", "count"), [(4, 3, 0, 6), (5, 2, 1, 6)])
def test_tiled_streaming_matches_per_tile_reference(vae, size, stride, margin, count):
    """48x64 frame = 6x8 latent; tiles of 4 with stride 3 give 2 rows x 3 columns, edge tiles clipped.

    With a margin (smoother seams, not the release's), the blend ignores each tile's outermost pixels.
    """
    gen = torch.Generator().manual_seed(2)
    low = torch.rand(1, 3, 5, 12, 16, generator=gen) * 2 - 1
    video = torch.nn.functional.interpolate(low, size=(5, 48, 64), mode="trilinear")
    frame = (6, 8)
    sv = StreamingVAE(vae, tiling="always", tile_size=size, tile_stride=stride, tile_margin=margin)
    history = sv.new_history()
    latents = torch.cat([sv.encode_chunk(video[:, :, :1], history), sv.encode_chunk(video[:, :, 1:], history)], 2)
    regions = tile_regions(*frame, size, stride)
    assert history.tiled and list(history.tiles) == regions and len(regions) == count

    acc, wsum = torch.zeros(1, 16, 2, *frame), torch.zeros(frame)
    for top, bottom, left, right in regions:
        tile = video[..., top * 8 : bottom * 8, left * 8 : right * 8]
        wt = _reference_weights((top, bottom, left, right), frame, size - stride, 1, margin)
        acc[..., top:bottom, left:right] += _normalize(vae.encode(tile).latent_dist.mean) * wt
        wsum[top:bottom, left:right] += wt
    ref_latents = acc / wsum
    assert (latents - ref_latents).abs().max().item() < F32_TOL

    frames = torch.cat([sv.decode_chunk(latents[:, :, :1], history), sv.decode_chunk(latents[:, :, 1:], history)], 2)
    acc, wsum = torch.zeros(1, 3, 5, 48, 64), torch.zeros(48, 64)
    for top, bottom, left, right in regions:
        decoded = vae.decode(ref_latents[..., top:bottom, left:right] * STD + MEAN).sample
        # diffusers clamps each tile; the release clamps after blending: equal while tiles stay inside [-1, 1].
        assert decoded.abs().max() < 1.0
        wt = _reference_weights((top, bottom, left, right), frame, size - stride, 8, margin)
        acc[..., top * 8 : bottom * 8, left * 8 : right * 8] += decoded * wt
        wsum[top * 8 : bottom * 8, left * 8 : right * 8] += wt
    assert (frames - (acc / wsum).clamp(-1, 1)).abs().max().item() < F32_TOL
    assert history.nbytes() == sum(t.nbytes() for t in history.tiles.values()) > 0


@pytest.mark.parametrize(("size", "stride", "margin"), [(128, 110, 0), (128, 96, 8), (128, 80, 16), (9, 4, 2)])
def test_blend_weights_cover_every_pixel(size, stride, margin):
    """Weights sum above zero everywhere (1080p, 4K and odd tiny frames); the margin's pixels weigh 0."""
    from infvsr_core.vae.tiles import tile_weights

    for frame in ((135, 240), (270, 480), (17, 23)):
        total = torch.zeros(frame)
        for region in tile_regions(*frame, size, stride):
            top, bottom, left, right = region
            weights = tile_weights(region, frame, size - stride, 1, torch.device("cpu"), margin)[0, 0, 0]
            assert torch.equal(weights, _reference_weights(region, frame, size - stride, 1, margin))
            if margin and left > 0:
                assert not weights[:, :margin].any()
            total[top:bottom, left:right] += weights
        assert total.min() > 0


def test_tile_margin_must_leave_a_ramp(vae):
    with pytest.raises(ValueError, match="margin"):
        StreamingVAE(vae, tile_size=128, tile_stride=110, tile_margin=9)
    with pytest.raises(ValueError, match="margin"):
        StreamingVAE(vae, tile_margin=-1)
    assert StreamingVAE(vae, tile_size=128, tile_stride=110, tile_margin=8).tile_margin == 8


def test_single_tile_equals_untiled(vae, clip):
    one_tile = StreamingVAE(vae, tiling="always", tile_size=8, tile_stride=6)  # 64 px tiles, frame 32x48
    plain = StreamingVAE(vae, tiling="never")
    auto = StreamingVAE(vae)  # 32x48 is far below the 1024 threshold
    outs = []
    for sv in (one_tile, plain, auto):
        history = sv.new_history()
        lat = sv.encode_chunk(clip[:, :, :9], history)
        outs.append((lat, sv.decode_chunk(lat, history), history.tiled))
    assert outs[0][2] and not outs[1][2] and not outs[2][2]
    for lat, dec, _ in outs[1:]:
        assert torch.equal(lat, outs[0][0]) and torch.equal(dec, outs[0][1])


# --------------------------------------------------------------------------- precision


@pytest.mark.parametrize(("dtype", "tol"), [(torch.bfloat16, 0.1), (torch.float16, 0.02)])
def test_low_precision_chunk_close_to_float32(sd, vae, clip, dtype, tol):
    """A 5-frame chunk then a 4-frame chunk: finite and within `tol` (max abs) of float32.

    Measured on the tiny random VAE: bf16 ~0.03, fp16 ~0.003 (latents of scale ~1, frames in [-1, 1]).
    """
    results = []
    for model in (vae, build_vae(sd, dtype=dtype)):
        sv = StreamingVAE(model)
        history = sv.new_history()
        x = clip[:, :, :9].to(next(model.parameters()).dtype)
        lat = [sv.encode_chunk(x[:, :, :5], history), sv.encode_chunk(x[:, :, 5:9], history)]
        dec = [sv.decode_chunk(z, history) for z in lat]
        results.append([t.float() for t in lat + dec])
        assert all(t.dtype == next(model.parameters()).dtype for t in lat + dec)
    for low, ref in zip(results[1], results[0], strict=True):
        assert torch.isfinite(low).all()
        assert (low - ref).abs().max().item() < tol
