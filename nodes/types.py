"""The values that travel on the pack's own sockets: INFVSR_MODEL, INFVSR_GUIDANCE, INFVSR_CACHE.

They are thin wrappers over core objects: they add what ComfyUI's graph needs
(identity checks between sockets, copies so that ComfyUI's output cache never
sees a mutated value, where the weights live between runs).
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import comfy, comfy_memory
from ._core import InfVSRPipeline, InfVSRSession, release_derived
from .comfy_memory import ComfyWeights

MODEL_TYPE = "INFVSR_MODEL"
GUIDANCE_TYPE = "INFVSR_GUIDANCE"
CACHE_TYPE = "INFVSR_CACHE"
STREAM_TYPE = "INFVSR_STREAM"


def _module_bytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in list(module.parameters()) + list(module.buffers()))


@dataclass(eq=False)
class InfVSRModel:
    """A loaded pipeline plus where its weights live between runs.

    Inside ComfyUI the networks are models of ComfyUI's model manager (`comfy_memory.ComfyWeights`): each node
    has them loaded for its work (`with model.active(...):`), so ComfyUI first unloads other models to make
    room, and it may unload ours when another model needs the room or on "Unload Models"; the next node loads
    them back. With `idle_weights_on_cpu` (the loader's `weights` choice) they are unloaded to the CPU after
    every node, so an idle InfVSR graph leaves the GPU to the other models of the workflow; outside ComfyUI this
    handle moves them itself for that. Not to be confused with the core's offload policy (`pipeline.policy`),
    which moves stream state and weights while a node runs.
    """

    pipeline: InfVSRPipeline
    device: torch.device
    idle_weights_on_cpu: bool
    files: dict[str, Path]
    attention: str
    _lock: threading.RLock = field(default_factory=threading.RLock, repr=False)
    _depth: int = 0
    _comfy: ComfyWeights | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if comfy.manages_models():
            offload = comfy_memory.offload_device(self.idle_weights_on_cpu)
            self._comfy = ComfyWeights(self.pipeline, self.device, offload)

    @property
    def model_id(self) -> str:
        return self.pipeline.model_id

    def modules(self) -> list[torch.nn.Module]:
        """The networks this handle moves; those the core's offload policy keeps in host memory are the core's to
        move (`OffloadPolicy.dit_weights_on_host`, `guidance_weights_on_host`)."""
        policy = self.pipeline.policy
        dit = [] if policy.dit_weights_on_host else [self.pipeline.dit]
        guidance = [] if policy.guidance_weights_on_host else [self.pipeline.guidance]
        return [*dit, self.pipeline.vae.vae, *guidance]

    def weight_bytes(self) -> int:
        return sum(_module_bytes(m) for m in self.modules())

    def _move(self, device: torch.device) -> None:
        for module in self.modules():
            module.to(device)

    @contextmanager
    def active(
        self, input_size: tuple[int, int] | None = None, scale: int = 1, new_stream: bool = True
    ) -> Iterator[InfVSRPipeline]:
        """The pipeline with its weights on the compute device (back on the CPU after, with `idle_weights_on_cpu`).

        `input_size` (the input frames' height, width), `scale` and `new_stream` (whether the work starts a
        stream, whose state it will allocate) size the memory ComfyUI makes room for besides the weights
        (`comfy_memory.working_memory`); None: ComfyUI's minimum.
        """
        with self._lock:
            outermost = self._depth == 0
            if outermost:
                self._acquire(input_size, scale, new_stream)
            self._depth += 1
            try:
                yield self.pipeline
            finally:
                self._depth -= 1
                if outermost:
                    self._release()

    def _acquire(self, input_size: tuple[int, int] | None, scale: int, new_stream: bool) -> None:
        if self._comfy is not None:
            need = comfy_memory.working_memory(self.pipeline, input_size, scale, new_stream)
            self._comfy.load(self.modules(), need)
        elif self.idle_weights_on_cpu and self.device.type != "cpu":
            comfy.free_device_memory(int(self.weight_bytes() * 1.3), self.device)
            self._move(self.device)

    def _release(self) -> None:
        if self._comfy is not None:
            if self.idle_weights_on_cpu:
                self._comfy.unload()  # the patchers drop what was built on the weights' addresses
            else:
                self._comfy.follow(self.modules())
            return
        if not self.idle_weights_on_cpu or self.device.type == "cpu":
            return
        # Built on the weights' addresses: the DiT's CUDA graphs (with their buffers) and the fast VAE's derived
        # weights (plain attributes, which `.to()` would leave on the device).
        self.pipeline.release_graphs()
        release_derived(self.pipeline.vae.vae)
        self._move(torch.device("cpu"))
        comfy.empty_cache()


@dataclass(frozen=True, eq=False)
class DAPEGuidance:
    """A DAPE visual prompt and the model it was extracted with (prompts only fit their own model)."""

    prompt: torch.Tensor
    model_id: str
    reference: str
    """How the reference frame was chosen, for messages (e.g. 'frame 0 of 48')."""
    uid: str = field(default_factory=lambda: uuid.uuid4().hex)

    def same_as(self, other: DAPEGuidance | None) -> bool:
        if other is None:
            return False
        if other.uid == self.uid:
            return True
        return other.prompt.shape == self.prompt.shape and torch.equal(other.prompt.cpu(), self.prompt.cpu())


def fork_session(session: InfVSRSession) -> InfVSRSession:
    """An independent copy of a session (the core's `InfVSRSession.fork`: containers copied, tensors shared)."""
    return session.fork()


@dataclass(eq=False)
class StreamCache:
    """INFVSR_CACHE: the core session of a stream after some chunks, and the guidance it started with.

    Nodes never advance a cache they received: they fork it first, so a cached
    upstream output stays valid when ComfyUI re-runs only part of the graph.
    """

    session: InfVSRSession
    guidance: DAPEGuidance | None
    chunks: int = 0
    """Chunk nodes (or stream runs) that have advanced this stream."""

    def fork(self) -> StreamCache:
        return StreamCache(fork_session(self.session), self.guidance, self.chunks)

    @property
    def model_id(self) -> str:
        return self.session.model_id

    def summary(self) -> dict[str, Any]:
        """Numbers the web extension shows on the node."""
        s = self.session
        return {
            "frames_in": s.frames_in,
            "frames_out": s.frames_out,
            "pending": s.pending_frames,
            "scenes": s.scenes,
            "chunks": self.chunks,
            "state_bytes": s.state_bytes(),
            "closed": s.closed,
            "size": list(s.input_size) if s.input_size else None,
            "scale": s.scale,
        }
