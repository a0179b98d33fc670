"""Stage 1's patch-wise pixel supervision (paper section 3.3): decode a random latent window, not whole frames.

The decoder's 8x spatial and 4x temporal upsampling makes decoding whole high-resolution frames with gradients
prohibitive; the paper decodes a random latent crop C_lat(z) and compares it with the same window of the
ground truth, C_pix(x) at (8i, 8j), which in expectation is the loss over the whole frame.

What is decoded here is the window plus `context` latent pixels on each side (clipped at the frame's edges),
then cropped back to the window. Why: every 3x3 conv of the decoder zero-pads its input, so a window decoded
alone sees zeros where its neighbours should be, and that error creeps inward by the decoder's receptive field;
the context moves that band outside the window. Left over is the decoder's mid-block attention, which attends
over the whole (decoded) region of each latent frame and so sees the context region instead of the whole frame:
a small difference that no context removes (tests/test_finetune.py measures both).

The window stays at the same place for all the chunks of a sample, and the decoder's causal histories of that
region carry from chunk to chunk as in inference (cut from the graph between chunks: gradients do not flow into
earlier chunks through them).

Loss terms (paper eq. 4-5), each with its weight: MSE, L1 (not in the paper; off by default), the temporal term
||(x^_t - x^_t-1) - (x_t - x_t-1)||^2 over consecutive frames (the previous chunk's last frame included), and
DISTS (the paper's perceptual term) where its weights are on this machine (`load_dists`). Frames are compared in
[-1, 1], the decoder's range; the decoded patch is not clamped (a clamp would stop gradients at saturation).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKLWan
from torch.utils.checkpoint import checkpoint

from ..errors import UsageError
from ..vae import SPATIAL_FACTOR


@dataclass(frozen=True)
class PatchWindow:
    """A supervised window in latent pixels (top, left, height, width) and the context decoded around it."""

    top: int
    left: int
    height: int
    width: int
    context: int

    def decoded_region(self, latent_height: int, latent_width: int) -> tuple[int, int, int, int]:
        """(top, bottom, left, right) of the decoded latent region: the window and its context, within the frame."""
        return (
            max(self.top - self.context, 0),
            min(self.top + self.height + self.context, latent_height),
            max(self.left - self.context, 0),
            min(self.left + self.width + self.context, latent_width),
        )

    def pixels(self) -> tuple[slice, slice]:
        """The window's rows and columns in the high-resolution frame (8x the latent window)."""
        s = SPATIAL_FACTOR
        return slice(self.top * s, (self.top + self.height) * s), slice(self.left * s, (self.left + self.width) * s)


def sample_window(
    gen: torch.Generator, latent_size: tuple[int, int], patch: tuple[int, int], context: int
) -> PatchWindow:
    """A random window of `patch` (height, width) high-resolution pixels (multiples of 8), inside the frame of
    `latent_size`; a patch larger than the frame is cut to it."""
    if patch[0] % SPATIAL_FACTOR or patch[1] % SPATIAL_FACTOR:
        raise UsageError(f"the patch size must be a multiple of {SPATIAL_FACTOR} pixels, got {patch[0]}x{patch[1]}")
    height = min(patch[0] // SPATIAL_FACTOR, latent_size[0])
    width = min(patch[1] // SPATIAL_FACTOR, latent_size[1])
    top = int(torch.randint(latent_size[0] - height + 1, (), generator=gen))
    left = int(torch.randint(latent_size[1] - width + 1, (), generator=gen))
    return PatchWindow(top, left, height, width, context)


def _decoder_call(vae: AutoencoderKLWan, x: torch.Tensor, history: list, first_chunk: bool):
    """One decoder call as a pure function: (frames, the causal cache after it); `history` is left as it was, so
    that a checkpointed call recomputes from the same entries."""
    cache = list(history)
    frames = vae.decoder(x, feat_cache=cache, feat_idx=[0], first_chunk=first_chunk)
    return frames, cache


def decode_latents(
    vae: AutoencoderKLWan, latents: torch.Tensor, cache: list, first: bool, *, checkpoint_calls: bool = False
) -> torch.Tensor:
    """Normalized latents (B, 16, T', h, w) -> frames (B, 3, T, 8h, 8w) in about [-1, 1], with gradients.

    The plain path of `StreamingVAE.decode_chunk` (the same de-normalization, post-quant conv and diffusers
    decoder calls: a scene's first latent frame alone, then one latent frame per call, through the causal
    `cache`, whose entries are replaced), without its no-grad and its final clamp. tests/test_finetune.py checks
    it against decode_chunk. `checkpoint_calls`: each call's activations are recomputed in the backward pass
    instead of kept (the decoder's activations at full resolution dominate a training step's memory).
    """
    config = vae.config
    mean = torch.tensor(config.latents_mean, dtype=torch.float32).view(1, -1, 1, 1, 1)
    inv_std = 1.0 / torch.tensor(config.latents_std, dtype=torch.float32).view(1, -1, 1, 1, 1)
    dtype = vae.post_quant_conv.weight.dtype
    latents = latents.to(dtype)
    mean, inv_std = mean.to(latents.device, dtype), inv_std.to(latents.device, dtype)
    x = vae.post_quant_conv(latents / inv_std + mean)
    frames = []
    for i in range(x.shape[2]):
        args = (vae, x[:, :, i : i + 1], list(cache), first and i == 0)
        if checkpoint_calls and torch.is_grad_enabled():
            out, cache[:] = checkpoint(_decoder_call, *args, use_reentrant=False)
        else:
            out, cache[:] = _decoder_call(*args)
        frames.append(out)
    return torch.cat(frames, dim=2)


class PatchDecoder:
    """Decodes one window of a sample's chunks in streaming order, carrying the decoder's histories of its region."""

    def __init__(self, vae: AutoencoderKLWan, window: PatchWindow, *, checkpoint_calls: bool = False) -> None:
        self.vae = vae
        self.window = window
        self.checkpoint_calls = checkpoint_calls
        self.cache: list | None = None

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """A chunk's latents (B, 16, T', h, w) of the whole frame -> the window's frames (B, 3, T, 8 wh, 8 ww)."""
        from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d

        first = self.cache is None
        if first:
            self.cache = [None] * sum(isinstance(m, WanCausalConv3d) for m in self.vae.decoder.modules())
        top, bottom, left, right = self.window.decoded_region(latents.shape[-2], latents.shape[-1])
        region = latents[..., top:bottom, left:right]
        decoded = decode_latents(self.vae, region, self.cache, first, checkpoint_calls=self.checkpoint_calls)
        w, s = self.window, SPATIAL_FACTOR
        rows = slice((w.top - top) * s, (w.top - top + w.height) * s)
        cols = slice((w.left - left) * s, (w.left - left + w.width) * s)
        return decoded[..., rows, cols]

    def detach(self) -> None:
        """Cut the histories from the graph (after a chunk's backward: the next chunk reads their values only)."""
        if self.cache is not None:
            self.cache = [c.detach() if isinstance(c, torch.Tensor) else c for c in self.cache]


@dataclass(frozen=True)
class LossWeights:
    """Weights of the patch loss terms; the paper uses MSE, DISTS and the temporal term, each at 1."""

    mse: float = 1.0
    l1: float = 0.0
    temporal: float = 1.0
    dists: float = 0.0


class PixelLoss:
    """The weighted patch loss of one chunk; `dists` is a DISTS module (`load_dists`) or None."""

    def __init__(self, weights: LossWeights = LossWeights(), dists: torch.nn.Module | None = None) -> None:
        if weights.dists > 0 and dists is None:
            raise UsageError("a DISTS weight needs the DISTS network (load_dists)")
        self.weights = weights
        self.dists = dists

    def __call__(
        self, sr: torch.Tensor, gt: torch.Tensor, previous: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """sr and gt (B, 3, T, H, W) in [-1, 1]; `previous`: the last (sr, gt) frame (B, 3, 1, H, W) of the
        previous chunk, for the temporal term across the chunk boundary. Returns (loss, terms for the log)."""
        sr, gt = sr.float(), gt.float()
        terms: dict[str, torch.Tensor] = {}
        w = self.weights
        if w.mse:
            terms["mse"] = F.mse_loss(sr, gt)
        if w.l1:
            terms["l1"] = F.l1_loss(sr, gt)
        if w.temporal:
            sr_t, gt_t = sr, gt
            if previous is not None:
                sr_t = torch.cat([previous[0].float(), sr], dim=2)
                gt_t = torch.cat([previous[1].float(), gt], dim=2)
            if sr_t.shape[2] > 1:
                terms["temporal"] = F.mse_loss(sr_t.diff(dim=2), gt_t.diff(dim=2))
        if w.dists and self.dists is not None:
            flat = lambda v: ((v.transpose(1, 2).flatten(0, 1) + 1) / 2).clamp(0, 1)  # noqa: E731
            terms["dists"] = self.dists(flat(sr), flat(gt))
        weights = {"mse": w.mse, "l1": w.l1, "temporal": w.temporal, "dists": w.dists}
        total = sum(weights[name] * value for name, value in terms.items())
        return total, {name: float(value.detach()) for name, value in terms.items()}


DISTS_FILES = ("dists_weights.pt", "vgg16-397923af.pth")
"""The files piq's DISTS reads from PyTorch's hub cache: its alpha/beta weights and torchvision's VGG16."""


def load_dists(device: torch.device | str) -> torch.nn.Module:
    """piq's DISTS (the paper's perceptual term), only from weights already on this machine: nothing is
    downloaded. It needs the packages piq and torchvision and `DISTS_FILES` in `torch.hub.get_dir()/checkpoints`."""
    from pathlib import Path

    folder = Path(torch.hub.get_dir()) / "checkpoints"
    missing = [name for name in DISTS_FILES if not (folder / name).is_file()]
    try:
        import piq
    except ImportError:
        missing.insert(0, "the packages piq and torchvision (pip install piq torchvision)")
    if missing:
        raise UsageError(
            f"the DISTS term needs {', '.join(missing)} in {folder} (piq's DISTS weights and torchvision's "
            "ImageNet VGG16, as piq downloads them); fine-tuning never downloads them: copy them there, or "
            "train without --dists"
        )
    return piq.DISTS().to(device).eval().requires_grad_(False)
