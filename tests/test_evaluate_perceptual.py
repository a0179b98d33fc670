"""LPIPS (AlexNet, VGG16) and DISTS from local weight files, against a float64 re-computation of the published
formulas on real frames decoded by PyAV.

Why not the `lpips` / `DISTS_pytorch` packages as the reference: both import torchvision, and the PyPI torchvision
built for torch 2.13 does not import against the CPU torch this suite also runs on (its compiled operators need the
CUDA build). The reference here is therefore independent of the module's code path instead: plain
torch.nn.functional calls in float64, layer by layer as torchvision lays the networks out, reading the same weight
files, and the formulas as the papers / packages define them (LPIPS v0.1: lpips.LPIPS.forward with normalize=True;
DISTS: DISTS_pytorch.DISTS.forward). The module was also checked once against those packages themselves (through a
scratch environment; random ImageNet-shaped backbones, the packages' published heads and alpha/beta, real frames).

The weight files are written by the tests in the published layouts: torchvision's full AlexNet / VGG16 state dicts
(features.N.* and classifier.*), LPIPS' v0.1 heads (linL.model.1.weight), DISTS' weights.pt (alpha, beta).
"""

from __future__ import annotations

import math
from pathlib import Path

import av
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from infvsr_core.errors import UsageError, WeightFileError
from infvsr_core.evaluate import perceptual
from infvsr_core.evaluate.run import EvaluateOptions, evaluate
from tests.io_media import DATA

STREET = DATA / "real_bikes_street_640x272.mp4"
ALEX_CHANNELS = (64, 192, 384, 256, 256)
VGG_CHANNELS = (64, 128, 256, 512, 512)
VGG_CONVS = ((0, 2), (5, 7), (10, 12, 14), (17, 19, 21), (24, 26, 28))  # torchvision's vgg16().features indices


def decode(count: int, size: tuple[int, int]) -> torch.Tensor:
    """The first `count` frames of the street clip straight from PyAV, reduced with PIL's box filter, (T, H, W, 3)."""
    frames = []
    with av.open(str(STREET)) as container:
        for frame in container.decode(video=0):
            frames.append(np.asarray(frame.to_image().resize(size, Image.BOX)))
            if len(frames) == count:
                break
    return torch.from_numpy(np.stack(frames).astype(np.float32) / 255)


@pytest.fixture(scope="module")
def frames() -> torch.Tensor:
    return decode(2, (80, 40))  # AlexNet's pools need 31 pixels


def noisy(frames: torch.Tensor, sigma: float, seed: int = 0) -> torch.Tensor:
    noise = torch.randn(frames.shape, generator=torch.Generator().manual_seed(seed))
    return (frames + sigma * noise).clamp(0, 1)


# -- weight files in the published layouts ----------------------------------------------------------------------


def torchvision_state(kind: str, seed: int) -> dict[str, torch.Tensor]:
    """A random torchvision AlexNet / VGG16 state dict, classifier included (as alexnet-owt-7be5be79.pth is)."""
    torch.manual_seed(seed)
    state = dict(perceptual.Backbone(kind).state_dict())
    # He-scaled weights and small positive biases keep the deep VGG16 activations alive, like trained weights do.
    for key, value in state.items():
        if key.endswith("weight"):
            state[key] = torch.randn(value.shape) * math.sqrt(2 / value[0].numel())
        else:
            state[key] = torch.rand(value.shape) * 0.05
    last = 256 * 6 * 6 if kind == "alexnet" else 512 * 7 * 7
    hidden = 64  # the published files' classifier is 4096 wide: its width does not matter here, its keys do
    sizes = ((last, hidden), (hidden, hidden), (hidden, 1000))
    for i, (n_in, n_out) in zip((1, 4, 6) if kind == "alexnet" else (0, 3, 6), sizes, strict=True):
        state[f"classifier.{i}.weight"] = torch.zeros(n_out, n_in)
        state[f"classifier.{i}.bias"] = torch.zeros(n_out)
    return state


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("perceptual_weights")
    heads = folder / "heads"
    heads.mkdir()
    generator = torch.Generator().manual_seed(1)
    for kind, channels, name in (("alexnet", ALEX_CHANNELS, "alex.pth"), ("vgg16", VGG_CHANNELS, "vgg.pth")):
        torch.save(torchvision_state(kind, seed=len(name)), folder / f"{kind}.pth")
        # LPIPS' heads are non-negative (clamped in training)
        head = {f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1, generator=generator) for i, c in enumerate(channels)}
        torch.save(head, heads / name)
    total = sum((3, *VGG_CHANNELS))
    alpha_beta = {name: torch.rand(1, total, 1, 1, generator=generator) for name in ("alpha", "beta")}
    torch.save(alpha_beta, folder / "dists.pt")
    return {"alexnet": folder / "alexnet.pth", "vgg16": folder / "vgg16.pth", "lpips_heads": heads,
            "dists": folder / "dists.pt"}  # fmt: skip


# -- the float64 reference --------------------------------------------------------------------------------------


def load64(path: Path) -> dict[str, torch.Tensor]:
    return {k: v.double() for k, v in torch.load(path, weights_only=True).items()}


def alexnet_layers(w: dict[str, torch.Tensor], x: torch.Tensor) -> list[torch.Tensor]:
    """relu1..relu5 of torchvision's AlexNet features (conv 11/4/2, pool 3/2, conv 5/1/2, pool, three conv 3/1/1)."""

    def conv(h: torch.Tensor, i: int, stride: int, pad: int) -> torch.Tensor:
        return F.relu(F.conv2d(h, w[f"features.{i}.weight"], w[f"features.{i}.bias"], stride=stride, padding=pad))

    r1 = conv(x, 0, 4, 2)
    r2 = conv(F.max_pool2d(r1, 3, 2), 3, 1, 2)
    r3 = conv(F.max_pool2d(r2, 3, 2), 6, 1, 1)
    r4 = conv(r3, 8, 1, 1)
    return [r1, r2, r3, r4, conv(r4, 10, 1, 1)]


def hann_l2_pool(h: torch.Tensor) -> torch.Tensor:
    """DISTS' L2pooling(filter_size=5): np.hanning(5)[1:-1] outer product, normalised, on h**2, stride 2, pad 1."""
    a = np.hanning(5)[1:-1]
    g = torch.from_numpy(a[:, None] * a[None, :])
    g = (g / g.sum()).to(h.dtype)[None, None].repeat(h.shape[1], 1, 1, 1)
    return (F.conv2d(h**2, g, stride=2, padding=1, groups=h.shape[1]) + 1e-12).sqrt()


def vgg16_layers(w: dict[str, torch.Tensor], x: torch.Tensor, l2: bool = False) -> list[torch.Tensor]:
    """relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 of torchvision's VGG16 (2x2 max-pools, or DISTS' L2 pooling)."""
    out, h = [], x
    for block, convs in enumerate(VGG_CONVS):
        if block:
            h = hann_l2_pool(h) if l2 else F.max_pool2d(h, 2, 2)
        for i in convs:
            h = F.relu(F.conv2d(h, w[f"features.{i}.weight"], w[f"features.{i}.bias"], padding=1))
        out.append(h)
    return out


def lpips64(kind: str, weights: dict[str, Path], output: torch.Tensor, reference: torch.Tensor) -> list[float]:
    """LPIPS v0.1 per frame in float64: [0,1] -> [-1,1], LPIPS' shift/scale, unit-normalise channels, squared
    difference, 1x1 linear head, spatial mean, sum over the five layers."""
    w = load64(weights[kind])
    head = load64(weights["lpips_heads"] / ("alex.pth" if kind == "alexnet" else "vgg.pth"))
    shift = torch.tensor([-0.030, -0.088, -0.188], dtype=torch.float64).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450], dtype=torch.float64).view(1, 3, 1, 1)
    layers = alexnet_layers if kind == "alexnet" else vgg16_layers
    values = []
    for out, ref in zip(output.double(), reference.double(), strict=True):
        f0, f1 = (layers(w, ((2 * im - 1).permute(2, 0, 1)[None] - shift) / scale) for im in (out, ref))
        total = 0.0
        for k, (a, b) in enumerate(zip(f0, f1, strict=True)):
            a = a / (torch.sqrt((a**2).sum(1, keepdim=True)) + 1e-10)
            b = b / (torch.sqrt((b**2).sum(1, keepdim=True)) + 1e-10)
            total += float(F.conv2d((a - b) ** 2, head[f"lin{k}.model.1.weight"]).mean())
        values.append(total)
    return values


def dists64(weights: dict[str, Path], output: torch.Tensor, reference: torch.Tensor) -> list[float]:
    """DISTS per frame in float64: 1 - sum over (input, 5 L2-pooled VGG16 layers) of alpha*S1 + beta*S2, alpha and
    beta divided by their total, S1 = (2 mx my + c) / (mx^2 + my^2 + c), S2 = (2 cov + c) / (vx + vy + c)."""
    w, ab = load64(weights["vgg16"]), load64(weights["dists"])
    norm = ab["alpha"].sum() + ab["beta"].sum()
    alphas = torch.split(ab["alpha"] / norm, (3, *VGG_CHANNELS), dim=1)
    betas = torch.split(ab["beta"] / norm, (3, *VGG_CHANNELS), dim=1)
    mean = torch.tensor([0.485, 0.456, 0.406], dtype=torch.float64).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225], dtype=torch.float64).view(1, 3, 1, 1)
    values = []
    for out, ref in zip(output.double(), reference.double(), strict=True):
        x, y = out.permute(2, 0, 1)[None], ref.permute(2, 0, 1)[None]
        fx = [x, *vgg16_layers(w, (x - mean) / std, l2=True)]
        fy = [y, *vgg16_layers(w, (y - mean) / std, l2=True)]
        s1 = s2 = 0.0
        for a, b, alpha, beta in zip(fx, fy, alphas, betas, strict=True):
            ma, mb = a.mean([2, 3], keepdim=True), b.mean([2, 3], keepdim=True)
            va, vb = ((a - ma) ** 2).mean([2, 3], keepdim=True), ((b - mb) ** 2).mean([2, 3], keepdim=True)
            cov = (a * b).mean([2, 3], keepdim=True) - ma * mb
            s1 += float((alpha * (2 * ma * mb + 1e-6) / (ma**2 + mb**2 + 1e-6)).sum())
            s2 += float((beta * (2 * cov + 1e-6) / (va + vb + 1e-6)).sum())
        values.append(1 - s1 - s2)
    return values


def measured(frames_out: torch.Tensor, frames_ref: torch.Tensor, weights: dict[str, Path], **options):
    return evaluate(frames_out, frames_ref, EvaluateOptions(temporal=False, weights=dict(weights), **options))


# -- agreement with the formulas --------------------------------------------------------------------------------


def test_lpips_and_dists_match_the_float64_formulas_on_real_frames(frames, weights):
    blurred = F.interpolate(
        F.interpolate(frames.permute(0, 3, 1, 2), scale_factor=0.5, mode="bilinear", antialias=True),
        size=frames.shape[1:3],
        mode="bilinear",
    ).permute(0, 2, 3, 1)
    for output in (noisy(frames, 0.05), blurred):
        result = measured(output, frames, weights)
        assert result.skipped.keys().isdisjoint({"lpips", "lpips_vgg", "dists"}), result.skipped
        expected = {
            "lpips": lpips64("alexnet", weights, output, frames),
            "lpips_vgg": lpips64("vgg16", weights, output, frames),
            "dists": dists64(weights, output, frames),
        }
        for name, values in expected.items():
            assert min(values) > 1e-4, name  # a difference the metric sees, not rounding noise
            # float32 network against float64: agreement to a few parts in 10^5 of the value
            assert result.columns[name] == pytest.approx(values, rel=1e-4, abs=1e-6), name


def test_identical_frames_give_zero_and_noise_makes_it_grow(frames, weights):
    frames = frames[:1]
    same = measured(frames, frames, weights)
    for name in ("lpips", "lpips_vgg", "dists"):
        assert same.columns[name] == pytest.approx([0.0] * len(frames), abs=1e-6), name
    means = []
    for sigma in (0.01, 0.04, 0.12):
        result = measured(noisy(frames, sigma), frames, weights)
        means.append({name: float(np.mean(result.columns[name])) for name in ("lpips", "lpips_vgg", "dists")})
    for name in ("lpips", "lpips_vgg", "dists"):
        assert means[0][name] < means[1][name] < means[2][name], (name, means)


def test_frames_too_small_for_alexnet_have_no_lpips_value(weights):
    tiny = decode(2, (40, 24))  # 24 pixels high: AlexNet's pools need 31, VGG16's 16; DISTS pads
    result = measured(noisy(tiny, 0.05), tiny, weights)
    assert all(math.isnan(v) for v in result.columns["lpips"])
    assert all(v > 0 for v in result.columns["lpips_vgg"]) and all(v > 0 for v in result.columns["dists"])


# -- what is skipped, and where the heads come from -------------------------------------------------------------


def test_without_weight_files_each_metric_is_skipped_with_one_line(frames, weights, tmp_path, monkeypatch):
    monkeypatch.setattr(perceptual, "installed_file", lambda *parts: None)  # as if lpips / DISTS_pytorch were absent
    result = measured(frames, frames, {})
    assert "--alexnet" in result.skipped["lpips"] and "--vgg16" in result.skipped["lpips_vgg"]
    assert "--vgg16" in result.skipped["dists"] and "downloaded" in result.skipped["dists"]
    assert not {"lpips", "lpips_vgg", "dists"} & set(result.columns)
    (tmp_path / "empty").mkdir()
    partial = measured(frames, frames, {"vgg16": weights["vgg16"], "lpips_heads": tmp_path / "empty"})
    assert "vgg.pth" in partial.skipped["lpips_vgg"] and "--dists" in partial.skipped["dists"]
    no_reference = evaluate(frames, None, EvaluateOptions(temporal=False, weights=dict(weights)))
    assert "needs a reference" in no_reference.skipped["lpips"] and "lpips" not in no_reference.columns


def test_heads_and_dists_weights_are_found_in_the_installed_packages_without_importing_them(
    frames, weights, tmp_path, monkeypatch
):
    """lpips and DISTS_pytorch ship their weights inside the package; importing them would import torchvision."""
    site = tmp_path / "site"
    (site / "lpips" / "weights" / "v0.1").mkdir(parents=True)
    (site / "DISTS_pytorch").mkdir()
    for package in ("lpips", "DISTS_pytorch"):
        (site / package / "__init__.py").write_text("raise ImportError('must not be imported')\n")
    for name in ("alex.pth", "vgg.pth"):
        (site / "lpips" / "weights" / "v0.1" / name).write_bytes((weights["lpips_heads"] / name).read_bytes())
    (site / "DISTS_pytorch" / "weights.pt").write_bytes(weights["dists"].read_bytes())
    monkeypatch.syspath_prepend(str(site))
    output = noisy(frames[:1], 0.05)
    found = measured(output, frames[:1], {"alexnet": weights["alexnet"], "vgg16": weights["vgg16"]})
    given = measured(output, frames[:1], weights)
    for name in ("lpips", "lpips_vgg", "dists"):
        assert found.columns[name] == given.columns[name], name


# -- bad weight files -------------------------------------------------------------------------------------------


def test_wrong_or_damaged_weight_files_are_one_error_naming_the_file(frames, weights, tmp_path):
    def fails(match: str, **files: Path) -> None:
        with pytest.raises(WeightFileError, match=match):
            measured(frames, frames, {**weights, **files})

    fails(r"--vgg16 .*alexnet\.pth is not torchvision's vgg16 .*missing features\.", vgg16=weights["alexnet"])
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(weights["alexnet"].read_bytes()[:5000])
    fails(r"--alexnet .*truncated\.pth: not a readable weight file", alexnet=truncated)
    pickled = tmp_path / "object.pth"
    torch.save({"features": Path("not a tensor")}, pickled)  # weights_only refuses arbitrary objects
    fails(r"--alexnet .*object\.pth: not a readable weight file", alexnet=pickled)
    renamed = tmp_path / "renamed.pth"  # lpips' own key layout (net.slice1.0.weight), not torchvision's
    torch.save({f"net.slice1.{k}": v for k, v in torch.load(weights["alexnet"], weights_only=True).items()}, renamed)
    fails(r"--alexnet .*renamed\.pth is not torchvision's alexnet .*unexpected net\.slice1", alexnet=renamed)
    heads = tmp_path / "heads"
    heads.mkdir()
    (heads / "alex.pth").write_bytes((weights["lpips_heads"] / "vgg.pth").read_bytes())  # VGG widths
    (heads / "vgg.pth").write_bytes((weights["lpips_heads"] / "vgg.pth").read_bytes())
    fails(r"--lpips-heads .*alex\.pth is not an LPIPS v0\.1 alexnet head .*: wrong shape lin1", lpips_heads=heads)
    wrong_dists = tmp_path / "dists.pt"
    torch.save({"alpha": torch.rand(1, 1475, 1, 1)}, wrong_dists)
    fails(r"--dists .*dists\.pt is not DISTS' weights .*missing beta", dists=wrong_dists)
    fails(r"--dists .*nowhere\.pt: no such file", dists=tmp_path / "nowhere.pt")
    with pytest.raises(WeightFileError, match="--lpips-heads .*no such folder"):
        measured(frames, frames, {**weights, "lpips_heads": tmp_path / "nowhere"})
    with pytest.raises(UsageError, match="no network weights named resnet"):
        measured(frames, frames, {"resnet": tmp_path})


def test_safetensors_backbones_load_like_the_pickles(frames, weights, tmp_path):
    from safetensors.torch import save_file

    converted = tmp_path / "alexnet.safetensors"
    save_file(torch.load(weights["alexnet"], weights_only=True), str(converted))
    output, heads = noisy(frames[:1], 0.05), {"lpips_heads": weights["lpips_heads"]}
    a = measured(output, frames[:1], {**heads, "alexnet": converted})
    b = measured(output, frames[:1], {**heads, "alexnet": weights["alexnet"]})
    assert a.columns["lpips"] == b.columns["lpips"]


def test_command_line_options_reach_the_metrics(frames, weights, tmp_path):
    from infvsr_core.cli import main

    folder = tmp_path / "ref"
    folder.mkdir()
    for i, frame in enumerate((frames.numpy() * 255).round().astype(np.uint8)):
        Image.fromarray(frame).save(folder / f"frame_{i:04d}.png")
    args = ["evaluate", str(folder), "--reference", str(folder), "--no-temporal", "--quiet", "--device", "cpu",
            "--alexnet", str(weights["alexnet"]), "--vgg16", str(weights["vgg16"]),
            "--lpips-heads", str(weights["lpips_heads"]), "--dists", str(weights["dists"]),
            "--report", str(tmp_path / "report")]  # fmt: skip
    assert main(args) == 0
    import json

    summary = json.loads((tmp_path / "report" / "summary.json").read_text())
    for name in ("lpips", "lpips_vgg", "dists"):
        assert summary["metrics"][name]["mean"] == pytest.approx(0.0, abs=1e-6), name
        assert summary["metrics"][name]["better"] == "lower"


# -- the ComfyUI node -------------------------------------------------------------------------------------------


def test_node_takes_the_networks_from_the_metrics_folder(frames, weights, tmp_path):
    """The node lists models/infvsr/metrics in its network inputs and measures with what is picked."""
    import json
    import shutil

    from infvsr_core.errors import WeightFileError
    from nodes import comfy
    from nodes.evaluate_nodes import InfVSREvaluate

    metrics = tmp_path / "models" / "metrics"
    metrics.mkdir(parents=True)
    shutil.copy(weights["alexnet"], metrics / "alexnet-owt-7be5be79.pth")
    shutil.copytree(weights["lpips_heads"], metrics / "lpips_heads")
    comfy.set_directories(output=tmp_path / "output", input=tmp_path / "input", temp=tmp_path / "temp",
                          models=tmp_path / "models")  # fmt: skip
    choices = InfVSREvaluate.INPUT_TYPES()["optional"]["alexnet"][0]
    assert choices[0] == "none" and {"alexnet-owt-7be5be79.pth", "lpips_heads"} <= set(choices)

    output = noisy(frames, 0.05)
    node = InfVSREvaluate()
    node.evaluate(images=output, reference=frames, temporal=False, filename_prefix="InfVSR/picked",
                  alexnet="alexnet-owt-7be5be79.pth", lpips_heads="lpips_heads")  # fmt: skip
    node.evaluate(images=output, reference=frames, temporal=False, filename_prefix="InfVSR/none")
    (picked,) = (tmp_path / "output" / "InfVSR").glob("picked*/summary.json")
    (unpicked,) = (tmp_path / "output" / "InfVSR").glob("none*/summary.json")
    expected = float(np.mean(lpips64("alexnet", weights, output, frames)))
    assert json.loads(picked.read_text())["metrics"]["lpips"]["mean"] == pytest.approx(expected, rel=1e-4)
    assert "lpips" not in json.loads(unpicked.read_text())["metrics"]
    with pytest.raises(WeightFileError, match="not found in"):
        node.evaluate(images=output, reference=frames, temporal=False, alexnet="../../models/metrics/x.pth")
