"""Visual guidance (RAM Swin + merged DAPE LoRA) against independent references.

Everything runs on CPU in float32 with the tiny config (same 384 geometry, so
145 output tokens); references are written here from the definitions (loralib's
grouped MergedLinear, Swin window attention as explicit loops in float64, the
bilinear / antialiased resize by hand) rather than by calling the module's helpers.
"""

from __future__ import annotations

import itertools
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from infvsr_core.guidance import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    SwinConfig,
    VisualGuidance,
    build_guidance,
    merge_dape,
    random_dape_state_dict,
    random_ram_state_dict,
    relative_position_index,
    select_ram_state_dict,
    shifted_window_mask,
)
from infvsr_core.weights import WeightFileError, load_checked

TINY = SwinConfig.tiny()


@pytest.fixture(scope="module")
def ram() -> dict[str, torch.Tensor]:
    return random_ram_state_dict(TINY, seed=0)


@pytest.fixture(scope="module")
def dape() -> dict[str, torch.Tensor]:
    return random_dape_state_dict(TINY, seed=0)


@pytest.fixture(scope="module")
def model(ram, dape) -> VisualGuidance:
    return build_guidance(ram, dape, ram_path="ram.pth", dape_path="DAPE.pth")


@pytest.fixture(scope="module")
def reference() -> torch.Tensor:
    return torch.rand(2, 3, 90, 120, generator=torch.Generator().manual_seed(7))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Max abs difference relative to the reference's max magnitude."""
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


# --------------------------------------------------------------------------- 1. DAPE merge


def unmerged_lora_qkv(x, weight, bias, lora_a, lora_b, scaling=1 / 8):
    """loralib MergedLinear(d, 3d, r, enable_lora=[True, False, True]).forward with merged=False."""
    result = F.linear(x, weight, bias)
    after_a = F.linear(x, lora_a)  # (..., N, 2r)
    after_b = F.conv1d(after_a.transpose(-2, -1), lora_b.unsqueeze(-1), groups=2).transpose(-2, -1)  # (..., N, 2d)
    d = weight.shape[0] // 3
    padded = torch.zeros(*after_b.shape[:-1], 3 * d, dtype=x.dtype)  # zero_pad: q and v rows only
    padded[..., :d] = after_b[..., :d]
    padded[..., 2 * d :] = after_b[..., d:]
    return result + padded * scaling


class UnmergedLoRAQKV(nn.Module):
    """Wraps a plain qkv Linear with the DAPE LoRA branch kept separate."""

    def __init__(self, base: nn.Linear, lora_a: torch.Tensor, lora_b: torch.Tensor) -> None:
        super().__init__()
        self.base, self.lora_a, self.lora_b = base, lora_a, lora_b

    def forward(self, x):
        return unmerged_lora_qkv(x, self.base.weight, self.base.bias, self.lora_a, self.lora_b)


def test_merged_qkv_equals_unmerged_lora_per_layer(ram, dape):
    visual = select_ram_state_dict(ram)
    merged = merge_dape(visual, dape)
    gen = torch.Generator().manual_seed(1)
    names = [k[: -len(".weight")] for k in visual if k.endswith("attn.qkv.weight")]
    assert len(names) == sum(TINY.depths)
    worst, effect = 0.0, float("inf")
    for name in names:
        w, b = visual[f"{name}.weight"], visual[f"{name}.bias"]
        x = torch.randn(3, 50, w.shape[1], generator=gen)
        want = unmerged_lora_qkv(x, w, b, dape[f"{name}.lora_A"], dape[f"{name}.lora_B"])
        got = F.linear(x, merged[f"{name}.weight"], b)
        worst = max(worst, rel_err(got, want))
        d = w.shape[1]
        # k rows untouched, q and v rows changed
        assert torch.equal(merged[f"{name}.weight"][d : 2 * d], w[d : 2 * d])
        effect = min(effect, rel_err(F.linear(x, w, b), want))
    assert worst < 5e-6, worst  # measured 6e-7 (float32 rounding)
    assert effect > 1e-2  # the LoRA branch does change the layer


def test_merged_model_equals_model_with_unmerged_lora(model, ram, dape, reference):
    plain = load_checked(VisualGuidance(TINY), select_ram_state_dict(ram), what="RAM").eval()
    with torch.no_grad():
        without_lora = plain(reference)
        for name, module in list(plain.named_modules()):
            if name.endswith("attn.qkv"):
                parent = plain.get_submodule(name.rsplit(".", 1)[0])
                parent.qkv = UnmergedLoRAQKV(module, dape[f"{name}.lora_A"], dape[f"{name}.lora_B"])
        want = plain(reference)
        got = model(reference)
    assert got.shape == (2, 145, 512)
    assert rel_err(got, want) < 1e-5  # measured 6e-7
    assert rel_err(without_lora, want) > 1e-2  # the merge is not a no-op


def test_unprefixed_dape_keys_and_bert_lora_are_accepted(ram, dape):
    visual = select_ram_state_dict(ram)
    bare = {k.removeprefix("visual_encoder."): v for k, v in dape.items()}
    assert any(k.startswith("tagging_head.") for k in bare)  # BERT-head LoRA in the file: ignored
    a, b = merge_dape(visual, dape), merge_dape(visual, bare)
    assert a.keys() == visual.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


# --------------------------------------------------------------------------- 2. Swin forward


def test_relative_position_index_naive():
    for w in (1, 3, 12):
        index = relative_position_index(w)
        coords = [(i, j) for i in range(w) for j in range(w)]
        naive = torch.tensor(
            [[(p[0] - q[0] + w - 1) * (2 * w - 1) + (p[1] - q[1] + w - 1) for q in coords] for p in coords]
        )
        assert torch.equal(index, naive)


def naive_shift_mask(res: int, w: int, s: int) -> torch.Tensor:
    """Masked iff two tokens of a shifted window come from non-adjacent image areas (the roll wrapped them)."""
    n_side = res // w
    out = torch.zeros(n_side * n_side, w * w, w * w)
    for wi, wj in itertools.product(range(n_side), range(n_side)):
        orig = [((wi * w + a + s) % res, (wj * w + b + s) % res) for a in range(w) for b in range(w)]
        for p, q in itertools.product(range(w * w), repeat=2):
            if abs(orig[p][0] - orig[q][0]) >= w or abs(orig[p][1] - orig[q][1]) >= w:
                out[wi * n_side + wj, p, q] = -100.0
    return out


@pytest.mark.parametrize("res,w,s", [(8, 4, 2), (12, 4, 2), (24, 12, 6)])
def test_shift_mask_naive(res, w, s):
    assert torch.equal(shifted_window_mask(res, w, s), naive_shift_mask(res, w, s))


def naive_block(block, x: torch.Tensor, res: int, w: int, s: int) -> torch.Tensor:
    """One Swin block in float64 with explicit per-window loops (no roll / partition helpers)."""
    p = {k: v.double() for k, v in block.state_dict().items()}
    x = x.double()
    bsz, _, c = x.shape
    heads = p["attn.relative_position_bias_table"].shape[1]
    hd = c // heads
    h = F.layer_norm(x, (c,), p["norm1.weight"], p["norm1.bias"])
    out = torch.zeros_like(h)
    offsets = [(a, b) for a in range(w) for b in range(w)]
    rel = torch.tensor(
        [[(pa - qa + w - 1) * (2 * w - 1) + (pb - qb + w - 1) for qa, qb in offsets] for pa, pb in offsets]
    )
    bias = p["attn.relative_position_bias_table"][rel].permute(2, 0, 1)  # heads, N, N
    for wi, wj in itertools.product(range(res // w), range(res // w)):
        cells = [(wi * w + a, wj * w + b) for a, b in offsets]  # shifted-frame coordinates
        orig = torch.tensor([((y + s) % res, (xx + s) % res) for y, xx in cells])  # where they live in the image
        apart = (orig[:, None, :] - orig[None, :, :]).abs().max(-1).values >= w  # the roll wrapped them together
        flat = orig[:, 0] * res + orig[:, 1]
        tok = h[:, flat]  # B, N, C
        qkv = tok @ p["attn.qkv.weight"].T + p["attn.qkv.bias"]
        q, k, v = qkv.split(c, dim=-1)
        merged = []
        for head in range(heads):
            sl = slice(head * hd, (head + 1) * hd)
            logits = (q[..., sl] * hd**-0.5) @ k[..., sl].transpose(-1, -2) + bias[head] - 100.0 * apart
            merged.append(logits.softmax(-1) @ v[..., sl])
        out[:, flat] = torch.cat(merged, -1) @ p["attn.proj.weight"].T + p["attn.proj.bias"]
    x = x + out
    y = F.layer_norm(x, (c,), p["norm2.weight"], p["norm2.bias"])
    y = F.gelu(y @ p["mlp.fc1.weight"].T + p["mlp.fc1.bias"]) @ p["mlp.fc2.weight"].T + p["mlp.fc2.bias"]
    return x + y


@pytest.mark.parametrize("stage,index", [(1, 0), (1, 1), (3, 1)])
def test_block_against_float64_window_loops(model, stage, index):
    block = model.visual_encoder.layers[stage].blocks[index]
    res = TINY.resolution(stage)
    w = min(TINY.window_size, res)
    s = 0 if (index % 2 == 0 or res <= TINY.window_size) else TINY.window_size // 2
    assert (block.window, block.shift) == (w, s)
    assert (block.attn_mask is None) == (s == 0)
    c = TINY.embed_dim * 2**stage
    x = torch.randn(2, res * res, c, generator=torch.Generator().manual_seed(stage * 10 + index))
    with torch.no_grad():
        got = block(x)
    assert rel_err(got, naive_block(block, x, res, w, s)) < 1e-5  # measured 2.4e-7 .. 3e-7


def test_output_tokens_and_mean_token(model, reference):
    with torch.no_grad():
        tokens = model.visual_encoder(model.preprocess(reference))
        prompt = model(reference)
    assert tokens.shape == (2, 145, TINY.num_features)
    assert prompt.shape == (2, 145, 512)
    assert torch.allclose(tokens[:, 0], tokens[:, 1:].mean(1), atol=1e-6)
    assert torch.allclose(prompt[:, 0], prompt[:, 1:].mean(1), atol=1e-5)  # image_proj is affine
    # the batch is independent: one image at a time gives the same tokens
    with torch.no_grad():
        single = model(reference[1:])
    assert rel_err(single[0], prompt[1]) < 1e-5


def test_small_grid_stage_uses_whole_grid_window():
    cfg = SwinConfig(img_size=96, embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4))  # grids 24,12,6,3
    m = VisualGuidance(cfg)
    assert [m.visual_encoder.layers[i].blocks[1].window for i in range(4)] == [12, 12, 6, 3]
    assert [m.visual_encoder.layers[i].blocks[1].shift for i in range(4)] == [6, 0, 0, 0]
    sd = m.state_dict()
    assert sd["visual_encoder.layers.2.blocks.0.attn.relative_position_bias_table"].shape == (11 * 11, 2)
    assert SwinConfig.from_state_dict(sd, img_size=96) == cfg
    with torch.no_grad():
        assert m(torch.rand(1, 3, 40, 40)).shape == (1, 10, 512)


def test_reduced_precision_runs(ram, dape, model, reference):
    reference = reference[:1]  # half-precision CPU kernels are slow
    with torch.no_grad():
        want = model(reference)
        for dtype, tol in ((torch.bfloat16, 3e-2), (torch.float16, 5e-3)):
            half = build_guidance(ram, dape, dtype=dtype)
            assert half.visual_encoder.layers[0].blocks[1].attn_mask.dtype == dtype
            got = half(reference)
            assert got.dtype == dtype and torch.isfinite(got).all()
            err = ((got.float() - want).norm() / want.norm()).item()
            assert err < tol, (dtype, err)  # measured ~9e-3 (bf16), ~1e-3 (fp16)


# --------------------------------------------------------------------------- 3. key names


def test_tiny_keys_match_ram_selection(ram):
    selected = select_ram_state_dict(ram)
    assert set(VisualGuidance(TINY).state_dict()) == set(selected)
    assert "label_embed" in ram and not any(k.startswith(("tag_encoder", "tagging_head", "label")) for k in selected)
    assert any(k.endswith("relative_position_index") for k in ram)
    assert any(k.endswith("attn_mask") for k in ram)
    assert not any(k.endswith(("relative_position_index", "attn_mask")) for k in selected)
    assert all(tuple(v.shape) == tuple(selected[k].shape) for k, v in VisualGuidance(TINY).state_dict().items())


def test_full_config_ram_names_and_shapes():
    with torch.device("meta"):
        sd = VisualGuidance(SwinConfig.full()).state_dict()
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    expected = {
        "visual_encoder.patch_embed.proj.weight": (192, 3, 4, 4),
        "visual_encoder.patch_embed.proj.bias": (192,),
        "visual_encoder.patch_embed.norm.weight": (192,),
        "visual_encoder.layers.0.blocks.0.norm1.weight": (192,),
        "visual_encoder.layers.0.blocks.1.attn.qkv.weight": (576, 192),
        "visual_encoder.layers.0.blocks.1.attn.proj.weight": (192, 192),
        "visual_encoder.layers.0.blocks.0.attn.relative_position_bias_table": (529, 6),
        "visual_encoder.layers.0.blocks.0.mlp.fc1.weight": (768, 192),
        "visual_encoder.layers.0.blocks.0.mlp.fc2.weight": (192, 768),
        "visual_encoder.layers.0.downsample.reduction.weight": (384, 768),
        "visual_encoder.layers.0.downsample.norm.weight": (768,),
        "visual_encoder.layers.2.blocks.17.attn.relative_position_bias_table": (529, 24),
        "visual_encoder.layers.2.downsample.reduction.weight": (1536, 3072),
        "visual_encoder.layers.3.blocks.1.attn.qkv.weight": (4608, 1536),
        "visual_encoder.layers.3.blocks.1.norm2.bias": (1536,),
        "visual_encoder.norm.weight": (1536,),
        "visual_encoder.norm.bias": (1536,),
        "image_proj.weight": (512, 1536),
        "image_proj.bias": (512,),
    }
    for key, shape in expected.items():
        assert shapes[key] == shape, key
    assert not any(k.startswith("visual_encoder.layers.3.downsample") for k in shapes)
    assert not any(k.endswith(("relative_position_index", "attn_mask")) for k in shapes)
    depths = [
        len({k.split(".")[4] for k in shapes if k.startswith(f"visual_encoder.layers.{i}.blocks.")}) for i in range(5)
    ]
    assert depths == [2, 2, 18, 2, 0]
    assert all(k.startswith(("visual_encoder.", "image_proj.")) for k in shapes)
    assert SwinConfig.from_state_dict(sd) == SwinConfig.full()


# --------------------------------------------------------------------------- 4. preprocessing, config, errors


def _normalized(img: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (img - mean) / std


def test_preprocess_upsample_is_half_pixel_bilinear(model):
    img = torch.tensor([[0.1, 0.9], [0.5, 0.3]]).expand(1, 3, 2, 2).clone()
    img[0, 1] *= 0.5
    out = model.preprocess(img)
    # src = (i + 0.5) * 2 / 384 - 0.5 clamped to [0, 1]; weights (1 - t, t) between pixels 0 and 1
    t = ((torch.arange(384, dtype=torch.float64) + 0.5) * 2 / 384 - 0.5).clamp(0, 1)
    interp = torch.stack([1 - t, t], dim=1)  # 384 x 2
    want = interp @ img.double() @ interp.T
    assert out.shape == (1, 3, 384, 384) and out.dtype == torch.float32
    assert (out.double() - _normalized(want)).abs().max() < 1e-5


def test_preprocess_downsample_is_antialiased():
    m = VisualGuidance(TINY)
    img = torch.rand(1, 3, 768, 768, generator=torch.Generator().manual_seed(3))
    # 2x antialiased bilinear (triangle filter of support 2): taps 2i-1..2i+2 weighted 1,3,3,1, renormalized at borders
    mat = torch.zeros(384, 768, dtype=torch.float64)
    for i in range(384):
        for j, wt in zip(range(2 * i - 1, 2 * i + 3), (1, 3, 3, 1), strict=True):
            if 0 <= j < 768:
                mat[i, j] = wt
    mat /= mat.sum(1, keepdim=True)
    want = mat @ img.double() @ mat.T
    assert (m.preprocess(img).double() - _normalized(want)).abs().max() < 1e-5
    same = torch.rand(1, 3, 384, 384)
    assert torch.allclose(m.preprocess(same), _normalized(same))


def test_config_inference(ram):
    assert SwinConfig.from_state_dict(select_ram_state_dict(ram)) == TINY
    bare = {k.removeprefix("visual_encoder."): v for k, v in ram.items() if k.startswith("visual_encoder.")}
    assert SwinConfig.from_state_dict(bare) == TINY
    odd = SwinConfig(embed_dim=24, depths=(2, 4, 2, 2), num_heads=(3, 6, 12, 24), window_size=6, mlp_ratio=2.0)
    with torch.device("meta"):
        sd = VisualGuidance(odd).state_dict()
    assert SwinConfig.from_state_dict(sd) == odd
    with pytest.raises(WeightFileError, match=r"ram\.pth.*patch_embed\.proj\.weight"):
        SwinConfig.from_state_dict({"image_proj.weight": torch.zeros(1)}, path="ram.pth")


def test_merge_dape_errors(ram, dape):
    visual = select_ram_state_dict(ram)
    name = "visual_encoder.layers.1.blocks.0.attn.qkv"

    missing = {k: v for k, v in dape.items() if k != f"{name}.lora_B"}
    with pytest.raises(WeightFileError, match=rf"DAPE\.pth.*missing key '{name}\.lora_B'"):
        merge_dape(visual, missing, path="DAPE.pth")

    for stray_key in ("visual_encoder.layers.7.blocks.0.attn.qkv.lora_A", "layers.0.blocks.0.attn.proj.lora_B"):
        stray = dict(dape, **{stray_key: torch.zeros(16, 32)})
        with pytest.raises(WeightFileError, match=rf"DAPE\.pth.*{re.escape(stray_key)}.*match no"):
            merge_dape(visual, stray, path="DAPE.pth")

    wrong = dict(dape, **{f"{name}.lora_B": torch.zeros(129, 8)})
    with pytest.raises(WeightFileError, match=r"DAPE\.pth.*\(16, 64\).*\(129, 8\).*\(192, 64\)"):
        merge_dape(visual, wrong, path="DAPE.pth")

    twice = dict(dape, **{f"{name.removeprefix('visual_encoder.')}.lora_A": dape[f"{name}.lora_A"]})
    with pytest.raises(WeightFileError, match="both"):
        merge_dape(visual, twice, path="DAPE.pth")


def test_build_guidance_checks_ram_file(ram, dape, model, reference):
    broken = {k: v for k, v in ram.items() if k != "visual_encoder.layers.0.blocks.1.mlp.fc2.bias"}
    with pytest.raises(WeightFileError, match=r"ram\.pth.*missing keys.*layers\.0\.blocks\.1\.mlp\.fc2\.bias"):
        build_guidance(broken, dape, ram_path="ram.pth")
    with pytest.raises(WeightFileError, match="no 'visual_encoder"):
        build_guidance({"label_embed": torch.zeros(2)}, dape, ram_path="ram.pth")
    # the assign-on-meta loading path gives exactly the module loaded the ordinary way
    plain = load_checked(VisualGuidance(TINY), merge_dape(select_ram_state_dict(ram), dape), what="RAM").eval()
    with torch.no_grad():
        assert torch.equal(plain(reference), model(reference))
    assert not any(p.requires_grad for p in model.parameters())
