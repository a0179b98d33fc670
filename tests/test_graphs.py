"""The DiT's graphed block runs (graphs.py) against the plain loop, on the CPU.

A CUDA graph replays the recorded kernels on the same static buffers; the
stand-in recorder here replays by running the same function again on those
buffers, so everything around the graph is exercised: static inputs, the
in-place cache update, the copy handed out, the skipped copy-in, streams that
interleave, shapes that change, a capture that fails.
"""

from __future__ import annotations

import pytest
import torch

from infvsr_core.dit import CausalWanDiT, DiTConfig, KVCache, random_dit_state_dict
from infvsr_core.graphs import MAX_GRAPHS, BlockGraphs

TINY = DiTConfig.tiny()
CONTEXT = torch.randn(1, 145, 512, generator=torch.Generator().manual_seed(1))
T = torch.tensor([400.0])


class Recorder:
    """Counts captures and replays; `fail` raises after the eager run, as a kernel refusing capture would."""

    def __init__(self, fail: bool = False) -> None:
        self.records = self.replays = 0
        self.fail = fail

    def __call__(self, run):
        self.records += 1
        out = run()
        if self.fail:
            raise RuntimeError("operation not permitted when stream is capturing")

        def replay():
            self.replays += 1
            return run()

        return out, replay


def _model(recorder: Recorder | None) -> CausalWanDiT:
    m = CausalWanDiT(TINY).eval()
    m.load_state_dict(random_dit_state_dict(TINY, seed=4, dtype=torch.float32))
    if recorder is None:
        m.cuda_graphs = False
    else:
        m.graphs = BlockGraphs(recorder, device_types=("cpu",))
    return m


def _latents(seed: int, frames: int = 3) -> torch.Tensor:
    return torch.randn(1, 16, frames, 6, 8, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _stream(model: CausalWanDiT, seeds: list[int], frames: list[int] | None = None, release: bool = True):
    """Chunks one after another (the pipeline's way: each call hands the previous cache over)."""
    outs, cache, offset = [], None, 0
    for i, seed in enumerate(seeds):
        latents = _latents(seed, frames[i] if frames else 3)
        pred, cache = model(latents, CONTEXT, T, time_offset=offset, kv_cache=cache, release_cache=release)
        offset += latents.shape[2]
        outs.append((pred, [k.clone() for k in cache.keys], [v.clone() for v in cache.values]))
    return outs


def _assert_same(a, b) -> None:
    for (pa, ka, va), (pb, kb, vb) in zip(a, b, strict=True):
        assert torch.equal(pa, pb)
        for x, y in zip([*ka, *va], [*kb, *vb], strict=True):
            assert torch.equal(x, y)


def test_graphed_stream_equals_the_loop() -> None:
    """Chunk 1 has no cache, chunk 2 is the shape's first sighting (eager), 3 is captured, 4-5 replay."""
    recorder = Recorder()
    graphed = _model(recorder)
    seeds = [10, 11, 12, 13, 14]
    _assert_same(_stream(graphed, seeds), _stream(_model(None), seeds))
    assert (recorder.records, recorder.replays, len(graphed.graphs)) == (1, 2, 1)


def test_cache_handed_out_is_the_callers() -> None:
    """The returned cache is a copy (not the graph's buffers), and the old cache is released as handed over."""
    graphed = _model(Recorder())
    cache, offset = None, 0
    with torch.no_grad():
        for seed in (1, 2, 3, 4):
            old = cache
            _, cache = graphed(_latents(seed), CONTEXT, T, time_offset=offset, kv_cache=cache, release_cache=True)
            offset += 3
            if old is not None:
                assert all(t is None for t in (*old.keys, *old.values))
    captured = next(iter(graphed.graphs._graphs.values()))
    assert cache.keys[0].data_ptr() != captured.past.data_ptr()
    assert torch.equal(torch.stack(cache.keys), captured.past[0])


def test_interleaved_streams_keep_their_own_caches() -> None:
    """Two streams of the same shape share one graph: each call must bring its own cache in."""
    graphed = _model(Recorder())
    plain = _model(None)
    caches: dict[str, KVCache | None] = {"a": None, "b": None}
    outs: dict[str, list] = {"a": [], "b": []}
    with torch.no_grad():
        for step in range(4):
            for name, base in (("a", 100), ("b", 200)):
                pred, caches[name] = graphed(
                    _latents(base + step), CONTEXT, T, time_offset=3 * step, kv_cache=caches[name], release_cache=True
                )
                outs[name].append((pred, [k.clone() for k in caches[name].keys], list(caches[name].values)))
    for name, base in (("a", 100), ("b", 200)):
        _assert_same(outs[name], _stream(plain, [base + s for s in range(4)]))


def test_cache_kept_by_the_caller_stays_valid() -> None:
    """Without release the caller may reuse an old cache (a forked session): replaying from it is still right."""
    graphed, plain = _model(Recorder()), _model(None)
    with torch.no_grad():
        cache = None
        for seed in (1, 2, 3):
            _, cache = graphed(_latents(seed), CONTEXT, T, kv_cache=cache)
        fork = cache
        _, cache = graphed(_latents(4), CONTEXT, T, kv_cache=cache)
        pred_fork, _ = graphed(_latents(5), CONTEXT, T, kv_cache=fork)  # the graph's buffers hold chunk 4's now
        ref = None
        for seed in (1, 2, 3):
            _, ref = plain(_latents(seed), CONTEXT, T, kv_cache=ref)
        pred_ref, _ = plain(_latents(5), CONTEXT, T, kv_cache=ref)
    assert torch.equal(pred_fork, pred_ref)


def test_other_shapes_run_eagerly_and_graphs_are_bounded() -> None:
    """A shorter last chunk (cache and chunk lengths differ) is eager; new shapes evict the oldest graph."""
    recorder = Recorder()
    graphed = _model(recorder)
    seeds, frames = [1, 2, 3, 4, 5], [3, 3, 3, 3, 2]
    _assert_same(_stream(graphed, seeds, frames), _stream(_model(None), seeds, frames))
    assert recorder.records == 1
    with torch.no_grad():
        for height in (6, 8, 10):  # three more shapes, each seen twice: captured on the second sighting
            cache = None
            for seed in (1, 2, 3):
                latents = torch.randn(1, 16, 3, height, 8, generator=torch.Generator().manual_seed(seed))
                _, cache = graphed(latents, CONTEXT, T, kv_cache=cache)
    assert len(graphed.graphs) == MAX_GRAPHS
    graphed.graphs.clear()
    assert len(graphed.graphs) == 0


def test_failed_capture_falls_back_to_the_loop() -> None:
    recorder = Recorder(fail=True)
    graphed = _model(recorder)
    seeds = [1, 2, 3, 4, 5]
    _assert_same(_stream(graphed, seeds), _stream(_model(None), seeds))
    assert recorder.records == 1 and len(graphed.graphs) == 0


def test_cache_still_arriving_runs_the_loop() -> None:
    """A cache being uploaded (ArrivingCache: offloading just switched off) is not copied into a graph unwaited."""
    from infvsr_core.memory import ArrivingCache

    recorder = Recorder()
    graphed, plain = _model(recorder), _model(None)
    with torch.no_grad():
        cache = ref = None
        for seed in (1, 2, 3):
            _, cache = graphed(_latents(seed), CONTEXT, T, kv_cache=cache)
            _, ref = plain(_latents(seed), CONTEXT, T, kv_cache=ref)
        arriving = cache.map(ArrivingCache)
        pred, _ = graphed(_latents(4), CONTEXT, T, kv_cache=arriving)
        pred_ref, _ = plain(_latents(4), CONTEXT, T, kv_cache=ref)
    assert recorder.replays == 0 and torch.equal(pred, pred_ref)


def test_auto_graphs_only_for_small_chunks(monkeypatch) -> None:
    """cuda_graphs=None: chunks above GRAPH_MAX_TOKENS run the loop; True graphs them anyway."""
    import infvsr_core.dit as dit_module

    monkeypatch.setattr(dit_module, "GRAPH_MAX_TOKENS", 3 * 3 * 4 - 1)  # one token fewer than a chunk has
    for setting, records in ((None, 0), (True, 1)):
        recorder = Recorder()
        graphed = _model(recorder)
        graphed.cuda_graphs = setting
        _stream(graphed, [1, 2, 3, 4])
        assert recorder.records == records


@pytest.mark.parametrize("grad", [True, False])
def test_graphs_only_without_autograd_and_when_enabled(grad) -> None:
    recorder = Recorder()
    graphed = _model(recorder)
    graphed.cuda_graphs = not grad
    with torch.set_grad_enabled(grad):
        cache = None
        for seed in (1, 2, 3, 4):
            _, cache = graphed(_latents(seed), CONTEXT, T, kv_cache=cache)
    assert recorder.records == (0 if grad else 1)


def test_default_recorder_serves_cuda_only() -> None:
    graphs = BlockGraphs()
    assert not graphs.serves(torch.device("cpu"))
    assert graphs.device_types == ("cuda",)


def test_pipeline_graphs_in_fast_mode_only(tiny_models) -> None:
    """Through the pipeline: offload "none" replays graphs (same frames as the loop), a memory-saving mode
    never does and drops them, and release_graphs frees them."""
    from infvsr_core.loader import load_pipeline

    from .conftest import make_clip

    clip = make_clip(9 + 12 * 4, 16, 24, seed=3)
    outs = {}
    for name in ("loop", "graphs", "histories"):
        pipe = load_pipeline(tiny_models, device="cpu", dtype="fp32")
        recorder = Recorder()
        pipe.dit.graphs = BlockGraphs(recorder, device_types=("cpu",))
        pipe.dit.cuda_graphs = name != "loop"
        if name == "histories":
            pipe.offload = "histories"
        session = pipe.new_session(4)
        outs[name] = torch.cat([pipe.push(session, clip), pipe.close(session)])
        kept = len(pipe.dit.graphs)
        assert (recorder.records, kept) == ((1, 1) if name == "graphs" else (0, 0))
        if name == "graphs":
            assert recorder.replays == 2  # chunks 4 and 5 (2 is eager, 3 captured)
            pipe.release_graphs()
            assert len(pipe.dit.graphs) == 0
            pipe.dit.graphs._graphs["stale"] = None
            pipe.offload = "state"
            assert len(pipe.dit.graphs) == 0
    assert torch.equal(outs["graphs"], outs["loop"])
    assert torch.allclose(outs["histories"], outs["loop"], atol=1e-6)
