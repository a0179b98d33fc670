"""Host offload: state and weights kept in host memory between uses, moved with overlapped copies.

Why: at 720p the causal state alone (VAE histories, rolling KV cache) is larger
than a consumer GPU's spare memory, and at 4K it is larger than any GPU's.
Lists of tensors (VAE feat_cache lists, a KV cache's layers, a module's
weights) go to pinned host memory and come back on side streams, and compute
waits per tensor, only where it reads it, so the copies overlap the work.
On the CPU the same code runs synchronously and gives the same values.
"""

from __future__ import annotations

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

    def to_host(self, cache: list) -> list:
        """The list with its device tensors replaced by host copies (a HostCache); the device copies are dropped."""
        if isinstance(cache, HostCache):
            return cache
        items = cache.settle() if isinstance(cache, ArrivingCache) else list(cache)
        tensors = [t for t in items if isinstance(t, torch.Tensor)]
        out = HostCache(items)
        if not tensors:
            return out
        device = tensors[0].device
        side = self._side(device, "down")
        if side is None:
            out[:] = [t.clone() if isinstance(t, torch.Tensor) else t for t in items]
            return out
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for i, t in enumerate(items):
                if isinstance(t, torch.Tensor):
                    host = torch.empty_like(t, device="cpu", pin_memory=self.pin_memory)
                    host.copy_(t, non_blocking=True)
                    t.record_stream(side)  # the device block is not reused before the copy is done
                    out[i] = host
            out.ready = torch.cuda.Event()
            out.ready.record(side)
        return out

    def to_device(self, cache: list, device: torch.device) -> list:
        """A HostCache brought back to `device` (an ArrivingCache); any other list is returned as it is."""
        if not isinstance(cache, HostCache):
            return cache
        side = self._side(device, "up")
        if side is None:
            return ArrivingCache([t.clone() if isinstance(t, torch.Tensor) else t for t in cache])
        main = torch.cuda.current_stream(device)
        # Device blocks are allocated on the current stream: the copies must not
        # start before the work already queued there (which may still use them).
        side.wait_stream(main)
        if cache.ready is not None:
            side.wait_event(cache.ready)
        items, events = list(cache), {}
        with torch.cuda.stream(side):
            for i, t in enumerate(cache):
                if isinstance(t, torch.Tensor):
                    with torch.cuda.stream(main):
                        dev = torch.empty_like(t, device=device)
                    dev.copy_(t, non_blocking=True)
                    dev.record_stream(side)  # not reused before the copy is done, even if dropped unread
                    events[i] = torch.cuda.Event()
                    events[i].record(side)
                    items[i] = dev
        return ArrivingCache(items, events, device)


