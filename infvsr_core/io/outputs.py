"""Where a writer's output lives until it is finished: hidden temporary names, and the file system steps around them.

Each writer fills a temporary of its own next to the output, named after the output and its owner
(``.stem.<pid>-<host>-<random>.partial.ext``, or ``.name.<pid>-<host>-<random>.partial`` for a PNG folder), so
that runs writing one output never share a file, a later run can tell a killed run's leftovers from a live
writer's, and a caller choosing a fresh name can skip one that is still being filled.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import secrets
import shutil
import socket
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)

# The fixed temporary name of earlier versions names no owner: untouched for this long, no writer is filling it.
_LEGACY_STALE_S = 60.0
# errno values meaning "the device (or a quota, or a file size limit) cannot take more bytes".
_DISK_FULL = {errno.ENOSPC, errno.EFBIG, getattr(errno, "EDQUOT", errno.ENOSPC)}


def _host_tag() -> str:
    """Six hex digits naming this machine: a process id in a temporary name only means something on the host that
    wrote it (an output folder can be shared between machines or containers)."""
    return f"{zlib.crc32(socket.gethostname().encode()) & 0xFFFFFF:06x}"


HOST_TAG = _host_tag()


def new_token() -> str:
    """`<pid>-<host>-<random>`: unique per writer, and tells a later run whether the owner may still be alive."""
    return f"{os.getpid()}-{HOST_TAG}-{secrets.token_hex(4)}"


def _temp_candidates(path: Path) -> Iterator[tuple[Path, int | None, str | None]]:
    """Temporary outputs of `path` in its folder, as (temp, pid, host); pid and host are None for the legacy fixed
    name. Both shapes are matched, file (`.stem.<token>.partial.ext`) and folder (`.name.<token>.partial`): either
    one is a writer aiming at this very name."""
    forms = {(path.stem, path.suffix), (path.name, "")}
    legacy = {f".{base}.partial{ext}" for base, ext in forms}
    patterns = [
        re.compile(rf"\.{re.escape(base)}\.(\d+)-([0-9a-f]{{6}})-[0-9a-f]{{8}}\.partial{re.escape(ext)}")
        for base, ext in forms
    ]
    try:
        names = os.listdir(path.parent)
    except OSError:
        return
    for name in names:
        if name in legacy:
            yield path.parent / name, None, None
            continue
        for pattern in patterns:
            match = pattern.fullmatch(name)
            if match:
                yield path.parent / name, int(match[1]), match[2]
                break


def unfinished_outputs(path: str | os.PathLike[str]) -> list[Path]:
    """Temporary files or folders of writers aiming at `path` (running, or left by a killed run): a caller choosing
    a fresh output name skips a name that another writer is still filling."""
    return sorted(temp for temp, _, _ in _temp_candidates(Path(path)))


def pid_alive(pid: int) -> bool:
    """Whether process `pid` runs on this machine; when unsure, alive (a live writer's temp is never removed)."""
    if pid <= 0:
        return True
    if os.name == "nt":  # os.kill(pid, 0) would terminate the process on Windows
        import ctypes

        kernel32 = ctypes.WinDLL("kernel32", use_last_error=True)  # type: ignore[attr-defined]
        kernel32.OpenProcess.restype = ctypes.c_void_p  # a HANDLE is pointer-sized; the int default truncates it
        kernel32.GetExitCodeProcess.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_ulong)]
        kernel32.CloseHandle.argtypes = [ctypes.c_void_p]
        handle = kernel32.OpenProcess(0x1000, False, pid)  # PROCESS_QUERY_LIMITED_INFORMATION
        if not handle:
            return ctypes.get_last_error() != 87  # type: ignore[attr-defined]  # ERROR_INVALID_PARAMETER: no such id
        try:
            code = ctypes.c_ulong()
            return not kernel32.GetExitCodeProcess(handle, ctypes.byref(code)) or code.value == 259  # STILL_ACTIVE
        finally:
            kernel32.CloseHandle(handle)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists, under another user
        return True
    return True


def _newest_mtime(path: Path) -> float:
    """Last change of a temp file, or of a temp folder and the frames in it (now when it cannot be read: kept)."""
    try:
        newest = path.stat().st_mtime
        if path.is_dir():
            with os.scandir(path) as entries:
                for entry in entries:
                    newest = max(newest, entry.stat(follow_symlinks=False).st_mtime)
        return newest
    except OSError:
        return time.time()


def _stale_reason(temp: Path, pid: int | None, host: str | None) -> str | None:
    """Why `temp` belongs to no running writer, or None if it may (then it must stay)."""
    if pid is None:
        if time.time() - _newest_mtime(temp) > _LEGACY_STALE_S:
            return "an earlier version's temporary name, no longer being written"
        return None
    if host != HOST_TAG:  # another machine's writer: its process id cannot be checked from here
        return None
    if pid == os.getpid() or pid_alive(pid):
        return None
    return f"the run that wrote it (process {pid}) has ended"


def remove_stale_temps(path: Path) -> None:
    """Delete what killed runs (SIGKILL, power cut) left behind for this output, saying so."""
    for temp, pid, host in _temp_candidates(path):
        reason = _stale_reason(temp, pid, host)
        if reason is None:
            continue
        log.warning("removing %s, an unfinished temporary output for %s: %s", temp, path, reason)
        try:
            if temp.is_dir() and not temp.is_symlink():
                shutil.rmtree(temp)
            else:
                temp.unlink()
        except FileNotFoundError:  # another writer starting now removed it first
            pass
        except OSError as e:
            log.warning("could not remove %s: %s", temp, e.strerror or e)


def move_exclusive(src: Path, dst: Path) -> None:
    """Rename `src` to `dst` only if nothing is at `dst`, atomically: FileExistsError otherwise (a plain POSIX
    rename would replace a file or an empty folder that another run put there)."""
    if os.name == "nt":  # Windows renames never replace an existing name
        os.rename(src, dst)
        return
    if src.is_dir():
        os.mkdir(dst)  # claims the name; fails if anything, an empty folder included, is there
        try:
            os.rename(src, dst)  # replaces only the empty folder claimed just above
        except OSError as e:
            try:
                os.rmdir(dst)
            except OSError:  # someone wrote into the claimed folder: it is theirs now
                pass
            if e.errno in (errno.ENOTEMPTY, errno.EEXIST):
                raise FileExistsError(e.errno, "another run wrote into it meanwhile", str(dst)) from e
            raise
        return
    try:
        os.link(src, dst)
    except FileExistsError:
        raise
    except OSError:  # no hard links on this file system (FAT, some network shares): check, then rename
        if os.path.lexists(dst):
            raise FileExistsError(errno.EEXIST, "exists", str(dst)) from None
        os.rename(src, dst)
        return
    try:
        os.unlink(src)
    except OSError:  # only a hidden second name of the finished file; removed as stale once this process ends
        pass


def is_disk_full(error: BaseException) -> bool:
    """Whether an error means the device, a quota or a file size limit takes no more bytes."""
    return isinstance(error, OSError) and error.errno in _DISK_FULL
