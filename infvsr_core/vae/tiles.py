"""Spatial tiling of large frames: which latent tiles cover a frame, and how their outputs are blended.

Why: above the tile threshold a frame's activations (and its causal
histories) do not fit; the release then runs the VAE per overlapping tile,
each with its own history, and blends the overlaps with linear ramps. The
regions and weights here are the release's, plus an optional margin of
zero weight on inner edges (`SEAMS["smooth"]`).
"""

from __future__ import annotations

import torch

# Tile (stride, margin) in latent pixels at the tile size 128, by name. "release" is the authors' tiling
# (SPEC section 5). "smooth" is wider overlaps whose outer 16 latent pixels get no weight: those pixels lacked
# the context beyond the tile, so its seams come out as accurate as the inside of the tiles, for more VAE work
# and larger histories (measured in bench/RESULTS.md).
SEAMS: dict[str, tuple[int, int]] = {"release": (110, 0), "smooth": (80, 16)}

TileRegion = tuple[int, int, int, int]
"""(top, bottom, left, right) of a tile, in latent pixels."""


def _starts(length: int, size: int, stride: int) -> list[int]:
    # A tile is added only while the previous one has not reached the end.
    starts = [0]
    while starts[-1] + size < length:
        starts.append(starts[-1] + stride)
    return starts


def tile_regions(latent_height: int, latent_width: int, size: int, stride: int) -> list[TileRegion]:
    """Overlapping latent tiles covering the frame, row-major; edge tiles are clipped to the frame."""
    if not 0 < stride <= size:
        raise ValueError(f"tile stride must be in (0, tile size]; got size {size}, stride {stride}")
    return [
        (top, min(top + size, latent_height), left, min(left + size, latent_width))
        for top in _starts(latent_height, size, stride)
        for left in _starts(latent_width, size, stride)
    ]


def _ramp(
    length: int, border: int, ramp_start: bool, ramp_end: bool, device: torch.device, margin: int = 0
) -> torch.Tensor:
    """1D blend weights: on each inner edge, `margin` zeros, then a linear ramp over the rest of the overlap."""
    weights = torch.ones(length, device=device)
    border = min(border, length)
    ramp = border - 2 * margin
    if border <= 0 or ramp <= 0:
        return weights
    up = torch.arange(1, ramp + 1, device=device, dtype=torch.float32) / ramp
    if ramp_start:
        weights[:margin] = 0
        weights[margin : margin + ramp] = up
    if ramp_end:
        weights[length - margin :] = 0
        weights[length - margin - ramp : length - margin] = up.flip(0)
    return weights


def tile_weights(
    region: TileRegion, frame: tuple[int, int], border: int, factor: int, device: torch.device, margin: int = 0
) -> torch.Tensor:
    """Blending weights of one tile, (1, 1, 1, h, w), float32.

    Linear ramps (1/border ... 1) over the overlap on every side that is not a
    frame edge, the minimum of the row and column ramps at the corners; the
    blended value is the weight-normalized sum of the tiles (the release's
    scheme). With a `margin` (latent pixels), the outermost pixels of each
    inner edge get weight 0 and the ramp spans the rest of the overlap: those
    pixels lacked the context beyond the tile, so only their neighbour's count.
    """
    top, bottom, left, right = region
    rows = _ramp((bottom - top) * factor, border * factor, top > 0, bottom < frame[0], device, margin * factor)
    cols = _ramp((right - left) * factor, border * factor, left > 0, right < frame[1], device, margin * factor)
    return torch.minimum(rows[:, None], cols[None, :])[None, None, None]
