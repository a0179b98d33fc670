"""Checks and small helpers shared by the node modules."""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any

import torch

from . import comfy
from .paths import check_relative, input_file
from .types import DAPEGuidance, InfVSRModel

VIDEO_EXTENSIONS = (".mp4", ".mov", ".mkv", ".webm", ".avi", ".m4v", ".mpg", ".mpeg", ".ts", ".mxf", ".gif", ".flv")
FILE_FORMAT_TOOLTIP = "h264 / h265 mp4, ProRes 422 HQ / 4444 mov, FFV1 lossless mkv, or a folder of PNG frames."


def check_model(model: Any) -> InfVSRModel:
    if not isinstance(model, InfVSRModel):
        raise TypeError(f"model must come from Load InfVSR Model, got {type(model).__name__}")
    return model


def check_guidance(guidance: Any, model: InfVSRModel) -> DAPEGuidance:
    if not isinstance(guidance, DAPEGuidance):
        raise TypeError(f"guidance must come from InfVSR DAPE Guidance, got {type(guidance).__name__}")
    if guidance.model_id != model.model_id:
        raise ValueError(
            "this guidance was extracted with a different InfVSR model (other weight files or dtype); "
            "run InfVSR DAPE Guidance with the model you upscale with"
        )
    return guidance


def check_images(images: Any, what: str = "images") -> torch.Tensor:
    """An IMAGE batch (B, H, W, C) as float frames (T, H, W, 3); alpha is dropped, grey expanded."""
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"{what} must be an IMAGE tensor (B, H, W, 3), got {type(images).__name__}")
    if images.ndim == 3:
        images = images.unsqueeze(0)
    if images.ndim != 4 or images.shape[-1] not in (1, 3, 4):
        raise ValueError(f"{what} must be an IMAGE batch (B, H, W, 3), got shape {tuple(images.shape)}")
    if images.shape[-1] == 1:
        images = images.expand(*images.shape[:-1], 3)
    if images.shape[1] < 1 or images.shape[2] < 1:
        raise ValueError(f"{what} have an empty size {images.shape[2]}x{images.shape[1]}")
    return images[..., :3]


def input_videos() -> list[str]:
    """Video files in ComfyUI's input folder (top level and one level of subfolders)."""
    root = comfy.input_directory()
    if not root.is_dir():
        return []
    found = []
    for entry in sorted(root.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.is_file() and entry.suffix.lower() in VIDEO_EXTENSIONS:
            found.append(entry.name)
        elif entry.is_dir():
            found += [f"{entry.name}/{p.name}" for p in sorted(entry.iterdir())
                      if p.is_file() and p.suffix.lower() in VIDEO_EXTENSIONS and not p.name.startswith(".")]
    return found


def validate_video_name(video: str) -> bool | str:
    """VALIDATE_INPUTS for a video combo: any safe relative name (the file is checked when the node runs)."""
    try:
        check_relative(video, "video file name")
    except ValueError as e:
        return str(e)
    return True


def resolve_source(video: str, video_input: Any = None) -> Path:
    """The file to read: a connected core VIDEO wins over the file picked from the input folder."""
    if video_input is not None:
        source = video_input.get_stream_source() if hasattr(video_input, "get_stream_source") else video_input
        if isinstance(source, (str, Path)):
            return Path(source)
        if isinstance(source, io.BytesIO):
            folder = comfy.temp_directory()
            folder.mkdir(parents=True, exist_ok=True)
            data = source.getvalue()
            path = folder / f"infvsr_video_{abs(hash(data)) & 0xFFFFFFFFFFFF:x}.bin"
            if not path.exists():
                path.write_bytes(data)
            return path
        raise TypeError(f"video_input must be a ComfyUI VIDEO, got {type(video_input).__name__}")
    return input_file(comfy.input_directory(), video)


def chunk_count(total: int | None, per_chunk: int) -> int | None:
    return None if total is None else max(1, math.ceil(total / per_chunk))
