"""How a command ends: its exit codes and the one line it prints for a stop or a damaged input.

The plain `upscale` run and the film job (jobs/command.py) end the same way, so they share these.
"""

from __future__ import annotations

import signal
import sys
from typing import Any

EXIT_ERROR = 1
EXIT_DAMAGED_INPUT = 3
"""The input was truncated or corrupt: the frames before the damage were kept (without --strict)."""
EXIT_INTERRUPTED = 128 + signal.SIGINT


def stop_word(stop: KeyboardInterrupt) -> str:
    """ "interrupted" for Ctrl-C, "stopped by SIGTERM" (or the signal's name) for a stop signal."""
    signum = getattr(stop, "signum", None)
    return "interrupted" if signum is None else f"stopped by {signal.Signals(signum).name}"


def report_damage(result: Any) -> int:
    """A damaged input's one line (what was kept: the frames before the damage), and its exit code.
    `result`: a `film.FilmResult` or a job's result (damage, frames, path)."""
    print(
        f"error: {result.damage}; kept the {result.frames} frames before it in {result.path} "
        f"(--strict keeps nothing on a damaged input)",
        file=sys.stderr,
    )
    return EXIT_DAMAGED_INPUT
