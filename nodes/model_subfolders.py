"""Files kept in subfolders of `models/infvsr/` that the nodes offer as choices: the DiT LoRAs (`loras/`) and the
networks the evaluation's optional metrics run (`metrics/`).

Why one home: a choice list and the lookup of the chosen name must agree, and the lookup must refuse a name that
climbs out of the folder (a workflow file may carry any string).
"""

from __future__ import annotations

from pathlib import Path

from . import comfy
from ._core import WeightFileError

NONE = "none"


def folders(subfolder: str) -> list[Path]:
    """`subfolder` of every registered models/infvsr folder (extra_model_paths.yaml may add some)."""
    return [folder / subfolder for folder in comfy.model_folders(comfy.MODEL_FOLDER)]


def choices(subfolder: str, suffixes: tuple[str, ...], with_folders: bool = False) -> list[str]:
    """"none", then the files ending in `suffixes` (relative names, any depth) and, `with_folders`, the folders
    directly inside (Hugging Face model folders are folders)."""
    names: list[str] = []
    for folder in folders(subfolder):
        if not folder.is_dir():
            continue
        for path in sorted(folder.rglob("*")):
            top_folder = with_folders and path.is_dir() and path.parent == folder
            if top_folder or (path.is_file() and path.name.lower().endswith(suffixes)):
                names.append(path.relative_to(folder).as_posix())
    return [NONE, *dict.fromkeys(names)]


def resolve(subfolder: str, name: str, what: str) -> Path | None:
    """The file or folder picked (None for "none"); a name in no such folder, or climbing out of one, raises."""
    if name == NONE:
        return None
    for folder in folders(subfolder):
        candidate = (folder / name).resolve()
        if candidate.exists() and candidate.is_relative_to(folder.resolve()):
            return candidate
    searched = ", ".join(f"'{f}'" for f in folders(subfolder)) or "(no model folder is registered)"
    raise WeightFileError(f"{what} '{name}' not found in {searched}")
