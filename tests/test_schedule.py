"""The chunk schedule, timestep and one-step sigma against independent float64 computations."""

import math

import pytest
import torch
import torch.nn.functional as F

from infvsr_core import schedule


def test_timestep_is_the_bf16_rounding_of_399():
    # 399 lies exactly between the bf16 neighbours 398 and 400; round-half-to-even gives 400.
    assert schedule.REQUESTED_TIMESTEP == 399
    assert schedule.TIMESTEP == 400.0


def test_sigma_matches_a_float64_lookup():
    # Independent float64 derivation of the shifted flow-matching schedule.
    best = min(range(1000), key=lambda k: abs(1000 * _shifted(1 - k / 1000) - 400))
    expected = _shifted(1 - best / 1000)
    assert best == 882
    assert schedule.SIGMA == pytest.approx(expected, abs=1e-7)
    assert f"{schedule.SIGMA:.6f}" == "0.400815"


def _shifted(s: float) -> float:
    return 5 * s / (1 + 4 * s)


@pytest.mark.parametrize(
    ("frames", "first", "padded", "latent"),
    [
        (9, True, 9, 3),
        (1, True, 1, 1),
        (2, True, 5, 2),
        (6, True, 9, 3),
        (12, False, 12, 3),
        (5, False, 8, 2),
        (1, False, 4, 1),
    ],
)
def test_frame_padding_and_latent_counts(frames, first, padded, latent):
    assert schedule.padded_frame_count(frames, first) == padded
    assert schedule.latent_frame_count(frames, first) == latent
    assert schedule.chunk_length(first) == (9 if first else 12)


def test_prepare_chunk_upscales_pads_and_keeps_true_size():
    torch.manual_seed(0)
    frames = torch.rand(6, 7, 5, 3)  # odd size: 28x20 after x4, padded to 32x32; 6 frames -> 9
    video, true_size = schedule.prepare_chunk(frames, 4, True, device="cpu", dtype=torch.float32)
    assert true_size == (6, 28, 20)
    assert video.shape == (1, 3, 9, 32, 32)
    # Bicubic reference computed independently in float64 on [-1, 1] values.
    ref = F.interpolate(
        (frames.double().permute(0, 3, 1, 2) * 2 - 1),
        scale_factor=4,
        mode="bicubic",
        align_corners=False,
        antialias=True,
    )
    got = video[0, :, :6, :28, :20].permute(1, 0, 2, 3).double()
    assert (got - ref).abs().max() < 1e-5
    # Replicate padding: last row/column/frame repeated.
    assert torch.equal(video[..., 28:, :20], video[..., 27:28, :20].expand_as(video[..., 28:, :20]))
    assert torch.equal(video[..., :, 20:], video[..., :, 19:20].expand_as(video[..., :, 20:]))
    assert torch.equal(video[:, :, 6:], video[:, :, 5:6].expand_as(video[:, :, 6:]))


def test_finish_frames_crops_and_maps_to_unit_range():
    decoded = torch.linspace(-1, 1, 3 * 9 * 32 * 32).reshape(1, 3, 9, 32, 32)
    out = schedule.finish_frames(decoded, (6, 28, 20))
    assert out.shape == (6, 28, 20, 3)
    assert torch.allclose(out[2, 3, 4], (decoded[0, :, 2, 3, 4] + 1) / 2)


def test_one_step_restore_is_latents_minus_sigma_prediction():
    latents, prediction = torch.randn(2, 4), torch.randn(2, 4)
    got = schedule.one_step_restore(latents, prediction)
    assert torch.allclose(got, latents - schedule.SIGMA * prediction, atol=1e-6)
    assert not math.isclose(schedule.SIGMA, 0.4)
