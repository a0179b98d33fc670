"""The chunk schedule of InfVSR's released inference (SPEC section 2).

A scene is cut into non-overlapping chunks: 9 low-resolution frames first (the
causal VAE encodes the scene's first frame alone, so 1 + 4 + 4 -> 3 latent
frames), then 12 frames (3 latent frames). Each chunk is upscaled in
pixel space, padded to the VAE's alignment, and denoised by one DiT step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .memory.transfer import to_device_async

FIRST_CHUNK_FRAMES = 9
"""Low-resolution frames in a scene's first chunk (1 + 4 + 4 -> 3 latent frames)."""
CHUNK_FRAMES = 12
"""Low-resolution frames in every later chunk (3 x 4 -> 3 latent frames)."""
SPATIAL_ALIGN = 16
"""Height and width are padded to this multiple (VAE stride 8 x DiT patch 2)."""
REQUESTED_TIMESTEP = 399
"""The timestep the release asks for; it builds it as a bf16 tensor (see `TIMESTEP`)."""


def _release_timestep() -> float:
    # The release writes torch.tensor([399], dtype=bfloat16): bf16 rounds 399 to 400.
    return float(torch.tensor([REQUESTED_TIMESTEP], dtype=torch.bfloat16).item())


TIMESTEP: float = _release_timestep()
"""The timestep both the time embedding and the sigma lookup see: 400.0."""


def one_step_sigma(timestep: float = TIMESTEP) -> float:
    """Sigma of the one-step update, looked up as the release does (float32 schedule).

    `s_k = linspace(1, 0, 1001)[:-1]` shifted by `5 s / (1 + 4 s)`; sigma is the
    `s_k` whose `1000 s_k` lies nearest the timestep: 0.400815... for 400.
    """
    sigmas = torch.linspace(1, 0, 1001, dtype=torch.float32)[:-1]
    sigmas = 5 * sigmas / (1 + 4 * sigmas)
    index = torch.argmin((sigmas * 1000 - torch.tensor(timestep, dtype=torch.float32)).abs())
    return float(sigmas[index].item())


SIGMA: float = one_step_sigma()


def chunk_length(first_in_scene: bool) -> int:
    """Frames the next chunk takes: 9 for a scene's first chunk, 12 after."""
    return FIRST_CHUNK_FRAMES if first_in_scene else CHUNK_FRAMES


def padded_frame_count(frames: int, first_in_scene: bool) -> int:
    """Frame count after replicate padding: 1 mod 4 for a scene's first chunk, 0 mod 4 after."""
    return frames + (int(first_in_scene) - frames) % 4


def latent_frame_count(frames: int, first_in_scene: bool) -> int:
    """Latent frames the causal VAE makes of a padded chunk of `frames` frames."""
    padded = padded_frame_count(frames, first_in_scene)
    return (padded + 3) // 4


def prepare_chunk(
    frames: torch.Tensor, scale: int, first_in_scene: bool, *, device: torch.device | str, dtype: torch.dtype
) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """Turn LR frames (T, H, W, 3) in [0, 1] into the VAE input (1, 3, T', H', W') in [-1, 1].

    Bicubic upscaling (antialias, align_corners False) runs in float32 on the
    [-1, 1] values before the cast, as in the release; padding replicates the
    last row, column and frame. Returns the padded video and the true
    (frames, height, width) to crop back to.
    """
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"expected frames of shape (T, H, W, 3), got {tuple(frames.shape)}")
    video = to_device_async(frames, device).float().permute(0, 3, 1, 2) * 2 - 1
    if scale != 1:
        video = F.interpolate(video, scale_factor=scale, mode="bicubic", align_corners=False, antialias=True)
    length, height, width = video.shape[0], video.shape[-2], video.shape[-1]
    video = video.permute(1, 0, 2, 3).unsqueeze(0)  # (1, 3, T, H, W)
    padding = (0, -width % SPATIAL_ALIGN, 0, -height % SPATIAL_ALIGN, 0, (int(first_in_scene) - length) % 4)
    if any(padding):
        video = F.pad(video, padding, mode="replicate")
    return video.to(dtype), (length, height, width)


def one_step_restore(latents: torch.Tensor, prediction: torch.Tensor, sigma: float = SIGMA) -> torch.Tensor:
    """The one-step flow update `latents - sigma * prediction`, written as the release does."""
    return latents + prediction * (-sigma)


def finish_frames(decoded: torch.Tensor, true_size: tuple[int, int, int]) -> torch.Tensor:
    """Crop the decoded (1, 3, T', H', W') video in [-1, 1] to (T, H, W, 3) in [0, 1], float32."""
    length, height, width = true_size
    video = decoded[0, :, :length, :height, :width].float()
    return ((video + 1) / 2).permute(1, 2, 3, 0).contiguous()
