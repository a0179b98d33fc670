"""Online scene-cut detection: PySceneDetect's ``ContentDetector`` decisions without OpenCV.

The released InfVSR inference feeds every input frame (full resolution, BGR) to
``scenedetect.detectors.ContentDetector(threshold=27)`` as it streams and holds frames back for the
detector's event buffer (SPEC section 4); the DAPE prompt refresh runs a fresh detector with minimum scene
length 0 on (reference frame, chunk's first frame) (SPEC section 3). This module reproduces scenedetect
0.7.2's decisions exactly:

* HSV as OpenCV's ``cvtColor(COLOR_BGR2HSV)`` computes it for 8-bit images (integer arithmetic with its
  rounded division tables, hue in [0, 180)), checked against OpenCV on all 2^24 colours;
* frame score = weighted mean of the mean absolute differences of hue, saturation and value between
  consecutive frames (default weights 1, 1, 1; edges 0), compared with ``>= threshold``; the first frame
  scores 0;
* ``min_scene_len`` (15) through scenedetect's ``FlashFilter`` in its default MERGE mode. A frame above the
  threshold at least ``min_scene_len`` frames after the previous frame above it is a cut, reported at once.
  Before the first reported cut, closer ones are simply dropped (nothing in the first ``min_scene_len``
  frames is ever a cut). After it, a closer one opens a merge run, which every later frame above the
  threshold extends. The run's last frame above the threshold is reported, ``min_scene_len`` frames late, at
  the first frame below the threshold ``min_scene_len`` frames past it, provided the run spans at least
  ``min_scene_len`` frames by then; otherwise the run stays open (its cuts merged away) and even a much later
  cut joins it and is reported late. SUPPRESS mode (report when ``min_scene_len`` frames have passed since
  the last reported cut, never late) is available too. Like scenedetect, nothing is reported after the
  last frame: a pending run is dropped.

Float frames are quantized to 8 bits as ``round(x * 255)`` first: the release decodes 8-bit RGB.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

__all__ = ["ContentDetector", "frame_score", "reference_changed", "rgb_to_hsv_opencv"]

_HSV_SHIFT = 12


def _division_tables() -> tuple[np.ndarray, np.ndarray]:
    """OpenCV's RGB2HSV_b tables: round((255 << 12) / v) and round((180 << 12) / (6 * diff))."""
    sdiv = np.zeros(256, np.int32)
    hdiv = np.zeros(256, np.int32)
    i = np.arange(1, 256, dtype=np.float64)
    sdiv[1:] = np.rint((255 << _HSV_SHIFT) / i)  # no exact halves occur, so the rounding mode is moot
    hdiv[1:] = np.rint((180 << _HSV_SHIFT) / (6.0 * i))
    return sdiv, hdiv


_SDIV, _HDIV = _division_tables()


def _to_uint8_rgb(frame: Any) -> np.ndarray:
    """(H, W, 3) uint8 RGB from a numpy array or torch tensor, uint8 or float in [0, 1]."""
    if isinstance(frame, torch.Tensor):
        if frame.dtype == torch.uint8:
            array = frame.detach().cpu().numpy()
        else:
            array = frame.detach().to(torch.float32).mul(255.0).round_().clamp_(0, 255).to(torch.uint8).cpu().numpy()
    else:
        array = np.asarray(frame)
        if array.dtype != np.uint8:
            array = np.clip(np.rint(array.astype(np.float32) * 255.0), 0, 255).astype(np.uint8)
    if array.ndim != 3 or array.shape[-1] != 3:
        raise ValueError(f"expected one (H, W, 3) frame, got shape {tuple(array.shape)}")
    return array


def rgb_to_hsv_opencv(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Hue, saturation, value planes (uint8) exactly as OpenCV's 8-bit BGR->HSV conversion gives them."""
    r = rgb[..., 0].astype(np.int32)
    g = rgb[..., 1].astype(np.int32)
    b = rgb[..., 2].astype(np.int32)
    v = np.maximum(np.maximum(r, g), b)
    diff = v - np.minimum(np.minimum(r, g), b)
    half = 1 << (_HSV_SHIFT - 1)
    s = (diff * _SDIV[v] + half) >> _HSV_SHIFT
    h = np.where(v == r, g - b, np.where(v == g, b - r + 2 * diff, r - g + 4 * diff))
    h = (h * _HDIV[diff] + half) >> _HSV_SHIFT  # arithmetic shift, as in C for negative values
    h = np.where(h < 0, h + 180, h)
    return h.astype(np.uint8), s.astype(np.uint8), v.astype(np.uint8)


def _mean_pixel_distance(left: np.ndarray, right: np.ndarray) -> float:
    # Same operations as scenedetect: an integer sum divided by the pixel count as a float.
    return int(np.abs(left.astype(np.int32) - right.astype(np.int32)).sum(dtype=np.int64)) / float(left.size)


def _weighted_score(components: Sequence[float], weights: Sequence[float]) -> float:
    # Python's sum over the same terms in the same order as scenedetect, so ties at the threshold agree.
    return sum(c * w for c, w in zip(components, weights, strict=True)) / sum(abs(w) for w in weights)


def frame_score(previous_rgb: Any, frame_rgb: Any, weights: Sequence[float] = (1.0, 1.0, 1.0, 0.0)) -> float:
    """ContentDetector's score of ``frame_rgb`` after ``previous_rgb`` (the value compared with the threshold)."""
    a, b = rgb_to_hsv_opencv(_to_uint8_rgb(previous_rgb)), rgb_to_hsv_opencv(_to_uint8_rgb(frame_rgb))
    if a[0].shape != b[0].shape:
        raise ValueError(f"frame sizes differ: {a[0].shape} and {b[0].shape}")
    return _weighted_score([_mean_pixel_distance(x, y) for x, y in zip(a, b, strict=True)] + [0.0], weights)


class ContentDetector:
    """Streaming scene-cut detector with scenedetect 0.7.2 ``ContentDetector`` decisions (module docstring).

    Call :meth:`push` with every frame in order; it returns the indices of frames that start a new scene as
    soon as they are decided. A cut can be reported up to :attr:`event_buffer_length` frames after the frame
    it names, so a streaming driver may only treat frames with index < :attr:`safe_count` as final.
    """

    def __init__(
        self,
        threshold: float = 27.0,
        min_scene_len: int = 15,
        weights: Sequence[float] = (1.0, 1.0, 1.0, 0.0),
        luma_only: bool = False,
        filter_mode: str = "merge",
    ) -> None:
        if luma_only:
            weights = (0.0, 0.0, 1.0, 0.0)
        if len(weights) != 4:
            raise ValueError("weights are (hue, saturation, luma, edges)")
        if weights[3] != 0.0:
            raise ValueError("edge weights need OpenCV's Canny detector, which this module does not reproduce")
        if filter_mode not in ("merge", "suppress"):
            raise ValueError(f"filter_mode must be 'merge' or 'suppress', got {filter_mode!r}")
        self.threshold = float(threshold)
        self.min_scene_len = int(min_scene_len)
        self.weights = tuple(float(w) for w in weights)
        self.filter_mode = filter_mode
        self.frames_seen = 0
        self.last_score: float | None = None
        self._last_hsv: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
        # FlashFilter state
        self._last_above: int | None = None
        self._merge_enabled = False
        self._merge_triggered = False
        self._merge_start: int | None = None

    @property
    def event_buffer_length(self) -> int:
        """How many frames behind the newest pushed frame a reported cut can be."""
        if self.filter_mode == "suppress" or self.min_scene_len <= 0:
            return 0
        return self.min_scene_len

    @property
    def safe_count(self) -> int:
        """Frames with index below this are final: no later push can report a cut at or before them."""
        return max(0, self.frames_seen - self.event_buffer_length)

    def score(self, frame_rgb: Any) -> float:
        """Score a frame against the previous one and remember it (0.0 for the first frame)."""
        hsv = rgb_to_hsv_opencv(_to_uint8_rgb(frame_rgb))
        previous, self._last_hsv = self._last_hsv, hsv
        if previous is None:
            return 0.0
        if previous[0].shape != hsv[0].shape:
            raise ValueError(f"frame size changed from {previous[0].shape} to {hsv[0].shape}")
        components = [_mean_pixel_distance(a, b) for a, b in zip(hsv, previous, strict=True)] + [0.0]
        return _weighted_score(components, self.weights)

    def push(self, frame_rgb: Any) -> list[int]:
        """Process the next frame (RGB, (H, W, 3), uint8 or float in [0, 1]); return newly decided cuts."""
        index = self.frames_seen
        self.frames_seen += 1
        self.last_score = self.score(frame_rgb)
        return self._filter(index, self.last_score >= self.threshold)

    def finish(self) -> list[int]:
        """End of stream: scenedetect's ContentDetector reports nothing more (a pending merge is dropped)."""
        return []

    def _filter(self, index: int, above: bool) -> list[int]:
        """scenedetect's FlashFilter.filter with frame numbers."""
        length = self.min_scene_len
        if length <= 0:
            return [index] if above else []
        if self._last_above is None:
            self._last_above = index
        if self.filter_mode == "suppress":
            if above and index - self._last_above >= length:
                self._last_above = index
                return [index]
            return []
        min_length_met = index - self._last_above >= length
        if above:
            self._last_above = index
        if self._merge_triggered:
            assert self._merge_start is not None
            if min_length_met and not above and self._last_above - self._merge_start >= length:
                self._merge_triggered = False
                return [self._last_above]
            return []
        if not above:
            return []
        if min_length_met:
            self._merge_enabled = True  # merging only starts once a first cut was emitted
            return [index]
        if self._merge_enabled:
            self._merge_triggered = True
            self._merge_start = index
        return []


def reference_changed(reference_rgb: Any, frame_rgb: Any, threshold: float = 27.0) -> bool:
    """DAPE prompt refresh test (SPEC 3): would a fresh detector with minimum scene length 0, fed the
    reference frame and then this frame, report a cut? (The caller checks the 15-frame spacing.)"""
    detector = ContentDetector(threshold=threshold, min_scene_len=0)
    detector.push(reference_rgb)
    return bool(detector.push(frame_rgb))
