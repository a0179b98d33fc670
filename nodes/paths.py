"""Output and input file names that can never leave ComfyUI's folders.

A filename prefix is user text (and travels in shared workflows): `../`,
absolute paths, drive letters and symlinks pointing outside are refused
before anything is created.
"""

from __future__ import annotations

import os
import re
from pathlib import Path, PurePosixPath, PureWindowsPath

_COUNTER = re.compile(r"^(?P<stem>.+)_(?P<n>\d{5,})(?:\.[A-Za-z0-9]+)?$")


class UnsafePathError(ValueError):
    """A file name that would leave the folder it must stay in."""


def _inside(root: Path, path: Path) -> bool:
    try:
        path.relative_to(root)
    except ValueError:
        return False
    return True


def check_relative(name: str, what: str) -> PurePosixPath:
    """`name` as a relative path with no `..`, no root, no drive; raises `UnsafePathError` otherwise."""
    text = name.strip().replace("\\", "/")
    if not text:
        raise UnsafePathError(f"{what} is empty")
    if "\x00" in text:
        raise UnsafePathError(f"{what} {name!r} contains a NUL character")
    if text.startswith("/") or PureWindowsPath(name).drive or re.match(r"^[A-Za-z]:", text):
        raise UnsafePathError(f"{what} {name!r} is an absolute path; give a name relative to the folder")
    parts = PurePosixPath(text).parts
    if any(part == ".." for part in parts):
        raise UnsafePathError(f"{what} {name!r} contains '..'; files must stay inside the folder")
    clean = [p for p in parts if p not in ("", ".")]
    if not clean:
        raise UnsafePathError(f"{what} {name!r} names no file")
    return PurePosixPath(*clean)


def resolve_inside(root: Path, relative: PurePosixPath | str, what: str) -> Path:
    """`root / relative`, resolved (symlinks followed), and checked to be inside `root`."""
    root = Path(root).resolve()
    target = (root / Path(*PurePosixPath(relative).parts)).resolve()
    if not _inside(root, target):
        raise UnsafePathError(f"{what} {str(relative)!r} resolves to {target}, outside {root}")
    return target


def next_output_path(output_dir: Path, prefix: str, extension: str) -> tuple[Path, str, str]:
    """A new file `<prefix>_<counter>.<ext>` (or folder when `extension` is empty) in `output_dir`.

    Returns (full path, subfolder relative to the output folder, file name). The
    counter continues after the highest one already there, as ComfyUI's savers do.
    """
    relative = check_relative(prefix, "filename_prefix")
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    root = Path(output_dir).resolve()
    folder = resolve_inside(root, relative.parent, "filename_prefix")  # symlinks already followed
    folder.mkdir(parents=True, exist_ok=True)
    stem = relative.name
    highest = 0
    for entry in os.listdir(folder):
        name = entry[1:] if entry.startswith(".") else entry  # temporary (partial) outputs count too
        name = name.replace(".partial", "")
        match = _COUNTER.match(name)
        if match and match.group("stem") == stem:
            highest = max(highest, int(match.group("n")))
    filename = f"{stem}_{highest + 1:05d}{'.' + extension if extension else ''}"
    path = folder / filename
    subfolder = folder.relative_to(root).as_posix()
    return path, "" if subfolder == "." else subfolder, filename


def input_file(input_dir: Path, name: str) -> Path:
    """A file chosen from ComfyUI's input folder (`name` as the combo lists it); must exist and stay inside."""
    relative = check_relative(name, "video file name")
    path = resolve_inside(Path(input_dir), relative, "video file name")
    if not path.exists():
        raise FileNotFoundError(f"video '{name}' not found in the input folder {Path(input_dir).resolve()}")
    return path
