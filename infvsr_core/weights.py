"""Reading the published weight files and checking them against a module.

Every failure names the file, what was found and what was expected, so that a
user who dropped the wrong file into a model folder knows what to fix.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import zipfile
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from torch import nn

from .errors import WeightFileError

StateDict = dict[str, torch.Tensor]


def read_state_dict(
    path: str | os.PathLike, *, what: str, unwrap: Iterable[str] = (), source: str | None = None
) -> StateDict:
    """Load a `.pth`/`.ckpt` pickle (weights_only, mmap) or a `.safetensors` file.

    `what` describes the expected content for error messages ("the InfVSR DiT
    checkpoint InfVSR.ckpt"); `unwrap` lists container keys such as "model" or
    "model_state" whose value is the real state dict; `source` (where the file
    is published) completes the "download it again" advice.

    Pickles are only ever read with `weights_only=True`: a file that needs more
    is refused, never retried in a mode that could execute code from it.
    """
    path = Path(path)
    if not path.is_file():
        folder = path.parent if str(path.parent) else Path(".")
        raise WeightFileError(
            f"{what}: file '{path.name}' not found in folder '{folder.resolve()}'"
            + (" (that folder does not exist)" if not folder.is_dir() else "")
        )
    size = path.stat().st_size
    if size == 0:
        raise WeightFileError(f"{what}: '{path}' is empty (0 bytes); download it again")
    again = f"download it again from {source}" if source else "download it again"
    if path.suffix == ".safetensors":
        obj: object = _read_safetensors(path, size, what=what, again=again)
    else:
        obj = _read_pickle(path, size, what=what, again=again)
    for key in unwrap:
        if isinstance(obj, Mapping) and key in obj and isinstance(obj[key], Mapping):
            obj = obj[key]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightFileError(f"{what}: '{path}' does not hold a state dict of tensors (found {type(obj).__name__})")
    if not obj:
        raise WeightFileError(f"{what}: '{path}' holds no tensors")
    return dict(obj)


def safetensors_expected_size(path: str | os.PathLike) -> int | None:
    """The byte size a `.safetensors` file's own header promises, or None if the header is unreadable.

    The header (an 8-byte length, then JSON with every tensor's byte range) is at
    the start, so it survives the usual truncation (an interrupted download).
    """
    try:
        with open(path, "rb") as f:
            length = int.from_bytes(f.read(8), "little")
            if not 2 <= length <= _SAFETENSORS_MAX_HEADER:
                return None
            header = json.loads(f.read(length))
        ends = [int(entry["data_offsets"][1]) for key, entry in header.items() if key != "__metadata__"]
    except (OSError, ValueError, TypeError, KeyError, IndexError, AttributeError):
        return None
    return 8 + length + max(ends, default=0)


# The format's own limit on the JSON header (safetensors refuses larger ones).
_SAFETENSORS_MAX_HEADER = 100_000_000


def _read_safetensors(path: Path, size: int, *, what: str, again: str) -> StateDict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    expected = safetensors_expected_size(path)
    found = f"{size:,} bytes" + (f", its header promises {expected:,}" if expected is not None else "")
    if expected is not None and size < expected:
        raise WeightFileError(f"{what}: '{path}' is truncated ({found}); {again}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise WeightFileError(
            f"{what}: '{path}' is truncated or not a safetensors file ({found}; {_first_line(exc)}); {again}"
        ) from exc


def _read_pickle(path: Path, size: int, *, what: str, again: str) -> object:
    with open(path, "rb") as f:
        head = f.read(64)
    zipped = head.startswith(b"PK\x03\x04")
    if not zipped and not head.startswith(b"\x80"):  # neither torch.save format (zip, or legacy pickle)
        raise WeightFileError(
            f"{what}: '{path}' is not a readable PyTorch checkpoint (it starts with {_preview(head)}"
            f"{', a web page or error message saved in its place?' if _looks_like_text(head) else ''}); {again}"
        )
    try:
        # Only the zip format can be memory-mapped (the legacy one is read whole).
        return torch.load(path, map_location="cpu", weights_only=True, mmap=zipped)
    except pickle.UnpicklingError as exc:
        refused = _REFUSED_GLOBAL.search(str(exc))
        if refused:
            raise WeightFileError(
                f"{what}: '{path}' is not a plain state dict: it contains Python objects other than tensors "
                f"(it refers to '{refused.group(1)}'), and InfVSR will not execute code from a weight file; "
                "use the published file, or, if you trust where this one came from, convert it to .safetensors"
            ) from exc
        operand = _UNSUPPORTED_OPERAND.search(str(exc))
        if "Weights only load failed" in str(exc) and operand:
            raise WeightFileError(
                f"{what}: '{path}' is not a PyTorch state dict that can be read safely (its pickle uses "
                f"opcode {operand.group(1)}, which torch.save does not write: a plain pickle, or a damaged file); "
                "use the published file or convert this one to .safetensors"
            ) from exc
        raise _damaged(path, size, exc, what=what, again=again) from exc
    except (RuntimeError, zipfile.BadZipFile, EOFError, OSError, ValueError) as exc:
        raise _damaged(path, size, exc, what=what, again=again) from exc


_REFUSED_GLOBAL = re.compile(r"Unsupported global: GLOBAL ([\w.]+)")
_UNSUPPORTED_OPERAND = re.compile(r"Unsupported operand (\d+)")


def _damaged(path: Path, size: int, exc: BaseException, *, what: str, again: str) -> WeightFileError:
    reason = _first_line(exc)
    detail = f"{size:,} bytes" + (f"; {reason}" if reason and "weights_only" not in reason else "")
    return WeightFileError(f"{what}: '{path}' is truncated or corrupt ({detail}); {again}")


def _first_line(exc: BaseException) -> str:
    """The exception's first sentence: enough to tell failures apart, without the library's own advice."""
    text = str(exc).strip()
    line = f"{type(exc).__name__}: {text.splitlines()[0].split('. ')[0].rstrip('.')}" if text else type(exc).__name__
    return line if len(line) <= 160 else line[:157] + "..."


def _looks_like_text(head: bytes) -> bool:
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return all(c.isprintable() or c.isspace() for c in text)


def _preview(head: bytes) -> str:
    if _looks_like_text(head):
        text = " ".join(head.decode("utf-8").split())
        return repr(text[:40] + ("..." if len(text) > 40 else ""))
    return f"bytes {head[:8].hex(' ')}"


def state_dict_problems(
    state: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Size | tuple[int, ...]]
) -> list[str]:
    """Missing/unexpected keys and the first shape mismatches, one phrase each (empty when it matches)."""
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
    return problems


def check_state_dict(
    state: Mapping[str, torch.Tensor],
    expected: Mapping[str, torch.Size | tuple[int, ...]],
    *,
    what: str,
    path: str | os.PathLike | None = None,
) -> None:
    """Raise `WeightFileError` naming missing/unexpected keys or the first shape mismatches."""
    where = f"{what} ('{path}')" if path is not None else what
    problems = state_dict_problems(state, expected)
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
