"""TEMPORARY (memory refactor): the old names, for infvsr_core/vae/ until it imports infvsr_core.memory.

Deleted once the VAE package imports the memory package (no new code may import this).
"""

from __future__ import annotations

from .memory.host import ArrivingCache, HostCache, PendingFetch, SpilledCache, copy_cache
from .memory.host import HostMemory as HostOffload
from .memory.kv import WindowedUpload
from .memory.modules import ModuleOffload
from .memory.pinned import PinnedPool
from .memory.transfer import to_device_async

__all__ = [
    "ArrivingCache",
    "HostCache",
    "HostOffload",
    "ModuleOffload",
    "PendingFetch",
    "PinnedPool",
    "SpilledCache",
    "WindowedUpload",
    "copy_cache",
    "to_device_async",
]
