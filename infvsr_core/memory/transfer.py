"""Small CPU tensors to the device without the host waiting for the GPU (`to_device_async`).

A module of its own: rope.py, schedule.py and dit.py need only this, not the
host caches and their manager.
"""

from __future__ import annotations

import torch


def to_device_async(tensor: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """`tensor` on `device`, without the host waiting for the GPU.

    A copy from pageable host memory waits for every kernel queued before it,
    and the GPU then idles while the host launches the next ones: small CPU
    tensors (RoPE tables, latent statistics, a chunk's input frames) go through
    page-locked memory, asynchronously.
    """
    device = torch.device(device)
    if device.type == "cuda" and tensor.device.type == "cpu":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)
