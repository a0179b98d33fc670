"""Tile histories spilled to a scratch folder when host memory is capped.

Why: the release keeps every tile's VAE history (encoder and decoder causal
caches) between chunks, which at 4K is more host memory than most machines
have. With a budget, a history that has just been used and pushes
the offloaded state past it goes to a file instead (tiles are visited in the
same order every chunk, so the one just used is the one needed last), and is
read back, one tile ahead, when its turn comes. The values are bit for bit
the same; the cost is the disk's time to write and read the spilled bytes.

Files are written by one background thread (so the GPU keeps working while
they are), under a temporary name renamed when complete, and deleted when
their history is dropped.
"""

from __future__ import annotations

import os
import pickle
import shutil
import tempfile
import weakref
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch

from ..errors import SpillError
from .host import HostCache, SpilledCache

PENDING_WRITES = 2  # spilled histories whose write may still be running (each holds its host memory until done)


def _unlink_later(written: Future, path: Path) -> None:
    written.add_done_callback(lambda _: path.unlink(missing_ok=True))


class DiskSpill:
    """Writes HostCaches to files in a private folder under `folder` and reads them back."""

    def __init__(self, folder: str | os.PathLike, budget_bytes: int) -> None:
        parent = Path(folder)
        try:
            parent.mkdir(parents=True, exist_ok=True)
            self.folder = Path(tempfile.mkdtemp(prefix="infvsr-spill-", dir=parent))
        except OSError as e:
            raise SpillError(f"cannot create a spill folder in '{parent}': {e}") from e
        self.budget = int(budget_bytes)
        self._io = ThreadPoolExecutor(max_workers=1, thread_name_prefix="infvsr-spill")
        self._pending: deque[Future] = deque()
        self._count = 0
        self.spilled_bytes = 0  # written since creation
        self._finalizer = weakref.finalize(self, _close, self._io, self.folder)

    def write(self, cache: HostCache) -> SpilledCache:
        """Queue `cache` for writing; returns its stand-in. Waits when PENDING_WRITES writes are already queued."""
        self._raise_failed()
        while len(self._pending) >= PENDING_WRITES:
            self._wait(self._pending.popleft())
        tensors = [t for t in cache if isinstance(t, torch.Tensor)]
        items, index = [], 0
        for entry in cache:
            if isinstance(entry, torch.Tensor):
                items.append(index)
                index += 1
            else:
                items.append(entry)
        self._count += 1
        path = self.folder / f"history-{self._count:06d}.pt"
        nbytes = sum(t.numel() * t.element_size() for t in tensors)
        written = self._io.submit(_write, path, tensors, cache.ready)
        del tensors
        self._pending.append(written)
        self.spilled_bytes += nbytes
        spilled = SpilledCache(items, self, path)
        weakref.finalize(spilled, _unlink_later, written, path)
        return spilled

    def read_ahead(self, spilled: SpilledCache) -> None:
        """Start reading `spilled` back in the background (it is needed next)."""
        if spilled.reading is None:
            spilled.reading = self._io.submit(_read, spilled.path)

    def read(self, spilled: SpilledCache) -> HostCache:
        """`spilled` back in host memory (waiting for its read, started now if it was not)."""
        self.read_ahead(spilled)
        tensors = self._wait(spilled.reading)
        spilled.reading = None  # a fork that reads it again reads the file again
        return HostCache([tensors[e] if isinstance(e, int) else e for e in spilled])

    def _raise_failed(self) -> None:
        while self._pending and self._pending[0].done():
            self._wait(self._pending.popleft())

    def _wait(self, future: Future):
        try:
            return future.result()
        except (OSError, RuntimeError, pickle.UnpicklingError) as e:  # torch.load: a damaged file
            raise SpillError(
                f"VAE history spill to '{self.folder}' failed: {e}. Free disk space there (it holds the histories "
                f"that do not fit the host memory budget of {self.budget / 2**30:.1f} GiB), choose another folder, "
                "or raise the budget"
            ) from e

    def flush(self) -> None:
        """Wait for every queued write and read (raising a failed write's error)."""
        self._io.submit(lambda: None).result()
        while self._pending:
            self._wait(self._pending.popleft())

    def close(self) -> None:
        """Wait for the I/O and remove the folder with its files."""
        self._finalizer()


def _write(path: Path, tensors: list[torch.Tensor], ready) -> None:
    if ready is not None:
        ready.synchronize()  # the downloads that fill the host tensors
    partial = path.with_suffix(".partial")
    try:
        with open(partial, "wb") as f:  # a Python file: a full disk or a missing folder raise OSError
            torch.save(tensors, f)
        partial.replace(path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


def _read(path: Path) -> list[torch.Tensor]:
    return torch.load(path, weights_only=True)


def _close(io: ThreadPoolExecutor, folder: Path) -> None:
    io.shutdown(wait=True)
    shutil.rmtree(folder, ignore_errors=True)
