"""Scene cuts: the OpenCV-free ContentDetector against scenedetect 0.7.2's own on real and synthetic clips."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from infvsr_core.io import VideoReader
from infvsr_core.scenes import ContentDetector, frame_score, reference_changed, rgb_to_hsv_opencv

scenedetect = pytest.importorskip("scenedetect")
cv2 = pytest.importorskip("cv2")
from scenedetect import FrameTimecode  # noqa: E402
from scenedetect.detector import FlashFilter  # noqa: E402
from scenedetect.detectors import ContentDetector as ReferenceDetector  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
if not DATA.is_dir():
    DATA = Path("/work/shared/data")
BIKES = DATA / "real_bikes_cuts_640x272.mp4"


@pytest.fixture(scope="module")
def bikes_u8() -> np.ndarray:
    """All 100 frames of the clip with cuts before frames 27 and 77, as 8-bit RGB."""
    if not BIKES.exists():
        pytest.skip("shared test clips are missing")
    with VideoReader(BIKES) as reader:
        frames = reader.read_all().frames
    return (frames * 255).round().to(torch.uint8).numpy()


def run_both(frames: list[np.ndarray], **kwargs) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """(cut, frame index at which it was reported) from this module and from scenedetect, plus equal scores."""
    mode = kwargs.pop("filter_mode", "merge")
    ours = ContentDetector(filter_mode=mode, **kwargs)
    ref = ReferenceDetector(filter_mode=getattr(FlashFilter.Mode, mode.upper()), **kwargs)
    assert ours.event_buffer_length == ref.event_buffer_length
    got, want = [], []
    for i, frame in enumerate(frames):
        got += [(cut, i) for cut in ours.push(frame)]
        timecode = FrameTimecode(i, fps=25.0)
        want += [(int(c.frame_num), i) for c in ref.process_frame(timecode, np.ascontiguousarray(frame[..., ::-1]))]
        assert ours.last_score == ref._frame_score  # bit-identical scores, so threshold ties agree
    for cut, reported in got:
        assert reported - cut <= ours.event_buffer_length
    assert ours.finish() == [] and ref.post_process(FrameTimecode(len(frames), fps=25.0)) == []
    return got, want


def test_hsv_matches_opencv_bit_for_bit() -> None:
    """OpenCV's integer BGR->HSV on a million random colours plus every colour with channels in a coarse grid
    (greys, primaries, the hue wrap-around); the exhaustive 2^24 check was done once while writing this."""
    rng = np.random.default_rng(0)
    grid = np.arange(0, 256, 15, dtype=np.uint8)
    corners = np.stack(np.meshgrid(grid, grid, grid, indexing="ij"), -1).reshape(-1, 3)
    colours = np.concatenate([rng.integers(0, 256, (1 << 20, 3), dtype=np.uint8), corners]).reshape(1, -1, 3)
    ours = rgb_to_hsv_opencv(colours)
    theirs = cv2.split(cv2.cvtColor(np.ascontiguousarray(colours[..., ::-1]), cv2.COLOR_BGR2HSV))
    for a, b in zip(ours, theirs, strict=True):
        np.testing.assert_array_equal(a, b)


def test_real_clip_cuts_at_27_and_77(bikes_u8: np.ndarray) -> None:
    got, want = run_both(list(bikes_u8))
    assert got == want
    assert [cut for cut, _ in got] == [27, 77]
    assert [reported for _, reported in got] == [27, 77]  # a cut 15+ frames after the last one is immediate


def test_real_clip_agrees_with_scenedetects_own_pipeline() -> None:
    """scenedetect decoding the file itself (OpenCV backend, its auto-downscale) finds the same two cuts."""
    scenes = scenedetect.detect(str(BIKES), ReferenceDetector())
    assert [int(start.frame_num) for start, _ in scenes[1:]] == [27, 77]


def test_float_frames_give_the_same_decisions(bikes_u8: np.ndarray) -> None:
    detector = ContentDetector()
    cuts = []
    for frame in bikes_u8[10:90]:
        cuts += detector.push(torch.from_numpy(frame).float() / 255)
    assert cuts == [17, 67]  # 27 and 77 counted from frame 10


def _synthetic(pattern: str, n: int = 90, seed: int = 0) -> list[np.ndarray]:
    """Tiny frames: 'J' jumps to a new random scene, 'f' is a one-frame flash, '.' continues with small noise,
    'g' moves a gradual fade one step."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (18, 24, 3)).astype(np.float64)
    frames, fade = [], 0.0
    target = rng.integers(0, 256, (18, 24, 3)).astype(np.float64)
    for ch in pattern[:n]:
        if ch == "J":
            base, fade = rng.integers(0, 256, (18, 24, 3)).astype(np.float64), 0.0
        if ch == "g":
            fade = min(1.0, fade + 0.04)
        image = (1 - fade) * base + fade * target + rng.normal(0, 2, base.shape)
        if ch == "f":
            image = np.full_like(base, 250.0)
        frames.append(np.clip(np.rint(image), 0, 255).astype(np.uint8))
    return frames


SYNTHETIC = {
    "cuts_every_5": ".J...." * 15,
    "cuts_14_15_16_apart": "." * 20 + "J" + "." * 13 + "J" + "." * 14 + "J" + "." * 15 + "J" + "." * 30,
    "flashes": "." * 20 + "f" + "." * 25 + "ff" + "." * 20 + "f" + "." * 3 + "f" + "." * 20,
    "gradual": "." * 10 + "g" * 40 + "." * 20,
    "early_cuts": ".J..J" + "." * 20 + "J" + "." * 8 + "J" + "." * 40,
    "merge_run": "." * 20 + "J" + "." * 20 + "J.J.J.J" + "." * 16 + "J" + "." * 30,
}


@pytest.mark.parametrize("name", sorted(SYNTHETIC))
@pytest.mark.parametrize("kwargs", [{}, {"filter_mode": "suppress"}, {"min_scene_len": 0}, {"min_scene_len": 4}])
def test_synthetic_patterns_match_scenedetect(name: str, kwargs: dict) -> None:
    pattern = SYNTHETIC[name]
    got, want = run_both(_synthetic(pattern, len(pattern)), **dict(kwargs))
    assert got == want  # same cuts, reported at the same frame


def test_default_merge_semantics_spelled_out() -> None:
    """What scenedetect's default (MERGE) does, made explicit. Cuts 5 frames apart from the start: the first ones
    fall within 15 frames of frame 0 and are dropped, and each later one is within 15 frames of the previous,
    so nothing is ever reported. After a reported cut, a run of cuts closer than 15 frames (43, 45, 47 after
    41) is merged away; the next cut is then reported only after 15 frames without one (64, at frame 79)."""
    pattern = SYNTHETIC["cuts_every_5"]
    got, _ = run_both(_synthetic(pattern, len(pattern)))
    assert got == []
    pattern = "." * 20 + "J" + "." * 20 + "J.J.J.J" + "." * 16 + "J" + "." * 30
    got, _ = run_both(_synthetic(pattern, len(pattern)))
    assert got == [(20, 20), (41, 41), (64, 79)]


@pytest.mark.parametrize("seed", range(40))
def test_random_patterns_match_scenedetect(seed: int) -> None:
    rng = np.random.default_rng(100 + seed)
    p_cut = rng.uniform(0.02, 0.35)
    pattern = "".join(rng.choice(["J", "f", "."], p=[p_cut, p_cut / 3, 1 - 4 * p_cut / 3]) for _ in range(70))
    kwargs = {} if seed % 4 else {"filter_mode": "suppress"}
    got, want = run_both(_synthetic(pattern, len(pattern), seed), **kwargs)
    assert got == want


def test_event_buffer_and_safe_count() -> None:
    detector = ContentDetector()
    assert detector.event_buffer_length == 15 and detector.safe_count == 0
    for frame in _synthetic("." * 20):
        detector.push(frame)
    assert detector.safe_count == 5
    assert ContentDetector(min_scene_len=0).event_buffer_length == 0
    assert ContentDetector(filter_mode="suppress").event_buffer_length == 0
    with pytest.raises(ValueError, match="Canny"):
        ContentDetector(weights=(1, 1, 1, 1))


def test_reference_changed(bikes_u8: np.ndarray) -> None:
    """True across a cut, false within a shot; the same answer as a fresh scenedetect detector (min length 0)."""
    pairs = [(0, 30, True), (30, 80, True), (0, 20, False), (30, 45, False), (80, 99, False), (27, 26, True)]
    for a, b, expected in pairs:
        assert reference_changed(bikes_u8[a], bikes_u8[b]) is expected
        fresh = ReferenceDetector(threshold=27.0, min_scene_len=0)
        fresh.process_frame(FrameTimecode(0, fps=25.0), np.ascontiguousarray(bikes_u8[a][..., ::-1]))
        reported = fresh.process_frame(FrameTimecode(1, fps=25.0), np.ascontiguousarray(bikes_u8[b][..., ::-1]))
        assert bool(reported) is expected
        assert (frame_score(bikes_u8[a], bikes_u8[b]) >= 27.0) is expected
    assert reference_changed(torch.from_numpy(bikes_u8[0]).float() / 255, bikes_u8[40]) is True
