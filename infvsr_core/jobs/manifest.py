"""The job folder beside the output: the manifest that makes a job resumable, and the lock that keeps it single.

`OUTPUT.infvsr-job/` holds `manifest.json` (the job's identity, the first pass's cuts and segments, and the
segments finished so far), `lock` (the driver running it), and `segments/` (one finished file per segment).
Only the driver writes the manifest, always whole (a temporary file renamed over it), after a segment's file
is complete under its final name: a crash at any point leaves either the old or the new manifest, and never
records a segment whose file is not all there. A segment file the manifest does not list is redone.

The lock is a file created exclusively, naming the driver's process and host. Another job on the same output
is refused; a lock whose process has ended on this host (SIGKILL, power cut) is stale and taken over, as the
writer treats its temporary files (`io/outputs.py`). A lock from another host cannot be checked from here:
the message says so, and which file to delete if that job is gone.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import UsageError
from ..io.outputs import HOST_TAG, new_token, pid_alive
from .segments import Segment

JOB_SUFFIX = ".infvsr-job"
MANIFEST = "manifest.json"
LOCK = "lock"
SEGMENTS = "segments"
FORMAT = 1
"""Manifest format: a manifest of another format is never resumed from."""


def job_folder(output: str | os.PathLike[str]) -> Path:
    """Where a job keeps its state: `OUTPUT.infvsr-job/` beside the output (shared storage for a cluster)."""
    output = Path(output)
    return output.with_name(output.name + JOB_SUFFIX)


def write_json_atomic(path: Path, data: Any) -> None:
    """Write `data` as JSON under a temporary name, flush it to disk, then rename it over `path`."""
    temp = path.with_name(f".{path.name}.{new_token()}.tmp")
    try:
        with open(temp, "x", encoding="utf-8") as f:
            json.dump(data, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            temp.unlink()
        raise
    with contextlib.suppress(OSError):  # the rename itself reaches the disk (not possible on every system)
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class JobLock:
    """The job folder's lock: one driver per output at a time (`acquire` refuses a live one, takes a stale one)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.path = folder / LOCK
        self.held = False

    def acquire(self) -> JobLock:
        self.folder.mkdir(parents=True, exist_ok=True)
        owner = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "host_tag": HOST_TAG,
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        for _ in range(3):
            try:
                with open(self.path, "x", encoding="utf-8") as f:
                    json.dump(owner, f)
                self.held = True
                return self
            except FileExistsError:
                pass
            holder = self._read()
            reason = self._stale(holder)
            if reason is None:
                raise UsageError(self._busy_message(holder))
            # Set the stale lock aside under a unique name first: of two jobs taking it over at once, one renames
            # it and creates the new lock; the other finds that new lock, alive, and is refused.
            aside = self.path.with_name(f".{LOCK}.{new_token()}.stale")
            try:
                os.rename(self.path, aside)
            except FileNotFoundError:
                continue
            with contextlib.suppress(OSError):
                aside.unlink()
        raise UsageError(f"could not take the lock {self.path}: other jobs keep taking it")

    def _read(self) -> dict[str, Any]:
        try:
            return json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}

    @staticmethod
    def _stale(holder: dict[str, Any]) -> str | None:
        """Why the lock's job cannot be running any more, or None if it may be."""
        pid, tag = holder.get("pid"), holder.get("host_tag")
        if not isinstance(pid, int) or tag != HOST_TAG:
            return None
        if pid != os.getpid() and not pid_alive(pid):
            return f"process {pid} has ended"
        return None

    def _busy_message(self, holder: dict[str, Any]) -> str:
        who = f"process {holder.get('pid', '?')} on {holder.get('host', '?')}, since {holder.get('started', '?')}"
        output = self.folder.name[: -len(JOB_SUFFIX)]
        advice = (
            "wait for it to finish or stop it"
            if holder.get("host_tag") == HOST_TAG
            else f"if that job is no longer running (another machine, which this one cannot check), delete {self.path}"
        )
        return f"another job is writing {output} ({who}): {advice}"

    def release(self) -> None:
        if self.held:
            self.held = False
            with contextlib.suppress(FileNotFoundError):
                if self._read().get("pid") == os.getpid():
                    self.path.unlink()

    def __enter__(self) -> JobLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


@dataclass
class Manifest:
    """A job's record: identity, the first pass's result, the segments, and which are finished."""

    identity: dict[str, Any]
    scan: dict[str, Any]
    """start, frames, cuts, first_time, duration, fps, has_audio, damage: the first pass, so a resume skips it."""
    segments: list[Segment]
    done: dict[int, dict[str, Any]] = field(default_factory=dict)
    """Finished segments: index -> {file, bytes, frames, worker, seconds}."""

    @staticmethod
    def path_in(folder: Path) -> Path:
        return folder / MANIFEST

    def save(self, folder: Path) -> None:
        data = {
            "format": FORMAT,
            "identity": self.identity,
            "scan": self.scan,
            "segments": [s.to_json() for s in self.segments],
            "done": {str(k): v for k, v in sorted(self.done.items())},
        }
        write_json_atomic(self.path_in(folder), data)

    @classmethod
    def load(cls, folder: Path) -> Manifest | None:
        """The folder's manifest, or None when there is none (or it is of another format)."""
        try:
            data = json.loads(cls.path_in(folder).read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            raise UsageError(
                f"the job manifest {cls.path_in(folder)} cannot be read ({e}); delete {folder} to start over"
            ) from e
        if data.get("format") != FORMAT:
            return None
        return cls(
            data["identity"],
            data["scan"],
            [Segment.from_json(s) for s in data["segments"]],
            {int(k): v for k, v in data.get("done", {}).items()},
        )

    def finished(self, segment: Segment, folder: Path) -> bool:
        """Whether the segment is recorded as finished and its file is still there, whole (same size)."""
        record = self.done.get(segment.index)
        if record is None:
            return False
        try:
            return (folder / record["file"]).stat().st_size == record["bytes"]
        except OSError:
            return False


def differences(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """The keys whose values differ between two identities, as dotted names (for the refusal message)."""
    keys = sorted(set(old) | set(new))
    out: list[str] = []
    for key in keys:
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out.extend(differences(a, b, f"{prefix}{key}."))
        elif a != b:
            out.append(f"{prefix}{key}")
    return out


def remove_job_folder(folder: Path) -> None:
    """Delete a finished job's folder (its segments are in the output now)."""
    shutil.rmtree(folder, ignore_errors=True)
