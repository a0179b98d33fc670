"""Host offload: state and weights kept in host memory between uses, moved with overlapped copies.

Why: at 720p the causal state alone (VAE histories, rolling KV cache) is larger
than a consumer GPU's spare memory, and at 4K it is larger than any GPU's.
Lists of tensors (VAE feat_cache lists, a KV cache's layers, a module's
weights) go to pinned host memory and come back on side streams, and compute
waits per tensor, only where it reads it, so the copies overlap the work.
On the CPU the same code runs synchronously and gives the same values.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch


class HostCache(list):
    """A feat_cache list (or any list of tensors) whose tensors live in host memory.

    `ready` is the CUDA event after which the device-to-host copies that filled
    it are complete (None when they were synchronous, e.g. on the CPU).
    """

    ready: torch.cuda.Event | None = None


class ArrivingCache(list):
    """A list of device tensors whose host-to-device copies may still be running on a side stream.

    Reading an entry (`cache[i]`, what diffusers and the fast forward do) makes
    the current stream wait for that entry's copy only, so compute starts as
    soon as the first entries are in, while the later ones are still coming.
    Iterating does not wait: use `settle()` to read it as a whole.
    """

    def __init__(self, items: list, events: dict[int, Any] | None = None, device: torch.device | None = None) -> None:
        super().__init__(items)
        self.events = events or {}
        self.device = device

    def _arrive(self, index: int) -> None:
        event = self.events.pop(index, None)
        if event is not None:
            torch.cuda.current_stream(self.device).wait_event(event)

    def __getitem__(self, index):  # type: ignore[override]
        if self.events and isinstance(index, int):
            self._arrive(index % len(self))
        return super().__getitem__(index)

    def __setitem__(self, index, value) -> None:  # type: ignore[override]
        if self.events and isinstance(index, int):
            # The old tensor is freed by this assignment: its copy must be over first.
            self._arrive(index % len(self))
        super().__setitem__(index, value)

    def settle(self) -> list:
        """A plain list of the entries, every copy waited for."""
        for index in list(self.events):
            self._arrive(index)
        return list(self)


def copy_cache(cache: list) -> list:
    """An independent copy of a cache list (tensors shared), keeping where its tensors live."""
    if isinstance(cache, HostCache):
        copied = HostCache(cache)
        copied.ready = cache.ready
        return copied
    if isinstance(cache, ArrivingCache):
        return cache.settle()
    return list(cache)


class HostOffload:
    """Moves lists of tensors (VAE feat_cache lists, KV caches, weights) between a device and host memory.

    On CUDA the host copies are pinned and every copy runs asynchronously on a
    side stream (one for each direction, so uploads and downloads overlap each
    other and the compute); the current stream waits per tensor, and only
    where it reads it. On the CPU the "host copy" is simply another tensor: the
    same code path, synchronous, bit for bit the same values. Host copies are
    fresh tensors every time (never written in place), so forked histories that
    share them stay independent.
    """

    def __init__(self, pin_memory: bool = True) -> None:
        self.pin_memory = pin_memory
        self._streams: dict[tuple[torch.device, str], Any] = {}

    def _side(self, device: torch.device, direction: str):
        if device.type != "cuda":
            return None
        key = (device, direction)
        if key not in self._streams:
            self._streams[key] = torch.cuda.Stream(device)
        return self._streams[key]

    def download(self, tensor: torch.Tensor) -> torch.Tensor:
        """A host copy of one tensor, its copy queued behind the work already queued that produces it.

        The device tensor may be dropped right away: its block is not reused before the copy is done.
        """
        side = self._side(tensor.device, "down")
        if side is None:
            return tensor.clone()
        side.wait_stream(torch.cuda.current_stream(tensor.device))
        with torch.cuda.stream(side):
            host = torch.empty_like(tensor, device="cpu", pin_memory=self.pin_memory)
            host.copy_(tensor, non_blocking=True)
            tensor.record_stream(side)
        return host

    def host_list(self, items: list, device: torch.device) -> HostCache:
        """Items already downloaded from `device` (by `download`) as a HostCache, ready when they all are."""
        out = HostCache(items)
        side = self._side(device, "down")
        if side is not None:
            out.ready = torch.cuda.Event()
            out.ready.record(side)
        return out

    def upload(
        self, tensor: torch.Tensor, device: torch.device, after: Any = None
    ) -> tuple[torch.Tensor, torch.cuda.Event | None]:
        """A device copy of a host tensor and the event that marks its arrival (None: already there).

        `after` is an event the copy must wait for (the download that filled the host tensor).
        """
        side = self._side(device, "up")
        if side is None:
            return tensor.clone(), None
        main = torch.cuda.current_stream(device)
        # Device blocks are allocated on the current stream: the copy must not
        # start before the work already queued there (which may still use them).
        side.wait_stream(main)
        if after is not None:
            side.wait_event(after)
        with torch.cuda.stream(main):
            dev = torch.empty_like(tensor, device=device)
        with torch.cuda.stream(side):
            dev.copy_(tensor, non_blocking=True)
            dev.record_stream(side)  # not reused before the copy is done, even if dropped unread
            event = torch.cuda.Event()
            event.record(side)
        return dev, event

    def to_host(self, cache: list) -> list:
        """The list with its device tensors replaced by host copies (a HostCache); the device copies are dropped."""
        if isinstance(cache, HostCache):
            return cache
        items = cache.settle() if isinstance(cache, ArrivingCache) else list(cache)
        tensors = [t for t in items if isinstance(t, torch.Tensor)]
        if not tensors:
            return HostCache(items)
        moved = [self.download(t) if isinstance(t, torch.Tensor) else t for t in items]
        return self.host_list(moved, tensors[0].device)

    def to_device(self, cache: list, device: torch.device) -> list:
        """A HostCache brought back to `device` (an ArrivingCache); any other list is returned as it is."""
        if not isinstance(cache, HostCache):
            return cache
        items, events = list(cache), {}
        for i, t in enumerate(cache):
            if isinstance(t, torch.Tensor):
                items[i], event = self.upload(t, device, cache.ready)
                if event is not None:
                    events[i] = event
        return ArrivingCache(items, events, device)


class WindowedUpload:
    """A HostCache read on the device a few entries at a time (a KV cache streamed layer by layer).

    Reading entry i queues the uploads of entries i .. i + `ahead` (those not
    queued yet) and makes the current stream wait for entry i's; `cache[i] =
    None` drops the device copy. So the device holds about `ahead` + 1 entries,
    not the whole list, and each upload overlaps the work on the entry before.
    The host list is never changed.
    """

    def __init__(self, host: HostCache, offload: HostOffload, device: torch.device, ahead: int = 1) -> None:
        self.host = host
        self.offload = offload
        self.device = device
        self.ahead = ahead
        self._items: dict[int, torch.Tensor | None] = {}
        self._events: dict[int, Any] = {}

    def __len__(self) -> int:
        return len(self.host)

    def _start(self, index: int) -> None:
        if index < len(self.host) and index not in self._items:
            self._items[index], event = self.offload.upload(self.host[index], self.device, self.host.ready)
            if event is not None:
                self._events[index] = event

    def __getitem__(self, index: int) -> torch.Tensor:
        for ahead in range(index, index + self.ahead + 1):
            self._start(ahead)
        event = self._events.pop(index, None)
        if event is not None:
            torch.cuda.current_stream(self.device).wait_event(event)
        value = self._items[index]
        if value is None:
            raise IndexError(f"entry {index} was already dropped")
        return value

    def __setitem__(self, index: int, value: None) -> None:
        if value is not None:
            raise TypeError("a WindowedUpload is read-only; only `cache[i] = None` (drop) is allowed")
        self._events.pop(index, None)  # record_stream keeps the block until its copy is done
        self._items[index] = None


class ModuleOffload:
    """A module's parameters and buffers kept in host memory, on the device only while it runs.

    The module's own tensors are re-pointed (`tensor.data`), so references to
    the module stay valid; `on_device` brings the weights in for a call and
    leaves the host copy in place, so nothing is copied back.
    """

    def __init__(self, module: torch.nn.Module, offload: HostOffload) -> None:
        self.module = module
        self.offload = offload
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
            self.host = self.offload.to_host([t.data for t in self.tensors()])
            self._assign(self.host)

    def to_device(self, device: torch.device) -> None:
        if self.host is not None:
            self._assign(self.offload.to_device(self.host, device))
            self.host = None

    @contextmanager
    def on_device(self, device: torch.device) -> Iterator[None]:
        """The weights on `device` for the duration (a no-op when they live there)."""
        if self.host is None:
            yield
            return
        self._assign(self.offload.to_device(self.host, device))
        try:
            yield
        finally:
            self._assign(self.host)
