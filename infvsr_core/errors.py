"""The errors InfVSR raises on purpose: each message names the file or option at fault and what to do.

Everything here derives from `InfVSRError`, so a front end (the command line, a
node) prints the message as it is and treats anything else as a bug to report.
The classes also derive from the built-in they refine (ValueError, OSError), so
callers that catch those keep working.
"""

from __future__ import annotations


class InfVSRError(Exception):
    """Base of the errors whose message is meant for the user as it stands."""


class UsageError(InfVSRError, ValueError):
    """An option or argument that cannot work (a bad value, an output that must not be written)."""


class VideoError(InfVSRError, ValueError):
    """A video cannot be read or written; the message names the file and what is wrong with it."""


class DamagedVideoError(VideoError):
    """The input stops early or cannot be decoded past a point; the frames before it were delivered."""


class WeightFileError(InfVSRError, ValueError):
    """A weight file is missing, unreadable, or does not hold what was expected."""


class DownloadError(InfVSRError, OSError):
    """A weight file could not be fetched: the network is unreachable (or offline mode is on), the repository or
    file is not found, or access is refused; the message names the file and its repository."""


class SpillError(InfVSRError, OSError):
    """A history could not be written to or read from the spill folder (disk full, folder removed...)."""


class OutOfMemoryPlan(InfVSRError, MemoryError):
    """A frame size whose stream state cannot fit this machine; the message says what would."""
