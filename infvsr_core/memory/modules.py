"""A module's weights kept in host memory, on the device only while it runs (`ModuleOffload`).

Why: with the low-memory policies the visual guidance (outside prompt
extraction) and the DiT (outside its step) need not hold device memory while
the other stages run.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from .host import ArrivingCache, HostCache, HostMemory


class ModuleOffload:
    """A module's parameters and buffers kept in host memory, on the device only while it runs.

    The module's own tensors are re-pointed (`tensor.data`), so references to
    the module stay valid; `on_device` brings the weights in for a call and
    leaves the host copy in place, so nothing is copied back.
    """

    def __init__(self, module: torch.nn.Module, host_memory: HostMemory) -> None:
        self.module = module
        self.host_memory = host_memory
        self.host: HostCache | None = None

    @property
    def offloaded(self) -> bool:
        return self.host is not None

    def tensors(self) -> list[torch.Tensor]:
        return [*self.module.parameters(), *self.module.buffers()]

    def _assign(self, values: list) -> None:
        # settle(): iterating an ArrivingCache would not wait for its uploads, indexing does.
        values = values.settle() if isinstance(values, ArrivingCache) else values
        for tensor, value in zip(self.tensors(), values, strict=True):
            tensor.data = value

    def to_host(self) -> None:
        if self.host is None:
            self.host = self.host_memory.to_host([t.data for t in self.tensors()])
            self._assign(self.host)

    def to_device(self, device: torch.device) -> None:
        if self.host is not None:
            self._assign(self.host_memory.to_device(self.host, device))
            self.host = None

    @contextmanager
    def on_device(self, device: torch.device) -> Iterator[None]:
        """The weights on `device` for the duration (a no-op when they live there)."""
        if self.host is None:
            yield
            return
        self._assign(self.host_memory.to_device(self.host, device))
        try:
            yield
        finally:
            self._assign(self.host)
