"""Reading the published weight files and checking them against a module.

Every failure names the file, what was found and what was expected, so that a
user who dropped the wrong file into a model folder knows what to fix.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from torch import nn

StateDict = dict[str, torch.Tensor]


class WeightFileError(ValueError):
    """A weight file is missing, unreadable, or does not hold what was expected."""


def read_state_dict(path: str | os.PathLike, *, what: str, unwrap: Iterable[str] = ()) -> StateDict:
    """Load a `.pth`/`.ckpt` pickle (weights_only, mmap) or a `.safetensors` file.

    `what` describes the expected content for error messages ("the InfVSR DiT
    checkpoint InfVSR.ckpt"); `unwrap` lists container keys such as "model" or
    "model_state" whose value is the real state dict.
    """
    path = Path(path)
    if not path.is_file():
        folder = path.parent if str(path.parent) else Path(".")
        raise WeightFileError(
            f"{what}: file '{path.name}' not found in folder '{folder.resolve()}'"
            + (" (that folder does not exist)" if not folder.is_dir() else "")
        )
    if path.stat().st_size == 0:
        raise WeightFileError(f"{what}: '{path}' is empty (0 bytes); download it again")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj: object = load_file(str(path))
        else:
            try:
                obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as exc:
                if "mmap" not in str(exc):
                    raise
                # Old (non-zip) torch.save format cannot be memory-mapped.
                obj = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, zipfile.BadZipFile, EOFError, OSError, ValueError) as exc:
        raise WeightFileError(
            f"{what}: '{path}' is not a readable PyTorch/safetensors checkpoint "
            f"(truncated or wrong file?): {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        ) from exc
    for key in unwrap:
        if isinstance(obj, Mapping) and key in obj and isinstance(obj[key], Mapping):
            obj = obj[key]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightFileError(f"{what}: '{path}' does not hold a state dict of tensors (found {type(obj).__name__})")
    if not obj:
        raise WeightFileError(f"{what}: '{path}' holds no tensors")
    return dict(obj)


def check_state_dict(
    state: Mapping[str, torch.Tensor],
    expected: Mapping[str, torch.Size | tuple[int, ...]],
    *,
    what: str,
    path: str | os.PathLike | None = None,
) -> None:
    """Raise `WeightFileError` naming missing/unexpected keys or the first shape mismatches."""
    where = f"{what} ('{path}')" if path is not None else what
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    problems = []
    if missing:
        problems.append(f"missing keys ({len(missing)}): {_sample(missing)}")
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {_sample(unexpected)}")
    wrong = [
        f"{k}: file has {tuple(state[k].shape)}, expected {tuple(expected[k])}"
        for k in expected
        if k in state and tuple(state[k].shape) != tuple(expected[k])
    ]
    if wrong:
        problems.append(f"wrong shapes ({len(wrong)}): " + "; ".join(wrong[:5]) + (" ..." if len(wrong) > 5 else ""))
    if problems:
        raise WeightFileError(f"{where} does not match the expected architecture: " + " | ".join(problems))


def load_checked(
    module: nn.Module,
    state: Mapping[str, torch.Tensor],
    *,
    what: str,
    path: str | os.PathLike | None = None,
    dtype: torch.dtype | None = None,
) -> nn.Module:
    """Check `state` against `module`'s own keys and shapes, then copy it in (strict)."""
    expected = {k: v.shape for k, v in module.state_dict().items()}
    check_state_dict(state, expected, what=what, path=path)
    module.load_state_dict(dict(state), strict=True)
    if dtype is not None:
        module.to(dtype)
    return module


def require(
    state: Mapping[str, torch.Tensor], key: str, *, what: str, path: str | os.PathLike | None = None
) -> torch.Tensor:
    """Fetch one tensor used to infer the architecture, with a clear error if absent."""
    if key not in state:
        where = f"{what} ('{path}')" if path is not None else what
        raise WeightFileError(
            f"{where}: missing key '{key}' (is this the right file?); found e.g. {_sample(list(state))}"
        )
    return state[key]


def _sample(keys: list[str], n: int = 5) -> str:
    return ", ".join(keys[:n]) + (f", ... (+{len(keys) - n} more)" if len(keys) > n else "")
