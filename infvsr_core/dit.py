"""InfVSR's causal DiT: Wan2.1-T2V-1.3B with a rolling KV cache in self-attention.

Module attributes mirror the original Wan2.1 names, so `state_dict()` has
exactly the keys of the published `InfVSR.ckpt` (`blocks.{i}.self_attn.q`,
`blocks.{i}.modulation`, `head.head`, ...) and the file loads with no renaming.

Streaming (SPEC section 2): each call processes one chunk of latent frames.
Its keys/values in every self-attention layer are concatenated after those of
the previous chunk only; queries come from the current chunk; the returned
cache (this chunk's keys/values) replaces the old one, so memory is constant.
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from .attention import attention, float8_attention, float8_attention_runs
from .fp8 import (
    FP8Linear,
    Quantized,
    ffn_fp8,
    gelu_quantize_rows,
    normed_head_scale,
    project,
    quantize_heads,
    quantize_rows,
    takes_fp8,
    to_fp8,
)
from .graphs import BlockGraphs
from .kernels.row_quantize import ROW_QUANTIZE_DEFAULT, kernel_or
from .memory.host import ManagedCache
from .memory.transfer import to_device_async
from .rope import apply_rope, rope_cos_sin
from .weights import WeightFileError, require

HEAD_DIM = 128
# Largest chunk (tokens) whose blocks `cuda_graphs=None` replays as a CUDA graph: small chunks (480p) are bound
# by kernel launches, which a graph removes; larger ones are bound by the GPU, where a graph only costs memory
# (bench/RESULTS.md has the measurements).
GRAPH_MAX_TOKENS = 8192
_WHAT = "the InfVSR DiT checkpoint (InfVSR.ckpt)"


@dataclass(frozen=True)
class DiTConfig:
    """Architecture of the DiT; the defaults are the published InfVSR (Wan2.1-1.3B, 512-d visual prompt)."""

    dim: int = 1536
    ffn_dim: int = 8960
    num_heads: int = 12
    num_layers: int = 30
    in_dim: int = 16
    out_dim: int = 16
    patch_size: tuple[int, int, int] = (1, 2, 2)
    freq_dim: int = 256
    text_dim: int = 512
    eps: float = 1e-6

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @classmethod
    def full(cls) -> DiTConfig:
        return cls()

    @classmethod
    def tiny(cls) -> DiTConfig:
        """Two layers of two 128-d heads: same head dim (hence same RoPE split) as the real model, for tests."""
        return cls(dim=256, ffn_dim=512, num_heads=2, num_layers=2)

    @classmethod
    def from_state_dict(cls, sd: dict[str, torch.Tensor], *, path: str | os.PathLike | None = None) -> DiTConfig:
        """Infer the architecture from tensor shapes (works on meta tensors, reads no values)."""
        pe = require(sd, "patch_embedding.weight", what=_WHAT, path=path)
        dim, in_dim, *patch = pe.shape
        if len(patch) != 3:
            raise WeightFileError(f"{_WHAT}: patch_embedding.weight has shape {tuple(pe.shape)}, expected 5 dims")
        if dim % HEAD_DIM:
            where = f"{_WHAT} ('{path}')" if path is not None else _WHAT
            raise WeightFileError(
                f"{where}: model dim {dim} (patch_embedding) is not a multiple of head dim {HEAD_DIM}"
            )
        layers = {int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))}
        ffn_dim = require(sd, "blocks.0.ffn.0.weight", what=_WHAT, path=path).shape[0]
        head_out = require(sd, "head.head.weight", what=_WHAT, path=path).shape[0]
        freq_dim = require(sd, "time_embedding.0.weight", what=_WHAT, path=path).shape[1]
        text_dim = require(sd, "text_embedding.0.weight", what=_WHAT, path=path).shape[1]
        return cls(
            dim=dim,
            ffn_dim=ffn_dim,
            num_heads=dim // HEAD_DIM,
            num_layers=max(layers) + 1,
            in_dim=in_dim,
            out_dim=head_out // math.prod(patch),
            patch_size=tuple(int(p) for p in patch),
            freq_dim=freq_dim,
            text_dim=text_dim,
        )

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> DiTConfig:
        """Read a Wan-style config.json; keys we do not use (model_type, text_len, ...) are ignored.

        The InfVSR release nests the values under "model_config"; plain Wan configs do not.
        """
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
        if isinstance(raw.get("model_config"), dict):
            raw = raw["model_config"]
        known = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in raw.items() if k in known}
        if "patch_size" in kwargs:
            kwargs["patch_size"] = tuple(kwargs["patch_size"])
        return cls(**kwargs)


@dataclass
class KVCache:
    """The previous chunk's self-attention keys (after RoPE) and values, one (B, L, H, D) tensor per layer.

    It holds the previous chunk only (InfVSR's rolling cache): each forward
    returns a new cache with just the current chunk, which replaces this one.
    """

    keys: Sequence[torch.Tensor]
    values: Sequence[torch.Tensor]
    latent_frames: int

    def map(self, move: Callable[[Sequence[torch.Tensor]], Sequence[torch.Tensor]]) -> KVCache:
        """The same cache with `move` applied to its key list and its value list (e.g. to host memory)."""
        return KVCache(keys=move(self.keys), values=move(self.values), latent_frames=self.latent_frames)


def timestep_embedding(
    t: torch.Tensor, dim: int, dtype: torch.dtype = torch.float64, device: torch.device | None = None
) -> torch.Tensor:
    """Wan's sinusoid: [cos, sin] of t * 10000^(-k/(dim/2)), computed in float64 on the CPU, returned in dtype
    on `device` (default t's). A CPU `t` avoids waiting for the GPU to read it."""
    half = dim // 2
    freqs = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64) / half)
    args = t.detach().to("cpu", torch.float64)[:, None] * freqs[None, :]
    return to_device_async(torch.cat([args.cos(), args.sin()], dim=1), t.device if device is None else device).to(dtype)


class RMSNorm(nn.Module):
    """Wan's RMSNorm: normalize in float32, cast back, then multiply by the weight."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _rms_norm_op(x, self.weight, self.eps)


class FP32LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 whatever the activation/parameter dtype; returns float32."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.float() if self.weight is not None else None
        bias = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps)


def _modulate(norm: nn.Module, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """norm(x) * (1 + scale) + shift in float32 (shift/scale are float32), cast back to x.dtype."""
    return (norm(x) * (1 + scale) + shift).to(x.dtype)


# ----------------------------------------------------------------------------- elementwise ops
# The block's elementwise work written as pure tensor functions, so that on CUDA
# each can be compiled into one or two fused kernels (torch.compile); the plain
# versions are the same Python run eagerly. Same math and casts as the modules.


def _rms_norm_op(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps)).to(x.dtype) * weight


def _rms_rope_op(
    x: torch.Tensor, weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, eps: float, heads: int
) -> torch.Tensor:
    """RMSNorm over the full dim, then RoPE per head: (B, L, dim) -> (B, L, heads, head_dim)."""
    return apply_rope(_rms_norm_op(x, weight, eps).unflatten(-1, (heads, -1)), cos, sin)


def _rms_rope_fp8_op(
    x: torch.Tensor, weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, eps: float, heads: int,
    *past: torch.Tensor,
    keep_roped: bool = True,
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """`_rms_rope_op` (returned if `keep_roped`), and the float8 attention operand of [past, it] (one scale per
    head, fp8.normed_head_scale, as (B, heads)): returns (roped or None, the float8 operand, scale). Compiled,
    the keys of both chunks are written in float8 in the pass that norms this chunk's."""
    roped = _rms_rope_op(x, weight, cos, sin, eps, heads)
    scale = normed_head_scale(weight, heads)
    joined = torch.cat([*past, roped], dim=1) if past else roped
    return roped if keep_roped else None, to_fp8(joined, scale[None, None, :, None]), scale.expand(x.shape[0], heads)


def _ln_modulate_op(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    """Affine-free float32 LayerNorm, * (1 + scale) + shift, cast back."""
    normed = F.layer_norm(x.float(), (x.shape[-1],), None, None, eps)
    return (normed * (1 + scale) + shift).to(x.dtype)


def _ln_affine_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    return F.layer_norm(x.float(), (x.shape[-1],), weight.float(), bias.float(), eps).to(x.dtype)


def _ln_modulate_quantize_op(
    x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """`_ln_modulate_op` then `fp8.quantize_rows`: the fp8 layers' input made in one pass."""
    return quantize_rows(_ln_modulate_op(x, shift, scale, eps).reshape(-1, x.shape[-1]))


def _gated_add_op(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    return (x.float() + y.float() * gate).to(x.dtype)


def _ffn_op(ffn: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    return ffn(x)


def _ffn_fused_op(ffn: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """Wan's FFN with its tanh GELU in the first GEMM's epilogue on CUDA (cuBLASLt's GELU_BIAS; where cuBLASLt
    does not take the shapes, ATen falls back to addmm + gelu(approximate="tanh")): the GELU reads the float32
    accumulator instead of the rounded product, one pass less and no less exact (`bench/check_kernels.py
    --sections ffn`). Not on the CPU, where `_addmm_activation` applies the exact (erf) GELU."""
    up, _, down = ffn
    if not isinstance(up, nn.Linear):  # fp8 layers that expand their weights (DiTBlock routes native ones)
        return ffn(x)
    flat = x.reshape(-1, x.shape[-1])
    if x.is_cuda:
        h = torch._addmm_activation(up.bias, flat, up.weight.t(), use_gelu=True)
    else:
        h = F.gelu(torch.addmm(up.bias, flat, up.weight.t()), approximate="tanh")
    return down(h).view(*x.shape[:-1], -1)


class _Ops:
    """One set of the elementwise ops: eager, or each wrapped in torch.compile (then also the fused FFN)."""

    def __init__(self, compile_fn=None) -> None:
        wrap = compile_fn or (lambda fn: fn)
        self.rms_norm = wrap(_rms_norm_op)
        self.rms_rope = wrap(_rms_rope_op)
        self.ln_modulate = wrap(_ln_modulate_op)
        self.ln_affine = wrap(_ln_affine_op)
        self.gated_add = wrap(_gated_add_op)
        self.ffn = _ffn_op if compile_fn is None else _ffn_fused_op
        self.quantize = wrap(quantize_rows)
        self.ln_modulate_quantize = wrap(_ln_modulate_quantize_op)
        self.gelu_quantize = wrap(gelu_quantize_rows)
        self.quantize_heads = wrap(quantize_heads)
        self.rms_rope_fp8 = wrap(_rms_rope_fp8_op)
        self.row_kernel_variants: dict[tuple[str, ...], _Ops] = {}  # with_row_kernels' copies of these ops


EAGER_OPS = _Ops()
_COMPILED_OPS: list[_Ops] = []


def compiled_ops() -> _Ops:
    """The torch.compile'd ops (built once, compiled per shape on first use)."""
    if not _COMPILED_OPS:
        _COMPILED_OPS.append(_Ops(lambda fn: torch.compile(fn, fullgraph=True)))
    return _COMPILED_OPS[0]


def with_row_kernels(ops: _Ops, names: Sequence[str]) -> _Ops:
    """`ops` (eager or compiled) with the quantizations `names` (keys of row_quantize.ROW_QUANTIZE_OPS) by the
    one-read row kernel where it runs on the input, else by the op it stands in for (built once per set)."""
    key = tuple(sorted(names))
    if key not in ops.row_kernel_variants:
        variant = copy.copy(ops)
        variant.row_kernel_variants = {}
        for name in key:
            setattr(variant, name, kernel_or(name, getattr(ops, name)))
        ops.row_kernel_variants[key] = variant
    return ops.row_kernel_variants[key]


def compile_available() -> bool:
    """torch.compile's GPU backend needs Triton."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


class _Projections(nn.Module):
    """Wan's attention parameters: q, k, v, o projections and RMS norms of q and k over the full width."""

    def __init__(self, dim: int, num_heads: int, eps: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.norm_q = RMSNorm(dim, eps)
        self.norm_k = RMSNorm(dim, eps)


class SelfAttention(_Projections):
    """Self-attention over [previous chunk, current chunk] keys/values with 3D RoPE on q and k.

    `float8_attention`: q, k and v go to the attention kernel in float8 (one scale per head) where one runs them
    (attention.float8_attention_runs); set by fp8.set_float8_attention. The cache keeps bf16 keys and values."""

    float8_attention: bool = False

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        past: tuple[torch.Tensor, torch.Tensor] | None,
        backend: str,
        ops: _Ops = EAGER_OPS,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns (output, this chunk's roped keys, this chunk's values)."""
        heads = (self.num_heads, -1)
        q, k, v = project((self.q, self.k, self.v), x, ops.quantize)  # fp8 layers: x quantized once
        v = v.unflatten(-1, heads)
        if self.float8_attention and float8_attention_runs(v, backend):
            # queries and keys quantized as they are normed (a scale known from the norm's weight), values by
            # their extremes; the cache keeps the bf16 keys and values
            _, q8, q_scale = ops.rms_rope_fp8(
                q, self.norm_q.weight, cos, sin, self.norm_q.eps, self.num_heads, keep_roped=False
            )
            k, k8, k_scale = ops.rms_rope_fp8(
                k, self.norm_k.weight, cos, sin, self.norm_k.eps, self.num_heads, *(past[:1] if past else ())
            )
            v8, v_scale = ops.quantize_heads(*((past[1], v) if past else (v,)))
            out = float8_attention(q8, k8, v8, (q_scale, k_scale, v_scale), backend, v.dtype)
        else:
            q = ops.rms_rope(q, self.norm_q.weight, cos, sin, self.norm_q.eps, self.num_heads)
            k = ops.rms_rope(k, self.norm_k.weight, cos, sin, self.norm_k.eps, self.num_heads)
            k_all, v_all = (torch.cat([past[0], k], dim=1), torch.cat([past[1], v], dim=1)) if past else (k, v)
            out = attention(q, k_all, v_all, backend)
        return project((self.o,), out.flatten(2), ops.quantize)[0], k, v


class CrossAttention(_Projections):
    """Attention from the video tokens to the embedded visual prompt (no RoPE, no cache)."""

    def forward(self, x: torch.Tensor, context: torch.Tensor, backend: str, ops: _Ops = EAGER_OPS) -> torch.Tensor:
        heads = (self.num_heads, -1)
        (q,) = project((self.q,), x, ops.quantize)
        q = ops.rms_norm(q, self.norm_q.weight, self.norm_q.eps).unflatten(-1, heads)
        k = ops.rms_norm(self.k(context), self.norm_k.weight, self.norm_k.eps).unflatten(-1, heads)
        v = self.v(context).unflatten(-1, heads)
        return project((self.o,), attention(q, k, v, backend).flatten(2), ops.quantize)[0]


class DiTBlock(nn.Module):
    """One Wan block: modulated self-attention, cross-attention, modulated FFN (SPEC section 1)."""

    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        dim = cfg.dim
        # Attribute order follows Wan's, so state_dict() lists keys in the published file's order.
        self.norm1 = FP32LayerNorm(dim, cfg.eps, elementwise_affine=False)
        self.self_attn = SelfAttention(dim, cfg.num_heads, cfg.eps)
        self.norm3 = FP32LayerNorm(dim, cfg.eps, elementwise_affine=True)
        self.cross_attn = CrossAttention(dim, cfg.num_heads, cfg.eps)
        self.norm2 = FP32LayerNorm(dim, cfg.eps, elementwise_affine=False)
        self.ffn = nn.Sequential(nn.Linear(dim, cfg.ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(cfg.ffn_dim, dim))
        self.modulation = nn.Parameter(torch.zeros(1, 6, dim))

    def forward(
        self,
        x: torch.Tensor,
        t_mod: torch.Tensor,
        context: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        past: tuple[torch.Tensor, torch.Tensor] | None,
        backend: str,
        ops: _Ops = EAGER_OPS,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        shift1, scale1, gate1, shift2, scale2, gate2 = (self.modulation.float() + t_mod.float()).chunk(6, dim=1)
        eps = self.norm1.eps
        y, k, v = self.self_attn(self._modulated(x, shift1, scale1, eps, ops), cos, sin, past, backend, ops)
        x = ops.gated_add(x, y, gate1)
        x = x + self.cross_attn(ops.ln_affine(x, self.norm3.weight, self.norm3.bias, eps), context, backend, ops)
        h = self._modulated(x, shift2, scale2, eps, ops)
        y = ffn_fp8(self.ffn, h, ops.quantize, ops.gelu_quantize) if isinstance(h, Quantized) else ops.ffn(self.ffn, h)
        x = ops.gated_add(x, y, gate2)
        return x, k, v

    def _modulated(
        self, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float, ops: _Ops
    ) -> torch.Tensor | Quantized:
        """The modulated norm the self-attention and the FFN read; quantized in the same pass when their layers
        multiply in fp8 (fp8.py: q, k, v and the FFN are quantized together)."""
        if takes_fp8(self.ffn[0], x):
            values, scales = ops.ln_modulate_quantize(x, shift, scale, eps)
            return Quantized(values, scales, x.shape, x.dtype)
        return ops.ln_modulate(x, shift, scale, eps)


class Head(nn.Module):
    """Output head: LayerNorm modulated by the time embedding e (not t_mod), then a linear to patch pixels."""

    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        self.norm = FP32LayerNorm(cfg.dim, cfg.eps, elementwise_affine=False)
        self.head = nn.Linear(cfg.dim, cfg.out_dim * math.prod(cfg.patch_size))
        self.modulation = nn.Parameter(torch.zeros(1, 2, cfg.dim))

    def forward(self, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        shift, scale = (self.modulation.float() + e.float()[:, None, :]).chunk(2, dim=1)
        return self.head(_modulate(self.norm, x, shift, scale))


class CausalWanDiT(nn.Module):
    """The InfVSR DiT: one call per chunk, with the previous chunk's keys/values as rolling cache."""

    def __init__(self, config: DiTConfig) -> None:
        super().__init__()
        if config.dim % config.num_heads or (config.dim // config.num_heads) % 2:
            raise ValueError(f"dim {config.dim} must split into {config.num_heads} heads of even size")
        self.config = config
        self.attention_backend: str = "auto"  # attention.py: FlashAttention-3 where installed, else SDPA
        # Fused elementwise ops (torch.compile): None = on CUDA when Triton is there.
        self.fuse_elementwise: bool | None = None
        # Steady chunks' blocks as CUDA graphs (graphs.py), for calls that ask (`graph`) without `keep`:
        # None = for chunks of at most GRAPH_MAX_TOKENS tokens, True = any size, False = never.
        self.cuda_graphs: bool | None = None
        self.graphs = BlockGraphs()
        # fp8: the activations' quantizations (keys of row_quantize.ROW_QUANTIZE_OPS) by the one-read row kernels
        # where they run (the default: those measured faster than their compiled ops, bench/check_dit_quantize.py).
        self.row_quantize_kernels: tuple[str, ...] = ROW_QUANTIZE_DEFAULT
        dim = config.dim
        self.patch_embedding = nn.Conv3d(config.in_dim, dim, kernel_size=config.patch_size, stride=config.patch_size)
        self.text_embedding = nn.Sequential(
            nn.Linear(config.text_dim, dim), nn.GELU(approximate="tanh"), nn.Linear(dim, dim)
        )
        self.time_embedding = nn.Sequential(nn.Linear(config.freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.blocks = nn.ModuleList(DiTBlock(config) for _ in range(config.num_layers))
        self.head = Head(config)

    def _ops(self, device: torch.device) -> _Ops:
        fuse = self.fuse_elementwise
        if fuse is None:
            fuse = device.type == "cuda" and compile_available()
        ops = compiled_ops() if fuse else EAGER_OPS
        if self.row_quantize_kernels and isinstance(self.blocks[0].ffn[0], FP8Linear):  # fp8 (quantize_dit)
            return with_row_kernels(ops, self.row_quantize_kernels)
        return ops

    def forward(
        self,
        latents: torch.Tensor,
        context: torch.Tensor,
        timestep: torch.Tensor,
        *,
        time_offset: int = 0,
        kv_cache: KVCache | None = None,
        release_cache: bool = False,
        keep: Callable[[torch.Tensor], torch.Tensor] | None = None,
        graph: bool = True,
    ) -> tuple[torch.Tensor, KVCache]:
        """latents (B, C, F, H, W), context (B, L, text_dim), timestep (B,) -> (prediction, this chunk's cache).

        `time_offset` is the RoPE time position of the chunk's first latent
        frame (latent frames already processed in the scene); `kv_cache` is
        the previous chunk's cache, or None for a scene's first chunk.

        With `release_cache`, each layer's entries of `kv_cache` are set to
        None as soon as the layer has used them (the caller hands the cache
        over): the old and the new cache then never coexist in full, which
        saves a whole cache of memory. `keep` is
        applied to each new key/value tensor as its layer finishes (e.g. a
        download to host memory); the returned cache holds what it returns.
        `graph`: a steady chunk may run its blocks as a CUDA graph (when
        `cuda_graphs` is on and no `keep` is given; graphs.py), which holds
        static buffers of a whole cache for later chunks of that shape.
        """
        cfg = self.config
        b, _, frames, height, width = latents.shape
        pt, ph, pw = cfg.patch_size
        if frames % pt or height % ph or width % pw:
            raise ValueError(f"latent size {(frames, height, width)} is not a multiple of the patch {cfg.patch_size}")
        f, h, w = frames // pt, height // ph, width // pw
        if kv_cache is not None and len(kv_cache.keys) != cfg.num_layers:
            raise ValueError(f"KV cache has {len(kv_cache.keys)} layers, the model {cfg.num_layers}")

        dtype = self.patch_embedding.weight.dtype
        x = self.patch_embedding(latents.to(dtype)).flatten(2).transpose(1, 2).contiguous()  # (B, f*h*w, dim)
        cos, sin = rope_cos_sin(f, h, w, cfg.head_dim, time_offset, device=x.device)

        time_dtype = self.time_embedding[0].weight.dtype
        e = self.time_embedding(timestep_embedding(timestep, cfg.freq_dim, dtype=time_dtype, device=x.device))
        t_mod = self.time_projection(e).unflatten(1, (6, cfg.dim))
        ctx = self.text_embedding(context.to(self.text_embedding[0].weight.dtype))

        ops = self._ops(x.device)
        graphed = None
        if graph and keep is None:
            graphed = self._graphed(x, t_mod, ctx, cos, sin, kv_cache, release_cache, ops)
        if graphed is not None:
            x, keys, values = graphed
            out = self.head(x, e)
            return self._unpatchify(out, b, f, h, w), KVCache(keys=keys, values=values, latent_frames=f)
        keys, values = [], []
        for i, block in enumerate(self.blocks):
            past = (kv_cache.keys[i], kv_cache.values[i]) if kv_cache is not None else None
            x, k, v = block(x, t_mod, ctx, cos, sin, past, self.attention_backend, ops)
            del past
            if release_cache and kv_cache is not None:
                kv_cache.keys[i] = kv_cache.values[i] = None
            keys.append(k if keep is None else keep(k))
            values.append(v if keep is None else keep(v))
            del k, v

        out = self.head(x, e)
        return self._unpatchify(out, b, f, h, w), KVCache(keys=keys, values=values, latent_frames=f)

    def _unpatchify(self, out: torch.Tensor, b: int, f: int, h: int, w: int) -> torch.Tensor:
        """(B, f*h*w, pt*ph*pw*out_dim), channel last within a patch -> (B, out_dim, F, H, W)."""
        cfg = self.config
        pt, ph, pw = cfg.patch_size
        out = out.reshape(b, f, h, w, pt, ph, pw, cfg.out_dim).permute(0, 7, 1, 4, 2, 5, 3, 6)
        return out.reshape(b, cfg.out_dim, f * pt, h * ph, w * pw)

    def _graphed(self, x, t_mod, ctx, cos, sin, kv_cache, release, ops):
        """(x, keys, values) from the blocks through a CUDA graph (graphs.py) for a steady chunk, else None.

        Steady: a previous chunk's cache of this chunk's length, on the
        device, and no autograd. The key holds every weight's address, so a
        graph never reads weights that moved (it is recaptured instead).
        """
        if self.cuda_graphs is False or kv_cache is None or torch.is_grad_enabled():
            return None
        if self.cuda_graphs is None and x.shape[1] > GRAPH_MAX_TOKENS:
            return None
        if not self.graphs.serves(x.device):
            return None
        past_k, past_v = kv_cache.keys, kv_cache.values
        # Plain lists of device tensors only: a ManagedCache's entries may be in host memory or still in flight
        # (an ArrivingCache's iteration does not wait).
        if not all(isinstance(p, list) and not isinstance(p, ManagedCache) for p in (past_k, past_v)):
            return None
        want = (x.shape[0], x.shape[1], self.config.num_heads, self.config.head_dim)
        if any(t is None or tuple(t.shape) != want or t.device != x.device for t in (*past_k, *past_v)):
            return None
        dtype = past_k[0].dtype
        if any(t.dtype != dtype for t in (*past_k, *past_v)):
            return None
        inputs = (x, t_mod, ctx, cos, sin)
        key = (
            tuple((tuple(t.shape), t.dtype) for t in inputs),
            dtype,
            x.device,
            self.attention_backend,
            id(ops),
            tuple(t.data_ptr() for t in (*self.blocks.parameters(), *self.blocks.buffers())),
        )
        return self.graphs.run(key, self._run_blocks(ops), inputs, past_k, past_v, release)

    def _run_blocks(self, ops: _Ops):
        backend = self.attention_backend

        def run(x, t_mod, ctx, cos, sin, past):
            for i, block in enumerate(self.blocks):
                x, k, v = block(x, t_mod, ctx, cos, sin, (past[0, i], past[1, i]), backend, ops)
                past[0, i].copy_(k)
                past[1, i].copy_(v)
            return x

        return run


def random_dit_state_dict(
    config: DiTConfig, seed: int = 0, dtype: torch.dtype = torch.bfloat16
) -> dict[str, torch.Tensor]:
    """Random weights in the published format (names, shapes, bf16), scaled so activations stay sane.

    Used to test and benchmark the full pipeline without the real checkpoint.
    """
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in CausalWanDiT(config).state_dict().items()}
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for name, shape in shapes.items():
        noise = torch.randn(shape, generator=gen)
        if name.endswith(("norm_q.weight", "norm_k.weight", "norm3.weight")):
            t = 1.0 + 0.05 * noise
        elif name.endswith("modulation"):
            t = noise / config.dim**0.5
        elif name.endswith("bias"):
            t = 0.01 * noise
        else:  # linear / conv weights
            t = 0.02 * noise
        sd[name] = t.to(dtype)
    return sd
