"""The fine-tuning loop: samples streamed chunk by chunk, the patch loss (and in stage 2 DMD), optimizer steps.

One optimizer step takes `clips_per_step` samples (gradient accumulation; with several GPUs, each takes its own,
DDP averages the gradients). A sample runs as inference runs a scene: the LR frames are upscaled and encoded
chunk by chunk (9 frames, then 12) with the encoder's causal history, the DiT takes its one step at t = 400
with the previous chunk's KV cache and the RoPE time offset, and the patch decoder carries the decoder's
history of its window. Between chunks the KV cache and the decoder history are cut from the graph (truncated
backpropagation: a chunk's loss trains the DiT on that chunk, given the previous one), which lets stage 1
backpropagate each chunk as soon as its loss exists, so memory stays that of one chunk however many there are.
Stage 2 (`dmd`) keeps every chunk's graph until the clip's DMD loss over their concatenated outputs is known.

Memory (why the defaults): the frozen weights stay in the loading dtype (bf16 on a GPU) and only the adapters
are float32; bf16 autocast; gradient checkpointing keeps one block's activations at a time; the decoder runs on
the supervised window (plus context) only; the encoder and the visual prompt run without gradients.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..dit import CausalWanDiT, KVCache
from ..errors import UsageError
from ..lora import LoRAWeights, lora_from_state_dict, lora_metadata
from ..pipeline import InfVSRPipeline
from ..schedule import TIMESTEP, one_step_restore, prepare_chunk
from .checkpoint import config_json, load_state, plot_losses, plot_path, save_checkpoint
from .data import ClipSampler, ClipSource, TrainingClip, chunk_spans
from .degrade import Degradation
from .dmd import DistributionMatching, DMDSettings
from .lora import LoRASettings, load_lora_into, lora_state_dict
from .losses import LossWeights, PatchDecoder, PixelLoss, sample_window
from .model import make_trainable

FULL_FORMAT = "infvsr-dit"
"""The `format` metadata of a fully fine-tuned DiT file (the published key names)."""


@dataclass(frozen=True)
class TrainConfig:
    """Everything that shapes a fine-tuning run (saved with every checkpoint; a resume must match it, except
    `steps` and `save_every`). The defaults are the 24 GB plan for 480p crops (README, "Fine-tuning")."""

    steps: int = 1000
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup: int = 0
    max_grad_norm: float = 1.0
    seed: int = 0
    chunks: int = 3
    crop: tuple[int, int] = (480, 832)
    patch: tuple[int, int] = (192, 192)
    context: int = 8
    clips_per_step: int = 1
    flip: bool = True
    lora: LoRASettings | None = field(default_factory=LoRASettings)
    losses: LossWeights = field(default_factory=LossWeights)
    degradation: Degradation = field(default_factory=Degradation)
    dmd: DMDSettings | None = None
    gradient_checkpointing: bool = True
    mixed_precision: bool = True
    save_every: int = 100

    def resume_key(self) -> str:
        """The configuration a resumed run must share (all but the length of the run and the save interval)."""
        return config_json(replace(self, steps=0, save_every=0))


class Trainer:
    """Fine-tunes `pipeline.dit` (adapters, or all weights) on samples of `clips`; `teacher` (stage 2) is the
    Wan2.1 T2V DiT whose adapters become the fake score. With `distributed`, torch.distributed is initialized and
    the DiT (and the fake score) are wrapped in DistributedDataParallel."""

    def __init__(
        self,
        pipeline: InfVSRPipeline,
        clips: list[ClipSource],
        config: TrainConfig,
        *,
        teacher: CausalWanDiT | None = None,
        teacher_context: torch.Tensor | None = None,
        dists: nn.Module | None = None,
        init_lora: LoRAWeights | None = None,
        distributed: bool = False,
    ) -> None:
        if (teacher is None) != (config.dmd is None):
            raise UsageError("stage 2 (DMD) needs both the teacher DiT and its settings, stage 1 neither")
        self.config = config
        self.pipe = pipeline
        self.device = pipeline.device
        self.distributed = distributed
        if distributed:
            import torch.distributed as dist

            self.rank, self.world = dist.get_rank(), dist.get_world_size()
        else:
            self.rank, self.world = 0, 1
        self.dit = pipeline.dit
        # The VAE and the visual guidance stay frozen: gradients pass through the decoder, never into it.
        pipeline.vae.vae.requires_grad_(False)
        pipeline.guidance.requires_grad_(False)
        self.params = make_trainable(
            self.dit, config.lora, gradient_checkpointing=config.gradient_checkpointing, seed=config.seed
        )
        if init_lora is not None:
            if config.lora is None:
                raise UsageError("--init-lora starts LoRA training; it cannot start full fine-tuning")
            load_lora_into(self.dit, init_lora, config.lora)
        self.model = self._parallel(self.dit)
        self.optimizer = torch.optim.AdamW(self.params, lr=config.lr, weight_decay=config.weight_decay)
        self.sampler = ClipSampler(
            clips,
            chunks=config.chunks,
            crop=config.crop,
            degradation=config.degradation,
            flip=config.flip,
            device=self.device,
        )
        self.gen = torch.Generator().manual_seed(config.seed * 1_000_003 + self.rank)
        self.pixel_loss = PixelLoss(config.losses, dists)
        self.step = 0
        self.history: list[dict[str, float]] = []
        self._rng_after_step = self._rng_state()
        self._updating = False
        self.teacher = teacher
        self.dmd: DistributionMatching | None = None
        if teacher is not None and config.dmd is not None:
            context = teacher_context
            if context is None:
                from .dmd import teacher_context as padding_context

                context = padding_context(None, teacher.config.text_dim, device=self.device, dtype=self.pipe.dtype)
            self.fake_params = make_trainable(
                teacher, config.dmd.fake_lora, gradient_checkpointing=config.gradient_checkpointing, seed=config.seed
            )
            self.fake_model = self._parallel(teacher)
            self.fake_optimizer = torch.optim.AdamW(
                self.fake_params, lr=config.dmd.fake_lr, weight_decay=config.weight_decay
            )
            self.dmd = DistributionMatching(teacher, context, config.dmd)

    # -- pieces of a step ----------------------------------------------------------------------------------------
    def _parallel(self, module: nn.Module) -> nn.Module:
        if not self.distributed:
            return module
        from torch.nn.parallel import DistributedDataParallel

        # device_ids=None: the module sits on one device already, and DDP then leaves the inputs (the KV cache
        # object among them) as they are.
        return DistributedDataParallel(module, device_ids=None)

    def _autocast(self):
        if self.device.type == "cuda" and self.config.mixed_precision:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return nullcontext()

    def _no_sync(self, model: nn.Module, sync: bool):
        """DDP's gradient accumulation: no all-reduce for every backward of a step but its last."""
        return model.no_sync() if self.distributed and not sync else nullcontext()

    def _clip_forward(
        self, clip: TrainingClip, last_clip: bool
    ) -> tuple[dict[str, float], torch.Tensor | None]:
        """Stream one sample through the model and backpropagate its losses (per chunk in stage 1, once over the
        clip in stage 2); returns the loss terms and, in stage 2, the clip's outputs x0 (detached)."""
        cfg = self.config
        share = 1.0 / cfg.clips_per_step
        stage2 = self.dmd is not None
        vae = self.pipe.vae
        prompt = self.pipe.extract_prompt(clip.lr[0]).clone()  # a normal tensor: autograd may save it
        history = vae.new_history()
        hr = clip.hr.to(self.device).permute(3, 0, 1, 2)[None] * 2 - 1  # (1, 3, T, H, W) in [-1, 1]
        latent_size = (hr.shape[-2] // 8, hr.shape[-1] // 8)
        window = sample_window(self.gen, latent_size, cfg.patch, cfg.context)
        decoder = PatchDecoder(vae.vae, window, checkpoint_calls=cfg.gradient_checkpointing)
        rows, cols = window.pixels()
        timestep = torch.full((1,), TIMESTEP, dtype=torch.float32)
        terms: dict[str, float] = defaultdict(float)
        kv_cache: KVCache | None = None
        offset = 0
        previous = None
        outputs: list[torch.Tensor] = []
        pixel_total: torch.Tensor | float = 0.0
        spans = chunk_spans(cfg.chunks)
        with ExitStack() as clip_scope:
            if stage2:
                clip_scope.enter_context(self._no_sync(self.model, last_clip))
            for index, (start, stop) in enumerate(spans):
                first = index == 0
                video, _ = prepare_chunk(clip.lr[start:stop], 4, first, device=self.device, dtype=self.pipe.dtype)
                latents = vae.encode_chunk(video, history)
                del video
                sync = last_clip and index == len(spans) - 1
                with self._no_sync(self.model, sync) if not stage2 else nullcontext():
                    with self._autocast():
                        prediction, cache = self.model(
                            latents, prompt, timestep, time_offset=offset, kv_cache=kv_cache, graph=False
                        )
                        x0 = one_step_restore(latents, prediction)
                        sr = decoder.decode(x0)
                    gt = hr[:, :, start:stop, rows, cols]
                    loss, parts = self.pixel_loss(sr, gt, previous)
                    if stage2:
                        pixel_total = pixel_total + loss / len(spans)
                        outputs.append(x0)
                    else:
                        (loss * share / len(spans)).backward()
                for name, value in parts.items():
                    terms[name] += value / len(spans)
                previous = (sr[:, :, -1:].detach(), gt[:, :, -1:])
                decoder.detach()
                kv_cache = KVCache(
                    [k.detach() for k in cache.keys], [v.detach() for v in cache.values], cache.latent_frames
                )
                offset += latents.shape[2]
                del prediction, cache, sr, loss
            if not stage2:
                return dict(terms), None
            assert self.dmd is not None and cfg.dmd is not None
            joined = torch.cat(outputs, dim=2)
            dmd_loss, dmd_parts = self.dmd.generator_loss(joined, self.gen)
            ((pixel_total + cfg.dmd.weight * dmd_loss) * share).backward()
        terms.update(dmd_parts)
        return dict(terms), joined.detach()

    def generator_backward(self) -> tuple[dict[str, float], list[torch.Tensor]]:
        """The generator's gradients of one step (its samples drawn and streamed); the loss terms averaged over
        the samples, and in stage 2 their outputs for the fake score's update."""
        totals: dict[str, float] = defaultdict(float)
        outputs = []
        count = self.config.clips_per_step
        for index in range(count):
            clip = self.sampler.sample(self.gen)
            terms, x0 = self._clip_forward(clip, last_clip=index == count - 1)
            for name, value in terms.items():
                totals[name] += value / count
            if x0 is not None:
                outputs.append(x0)
        return dict(totals), outputs

    def fake_score_backward(self, outputs: list[torch.Tensor]) -> dict[str, float]:
        """Stage 2: the fake score's gradients on the generator's outputs (which get none)."""
        assert self.dmd is not None
        total = 0.0
        for index, x0 in enumerate(outputs):
            with self._no_sync(self.fake_model, index == len(outputs) - 1), self._autocast():
                loss, _ = self.dmd.fake_score_loss(self.fake_model, x0, self.gen)
            (loss / len(outputs)).backward()
            total += float(loss.detach()) / len(outputs)
        return {"fake_score": total}

    def _optimizer_step(self, optimizer: torch.optim.Optimizer, params: list[nn.Parameter]) -> float:
        norm = float("nan")
        if self.config.max_grad_norm > 0:
            norm = float(torch.nn.utils.clip_grad_norm_(params, self.config.max_grad_norm))
        optimizer.step()
        return norm

    def train_step(self) -> dict[str, float]:
        """One optimizer step of the generator (and in stage 2 `fake_steps` of the fake score); its log record."""
        cfg = self.config
        lr = cfg.lr * min(1.0, (self.step + 1) / cfg.warmup) if cfg.warmup else cfg.lr
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        terms, outputs = self.generator_backward()
        loss = sum(w * terms.get(name, 0.0) for name, w in self._weights().items())
        loss = self._mean_over_ranks(loss)
        if not math.isfinite(loss):
            raise UsageError(
                f"the loss became {loss} at step {self.step + 1}: lower --lr (the last checkpoint is kept)"
            )
        self._updating = True  # from here until the step is counted, the weights are between two steps
        grad_norm = self._optimizer_step(self.optimizer, self.params)
        if self.dmd is not None and cfg.dmd is not None:
            for _ in range(cfg.dmd.fake_steps):
                self.fake_optimizer.zero_grad(set_to_none=True)
                terms.update(self.fake_score_backward(outputs))
                self._optimizer_step(self.fake_optimizer, self.fake_params)
        self.step += 1
        self._updating = False
        self._rng_after_step = self._rng_state()
        record = {"step": self.step, "loss": loss, "lr": lr, "grad_norm": grad_norm, **terms}
        self.history.append(record)
        return record

    def _weights(self) -> dict[str, float]:
        w = self.config.losses
        weights = {"mse": w.mse, "l1": w.l1, "temporal": w.temporal, "dists": w.dists}
        if self.config.dmd is not None:
            weights["dmd"] = self.config.dmd.weight
        return weights

    def _mean_over_ranks(self, value: float) -> float:
        if not self.distributed:
            return value
        import torch.distributed as dist

        tensor = torch.tensor([value], dtype=torch.float64, device=self._collective_device())
        dist.all_reduce(tensor)
        return float(tensor.item()) / self.world

    def _collective_device(self) -> torch.device:
        import torch.distributed as dist

        return self.device if dist.get_backend() == "nccl" else torch.device("cpu")

    # -- checkpoints ---------------------------------------------------------------------------------------------
    def _rng_state(self) -> dict[str, Any]:
        state = {"generator": self.gen.get_state(), "torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state(self.device)
        return state

    def _gather(self, value: Any) -> list[Any]:
        if not self.distributed:
            return [value]
        import torch.distributed as dist

        gathered: list[Any] = [None] * self.world
        dist.all_gather_object(gathered, value)
        return gathered

    def checkpoint_payload(self) -> tuple[dict[str, torch.Tensor], dict[str, str], dict[str, Any]]:
        """(weights, metadata, resume state) of the current step; a collective call under DDP."""
        cfg = self.config
        ranks = self._gather(self._rng_after_step)
        if cfg.lora is not None:
            weights = lora_state_dict(self.dit)
            metadata = lora_metadata(cfg.lora.rank, cfg.lora.alpha, list(cfg.lora.targets), config=cfg.resume_key())
        else:
            weights = {k: v.detach().cpu().contiguous() for k, v in self.dit.state_dict().items()}
            metadata = {"format": FULL_FORMAT, "config": cfg.resume_key()}
        state: dict[str, Any] = {
            "step": self.step,
            "config": cfg.resume_key(),
            "world": self.world,
            "optimizer": self.optimizer.state_dict(),
            "ranks": ranks,
            "history": list(self.history),
        }
        if self.dmd is not None and cfg.dmd is not None and self.teacher is not None:
            fake = cfg.dmd.fake_lora
            state["fake"] = {
                "weights": lora_state_dict(self.teacher),
                "metadata": lora_metadata(fake.rank, fake.alpha, list(fake.targets)),
                "optimizer": self.fake_optimizer.state_dict(),
            }
        return weights, metadata, state

    def save(self, output: Path) -> None:
        """Write the checkpoint (rank 0) and the loss curve; every rank takes part in the gathering."""
        weights, metadata, state = self.checkpoint_payload()
        if self.rank == 0:
            save_checkpoint(output, weights, metadata, state)
            if self.history:
                plot_losses(self.history, plot_path(output))
        if self.distributed:
            import torch.distributed as dist

            dist.barrier()

    def resume(self, output: Path) -> None:
        """Continue from `output`'s checkpoint: weights, optimizer, random states, history (bit-identically)."""
        state = load_state(output)
        if state["config"] != self.config.resume_key():
            raise UsageError(
                f"cannot resume {output}: it was trained with other settings (only --steps and --save-every may "
                "change); pass the same options, or another --output to start anew"
            )
        if state["world"] != self.world:
            raise UsageError(f"cannot resume {output}: it was trained on {state['world']} processes, now {self.world}")
        if self.config.lora is not None:
            from ..lora import read_lora

            load_lora_into(self.dit, read_lora(output), self.config.lora)
        else:
            from ..weights import load_checked, read_state_dict

            full = read_state_dict(output, what=f"the fine-tuned DiT '{output}'")
            dtype = next(self.dit.parameters()).dtype
            load_checked(self.dit, {k: v.to(dtype) for k, v in full.items()}, what=f"the fine-tuned DiT '{output}'")
        self.optimizer.load_state_dict(state["optimizer"])
        if "fake" in state and self.teacher is not None and self.config.dmd is not None:
            fake = lora_from_state_dict(state["fake"]["weights"], state["fake"]["metadata"])
            load_lora_into(self.teacher, fake, self.config.dmd.fake_lora)
            self.fake_optimizer.load_state_dict(state["fake"]["optimizer"])
        mine = state["ranks"][self.rank]
        self.gen.set_state(mine["generator"])
        torch.set_rng_state(mine["torch"])
        if "cuda" in mine and self.device.type == "cuda":
            torch.cuda.set_rng_state(mine["cuda"], self.device)
        self.step = int(state["step"])
        self.history = list(state["history"])
        self._rng_after_step = self._rng_state()

    def fit(self, output: Path, *, progress: bool = True, report: Callable[[str], None] = print) -> None:
        """Train to `config.steps`, saving every `save_every` steps and at the end (a tqdm bar on rank 0).

        Ctrl-C or SIGTERM (single process) saves the steps completed before it, unless it came while the optimizer
        was updating the weights (then the last checkpoint stays as it is)."""
        from tqdm import tqdm

        cfg = self.config
        saved = self.step
        bar = tqdm(
            total=cfg.steps, initial=self.step, unit="step", desc="fine-tuning", disable=not progress or self.rank
        )
        try:
            while self.step < cfg.steps:
                record = self.train_step()
                bar.update(1)
                bar.set_postfix(loss=f"{record['loss']:.4g}", refresh=False)
                if self.step % cfg.save_every == 0 or self.step == cfg.steps:
                    self.save(output)
                    saved = self.step
        except KeyboardInterrupt:
            if not self.distributed and self.step > saved and not self._updating:
                self.save(output)
                report(f"saved step {self.step} to {output}; --resume continues from it")
            raise
        finally:
            bar.close()
