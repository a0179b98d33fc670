"""`python -m infvsr_core evaluate` end to end: the report files and their agreement, --make-lr against PIL's
antialiased bicubic, --suite over a folder, and the one-line errors for inputs that cannot be compared."""

from __future__ import annotations

import csv
import json
import math
import re
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from infvsr_core.cli import main
from infvsr_core.io import VideoReader, VideoWriter
from tests.io_media import BIKES
from tests.test_evaluate import decode, save_pngs

ROOT = Path(__file__).resolve().parents[1]


def write_video(path: Path, frames: torch.Tensor, fps: float = 25, codec: str = "ffv1") -> Path:
    with VideoWriter(path, Fraction(fps).limit_denominator(1001), codec=codec) as writer:
        writer.write(frames)
    return path


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> dict[str, Path]:
    """30 real frames at 160x68 with a hard cut at frame 17 (clip frames 10-39 of the bikes cut clip, whose cut is
    at clip frame 27), as a lossless reference and as a noisier, re-encoded "output"."""
    folder = tmp_path_factory.mktemp("eval_clips")
    frames = torch.from_numpy(np.stack(decode(BIKES, 40, (160, 68))[10:]).astype(np.float32) / 255)
    noisy = (frames + 0.02 * torch.randn(frames.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    return {
        "reference": write_video(folder / "reference.mkv", frames),
        "output": write_video(folder / "output.mkv", noisy),
        "short": write_video(folder / "short.mkv", noisy[:20]),
        "fps30": write_video(folder / "fps30.mkv", noisy, fps=30),
        "big": write_video(folder / "big.mkv", torch.nn.functional.interpolate(
            noisy.permute(0, 3, 1, 2), size=(72, 164)).permute(0, 2, 3, 1)),
    }


def run(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["evaluate", *map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_report_files_exist_and_agree(clips, tmp_path, capsys):
    report = tmp_path / "report"
    code, out, _ = run(capsys, clips["output"], "--reference", clips["reference"], "--report", report, "--quiet")
    assert code == 0
    summary = json.loads((report / "summary.json").read_text())
    rows = read_csv(report / "frames.csv")
    assert len(rows) == summary["frames"] == 30
    assert summary["scene_cuts"] == [17] and [r["frame"] for r in rows if r["scene_cut"] == "1"] == ["17"]
    for name in ("psnr", "psnr_y", "ssim", "ewarp", "tof"):
        stats = summary["metrics"][name]
        temporal = name in ("ewarp", "tof")
        values = [float(r[name]) for r in rows if r[name] and not (temporal and r["scene_cut"] == "1")]
        assert stats["frames"] == len(values) == (28 if temporal else 30)  # no value for frame 0; 17 is a cut
        assert stats["mean"] == pytest.approx(np.mean(values), rel=1e-6)
        worst = min(values) if stats["better"] == "higher" else max(values)
        assert stats["worst_frames"][0]["value"] == pytest.approx(worst, rel=1e-6)
        assert float(rows[stats["worst_frames"][0]["frame"]][name]) == pytest.approx(worst, rel=1e-6)
    assert 30 < summary["metrics"]["psnr"]["mean"] < 40  # noise of 0.02: about 34 dB
    assert "PSNR (RGB)" in out and "not comparable with the paper" in out
    with Image.open(report / "plot.png") as plot:
        assert plot.format == "PNG" and plot.size[0] > 500
    assert not list(report.glob(".*partial*"))
    code, _, err = run(capsys, clips["output"], "--reference", clips["reference"], "--report", report)
    assert code == 1 and "already exists" in err and "--overwrite" in err


def test_default_report_folder_is_beside_the_output(clips, tmp_path, capsys):
    output = tmp_path / "film_x4.mkv"
    output.write_bytes(clips["output"].read_bytes())
    code, _, _ = run(capsys, output, "--reference", clips["reference"], "--no-temporal", "--quiet", "--frames", "3")
    assert code == 0
    assert json.loads((tmp_path / "film_x4.mkv.eval" / "summary.json").read_text())["frames"] == 3


@pytest.mark.parametrize(
    ("which", "fix", "message"),
    [
        ("short", "--align", "frame counts differ: .*short.mkv (has|ends after) 20 frames"),
        ("fps30", "--align", "frame rates differ: output .*fps30.mkv is 30.000 fps, reference .* 25.000 fps"),
        ("big", "--crop", "frame sizes differ: output .*big.mkv is 164x72, reference .* 160x68"),
    ],
)
def test_mismatched_inputs_are_one_line_errors_unless_told(clips, tmp_path, capsys, which, fix, message):
    code, _, err = run(capsys, clips[which], "--reference", clips["reference"], "--report", tmp_path / "r")
    errors = [line for line in err.splitlines() if "error" in line]  # a progress bar may come first (mkv has no
    assert code == 1 and len(errors) == 1 and errors[0].startswith("error: ")  # frame count: found at its end)
    assert re.search(message, errors[0]) and fix in errors[0]
    code, _, _ = run(capsys, clips[which], "--reference", clips["reference"], "--report", tmp_path / "r", fix,
                     "--no-temporal", "--quiet")
    assert code == 0


def test_empty_and_corrupt_files_are_one_line_errors(clips, tmp_path, capsys):
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(clips["output"].read_bytes()[:300])
    garbage = tmp_path / "garbage.mkv"
    garbage.write_bytes(np.random.default_rng(0).bytes(5000))
    for bad, words in ((empty, "empty"), (corrupt, "corrupt"), (garbage, "not a video")):
        code, _, err = run(capsys, bad, "--reference", clips["reference"], "--report", tmp_path / "r")
        assert code == 1 and len(err.strip().splitlines()) == 1 and words in err and str(bad) in err, err
        code, _, err = run(capsys, clips["output"], "--reference", bad, "--report", tmp_path / "r")
        assert code == 1 and words in err, err
    code, _, err = run(capsys, tmp_path / "missing.mp4", "--reference", clips["reference"])
    assert code == 1 and "not found" in err


def test_one_frame_clip_has_fidelity_but_no_temporal_values(clips, tmp_path, capsys):
    code, _, _ = run(capsys, clips["output"], "--reference", clips["reference"], "--frames", "1",
                     "--report", tmp_path / "r", "--quiet")
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert code == 0 and summary["frames"] == 1
    assert summary["metrics"]["ewarp"]["mean"] is None and summary["metrics"]["psnr"]["frames"] == 1
    assert any("at least two" in note for note in summary["notes"])


# -- --make-lr ---------------------------------------------------------------------------------------------------


def test_make_lr_is_pil_antialiased_bicubic(tmp_path, capsys):
    hr = decode(BIKES, 3)
    hr_dir = save_pngs(tmp_path / "hr", [np.pad(f, ((0, 3), (0, 3), (0, 0)), mode="edge") for f in hr])  # 643x275
    lr_dir = tmp_path / "lr"
    code, out, _ = run(capsys, hr_dir, "--make-lr", lr_dir, "--quiet")
    assert code == 0 and "160x68" in out and "--crop" in out  # 643 is no multiple of 4: cut to 640 first
    lr = sorted(lr_dir.glob("*.png"))
    assert len(lr) == 3
    for frame, path in zip(hr, lr, strict=True):
        expected = np.asarray(Image.fromarray(frame[:, :640]).resize((160, 68), Image.BICUBIC), np.int16)
        made = np.asarray(Image.open(path).convert("RGB"), np.int16)
        difference = np.abs(made - expected)
        assert difference.max() <= 2 and difference.mean() < 0.3  # PIL rounds to 8 bits between its two passes
    code, _, err = run(capsys, hr_dir, "--make-lr", lr_dir)
    assert code == 1 and "already exists" in err


def test_make_lr_interrupted_leaves_nothing(tmp_path, monkeypatch, capsys):
    from infvsr_core.evaluate import degrade

    calls = 0
    real = degrade.downscale

    def stop_on_second(frames, scale):
        nonlocal calls
        calls += 1
        if calls == 2:
            raise KeyboardInterrupt
        return real(frames, scale)

    monkeypatch.setattr(degrade, "downscale", stop_on_second)
    hr = save_pngs(tmp_path / "hr", decode(BIKES, 10, (320, 136)))
    code, _, err = run(capsys, hr, "--make-lr", tmp_path / "lr.mkv", "--quiet")
    assert code == 130 and "interrupted" in err
    assert list(tmp_path.iterdir()) == [hr]


# -- --suite -----------------------------------------------------------------------------------------------------


def test_suite_evaluates_every_pair_into_one_table(clips, tmp_path, capsys):
    root = tmp_path / "set"
    (root / "GT").mkdir(parents=True)
    (root / "output").mkdir()
    frames = decode(BIKES, 4, (160, 68))
    save_pngs(root / "GT" / "walk", frames)
    save_pngs(root / "output" / "walk", [np.clip(f.astype(int) + 3, 0, 255).astype(np.uint8) for f in frames])
    (root / "GT" / "street.mkv").write_bytes(clips["reference"].read_bytes())
    (root / "output" / "street.mp4").write_bytes(clips["output"].read_bytes())  # any extension: matched by name
    save_pngs(root / "GT" / "lost", frames)  # no result: a row that says so, the others still run

    code, out, _ = run(capsys, "--suite", root, "--quiet", "--no-temporal")
    assert code == 1  # one clip failed
    table = read_csv(root / "output.eval" / "suite.csv")
    assert [r["clip"] for r in table] == ["lost", "street", "walk", "mean"]
    assert "no result" in table[0]["error"]
    for row in table[1:3]:
        summary = json.loads((root / "output.eval" / row["clip"] / "summary.json").read_text())
        assert float(row["psnr"]) == pytest.approx(summary["metrics"]["psnr"]["mean"], rel=1e-5)
        assert int(row["frames"]) == summary["frames"]
    assert float(table[3]["psnr"]) == pytest.approx((float(table[1]["psnr"]) + float(table[2]["psnr"])) / 2, rel=1e-5)
    assert float(table[2]["psnr"]) == pytest.approx(20 * math.log10(255 / 3), abs=0.05)  # +3 levels, little clipping
    assert "walk" in out and "mean" in out and "lost: no result" in out


def test_suite_without_ground_truth_measures_outputs_alone(clips, tmp_path, capsys):
    root = tmp_path / "movielq"
    (root / "output").mkdir(parents=True)
    (root / "output" / "film.mkv").write_bytes(clips["output"].read_bytes())
    code, _, _ = run(capsys, "--suite", root, "--quiet")
    table = read_csv(root / "output.eval" / "suite.csv")
    assert code == 0 and table[0]["clip"] == "film" and float(table[0]["ewarp"]) > 0 and "psnr" not in table[0]


# -- the command line itself ---------------------------------------------------------------------------------


def test_help_imports_nothing_heavy():
    code = (
        "import sys\nfrom infvsr_core.cli import build_parser\n"
        "text = build_parser()._subparsers._group_actions[0].choices['evaluate'].format_help()\n"
        "assert 'bicubic' in text and 'antialiased' in text and '--suite' in text\n"
        "heavy = [m for m in ('torch', 'cv2', 'matplotlib', 'skimage', 'numpy') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def test_conflicting_options_are_refused(clips, capsys):
    code, _, err = run(capsys, clips["output"], "--make-lr", "x.mkv", "--reference", clips["reference"])
    assert code == 1 and "--make-lr" in err
    code, _, err = run(capsys)
    assert code == 1 and "--suite" in err
    with pytest.raises(SystemExit):
        main(["evaluate", str(clips["output"]), "--resize", "--crop"])
    capsys.readouterr()


def test_reader_sees_the_lr_file_as_written(tmp_path, capsys):
    """--make-lr into .mkv is lossless FFV1: decoding it gives PIL's reduction as closely as PNG frames do."""
    hr = save_pngs(tmp_path / "hr", decode(BIKES, 2))
    code, _, _ = run(capsys, hr, "--make-lr", tmp_path / "lr.mkv", "--quiet")
    with VideoReader(tmp_path / "lr.mkv") as reader:
        frames = reader.read_all().frames
    assert code == 0 and tuple(frames.shape) == (2, 68, 160, 3)
