"""Host memory for device state: the cache lists that live there and `HostMemory`, which moves them.

Why: the causal state (VAE histories, the rolling KV cache) can outgrow a GPU's
spare memory, so lists of tensors (VAE feat_cache lists, a KV cache's layers, a
module's weights) go to page-locked host memory between uses and come back on
side streams; compute waits per tensor, only where it reads it, so the copies
overlap the work. On the CPU the same code runs synchronously and gives the
same values.

The list types say where a cache's entries are: `HostCache` (host memory),
`SpilledCache` (a file, `memory.spill`), `ArrivingCache` (device tensors whose
uploads may still run); `memory.kv.WindowedUpload` streams one entry at a time.
All are `ManagedCache`s; a plain list holds device tensors ready to read.
"""

from __future__ import annotations

from typing import Any

import torch

from .pinned import PinnedPool


class ManagedCache:
    """Base of the caches whose entries this package moves (host copies, a file, uploads in flight, a window).

    Reading one may wait or copy, and iterating it may see host tensors or copies
    still running: code that needs every entry on the device now, as plain
    tensors (the DiT's CUDA graphs), takes plain lists only.
    """


class HostCache(ManagedCache, list):
    """A feat_cache list (or any list of tensors) whose tensors live in host memory.

    `ready` is the CUDA event after which the device-to-host copies that filled
    it are complete (None when they were synchronous, e.g. on the CPU).
    """

    ready: torch.cuda.Event | None = None


class SpilledCache(ManagedCache, list):
    """A HostCache written to a file by `memory.spill.DiskSpill`: the entries are the non-tensor ones (None, "Rep")
    and, for tensors, their index in the file. Immutable once written, so forked histories may share it; the file
    goes when the last holder drops it. Read it back with the DiskSpill that wrote it (`spill`)."""

    def __init__(self, items: list, spill: Any, path: Any) -> None:
        super().__init__(items)
        self.spill = spill
        self.path = path
        self.reading: Any = None


class ArrivingCache(ManagedCache, list):
    """A list of device tensors whose host-to-device copies may still be running on a side stream.

    Reading an entry (`cache[i]`, what diffusers and the fast forward do) makes
    the current stream wait for that entry's copy only, so compute starts as
    soon as the first entries are in, while the later ones are still coming.
    Iterating does not wait: use `settle()` to read it as a whole.
    """

    def __init__(
        self,
        items: list,
        events: dict[int, Any] | None = None,
        device: torch.device | None = None,
        pending: tuple[HostMemory, Any, list[int]] | None = None,
    ) -> None:
        super().__init__(items)
        self.events = events or {}
        self.device = device
        # (host memory, the host list's ready event, indices): entries still in host memory, whose uploads
        # `finish` queues (`HostMemory.to_device(..., count=)`).
        self.pending = pending
        self._owns_entries = True

    @property
    def owns_entries(self) -> bool:
        """Whether its tensors are its own device copies (nothing else holds them): then a new cache entry may be
        written into the storage of the entry it replaces (the fast VAE forward does, vae/fast_blocks.py), which
        keeps an offloaded history in the blocks its upload took. False once `share` handed them out."""
        return self._owns_entries

    def share(self) -> list:
        """A plain list of the entries (every copy queued and waited for), sharing its tensors with this list,
        which from then on is never written into."""
        self._owns_entries = False
        return self.settle()

    def finish(self) -> None:
        """Queue the uploads of the entries left in host memory (a no-op once every upload is queued)."""
        if self.pending is None:
            return
        host_memory, ready, indices = self.pending
        self.pending = None
        for index in indices:
            value, event = host_memory.upload(super().__getitem__(index), self.device, ready)
            super().__setitem__(index, value)
            if event is not None:
                self.events[index] = event

    def _arrive(self, index: int) -> None:
        event = self.events.pop(index, None)
        if event is not None:
            torch.cuda.current_stream(self.device).wait_event(event)

    def __getitem__(self, index):  # type: ignore[override]
        self.finish()  # a read never sees a host tensor
        if self.events and isinstance(index, int):
            self._arrive(index % len(self))
        return super().__getitem__(index)

    def __setitem__(self, index, value) -> None:  # type: ignore[override]
        self.finish()
        if self.events and isinstance(index, int):
            # The old tensor is freed by this assignment: its copy must be over first.
            self._arrive(index % len(self))
        super().__setitem__(index, value)

    def settle(self) -> list:
        """A plain list of the entries, every copy queued and waited for."""
        self.finish()
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
        return cache.share()  # from now on neither list may be written into
    if isinstance(cache, SpilledCache):
        return cache
    return list(cache)


class PendingFetch:
    """A device tensor's copy to host memory, queued behind the work that computes it (`HostMemory.fetch_later`).

    Holding one lets the caller queue more device work before waiting: a chunk's frames come back while the
    next chunk computes, instead of the device idling while the host takes them and queues the next chunk.
    """

    def __init__(self, host: torch.Tensor, done: torch.cuda.Event | None) -> None:
        self._host = host
        self._done = done

    @property
    def frames(self) -> int:
        """How many frames the copy holds (its first dimension)."""
        return int(self._host.shape[0]) if self._host.ndim else 0

    def wait(self) -> torch.Tensor:
        """The host copy (pageable: the page-locked block goes back to the pool for the next fetch)."""
        if self._done is not None:
            self._done.synchronize()
            self._host, self._done = self._host.clone(), None  # the staging block is free from here
        return self._host


class HostMemory:
    """Moves lists of tensors (VAE feat_cache lists, KV caches, weights) between a device and host memory.

    On CUDA the host copies are page-locked (`PinnedPool`: exact sizes, blocks
    reused chunk after chunk) and every copy runs asynchronously on a side
    stream (one for each direction, so uploads and downloads overlap each other
    and the compute); the current stream waits per tensor, and only where it
    reads it. On the CPU the "host copy" is simply another tensor: the same code
    path, synchronous, bit for bit the same values. Host tensors are never
    written while anyone holds them (a block is reused only after its tensor
    was dropped), so forked histories that share them stay independent.
    """

    def __init__(self, pin_memory: bool = True) -> None:
        self.pool = PinnedPool(pin=pin_memory)
        self._staging = PinnedPool()  # `fetch_later`'s blocks, each waited for before it goes back to the pool
        self._streams: dict[tuple[torch.device, str], Any] = {}

    @property
    def pin_memory(self) -> bool:
        """Whether new host blocks are page-locked (pageable ones make every copy synchronous)."""
        return self.pool.pin

    @pin_memory.setter
    def pin_memory(self, pin: bool) -> None:
        self.pool.pin = pin

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
        host, reused = self.pool.empty_like(tensor)
        if side is None:
            host.copy_(tensor)
        else:
            side.wait_stream(torch.cuda.current_stream(tensor.device))
            if reused:  # uploads queued before the block was released may still read it
                side.wait_stream(self._side(tensor.device, "up"))
            with torch.cuda.stream(side):
                host.copy_(tensor, non_blocking=True)
                tensor.record_stream(side)
        return host

    def fetch_later(self, tensor: torch.Tensor) -> PendingFetch:
        """A pageable host copy of `tensor` (a chunk's output frames), queued now and waited for by
        `PendingFetch.wait`. From CUDA it goes through a page-locked block and then one host copy: CUDA's own copy
        into fresh pageable memory holds the host, and leaves the GPU idle, far longer (bench/RESULTS.md).

        The copy runs on its own side stream, after the work queued so far (which produces the tensor), beside
        the next chunk's work rather than ahead of it on the compute stream, and not behind the offloaded
        state's transfers. The device tensor may be dropped at once: its block is not reused before the copy is
        done. Each pending fetch has its own page-locked block (the pool reuses a block once its fetch is waited
        for and dropped).
        """
        if tensor.device.type != "cuda":
            return PendingFetch(tensor.to("cpu"), None)
        staging, _ = self._staging.empty_like(tensor)  # a free block: no copy still writes or reads it
        side = self._side(tensor.device, "out")
        side.wait_stream(torch.cuda.current_stream(tensor.device))
        with torch.cuda.stream(side):
            staging.copy_(tensor, non_blocking=True)
            done = torch.cuda.Event()
            done.record(side)
        tensor.record_stream(side)
        return PendingFetch(staging, done)

    def host_memory(self) -> tuple[int, int]:
        """(bytes of host copies held now, bytes of blocks kept for reuse)."""
        return self.pool.used_bytes, self.pool.free_bytes + self._staging.free_bytes

    def trim(self) -> int:
        """Give the free pinned blocks back to the system, after the copies that may use them; bytes freed.

        Not automatic: a stage's history is often released before its successor is downloaded into the
        same blocks, and re-locking them every chunk would cost far more than the copies.
        The pipeline trims when a stream ends.
        """
        for stream in self._streams.values():
            stream.synchronize()
        return self.pool.trim() + self._staging.trim()

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

    def to_device(self, cache: list, device: torch.device, count: int | None = None) -> list:
        """A HostCache brought back to `device` (an ArrivingCache); any other list is returned as it is (an
        ArrivingCache with its remaining uploads queued).

        `count`: only the first `count` entries' uploads are queued now, the others when the list is next given
        here or read. A tile's decoder history is prefetched so: the decoder reads its full-resolution entries
        last, and the current tile's full-resolution stage is the peak, where two whole tile histories made
        the allocator free its cache under a memory cap (bench/RESULTS.md).
        """
        if isinstance(cache, SpilledCache):
            raise TypeError("a spilled cache must be read back (DiskSpill.read) before it goes to the device")
        if isinstance(cache, ArrivingCache):
            cache.finish()
        if not isinstance(cache, HostCache):
            return cache
        items, events, later = list(cache), {}, []
        for i, t in enumerate(cache):
            if isinstance(t, torch.Tensor):
                if count is not None and i >= count:
                    later.append(i)
                    continue
                items[i], event = self.upload(t, device, cache.ready)
                if event is not None:
                    events[i] = event
        return ArrivingCache(items, events, device, (self, cache.ready, later) if later else None)
