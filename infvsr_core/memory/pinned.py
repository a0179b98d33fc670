"""Page-locked host blocks of exact sizes, reused chunk after chunk (`PinnedPool`).

Why: asynchronous copies between the device and the host need page-locked host
memory, and the offloaded state asks for the same sizes every chunk (the same
cache entries come back), so a pool of exact-size blocks holds the live state
plus about one tile's worth, where PyTorch's pinned allocator would round every
block up to a power of two and keep it.
"""

from __future__ import annotations

import warnings
import weakref
from collections import defaultdict, deque

import torch


class PinnedPool:
    """Exact-size page-locked host tensors, whose blocks are reused once the tensors handed out are dropped.

    Why not `pin_memory=True`: PyTorch's pinned allocator rounds every block up
    to a power of two and keeps it cached, which took a large host out of memory
    with 4K tile histories. Here a large block is a plain host tensor registered
    with CUDA (cudaHostRegister) at its exact size (`_new_block`; only for copies
    of CUDA tensors, and small blocks come from PyTorch); when the tensor handed
    out is garbage, its block goes back to a free list for the next request of
    the same size.

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
                    "VAE history in host memory, as the release does, which at 4K outgrows most hosts); cap it and "
                    "spill the rest to disk (--spill-dir/--host-memory, load_pipeline(spill_dir=..., "
                    "host_memory_gib=...)), use a smaller output, or offload='none'/'histories' where the GPU has room"
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
