"""The DiT's 30 blocks replayed as one CUDA graph for a steady chunk shape.

Why: at small frame sizes (480p) a chunk's DiT kernels take less GPU time
than the host needs to launch them (Linear, cuDNN attention, fused
elementwise ops, each behind Python), so the GPU waits on the CPU. A CUDA graph replays
all of them in one launch. Steady chunks all have the same shapes (3 latent
frames after 3 cached ones), so one capture serves a whole stream.

A graph reads fixed addresses, so each captured shape owns static buffers:
the chunk's inputs (tokens, time modulation, prompt, RoPE tables) are copied
in, the previous chunk's keys/values sit in one static `past` tensor, and the
captured blocks overwrite `past` layer by layer with the chunk's own keys and
values (after the layer has attended over the old ones). The caller receives
a copy of the new cache, which it owns: a graph's buffers are never handed
out, so interleaved streams cannot overwrite each other's caches. When the
cache handed back is that copy and nothing ran since, the copy-in is skipped.

The capture itself costs one eager forward on the capture stream (which
produces that chunk's real result) plus the recording; a shape is captured
the second time it is seen, so one-off shapes (a scene's last, shorter
chunk) run eagerly and never hold a graph's memory.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence

import torch

# Run the blocks over (x, t_mod, context, cos, sin, past) -> x, updating past in place with the new keys/values.
BlockRunner = Callable[..., torch.Tensor]
# record(run) -> (run's result now, replay): replay() runs it again on the same buffers and returns its output.
Recorder = Callable[[Callable[[], torch.Tensor]], tuple[torch.Tensor, Callable[[], torch.Tensor]]]

MAX_GRAPHS = 2  # shapes kept captured at once: each holds its static buffers and a memory pool


class _Captured:
    """One captured shape: static inputs, the graph, its output, and which returned cache `past` still equals."""

    def __init__(self, inputs: Sequence[torch.Tensor], layer: torch.Tensor, layers: int) -> None:
        self.inputs = [torch.empty_like(t) for t in inputs]
        # (keys/values, layer, *one layer's shape): one tensor, so that the copy handed out is one clone.
        self.past = layer.new_empty((2, layers, *layer.shape))
        self.replay: Callable[[], torch.Tensor] | None = None
        self.lent: list[weakref.ref] = []

    def load(self, inputs: Sequence[torch.Tensor], past_k: Sequence[torch.Tensor], past_v: Sequence[torch.Tensor]):
        for dst, src in zip(self.inputs, inputs, strict=True):
            dst.copy_(src)
        if not self.holds(past_k, past_v):
            for i, (k, v) in enumerate(zip(past_k, past_v, strict=True)):
                self.past[0, i].copy_(k)
                self.past[1, i].copy_(v)

    def holds(self, past_k: Sequence[torch.Tensor], past_v: Sequence[torch.Tensor]) -> bool:
        """Whether `past` already equals these tensors: they are the copy this graph handed out last."""
        given = [*past_k, *past_v]
        return len(given) == len(self.lent) and all(ref() is t for ref, t in zip(self.lent, given, strict=True))

    def lend(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """A copy of the new cache for the caller (views of one tensor), remembered to skip the next copy-in."""
        copy = self.past.clone()
        keys, values = list(copy[0].unbind(0)), list(copy[1].unbind(0))
        self.lent = [weakref.ref(t) for t in (*keys, *values)]
        return keys, values


def record_cuda_graph(run: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, Callable[[], torch.Tensor]]:
    """run() once eagerly on a side stream (its real result; it also warms that stream's library handles),
    then captured there as a CUDA graph; the current stream waits for both."""
    stream = torch.cuda.Stream()
    current = torch.cuda.current_stream()
    stream.wait_stream(current)
    with torch.cuda.stream(stream):
        output = run()
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph, stream=stream):
            static = run()
    finally:
        current.wait_stream(stream)
        output.record_stream(current)

    def replay() -> torch.Tensor:
        graph.replay()
        return static

    return output, replay


class BlockGraphs:
    """Captured block runs by shape key (at most MAX_GRAPHS, least recently used dropped).

    `record` captures a run (default: `record_cuda_graph`, for CUDA
    devices); tests give a stand-in that replays by running again on the same
    static buffers, with the device types it serves.
    """

    def __init__(self, record: Recorder | None = None, device_types: tuple[str, ...] = ("cuda",)) -> None:
        self._record = record or record_cuda_graph
        self.device_types = device_types
        self._graphs: OrderedDict[Hashable, _Captured] = OrderedDict()
        self._seen: OrderedDict[Hashable, None] = OrderedDict()  # shapes run eagerly once (the last few)
        self._failed: set[Hashable] = set()

    def clear(self) -> None:
        """Drop every graph and its buffers (weights moved, or the pipeline is closing)."""
        self._graphs.clear()
        self._seen.clear()

    def __len__(self) -> int:
        return len(self._graphs)

    def serves(self, device: torch.device) -> bool:
        """Whether runs on `device` can be recorded now (not on CUDA while another capture is under way)."""
        if device.type not in self.device_types:
            return False
        return device.type != "cuda" or not torch.cuda.is_current_stream_capturing()

    def run(
        self,
        key: Hashable,
        runner: BlockRunner,
        inputs: Sequence[torch.Tensor],
        past_k: list,
        past_v: list,
        release: bool,
    ) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]] | None:
        """The blocks' output and the new cache through the graph for `key`, or None: run them eagerly.

        `past_k`/`past_v` are the previous chunk's per-layer tensors, each of
        the new cache's shape; with `release` their entries are set to None
        once copied in (the caller hands the old cache over).
        """
        captured = self._graphs.get(key)
        if captured is None:
            if key in self._failed or key not in self._seen:
                self._seen[key] = None
                while len(self._seen) > 4 * MAX_GRAPHS:
                    self._seen.popitem(last=False)
                return None
            return self._capture(key, runner, inputs, past_k, past_v, release)
        self._graphs.move_to_end(key)
        captured.load(inputs, past_k, past_v)
        _release(past_k, past_v, release)
        return captured.replay(), *captured.lend()

    def _capture(self, key, runner, inputs, past_k, past_v, release):
        captured = _Captured(inputs, past_k[0], len(past_k))
        captured.load(inputs, past_k, past_v)
        _release(past_k, past_v, release)
        outputs: list[torch.Tensor] = []

        def run() -> torch.Tensor:
            outputs.append(runner(*captured.inputs, captured.past))
            return outputs[-1]

        try:
            output, captured.replay = self._record(run)
        except RuntimeError:  # a kernel that cannot be captured: this shape stays eager
            self._failed.add(key)
            if not outputs:
                raise
            return outputs[0], *_own(captured)
        self._graphs[key] = captured
        while len(self._graphs) > MAX_GRAPHS:
            self._graphs.popitem(last=False)
        return output, *captured.lend()


def _own(captured: _Captured) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    past = captured.past
    return list(past[0].unbind(0)), list(past[1].unbind(0))


def _release(past_k: list, past_v: list, release: bool) -> None:
    if release:
        for i in range(len(past_k)):
            past_k[i] = past_v[i] = None
