"""Joint visual guidance: RAM's Swin image encoder with the DAPE LoRA merged in.

The DiT's cross-attention context is not text but a "visual prompt": the first
low-resolution frame of a scene, encoded by RAM's Swin-L (with the DAPE
degradation-aware LoRA folded into every `attn.qkv`) and projected to 512 by
RAM's `image_proj`. Parameter names follow RAM's checkpoint exactly
(`visual_encoder.*`, `image_proj.*`) so the published files load strictly.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .lora import merge_lora_weight
from .weights import StateDict, WeightFileError, check_state_dict, require

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "SwinConfig",
    "SwinTransformer",
    "VisualGuidance",
    "build_guidance",
    "merge_dape",
    "random_dape_state_dict",
    "random_ram_state_dict",
    "relative_position_index",
    "select_ram_state_dict",
    "shifted_window_mask",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DAPE_SCALING = 1.0 / 8.0  # loralib MergedLinear(r=8, lora_alpha=1): alpha / r, as the release hard-codes
MASK_VALUE = -100.0  # Swin's shifted-window mask value (not -inf): kept for bit-faithful logits

_RAM_WHAT = "RAM checkpoint (ram_swin_large_14m.pth)"
_DAPE_WHAT = "DAPE LoRA file (DAPE.pth)"
_VISUAL_PREFIXES = ("visual_encoder.", "image_proj.")
_SKIPPED_BUFFERS = ("relative_position_index", "attn_mask")
_QKV_RE = re.compile(r"^visual_encoder\.layers\.(\d+)\.blocks\.(\d+)\.attn\.qkv\.weight$")
_BLOCK_RE = re.compile(r"^layers\.(\d+)\.blocks\.(\d+)\.")


# --------------------------------------------------------------------------- config


@dataclass(frozen=True)
class SwinConfig:
    """Swin hyper-parameters; the defaults are RAM's Swin-L at 384."""

    img_size: int = 384
    patch_size: int = 4
    embed_dim: int = 192
    depths: tuple[int, ...] = (2, 2, 18, 2)
    num_heads: tuple[int, ...] = (6, 12, 24, 48)
    window_size: int = 12
    mlp_ratio: float = 4.0

    @classmethod
    def full(cls) -> SwinConfig:
        """RAM's Swin-L (SPEC section 3)."""
        return cls()

    @classmethod
    def tiny(cls) -> SwinConfig:
        """Same geometry (384 input, 145 output tokens), small widths: for fast tests."""
        return cls(embed_dim=32, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8))

    @property
    def num_layers(self) -> int:
        return len(self.depths)

    @property
    def num_features(self) -> int:
        """Channel width of the last stage (1536 for Swin-L)."""
        return self.embed_dim * 2 ** (self.num_layers - 1)

    def resolution(self, stage: int) -> int:
        """Token-grid side length of `stage` (96, 48, 24, 12 at 384)."""
        return self.img_size // self.patch_size // 2**stage

    def stage_window(self, stage: int) -> int:
        """Effective window: Swin stops partitioning once the grid fits in one window."""
        return min(self.window_size, self.resolution(stage))

    @classmethod
    def from_state_dict(
        cls, state: Mapping[str, torch.Tensor], *, path: str | os.PathLike | None = None, img_size: int = 384
    ) -> SwinConfig:
        """Infer widths, depths, heads and window size from tensor shapes (prefixed or bare Swin keys).

        The input size cannot be read from the weights (no absolute position
        embedding); the bias tables only fix the window, so `img_size` is given.
        """
        prefix = "visual_encoder." if any(k.startswith("visual_encoder.") for k in state) else ""
        proj = require(state, f"{prefix}patch_embed.proj.weight", what=_RAM_WHAT, path=path)
        embed_dim, patch_size = int(proj.shape[0]), int(proj.shape[-1])
        blocks: dict[int, set[int]] = {}
        for key in state:
            m = _BLOCK_RE.match(key[len(prefix) :]) if key.startswith(prefix) else None
            if m:
                blocks.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
        if not blocks or sorted(blocks) != list(range(len(blocks))):
            raise WeightFileError(
                f"{_where(_RAM_WHAT, path)}: cannot find the Swin stages '{prefix}layers.<i>.blocks.<j>.*' "
                f"(found stages {sorted(blocks)})"
            )
        depths = tuple(max(blocks[i]) + 1 for i in range(len(blocks)))
        heads = []
        for i in range(len(depths)):
            table = require(
                state, f"{prefix}layers.{i}.blocks.0.attn.relative_position_bias_table", what=_RAM_WHAT, path=path
            )
            heads.append(int(table.shape[1]))
        table0 = state[f"{prefix}layers.0.blocks.0.attn.relative_position_bias_table"]
        side = math.isqrt(int(table0.shape[0]))
        if side * side != table0.shape[0] or side % 2 == 0:
            raise WeightFileError(
                f"{_where(_RAM_WHAT, path)}: relative_position_bias_table of stage 0 has {table0.shape[0]} rows, "
                "expected (2*window-1)**2"
            )
        fc1 = require(state, f"{prefix}layers.0.blocks.0.mlp.fc1.weight", what=_RAM_WHAT, path=path)
        return cls(
            img_size=img_size,
            patch_size=patch_size,
            embed_dim=embed_dim,
            depths=depths,
            num_heads=tuple(heads),
            window_size=(side + 1) // 2,
            mlp_ratio=fc1.shape[0] / embed_dim,
        )


# --------------------------------------------------------------------------- Swin geometry


def relative_position_index(window: int, device: torch.device | str | None = None) -> torch.Tensor:
    """(w*w, w*w) index into the (2w-1)**2 bias table, row-major over (dy, dx) offsets."""
    coords = torch.stack(
        torch.meshgrid(torch.arange(window, device=device), torch.arange(window, device=device), indexing="ij")
    ).flatten(1)  # 2, w*w
    rel = coords[:, :, None] - coords[:, None, :] + (window - 1)  # 2, N, N, in [0, 2w-2]
    return rel[0] * (2 * window - 1) + rel[1]


def shifted_window_mask(
    resolution: int, window: int, shift: int, device: torch.device | str | None = None
) -> torch.Tensor:
    """(num_windows, w*w, w*w) additive mask (0 / -100) for attention in cyclically shifted windows.

    After the shift, the last window row/column wraps pixels from the opposite
    border; tokens may only attend to tokens of the same (un-wrapped) region.
    """
    bounds = (resolution - window, resolution - shift)

    def region(n: int) -> torch.Tensor:
        idx = torch.arange(n, device=device)
        return (idx >= bounds[0]).long() + (idx >= bounds[1]).long()

    label = region(resolution)[:, None] * 3 + region(resolution)[None, :]  # H, W
    windows = _window_partition(label[None, :, :, None], window).flatten(1)  # nW, N
    differ = windows[:, None, :] != windows[:, :, None]
    return torch.zeros(differ.shape, device=device).masked_fill(differ, MASK_VALUE)


def _window_partition(x: torch.Tensor, window: int) -> torch.Tensor:
    """(B, H, W, C) -> (B * nW, w, w, C), windows in row-major order, batch-major."""
    b, h, w, c = x.shape
    x = x.view(b, h // window, window, w // window, window, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window, window, c)


def _window_reverse(windows: torch.Tensor, window: int, h: int, w: int) -> torch.Tensor:
    """Inverse of `_window_partition`."""
    c = windows.shape[-1]
    x = windows.view(-1, h // window, w // window, window, window, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, h, w, c)


# --------------------------------------------------------------------------- Swin modules


class WindowAttention(nn.Module):
    """Multi-head self-attention inside windows with a learned relative position bias."""

    def __init__(self, dim: int, window: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by {num_heads} heads")
        self.dim, self.window, self.num_heads = dim, window, num_heads
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, num_heads))
        # Computed, not loaded: RAM's checkpoint carries it but SPEC says to skip it.
        self.register_buffer("relative_position_index", relative_position_index(window), persistent=False)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def position_bias(self) -> torch.Tensor:
        """(heads, N, N) relative position bias."""
        n = self.window * self.window
        bias = self.relative_position_bias_table[self.relative_position_index.reshape(-1)]
        return bias.view(n, n, self.num_heads).permute(2, 0, 1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B * nW, N, C) windows, batch-major; mask: (nW, N, N) additive or None."""
        bw, n, c = x.shape
        nw = 1 if mask is None else mask.shape[0]
        b = bw // nw
        hd = c // self.num_heads
        qkv = self.qkv(x).view(b, nw, n, 3, self.num_heads, hd).permute(3, 0, 1, 4, 2, 5)
        q, k, v = (t.reshape(b, nw * self.num_heads, n, hd) for t in qkv.unbind(0))
        bias = self.position_bias().to(q.dtype)  # heads, N, N
        if mask is not None:
            bias = (bias[None] + mask.to(q.dtype)[:, None]).reshape(nw * self.num_heads, n, n)
        # SDPA takes the softmax in float32 for half inputs; scale = head_dim**-0.5 as in Swin.
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias[None])
        out = out.view(b, nw, self.num_heads, n, hd).permute(0, 1, 3, 2, 4).reshape(bw, n, c)
        return self.proj(out)


class Mlp(nn.Module):
    """Swin's feed-forward (exact GELU)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class SwinBlock(nn.Module):
    """Pre-norm (shifted-)window attention + MLP block."""

    def __init__(self, dim: int, resolution: int, num_heads: int, window: int, shift: int, mlp_ratio: float) -> None:
        super().__init__()
        if resolution <= window:  # the whole grid is one window: nothing to shift
            window, shift = resolution, 0
        if resolution % window:
            raise ValueError(f"token grid {resolution} is not a multiple of the window {window}")
        self.resolution, self.window, self.shift = resolution, window, shift
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, window, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        mask = shifted_window_mask(resolution, window, shift) if shift else None
        self.register_buffer("attn_mask", mask, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        r, w, s = self.resolution, self.window, self.shift
        h = self.norm1(x).view(b, r, r, c)
        if s:
            h = torch.roll(h, shifts=(-s, -s), dims=(1, 2))
        h = self.attn(_window_partition(h, w).view(-1, w * w, c), self.attn_mask)
        h = _window_reverse(h.view(-1, w, w, c), w, r, r)
        if s:
            h = torch.roll(h, shifts=(s, s), dims=(1, 2))
        x = x + h.reshape(b, n, c)
        return x + self.mlp(self.norm2(x))

    def rebuild_buffers(self, device: torch.device | str | None = None) -> None:
        """Recompute the non-persistent geometry buffers (e.g. after building on the meta device)."""
        self.attn.relative_position_index = relative_position_index(self.window, device)
        if self.shift:
            self.attn_mask = shifted_window_mask(self.resolution, self.window, self.shift, device)


class PatchMerging(nn.Module):
    """2x2 token merge: concat (x00, x10, x01, x11), LayerNorm(4C), Linear(4C -> 2C, no bias)."""

    def __init__(self, dim: int, resolution: int) -> None:
        super().__init__()
        self.resolution = resolution
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(4 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, c = x.shape
        x = x.view(b, self.resolution, self.resolution, c)
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        return self.reduction(self.norm(x.reshape(b, -1, 4 * c)))


class SwinStage(nn.Module):
    """One stage: blocks alternating plain / shifted windows, then an optional patch merge."""

    def __init__(self, config: SwinConfig, stage: int) -> None:
        super().__init__()
        dim = config.embed_dim * 2**stage
        res = config.resolution(stage)
        self.blocks = nn.ModuleList(
            SwinBlock(
                dim,
                res,
                config.num_heads[stage],
                config.window_size,
                0 if j % 2 == 0 else config.window_size // 2,
                config.mlp_ratio,
            )
            for j in range(config.depths[stage])
        )
        self.downsample = PatchMerging(dim, res) if stage < config.num_layers - 1 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x if self.downsample is None else self.downsample(x)


class PatchEmbed(nn.Module):
    """Non-overlapping patch projection followed by LayerNorm (RAM uses patch_norm=True)."""

    def __init__(self, config: SwinConfig) -> None:
        super().__init__()
        self.img_size = config.img_size
        self.proj = nn.Conv2d(3, config.embed_dim, kernel_size=config.patch_size, stride=config.patch_size)
        self.norm = nn.LayerNorm(config.embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != (self.img_size, self.img_size):
            raise ValueError(f"Swin expects {self.img_size}x{self.img_size} input, got {tuple(x.shape[-2:])}")
        return self.norm(self.proj(x).flatten(2).transpose(1, 2))


class SwinTransformer(nn.Module):
    """RAM's Swin image encoder: returns the mean token followed by the last stage's tokens."""

    def __init__(self, config: SwinConfig) -> None:
        super().__init__()
        self.config = config
        self.patch_embed = PatchEmbed(config)
        self.layers = nn.ModuleList(SwinStage(config, i) for i in range(config.num_layers))
        self.norm = nn.LayerNorm(config.num_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) normalized image -> (B, 1 + L, num_features)."""
        x = self.patch_embed(x)
        for layer in self.layers:
            x = layer(x)
        x = self.norm(x)
        mean = x.float().mean(dim=1, keepdim=True).to(x.dtype)
        return torch.cat([mean, x], dim=1)

    def rebuild_buffers(self, device: torch.device | str | None = None) -> None:
        """Recompute every block's window index / shift mask on `device`, in the current float dtype."""
        dtype = self.norm.weight.dtype if self.norm.weight.is_floating_point() else torch.float32
        for layer in self.layers:
            for block in layer.blocks:
                block.rebuild_buffers(device)
                if block.attn_mask is not None:
                    block.attn_mask = block.attn_mask.to(dtype)


# --------------------------------------------------------------------------- guidance module


class VisualGuidance(nn.Module):
    """Reference frame -> (B, 145, 512) visual prompt; keys `visual_encoder.*` and `image_proj.*` as in RAM."""

    def __init__(self, config: SwinConfig | None = None, context_dim: int = 512) -> None:
        super().__init__()
        self.config = config or SwinConfig.full()
        self.visual_encoder = SwinTransformer(self.config)
        self.image_proj = nn.Linear(self.config.num_features, context_dim)

    def preprocess(self, reference: torch.Tensor) -> torch.Tensor:
        """[0, 1] frames -> resized, ImageNet-normalized float32 (as torchvision's tensor Resize + Normalize)."""
        if reference.ndim == 3:
            reference = reference[None]
        if reference.ndim != 4 or reference.shape[1] != 3:
            raise ValueError(f"reference must be (B, 3, H, W) in [0, 1], got shape {tuple(reference.shape)}")
        x = reference.float()
        size = self.config.img_size
        if x.shape[-2:] != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
        return (x - mean) / std

    def forward(self, reference: torch.Tensor) -> torch.Tensor:
        """reference: (B, 3, H, W) in [0, 1], the scene's first low-resolution frame."""
        param = self.image_proj.weight
        x = self.preprocess(reference.to(param.device)).to(param.dtype)
        return self.image_proj(self.visual_encoder(x))


# --------------------------------------------------------------------------- weights


def _where(what: str, path: str | os.PathLike | None) -> str:
    return f"{what} ('{path}')" if path is not None else what


def select_ram_state_dict(ram_sd: Mapping[str, torch.Tensor]) -> StateDict:
    """Keep RAM's image-encoder and projection weights; drop the computed Swin buffers and the tagging heads."""
    return {k: v for k, v in ram_sd.items() if k.startswith(_VISUAL_PREFIXES) and not k.endswith(_SKIPPED_BUFFERS)}


def _dape_module_name(key: str) -> str | None:
    """Module name of a DAPE key, normalized to the `visual_encoder.` form; None if outside the Swin.

    The published file is `{k: v for k in RAMLora.state_dict() if 'lora_' in k}`, so its
    keys are `visual_encoder.layers.i.blocks.j.attn.qkv.lora_A` (no `.weight`); it may
    also hold LoRA of RAM's BERT heads (`tagging_head.*`, ...), which the prompt never uses.
    A bare Swin form (`layers.i.blocks.j.attn.qkv.lora_A`) is accepted as well.
    """
    module = key.rsplit(".", 1)[0]
    if module.startswith("visual_encoder."):
        return module
    if module.startswith("layers."):
        return "visual_encoder." + module
    return None


def merge_dape(
    visual_sd: Mapping[str, torch.Tensor],
    dape_sd: Mapping[str, torch.Tensor],
    *,
    path: str | os.PathLike | None = None,
    scaling: float = DAPE_SCALING,
) -> StateDict:
    """Fold DAPE's grouped LoRA (q and v rows of every Swin `attn.qkv`) into the weights, in float32.

    Equivalent to loralib's `MergedLinear(d, 3d, r, enable_lora=[True, False, True])`:
    W[:d] += s * B[:d] @ A[:r]; W[2d:] += s * B[d:] @ A[r:]; k rows unchanged. Merging once
    at load time makes the encoder a plain Swin afterwards.
    """
    where = _where(_DAPE_WHAT, path)
    qkv_modules = [k[: -len(".weight")] for k in visual_sd if _QKV_RE.match(k)]
    pairs: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
    for key, value in dape_sd.items():
        part = key.rsplit(".", 1)[-1]
        if part not in ("lora_A", "lora_B"):
            continue
        module = _dape_module_name(key)
        if module is None:
            continue
        slot = pairs.setdefault(module, {})
        if part in slot:
            raise WeightFileError(f"{where}: both '{slot[part][0]}' and '{key}' give {module}.{part}")
        slot[part] = (key, value)
    stray = sorted(set(pairs) - set(qkv_modules))
    if stray:
        keys = ", ".join(k for m in stray for k, _ in pairs[m].values())
        raise WeightFileError(
            f"{where}: LoRA key(s) {keys} match no Swin attn.qkv of the RAM checkpoint "
            f"({len(qkv_modules)} qkv layers found there)"
        )
    merged = dict(visual_sd)
    for module in qkv_modules:
        slot = pairs.get(module, {})
        for part in ("lora_A", "lora_B"):
            if part not in slot:
                raise WeightFileError(f"{where}: missing key '{module}.{part}' (every Swin attn.qkv needs a LoRA pair)")
        (key_a, a), (key_b, b) = slot["lora_A"], slot["lora_B"]
        weight = visual_sd[f"{module}.weight"]
        out_f, in_f = weight.shape
        d = out_f // 3
        r = a.shape[0] // 2 if a.ndim == 2 else 0
        if (
            out_f % 3
            or a.ndim != 2
            or b.ndim != 2
            or a.shape[0] % 2
            or r == 0
            or a.shape[1] != in_f
            or tuple(b.shape) != (2 * d, r)
        ):
            raise WeightFileError(
                f"{where}: shapes disagree for '{module}': {key_a} is {tuple(a.shape)} and {key_b} is "
                f"{tuple(b.shape)}, but the qkv weight {tuple(weight.shape)} needs lora_A (2r, {in_f}) "
                f"and lora_B ({2 * d}, r)"
            )
        w = weight.float().clone()
        w[:d] = merge_lora_weight(w[:d], a[:r], b[:d], scaling)
        w[2 * d :] = merge_lora_weight(w[2 * d :], a[r:], b[d:], scaling)
        merged[f"{module}.weight"] = w
    return merged


def build_guidance(
    ram_sd: Mapping[str, torch.Tensor],
    dape_sd: Mapping[str, torch.Tensor],
    *,
    ram_path: str | os.PathLike | None = None,
    dape_path: str | os.PathLike | None = None,
    dtype: torch.dtype = torch.float32,
) -> VisualGuidance:
    """RAM state dict (already unwrapped from {"model": sd}) + DAPE LoRA -> ready `VisualGuidance` on CPU, eval."""
    visual = select_ram_state_dict(ram_sd)
    if not visual:
        raise WeightFileError(
            f"{_where(_RAM_WHAT, ram_path)} holds no 'visual_encoder.*' / 'image_proj.*' keys "
            f"(is this the RAM Swin-L file?); found e.g. {', '.join(list(ram_sd)[:5])}"
        )
    config = SwinConfig.from_state_dict(visual, path=ram_path)
    context_dim = int(require(visual, "image_proj.weight", what=_RAM_WHAT, path=ram_path).shape[0])
    with torch.device("meta"):  # no 200M-parameter random init: the weights are assigned below
        model = VisualGuidance(config, context_dim)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    check_state_dict(visual, expected, what=_RAM_WHAT, path=ram_path)
    merged = merge_dape(visual, dape_sd, path=dape_path)
    state = {k: v.to(dtype=dtype, copy=False).contiguous() for k, v in merged.items()}
    model.load_state_dict(state, strict=True, assign=True)
    model.visual_encoder.rebuild_buffers("cpu")
    return model.eval().requires_grad_(False)


# --------------------------------------------------------------------------- random weights (tests, smoke runs)


def _expected_shapes(config: SwinConfig, context_dim: int = 512) -> dict[str, torch.Size]:
    with torch.device("meta"):
        model = VisualGuidance(config, context_dim)
    return {k: v.shape for k, v in model.state_dict().items()}


def random_ram_state_dict(config: SwinConfig | None = None, seed: int = 0) -> StateDict:
    """A RAM-format state dict with random weights (variance-preserving scales), deterministic in `seed`.

    Besides the visual weights it carries the Swin buffers RAM saves
    (`relative_position_index`, `attn_mask`) and a few tagging-head keys, so
    that callers exercise the skipping rules. Wrap it as {"model": sd} for a file.
    """
    config = config or SwinConfig.full()
    gen = torch.Generator().manual_seed(seed)

    def normal(shape: tuple[int, ...], std: float, mean: float = 0.0) -> torch.Tensor:
        return torch.randn(shape, generator=gen) * std + mean

    sd: StateDict = {}
    for key, shape in _expected_shapes(config).items():
        shape = tuple(shape)
        module, leaf = key.rsplit(".", 1)
        is_norm = module.endswith(("norm", "norm1", "norm2"))
        if leaf == "relative_position_bias_table":
            sd[key] = normal(shape, 0.5)
        elif is_norm:
            sd[key] = normal(shape, 0.05, 1.0) if leaf == "weight" else normal(shape, 0.02)
        elif leaf == "weight":
            fan_in = math.prod(shape[1:])
            sd[key] = normal(shape, 1.0 / math.sqrt(fan_in))
        else:
            sd[key] = normal(shape, 0.02)
    for i in range(config.num_layers):
        for j in range(config.depths[i]):
            prefix = f"visual_encoder.layers.{i}.blocks.{j}"
            window = config.stage_window(i)
            sd[f"{prefix}.attn.relative_position_index"] = relative_position_index(window)
            if j % 2 == 1 and config.resolution(i) > config.window_size:
                sd[f"{prefix}.attn_mask"] = shifted_window_mask(config.resolution(i), window, window // 2)
    sd["label_embed"] = normal((4, 512), 0.02)
    sd["tag_encoder.encoder.layer.0.attention.self.query.weight"] = normal((16, 16), 0.02)
    sd["tagging_head.encoder.layer.0.crossattention.self.key.weight"] = normal((16, 512), 0.02)
    return sd


def random_dape_state_dict(config: SwinConfig | None = None, seed: int = 0, rank: int = 8) -> StateDict:
    """A DAPE-format LoRA dict (prefixed `...attn.qkv.lora_A` (2r, d) / `lora_B` (2d, r)) plus BERT-head LoRA noise.

    Scales make the merged update a few percent of a unit-variance qkv weight:
    visible in tests, harmless to the activations.
    """
    config = config or SwinConfig.full()
    gen = torch.Generator().manual_seed(seed + 1_000_003)
    sd: StateDict = {}
    for i in range(config.num_layers):
        d = config.embed_dim * 2**i
        for j in range(config.depths[i]):
            name = f"visual_encoder.layers.{i}.blocks.{j}.attn.qkv"
            sd[f"{name}.lora_A"] = torch.randn(2 * rank, d, generator=gen) / math.sqrt(d)
            sd[f"{name}.lora_B"] = torch.randn(2 * d, rank, generator=gen) * (0.5 / math.sqrt(rank))
    # RAMLora also adapts its BERT tagging head; those pairs are not part of the visual prompt.
    head = "tagging_head.encoder.layer.0.crossattention.self.query"
    sd[f"{head}.lora_A"] = torch.randn(rank, 16, generator=gen) * 0.02
    sd[f"{head}.lora_B"] = torch.randn(16, rank, generator=gen) * 0.02
    return sd
