"""Wan's 3D rotary position embedding, with an absolute time offset for streaming.

The head dim is split into a time part and equal height/width parts; each part
rotates consecutive channel pairs (x[2k], x[2k+1]) by position * 1/theta^(2k/d).
A streamed chunk starts at time position `time_offset` (the latent frames
already processed in the scene), so its keys line up with the cached keys of
the previous chunk. Angles are computed for any position (no fixed table):
long films go past Wan's 1024-entry table.
"""

from __future__ import annotations

import torch

from .memory.transfer import to_device_async

THETA = 10000.0


def rope_axis_dims(head_dim: int) -> tuple[int, int, int]:
    """Channels given to (time, height, width): 44, 42, 42 for head dim 128."""
    hw = 2 * (head_dim // 6)
    return head_dim - 2 * hw, hw, hw


def _axis_cos_sin(positions: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(n,) float64 positions -> cos, sin of shape (n, dim/2), computed in float64, returned float32."""
    freqs = 1.0 / THETA ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    angles = positions[:, None] * freqs[None, :]
    return angles.cos().float(), angles.sin().float()


def rope_cos_sin(
    frames: int,
    height: int,
    width: int,
    head_dim: int,
    time_offset: int = 0,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (frames*height*width, head_dim/2), tokens in (t, h, w) row-major order.

    Each channel's angle depends on one axis only, so the float64 work is done
    per axis (on the CPU, where float64 always exists) and then broadcast.
    """
    dt, dh, dw = rope_axis_dims(head_dim)
    f64 = torch.float64
    axes = [
        _axis_cos_sin(torch.arange(frames, dtype=f64) + time_offset, dt),
        _axis_cos_sin(torch.arange(height, dtype=f64), dh),
        _axis_cos_sin(torch.arange(width, dtype=f64), dw),
    ]
    out = []
    for i in range(2):  # 0: cos, 1: sin
        t, h, w = (a[i] if device is None else to_device_async(a[i], device) for a in axes)
        grid = torch.cat(
            [
                t[:, None, None, :].expand(frames, height, width, -1),
                h[None, :, None, :].expand(frames, height, width, -1),
                w[None, None, :, :].expand(frames, height, width, -1),
            ],
            dim=-1,
        )
        out.append(grid.reshape(frames * height * width, head_dim // 2))
    return out[0], out[1]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the pairs of x (B, L, H, D) by cos/sin (L, D/2), in float32, returned in x.dtype."""
    pairs = x.float().unflatten(-1, (-1, 2))
    x0, x1 = pairs[..., 0], pairs[..., 1]
    c, s = cos[:, None, :], sin[:, None, :]
    return torch.stack([x0 * c - x1 * s, x0 * s + x1 * c], dim=-1).flatten(-2).to(x.dtype)
