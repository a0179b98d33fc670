"""Fine-tuning (infvsr_core/finetune/): what a step trains, that it learns, the patch loss against whole-frame
decoding, bit-identical resume, the LoRA merged at load, stage 2's gradient paths, and DDP on two CPU processes.

Everything runs on the tiny fixture weights (random, published formats) at 16x16 high-resolution crops.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from infvsr_core.cli import main as cli_main
from infvsr_core.dit import DiTConfig, random_dit_state_dict
from infvsr_core.errors import UsageError
from infvsr_core.finetune.data import ClipSource, TrainingClip, find_clips
from infvsr_core.finetune.degrade import Degradation, degrade
from infvsr_core.finetune.dmd import DistributionMatching, DMDSettings, load_teacher
from infvsr_core.finetune.lora import LoRASettings, adapters_disabled, attach_lora, lora_layers, lora_state_dict
from infvsr_core.finetune.losses import LossWeights, PatchDecoder, PatchWindow, PixelLoss, decode_latents
from infvsr_core.finetune.trainer import TrainConfig, Trainer
from infvsr_core.loader import load_pipeline
from infvsr_core.lora import lora_metadata, merge_lora, read_lora
from infvsr_core.vae import TINY_VAE_BASE_DIM, StreamingVAE, build_vae, random_vae_state_dict
from infvsr_core.weights import read_state_dict
from tests.conftest import make_clip

CROP = (16, 16)


def _small(**overrides) -> TrainConfig:
    """The tests' configuration: one 9-frame chunk, 16x16 crops, the whole crop supervised, clean bicubic pairs."""
    settings = dict(
        crop=CROP, patch=CROP, context=2, chunks=1, degradation=Degradation.bicubic(), flip=False, lr=1e-3
    )
    settings.update(overrides)
    return TrainConfig(**settings)


def _write_frames(folder: Path, frames: torch.Tensor) -> Path:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for index, frame in enumerate(frames):
        Image.fromarray((frame * 255).round().to(torch.uint8).numpy()).save(folder / f"{index:04d}.png")
    return folder


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """A training folder: one 21-frame 24x24 clip as PNG frames (two chunks' worth, room for crops)."""
    root = tmp_path_factory.mktemp("finetune_data")
    _write_frames(root / "clip", make_clip(21, 24, 24, seed=11))
    return root


def _lora_params(model) -> list[torch.nn.Parameter]:
    pairs = [(layer.lora_A["default"], layer.lora_B["default"]) for _, layer in lora_layers(model)]
    return [linear.weight for pair in pairs for linear in pair]


# -- degradation ----------------------------------------------------------------------------------------------


def test_degradation_is_seeded_sized_and_bicubic_preset_is_plain_bicubic():
    hr = make_clip(9, 32, 32, seed=1)
    first = degrade(hr, torch.Generator().manual_seed(5))
    again = degrade(hr, torch.Generator().manual_seed(5))
    other = degrade(hr, torch.Generator().manual_seed(6))
    assert first.shape == (9, 8, 8, 3) and 0 <= float(first.min()) and float(first.max()) <= 1
    assert torch.equal(first, again) and not torch.equal(first, other)
    clean = degrade(hr, torch.Generator().manual_seed(5), Degradation.bicubic())
    reference = F.interpolate(hr.permute(0, 3, 1, 2), size=(8, 8), mode="bicubic", antialias=True).clamp(0, 1)
    assert torch.allclose(clean, reference.permute(0, 2, 3, 1), atol=1e-6)
    with pytest.raises(ValueError, match="multiple of the scale"):
        degrade(hr[:, :30], torch.Generator())


def test_dists_term_needs_its_weights_on_this_machine(tmp_path, monkeypatch):
    from infvsr_core.finetune.losses import load_dists

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty hub cache: nothing may be downloaded
    with pytest.raises(UsageError, match="dists_weights.pt.*never downloads"):
        load_dists("cpu")
    with pytest.raises(UsageError, match="needs the DISTS network"):
        PixelLoss(LossWeights(dists=1.0))


# -- what one step trains -------------------------------------------------------------------------------------


def test_steps_change_exactly_the_adapters_by_default(tiny_models, data):
    """(Full fine-tuning, which trains every DiT weight, is the DDP test's configuration.)"""
    clips = find_clips(data)
    pipe = load_pipeline(tiny_models, device="cpu", dtype="fp32")
    before = {name: p.detach().clone() for name, p in pipe.dit.named_parameters()}
    frozen = [m.state_dict() for m in (pipe.vae.vae, pipe.guidance)]
    frozen = [{k: v.clone() for k, v in sd.items()} for sd in frozen]
    trainer = Trainer(pipe, clips, _small(chunks=2))  # two chunks: the second reads the first's KV cache
    lora = _lora_params(pipe.dit)
    assert trainer.params == lora and len(lora) == 2 * 2 * 10  # 2 blocks x (4 self + 4 cross + 2 ffn) linears
    start = [p.detach().clone() for p in lora]
    trainer.train_step()
    trainer.train_step()  # B is zero at first, so A's first gradient is zero: the second step moves it
    assert all(not torch.equal(p, s) for p, s in zip(lora, start, strict=True))
    for name, p in pipe.dit.named_parameters():
        if "lora_" not in name:
            key = name.replace(".base_layer", "")
            assert torch.equal(p, before[key]), name
    for module, saved in zip((pipe.vae.vae, pipe.guidance), frozen, strict=True):
        assert all(torch.equal(v, saved[k]) for k, v in module.state_dict().items())
        assert all(p.grad is None for p in module.parameters())


def test_loss_falls_on_a_tiny_overfit_set(tiny_models):
    """The target is reachable: the high-resolution clip is the pipeline's own output with a rank-4 change of the
    adapted linears, so rank-4 adapters can match it. Stated: 12 steps cut the loss at least 4-fold (about
    7-fold here: the mean of the last three steps' losses against the first)."""
    low = make_clip(9, 4, 4, seed=3)
    target = load_pipeline(tiny_models, device="cpu", dtype="fp32")
    attach_lora(target.dit, LoRASettings(4, 4.0))
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in _lora_params(target.dit):
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    high = target.upscale(low)

    class OneClip:  # the data: always this pair, whole frame supervised
        def sample(self, gen):
            return TrainingClip(high, low, Path("target"), 0)

    pipe = load_pipeline(tiny_models, device="cpu", dtype="fp32")
    trainer = Trainer(pipe, [ClipSource(Path("target"), 9, 16, 16)], _small(lora=LoRASettings(4, 4.0), lr=2e-3))
    trainer.sampler = OneClip()
    losses = [trainer.train_step()["loss"] for _ in range(12)]
    assert sum(losses[-3:]) / 3 < losses[0] / 4, losses


# -- the patch loss -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tall_latents():
    """Two chunks (1 + 1 latent frames) of a tall, narrow latent video: 40 rows leave room for the decoder's
    whole receptive field (17 latent rows) on both sides of a window in the middle; the window spans the width."""
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(1, 16, 1, 40, 2, generator=gen), torch.randn(1, 16, 1, 40, 2, generator=gen)]


@pytest.fixture(scope="module")
def real_decoder(tall_latents):
    """The tiny decoder as it is, and its whole-frame decode of the tall latents."""
    vae = _decoders(local=False)
    return vae, _full_decode(vae, tall_latents)


def _decoders(local: bool):
    vae = build_vae(random_vae_state_dict(TINY_VAE_BASE_DIM, seed=1), dtype=torch.float32).requires_grad_(False)
    if local:  # the mid-block attention, the decoder's one non-local op, as identity
        for module in vae.decoder.modules():
            if type(module).__name__ == "WanAttentionBlock":
                module.forward = lambda x: x
    return vae


def _full_decode(vae, latents):
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d

    cache = [None] * sum(isinstance(m, WanCausalConv3d) for m in vae.decoder.modules())
    with torch.no_grad():
        return [decode_latents(vae, z, cache, i == 0) for i, z in enumerate(latents)]


def _patch_vs_full(vae, latents, full, context):
    """(largest |patch decode - full decode restricted to the window|, relative loss difference) over the chunks."""
    window = PatchWindow(18, 0, 4, 2, context)
    rows, cols = window.pixels()
    patches = PatchDecoder(vae, window)
    target = torch.rand(1, 3, 5, 320, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    loss = PixelLoss(LossWeights(mse=1.0, temporal=1.0))
    worst, relative, start, prev_a, prev_b = 0.0, 0.0, 0, None, None
    with torch.no_grad():
        for z, whole in zip(latents, full, strict=True):
            patch, reference = patches.decode(z), whole[..., rows, cols]
            gt = target[:, :, start : start + patch.shape[2], rows, cols]
            start += patch.shape[2]
            a, _ = loss(patch, gt, prev_a)
            b, _ = loss(reference, gt, prev_b)
            prev_a, prev_b = (patch[:, :, -1:], gt[:, :, -1:]), (reference[:, :, -1:], gt[:, :, -1:])
            worst = max(worst, float((patch - reference).abs().max()))
            relative = max(relative, abs(float(a) - float(b)) / float(b))
    return worst, relative


def test_differentiable_decode_is_the_inference_decode(tall_latents, real_decoder):
    vae, full = real_decoder
    streaming = StreamingVAE(vae, fast=False)
    history = streaming.new_history()
    for ours, z in zip(full, tall_latents, strict=True):
        assert torch.equal(ours.clamp(-1, 1), streaming.decode_chunk(z, history))
    # Checkpointed calls (recomputed in the backward pass) give the same frames and the same gradients.
    gen = torch.Generator().manual_seed(2)
    latents = [torch.randn(1, 16, 2, 2, 2, generator=gen), torch.randn(1, 16, 1, 2, 2, generator=gen)]
    weights = torch.randn(1, 3, 9, 16, 16, generator=gen)
    results = []
    for checkpointed in (False, True):
        leaves = [z.clone().requires_grad_(True) for z in latents]
        cache = [None] * len(streaming.new_history().decoder_cache)
        frames = [decode_latents(vae, z, cache, i == 0, checkpoint_calls=checkpointed) for i, z in enumerate(leaves)]
        (torch.cat(frames, dim=2) * weights).sum().backward()
        results.append([z.grad for z in leaves])
    assert all(torch.equal(a, b) for a, b in zip(*results, strict=True))


def test_patch_loss_equals_the_full_frame_loss_restricted_to_the_patch(tall_latents, real_decoder):
    """With a local decoder, a window decoded with 17 latent pixels of context is the whole-frame decode to float
    rounding (1e-5), loss included; 8 pixels leave 1e-3, none 0.1 or more: each 3x3 conv zero-pads the window's
    edge, and that error reaches 17 latent pixels inward. The real decoder's mid attention also sees the window
    and its context only, not the whole frame: with random weights (near-uniform attention) that leaves up to
    0.05 at 17 pixels of context and moves the loss by under 1 %."""
    local = _decoders(local=True)
    full = _full_decode(local, tall_latents)
    exact, exact_loss = _patch_vs_full(local, tall_latents, full, 17)
    assert exact < 1e-5 and exact_loss < 1e-5
    assert _patch_vs_full(local, tall_latents, full, 8)[0] < 1e-3
    assert _patch_vs_full(local, tall_latents, full, 0)[0] > 0.1
    real, full = real_decoder
    with_context, loss_difference = _patch_vs_full(real, tall_latents, full, 17)
    assert with_context < 0.05 and loss_difference < 0.01


# -- checkpoints and resume (through the command line) --------------------------------------------------------


def _finetune(tiny_models, data, output, *extra):
    return cli_main(
        [
            "finetune", "--data", str(data), "--models", str(tiny_models), "--output", str(output),
            "--crop", "16x16", "--patch", "16x16", "--patch-context", "2", "--chunks", "1", "--lr", "1e-3",
            "--save-every", "1", "--quiet", "--blur-sigma", "0.2,1", *extra,
        ]
    )  # fmt: skip


def test_checkpoint_resume_continues_bit_identically(tiny_models, data, tmp_path):
    straight, split = tmp_path / "straight.safetensors", tmp_path / "split.safetensors"
    assert _finetune(tiny_models, data, straight, "--steps", "2") == 0
    assert _finetune(tiny_models, data, split, "--steps", "1") == 0
    assert _finetune(tiny_models, data, split, "--steps", "1") == 1  # exists: --resume or --overwrite
    assert _finetune(tiny_models, data, split, "--steps", "2", "--resume") == 0
    a, b = read_lora(straight), read_lora(split)
    assert a.metadata["step"] == b.metadata["step"] == "2" and a.rank == 16 and a.alpha == 16.0
    assert set(a.pairs) == set(b.pairs) and len(a.pairs) == 20
    for name in a.pairs:
        assert all(torch.equal(x, y) for x, y in zip(a.pairs[name], b.pairs[name], strict=True)), name
    states = [torch.load(p.with_name(f"{p.stem}.state.pt"), weights_only=True) for p in (straight, split)]
    assert [h["loss"] for h in states[0]["history"]] == [h["loss"] for h in states[1]["history"]]
    moments = [s["optimizer"]["state"] for s in states]
    assert all(torch.equal(moments[0][i]["exp_avg_sq"], moments[1][i]["exp_avg_sq"]) for i in moments[0])
    assert (tmp_path / "split.loss.png").read_bytes().startswith(b"\x89PNG")


# -- the LoRA at load -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def random_lora(tiny_models, tmp_path_factory) -> Path:
    """A LoRA file with random pairs large enough to change the output clearly."""
    from safetensors.torch import save_file

    pipe = load_pipeline(tiny_models, device="cpu", dtype="fp32")
    settings = LoRASettings(4, 8.0)
    attach_lora(pipe.dit, settings)
    gen = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for p in _lora_params(pipe.dit):
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    path = tmp_path_factory.mktemp("lora") / "footage.safetensors"
    save_file(lora_state_dict(pipe.dit), str(path), metadata=lora_metadata(4, 8.0, list(settings.targets)))
    return path


def test_lora_merged_at_load_gives_the_unmerged_lora_output(tiny_models, random_lora):
    """float32: the merged weight W + s B A and the unmerged W x + s B (A x) differ by rounding only; through the
    whole pipeline (DiT, VAE decode) the frames agree to 1e-4, while the LoRA itself moves them by far more."""
    clip = make_clip(9, 4, 4, seed=4)
    merged = load_pipeline(tiny_models, device="cpu", dtype="fp32", lora=random_lora).upscale(clip)
    unmerged_pipe = load_pipeline(tiny_models, device="cpu", dtype="fp32")
    base = unmerged_pipe.upscale(clip)
    lora = read_lora(random_lora)
    from infvsr_core.finetune.lora import load_lora_into

    attach_lora(unmerged_pipe.dit, LoRASettings(4, 8.0))
    load_lora_into(unmerged_pipe.dit, lora, LoRASettings(4, 8.0))
    unmerged = unmerged_pipe.upscale(clip)
    assert (merged - unmerged).abs().max() < 1e-4
    assert (unmerged - base).abs().max() > 1e-2


def test_lora_reaches_the_command_line_and_bad_files_are_named(tiny_models, random_lora, tmp_path, capsys):
    from infvsr_core.fixtures import write_demo_clip

    clip = write_demo_clip(tmp_path / "in.mp4", frames=3, width=16, height=16)
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"not a safetensors file")
    code = cli_main(["upscale", str(clip), "-o", str(tmp_path / "out.mp4"), "--models", str(tiny_models),
                     "--lora", str(bad), "--device", "cpu", "--quiet"])  # fmt: skip
    assert code == 1 and "broken.safetensors" in capsys.readouterr().err
    with pytest.raises(UsageError, match="fp8 copy"):
        from infvsr_core.loader import save_fp8_dit

        fp8 = save_fp8_dit(tiny_models / "InfVSR.ckpt", tmp_path / "InfVSR_fp8.safetensors")
        load_pipeline(tiny_models, dit=fp8, device="cpu", lora=random_lora)


def test_loader_node_lists_and_merges_loras(tiny_models, random_lora, tmp_path):
    import nodes
    from nodes import comfy

    folder = tmp_path / "models"
    (folder / "loras" / "anime").mkdir(parents=True)
    for name in ("InfVSR.ckpt", "Wan2.1_VAE.pth", "ram_swin_large_14m.pth", "DAPE.pth"):
        os.link(tiny_models / name, folder / name)
    os.link(random_lora, folder / "loras" / "anime" / "footage.safetensors")
    saved = dict(comfy._overrides)
    comfy.set_directories(models=folder)
    try:
        spec = nodes.LoadInfVSRModel.INPUT_TYPES()
        choices, options = spec["optional"]["lora"]
        assert choices == ["none", "anime/footage.safetensors"] and options["default"] == "none"
        assert all("footage" not in n for n in spec["required"]["dit"][0])  # a LoRA is not a DiT choice
        files = ("InfVSR.ckpt", "Wan2.1_VAE.pth", "ram_swin_large_14m.pth", "DAPE.pth")
        (model,) = nodes.LoadInfVSRModel().load(*files, dtype="fp32", lora="anime/footage.safetensors")
        published = read_state_dict(tiny_models / "InfVSR.ckpt", what="DiT")
        merged = merge_lora(published, read_lora(random_lora), what="DiT")
        loaded = model.pipeline.dit.state_dict()
        assert set(loaded) == set(merged) and all(torch.equal(loaded[k], merged[k].float()) for k in merged)
        assert not torch.equal(merged["blocks.0.ffn.0.weight"], published["blocks.0.ffn.0.weight"].float())
        with pytest.raises(ValueError, match="not found"):
            nodes.LoadInfVSRModel().load(*files, dtype="fp32", lora="../InfVSR.ckpt")
    finally:
        comfy._overrides.clear()
        comfy._overrides.update(saved)


# -- stage 2 --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory) -> Path:
    """A tiny text-to-video DiT in the published format (umT5's 4096-d text embedding)."""
    from safetensors.torch import save_file

    config = DiTConfig(dim=256, ffn_dim=512, num_heads=2, num_layers=2, text_dim=4096)
    path = tmp_path_factory.mktemp("teacher") / "diffusion_pytorch_model.safetensors"
    save_file(random_dit_state_dict(config, seed=5), str(path))
    return path


def test_dmd_gradients_reach_the_generator_and_the_fake_score_only(tiny_models, data, teacher_file):
    pipe = load_pipeline(tiny_models, device="cpu", dtype="fp32")
    teacher = load_teacher(teacher_file, device="cpu", dtype=torch.float32)
    # DMD alone (no pixel terms), so that any generator gradient is the DMD's.
    config = _small(losses=LossWeights(mse=0.0, temporal=0.0), dmd=DMDSettings(fake_lora=LoRASettings(4, 4.0)))
    trainer = Trainer(pipe, find_clips(data), config, teacher=teacher)
    generator, fake = _lora_params(pipe.dit), _lora_params(teacher)
    real = [p for name, p in teacher.named_parameters() if "lora_" not in name]
    with torch.no_grad():  # a fake score that differs from the real one (both start as the teacher)
        for p in fake:
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(2)) * 0.05)

    terms, outputs = trainer.generator_backward()
    assert terms["dmd"] > 0 and len(outputs) == 1 and outputs[0].shape[2] == 3 and not outputs[0].requires_grad
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in generator[1::2])  # every B
    assert all(p.grad is None for p in fake + real) and not any(p.requires_grad for p in real)

    for p in generator:
        p.grad = None
    trainer.fake_score_backward(outputs)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in fake)
    assert all(p.grad is None for p in generator + real)


def test_dmd_gradient_is_the_fake_minus_real_prediction(teacher_file):
    """d loss / d x0 = (x0_fake - x0_real) / mean|x0 - x0_real| / numel, with the two scores recomputed here."""
    score = load_teacher(teacher_file, device="cpu", dtype=torch.float32)
    attach_lora(score, LoRASettings(4, 4.0))
    with torch.no_grad():
        for p in _lora_params(score):
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(4)) * 0.05)
    context = torch.randn(1, 7, 4096, generator=torch.Generator().manual_seed(6))
    dmd = DistributionMatching(score, context, DMDSettings())
    x0 = torch.randn(1, 16, 3, 2, 4, generator=torch.Generator().manual_seed(8), requires_grad=True)
    loss, _ = dmd.generator_loss(x0, torch.Generator().manual_seed(7))
    loss.backward()

    gen = torch.Generator().manual_seed(7)
    t = 0.02 + 0.96 * torch.rand(1, generator=gen)
    sigma = 5 * t / (1 + 4 * t)
    noise = torch.randn(x0.shape, generator=gen)
    x_t = (1 - sigma) * x0.detach() + sigma * noise
    with torch.no_grad():
        with adapters_disabled(score):
            real = x_t - sigma * score(x_t, context, sigma * 1000)[0]
        fake = x_t - sigma * score(x_t, context, sigma * 1000)[0]
    expected = (fake - real) / (x0.detach() - real).abs().mean() / x0.numel()
    assert torch.allclose(x0.grad, expected, rtol=1e-4, atol=1e-9)
    assert expected.abs().max() > 0


# -- several processes ----------------------------------------------------------------------------------------


def _ddp_worker(rank: int, world: int, port: int, models: str, data: str, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        pipe = load_pipeline(models, device="cpu", dtype="fp32")
        # All weights trained (no peft): each process then imports less, and DDP covers every parameter.
        trainer = Trainer(pipe, find_clips(data), _small(lora=None), distributed=True)
        record = trainer.train_step()
        weights = {k: v.detach().clone() for k, v in trainer.dit.state_dict().items()}
        torch.save({"weights": weights, "mse": record["mse"], "loss": record["loss"]}, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_ddp_on_two_cpu_processes_keeps_the_replicas_identical(tiny_models, data, tmp_path):
    """torch.distributed (gloo), 2 processes, each its own samples (seed + rank): after a step the adapters are
    bit-identical on both (DDP averaged the gradients), though each process saw other frames."""
    initial = {k: v.float() for k, v in read_state_dict(tiny_models / "InfVSR.ckpt", what="DiT").items()}
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(2, port, str(tiny_models), str(data), str(tmp_path)), nprocs=2, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert results[0]["mse"] != results[1]["mse"]  # different samples
    assert results[0]["loss"] == results[1]["loss"]  # the logged loss is the mean over the processes
    first, second = results[0]["weights"], results[1]["weights"]
    assert set(first) == set(second) == set(initial)
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert sum(not torch.equal(first[k], initial[k]) for k in first) > 0.9 * len(first)
