"""LPIPS (AlexNet and VGG16) and DISTS against the reference, from weight files the user has: never downloaded.

LPIPS (Zhang et al. 2018, version 0.1 as the `lpips` package computes it): both frames, mapped from [0, 1] to
[-1, 1] and scaled by LPIPS' fixed per-channel shift and scale, go through the ImageNet backbone; at each of five
ReLU outputs every pixel's feature vector is scaled to unit length, the squared difference is weighted per channel
by the learned linear head (a 1x1 convolution without bias), averaged over the pixels, and the five layers summed.

DISTS (Ding et al. 2020, as its authors' DISTS_pytorch computes it): VGG16 with its max-pools replaced by L2
pooling (a 3x3 Hann window, stride 2, over the squared features, then the square root) on ImageNet-normalised
frames; for the input itself and the five ReLU outputs, per channel, the structure term (2 mx my + c) /
(mx^2 + my^2 + c) and the texture term (2 cov + c) / (vx + vy + c), c = 1e-6, weighted by the learned alpha and
beta (divided by their total); DISTS is 1 minus the weighted sum: 0 for identical frames.

Both run on whole frames (no resizing), one frame pair at a time, each layer reduced to its contribution as soon
as it is computed, so only the current layer's activations are held.

Weights: the backbones are torchvision's published ImageNet files (alexnet-owt-7be5be79.pth,
vgg16-397923af.pth), loaded into the feature stacks defined here (torchvision is not needed) with a strict key
check; the LPIPS heads (weights/v0.1/alex.pth, vgg.pth) and DISTS' alpha/beta (weights.pt) ship inside the
`lpips` and `DISTS_pytorch` packages, which are found on disk without being imported (importing them would need
torchvision), or are named by the user. Every file is read with weights_only=True (or as safetensors).
"""

from __future__ import annotations

import importlib.util
import itertools
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UsageError, WeightFileError

PERCEPTUAL_OPTIONS = {
    "alexnet": "--alexnet",
    "vgg16": "--vgg16",
    "lpips_heads": "--lpips-heads",
    "dists": "--dists",
}
"""Weight name (in EvaluateOptions.weights) -> the command-line option naming its local file or folder."""

BACKBONE_FILES = {"alexnet": "alexnet-owt-7be5be79.pth", "vgg16": "vgg16-397923af.pth"}
"""The torchvision ImageNet files each backbone option expects (as published; any file in their layout loads)."""

LPIPS_METRICS = {"lpips": "alexnet", "lpips_vgg": "vgg16"}
"""LPIPS metric -> its backbone."""

_HEAD_FILES = {"alexnet": "alex.pth", "vgg16": "vgg.pth"}  # the names the lpips package gives its v0.1 heads
_HEAD_LAYERS = 5

# torchvision's feature stacks, index for index (so that `features.N.weight` keys line up): a convolution is
# (in, out, kernel, stride, padding), "M" a 3x3 stride-2 max-pool (AlexNet) or 2x2 stride-2 (VGG16).
_ALEXNET = [(3, 64, 11, 4, 2), "R", "M", (64, 192, 5, 1, 2), "R", "M", (192, 384, 3, 1, 1), "R",
            (384, 256, 3, 1, 1), "R", (256, 256, 3, 1, 1), "R"]  # fmt: skip
_VGG16_WIDTHS = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]
_TAPS = {"alexnet": (1, 4, 7, 9, 11), "vgg16": (3, 8, 15, 22, 29)}  # the five ReLU outputs LPIPS and DISTS read
_VGG16_POOLS = (4, 9, 16, 23)  # the max-pools DISTS replaces with L2 pooling
CHANNELS = {"alexnet": (64, 192, 384, 256, 256), "vgg16": (64, 128, 256, 512, 512)}
MIN_SIZE = {"alexnet": 31, "vgg16": 16}
"""The smallest frame side each backbone's pools reach the last LPIPS layer with (smaller frames: no LPIPS value);
DISTS' L2 pooling pads, so it has a value for any size."""

_LPIPS_SHIFT = (-0.030, -0.088, -0.188)
_LPIPS_SCALE = (0.458, 0.448, 0.450)
_IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
_NORM_EPS = 1e-10  # LPIPS' unit-length scaling: x / (|x| + eps)
_DISTS_C = 1e-6
_L2POOL_EPS = 1e-12
DISTS_CHANNELS = (3, *CHANNELS["vgg16"])  # the input itself, then the five VGG16 layers


def _layers(spec: list) -> list[nn.Module]:
    layers: list[nn.Module] = []
    for item in spec:
        if item == "R":
            layers.append(nn.ReLU(inplace=True))
        elif item == "M":
            layers.append(nn.MaxPool2d(kernel_size=3, stride=2))
        else:
            c_in, c_out, k, s, p = item
            layers.append(nn.Conv2d(c_in, c_out, k, stride=s, padding=p))
    return layers


def _vgg16_layers() -> list[nn.Module]:
    layers: list[nn.Module] = []
    c_in = 3
    for item in _VGG16_WIDTHS:
        if item == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers += [nn.Conv2d(c_in, int(item), 3, padding=1), nn.ReLU(inplace=True)]
            c_in = int(item)
    return layers


class Backbone(nn.Module):
    """torchvision's AlexNet or VGG16 `features` up to the last layer LPIPS and DISTS read (keys `features.N.*`)."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.features = nn.Sequential(*(_layers(_ALEXNET) if kind == "alexnet" else _vgg16_layers()))

    def taps(self, x: torch.Tensor, l2_pool: bool = False) -> Iterator[torch.Tensor]:
        """The five ReLU outputs in turn; `l2_pool` swaps VGG16's max-pools for DISTS' L2 pooling."""
        taps = _TAPS[self.kind]
        for index, layer in enumerate(self.features):
            x = l2_pooling(x) if l2_pool and index in _VGG16_POOLS else layer(x)
            if index in taps:
                yield x


def l2_pooling(x: torch.Tensor) -> torch.Tensor:
    """DISTS' L2 pooling: sqrt of the squared features filtered by a normalised 3x3 Hann window, stride 2, pad 1."""
    window = torch.tensor([0.5, 1.0, 0.5], dtype=x.dtype, device=x.device)
    kernel = torch.outer(window, window)
    kernel = (kernel / kernel.sum()).expand(x.shape[1], 1, 3, 3)
    return (F.conv2d(x * x, kernel, stride=2, padding=1, groups=x.shape[1]) + _L2POOL_EPS).sqrt()


# -- reading the weight files ----------------------------------------------------------------------------------


def read_tensors(
    path: Path,
    option: str,
    *,
    hint: str = "",
    nested: str | None = None,
    layout: str = "a state dict (names -> tensors)",
) -> dict[str, torch.Tensor]:
    """A flat name -> tensor mapping from a .safetensors file or a torch pickle (weights_only); else one error.
    `hint` names the file expected (in the errors), `nested` the key a checkpoint keeps its state dict under,
    `layout` what the mapping should be."""
    if not path.is_file():
        raise WeightFileError(f"{option} {path}: no such file" + (f" (give {hint})" if hint else ""))
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            data = load_file(str(path))
        else:
            data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated zip, a pickle refused by weights_only, a foreign format: all one message
        raise WeightFileError(
            f"{option} {path}: not a readable weight file ({type(e).__name__}: {e})"
            + (f"; expected {hint}" if hint else "")
        ) from e
    if nested is not None and isinstance(data, dict) and isinstance(data.get(nested), dict):
        data = data[nested]
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise WeightFileError(f"{option} {path}: expected {layout}, found {type(data).__name__}")
    return data


def check_layout(path: Path, option: str, found: dict[str, torch.Tensor], expected: dict[str, torch.Size],
                  what: str, ignored_prefixes: tuple[str, ...] = ()) -> None:  # fmt: skip
    """Exactly the expected keys and shapes (keys under `ignored_prefixes` aside), or an error naming the file."""
    keys = {k for k in found if not k.startswith(ignored_prefixes)}
    missing, unexpected = sorted(set(expected) - keys), sorted(keys - set(expected))
    wrong = [f"{k} {tuple(found[k].shape)} (expected {tuple(expected[k])})"
             for k in sorted(set(expected) & keys) if found[k].shape != expected[k]]  # fmt: skip
    if missing or unexpected or wrong:
        problems = []
        if missing:
            problems.append(f"missing {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}")
        if unexpected:
            problems.append(f"unexpected {', '.join(unexpected[:4])}{' ...' if len(unexpected) > 4 else ''}")
        if wrong:
            problems.append(f"wrong shape {', '.join(wrong[:2])}")
        raise WeightFileError(f"{option} {path} is not {what}: {'; '.join(problems)}")


def load_backbone(path: Path, kind: str, device: torch.device) -> Backbone:
    """torchvision's published AlexNet / VGG16 file (its `classifier.*` keys are not needed) into a Backbone."""
    option = PERCEPTUAL_OPTIONS[kind]
    model = Backbone(kind)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    found = read_tensors(path, option)
    what = f"torchvision's {kind} in its key layout (features.N.weight / .bias, as in {BACKBONE_FILES[kind]})"
    check_layout(path, option, found, expected, what, ignored_prefixes=("classifier.",))
    model.load_state_dict({k: found[k] for k in expected}, strict=True)
    return model.to(device).eval()


def load_lpips_head(path: Path, kind: str) -> list[torch.Tensor]:
    """The five per-channel weights of an LPIPS v0.1 head file (keys linL.model.1.weight, shape (1, C, 1, 1))."""
    expected = {f"lin{i}.model.1.weight": torch.Size((1, c, 1, 1)) for i, c in enumerate(CHANNELS[kind])}
    found = read_tensors(path, PERCEPTUAL_OPTIONS["lpips_heads"])
    what = f"an LPIPS v0.1 {kind} head ({_HEAD_FILES[kind]}: lin0..lin4.model.1.weight)"
    check_layout(path, PERCEPTUAL_OPTIONS["lpips_heads"], found, expected, what)
    return [found[f"lin{i}.model.1.weight"].flatten().float() for i in range(_HEAD_LAYERS)]


def load_dists_weights(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """DISTS' alpha and beta (keys alpha, beta; shape (1, 1475, 1, 1)), each divided by their common total."""
    total = sum(DISTS_CHANNELS)
    expected = {"alpha": torch.Size((1, total, 1, 1)), "beta": torch.Size((1, total, 1, 1))}
    found = read_tensors(path, PERCEPTUAL_OPTIONS["dists"])
    check_layout(path, PERCEPTUAL_OPTIONS["dists"], found, expected, "DISTS' weights (alpha, beta as weights.pt)")
    alpha, beta = found["alpha"].flatten().double(), found["beta"].flatten().double()
    norm = alpha.sum() + beta.sum()
    return (alpha / norm).float(), (beta / norm).float()


def installed_file(package: str, *parts: str) -> Path | None:
    """A data file inside an installed package, found without importing it (lpips and DISTS_pytorch import
    torchvision, which this command does without)."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    for folder in (spec.submodule_search_locations or []) if spec is not None else []:
        candidate = Path(folder).joinpath(*parts)
        if candidate.is_file():
            return candidate
    return None


def lpips_head_file(kind: str, folder: Path | None) -> Path | None:
    """The v0.1 head of `kind`: in `folder` (as alex.pth / vgg.pth, or under weights/v0.1/), else in lpips."""
    name = _HEAD_FILES[kind]
    if folder is not None:
        for candidate in (folder / name, folder / "v0.1" / name, folder / "weights" / "v0.1" / name):
            if candidate.is_file():
                return candidate
        return None
    return installed_file("lpips", "weights", "v0.1", name)


# -- the metrics -----------------------------------------------------------------------------------------------


def _channel_stats(shape: tuple[float, ...], device: torch.device) -> torch.Tensor:
    return torch.tensor(shape, device=device).view(1, 3, 1, 1)


@dataclass
class LpipsNet:
    name: str
    backbone: Backbone
    heads: list[torch.Tensor]

    def distance(self, pair: torch.Tensor) -> float:
        """LPIPS of pair[0] against pair[1], (2, 3, H, W) in [0, 1]; NaN for frames too small for the backbone."""
        if min(pair.shape[-2:]) < MIN_SIZE[self.backbone.kind]:
            return math.nan
        device = pair.device
        x = (pair * 2 - 1 - _channel_stats(_LPIPS_SHIFT, device)) / _channel_stats(_LPIPS_SCALE, device)
        total = 0.0
        for features, weight in zip(self.backbone.taps(x), self.heads, strict=True):
            unit = features / (features.square().sum(dim=1, keepdim=True).sqrt() + _NORM_EPS)
            squared = (unit[0] - unit[1]).square().mean(dim=(1, 2))
            total += float(squared.double() @ weight.to(device).double())
        return total


@dataclass
class DistsNet:
    name: str
    backbone: Backbone
    alpha: torch.Tensor
    beta: torch.Tensor

    def distance(self, pair: torch.Tensor) -> float:
        """DISTS of pair[0] against pair[1], (2, 3, H, W) in [0, 1]."""
        device = pair.device
        x = (pair - _channel_stats(_IMAGENET[0], device)) / _channel_stats(_IMAGENET[1], device)
        similarity, start = 0.0, 0
        # The raw frames are DISTS' first "layer"; the network's follow one at a time.
        for features in itertools.chain([pair], self.backbone.taps(x, l2_pool=True)):
            n = features.shape[1]
            mean = features.mean(dim=(2, 3))
            centred = features - mean[:, :, None, None]
            var = centred.square().mean(dim=(2, 3))
            cov = (centred[0] * centred[1]).mean(dim=(1, 2))
            structure = (2 * mean[0] * mean[1] + _DISTS_C) / (mean[0].square() + mean[1].square() + _DISTS_C)
            texture = (2 * cov + _DISTS_C) / (var[0] + var[1] + _DISTS_C)
            alpha, beta = self.alpha[start : start + n].to(device), self.beta[start : start + n].to(device)
            similarity += float((alpha * structure).double().sum() + (beta * texture).double().sum())
            start += n
        return max(0.0, 1.0 - similarity)  # alpha, beta >= 0 and both terms <= 1: below 0 is rounding


class Perceptual:
    """LPIPS / DISTS per frame of the output against the reference, streamed like the other network metrics."""

    def __init__(self, nets: list[LpipsNet | DistsNet], device: torch.device) -> None:
        self.nets, self.device = nets, device

    @torch.inference_mode()
    def push(self, output: torch.Tensor, reference: torch.Tensor | None = None) -> dict[str, np.ndarray]:
        if reference is None:
            return {}  # full-reference metrics: evaluate() reports them as needing --reference
        values = {net.name: np.full(int(output.shape[0]), math.nan) for net in self.nets}
        for t, (out, ref) in enumerate(zip(output, reference, strict=True)):
            pair = torch.stack([out, ref]).to(self.device, torch.float32).permute(0, 3, 1, 2).contiguous()
            for net in self.nets:
                values[net.name][t] = net.distance(pair)
        return values

    def cut(self, index: int) -> list[tuple[int, str, float]]:
        return []  # each frame is compared with its own reference: scene cuts change nothing


def load_perceptual(weights: dict[str, Path], device: torch.device) -> tuple[Perceptual | None, dict[str, str]]:
    """The LPIPS / DISTS metrics whose weight files are given or installed, and one line for each left out."""
    unknown = set(weights) - set(PERCEPTUAL_OPTIONS)
    if unknown:
        raise UsageError(f"no perceptual weights named {', '.join(sorted(unknown))}")
    paths = {name: Path(p) for name, p in weights.items() if p is not None}
    heads_folder = paths.get("lpips_heads")
    if heads_folder is not None and not heads_folder.is_dir():
        raise WeightFileError(f"--lpips-heads {heads_folder}: no such folder (the folder holding alex.pth / vgg.pth)")
    skipped: dict[str, str] = {}
    backbones: dict[str, Backbone] = {}
    for kind in BACKBONE_FILES:
        if kind in paths:
            backbones[kind] = load_backbone(paths[kind], kind, device)
    nets: list[LpipsNet | DistsNet] = []
    for name, kind in LPIPS_METRICS.items():
        if kind not in backbones:
            option, file = PERCEPTUAL_OPTIONS[kind], BACKBONE_FILES[kind]
            skipped[name] = f"no {option} file given (torchvision's {file}; nothing is downloaded)"
            continue
        head = lpips_head_file(kind, heads_folder)
        if head is None:
            where = f"in --lpips-heads {heads_folder}" if heads_folder else "(the lpips package is not installed)"
            skipped[name] = f"no LPIPS v0.1 head {_HEAD_FILES[kind]} {where}: give --lpips-heads DIR"
            continue
        nets.append(LpipsNet(name, backbones[kind], load_lpips_head(head, kind)))
    if "vgg16" not in backbones:
        skipped["dists"] = f"no --vgg16 file given (torchvision's {BACKBONE_FILES['vgg16']}; nothing is downloaded)"
    else:
        dists_file = paths.get("dists") or installed_file("DISTS_pytorch", "weights.pt")
        if dists_file is None:
            skipped["dists"] = "no DISTS alpha/beta file: give --dists weights.pt (DISTS_pytorch is not installed)"
        else:
            nets.append(DistsNet("dists", backbones["vgg16"], *load_dists_weights(dists_file)))
    return (Perceptual(nets, device) if nets else None), skipped
