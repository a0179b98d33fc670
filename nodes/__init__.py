"""The node classes of ComfyUI-InfVSR (classic node API) and their registration."""

from __future__ import annotations

from . import comfy
from .evaluate_nodes import InfVSREvaluate
from .model_nodes import ExtractDAPEGuidance, LoadInfVSRModel
from .routes import register_routes
from .shutdown import install as install_stop_handler
from .streams import install_comfy_backend
from .upscale_nodes import InfVSRChunkUpscale, InfVSRUpscaleVideoFile
from .video_nodes import InfVSRLoadVideoFrames, InfVSRVideoCombine, InfVSRVideoStream

NODE_CLASS_MAPPINGS = {
    "LoadInfVSRModel": LoadInfVSRModel,
    "ExtractDAPEGuidance": ExtractDAPEGuidance,
    "InfVSRChunkUpscale": InfVSRChunkUpscale,
    "InfVSRVideoCombine": InfVSRVideoCombine,
    "InfVSRLoadVideoFrames": InfVSRLoadVideoFrames,
    "InfVSRVideoStream": InfVSRVideoStream,
    "InfVSRUpscaleVideoFile": InfVSRUpscaleVideoFile,
    "InfVSREvaluate": InfVSREvaluate,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "LoadInfVSRModel": "Load InfVSR Model",
    "ExtractDAPEGuidance": "InfVSR DAPE Guidance",
    "InfVSRChunkUpscale": "InfVSR Chunk Upscale",
    "InfVSRVideoCombine": "InfVSR Video Combine",
    "InfVSRLoadVideoFrames": "InfVSR Load Video Frames",
    "InfVSRVideoStream": "InfVSR Video Stream (one chunk per run)",
    "InfVSRUpscaleVideoFile": "InfVSR Upscale Video File",
    "InfVSREvaluate": "InfVSR Evaluate",
}

comfy.register_model_folder()
install_comfy_backend()
register_routes()
if comfy.IN_COMFYUI:  # a server stopped by SIGTERM keeps the finished frames of every open output
    install_stop_handler()

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
