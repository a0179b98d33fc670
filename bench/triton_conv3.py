"""A Triton implicit-GEMM 3x3x3 causal conv over tensor-memory (TMA) tiles, with fused epilogues: a measured
prototype (bench/RESULTS.md round 11), not used by the product: it did not beat cuDNN plus separate passes.

Why: cuDNN runs the wide convs near the tensor cores' rate, but every conv's
output then makes one or two more full passes through memory (its bias, the
residual add, the next RMS norm + SiLU into the next conv's staged buffer).
At 720p those passes are ~15 % of a chunk. Here one program computes a tile
of BLOCK_M pixels of one row x all output channels, so the epilogue sees
each pixel's channels whole and can add the bias and residual and apply the
next norm + SiLU before anything is written.

The input is the staged causal buffer (1, C, T + 2, H, W) channels-last
(2 cached frames in front). A tile for tap (dt, dh, dw) is a plain box of the
(T + 2, H, W, C) view at (t + dt, h + dh - 1, w0 + dw - 1): the copy engine
fills the out-of-range rows and columns with zeros, which is conv3d's
spatial zero padding, so nothing is padded in memory.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from infvsr_core.kernels.split_conv import row_block

CL3 = torch.channels_last_3d

try:  # host-side TMA descriptors: Triton 3.4+
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - depends on the install
    TensorDescriptor = None


@triton.jit
def _conv3_kernel(
    x_desc, w_desc, bias_ptr, res_ptr, out_ptr, gamma_ptr, act_ptr, tail_ptr,
    T, H, W,
    so_t, so_h, so_w,
    C: tl.constexpr, COUT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, HAS_OUT: tl.constexpr, NORM: tl.constexpr,
    HAS_TAIL: tl.constexpr, STAGES: tl.constexpr,
):  # fmt: skip
    w0, h, t = row_block(W, H, BLOCK_M)
    n0 = tl.program_id(1) * BLOCK_N
    KC: tl.constexpr = C // BLOCK_K
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for i in tl.range(0, 27 * KC, num_stages=STAGES):
        tap = i // KC
        k0 = (i % KC) * BLOCK_K
        a = x_desc.load([t + tap // 9, h + (tap // 3) % 3 - 1, w0 + tap % 3 - 1, k0])
        b = w_desc.load([n0, tap * C + k0])
        acc = tl.dot(a.reshape(BLOCK_M, BLOCK_K), b.T, acc)
    n = n0 + tl.arange(0, BLOCK_N)
    w = w0 + tl.arange(0, BLOCK_M)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + n, mask=n < COUT, other=0.0)[None, :]
    pixel = t.to(tl.int64) * so_t + h.to(tl.int64) * so_h + w.to(tl.int64) * so_w
    offsets = pixel[:, None] + n[None, :]
    keep = (w < W)[:, None] & (n < COUT)[None, :]
    if HAS_RES:
        acc += tl.load(res_ptr + offsets, mask=keep, other=0.0).to(tl.float32)
    if HAS_OUT:
        rounded = acc.to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + offsets, rounded, mask=keep)
        if NORM:  # the next norm reads what was stored, as it would from memory
            acc = rounded.to(tl.float32)
    if NORM:  # RMS over the pixel's channels (the padded ones are exactly 0), then gamma and SiLU
        inv = 1.0 / tl.maximum(tl.sqrt(tl.sum(acc * acc, axis=1)), 1e-12)
        y = acc * inv[:, None] * tl.load(gamma_ptr + n, mask=n < COUT, other=0.0)[None, :]
        y = (y * tl.sigmoid(y)).to(act_ptr.dtype.element_ty)
        tl.store(act_ptr + offsets, y, mask=keep)
        if HAS_TAIL:  # the last 2 frames also become the next conv's cache entry
            if t >= T - 2:
                tl.store(tail_ptr + offsets - (T - 2) * so_t, y, mask=keep)


def pack_weight(weight: torch.Tensor, block_n: int) -> torch.Tensor:
    """(Cout, Cin, 3, 3, 3) -> (Cout padded to block_n, 27 * Cin), row o = [tap-major, then input channel]."""
    cout, cin = weight.shape[:2]
    padded = -(-cout // block_n) * block_n
    packed = weight.new_zeros((padded, 27 * cin))
    packed[:cout] = weight.permute(0, 2, 3, 4, 1).reshape(cout, 27 * cin)
    return packed


def conv3(
    buf: torch.Tensor,
    packed: torch.Tensor,
    cout: int,
    bias: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    *,
    out: bool = True,
    gamma: torch.Tensor | None = None,
    act: torch.Tensor | None = None,
    tail: torch.Tensor | None = None,
    block_m: int = 256,
    block_n: int = 128,
    block_k: int = 32,
    stages: int = 4,
    warps: int = 8,
) -> torch.Tensor | None:
    """conv3d(buf, weight, bias, padding (0, 1, 1)) (+ residual) for a staged (1, C, T + 2, H, W) channels-last
    buffer; `packed` = pack_weight(weight, block_n); bias float32.

    Returns (1, cout, T, H, W) channels-last (None with out=False). With
    `gamma` (float32, the norm's gamma x scale), SiLU(RMS-norm(result)) also
    goes into `act` (a (1, cout, T, H, W) channels-last view: the next conv's
    staged frames) and its last 2 frames into `tail` ((1, cout, 2, H, W)).
    """
    _, c, frames, h, w = buf.shape
    t = frames - 2
    target = torch.empty((1, cout, t, h, w), dtype=buf.dtype, device=buf.device, memory_format=CL3) if out else buf
    so = (t * h * w * cout, 1, h * w * cout, w * cout, cout)  # (1, cout, T, H, W) channels-last
    for extra in (residual, act, tail):
        if extra is not None and extra.stride()[2:] != so[2:]:
            raise ValueError("residual, act and tail must have the output's channels-last pixel strides")
    if tail is not None and (t < 2 or tail.stride(2) != so[2]):
        raise ValueError("a tail needs T >= 2 and the output's frame stride")
    if gamma is not None and (act is None or packed.shape[0] != block_n):
        raise ValueError("the norm needs `act` and all output channels in one block")
    view = buf.permute(0, 2, 3, 4, 1)[0]  # (T + 2, H, W, C)
    x_desc = TensorDescriptor(view, list(view.shape), list(view.stride()), [1, 1, block_m, block_k])
    w_desc = TensorDescriptor(packed, list(packed.shape), list(packed.stride()), [block_n, block_k])
    grid = (t * h * triton.cdiv(w, block_m), packed.shape[0] // block_n)
    _conv3_kernel[grid](
        x_desc, w_desc, target if bias is None else bias, target if residual is None else residual, target,
        target if gamma is None else gamma, target if act is None else act, target if tail is None else tail,
        t, h, w, so[2], so[3], so[4],
        C=c, COUT=cout, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        HAS_BIAS=bias is not None, HAS_RES=residual is not None, HAS_OUT=out, NORM=gamma is not None,
        HAS_TAIL=tail is not None, STAGES=stages, num_warps=warps,
    )  # fmt: skip
    return target if out else None
