"""The metrics that need a network's weights: computed only from local files the user names, never downloaded.

Subject consistency and background consistency are VBench's (Huang et al. 2024), the paper's semantic-level
temporal measures: every frame's image feature (DINO ViT-B/16 for subjects, CLIP ViT-B/32 for backgrounds) is
compared by cosine similarity with the previous frame's and with the first frame's, negative similarities count as
0, and the frame scores ((previous + first) / 2) average to the video's. On footage with cuts the "first frame" is
that of the frame's scene (VBench scores single shots); a scene's first frame has no score. The networks are
loaded with Hugging Face transformers from a local folder in its format (config.json + weights:
`facebook/dino-vitb16`, `openai/clip-vit-base-patch32`), offline, pickles only with weights_only=True, and the
frames are prepared as VBench prepares them (shorter side to 224; CLIP also centre-cropped to 224x224).

LPIPS and DISTS, the full-reference network metrics, are in perceptual.py; VBench's motion smoothness (the AMT-S
frame-interpolation network) is in motion.py.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import UsageError, WeightFileError

NETWORK_OPTIONS = {
    "subject_consistency": "--dino",
    "background_consistency": "--clip",
}
"""Metric -> the command-line option naming its local weights folder."""

_IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
_CLIP = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
_SIZE = 224
_BATCH = 16
_KEEP = 64  # features kept for late cut corrections: more than the cut detector's delay plus one chunk


def _normalize(frames: torch.Tensor, stats: tuple[tuple[float, ...], tuple[float, ...]]) -> torch.Tensor:
    mean = torch.tensor(stats[0], device=frames.device).view(1, 3, 1, 1)
    std = torch.tensor(stats[1], device=frames.device).view(1, 3, 1, 1)
    return (frames - mean) / std


def _shorter_side(frames: torch.Tensor, mode: str) -> torch.Tensor:
    """(T, 3, H, W) resized so that the shorter side is 224, as torchvision's Resize(224) (no antialiasing)."""
    h, w = frames.shape[-2:]
    if h <= w:
        size = (_SIZE, int(_SIZE * w / h))
    else:
        size = (int(_SIZE * h / w), _SIZE)
    return F.interpolate(frames, size=size, mode=mode, align_corners=False)


def dino_input(frames: torch.Tensor) -> torch.Tensor:
    """VBench's dino_transform(224) of (T, H, W, 3) frames in [0, 1]: bilinear, ImageNet statistics."""
    return _normalize(_shorter_side(frames.permute(0, 3, 1, 2), "bilinear"), _IMAGENET)


def clip_input(frames: torch.Tensor) -> torch.Tensor:
    """VBench's clip_transform(224): bicubic, centre crop 224x224, CLIP statistics."""
    resized = _shorter_side(frames.permute(0, 3, 1, 2), "bicubic")
    h, w = resized.shape[-2:]
    top, left = int(round((h - _SIZE) / 2.0)), int(round((w - _SIZE) / 2.0))
    return _normalize(resized[:, :, top : top + _SIZE, left : left + _SIZE], _CLIP)


def _load(folder: Path, kind: str, device: torch.device):
    """A transformers vision model from a local folder (offline, weights_only); one clear error otherwise."""
    try:
        import transformers
    except ImportError as e:
        raise UsageError(
            f"{NETWORK_OPTIONS[kind]} needs the transformers package (pip install transformers); it is not installed"
        ) from e
    if not (folder / "config.json").is_file():
        raise WeightFileError(
            f"{folder} is not a Hugging Face model folder (no config.json): give the local folder of "
            f"{'facebook/dino-vitb16' if kind == 'subject_consistency' else 'openai/clip-vit-base-patch32'}"
        )
    cls = transformers.ViTModel if kind == "subject_consistency" else transformers.CLIPVisionModelWithProjection
    extra = {"add_pooling_layer": False} if kind == "subject_consistency" else {}  # DINO's output is the class token
    try:
        model = cls.from_pretrained(str(folder), local_files_only=True, weights_only=True, **extra)
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        raise WeightFileError(f"cannot load {cls.__name__} from {folder}: {e}") from e
    return model.to(device).eval()


def _encoder(folder: Path, kind: str, device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
    """Frames (T, H, W, 3) -> unit-length features (T, D), VBench's way."""
    model = _load(folder, kind, device)

    @torch.inference_mode()
    def encode(frames: torch.Tensor) -> torch.Tensor:
        features = []
        for start in range(0, int(frames.shape[0]), _BATCH):
            batch = frames[start : start + _BATCH].to(device, torch.float32)
            if kind == "subject_consistency":
                hidden = model(pixel_values=dino_input(batch), interpolate_pos_encoding=True).last_hidden_state
                features.append(hidden[:, 0])  # DINO's output: the class token after the final norm
            else:
                features.append(model(pixel_values=clip_input(batch)).image_embeds)
        return F.normalize(torch.cat(features).float(), dim=-1).cpu()

    return encode


class Consistency:
    """VBench's consistency score per frame, streamed; a cut (reported late) makes its frame the new first frame."""

    def __init__(self, name: str, encode: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.name, self.encode = name, encode
        self.seen = 0
        self.first: torch.Tensor | None = None
        self.previous: torch.Tensor | None = None
        self.recent: deque[tuple[int, torch.Tensor, float]] = deque(maxlen=_KEEP)  # (frame, feature, previous sim)

    @staticmethod
    def _sim(a: torch.Tensor, b: torch.Tensor) -> float:
        return max(0.0, float(torch.dot(a, b)))

    def push(self, output: torch.Tensor, reference: torch.Tensor | None = None) -> dict[str, np.ndarray]:
        features = self.encode(output)
        values = np.full(len(features), math.nan)
        for i, feature in enumerate(features):
            index = self.seen + i
            if self.first is None:
                self.first, previous_sim = feature, math.nan
            else:
                assert self.previous is not None
                previous_sim = self._sim(self.previous, feature)
                values[i] = (previous_sim + self._sim(self.first, feature)) / 2
            self.recent.append((index, feature, previous_sim))
            self.previous = feature
        self.seen += len(features)
        return {self.name: values}

    def cut(self, index: int) -> list[tuple[int, str, float]]:
        """Frame `index` starts a scene: the values of the frames from it on, recomputed against it."""
        kept = [item for item in self.recent if item[0] >= index]
        if not kept or kept[0][0] != index:
            return []  # older than the features kept: the detector never reports so late
        self.first = kept[0][1]
        fixes = [(index, self.name, math.nan)]
        for frame, feature, previous_sim in kept[1:]:
            fixes.append((frame, self.name, (previous_sim + self._sim(self.first, feature)) / 2))
        return fixes


def load_networks(weights: dict[str, Path], device: torch.device) -> tuple[list[Consistency], dict[str, str]]:
    """The networks whose local weights were given, and one line for each metric left out (never a download)."""
    skipped: dict[str, str] = {}
    from .motion import MOTION_OPTIONS
    from .perceptual import PERCEPTUAL_OPTIONS

    others = [*PERCEPTUAL_OPTIONS, *MOTION_OPTIONS]  # perceptual.py and motion.py take those
    unknown = set(weights) - set(NETWORK_OPTIONS) - set(others)
    if unknown:
        raise UsageError(
            f"no network weights named {', '.join(sorted(unknown))}: choose from "
            f"{', '.join([*NETWORK_OPTIONS, *others])}"
        )
    networks = []
    for name, option in NETWORK_OPTIONS.items():
        folder = weights.get(name)
        if folder is None:
            skipped[name] = f"no {option} weights folder given (nothing is downloaded)"
            continue
        folder = Path(folder)
        if not folder.exists():
            raise WeightFileError(f"{option} {folder}: no such folder")
        networks.append(Consistency(name, _encoder(folder, name, device)))
    return networks, skipped
