"""When ComfyUI itself is stopped, keep what InfVSR has written.

`kill`, `docker stop`, systemd, Slurm and Kubernetes stop a server with
SIGTERM, which by default ends Python at once: every open output would stay a
hidden temporary file. On SIGTERM this raises ComfyUI's interrupt (the node in
progress stops at its next chunk, as on Cancel), finalizes every open output
(a valid, shorter file under its final name), then lets the signal do what it
did before (the previous handler, or the default: the process ends).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import weakref
from typing import Any

from . import comfy

log = logging.getLogger("infvsr")

FINALIZE_WAIT_SECONDS = 30.0
"""How long the handler waits for a chunk being written to finish before it finalizes that output."""

OPEN_OUTPUTS: weakref.WeakSet[Any] = weakref.WeakSet()
"""Every VideoSink not yet closed: the file node's, and the stream nodes' that stay open between queue runs."""

_previous: Any = None


def install() -> bool:
    """Take SIGTERM (once, from the main thread only; elsewhere signals are not ours to set)."""
    global _previous
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "SIGTERM"):
        return False
    current = signal.getsignal(signal.SIGTERM)
    if current is _on_stop:
        return True
    _previous = current
    signal.signal(signal.SIGTERM, _on_stop)
    return True


def finalize_open_outputs() -> list[Any]:
    """Finalize every open output as a valid file of what it holds; returns the paths kept."""
    kept = []
    for sink in list(OPEN_OUTPUTS):
        path = sink.finalize_partial(wait=FINALIZE_WAIT_SECONDS)
        if path is not None:
            kept.append(path)
    return kept


def _on_stop(signum: int, frame: Any) -> None:
    comfy.interrupt_processing()
    kept = finalize_open_outputs()
    if kept:
        log.warning("InfVSR: stopped by SIGTERM; kept the finished frames in %s", ", ".join(map(str, kept)))
    previous = _previous
    if callable(previous):
        previous(signum, frame)
    elif previous != signal.SIG_IGN:
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
