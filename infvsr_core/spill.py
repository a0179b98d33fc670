"""TEMPORARY (memory refactor): the old name, for infvsr_core/vae/ until it imports infvsr_core.memory.spill."""

from __future__ import annotations

from .errors import SpillError
from .memory.spill import DiskSpill

__all__ = ["DiskSpill", "SpillError"]
