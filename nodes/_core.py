"""One place that imports `infvsr_core`, whether the pack runs inside ComfyUI or in the tests.

Inside ComfyUI the repository root is loaded as a package (its name is the
folder path), so the core is the sibling package `..infvsr_core` and must be
imported relatively: the repository root is not on `sys.path` there. In the
tests the repository root is on `sys.path` and `nodes` is a top-level package,
so the core is imported by its absolute name.
"""

from __future__ import annotations

import importlib
from types import ModuleType

_INSIDE_PACK = bool(__package__) and "." in (__package__ or "")


def core_module(name: str) -> ModuleType:
    """`infvsr_core.<name>`, resolved the same way as this package was imported."""
    if _INSIDE_PACK:
        parent = __package__.rsplit(".", 1)[0]
        return importlib.import_module(f"{parent}.infvsr_core.{name}")
    return importlib.import_module(f"infvsr_core.{name}")


loader = core_module("loader")
pipeline = core_module("pipeline")
session = core_module("session")
video_io = core_module("video_io")
attention = core_module("attention")
weights = core_module("weights")
vae = core_module("vae")

InfVSRPipeline = pipeline.InfVSRPipeline
InfVSRSession = session.InfVSRSession
SceneState = session.SceneState
WeightFileError = weights.WeightFileError
WEIGHT_FILES = loader.WEIGHT_FILES
WEIGHT_SUFFIXES = loader.WEIGHT_SUFFIXES
SEAMS = vae.SEAMS
VideoReader = video_io.VideoReader
VideoWriter = video_io.VideoWriter
BackgroundWriter = video_io.BackgroundWriter
VideoError = video_io.VideoError
probe = video_io.probe


def scene_stream_class() -> type:
    """`infvsr_core.stream.SceneStream`, imported on first use (it pulls in the scene detector)."""
    return core_module("stream").SceneStream
