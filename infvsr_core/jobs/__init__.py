"""Film jobs: one film upscaled scene by scene on many devices and machines, exactly, resumably.

InfVSR resets its whole state (KV cache, VAE histories, visual prompt) at every scene cut, so the scenes of a
film are independent streams: upscaled in parallel and joined, they give exactly the frames of one sequential
run. A job is:

    spec.py      JobSpec and its parts: what to read, write and load (plain data, no torch, no Ray)
    cuts.py      the first pass: the cuts the upscale's own detector finds, and KnownCuts to replay them
    segments.py  scenes grouped into segments of a useful length (long scenes optionally split with a warm-up)
    manifest.py  the job folder beside the output: manifest (identity, finished segments) and the lock
    workers.py   one Ray actor per device holding a loaded pipeline; a segment is a Film over a frame range
    join.py      segment files joined by stream copy into the output, the audio muxed once over the whole
    job.py       the orchestration: lock, first pass or resume, Ray dispatch (longest first), join
    command.py   the command line's `upscale --devices ...` over `run_job`, with progress

Ray is optional (`pip install ray`): only `workers.py` and `job.py` import it, when a job runs.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .job import JobResult, run_job
    from .spec import EncodeOptions, JobSpec, LoadOptions

_EXPORTS = {
    "JobSpec": "spec",
    "LoadOptions": "spec",
    "EncodeOptions": "spec",
    "run_job": "job",
    "JobResult": "job",
}

__all__ = ["EncodeOptions", "JobResult", "JobSpec", "LoadOptions", "run_job"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
