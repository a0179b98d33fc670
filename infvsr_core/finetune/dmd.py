"""Stage 2's cross-chunk distribution matching (paper section 3.3, DMD of Yin et al. 2024 / Sun et al. 2024).

The generator's one-step outputs (clean latents x0) of consecutive chunks of a sample, generated
autoregressively with the KV cache, are concatenated along time (3 chunks: 9 latent frames, the latent of a
33-frame clip) and scored together by two diffusion models of the teacher's architecture:

- the real score: the teacher (Wan2.1-T2V-1.3B's DiT, its published weights), frozen;
- the fake score: the same network plus LoRA adapters, trained alongside with the flow-matching loss on the
  generator's current outputs, so that it tracks their distribution.

Both see x0 noised to a random timestep t (x_t = (1 - sigma) x0 + sigma noise, Wan's flow matching with shift 5,
t in [0.02, 0.98] x 1000) and predict x0 from it; the generator's gradient is their difference,
(x0_fake - x0_real) / mean |x0 - x0_real| (DMD's normalization), applied through the loss
0.5 * ||x0 - stop_grad(x0 - gradient)||^2. The real and fake models share one copy of the teacher's weights:
the real score is the fake model with its adapters switched off (`lora.adapters_disabled`).

The teacher is conditioned on text (umT5 embeddings, 4096-d) that this project does not compute: by default it
gets Wan's padding-only context (zeros, 512 tokens), i.e. no text; `--teacher-context FILE` gives it embeddings
computed elsewhere (a safetensors file with one tensor "context" (L, 4096)), and `--dmd-guidance` > 1 then
applies classifier-free guidance to the real score against the padding-only context.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from ..dit import CausalWanDiT, DiTConfig
from ..errors import UsageError
from ..weights import WeightFileError, load_checked, read_state_dict
from .lora import LoRASettings, adapters_disabled

TEACHER_WHAT = "the teacher DiT (Wan2.1-T2V-1.3B's diffusion_pytorch_model.safetensors)"
TEACHER_SOURCE = "the Hugging Face repository Wan-AI/Wan2.1-T2V-1.3B"
TEXT_TOKENS = 512
"""Wan pads its text context to 512 tokens with zeros."""
FLOW_SHIFT = 5.0
"""Wan2.1's timestep shift, the one `schedule.one_step_sigma` uses."""


@dataclass(frozen=True)
class DMDSettings:
    """Stage 2's settings: the DMD loss weight, the real score's guidance, the timestep range, and the fake
    score's adapters and optimizer (`fake_steps` updates of the fake score per generator step)."""

    weight: float = 1.0
    guidance: float = 1.0
    t_range: tuple[float, float] = (0.02, 0.98)
    fake_lora: LoRASettings = field(default_factory=LoRASettings)
    fake_lr: float = 1e-5
    fake_steps: int = 1


def load_teacher(path: str | os.PathLike, *, device: torch.device | str, dtype: torch.dtype) -> CausalWanDiT:
    """The teacher DiT from its published file (Wan's original key names, which `CausalWanDiT` shares), frozen.

    A `config.json` beside it is not needed: the size is read from the tensor shapes."""
    path = Path(path)
    state = read_state_dict(path, what=TEACHER_WHAT, source=TEACHER_SOURCE)
    config = DiTConfig.from_state_dict(state, path=path)
    if config.in_dim != 16 or config.out_dim != 16:
        raise WeightFileError(
            f"{TEACHER_WHAT} ('{path}'): {config.in_dim} input / {config.out_dim} output channels, expected Wan2.1's "
            "16-channel latents (is this the 1.3B text-to-video DiT?)"
        )
    with torch.device("meta"):
        model = CausalWanDiT(config)
    model = model.to_empty(device="cpu")
    load_checked(model, state, what=TEACHER_WHAT, path=path)
    del state
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


def teacher_context(
    path: str | os.PathLike | None, text_dim: int, *, device: torch.device | str, dtype: torch.dtype
) -> torch.Tensor:
    """The teacher's text context (1, L, text_dim): from `path` (a safetensors file with a tensor "context" of
    (L, text_dim) or (1, L, text_dim)), else Wan's padding-only context (zeros, `TEXT_TOKENS` tokens)."""
    if path is None:
        return torch.zeros(1, TEXT_TOKENS, text_dim, device=device, dtype=dtype)
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path))
    except (OSError, ValueError, RuntimeError) as exc:
        raise UsageError(f"teacher context '{path}': not a readable safetensors file ({exc})") from exc
    context = tensors.get("context")
    if context is None or context.ndim not in (2, 3) or context.shape[-1] != text_dim:
        found = {k: tuple(v.shape) for k, v in tensors.items()}
        raise UsageError(f"teacher context '{path}': expected a tensor 'context' of (L, {text_dim}), found {found}")
    return (context if context.ndim == 3 else context[None]).to(device=device, dtype=dtype)


class DistributionMatching:
    """The DMD generator loss and the fake score's loss over `score` (the teacher with fake adapters attached)."""

    def __init__(self, score: CausalWanDiT, context: torch.Tensor, settings: DMDSettings) -> None:
        self.score = score
        self.context = context
        self.uncond = torch.zeros_like(context[:, :TEXT_TOKENS]) if settings.guidance != 1.0 else None
        self.settings = settings

    def _noised(self, x0: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x_t, sigma (B,), noise) at a random timestep in `t_range`; the noise drawn on the CPU (the same on any
        device)."""
        low, high = self.settings.t_range
        t = low + (high - low) * torch.rand(x0.shape[0], generator=gen)
        sigma = (FLOW_SHIFT * t / (1 + (FLOW_SHIFT - 1) * t)).float()
        noise = torch.randn(x0.shape, generator=gen).to(x0.device, torch.float32)
        s = sigma.to(x0.device).view(-1, 1, 1, 1, 1)
        return (1 - s) * x0.float() + s * noise, sigma, noise

    def _predict(self, model, x_t: torch.Tensor, sigma: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """The flow prediction v (noise - x0) of `model` at noise level sigma, float32."""
        prediction, _ = model(x_t, context.expand(x_t.shape[0], -1, -1), sigma * 1000, graph=False)
        return prediction.float()

    def generator_loss(self, x0: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
        """DMD loss of the generator's outputs x0 (B, 16, F, h, w); its gradient reaches x0 only."""
        with torch.no_grad():
            x_t, sigma, _ = self._noised(x0.detach(), gen)
            s = sigma.to(x_t.device).view(-1, 1, 1, 1, 1)
            with adapters_disabled(self.score):
                v_real = self._predict(self.score, x_t, sigma, self.context)
                if self.uncond is not None:
                    v_uncond = self._predict(self.score, x_t, sigma, self.uncond)
                    v_real = v_uncond + self.settings.guidance * (v_real - v_uncond)
            v_fake = self._predict(self.score, x_t, sigma, self.context)
            x0_real, x0_fake = x_t - s * v_real, x_t - s * v_fake
            x0f = x0.detach().float()
            normalizer = (x0f - x0_real).abs().mean(dim=(1, 2, 3, 4), keepdim=True).clamp_min(1e-6)
            gradient = (x0_fake - x0_real) / normalizer
            target = x0f - gradient
        loss = 0.5 * F.mse_loss(x0.float(), target)
        return loss, {"dmd": float(loss.detach()), "dmd_gradient": float(gradient.abs().mean())}

    def fake_score_loss(self, model, x0: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
        """Flow-matching loss of the fake score (`model`: the score model, or its DDP wrapper) on the generator's
        outputs, which it does not backpropagate into."""
        x_t, sigma, noise = self._noised(x0.detach(), gen)
        v = self._predict(model, x_t, sigma, self.context)
        loss = F.mse_loss(v, noise - x0.detach().float())
        return loss, {"fake_score": float(loss.detach())}
