"""The DiT's KV cache streamed from host memory a layer at a time (`WindowedUpload`).

Why: with the KV cache offloaded, uploading it whole before the DiT would put
a whole cache on the device again; the DiT reads its layers in order, so each
layer's upload can run one layer ahead and overlap the work on the layer
before, and the device holds a few layers, not the cache.
"""

from __future__ import annotations

from typing import Any

import torch

from .host import HostCache, HostMemory, ManagedCache


class WindowedUpload(ManagedCache):
    """A HostCache read on the device a few entries at a time (a KV cache streamed layer by layer).

    Reading entry i queues the uploads of entries i .. i + `ahead` (those not
    queued yet) and makes the current stream wait for entry i's; `cache[i] =
    None` drops the device copy. So the device holds about `ahead` + 1 entries,
    not the whole list, and each upload overlaps the work on the entry before.

    With `consume`, each host entry is dropped from the list once its upload is
    queued (the list is being replaced, as a KV cache is by the DiT step), so its
    pinned block can take a new entry right away: host memory then holds one KV
    cache, not two. Otherwise the host list is never changed.
    """

    def __init__(
        self, host: HostCache, host_memory: HostMemory, device: torch.device, ahead: int = 1, consume: bool = False
    ) -> None:
        self.host = host
        self.host_memory = host_memory
        self.device = device
        self.ahead = ahead
        self.consume = consume
        self._items: dict[int, torch.Tensor | None] = {}
        self._events: dict[int, Any] = {}

    def __len__(self) -> int:
        return len(self.host)

    def _start(self, index: int) -> None:
        if index < len(self.host) and index not in self._items:
            self._items[index], event = self.host_memory.upload(self.host[index], self.device, self.host.ready)
            if event is not None:
                self._events[index] = event
            if self.consume:
                self.host[index] = None

    def start(self, count: int) -> None:
        """Queue the uploads of the first `count` entries now (ahead of work queued later on the device)."""
        for index in range(min(count, len(self.host))):
            self._start(index)

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
