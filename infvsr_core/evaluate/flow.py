"""Temporal consistency from optical flow (OpenCV, classical flows: no network, no weights to fetch).

E*warp (Lai et al. 2018, "Learning Blind Video Temporal Consistency"), the paper's pixel-level measure: frame t-1
of the output is warped onto frame t along the backward flow t -> t-1, and the squared RGB distance is averaged
over the pixels that are visible in both frames (the forward-backward consistency test of Sundaram et al. 2010,
as Lai et al. use it, and inside the frame), times 1000 as the paper tabulates it. The flow is OpenCV's DIS flow
on the output itself; published E*warp numbers (the paper's table) use learned flows (FlowNet2 / RAFT), so these
values rank settings on the same footage but are not comparable with the paper's.

tOF (TecoGAN, Chu et al. 2020): the mean end-point distance, in pixels, between the Farneback flow t-1 -> t of the
output and the same flow of the reference, with TecoGAN's Farneback parameters, on 8-bit grey frames. It compares
motion, not colour: a global brightness offset of the output leaves it unchanged, and so it does E*warp (both
frames of a pair move together); flicker raises E*warp, not tOF.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

import cv2
import numpy as np

EWARP_SCALE = 1000.0
_FB_RELATIVE = 0.01  # forward-backward consistency: |f + b|^2 <= 0.01 (|f|^2 + |b|^2) + 0.5 (Sundaram et al.)
_FB_ABSOLUTE = 0.5
# TecoGAN's Farneback settings: pyramid scale 0.5, 3 levels, window 15, 3 iterations, poly_n 5, poly_sigma 1.2.
_FARNEBACK = (0.5, 3, 15, 3, 5, 1.2, 0)

_local = threading.local()


def _dis() -> cv2.DISOpticalFlow:
    """One DIS instance per thread: an instance keeps state between calls and is not shared."""
    dis = getattr(_local, "dis", None)
    if dis is None:
        dis = _local.dis = cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_MEDIUM)
    return dis


def grey(rgb: np.ndarray) -> np.ndarray:
    """8-bit grey (OpenCV's BT.601 weights) of an (H, W, 3) float RGB frame in [0, 1]."""
    eight = np.clip(np.rint(rgb * 255.0), 0, 255).astype(np.uint8)
    return cv2.cvtColor(eight, cv2.COLOR_RGB2GRAY)


def warping_error(
    previous: np.ndarray, current: np.ndarray, previous_grey: np.ndarray, current_grey: np.ndarray
) -> float:
    """E*warp of one pair of (H, W, 3) float32 frames (x1e-3); NaN when no pixel is visible in both."""
    h, w = current_grey.shape
    backward = _dis().calc(current_grey, previous_grey, None)  # current(x) ~ previous(x + backward(x))
    forward = _dis().calc(previous_grey, current_grey, None)
    xs, ys = np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32))
    map_x, map_y = xs + backward[..., 0], ys + backward[..., 1]
    warped = cv2.remap(previous, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    forward_there = cv2.remap(forward, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    round_trip = np.square(backward + forward_there).sum(-1)
    lengths = np.square(backward).sum(-1) + np.square(forward_there).sum(-1)
    visible = round_trip <= _FB_RELATIVE * lengths + _FB_ABSOLUTE
    visible &= (map_x >= 0) & (map_x <= w - 1) & (map_y >= 0) & (map_y <= h - 1)
    count = int(visible.sum())
    if count == 0:
        return float("nan")
    distance = np.square(current - warped).sum(-1)
    return float(distance[visible].astype(np.float64).sum() / count * EWARP_SCALE)


def farneback(previous_grey: np.ndarray, current_grey: np.ndarray) -> np.ndarray:
    """TecoGAN's Farneback flow previous -> current, (H, W, 2) pixels."""
    return cv2.calcOpticalFlowFarneback(previous_grey, current_grey, None, *_FARNEBACK)


def tof(previous_out: np.ndarray, current_out: np.ndarray, previous_ref: np.ndarray, current_ref: np.ndarray) -> float:
    """tOF of one pair of grey frames: mean |flow(output) - flow(reference)| in pixels."""
    difference = farneback(previous_out, current_out) - farneback(previous_ref, current_ref)
    return float(np.sqrt(np.square(difference).sum(-1)).astype(np.float64).mean())


class TemporalMetrics:
    """E*warp (and tOF with a reference) of every frame, chunk after chunk: the last frame of each chunk is kept
    for the next one, so the values are those of the whole video however it is cut. The first frame has none."""

    def __init__(self, with_reference: bool, workers: int | None = None) -> None:
        self.with_reference = with_reference
        self._pool = ThreadPoolExecutor(max_workers=workers or min(8, os.cpu_count() or 1))
        self._last: tuple[np.ndarray, np.ndarray, np.ndarray | None] | None = None

    def push(self, output: np.ndarray, reference: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """Values for each frame of a (T, H, W, 3) float32 chunk (NaN for the video's first frame)."""
        out_grey = [grey(f) for f in output]
        ref_grey = [grey(f) for f in reference] if self.with_reference and reference is not None else None
        frames = [(output[i], out_grey[i], ref_grey[i] if ref_grey else None) for i in range(len(output))]
        chain = ([self._last] if self._last is not None else []) + frames
        offset = len(chain) - len(frames)  # 1 when a previous chunk left its last frame

        def pair(i: int) -> tuple[float, float]:
            (p_rgb, p_grey, p_ref), (c_rgb, c_grey, c_ref) = chain[i - 1], chain[i]
            ewarp = warping_error(p_rgb, c_rgb, p_grey, c_grey)
            flow = tof(p_grey, c_grey, p_ref, c_ref) if p_ref is not None and c_ref is not None else float("nan")
            return ewarp, flow

        values = list(self._pool.map(pair, range(1, len(chain))))
        ewarp = np.full(len(frames), np.nan)
        flows = np.full(len(frames), np.nan)
        for i, (e, f) in enumerate(values):
            ewarp[i + 1 - offset], flows[i + 1 - offset] = e, f
        if frames:
            self._last = frames[-1]
        result = {"ewarp": ewarp}
        if self.with_reference:
            result["tof"] = flows
        return result

    def close(self) -> None:
        self._pool.shutdown(wait=True)
