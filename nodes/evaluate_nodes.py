"""InfVSREvaluate: an upscaled video (IMAGE batch or file) against its reference -> the plot and the summary."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import comfy, model_subfolders
from ._core import EvaluateOptions, evaluate, evaluation_report
from .common import check_images
from .paths import UnsafePathError, next_output_path, resolve_inside

CATEGORY = "InfVSR"
FITS = ("refuse", "resize", "crop")
METRICS_FOLDER = "metrics"
"""The optional metrics' networks live in models/infvsr/metrics (files, or Hugging Face model folders)."""
METRIC_NETWORKS = {  # input -> (EvaluateOptions.weights key, tooltip)
    "alexnet": ("alexnet", "LPIPS (AlexNet): torchvision's alexnet-owt-7be5be79.pth."),
    "vgg16": ("vgg16", "LPIPS (VGG) and, with dists, DISTS: torchvision's vgg16-397923af.pth."),
    "lpips_heads": ("lpips_heads", "LPIPS' linear heads: a folder holding alex.pth / vgg.pth (none: those of the "
                    "installed lpips package, if any)."),
    "dists": ("dists", "DISTS' alpha/beta (DISTS_pytorch's weights.pt); needs vgg16."),
    "dino": ("subject_consistency", "VBench subject consistency: the facebook/dino-vitb16 Hugging Face folder."),
    "clip": ("background_consistency", "VBench background consistency: the openai/clip-vit-base-patch32 folder."),
    "amt": ("amt", "VBench motion smoothness: VBench's AMT-S checkpoint amt-s.pth."),
}
WEIGHT_SUFFIXES = (".pth", ".pt", ".safetensors", ".bin", ".ckpt")


def metric_weights(picked: dict[str, str]) -> dict[str, Path]:
    """EvaluateOptions.weights from the inputs' choices ("none" left out)."""
    weights = {}
    for name, choice in picked.items():
        path = model_subfolders.resolve(METRICS_FOLDER, choice, f"{name} weights")
        if path is not None:
            weights[METRIC_NETWORKS[name][0]] = path
    return weights


def readable_file(text: str, what: str) -> Path:
    """A video file or frame folder inside ComfyUI's input, output or temp folder (a name relative to the input
    folder, then the output folder, or a full path, e.g. the file node's `filename` output); never elsewhere."""
    roots = [comfy.input_directory(), comfy.output_directory(), comfy.temp_directory()]
    name = text.strip()
    if Path(name).is_absolute():
        target = Path(name).resolve()
        if not any(target.is_relative_to(root.resolve()) for root in roots if root.exists()):
            raise UnsafePathError(f"{what} {name!r} is outside ComfyUI's input, output and temp folders")
        candidates = [target]
    else:
        candidates = [resolve_inside(root, name, what) for root in roots[:2]]
    for candidate in candidates:
        if candidate.exists():
            return candidate
    raise FileNotFoundError(f"{what} {name!r} not found in ComfyUI's input or output folder")


class InfVSREvaluate:
    """Measures an upscaled video against its reference: PSNR, SSIM, E*warp, tOF per frame, plotted over time."""

    DESCRIPTION = (
        "Compares the upscaled frames (images, or a video file such as InfVSR Upscale Video File's filename) with "
        "the reference (reference frames, or reference_video), frame by frame: PSNR (RGB and Y), SSIM, E*warp "
        "(OpenCV DIS flow: not comparable with the paper's table, which uses learned flows) and tOF; LPIPS, DISTS "
        "and VBench's subject/background consistency and motion smoothness where their networks are picked from "
        "models/infvsr/metrics. Without a "
        "reference only E*warp is measured. Outputs the plot of every metric over time (scene cuts dashed) and the "
        "summary; save_report also writes summary.json, frames.csv and plot.png to the output folder."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = ("IMAGE", "STRING")
    RETURN_NAMES = ("plot", "summary")
    OUTPUT_NODE = True
    FUNCTION = "evaluate"

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        networks = model_subfolders.choices(METRICS_FOLDER, WEIGHT_SUFFIXES, with_folders=True)
        return {
            "required": {
                "temporal": ("BOOLEAN", {"default": True, "tooltip": "E*warp and tOF (optical flow, the slow part)."}),
                "crop_border": ("INT", {"default": 0, "min": 0, "max": 256,
                                        "tooltip": "Pixels left out all round for PSNR / SSIM."}),
                "fit": (list(FITS), {"default": "refuse", "tooltip": "Different frame sizes: refuse, resize the "
                                     "output to the reference, or compare the common top-left area."}),
                "align": ("BOOLEAN", {"default": False, "tooltip": "Different frame counts or rates: compare by "
                                      "frame index over the shorter video."}),
                "save_report": ("BOOLEAN", {"default": True, "tooltip": "Also write summary.json, frames.csv and "
                                            "plot.png to the output folder."}),
                "filename_prefix": ("STRING", {"default": "InfVSR/eval"}),
            },
            "optional": {
                "images": ("IMAGE", {"tooltip": "The upscaled frames."}),
                "reference": ("IMAGE", {"tooltip": "The high-resolution original frames."}),
                "video_path": ("STRING", {"default": "", "tooltip": "Instead of images: a video file (or frame "
                                          "folder) in ComfyUI's input or output folder."}),
                "reference_video": ("STRING", {"default": "", "tooltip": "Instead of reference: a video file (or "
                                               "frame folder) in ComfyUI's input or output folder."}),
                **{name: (networks, {"default": model_subfolders.NONE, "tooltip": f"{tip} From models/infvsr/"
                                     f"{METRICS_FOLDER}; none: the metric is skipped (nothing is downloaded)."})
                   for name, (_, tip) in METRIC_NETWORKS.items()},
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    def evaluate(
        self,
        temporal: bool = True,
        crop_border: int = 0,
        fit: str = "refuse",
        align: bool = False,
        save_report: bool = True,
        filename_prefix: str = "InfVSR/eval",
        images: torch.Tensor | None = None,
        reference: torch.Tensor | None = None,
        video_path: str = "",
        reference_video: str = "",
        unique_id: str | None = None,
        alexnet: str = model_subfolders.NONE,
        vgg16: str = model_subfolders.NONE,
        lpips_heads: str = model_subfolders.NONE,
        dists: str = model_subfolders.NONE,
        dino: str = model_subfolders.NONE,
        clip: str = model_subfolders.NONE,
        amt: str = model_subfolders.NONE,
    ) -> dict[str, Any]:
        if fit not in FITS:
            raise ValueError(f"fit must be one of {', '.join(FITS)}, got {fit!r}")
        output: Any = check_images(images) if images is not None else None
        if output is None:
            if not video_path.strip():
                raise ValueError("connect the upscaled images or give a video_path")
            output = readable_file(video_path, "video_path")
        truth: Any = check_images(reference, "reference") if reference is not None else None
        if truth is None and reference_video.strip():
            truth = readable_file(reference_video, "reference_video")
        node = str(unique_id) if unique_id is not None else "evaluate"
        bar = comfy.ProgressBar(int(output.shape[0]) if isinstance(output, torch.Tensor) else 1)

        def progress(done: int, total: int | None) -> None:
            bar.update_absolute(done, total)
            comfy.report_progress(comfy.Progress(node, done, total))  # Cancel is noticed here

        options = EvaluateOptions(
            temporal=bool(temporal), crop_border=int(crop_border), resize=fit == "resize", crop=fit == "crop",
            align=bool(align), weights=metric_weights(
                {"alexnet": alexnet, "vgg16": vgg16, "lpips_heads": lpips_heads, "dists": dists, "dino": dino,
                 "clip": clip, "amt": amt}
            ),
        )
        result = evaluate(output, truth, options, progress)
        summary = evaluation_report.summarize(result)
        plot = torch.from_numpy(evaluation_report.plot_rgb(result, summary).astype(np.float32) / 255.0)[None]
        text = evaluation_report.summary_text(summary)
        preview = []
        if save_report:
            folder, subfolder, name = next_output_path(comfy.output_directory(), filename_prefix, "")
            files = evaluation_report.write_report(result, folder)
            preview.append({"filename": files.plot.name, "subfolder": f"{subfolder}/{name}".strip("/"),
                            "type": "output"})
            text += f"\nreport: {folder}"
        return {"ui": {"images": preview, "text": [text]}, "result": (plot, text)}
