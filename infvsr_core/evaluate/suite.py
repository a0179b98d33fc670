"""`--suite DIR`: every (output, ground truth) pair of a test set, one table.

The layout is the one the public VSR test sets are distributed in (BasicSR's: Vid4, REDS4, UDM10, SPMCS):

    DIR/GT/<clip>          the high-resolution reference: a folder of numbered frames, or a video file
    DIR/output/<clip>      the upscaled result of the same name (folder, or video file of any extension)
    DIR/LQ/<clip>          (optional) the low-resolution inputs; evaluation does not read them

`HR/` is accepted in place of `GT/`, and `--outputs NAME` reads another results folder (one per method or
setting compared). A clip is matched by name, without extension. Sets without ground truth (the paper's
MovieLQ, VideoLQ) have no `GT/`: each result in the outputs folder is then measured alone (the no-reference
metrics). A pair that fails (missing output, different sizes) is a row saying why; the others still run.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import InfVSRError, UsageError
from .metrics import METRICS
from .report import atomic_write, summarize, write_report
from .run import EvaluateOptions, Evaluation, evaluate

REFERENCE_FOLDERS = ("GT", "HR")
DEFAULT_OUTPUTS = "output"
SUITE_CSV = "suite.csv"
_VIDEO_SUFFIXES = {".mp4", ".mov", ".mkv", ".webm", ".avi", ".m4v", ".mpg", ".mpeg", ".ts", ".mxf", ".y4m", ".gif"}


@dataclass
class SuiteRow:
    name: str
    frames: int = 0
    means: dict[str, float] = field(default_factory=dict)
    error: str | None = None


@dataclass
class SuiteResult:
    rows: list[SuiteRow]
    metrics: list[str]
    report: Path

    @property
    def failed(self) -> list[SuiteRow]:
        return [row for row in self.rows if row.error is not None]


def _entries(folder: Path) -> dict[str, Path]:
    """Clips of a folder by name: sub-folders (frames) and video files, hidden and partial files left out."""
    found: dict[str, Path] = {}
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith(".") or ".partial" in entry.name:
            continue
        if entry.is_dir() or entry.suffix.lower() in _VIDEO_SUFFIXES:
            name = entry.name if entry.is_dir() else entry.stem
            if name in found:
                raise UsageError(f"{folder} holds two clips named {name!r} ({found[name].name}, {entry.name})")
            found[name] = entry
    return found


def find_pairs(folder: Path, outputs: str = DEFAULT_OUTPUTS) -> tuple[list[tuple[str, Path | None, Path | None]], bool]:
    """(name, output, reference) of every clip, and whether the set has ground truth."""
    if not folder.is_dir():
        raise UsageError(f"--suite {folder}: no such folder")
    results = folder / outputs
    if not results.is_dir():
        raise UsageError(
            f"--suite {folder}: no {outputs}/ folder of results (the layout: {folder}/GT/<clip>, "
            f"{folder}/{outputs}/<clip>; --outputs NAME names another results folder)"
        )
    truth = next((folder / n for n in REFERENCE_FOLDERS if (folder / n).is_dir()), None)
    produced = _entries(results)
    if truth is None:
        if not produced:
            raise UsageError(f"--suite {folder}: {results} holds no clips")
        return [(name, path, None) for name, path in produced.items()], False
    references = _entries(truth)
    if not references:
        raise UsageError(f"--suite {folder}: {truth} holds no clips")
    pairs = [(name, produced.get(name), path) for name, path in references.items()]
    pairs += [(name, path, None) for name, path in produced.items() if name not in references]
    return pairs, True


def run_suite(
    folder: Path,
    report: Path,
    options: EvaluateOptions,
    *,
    outputs: str = DEFAULT_OUTPUTS,
    on_pair: Callable[[str, Evaluation | None, str | None], None] | None = None,
    progress: Callable[[int, int | None], None] | None = None,
) -> SuiteResult:
    """Evaluate every pair; each pair's report goes to report/<clip>/, the table to report/suite.csv."""
    pairs, has_truth = find_pairs(folder, outputs)
    rows: list[SuiteRow] = []
    names: list[str] = []
    for name, output, reference in pairs:
        row = SuiteRow(name)
        if output is None:
            row.error = f"no result in {folder / outputs} for this clip"
        elif reference is None and has_truth:
            row.error = f"no ground truth for this result in {folder}/GT"
        else:
            try:
                evaluation = evaluate(output, reference, options, progress)
            except InfVSRError as e:
                row.error = str(e)
            else:
                write_report(evaluation, report / name)
                summary = summarize(evaluation)
                row.frames = evaluation.frames
                for metric, stats in summary["metrics"].items():
                    mean = stats["mean"]
                    row.means[metric] = math.inf if mean == "Infinity" else (math.nan if mean is None else mean)
                    if metric not in names:
                        names.append(metric)
                if on_pair is not None:
                    on_pair(name, evaluation, None)
        if row.error is not None and on_pair is not None:
            on_pair(name, None, row.error)
        rows.append(row)
    metrics = [m for m in METRICS if m in names]
    result = SuiteResult(rows, metrics, report)
    report.mkdir(parents=True, exist_ok=True)
    atomic_write(report / SUITE_CSV, lambda f: f.write(suite_csv(result)), binary=False)
    return result


def _mean(values: list[float]) -> float:
    values = [v for v in values if not math.isnan(v)]
    return sum(values) / len(values) if values else math.nan


def _cell(value: float) -> str:
    if math.isnan(value):
        return ""
    return "inf" if math.isinf(value) else f"{value:.6g}"


def suite_csv(result: SuiteResult) -> str:
    """clip, frames, the mean of each metric, error; a last row "mean" averages the clips (each clip counts once)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["clip", "frames", *result.metrics, "error"])
    for row in result.rows:
        writer.writerow(
            [row.name, row.frames, *(_cell(row.means.get(m, math.nan)) for m in result.metrics), row.error or ""]
        )
    good = [row for row in result.rows if row.error is None]
    writer.writerow(
        [
            "mean",
            sum(r.frames for r in good),
            *(_cell(_mean([r.means.get(m, math.nan) for r in good])) for m in result.metrics),
            "",
        ]
    )
    return buffer.getvalue()


def suite_table(result: SuiteResult) -> str:
    """The table for a terminal: one row per clip, then the mean over clips."""
    headers = ["clip", "frames", *(f"{METRICS[m].label}" for m in result.metrics)]
    lines = []
    good = [row for row in result.rows if row.error is None]
    for row in result.rows:
        if row.error is not None:
            lines.append([row.name, "-", *(["-"] * len(result.metrics))])
        else:
            lines.append(
                [row.name, str(row.frames), *(_cell(row.means.get(m, math.nan)) or "-" for m in result.metrics)]
            )
    lines.append(
        [
            "mean",
            str(sum(r.frames for r in good)),
            *(_cell(_mean([r.means.get(m, math.nan) for r in good])) or "-" for m in result.metrics),
        ]
    )
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(headers)]
    text = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))]
    text += ["  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)) for line in lines]
    text += [f"{row.name}: {row.error}" for row in result.rows if row.error is not None]
    return "\n".join(text)
