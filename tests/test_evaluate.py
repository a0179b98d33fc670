"""The evaluation metrics against independent references: scikit-image on real frames decoded by PyAV, and the
properties E*warp and tOF must have (zero on static or identical video, growing with temporal noise, blind to a
global brightness offset where they should be); the JSON's representation of infinite PSNR; the ComfyUI node."""

from __future__ import annotations

import json
import math
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image
from skimage.color import rgb2ycbcr
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from infvsr_core.errors import UsageError
from infvsr_core.evaluate.report import frames_csv, plot_rgb, summarize, summary_json
from infvsr_core.evaluate.run import EvaluateOptions, evaluate
from tests.io_media import DATA

STREET = DATA / "real_bikes_street_640x272.mp4"


def decode(path: Path, count: int, size: tuple[int, int] | None = None) -> list[np.ndarray]:
    """The first `count` frames as 8-bit RGB straight from PyAV (not through the project's reader), optionally
    reduced with PIL's box filter to `size` (width, height)."""
    frames = []
    with av.open(str(path)) as container:
        for frame in container.decode(video=0):
            image = frame.to_image()
            if size is not None:
                image = image.resize(size, Image.BOX)
            frames.append(np.asarray(image))
            if len(frames) == count:
                break
    return frames


def save_pngs(folder: Path, frames: list[np.ndarray]) -> Path:
    folder.mkdir(parents=True)
    for i, frame in enumerate(frames):
        Image.fromarray(frame).save(folder / f"frame_{i:04d}.png")
    return folder


@pytest.fixture(scope="module")
def small_clip() -> torch.Tensor:
    """8 moving real frames at 160x68, float in [0.1, 0.9] (room for a brightness offset without clipping)."""
    frames = np.stack(decode(STREET, 8, (160, 68))).astype(np.float32) / 255.0
    return torch.from_numpy(0.1 + 0.8 * frames)


def mean_of(evaluation, name: str) -> float:
    values = [v for i, v in enumerate(evaluation.columns[name]) if i not in evaluation.cuts and not math.isnan(v)]
    return float(np.mean(values))


def temporal_only() -> EvaluateOptions:
    return EvaluateOptions(scene_threshold=255.0)  # no cut in these short clips: every pair counts


# -- fidelity against scikit-image ------------------------------------------------------------------------------


def test_psnr_and_ssim_match_scikit_image_on_real_frames(tmp_path):
    reference = decode(STREET, 4)
    rng = np.random.default_rng(0)
    degraded = []
    for i, frame in enumerate(reference):  # blur (a reduced and re-enlarged frame), then noise of growing strength
        image = Image.fromarray(frame)
        soft = np.asarray(image.resize((320, 136), Image.BICUBIC).resize(image.size, Image.BICUBIC), np.float64)
        noisy = soft + rng.normal(0.0, 1.0 + 2.0 * i, soft.shape)
        degraded.append(np.clip(np.rint(noisy), 0, 255).astype(np.uint8))
    out_dir = save_pngs(tmp_path / "out", degraded)
    ref_dir = save_pngs(tmp_path / "ref", reference)

    result = evaluate(out_dir, ref_dir, EvaluateOptions(temporal=False))

    for i, (out, ref) in enumerate(zip(degraded, reference, strict=True)):
        psnr = peak_signal_noise_ratio(ref, out, data_range=255)
        psnr_y = peak_signal_noise_ratio(rgb2ycbcr(ref)[..., 0], rgb2ycbcr(out)[..., 0], data_range=255)
        ssim = structural_similarity(
            ref, out, channel_axis=2, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=255
        )
        assert result.columns["psnr"][i] == pytest.approx(psnr, abs=1e-4)
        assert result.columns["psnr_y"][i] == pytest.approx(psnr_y, abs=1e-4)
        assert result.columns["ssim"][i] == pytest.approx(ssim, abs=1e-5)
    assert result.columns["psnr"][0] > result.columns["psnr"][3]  # more noise, lower PSNR: the order is the files'


def test_crop_border_leaves_the_edges_out(small_clip):
    out = small_clip.clone()
    out[:, :4] = 0.0  # damage only the top 4 rows
    whole = evaluate(out, small_clip, EvaluateOptions(temporal=False))
    cropped = evaluate(out, small_clip, EvaluateOptions(temporal=False, crop_border=4))
    assert all(math.isfinite(v) for v in whole.columns["psnr"])
    assert all(math.isinf(v) for v in cropped.columns["psnr"])


# -- E*warp and tOF --------------------------------------------------------------------------------------------


def test_static_sequence_has_no_temporal_error(small_clip):
    still = small_clip[:1].repeat(6, 1, 1, 1)
    result = evaluate(still, still, temporal_only())
    assert math.isnan(result.columns["ewarp"][0]) and math.isnan(result.columns["tof"][0])  # no previous frame
    assert result.columns["ewarp"][1:] == [0.0] * 5
    assert result.columns["tof"][1:] == [0.0] * 5


def test_identical_sequences_have_no_tof_and_infinite_psnr(small_clip):
    result = evaluate(small_clip, small_clip, temporal_only())
    assert result.columns["tof"][1:] == [0.0] * 7
    assert all(math.isinf(v) for v in result.columns["psnr"] + result.columns["psnr_y"])
    assert result.columns["ssim"] == pytest.approx([1.0] * 8)
    assert mean_of(result, "ewarp") > 0  # the clip moves: E*warp measures the output alone, and it is not still


def test_temporal_errors_grow_with_temporal_noise(small_clip):
    generator = torch.Generator().manual_seed(1)
    ewarp, tof = [], []
    for sigma in (0.0, 0.01, 0.03, 0.1):
        noise = torch.randn(small_clip.shape, generator=generator) * sigma
        result = evaluate((small_clip + noise).clamp(0, 1), small_clip, temporal_only())
        ewarp.append(mean_of(result, "ewarp"))
        tof.append(mean_of(result, "tof"))
    assert ewarp == sorted(ewarp) and len(set(ewarp)) == 4, ewarp
    assert tof == sorted(tof) and tof[0] == 0.0 and len(set(tof)) == 4, tof


def test_global_brightness_offset_leaves_flow_metrics_alone(small_clip):
    plain = evaluate(small_clip, small_clip, temporal_only())
    levels = evaluate(small_clip + 12 / 255, small_clip, temporal_only())  # a whole number of 8-bit levels
    brighter = evaluate(small_clip + 0.05, small_clip, temporal_only())  # not: the 8-bit grey frames round anew
    noisy = evaluate((small_clip + 0.03 * torch.randn(small_clip.shape)).clamp(0, 1), small_clip, temporal_only())
    # Fidelity sees the offset (exactly 20 log10(1 / 0.05) dB) ...
    assert brighter.columns["psnr"] == pytest.approx([20 * math.log10(1 / 0.05)] * 8, abs=1e-3)
    # ... motion does not: tOF compares flows, E*warp differences of frames that moved together.
    assert mean_of(levels, "ewarp") == pytest.approx(mean_of(plain, "ewarp"), rel=1e-4)
    assert mean_of(levels, "tof") < 1e-3
    noise_effect = mean_of(noisy, "ewarp") - mean_of(plain, "ewarp")
    assert abs(mean_of(brighter, "ewarp") - mean_of(plain, "ewarp")) < 0.25 * noise_effect
    assert mean_of(brighter, "tof") < 0.25 * mean_of(noisy, "tof")


def test_flicker_raises_ewarp_not_tof(small_clip):
    flicker = small_clip.clone()
    flicker[1::2] += 0.05  # every other frame brighter: a temporal inconsistency of brightness only
    plain = evaluate(small_clip, small_clip, temporal_only())
    flickering = evaluate(flicker, small_clip, temporal_only())
    assert mean_of(flickering, "ewarp") > mean_of(plain, "ewarp") + 5.0  # adds 3 x 0.05^2 x 1000 = 7.5
    assert mean_of(flickering, "tof") < 0.1


def test_values_do_not_depend_on_how_the_video_is_chunked(small_clip, monkeypatch):
    from infvsr_core.evaluate import run

    whole = evaluate(small_clip + 0.02 * torch.sin(torch.arange(8.0))[:, None, None, None], small_clip)
    monkeypatch.setattr(run, "chunk_frames", lambda width, height: 3)
    pieces = evaluate(small_clip + 0.02 * torch.sin(torch.arange(8.0))[:, None, None, None], small_clip)
    for name in ("psnr", "ssim", "ewarp", "tof"):
        assert pieces.columns[name] == pytest.approx(whole.columns[name], nan_ok=True, rel=1e-9)


# -- report ----------------------------------------------------------------------------------------------------


def test_summary_is_valid_json_with_infinity_as_a_string(small_clip):
    result = evaluate(small_clip, small_clip, temporal_only())
    text = summary_json(summarize(result))

    def refuse(constant: str) -> float:
        raise AssertionError(f"bare {constant} in the JSON")

    summary = json.loads(text, parse_constant=refuse)
    psnr = summary["metrics"]["psnr"]
    assert psnr["mean"] == "Infinity" and psnr["infinite_frames"] == 8 and psnr["frames"] == 8
    assert float(psnr["mean"]) == math.inf  # what Python's float() reads it as
    assert summary["metrics"]["ewarp"]["frames"] == 7  # the first frame has no previous one
    assert "not comparable" in " ".join(summary["notes"])
    assert set(summary["skipped"]) >= {"lpips", "dists", "subject_consistency", "background_consistency"}
    rows = frames_csv(result).splitlines()
    assert rows[0].split(",")[:4] == ["frame", "scene_cut", "psnr", "psnr_y"]
    assert rows[1].split(",")[2] == "inf" and rows[1].split(",")[5] == ""  # psnr inf; ewarp of frame 0 empty


def test_without_reference_only_no_reference_metrics(small_clip):
    result = evaluate(small_clip, None)
    assert result.metrics == ["ewarp"]
    assert "needs a reference" in result.skipped["psnr"] and "needs a reference" in result.skipped["tof"]


def test_scene_cut_frames_are_left_out_of_the_summary(small_clip):
    shots = torch.cat([small_clip.repeat(3, 1, 1, 1)[:18], 1 - small_clip.repeat(2, 1, 1, 1)[:12]])
    result = evaluate(shots, shots)
    assert result.cuts == [18]
    summary = summarize(result)
    values = [v for i, v in enumerate(result.columns["ewarp"]) if i not in (0, 18)]
    assert summary["metrics"]["ewarp"]["mean"] == pytest.approx(float(np.mean(values)))
    across = result.columns["ewarp"][18]  # the pair across the cut: kept per frame (if any pixel matched at all)
    assert math.isnan(across) or across > max(values)
    assert frames_csv(result).splitlines()[19].startswith("18,1,")  # frame 18, scene_cut 1


def test_plot_is_an_image(small_clip):
    result = evaluate(small_clip, small_clip * 0.9)
    image = plot_rgb(result)
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3 and image.shape[0] > 200
    assert image.std() > 10  # something was drawn


# -- VBench's consistency metrics (local weights only) ------------------------------------------------------------


def test_consistency_follows_vbench_per_scene(small_clip, tmp_path):
    """Subject / background consistency against a plain loop over each scene (VBench scores one shot: the mean of
    (max(0, cos(f_t, f_t-1)) + max(0, cos(f_t, f_first))) / 2), with tiny random networks saved in the
    Hugging Face format; a cut is reported late, so the streamed values must be corrected."""
    transformers = pytest.importorskip("transformers")
    from infvsr_core.evaluate.semantic import clip_input, dino_input

    torch.manual_seed(0)
    layers = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64}
    dino = transformers.ViTModel(transformers.ViTConfig(**layers, patch_size=16), add_pooling_layer=False).eval()
    clip = transformers.CLIPVisionModelWithProjection(
        transformers.CLIPVisionConfig(**layers, patch_size=32, projection_dim=16)
    ).eval()
    dino.save_pretrained(tmp_path / "dino")
    clip.save_pretrained(tmp_path / "clip")
    shots = torch.cat([small_clip.repeat(3, 1, 1, 1)[:20], 1 - small_clip.repeat(2, 1, 1, 1)[:12]])
    weights = {"subject_consistency": tmp_path / "dino", "background_consistency": tmp_path / "clip"}
    result = evaluate(shots, None, EvaluateOptions(temporal=False, weights=weights))
    assert result.cuts == [20]
    with torch.no_grad():
        features = {
            "subject_consistency": [
                dino(pixel_values=dino_input(f[None]), interpolate_pos_encoding=True).last_hidden_state[0, 0]
                for f in shots
            ],
            "background_consistency": [clip(pixel_values=clip_input(f[None])).image_embeds[0] for f in shots],
        }
    for name, feats in features.items():
        unit = [f / f.norm() for f in feats]
        expected = []
        for t in range(len(shots)):
            first = 0 if t < 20 else 20
            if t == first:
                expected.append(math.nan)
                continue
            previous, start = float(unit[t] @ unit[t - 1]), float(unit[t] @ unit[first])
            expected.append((max(0.0, previous) + max(0.0, start)) / 2)
        assert result.columns[name] == pytest.approx(expected, abs=1e-5, nan_ok=True), name
    assert "lpips" in result.skipped and "motion_smoothness" in result.skipped


def test_network_weights_must_be_local_folders(small_clip, tmp_path):
    from infvsr_core.errors import WeightFileError

    with pytest.raises(WeightFileError, match="no such folder"):
        evaluate(small_clip, None, EvaluateOptions(weights={"subject_consistency": tmp_path / "nowhere"}))
    (tmp_path / "empty").mkdir()
    with pytest.raises((WeightFileError, UsageError), match="config.json|transformers"):
        evaluate(small_clip, None, EvaluateOptions(weights={"background_consistency": tmp_path / "empty"}))


# -- inputs that cannot be compared ----------------------------------------------------------------------------


def test_size_mismatch_is_one_clear_error_unless_resized_or_cropped(small_clip):
    bigger = torch.nn.functional.interpolate(small_clip.permute(0, 3, 1, 2), scale_factor=2).permute(0, 2, 3, 1)
    with pytest.raises(UsageError, match=r"frame sizes differ: .* 320x136, reference .* 160x68 .*--resize"):
        evaluate(bigger, small_clip)
    resized = evaluate(bigger, small_clip, EvaluateOptions(resize=True, temporal=False))
    assert (resized.width, resized.height) == (160, 68) and "resampled" in resized.notes[0]
    cropped = evaluate(bigger, small_clip, EvaluateOptions(crop=True, temporal=False))
    assert (cropped.width, cropped.height) == (160, 68)


def test_frame_count_mismatch_is_one_clear_error_unless_aligned(small_clip):
    with pytest.raises(UsageError, match="frame counts differ: output .* 6 frames, reference .* 8"):
        evaluate(small_clip[:6], small_clip)
    aligned = evaluate(small_clip[:6], small_clip, EvaluateOptions(align=True, temporal=False))
    assert aligned.frames == 6


# -- the ComfyUI node ------------------------------------------------------------------------------------------


def test_node_returns_the_plot_and_the_summary(small_clip, tmp_path):
    from nodes import comfy
    from nodes.evaluate_nodes import InfVSREvaluate

    comfy.set_directories(output=tmp_path / "output", input=tmp_path / "input", temp=tmp_path / "temp")
    degraded = (small_clip + 0.02).clamp(0, 1)
    result = InfVSREvaluate().evaluate(reference=small_clip, images=degraded, save_report=True)
    plot, text = result["result"]
    assert plot.ndim == 4 and plot.shape[0] == 1 and plot.shape[-1] == 3 and plot.dtype == torch.float32
    assert "PSNR (RGB)" in text and "E*warp" in text
    saved = list((tmp_path / "output").rglob("summary.json"))
    assert len(saved) == 1
    assert json.loads(saved[0].read_text())["metrics"]["psnr"]["mean"] == pytest.approx(20 * math.log10(50), abs=0.1)
    with pytest.raises(ValueError, match="frame sizes differ"):
        InfVSREvaluate().evaluate(reference=small_clip, images=small_clip[:, :60])


def test_a_missing_library_is_named_before_any_work(small_clip, monkeypatch):
    import importlib.util

    from infvsr_core.errors import UsageError
    from infvsr_core.evaluate import run

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "cv2" else real(name, *a))
    with pytest.raises(UsageError, match="opencv-python-headless.*pip install -r requirements.txt"):
        run.evaluate(small_clip, small_clip)
