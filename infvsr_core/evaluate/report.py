"""What an evaluation leaves: a JSON summary, a per-frame CSV and a PNG plot over time, each written under a
temporary name and renamed into place, so a report file is either complete or absent.

Infinite values (the PSNR of a frame identical to its reference) keep JSON valid: a JSON number cannot be infinite,
so the summary writes the string "Infinity" (which Python's float() and JavaScript's Number() both read back), and
the CSV writes "inf". A missing value (E*warp of a video's first frame, a metric skipped) is null in JSON and an
empty cell in the CSV. Temporal and consistency values of a scene's first frame compare it with the previous
shot: they stay in the CSV but are left out of the summary's statistics; so does the motion smoothness of the
frame just before a cut (interpolated from a frame of the next shot).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import UsageError
from .metrics import METRICS
from .run import Evaluation

SUMMARY_NAME = "summary.json"
FRAMES_NAME = "frames.csv"
PLOT_NAME = "plot.png"
INFINITY = "Infinity"
WORST_FRAMES = 5


@dataclass
class ReportFiles:
    summary: Path
    frames: Path
    plot: Path


def json_number(value: float) -> float | str | None:
    """A float as JSON can hold it: finite as is, infinite as "Infinity" / "-Infinity", NaN as null."""
    if math.isnan(value):
        return None
    if math.isinf(value):
        return INFINITY if value > 0 else "-" + INFINITY
    return value


def _excluded(name: str, cuts: list[int]) -> set[int]:
    """Frames whose value of `name` spans a cut (a scene's first frame): kept per frame, not summarised."""
    kind = METRICS[name].kind
    if kind == "interpolation":  # frame t from t - 1 and t + 1: a cut at t or at t + 1 separates them
        return set(cuts) | {cut - 1 for cut in cuts}
    return set(cuts) if kind in ("temporal", "semantic") else set()


def metric_stats(name: str, values: list[float], cuts: list[int]) -> dict[str, Any]:
    """Mean, min, max and the worst frames of one column (its undefined and cut-spanning frames left out)."""
    metric = METRICS[name]
    skip = _excluded(name, cuts)
    frames = [(i, v) for i, v in enumerate(values) if not math.isnan(v) and i not in skip]
    stats: dict[str, Any] = {
        "label": metric.label,
        "unit": metric.unit,
        "better": "higher" if metric.higher_is_better else "lower",
        "definition": metric.definition,
        "frames": len(frames),
    }
    if not frames:
        stats.update(mean=None, min=None, max=None, worst_frames=[], infinite_frames=0)
        return stats
    array = np.array([v for _, v in frames], dtype=np.float64)
    worst = sorted(frames, key=lambda item: item[1], reverse=not metric.higher_is_better)[:WORST_FRAMES]
    with np.errstate(invalid="ignore"):
        mean = float(array.mean())
    stats.update(
        mean=json_number(mean),
        min=json_number(float(array.min())),
        max=json_number(float(array.max())),
        worst_frames=[{"frame": i, "value": json_number(v)} for i, v in worst],
        infinite_frames=int(np.isinf(array).sum()),
    )
    return stats


def summarize(evaluation: Evaluation) -> dict[str, Any]:
    """The JSON summary of an evaluation (only finite numbers, "Infinity" strings and nulls)."""
    return {
        "output": evaluation.output,
        "reference": evaluation.reference,
        "frames": evaluation.frames,
        "width": evaluation.width,
        "height": evaluation.height,
        "fps": evaluation.fps,
        "scene_cuts": evaluation.cuts,
        "metrics": {name: metric_stats(name, evaluation.columns[name], evaluation.cuts) for name in evaluation.metrics},
        "skipped": evaluation.skipped,
        "notes": evaluation.notes,
        "settings": evaluation.settings,
        "representation": 'an infinite value is the string "Infinity"; a missing one is null',
    }


def summary_json(summary: dict[str, Any]) -> str:
    return json.dumps(summary, indent=2, allow_nan=False) + "\n"


def _fmt(value: float | str | None, unit: str) -> str:
    if value is None:
        return "-"
    if isinstance(value, str):
        return "inf" if value == INFINITY else value
    text = f"{value:.4f}"
    if unit.startswith("x"):
        return f"{text} ({unit})"
    return f"{text} {unit}" if unit else text


def summary_text(summary: dict[str, Any]) -> str:
    """The summary as a few lines for a terminal or a ComfyUI text box."""
    against = f" vs {summary['reference']}" if summary["reference"] else " (no reference)"
    cuts = len(summary["scene_cuts"])
    lines = [
        f"{summary['output']}{against}: {summary['frames']} frames, {summary['width']}x{summary['height']}, "
        f"{cuts} scene cut{'s' if cuts != 1 else ''}"
    ]
    width = max((len(s["label"]) for s in summary["metrics"].values()), default=0)
    for stats in summary["metrics"].values():
        if stats["mean"] is None:
            lines.append(f"  {stats['label']:<{width}}  no value")
            continue
        worst = stats["worst_frames"][0]
        lines.append(
            f"  {stats['label']:<{width}}  mean {_fmt(stats['mean'], stats['unit'])}   worst "
            f"{_fmt(worst['value'], stats['unit'])} at frame {worst['frame']}   ({stats['better']} is better)"
        )
    for name, why in summary["skipped"].items():
        lines.append(f"  skipped {name}: {why}")
    for note in summary["notes"]:
        lines.append(f"  note: {note}")
    return "\n".join(lines)


def frames_csv(evaluation: Evaluation) -> str:
    """One row per frame: index, scene-cut flag, then every metric ("inf" infinite, empty when undefined)."""
    cuts = set(evaluation.cuts)
    names = evaluation.metrics
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["frame", "scene_cut", *names])
    for row, frame in enumerate(evaluation.columns["frame"]):
        cells = []
        for name in names:
            value = evaluation.columns[name][row]
            cells.append("" if math.isnan(value) else ("inf" if math.isinf(value) else f"{value:.8g}"))
        writer.writerow([int(frame), int(frame in cuts), *cells])
    return buffer.getvalue()


def plot_figure(evaluation: Evaluation, summary: dict[str, Any] | None = None):
    """Each metric over time, one panel per metric, scene cuts as dashed lines, the mean as a dotted line (temporal
    values across a cut are not drawn, as they are not summarised)."""
    import matplotlib

    matplotlib.use("Agg")  # files only: never a window, never a display
    from matplotlib.figure import Figure

    summary = summary or summarize(evaluation)
    names = evaluation.metrics
    figure = Figure(figsize=(11, 1.2 + 1.9 * max(1, len(names))), dpi=100, layout="constrained")
    axes = figure.subplots(max(1, len(names)), 1, sharex=True, squeeze=False)[:, 0]
    frames = np.asarray(evaluation.columns["frame"], dtype=np.float64)
    for ax, name in zip(axes, names, strict=False):
        metric = METRICS[name]
        values = np.asarray(evaluation.columns[name], dtype=np.float64)
        infinite = np.isinf(values)
        shown = np.where(infinite, np.nan, values)
        spanning = [i for i in _excluded(name, evaluation.cuts) if i < len(shown)]
        shown[spanning] = np.nan  # a pair across a cut compares two shots: its spike would flatten the rest
        drawn = ~np.isnan(values) if metric.kind == "interpolation" else slice(None)  # odd frames only: joined
        ax.plot(frames[drawn], shown[drawn], lw=0.9, color="tab:blue", marker="." if len(frames) <= 200 else None, ms=3)
        mean = summary["metrics"][name]["mean"]
        if isinstance(mean, float):
            ax.axhline(mean, color="tab:gray", lw=0.8, ls=":")
        for cut in evaluation.cuts:
            ax.axvline(cut, color="tab:red", lw=0.8, ls="--")
        unit = f" ({metric.unit})" if metric.unit else ""
        arrow = "higher is better" if metric.higher_is_better else "lower is better"
        title = f"{metric.label}{unit}: {arrow}"
        if infinite.any():
            title += f"; {int(infinite.sum())} identical frame(s) (inf) not drawn"
        ax.set_title(title, fontsize=9, loc="left")
        ax.grid(True, alpha=0.3)
        ax.tick_params(labelsize=8)
    axes[-1].set_xlabel("frame" + ("  (dashed red: scene cuts)" if evaluation.cuts else ""), fontsize=9)
    if not names:
        axes[0].text(0.5, 0.5, "no metric computed", ha="center", va="center", transform=axes[0].transAxes)
    against = f" vs {Path(evaluation.reference).name}" if evaluation.reference else ""
    figure.suptitle(f"{Path(evaluation.output).name}{against}", fontsize=10)
    return figure


def plot_png(evaluation: Evaluation, summary: dict[str, Any] | None = None) -> bytes:
    buffer = io.BytesIO()
    plot_figure(evaluation, summary).savefig(buffer, format="png")
    return buffer.getvalue()


def plot_rgb(evaluation: Evaluation, summary: dict[str, Any] | None = None) -> np.ndarray:
    """The plot as an (H, W, 3) uint8 array (the ComfyUI node's IMAGE)."""
    figure = plot_figure(evaluation, summary)
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def atomic_write(path: Path, write: Callable[[Any], None], binary: bool) -> None:
    """Write into a hidden temporary beside `path`, then rename: a report file is complete or absent."""
    fd, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    try:
        with os.fdopen(fd, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8", "newline": ""})) as f:
            write(f)
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def check_report_folder(folder: Path, overwrite: bool) -> None:
    """Before a long evaluation: the report folder can be made, and holds no report unless we may replace it."""
    existing = [folder / n for n in (SUMMARY_NAME, FRAMES_NAME, PLOT_NAME) if (folder / n).exists()]
    if existing and not overwrite:
        raise UsageError(f"a report already exists in {folder}: choose another --report folder or pass --overwrite")
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"report folder {folder} is a file: choose another --report folder")
    if not folder.parent.exists():
        raise UsageError(f"the folder {folder.parent} for the report does not exist: create it first")


def write_report(evaluation: Evaluation, folder: Path) -> ReportFiles:
    """summary.json, frames.csv and plot.png in `folder` (created), each complete or absent."""
    folder.mkdir(parents=True, exist_ok=True)
    summary = summarize(evaluation)
    files = ReportFiles(folder / SUMMARY_NAME, folder / FRAMES_NAME, folder / PLOT_NAME)
    png = plot_png(evaluation, summary)
    atomic_write(files.frames, lambda f: f.write(frames_csv(evaluation)), binary=False)
    atomic_write(files.plot, lambda f: f.write(png), binary=True)
    atomic_write(files.summary, lambda f: f.write(summary_json(summary)), binary=False)
    return files
