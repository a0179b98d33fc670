"""Host offload: state and weights kept in host memory between uses, moved with overlapped copies.

Why: at 720p the causal state alone (VAE histories, rolling KV cache) is larger
than a consumer GPU's spare memory, and at 4K it is larger than any GPU's.
Lists of tensors (VAE feat_cache lists, a KV cache's layers, a module's
weights) go to pinned host memory and come back on side streams, and compute
waits per tensor, only where it reads it, so the copies overlap the work.
On the CPU the same code runs synchronously and gives the same values.
"""

from __future__ import annotations

import warnings
import weakref
from collections import defaultdict, deque
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


class SpilledCache(list):
    """A HostCache written to a file by `spill.DiskSpill`: the entries are the non-tensor ones (None, "Rep") and,
    for tensors, their index in the file. Immutable once written, so forked histories may share it; the file
    goes when the last holder drops it. Read it back with the DiskSpill that wrote it (`spill`)."""

    def __init__(self, items: list, spill: Any, path: Any) -> None:
        super().__init__(items)
        self.spill = spill
        self.path = path
        self.reading: Any = None


class ArrivingCache(list):
    """A list of device tensors whose host-to-device copies may still be running on a side stream.

    Reading an entry (`cache[i]`, what diffusers and the fast forward do) makes
    the current stream wait for that entry's copy only, so compute starts as
    soon as the first entries are in, while the later ones are still coming.
    Iterating does not wait: use `settle()` to read it as a whole.
    """

    # Its tensors are this list's own device copies (nothing else holds them): the fast VAE forward may write a
    # conv's new cache entry into the old entry's storage (fast_vae._stage) instead of allocating one.
    private = True

    def __init__(
        self,
        items: list,
        events: dict[int, Any] | None = None,
        device: torch.device | None = None,
        pending: tuple[HostOffload, Any, list[int]] | None = None,
    ) -> None:
        super().__init__(items)
        self.events = events or {}
        self.device = device
        # (offload, the host list's ready event, indices): entries still in host memory, whose uploads `finish`
        # queues (`HostOffload.to_device(..., count=)`).
        self.pending = pending

    def finish(self) -> None:
        """Queue the uploads of the entries left in host memory (a no-op once every upload is queued)."""
        if self.pending is None:
            return
        offload, ready, indices = self.pending
        self.pending = None
        for index in indices:
            value, event = offload.upload(super().__getitem__(index), self.device, ready)
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


def to_device_async(tensor: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """`tensor` on `device`, without the host waiting for the GPU.

    A copy from pageable host memory waits for every kernel queued before it,
    and the GPU then idles while the host launches the next ones (~1 ms a time
    at 720p, more at 480p): small CPU tensors (RoPE tables, latent statistics,
    a chunk's input frames) go through page-locked memory, asynchronously.
    """
    device = torch.device(device)
    if device.type == "cuda" and tensor.device.type == "cpu":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def copy_cache(cache: list) -> list:
    """An independent copy of a cache list (tensors shared), keeping where its tensors live."""
    if isinstance(cache, HostCache):
        copied = HostCache(cache)
        copied.ready = cache.ready
        return copied
    if isinstance(cache, ArrivingCache):
        cache.private = False  # the copy shares its tensors: from now on neither may be written into
        return cache.settle()
    if isinstance(cache, SpilledCache):
        return cache
    return list(cache)


class PinnedPool:
    """Exact-size page-locked host tensors, whose blocks are reused once the tensors handed out are dropped.

    Why not `pin_memory=True`: PyTorch's pinned allocator rounds every block up
    to a power of two and keeps it cached, so the ~80 GiB of 4K tile histories
    took a 125 GiB host out of memory. Here a large block is a plain host tensor
    registered with CUDA (cudaHostRegister) at its exact size (`_new_block`; only
    for copies of CUDA tensors, and small blocks come from PyTorch); when the tensor
    handed out is garbage, its block goes back to a free list for the next
    request of the same size (the same cache entries come back every chunk), so
    the pool holds the live state plus about one tile's worth.

    Releases arrive from finalizers (at any point, even inside `empty_like`), so
    they are queued and only applied by the pool's own calls. A reused block may
    still be read by a copy queued before its tensor was dropped: the caller
    orders its new copy after those (`empty_like` says when a block is reused).
    """

    SMALL_BLOCK = 1 << 20

    def __init__(self, pin: bool = True) -> None:
        self.pin = pin
        self._free: dict[int, list[torch.Tensor]] = defaultdict(list)
        self._released: deque[torch.Tensor] = deque()
        self._free_bytes = 0
        self._used_bytes = 0
        self._pin_failed = False

    @property
    def used_bytes(self) -> int:
        """Bytes of blocks held by live tensors."""
        self._drain()
        return self._used_bytes

    @property
    def free_bytes(self) -> int:
        """Bytes of released blocks kept for reuse."""
        self._drain()
        return self._free_bytes

    def _new_block(self, nbytes: int, pin: bool) -> torch.Tensor:
        """A host block of exactly `nbytes`, page-locked when pinning (small ones by PyTorch's allocator).

        Blocks under SMALL_BLOCK may share a memory page with other allocations, which
        cudaHostRegister cannot lock twice: those come from PyTorch's pinned allocator, whose
        power-of-two rounding costs little at that size. Large blocks are page-aligned
        (the C allocator maps them), registered, and unlocked when garbage (weakref
        callbacks run before the memory is freed, so freed memory is never left registered).
        """
        pin = pin and self.pin
        if pin and nbytes < self.SMALL_BLOCK:
            return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        block = torch.empty(nbytes, dtype=torch.uint8)
        if not pin or self._pin_failed:
            return block
        error = torch.cuda.cudart().cudaHostRegister(block.data_ptr(), nbytes, 0)
        if int(error) == 0:
            weakref.finalize(block, PinnedPool._unregister_address, block.data_ptr())
            return block
        self._pin_failed = True
        warnings.warn(
            f"could not page-lock {nbytes / 2**30:.2f} GiB of host memory ({error}); large offloaded state "
            "continues in pageable memory, with slower, synchronous copies",
            RuntimeWarning,
            stacklevel=3,
        )
        return block

    @staticmethod
    def _unregister_address(address: int) -> None:
        try:
            torch.cuda.cudart().cudaHostUnregister(address)
        except Exception:  # noqa: BLE001 - at interpreter exit CUDA may already be gone
            pass

    def _release(self, block: torch.Tensor) -> None:
        self._released.append(block)  # deque.append is atomic: safe from a finalizer

    def _drain(self) -> None:
        while self._released:
            block = self._released.popleft()
            self._used_bytes -= block.numel()
            self._free_bytes += block.numel()
            self._free[block.numel()].append(block)

    def empty_like(self, tensor: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """An uninitialized host tensor with `tensor`'s shape, dtype and strides, and whether its block is reused."""
        self._drain()
        nbytes = tensor.numel() * tensor.element_size()
        free = self._free.get(nbytes)
        reused = bool(free)
        if free:
            block = free.pop()
            self._free_bytes -= nbytes
        else:
            try:
                block = self._new_block(nbytes, pin=tensor.is_cuda)  # host copies of CPU tensors: no CUDA
            except RuntimeError as e:  # the host allocator's "can't allocate memory"
                raise MemoryError(
                    f"out of host memory for the offloaded stream state: {nbytes / 2**30:.2f} GiB more were "
                    f"needed on top of {self._used_bytes / 2**30:.1f} GiB held (tiled outputs keep every tile's "
                    "VAE history in host memory, as the release does: ~93 GiB at 4K); cap it and spill the rest "
                    "to disk (--spill-dir/--host-memory, load_pipeline(spill_dir=..., host_memory_gib=...)), "
                    "use a smaller output, or offload='none'/'histories' where the GPU has room"
                ) from e
        self._used_bytes += nbytes
        # empty_like's strides (channels-last stays channels-last), computed without allocating.
        strides = torch.empty_like(tensor, device="meta").stride()
        out = block.view(tensor.dtype).as_strided(tensor.shape, strides)
        weakref.finalize(out, self._release, block)
        return out, reused

    def trim(self) -> int:
        """Drop every free block (unlocked as it goes); returns the bytes dropped. No copy may still use them."""
        dropped = self.free_bytes
        self._free.clear()
        self._free_bytes = 0
        return dropped


class PendingFetch:
    """A device tensor's copy to host memory, queued behind the work that computes it (`HostOffload.fetch_later`).

    Holding one lets the caller queue more device work before waiting: a chunk's frames come back while the
    next chunk computes, instead of the device idling while the host takes them and queues the next chunk.
    """

    def __init__(self, host: torch.Tensor, done: torch.cuda.Event | None) -> None:
        self._host = host
        self._done = done

    @property
    def frames(self) -> int:
        return int(self._host.shape[0]) if self._host.ndim else 0

    def wait(self) -> torch.Tensor:
        """The host copy (pageable: the page-locked block goes back to the pool for the next fetch)."""
        if self._done is not None:
            self._done.synchronize()
            self._host, self._done = self._host.clone(), None  # the staging block is free from here
        return self._host


class HostOffload:
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
        self._staging = PinnedPool()  # `fetch`'s blocks, each waited for before it goes back to the pool
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

    def fetch(self, tensor: torch.Tensor) -> torch.Tensor:
        """A pageable host copy of `tensor` (a chunk's output frames, for the caller to keep), waited for.

        From CUDA, through a page-locked block and then one host copy: 9 ms for a 720p chunk, where CUDA's own
        copy into fresh pageable memory held the host, and the GPU idle, for 81 ms (20 vs 185 ms at 1080p:
        bench/RESULTS.md round 8). `fetch_later` is the same copy, waited for when its result is wanted.
        """
        return self.fetch_later(tensor).wait()

    def fetch_later(self, tensor: torch.Tensor) -> PendingFetch:
        """`fetch` of `tensor`, queued now and waited for by `PendingFetch.wait`.

        The copy runs on its own side stream, after the work queued so far (which produces the tensor), beside
        the next chunk's work rather than ahead of it (5 ms of a 720p chunk, 11 ms at 1080p, were the compute
        stream's), and not behind the offloaded state's transfers. The device tensor may be dropped at once: its
        block is not reused before the copy is done. Each pending fetch has its own page-locked block (the pool
        reuses a block once its fetch is waited for and dropped).
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
        same blocks (a decoder history of 4 GiB at 720p), and re-locking them every chunk costs ~1 s.
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
        the allocator free its cache under a memory cap (bench/RESULTS.md round 9).
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


class WindowedUpload:
    """A HostCache read on the device a few entries at a time (a KV cache streamed layer by layer).

    Reading entry i queues the uploads of entries i .. i + `ahead` (those not
    queued yet) and makes the current stream wait for entry i's; `cache[i] =
    None` drops the device copy. So the device holds about `ahead` + 1 entries,
    not the whole list, and each upload overlaps the work on the entry before.

    With `consume`, each host entry is dropped from the list once its upload is
    queued (the list is being replaced, as a KV cache is by the DiT step), so its
    pinned block can take a new entry right away: at 4K that keeps one 18 GiB
    KV cache in host memory instead of two. Otherwise the host list is never changed.
    """

    def __init__(
        self, host: HostCache, offload: HostOffload, device: torch.device, ahead: int = 1, consume: bool = False
    ) -> None:
        self.host = host
        self.offload = offload
        self.device = device
        self.ahead = ahead
        self.consume = consume
        self._items: dict[int, torch.Tensor | None] = {}
        self._events: dict[int, Any] = {}

    def __len__(self) -> int:
        return len(self.host)

    def _start(self, index: int) -> None:
        if index < len(self.host) and index not in self._items:
            self._items[index], event = self.offload.upload(self.host[index], self.device, self.host.ready)
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
