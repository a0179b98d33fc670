"""The VAE mid block's single-head attention (head dim = channels, 384) as one Triton kernel, flash style.

Why: no fused attention kernel takes a head dim of 384 (FlashAttention and
cuDNN stop at 256, SDPA falls back to a slow one), and blocked GEMMs
(`vae.fast_blocks._blocked_attention`, the path without Triton) write float32 scores
to memory, run a float32 softmax over them, a cast, a second GEMM. Here one
program keeps a block of queries and walks the keys with the online softmax:
the scores stay in registers, in float32, and only the output is written.
The head dim goes in three slices (Triton blocks are powers of two), each
with its own product and accumulator.

Probabilities enter the second product in the inputs' dtype (as the blocked
path's `probs.to(v.dtype)`), unnormalized and divided by their sum at the end
(flash attention's order: differs at the last bit of the output dtype).
"""

from __future__ import annotations

import torch

from .configs import first_that_runs
from .norm_silu import tl, triton, triton_usable

SLICES = 3  # head-dim slices per product
LOG2E = 1.4426950408889634


if triton is not None:

    @triton.jit
    def _slice(ptr, rows, row_ok, stride, first: tl.constexpr, d, C: tl.constexpr):
        """rows x (first + d) of a (rows, 3C) qkv block; out-of-range rows and channels read as 0."""
        ok = row_ok[:, None] & (d < C)[None, :]
        return tl.load(ptr + rows[:, None] * stride + first + d[None, :], mask=ok, other=0.0)

    @triton.jit
    def _mid_attention_kernel(
        qkv_ptr, out_ptr, L, frame_stride, row_stride, out_frame_stride, out_row_stride, scale_log2,
        C: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        PRECISION: tl.constexpr,
    ):  # fmt: skip
        frame = tl.program_id(1).to(tl.int64)
        base = qkv_ptr + frame * frame_stride
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < L
        d0 = tl.arange(0, BLOCK_D)
        d1 = d0 + BLOCK_D
        d2 = d1 + BLOCK_D
        q0 = _slice(base, rows, row_ok, row_stride, 0, d0, C)
        q1 = _slice(base, rows, row_ok, row_stride, 0, d1, C)
        q2 = _slice(base, rows, row_ok, row_stride, 0, d2, C)
        m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        l_i = tl.zeros((BLOCK_M,), tl.float32)
        acc0 = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
        acc1 = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
        acc2 = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
        for start in range(0, L, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            col_ok = cols < L
            s = tl.dot(q0, tl.trans(_slice(base, cols, col_ok, row_stride, C, d0, C)), input_precision=PRECISION)
            s += tl.dot(q1, tl.trans(_slice(base, cols, col_ok, row_stride, C, d1, C)), input_precision=PRECISION)
            s += tl.dot(q2, tl.trans(_slice(base, cols, col_ok, row_stride, C, d2, C)), input_precision=PRECISION)
            s = tl.where(col_ok[None, :], s * scale_log2, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            p = p.to(q0.dtype)
            v0 = _slice(base, cols, col_ok, row_stride, 2 * C, d0, C)
            acc0 = acc0 * alpha[:, None] + tl.dot(p, v0, input_precision=PRECISION)
            v1 = _slice(base, cols, col_ok, row_stride, 2 * C, d1, C)
            acc1 = acc1 * alpha[:, None] + tl.dot(p, v1, input_precision=PRECISION)
            v2 = _slice(base, cols, col_ok, row_stride, 2 * C, d2, C)
            acc2 = acc2 * alpha[:, None] + tl.dot(p, v2, input_precision=PRECISION)
            m_i = m_new
        out = out_ptr + frame * out_frame_stride + rows[:, None] * out_row_stride
        inv = 1.0 / l_i[:, None]
        tl.store(out + d0[None, :], (acc0 * inv).to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & (d0 < C)[None, :])
        tl.store(out + d1[None, :], (acc1 * inv).to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & (d1 < C)[None, :])
        tl.store(out + d2[None, :], (acc2 * inv).to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & (d2 < C)[None, :])


def mid_attention_usable(qkv: torch.Tensor) -> bool:
    """Whether `mid_attention` runs its kernel on this (frames, tokens, 3C) tensor (else: the caller's path)."""
    return triton_usable(qkv) and qkv.ndim == 3 and qkv.stride(-1) == 1 and qkv.shape[-1] % 3 == 0


# (BLOCK_M, BLOCK_N, warps, stages) to try in order, by the inputs' element size: the first that the GPU's shared
# memory takes is kept (fastest measured first, larger blocks do not fit Hopper's shared memory;
# bench/check_kernels.py --sections mid).
CONFIGS = {2: ((64, 32, 4, 3), (64, 32, 4, 2), (32, 32, 4, 2), (16, 16, 4, 1)), 4: ((32, 32, 4, 2), (16, 16, 4, 1))}
_chosen: dict[tuple, int] = {}  # (device, dtype, C) -> index into CONFIGS; -1: none ran (blocked GEMMs from then on)
_failures: list[str] = []


def mid_attention(qkv: torch.Tensor, scale: float) -> torch.Tensor | None:
    """softmax(scale * q k^T) v per frame for qkv (frames, tokens, 3C) = [q | k | v]; out (frames, tokens, C).

    Scores and softmax in float32; float32 inputs multiply in full float32 (no
    TF32). None if no block configuration runs on this GPU (too little shared
    memory, a broken Triton): the caller then takes its own path, and only for
    this kernel (the other Triton kernels are unaffected).
    """
    n, tokens, c3 = qkv.shape
    c = c3 // 3
    key = (qkv.device, qkv.dtype, c)
    if _chosen.get(key, 0) < 0:  # no configuration ran for this shape before: nothing to allocate
        return None
    out = torch.empty((n, tokens, c), dtype=qkv.dtype, device=qkv.device)
    block_d = max(16, triton.next_power_of_2(-(-c // SLICES)))  # three slices of a power of two, >= tl.dot's 16

    def launch(config: tuple[int, int, int, int]) -> None:
        block_m, block_n, warps, stages = config
        _mid_attention_kernel[(triton.cdiv(tokens, block_m), n)](
            qkv, out, tokens, qkv.stride(0), qkv.stride(1), out.stride(0), out.stride(1), scale * LOG2E,
            C=c, BLOCK_D=block_d, BLOCK_M=block_m, BLOCK_N=block_n,
            PRECISION="ieee" if qkv.dtype == torch.float32 else "tf32", num_warps=warps, num_stages=stages,
        )  # fmt: skip

    configs = CONFIGS.get(qkv.element_size(), ())
    return out if first_that_runs(key, configs, launch, _chosen, _failures) else None
