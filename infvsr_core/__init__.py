"""InfVSR streaming video super-resolution: a pure-PyTorch core.

`load_pipeline(models_dir)` loads the four published files (from `models_dir`, else the
local Hugging Face cache; `download_weights` fetches them on request); a pipeline's
`new_session()` starts a stream that `push`, `cut` and `close` advance.
Names are resolved lazily so that `import infvsr_core` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "load_pipeline": "loader",
    "find_weight_file": "weight_files",
    "default_models_dir": "weight_files",
    "WEIGHT_FILES": "weight_files",
    "download_weights": "download",
    "InfVSRPipeline": "pipeline",
    "InfVSRSession": "session",
    "SceneState": "session",
    "SceneStream": "scene_stream",
    "WeightFileError": "weights",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'infvsr_core' has no attribute {name!r}")
