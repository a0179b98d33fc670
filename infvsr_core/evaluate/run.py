"""One evaluation: the output against its reference (or alone), streamed chunk by chunk into a table of per-frame
values, with the reference's scene cuts. Memory holds one chunk of each video and a few numbers per frame."""

from __future__ import annotations

import importlib.util
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import UsageError
from .metrics import METRICS, fidelity
from .sources import FrameSource, Pairing, check_pair, open_source, paired_chunks

_CHUNK_PIXELS = 1 << 24  # frames read at a time: about this many pixels per chunk, between 1 and _MAX_CHUNK frames
_MAX_CHUNK = 16
FLOW_NOTE = (
    "E*warp here uses OpenCV's DIS optical flow; published E*warp numbers (the InfVSR paper's table) use learned "
    "flows, so these values compare settings on the same footage but are not comparable with the paper's"
)


@dataclass
class EvaluateOptions:
    """What to measure and how the two videos are brought together (the command's options)."""

    temporal: bool = True  # E*warp and tOF (optical flow: the slowest part)
    crop_border: int = 0  # pixels left out all round for PSNR / SSIM (BasicSR's crop_border)
    resize: bool = False
    crop: bool = False
    align: bool = False
    frames: int | None = None  # evaluate at most this many frames
    scene_threshold: float = 27.0  # the content detector's threshold, as `upscale` uses it
    device: str | None = None  # where the networks run; default cuda when available
    # optional networks: metric name (dino/clip folders), perceptual.PERCEPTUAL_OPTIONS or motion.MOTION_OPTIONS
    # key -> local weights
    weights: dict[str, Path] = field(default_factory=dict)


@dataclass
class Evaluation:
    """Per-frame values (NaN where a metric has no value for a frame), the scene cuts, and what was left out."""

    output: str
    reference: str | None
    width: int
    height: int
    fps: float | None
    columns: dict[str, list[float]]
    cuts: list[int]
    skipped: dict[str, str]
    notes: list[str]
    settings: dict[str, Any]

    @property
    def frames(self) -> int:
        return len(next(iter(self.columns.values()), []))

    @property
    def metrics(self) -> list[str]:
        return [name for name in self.columns if name in METRICS]


Progress = Callable[[int, int | None], None]


def _device(name: str | None) -> torch.device:
    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def chunk_frames(width: int, height: int) -> int:
    return max(1, min(_MAX_CHUNK, _CHUNK_PIXELS // max(1, width * height)))


LIBRARIES = {"cv2": "opencv-python-headless", "skimage": "scikit-image", "matplotlib": "matplotlib"}
"""Module -> the package that measuring needs (requirements.txt), which upscaling alone does not."""


def require_libraries() -> None:
    """Say which packages are missing, before any work (ComfyUI installs may lack the evaluation's)."""
    missing = [package for module, package in LIBRARIES.items() if importlib.util.find_spec(module) is None]
    if missing:
        raise UsageError(
            f"measuring quality needs {', '.join(missing)}: run `pip install -r requirements.txt` from this pack's "
            "folder with the Python that runs it (ComfyUI's, for the node)"
        )


def evaluate(
    output: str | os.PathLike[str] | torch.Tensor | FrameSource,
    reference: str | os.PathLike[str] | torch.Tensor | FrameSource | None,
    options: EvaluateOptions | None = None,
    progress: Progress | None = None,
) -> Evaluation:
    """Measure `output` against `reference` (video files, frame folders, (T, H, W, 3) tensors or sources).

    Without a reference only the no-reference metrics run (E*warp, the semantic consistencies): the case of
    real-world sets such as MovieLQ, which have no ground truth.
    """
    require_libraries()
    from ..scenes import ContentDetector
    from .flow import TemporalMetrics
    from .motion import load_motion
    from .perceptual import PERCEPTUAL_OPTIONS, load_perceptual
    from .semantic import load_networks

    options = options or EvaluateOptions()
    if options.crop_border < 0:
        raise UsageError(f"--crop-border must be >= 0, got {options.crop_border}")
    if options.frames is not None and options.frames < 1:
        raise UsageError(f"--frames must be >= 1, got {options.frames}")
    device = _device(options.device)
    out_source = open_source(output, options.frames)
    ref_source = None
    try:
        ref_source = open_source(reference, options.frames) if reference is not None else None
        pairing: Pairing | None = None
        if ref_source is not None:
            pairing = check_pair(
                out_source.info, ref_source.info, resize=options.resize, crop=options.crop, align=options.align
            )
            width, height = pairing.width, pairing.height
        else:
            width, height = out_source.info.width, out_source.info.height
        if options.crop_border and min(width, height) <= 2 * options.crop_border:
            raise UsageError(f"--crop-border {options.crop_border} leaves nothing of {width}x{height} frames")
        networks, skipped = load_networks(options.weights, device)
        perceptual, perceptual_skipped = load_perceptual(
            {k: v for k, v in options.weights.items() if k in PERCEPTUAL_OPTIONS}, device
        )
        skipped.update(perceptual_skipped)
        if perceptual is not None and ref_source is not None:
            networks.append(perceptual)  # type: ignore[arg-type]  # the same push / cut protocol
        motion, motion_skipped = load_motion(options.weights.get("amt"), device, width, height)
        skipped.update(motion_skipped)
        if motion is not None:
            networks.append(motion)  # type: ignore[arg-type]  # the same push / cut protocol
        temporal = TemporalMetrics(with_reference=ref_source is not None) if options.temporal else None
        if not options.temporal:
            skipped["ewarp"] = skipped["tof"] = "optical-flow metrics switched off (--no-temporal)"
        if ref_source is None:
            for name, metric in METRICS.items():
                if metric.needs_reference and name not in skipped:
                    skipped[name] = "needs a reference (--reference)"
        detector = ContentDetector(threshold=options.scene_threshold)
        columns: dict[str, list[float]] = {"frame": []}
        cuts: list[int] = []
        total = _total(out_source, ref_source)
        done = 0
        try:
            for out, ref in paired_chunks(out_source, ref_source, pairing, chunk_frames(width, height)):
                values: dict[str, np.ndarray] = {}
                if ref is not None:
                    values.update(fidelity(out.numpy(), ref.numpy(), options.crop_border))
                if temporal is not None:
                    ref_np = ref.numpy() if ref is not None else None
                    values.update(temporal.push(np.ascontiguousarray(out.numpy()), ref_np))
                for network in networks:
                    values.update(network.push(out, ref))
                n = int(out.shape[0])
                columns["frame"].extend(range(done, done + n))
                for name, array in values.items():
                    columns.setdefault(name, [math.nan] * done).extend(float(x) for x in array)
                # A value can need the next chunk's first frame (motion smoothness of a chunk's last frame).
                for network in networks:
                    for index, name, value in getattr(network, "late_values", list)():
                        columns[name][index] = value
                done += n
                # Cuts are decided up to the detector's event buffer late: the networks then correct the values
                # of the frames they already gave (a scene's first frame is the reference of its consistency).
                for frame in ref if ref is not None else out:
                    for cut in detector.push(frame):
                        cuts.append(cut)
                        for network in networks:
                            for index, name, value in network.cut(cut):
                                columns[name][index] = value
                if progress is not None:
                    progress(done, total)
        finally:
            if temporal is not None:
                temporal.close()
        if done == 0:
            raise UsageError(f"{out_source.info.name} has no frames to evaluate")
        order = ["frame", *(name for name in METRICS if name in columns)]
        columns = {name: columns[name] for name in order}
        notes = list(pairing.notes) if pairing is not None else []
        if options.temporal:
            notes.append(FLOW_NOTE)
        if done == 1:
            notes.append("one frame: the temporal metrics need at least two")
        fps = ref_source.info.fps if ref_source is not None and ref_source.info.fps else out_source.info.fps
        return Evaluation(
            output=out_source.info.name,
            reference=ref_source.info.name if ref_source is not None else None,
            width=width,
            height=height,
            fps=float(fps) if fps else None,
            columns=columns,
            cuts=sorted(set(cuts)),
            skipped=skipped,
            notes=notes,
            settings={
                "crop_border": options.crop_border,
                "scene_threshold": options.scene_threshold,
                "resize": options.resize,
                "crop": options.crop,
                "align": options.align,
                "frames": options.frames,
            },
        )
    finally:
        out_source.close()
        if ref_source is not None:
            ref_source.close()


def _total(output: FrameSource, reference: FrameSource | None) -> int | None:
    counts = [s.info.frame_count for s in (output, reference) if s is not None]
    return None if None in counts else min(counts)  # type: ignore[type-var]
