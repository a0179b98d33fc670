"""Memory handling: what lives where between uses, and how it moves between the device, host memory and disk.

- policy.py: `OffloadPolicy`, what the offload modes keep in host memory (the modes' one description)
- host.py: the cache lists that say where their entries are (`HostCache`, `ArrivingCache`, `SpilledCache`), and
  `HostMemory`, which moves them with overlapped copies and fetches a chunk's frames (`PendingFetch`)
- pinned.py: `PinnedPool`, the exact-size page-locked blocks those copies go through
- kv.py: `WindowedUpload`, a KV cache streamed through the DiT a layer at a time
- modules.py: `ModuleOffload`, a module's weights in host memory outside its calls
- spill.py: `DiskSpill`, histories past a host memory budget written to files
- plan.py: the lower bound of a stream's memory, checked before the first chunk (`check_fits`)
- transfer.py: `to_device_async`, small CPU tensors to the device without waiting for it
"""

from __future__ import annotations

from .host import ArrivingCache, HostCache, HostMemory, ManagedCache, PendingFetch, SpilledCache, copy_cache
from .kv import WindowedUpload
from .modules import ModuleOffload
from .pinned import PinnedPool
from .plan import MemoryNeed, activation_bytes, available_memory, check_fits, stream_need
from .policy import AUTO_MODE, OFFLOAD_CHOICES, OFFLOAD_MODES, OffloadMode, OffloadPolicy
from .spill import DiskSpill
from .transfer import to_device_async

__all__ = [
    "AUTO_MODE",
    "OFFLOAD_CHOICES",
    "OFFLOAD_MODES",
    "ArrivingCache",
    "DiskSpill",
    "HostCache",
    "HostMemory",
    "ManagedCache",
    "MemoryNeed",
    "ModuleOffload",
    "OffloadMode",
    "OffloadPolicy",
    "PendingFetch",
    "PinnedPool",
    "SpilledCache",
    "WindowedUpload",
    "available_memory",
    "check_fits",
    "copy_cache",
    "activation_bytes",
    "stream_need",
    "to_device_async",
]
