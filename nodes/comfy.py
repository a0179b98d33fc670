"""Everything the nodes need from ComfyUI, with stand-ins so the nodes also run without it.

ComfyUI's modules (`folder_paths`, `comfy.model_management`, `comfy.model_patcher`,
`comfy.utils`, `server`, `comfy_execution`, `comfy_api`) are imported when present. Without
them (tests, scripts) the folders come from `set_directories()` or the
`INFVSR_OUTPUT_DIR` / `INFVSR_INPUT_DIR` / `INFVSR_TEMP_DIR` variables, the
interrupt is a local exception class that tests raise from a progress hook,
and events go nowhere.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ._core import loader as core_loader

log = logging.getLogger("infvsr")


def _optional_import(name: str) -> Any:
    try:
        module = __import__(name, fromlist=["_"])
    except Exception:  # noqa: BLE001 - any failure means "not inside ComfyUI"
        return None
    return module


folder_paths = _optional_import("folder_paths")
model_management = _optional_import("comfy.model_management")
model_patcher = _optional_import("comfy.model_patcher")
comfy_utils = _optional_import("comfy.utils")
_server = _optional_import("server")
PromptServer = getattr(_server, "PromptServer", None) if _server is not None else None
_graph_utils = _optional_import("comfy_execution.graph_utils")
_video_impl = _optional_import("comfy_api.input_impl")

IN_COMFYUI = folder_paths is not None and hasattr(folder_paths, "get_output_directory")


# -- interrupt -------------------------------------------------------------------------------------


class _LocalInterrupt(Exception):
    """Stand-in for `comfy.model_management.InterruptProcessingException` outside ComfyUI."""


InterruptProcessingException: type[Exception] = getattr(
    model_management, "InterruptProcessingException", _LocalInterrupt
)


@dataclass
class Progress:
    """What a long-running node reports after every finished piece of work (a core chunk)."""

    node: str | None
    frames_done: int
    frames_total: int | None
    chunk: int = 0
    chunks: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)


ProgressHook = Callable[[Progress], None]
progress_hooks: list[ProgressHook] = []
"""Called with every `Progress`; a hook may raise `InterruptProcessingException` (tests simulate Cancel so)."""


def check_interrupt() -> None:
    """Raise `InterruptProcessingException` if the user pressed Cancel (ComfyUI's interrupt)."""
    if model_management is not None:
        model_management.throw_exception_if_processing_interrupted()


def interrupt_processing() -> None:
    """Raise ComfyUI's interrupt flag, as the Cancel button does (outside ComfyUI: nothing to interrupt)."""
    if model_management is not None:
        model_management.interrupt_current_processing(True)


def report_progress(progress: Progress) -> None:
    """Tell the hooks (and ComfyUI's interrupt flag) that one more piece of work is done."""
    for hook in list(progress_hooks):
        hook(progress)
    check_interrupt()


class ProgressBar:
    """ComfyUI's node progress bar when available, otherwise nothing."""

    def __init__(self, total: int) -> None:
        self._bar = comfy_utils.ProgressBar(max(1, total)) if comfy_utils is not None else None

    def update_absolute(self, value: int, total: int | None = None) -> None:
        if self._bar is not None:
            self._bar.update_absolute(value, total)


# -- folders ---------------------------------------------------------------------------------------

_overrides: dict[str, Path] = {}


def set_directories(*, output: str | os.PathLike | None = None, input: str | os.PathLike | None = None,
                    temp: str | os.PathLike | None = None, models: str | os.PathLike | None = None) -> None:
    """Folders to use when ComfyUI's `folder_paths` is absent (tests, scripts); None leaves one unchanged."""
    for key, value in (("output", output), ("input", input), ("temp", temp), ("models", models)):
        if value is not None:
            _overrides[key] = Path(value)


def _fallback(key: str, env: str, default: Path) -> Path:
    if key in _overrides:
        return _overrides[key]
    if os.environ.get(env):
        return Path(os.environ[env])
    return default


def output_directory() -> Path:
    if IN_COMFYUI:
        return Path(folder_paths.get_output_directory())
    return _fallback("output", "INFVSR_OUTPUT_DIR", Path.cwd() / "output")


def input_directory() -> Path:
    if IN_COMFYUI:
        return Path(folder_paths.get_input_directory())
    return _fallback("input", "INFVSR_INPUT_DIR", Path.cwd() / "input")


def temp_directory() -> Path:
    if IN_COMFYUI:
        return Path(folder_paths.get_temp_directory())
    return _fallback("temp", "INFVSR_TEMP_DIR", Path(tempfile.gettempdir()) / "infvsr")


MODEL_FOLDER = "infvsr"


def register_model_folder() -> None:
    """Register `models/infvsr/` with ComfyUI (first in the list; extra_model_paths.yaml may add more)."""
    if not IN_COMFYUI:
        return
    default = os.path.join(folder_paths.models_dir, MODEL_FOLDER)
    folder_paths.add_model_folder_path(MODEL_FOLDER, default, is_default=True)
    paths, extensions = folder_paths.folder_names_and_paths[MODEL_FOLDER]
    wanted = set(core_loader.WEIGHT_SUFFIXES)
    if not set(extensions) >= wanted:
        folder_paths.folder_names_and_paths[MODEL_FOLDER] = (paths, set(extensions) | wanted)


def model_folders(kind: str) -> list[Path]:
    """Folders searched for weights: `infvsr` (all four files) or `vae` (ComfyUI's VAE folders)."""
    if IN_COMFYUI:
        try:
            return [Path(p) for p in folder_paths.get_folder_paths(kind)]
        except KeyError:
            return []
    if kind != MODEL_FOLDER:
        return []
    if "models" in _overrides:
        return [_overrides["models"]]
    return [core_loader.default_models_dir()]


def list_model_files(kinds: tuple[str, ...]) -> list[str]:
    """Weight files (relative names, as ComfyUI lists them) in the folders of `kinds`."""
    names: list[str] = []
    suffixes = tuple(core_loader.WEIGHT_SUFFIXES)
    for kind in kinds:
        if IN_COMFYUI:
            try:
                found = folder_paths.get_filename_list(kind)
            except KeyError:
                found = []
        else:
            found = []
            for folder in model_folders(kind):
                if folder.is_dir():
                    found += [p.relative_to(folder).as_posix() for p in sorted(folder.rglob("*")) if p.is_file()]
        names += [n for n in found if n.lower().endswith(suffixes) and n not in names]
    return names


def resolve_model_file(kind: str, name: str) -> Path | None:
    """The full path of `name` in the folders of `kind`, refusing names that climb out of them."""
    if IN_COMFYUI:
        try:
            full = folder_paths.get_full_path(kind, name)
        except KeyError:
            full = None
        return Path(full) if full else None
    for folder in model_folders(kind):
        candidate = (folder / name).resolve()
        if candidate.is_file() and candidate.is_relative_to(folder.resolve()):
            return candidate
    return None


# -- devices and memory ----------------------------------------------------------------------------


def compute_device() -> torch.device:
    """The device ComfyUI computes on (honours --cpu, --directml, ...), else CUDA when present."""
    if model_management is not None:
        return torch.device(model_management.get_torch_device())
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def free_device_memory(nbytes: int, device: torch.device) -> None:
    """Ask ComfyUI to unload other models until `nbytes` are free on `device` (best effort)."""
    if model_management is None or device.type == "cpu":
        return
    try:
        model_management.free_memory(nbytes, device)
    except Exception as e:  # noqa: BLE001 - freeing is an optimisation, never a failure
        log.debug("free_memory failed: %s", e)


def manages_models() -> bool:
    """Whether ComfyUI's model manager is there to hold our networks (`comfy_memory`): inside ComfyUI."""
    return (
        model_patcher is not None
        and hasattr(model_patcher, "ModelPatcher")
        and hasattr(model_management, "load_models_gpu")
        and hasattr(model_management, "current_loaded_models")
    )


def empty_cache() -> None:
    if model_management is not None:
        try:
            model_management.soft_empty_cache()
        except Exception as e:  # noqa: BLE001
            log.debug("soft_empty_cache failed: %s", e)
    elif torch.cuda.is_available():
        torch.cuda.empty_cache()


# -- server ----------------------------------------------------------------------------------------


def server_instance() -> Any:
    return getattr(PromptServer, "instance", None) if PromptServer is not None else None


def send_event(event: str, data: dict[str, Any]) -> None:
    """Broadcast a websocket event to every open frontend (no-op outside ComfyUI)."""
    instance = server_instance()
    if instance is None:
        return
    try:
        instance.send_sync(event, data)
    except Exception as e:  # noqa: BLE001 - the UI being gone must never fail a run
        log.debug("send_sync(%s) failed: %s", event, e)


class Blocked:
    """Stand-in for ComfyUI's `ExecutionBlocker(None)`: an output that silently stops its consumers."""

    def __init__(self, message: str | None = None) -> None:
        self.message = message


def execution_blocker() -> Any:
    """An output value that makes ComfyUI skip every node consuming it, without an error."""
    cls = getattr(_graph_utils, "ExecutionBlocker", None) if _graph_utils is not None else None
    return cls(None) if cls is not None else Blocked()


def video_from_file(path: Path) -> Any:
    """A core `VIDEO` for a finished file (None outside ComfyUI)."""
    cls = getattr(_video_impl, "VideoFromFile", None) if _video_impl is not None else None
    return cls(str(path)) if cls is not None else None
