"""Test-only references for the DiT: a key converter to diffusers' names and a plain float64 streaming forward.

Written independently of `infvsr_core.dit` (complex-number RoPE, explicit
attention mask, einsum unpatchify) so that the two can check each other.
"""

from __future__ import annotations

import math
import re

import torch
import torch.nn.functional as F

from infvsr_core.dit import DiTConfig

# Original Wan2.1 / InfVSR.ckpt name -> diffusers WanTransformer3DModel name (applied in order, first match wins).
_TO_DIFFUSERS = [
    (r"^text_embedding\.0\.", "condition_embedder.text_embedder.linear_1."),
    (r"^text_embedding\.2\.", "condition_embedder.text_embedder.linear_2."),
    (r"^time_embedding\.0\.", "condition_embedder.time_embedder.linear_1."),
    (r"^time_embedding\.2\.", "condition_embedder.time_embedder.linear_2."),
    (r"^time_projection\.1\.", "condition_embedder.time_proj."),
    (r"^(blocks\.\d+)\.self_attn\.([qkv])\.", r"\1.attn1.to_\2."),
    (r"^(blocks\.\d+)\.self_attn\.o\.", r"\1.attn1.to_out.0."),
    (r"^(blocks\.\d+)\.self_attn\.(norm_[qk])\.", r"\1.attn1.\2."),
    (r"^(blocks\.\d+)\.cross_attn\.([qkv])\.", r"\1.attn2.to_\2."),
    (r"^(blocks\.\d+)\.cross_attn\.o\.", r"\1.attn2.to_out.0."),
    (r"^(blocks\.\d+)\.cross_attn\.(norm_[qk])\.", r"\1.attn2.\2."),
    (r"^(blocks\.\d+)\.norm3\.", r"\1.norm2."),  # Wan's cross-attn norm is diffusers' norm2
    (r"^(blocks\.\d+)\.ffn\.0\.", r"\1.ffn.net.0.proj."),
    (r"^(blocks\.\d+)\.ffn\.2\.", r"\1.ffn.net.2."),
    (r"^(blocks\.\d+)\.modulation$", r"\1.scale_shift_table"),
    (r"^head\.head\.", "proj_out."),
    (r"^head\.modulation$", "scale_shift_table"),
    (r"^patch_embedding\.", "patch_embedding."),
]


def to_diffusers_key(name: str) -> str:
    for pattern, repl in _TO_DIFFUSERS:
        new, n = re.subn(pattern, repl, name)
        if n:
            return new
    raise KeyError(f"no diffusers name for '{name}'")


def to_diffusers_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {to_diffusers_key(k): v for k, v in sd.items()}


def rope_complex(frames: int, height: int, width: int, head_dim: int, time_offset: int) -> torch.Tensor:
    """(L, head_dim/2) complex128 rotations, built with torch.polar like Wan's rope_params."""

    def axis(positions: torch.Tensor, d: int) -> torch.Tensor:
        inv = 1.0 / torch.pow(
            torch.tensor(10000.0, dtype=torch.float64), torch.arange(0, d, 2, dtype=torch.float64) / d
        )
        ang = torch.outer(positions.to(torch.float64), inv)
        return torch.polar(torch.ones_like(ang), ang)

    c = head_dim // 2
    ct, ch = c - 2 * (c // 3), c // 3
    ft = axis(torch.arange(time_offset, time_offset + frames), 2 * ct)
    fh = axis(torch.arange(height), 2 * ch)
    fw = axis(torch.arange(width), 2 * ch)
    grid = torch.cat(
        [
            ft.view(frames, 1, 1, -1).expand(frames, height, width, -1),
            fh.view(1, height, 1, -1).expand(frames, height, width, -1),
            fw.view(1, 1, width, -1).expand(frames, height, width, -1),
        ],
        dim=-1,
    )
    return grid.reshape(frames * height * width, c)


def rope_apply_complex(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """x (B, L, H, D) real -> rotated as complex pairs, float64."""
    xc = torch.view_as_complex(x.to(torch.float64).reshape(*x.shape[:-1], -1, 2).contiguous())
    return torch.view_as_real(xc * freqs[None, :, None, :]).flatten(-2)


def sinusoid_reference(t: torch.Tensor, dim: int) -> torch.Tensor:
    half = dim // 2
    k = torch.arange(half, dtype=torch.float64)
    ang = t.to(torch.float64)[:, None] * torch.exp(-math.log(10000.0) * k / half)[None, :]
    return torch.cat([torch.cos(ang), torch.sin(ang)], dim=1)


def reference_stream(
    sd: dict[str, torch.Tensor],
    cfg: DiTConfig,
    latents: torch.Tensor,
    context: torch.Tensor,
    timestep: torch.Tensor,
    chunk_frames: int,
) -> torch.Tensor:
    """All chunks of a scene at once, in float64, with a block-banded mask instead of a cache.

    Chunk c attends to chunks c-1 and c only. Chunk c's own tokens never see
    later chunks, so layer by layer they match what the streaming model
    computes; chunk c+1 then sees exactly the keys/values the rolling cache
    would hold. Time positions run over the whole sequence (absolute).
    """
    w = {k: v.to(torch.float64) for k, v in sd.items()}
    dim, heads, eps = cfg.dim, cfg.num_heads, cfg.eps
    pt, ph, pw = cfg.patch_size
    b, _, frames, height, width = latents.shape
    f, h, wd = frames // pt, height // ph, width // pw

    def lin(x: torch.Tensor, name: str) -> torch.Tensor:
        return x @ w[name + ".weight"].T + w[name + ".bias"]

    def rms(x: torch.Tensor, name: str) -> torch.Tensor:
        return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w[name + ".weight"]

    def ln(x: torch.Tensor) -> torch.Tensor:
        mu = x.mean(-1, keepdim=True)
        var = (x - mu).pow(2).mean(-1, keepdim=True)
        return (x - mu) / torch.sqrt(var + eps)

    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor | None) -> torch.Tensor:
        q, k, v = (t.unflatten(-1, (heads, -1)) for t in (q, k, v))
        s = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])
        if allowed is not None:
            s = s.masked_fill(~allowed, float("-inf"))
        return torch.einsum("bhqk,bkhd->bqhd", torch.softmax(s, -1), v).flatten(2)

    x = F.conv3d(latents.to(torch.float64), w["patch_embedding.weight"], w["patch_embedding.bias"], stride=(pt, ph, pw))
    x = x.flatten(2).transpose(1, 2)
    e = lin(F.silu(lin(sinusoid_reference(timestep, cfg.freq_dim), "time_embedding.0")), "time_embedding.2")
    t_mod = lin(F.silu(e), "time_projection.1").view(b, 6, dim)
    ctx = lin(F.gelu(lin(context.to(torch.float64), "text_embedding.0"), approximate="tanh"), "text_embedding.2")

    freqs = rope_complex(f, h, wd, dim // heads, 0)
    chunk_of = torch.arange(f).repeat_interleave(h * wd) // chunk_frames
    allowed = (chunk_of[None, :] <= chunk_of[:, None]) & (chunk_of[None, :] >= chunk_of[:, None] - 1)

    for i in range(cfg.num_layers):
        p = f"blocks.{i}."
        m = w[p + "modulation"] + t_mod
        shift1, scale1, gate1, shift2, scale2, gate2 = (m[:, j : j + 1] for j in range(6))
        y = ln(x) * (1 + scale1) + shift1
        q = rope_apply_complex(rms(lin(y, p + "self_attn.q"), p + "self_attn.norm_q").unflatten(-1, (heads, -1)), freqs)
        k = rope_apply_complex(rms(lin(y, p + "self_attn.k"), p + "self_attn.norm_k").unflatten(-1, (heads, -1)), freqs)
        att = attend(q.flatten(2), k.flatten(2), lin(y, p + "self_attn.v"), allowed)
        x = x + gate1 * lin(att, p + "self_attn.o")
        y = ln(x) * w[p + "norm3.weight"] + w[p + "norm3.bias"]
        q = rms(lin(y, p + "cross_attn.q"), p + "cross_attn.norm_q")
        k = rms(lin(ctx, p + "cross_attn.k"), p + "cross_attn.norm_k")
        x = x + lin(attend(q, k, lin(ctx, p + "cross_attn.v"), None), p + "cross_attn.o")
        y = ln(x) * (1 + scale2) + shift2
        x = x + gate2 * lin(F.gelu(lin(y, p + "ffn.0"), approximate="tanh"), p + "ffn.2")

    m = w["head.modulation"] + e[:, None, :]
    out = lin(ln(x) * (1 + m[:, 1:2]) + m[:, 0:1], "head.head")
    out = out.view(b, f, h, wd, pt, ph, pw, cfg.out_dim)
    out = torch.einsum("bfhwpqrc->bcfphqwr", out)
    return out.reshape(b, cfg.out_dim, f * pt, h * ph, wd * pw)
