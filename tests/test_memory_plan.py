"""offload="auto": the plan's choice for given free memory, and the step down after an out-of-memory error, which
must give the frames of a run that started in the lighter mode. On the CPU the error is raised where a chunk's
decoder would allocate (a stage hook raising torch.OutOfMemoryError, as the CUDA allocator does); the modes are
bit-identical on the CPU, so the frames must be equal."""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch

from infvsr_core.loader import load_pipeline
from infvsr_core.memory import plan
from infvsr_core.pipeline import GUARDED_CHUNKS
from tests.conftest import make_clip


@pytest.fixture
def pipe(tiny_models):
    return load_pipeline(tiny_models, device="cpu", dtype="fp32")


def test_lighter_modes_need_less_device_memory(pipe):
    for size in ((480, 832), (720, 1280), (1080, 1920)):
        needs = [plan.device_need(pipe, *size, mode) for mode in plan.AUTO_ORDER]
        assert needs == sorted(needs, reverse=True) and needs[0] > needs[-1] > 0, (size, needs)
    assert plan.device_need(pipe, 1080, 1920, "none") > plan.device_need(pipe, 720, 1280, "none")


def test_the_plan_picks_the_fastest_mode_that_fits(pipe):
    needs = {mode: plan.device_need(pipe, 720, 1280, mode) for mode in plan.AUTO_ORDER}
    assert plan.pick_mode(needs, needs["none"]) == "none"
    assert plan.pick_mode(needs, needs["none"] - 1) == "state"
    assert plan.pick_mode(needs, needs["state"] - 1) == "all"
    assert plan.pick_mode(needs, needs["all"] - 1) is None
    mode, why = plan.choose_mode(pipe, 720, 1280, free=needs["state"])
    assert mode == "state" and "1280x720" in why
    mode, why = plan.choose_mode(pipe, 720, 1280, free=1)
    assert mode == "all" and "trying anyway" in why


def _oom_at(pipe, stage: str, calls: list[int]):
    """A stage hook raising an out-of-memory error at the given calls of `stage` (1-based), as the allocator would."""
    seen = {"n": 0}

    @contextmanager
    def hook(name):
        if name == stage:
            seen["n"] += 1
            if seen["n"] in calls:
                raise torch.OutOfMemoryError("CUDA out of memory (raised by the test)")
        yield

    return hook


def run(pipe, clip, chunks=(9, 12, 12, 7)) -> torch.Tensor:
    session = pipe.new_session(scale=4)
    outs, start = [], 0
    for count in chunks:
        outs.append(pipe.push(session, clip[start : start + count], defer=True))
        start += count
    outs.append(pipe.close(session))
    return torch.cat(outs)


def test_out_of_memory_steps_down_and_redoes_the_chunk(pipe, tiny_models):
    clip = make_clip(40, 12, 20, seed=4)
    reference = {}
    for mode in ("none", "state", "all"):
        pipe.offload = mode
        reference[mode] = run(pipe, clip)
    assert torch.equal(reference["none"], reference["state"]) and torch.equal(reference["state"], reference["all"])

    pipe.offload = "auto"
    lines: list[str] = []
    pipe.on_plan = lines.append
    pipe.stage_hook = _oom_at(pipe, "decode", [2, 4])  # the second chunk fails once, then the third
    out = run(pipe, clip)
    assert pipe.offload == "all" and pipe.auto_offload
    assert [line.split(":")[0] for line in lines] == [
        "out of GPU memory with offload='none'",
        "out of GPU memory with offload='state'",
    ]
    assert out.shape == reference["all"].shape and torch.equal(out, reference["all"])  # nothing lost or repeated


def test_auto_redoes_only_a_sizes_first_chunks(pipe):
    """Past GUARDED_CHUNKS chunks of a size the session is no longer copied before each chunk (that copy costs
    speed and host memory), so a late out-of-memory error goes on with advice and marks the session."""
    pipe.offload = "auto"
    pipe.on_plan = lambda line: None
    late = GUARDED_CHUNKS + 1
    pipe.stage_hook = _oom_at(pipe, "decode", [late])
    session = pipe.new_session(scale=4)
    clip = make_clip(9 + 12 * GUARDED_CHUNKS, 12, 20, seed=4)
    pipe.push(session, clip[: 9 + 12 * (GUARDED_CHUNKS - 1)])  # the guarded chunks, no error
    with pytest.raises(torch.OutOfMemoryError, match="redoes only the first"):
        pipe.push(session, clip[9 + 12 * (GUARDED_CHUNKS - 1) :])
    assert session.interrupted == "out of device memory" and pipe.offload == "none"


def test_without_auto_the_error_goes_on_with_advice(pipe):
    pipe.offload = "none"
    pipe.stage_hook = _oom_at(pipe, "decode", [2])
    session = pipe.new_session(scale=4)
    with pytest.raises(torch.OutOfMemoryError, match="try offload='state'"):
        pipe.push(session, make_clip(21, 12, 20, seed=4))
    assert session.interrupted == "out of device memory"


def test_spill_budget_keeps_what_fits():
    gib = plan.GIB
    assert plan.spill_budget(1 * gib, 10 * gib) is None
    budget = plan.spill_budget(9 * gib, 10 * gib)
    assert budget is not None and 0 < budget < 9 * gib and budget <= 10 * gib


def test_histories_that_outgrow_host_memory_go_to_disk(pipe, tmp_path, monkeypatch):
    """Offloaded histories larger than the host can hold are spilled (the run's frames unchanged), and said.
    The machine's available memory is set low (the one figure read from the OS) so that the tiny model's
    histories do not fit; the spill itself is real: files in the folder, read back."""
    clip = make_clip(40, 12, 20, seed=5)
    pipe.offload = "state"
    reference = run(pipe, clip)

    pipe.offload = "state"  # a new plan for the next stream
    pipe.spill_dir = tmp_path
    lines: list[str] = []
    pipe.on_plan = lines.append
    monkeypatch.setattr(plan, "_host_available", lambda: 1 << 20)
    assert plan.check_fits(pipe, 12, 20, 4) is None  # a host too small for the histories is not refused
    out = run(pipe, clip)
    assert torch.equal(out, reference)
    assert pipe.vae.spill is not None and pipe.vae.spill.spilled_bytes > 0
    assert pipe.vae.spill.folder.parent == tmp_path
    assert len(lines) == 1 and "go to disk" in lines[0] and str(tmp_path) in lines[0]


def test_histories_that_fit_stay_in_host_memory(pipe, tmp_path):
    pipe.offload = "state"
    pipe.spill_dir = tmp_path
    lines: list[str] = []
    pipe.on_plan = lines.append
    run(pipe, make_clip(21, 12, 20, seed=5))
    assert pipe.vae.spill is None and lines == []
