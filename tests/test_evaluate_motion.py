"""VBench's motion smoothness (AMT-S) against VBench itself: the vbench 0.1.5 package's own AMT-S network and its
own MotionSmoothness.motion_score, run on real frames with the same random weights in the published checkpoint
layout; the score formula against a plain loop; the skip line, and the errors for missing, damaged or foreign
weight files.

vbench is installed without its dependencies (`pip install --no-deps vbench==0.1.5`, as .ci/run does): importing
the package runs vbench/__init__.py, which needs decord, torchvision and more. So its modules are loaded by path
under placeholder parent packages whose __init__ files are not run; what the loaded files import besides is torch,
numpy, OpenCV, tqdm, PIL and imageio (all installed here), plus `omegaconf` and `vbench.utils`, which only
MotionSmoothness.load_model and the dataset listing use: stand-ins with those names let the module import, and the
reference model is given to it directly (load_model would build the same network and load the same state dict).
"""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from infvsr_core.cli import main
from infvsr_core.errors import WeightFileError
from infvsr_core.evaluate import motion, run
from infvsr_core.evaluate.motion import AMT_FILE, MIN_SIDE, frame_score, load_amt, pad_amounts, to_8bit
from infvsr_core.evaluate.report import metric_stats
from infvsr_core.evaluate.run import EvaluateOptions, evaluate
from tests.test_evaluate import STREET, decode, save_pngs

SIZE = (153, 118)  # (width, height): padded to 160x128, the width unevenly (3 + 4): both of VBench's padding cases
FRAMES = 7  # inputs 0, 2, 4, 6; predicted and compared: 1, 3, 5
FRAME_TOLERANCE = 2e-5  # predicted frames in [0, 1]: float32, the correlation summed in another order
SCORE_TOLERANCE = 2e-5  # a prediction a hair from an 8-bit step may truncate to the next value: a few pixels


# -- VBench, loaded by path ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vbench():
    """VBench's AMT-S module and motion_smoothness module (see the module docstring for how they are loaded)."""
    spec = importlib.util.find_spec("vbench")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail("vbench 0.1.5 is the reference of these tests: pip install --no-deps vbench==0.1.5 (.ci/run does)")
    root = Path(spec.submodule_search_locations[0])
    before, path_before = set(sys.modules), list(sys.path)
    for package in ("", ".third_party", ".third_party.amt", ".third_party.amt.networks",
                    ".third_party.amt.networks.blocks", ".third_party.amt.utils"):  # fmt: skip
        module = types.ModuleType("vbench" + package)
        module.__path__ = [str(root.joinpath(*package.split(".")[1:]))]
        sys.modules[module.__name__] = module
    stand_ins = {"omegaconf": {"OmegaConf": None}, "vbench.utils": {"load_dimension_info": None}}
    for name, attributes in stand_ins.items():
        sys.modules[name] = types.ModuleType(name)
        vars(sys.modules[name]).update(attributes)

    def load(name: str, relative: str) -> types.ModuleType:
        file_spec = importlib.util.spec_from_file_location(name, root / relative)
        module = importlib.util.module_from_spec(file_spec)
        sys.modules[name] = module
        file_spec.loader.exec_module(module)
        return module

    try:
        amt = load("vbench_reference_amt_s", "third_party/amt/networks/AMT-S.py")
        scoring = load("vbench.motion_smoothness", "motion_smoothness.py")
        yield types.SimpleNamespace(Model=amt.Model, scoring=scoring)
    finally:  # only what this fixture made: other modules imported meanwhile (infvsr_core's, cv2...) stay
        for name in set(sys.modules) - before:
            if name.split(".")[0] in ("vbench", "vbench_reference_amt_s", *stand_ins):
                del sys.modules[name]
        sys.path[:] = path_before  # AMT's build_utils appends its folder


@pytest.fixture(scope="module")
def weights(vbench):
    """Random AMT-S weights (the reference's own initialisation), and the file in the published layout."""
    torch.manual_seed(0)
    reference = vbench.Model().eval()
    state = {k: v.clone() for k, v in reference.state_dict().items()}
    return types.SimpleNamespace(reference=reference, state=state)


@pytest.fixture(scope="module")
def amt_file(weights, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("amt") / AMT_FILE
    torch.save({"state_dict": weights.state}, path)  # what VBench reads: torch.load(...)["state_dict"]
    return path


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> tuple[Path, list[np.ndarray]]:
    """Real moving frames of the street clip, box-reduced, as a PNG folder (what both read) and as arrays."""
    frames = decode(STREET, FRAMES, SIZE)
    return save_pngs(tmp_path_factory.mktemp("motion") / "frames", frames), frames


def reference_predict(weights, frame0: torch.Tensor, frame1: torch.Tensor) -> torch.Tensor:
    embt = torch.tensor(0.5).float().view(1, 1, 1, 1)  # VBench's MotionSmoothness.embt
    with torch.no_grad():
        return weights.reference(frame0, frame1, embt, scale_factor=1.0, eval=True)["imgt_pred"]


@pytest.fixture(scope="module")
def pair(weights, clip) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Frames 0 and 2, padded as VBench pads them, and VBench's AMT-S prediction of frame 1."""
    frames = clip[1]
    left, right, top, bottom = pad_amounts(*frames[0].shape[:2])
    frame0, frame1 = (
        F.pad(torch.from_numpy(np.array(f)).permute(2, 0, 1)[None] / 255.0, (left, right, top, bottom), "replicate")
        for f in (frames[0], frames[2])
    )
    return frame0, frame1, reference_predict(weights, frame0, frame1)


@pytest.fixture(scope="module")
def vbench_scores(vbench, weights, clip) -> tuple[float, dict[int, float]]:
    """VBench's MotionSmoothness.motion_score of the PNG folder, and the per-frame values it averaged (each odd
    frame's get_diff, recorded as motion_score calls it)."""
    scorer = object.__new__(vbench.scoring.MotionSmoothness)  # no load_model: it needs omegaconf, and
    scorer.device, scorer.niters = "cpu", 1  # would build the same network and load the same state dict
    scorer.initialization()
    scorer.model = weights.reference
    differences = []
    get_diff = scorer.get_diff
    scorer.get_diff = lambda real, interpolated: differences.append(get_diff(real, interpolated)) or differences[-1]
    score = float(scorer.motion_score(str(clip[0])))
    return score, {2 * i + 1: (255.0 - d) / 255.0 for i, d in enumerate(differences)}


# -- the network ---------------------------------------------------------------------------------------------------


def test_interpolated_frames_match_vbenchs_amt_s(amt_file, pair):
    frame0, frame1, expected = pair
    with torch.inference_mode():
        ours = load_amt(amt_file)(frame0, frame1)
    assert ours.shape == expected.shape == (1, 3, 128, 160)
    assert float((ours - expected).abs().max()) < FRAME_TOLERANCE
    # not a trivial prediction: far from both inputs and from their average
    assert float((expected - (frame0 + frame1) / 2).abs().mean()) > 0.01
    assert float((expected - frame0).abs().mean()) > 0.01 and float((expected - frame1).abs().mean()) > 0.01


@pytest.mark.parametrize(
    "first, second",
    [  # two layers of one shape swapped: the comparison above would see it
        ("decoder1.convblock.1.conv2.0.weight", "decoder1.convblock.1.conv4.0.weight"),
        ("update4.gru.2.weight", "update4.feat_head.0.weight"),
    ],
)
def test_the_comparison_sees_swapped_layers(weights, pair, first, second):
    frame0, frame1, expected = pair
    state = dict(weights.state)
    state[first], state[second] = weights.state[second], weights.state[first]
    swapped = motion.AmtS().eval()
    swapped.load_state_dict(state, strict=True)
    with torch.inference_mode():
        assert float((swapped(frame0, frame1) - expected).abs().max()) > 50 * FRAME_TOLERANCE


def test_the_comparison_sees_a_transposed_correlation_window(amt_file, pair, monkeypatch):
    frame0, frame1, expected = pair
    build = motion._CorrelationLookup.__init__

    def transposed(self, features0, features1):
        build(self, features0, features1)
        self.dx, self.dy = self.dy, self.dx

    monkeypatch.setattr(motion._CorrelationLookup, "__init__", transposed)
    with torch.inference_mode():
        assert float((load_amt(amt_file)(frame0, frame1) - expected).abs().max()) > 50 * FRAME_TOLERANCE


# -- the score -----------------------------------------------------------------------------------------------------


def test_score_matches_vbench_motion_score_per_frame_and_in_the_report(vbench_scores, amt_file, clip, tmp_path,
                                                                       capsys):  # fmt: skip
    vbench_score, expected = vbench_scores
    assert sorted(expected) == [1, 3, 5]
    assert np.mean(list(expected.values())) == pytest.approx(vbench_score, abs=1e-12)  # VBench's mean, per frame

    report = tmp_path / "report"
    code = main(["evaluate", str(clip[0]), "--amt", str(amt_file), "--no-temporal", "--scene-threshold", "255",
                 "--device", "cpu", "--report", str(report), "--quiet"])  # fmt: skip
    assert code == 0
    assert "motion smoothness" in capsys.readouterr().out
    with open(report / "frames.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == FRAMES
    for row in rows:
        frame = int(row["frame"])
        if frame in expected:
            assert float(row["motion_smoothness"]) == pytest.approx(expected[frame], abs=SCORE_TOLERANCE)
        else:
            assert row["motion_smoothness"] == ""  # even frames are the inputs; the last odd one has no next
    stats = json.loads((report / "summary.json").read_text())["metrics"]["motion_smoothness"]
    assert stats["frames"] == 3 and stats["better"] == "higher"
    assert stats["mean"] == pytest.approx(vbench_score, abs=SCORE_TOLERANCE)
    assert 0.5 < vbench_score < 1.0  # a real score, not a degenerate 0 or 1
    assert (report / "plot.png").stat().st_size > 0


@pytest.mark.parametrize("chunk", [2, 3])
def test_streamed_values_do_not_depend_on_the_chunks(vbench_scores, amt_file, clip, monkeypatch, chunk):
    """Chunks of 2: every value needs the next chunk's first frame; of 3: some do, some do not."""
    frames = torch.from_numpy(np.stack(clip[1]).astype(np.float32) / 255)
    monkeypatch.setattr(run, "chunk_frames", lambda width, height: chunk)
    options = EvaluateOptions(temporal=False, scene_threshold=255.0, device="cpu", weights={"amt": amt_file})
    column = evaluate(frames, None, options).columns["motion_smoothness"]
    expected = vbench_scores[1]
    assert [math.isnan(v) for v in column] == [i not in expected for i in range(FRAMES)]
    assert [column[i] for i in sorted(expected)] == pytest.approx([expected[i] for i in sorted(expected)],
                                                                  abs=SCORE_TOLERANCE)  # fmt: skip


def test_score_formula_is_a_plain_loop():
    rng = np.random.default_rng(1)
    predicted, actual = (rng.integers(0, 256, (5, 7, 3), dtype=np.uint8) for _ in range(2))
    total = 0
    for y in range(5):
        for x in range(7):
            for c in range(3):
                total += abs(int(predicted[y, x, c]) - int(actual[y, x, c]))
    expected = (255 - total / (5 * 7 * 3)) / 255
    assert frame_score(torch.from_numpy(predicted), torch.from_numpy(actual)) == pytest.approx(expected, abs=1e-15)
    assert frame_score(torch.from_numpy(actual), torch.from_numpy(actual)) == 1.0
    levels = torch.arange(256, dtype=torch.float32) / 255  # 8-bit footage, as the readers deliver it
    assert torch.equal(to_8bit(levels.view(1, 16, 16, 1).expand(1, 16, 16, 3)).flatten()[::3], torch.arange(256))


def test_padding_is_vbenchs_input_padder(vbench):
    for height, width in ((118, 153), (128, 160), (113, 129), (721, 1279)):
        padder = vbench.scoring.InputPadder((1, 3, height, width), 16)
        assert list(pad_amounts(height, width)) == padder._pad


def test_values_across_a_cut_stay_in_the_csv_but_not_in_the_summary():
    values = [math.nan, 0.9, math.nan, 0.1, math.nan, 0.8, math.nan, 0.7]
    stats = metric_stats("motion_smoothness", values, cuts=[4])  # frame 3 is predicted from frames 2 and 4
    assert stats["frames"] == 3 and stats["min"] == pytest.approx(0.7)
    stats = metric_stats("motion_smoothness", values, cuts=[5])  # frame 5 is predicted from frames 4 and 6
    assert stats["frames"] == 3 and stats["max"] == pytest.approx(0.9) and stats["mean"] == pytest.approx(1.7 / 3)
    assert metric_stats("motion_smoothness", values, cuts=[])["frames"] == 4


# -- skipped, refused ----------------------------------------------------------------------------------------------


def test_without_the_file_the_metric_is_skipped_with_one_line():
    frames = torch.rand(3, 120, 120, 3, generator=torch.Generator().manual_seed(0))
    result = evaluate(frames, None, EvaluateOptions(temporal=False, device="cpu"))
    assert "motion_smoothness" not in result.columns
    assert "--amt" in result.skipped["motion_smoothness"] and AMT_FILE in result.skipped["motion_smoothness"]


def test_frames_too_small_for_amt_s_are_skipped(amt_file):
    frames = torch.rand(3, MIN_SIDE - 1, 200, 3, generator=torch.Generator().manual_seed(0))
    result = evaluate(frames, None, EvaluateOptions(temporal=False, device="cpu", weights={"amt": amt_file}))
    assert "motion_smoothness" not in result.columns
    assert f"{MIN_SIDE} pixels" in result.skipped["motion_smoothness"]


def test_a_flat_state_dict_and_safetensors_load_the_same(weights, tmp_path):
    from safetensors.torch import save_file

    torch.save(weights.state, tmp_path / "flat.pth")
    save_file({k: v.contiguous() for k, v in weights.state.items()}, str(tmp_path / "amt.safetensors"))
    for path in (tmp_path / "flat.pth", tmp_path / "amt.safetensors"):
        loaded = load_amt(path).state_dict()
        assert all(torch.equal(loaded[k], v) for k, v in weights.state.items())


def test_wrong_missing_and_damaged_files_are_one_clear_error(weights, amt_file, tmp_path):
    def fails(pattern: str, path: Path) -> None:
        with pytest.raises(WeightFileError, match=pattern):
            evaluate(torch.zeros(3, 128, 128, 3), None, EvaluateOptions(temporal=False, weights={"amt": path}))

    missing = tmp_path / "nowhere.pth"
    fails(r"--amt .*nowhere\.pth: no such file \(give VBench's AMT-S checkpoint, amt-s\.pth\)", missing)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(amt_file.read_bytes()[:20000])
    fails(r"--amt .*truncated\.pth: not a readable weight file .*expected VBench's AMT-S checkpoint", truncated)
    renamed = tmp_path / "renamed.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in weights.state.items()}}, renamed)
    fails(r"--amt .*renamed\.pth is not AMT-S in the key layout .*: missing comb_block.*unexpected module\.", renamed)
    reshaped = tmp_path / "reshaped.pth"
    torch.save({"state_dict": {**weights.state, "comb_block.0.weight": torch.zeros(18, 9, 5, 5)}}, reshaped)
    fails(r"wrong shape comb_block\.0\.weight \(18, 9, 5, 5\) \(expected \(18, 9, 3, 3\)\)", reshaped)
    foreign = tmp_path / "list.pth"
    torch.save([torch.zeros(3)], foreign)
    fails(r"--amt .*list\.pth: expected AMT-S's state dict .*found list", foreign)
