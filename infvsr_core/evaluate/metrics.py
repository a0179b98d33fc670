"""Per-frame fidelity against the reference: PSNR on RGB and on luma (Y), and SSIM, computed by scikit-image.

Frames are float RGB in [0, 1] as the readers deliver them (not rounded to 8 bits), so PSNR uses a peak of 1,
which is the same number as 8-bit PSNR with a peak of 255 on the same values. Y is BT.601 "studio" luma,
scikit-image's `rgb2ycbcr` (that of MATLAB and BasicSR: 16 + 65.481 R + 128.553 G + 24.966 B on the 0-255
scale); Y-PSNR is what most VSR papers tabulate. SSIM is Wang et al. 2004 as scikit-image computes it with
`gaussian_weights=True, use_sample_covariance=False`: 11x11 Gaussian window (sigma 1.5), K1 0.01, K2 0.03, averaged
over the three RGB channels and over the pixels whose window lies inside the frame (the authors' MATLAB code).

The metric table (:data:`METRICS`) is the one place that names, units and "which way is better" live: the report,
the plot, the suite table and the README read it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

SSIM_SIGMA = 1.5
SSIM_WINDOW = 11  # what scikit-image's Gaussian (truncated at 3.5 sigma) spans: frames smaller have no SSIM


@dataclass(frozen=True)
class Metric:
    """What a column of the report means."""

    name: str
    label: str  # as the plot and the table title it
    unit: str
    higher_is_better: bool
    # "fidelity" (against the reference), "temporal" (pairs of frames), "semantic" (network features),
    # "interpolation" (frame t predicted from t - 1 and t + 1)
    kind: str
    needs_reference: bool
    definition: str


METRICS: dict[str, Metric] = {
    m.name: m
    for m in (
        Metric(
            "psnr",
            "PSNR (RGB)",
            "dB",
            True,
            "fidelity",
            True,
            "10 log10(1 / MSE) over the RGB values in [0, 1]; Infinity for identical frames",
        ),
        Metric(
            "psnr_y",
            "PSNR (Y)",
            "dB",
            True,
            "fidelity",
            True,
            "PSNR of BT.601 luma (MATLAB rgb2ycbcr), peak 255 on the 0-255 scale; Infinity for identical frames",
        ),
        Metric(
            "ssim",
            "SSIM",
            "",
            True,
            "fidelity",
            True,
            "Wang et al. 2004, 11x11 Gaussian window (sigma 1.5), mean over RGB channels and valid pixels",
        ),
        Metric(
            "lpips",
            "LPIPS (AlexNet)",
            "",
            False,
            "fidelity",
            True,
            "Zhang et al. 2018, v0.1 (the lpips package): AlexNet features, unit-length per pixel, squared "
            "difference weighted by the learned linear heads, averaged over pixels, summed over 5 layers; whole "
            "frames, no resizing",
        ),
        Metric(
            "lpips_vgg",
            "LPIPS (VGG)",
            "",
            False,
            "fidelity",
            True,
            "LPIPS v0.1 over VGG16 features",
        ),
        Metric(
            "dists",
            "DISTS",
            "",
            False,
            "fidelity",
            True,
            "Ding et al. 2020 (DISTS_pytorch): 1 - alpha/beta-weighted structure and texture similarity of the "
            "frame and VGG16 (L2-pooled) features; whole frames, no resizing",
        ),
        Metric(
            "ewarp",
            "E*warp",
            "x1e-3",
            False,
            "temporal",
            False,
            "flow warping error (Lai et al. 2018) of the output: mean over non-occluded pixels of the squared RGB "
            "distance between frame t and frame t-1 warped to it by OpenCV's DIS flow, times 1000",
        ),
        Metric(
            "tof",
            "tOF",
            "px",
            False,
            "temporal",
            True,
            "TecoGAN's tOF: mean end-point distance between the Farneback flow (t-1 to t) of the output and that "
            "of the reference, in pixels",
        ),
        Metric(
            "subject_consistency",
            "subject consistency",
            "",
            True,
            "semantic",
            False,
            "VBench: mean of the DINO ViT-B/16 cosine similarity of frame t to frame t-1 and to the scene's first "
            "frame (negative similarities count as 0)",
        ),
        Metric(
            "background_consistency",
            "background consistency",
            "",
            True,
            "semantic",
            False,
            "VBench: the same over CLIP ViT-B/32 image features",
        ),
        Metric(
            "motion_smoothness",
            "motion smoothness",
            "",
            True,
            "interpolation",
            False,
            "VBench: (255 - mean absolute 8-bit RGB difference) / 255 between odd frame t and the AMT-S "
            "interpolation of frames t - 1 and t + 1; even frames have no value",
        ),
    )
}


def _psnr(output: np.ndarray, reference: np.ndarray, peak: float) -> float:
    from skimage.metrics import peak_signal_noise_ratio

    if np.array_equal(output, reference):
        return math.inf  # scikit-image divides by a zero error: the same value, without its warning
    return float(peak_signal_noise_ratio(reference, output, data_range=peak))


def _ssim(output: np.ndarray, reference: np.ndarray) -> float:
    from skimage.metrics import structural_similarity

    if min(output.shape[:2]) < SSIM_WINDOW:
        return math.nan
    return float(
        structural_similarity(
            reference,
            output,
            channel_axis=2,
            gaussian_weights=True,
            sigma=SSIM_SIGMA,
            use_sample_covariance=False,
            data_range=1.0,
        )
    )


def fidelity(output: np.ndarray, reference: np.ndarray, crop_border: int = 0) -> dict[str, np.ndarray]:
    """PSNR, Y-PSNR and SSIM of each frame of (T, H, W, 3) float chunks, `crop_border` pixels left out all round."""
    from skimage.color import rgb2ycbcr

    if crop_border > 0:
        output = output[:, crop_border:-crop_border, crop_border:-crop_border]
        reference = reference[:, crop_border:-crop_border, crop_border:-crop_border]
    values: dict[str, list[float]] = {"psnr": [], "psnr_y": [], "ssim": []}
    for out, ref in zip(output.astype(np.float64), reference.astype(np.float64), strict=True):
        values["psnr"].append(_psnr(out, ref, 1.0))
        values["psnr_y"].append(_psnr(rgb2ycbcr(out)[..., 0], rgb2ycbcr(ref)[..., 0], 255.0))
        values["ssim"].append(_ssim(out, ref))
    return {name: np.asarray(column, dtype=np.float64) for name, column in values.items()}
