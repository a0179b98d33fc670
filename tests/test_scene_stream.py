"""Scene-aware streaming over a session: cuts, reference refresh, batching independence."""

import av
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from infvsr_core.scene_stream import SceneStream
from tests.conftest import DATA, make_clip


def run(stream: SceneStream, frames: torch.Tensor, batch: int, defer: bool = False) -> torch.Tensor:
    outputs = [stream.push(frames[i : i + batch], defer=defer) for i in range(0, frames.shape[0], batch)]
    outputs.append(stream.close())
    return torch.cat(outputs)


@pytest.fixture(scope="module")
def cuts_clip() -> torch.Tensor:
    """The real clip with hard cuts before frames 27 and 77, area-downscaled 4x (the LR input)."""
    with av.open(str(DATA / "real_bikes_cuts_640x272.mp4")) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    video = torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2).float() / 255
    return F.interpolate(video, scale_factor=0.25, mode="area").permute(0, 2, 3, 1).contiguous()


def test_without_detection_it_is_the_plain_session(tiny_pipeline):
    clip = make_clip(30, 8, 12)
    stream = SceneStream(tiny_pipeline, scale=2, detect_scenes=False)
    assert torch.equal(run(stream, clip, 7), tiny_pipeline.upscale(clip, 2))


def test_real_cuts_reset_the_scene(tiny_pipeline, cuts_clip):
    stream = SceneStream(tiny_pipeline, scale=1)
    out = run(stream, cuts_clip, 100)
    assert stream.cuts_seen == [27, 77]
    assert out.shape == cuts_clip.shape
    # No chunk straddles a cut, and each scene starts with a 9-frame first chunk.
    for start, count, event in stream.chunks:
        assert not any(start < cut < start + count for cut in (27, 77))
        if start in (0, 27, 77):
            assert event == "scene" and count == 9
    assert stream.session.scenes == 3
    refreshed = [start for start, _, event in stream.chunks if event == "refresh"]
    if not refreshed:  # then each scene is exactly an independent stream of its frames
        for a, b in ((0, 27), (27, 77), (77, 100)):
            assert torch.equal(out[a:b], tiny_pipeline.upscale(cuts_clip[a:b], 1))


def test_batching_does_not_change_cut_handling(tiny_pipeline, cuts_clip):
    clip = cuts_clip[:40]
    one = run(SceneStream(tiny_pipeline, scale=1), clip, 1)
    many = run(SceneStream(tiny_pipeline, scale=1), clip, 40)
    assert torch.equal(one, many)


@pytest.mark.parametrize("detect", [True, False])
def test_deferred_pushes_give_the_same_frames(tiny_pipeline, cuts_clip, detect):
    """Across the real cut at 27 (a `cut` between deferred pushes), and a collect mid-stream."""
    clip = cuts_clip[:45]
    plain = run(SceneStream(tiny_pipeline, scale=1, detect_scenes=detect), clip, 12)
    stream = SceneStream(tiny_pipeline, scale=1, detect_scenes=detect)
    outputs = [stream.push(clip[i : i + 12], defer=True) for i in range(0, 24, 12)]
    outputs.append(stream.collect())
    assert not stream.session.held
    outputs += [stream.push(clip[i : i + 12], defer=True) for i in range(24, 45, 12)]
    outputs.append(stream.close())
    assert torch.equal(torch.cat(outputs), plain)


def test_synthetic_cut_and_refresh(tiny_pipeline):
    a = make_clip(20, 8, 12, seed=1) * 0.3  # dark shot
    b = 1 - make_clip(20, 8, 12, seed=2) * 0.3  # bright shot
    stream = SceneStream(tiny_pipeline, scale=2)
    out = run(stream, torch.cat([a, b]), 5)
    assert stream.cuts_seen == [20]
    assert torch.equal(out[:20], tiny_pipeline.upscale(a, 2))
    assert torch.equal(out[20:], tiny_pipeline.upscale(b, 2))


def test_reference_refresh_keeps_caches(tiny_pipeline):
    # A gradual change (no cut) that drifts far from the reference frame: the prompt is refreshed at a
    # chunk start at least 15 frames after the reference, without resetting the scene.
    ramp = torch.linspace(0, 1, 45)[:, None, None, None]
    clip = (make_clip(45, 8, 12, seed=3) * 0.2 + ramp * 0.8).clamp(0, 1)
    stream = SceneStream(tiny_pipeline, scale=2, threshold=255)  # no cuts, only refreshes
    out = run(stream, clip, 45)
    assert stream.cuts_seen == [] and stream.session.scenes == 1
    events = [(start, event) for start, _, event in stream.chunks]
    assert events[0] == (0, "scene")
    assert ("refresh" in [e for _, e in events]) and all(s >= 15 for s, e in events if e == "refresh")
    assert not torch.equal(out, tiny_pipeline.upscale(clip, 2))
