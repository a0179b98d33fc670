"""The VAE's 192-channel causal 3x3x3 convs as one Triton implicit-GEMM kernel that also writes their epilogues.

Why: cuDNN computes 192 outputs in tiles of 128 or 256 (work for outputs that
do not exist), and every conv's output then makes one or two more passes
through memory (its bias, the residual add, the next RMS norm + SiLU into the
next conv's staged buffer). Here one program computes a row of pixels x
exactly 192 outputs, as two tensor-core products (128 + 64) sharing each
input tile (bench/check_conv.py; bench/RESULTS.md has the figures); used for
rows that fill its 128-pixel blocks (elsewhere cuDNN was as fast or faster). Holding a
pixel's channels whole, the epilogue adds the bias and the residual, or, for
a resblock's first conv, writes the next norm + SiLU straight into the next
conv's staged buffer and cache entry: that conv's output is never stored.
(96 outputs as 64 + 32 ran slower than cuDNN's 128-wide tiles: not used.)

The input is the causal conv's staged buffer (1, C, T + 2, H, W),
channels-last (2 history frames in front). The tile for tap (dt, dh, dw) is
one tensor-memory (TMA) box of its (T + 2, H, W, C) view at (t + dt,
h + dh - 1, w0 + dw - 1): the copy engine fills the rows and columns outside
the frame with zeros, which is the conv's spatial zero padding.
"""

from __future__ import annotations

import torch

from .configs import first_that_runs
from .norm_silu import INTERPRETED, tl, triton, triton_usable

try:  # host-side tensor descriptors: Triton 3.4+
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - depends on the install
    TensorDescriptor = None

CL3 = torch.channels_last_3d
# Output channels -> the two products' widths (powers of two, as Triton's blocks are).
SPLITS = {192: (128, 64)}
# (BLOCK_M pixels, stages, warps) tried in order, fastest measured first (bench/check_conv.py); the first that the
# GPU takes is kept per shape.
CONFIGS = ((128, 4, 4), (128, 3, 4), (64, 2, 4))
# Measured on Hopper (sm90) only; elsewhere cuDNN keeps these convs.
CAPABILITY = (9, 0)
# Rows of a multiple of this many pixels only: where the last block of a row is partly empty the kernel lost to
# cuDNN (480p's rows, 1080p's edge tiles).
ROW_MULTIPLE = 128


if triton is not None:

    @triton.jit
    def _row_block(W, H, BLOCK_M: tl.constexpr):
        """(w0, h, t): this program's BLOCK_M pixels from w0 on, in row h of frame t (program id 0)."""
        pid = tl.program_id(0)
        tiles_w = tl.cdiv(W, BLOCK_M)
        row = pid // tiles_w
        return (pid % tiles_w) * BLOCK_M, row % H, row // H

    @triton.jit
    def _split_conv_kernel(
        x_desc, w1_desc, w2_desc, bias_ptr, res_ptr, out_ptr, gamma_ptr, act_ptr, tail_ptr,
        T, H, W,
        so_t, so_h, so_w, sr_t, sr_h, sr_w, sa_t, sa_h, sa_w,
        C: tl.constexpr, N1: tl.constexpr, N2: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
        HAS_RES: tl.constexpr, NORM: tl.constexpr, HAS_TAIL: tl.constexpr, STAGES: tl.constexpr,
        PRECISION: tl.constexpr,
    ):  # fmt: skip
        w0, h, t = _row_block(W, H, BLOCK_M)
        KC: tl.constexpr = C // BLOCK_K
        acc1 = tl.zeros((BLOCK_M, N1), dtype=tl.float32)
        acc2 = tl.zeros((BLOCK_M, N2), dtype=tl.float32)
        for i in tl.range(0, 27 * KC, num_stages=STAGES):
            tap = i // KC
            k = tap * C + (i % KC) * BLOCK_K
            a = x_desc.load([t + tap // 9, h + (tap // 3) % 3 - 1, w0 + tap % 3 - 1, (i % KC) * BLOCK_K])
            a = a.reshape(BLOCK_M, BLOCK_K)
            acc1 = tl.dot(a, w1_desc.load([0, k]).T, acc1, input_precision=PRECISION)
            acc2 = tl.dot(a, w2_desc.load([0, k]).T, acc2, input_precision=PRECISION)
        n1 = tl.arange(0, N1)
        n2 = N1 + tl.arange(0, N2)
        w = (w0 + tl.arange(0, BLOCK_M)).to(tl.int64)
        keep = (w < W)[:, None]
        acc1 += tl.load(bias_ptr + n1)[None, :]
        acc2 += tl.load(bias_ptr + n2)[None, :]
        if HAS_RES:
            res = t.to(tl.int64) * sr_t + h.to(tl.int64) * sr_h + w * sr_w
            acc1 += tl.load(res_ptr + res[:, None] + n1[None, :], mask=keep, other=0.0).to(tl.float32)
            acc2 += tl.load(res_ptr + res[:, None] + n2[None, :], mask=keep, other=0.0).to(tl.float32)
        if NORM:  # F.normalize over the pixel's channels, gamma x scale, SiLU: the next conv's staged input
            inv = 1.0 / tl.maximum(tl.sqrt(tl.sum(acc1 * acc1, axis=1) + tl.sum(acc2 * acc2, axis=1)), 1e-12)
            y1 = acc1 * inv[:, None] * tl.load(gamma_ptr + n1)[None, :]
            y2 = acc2 * inv[:, None] * tl.load(gamma_ptr + n2)[None, :]
            y1 = (y1 * tl.sigmoid(y1)).to(act_ptr.dtype.element_ty)
            y2 = (y2 * tl.sigmoid(y2)).to(act_ptr.dtype.element_ty)
            at = t.to(tl.int64) * sa_t + h.to(tl.int64) * sa_h + w * sa_w
            tl.store(act_ptr + at[:, None] + n1[None, :], y1, mask=keep)
            tl.store(act_ptr + at[:, None] + n2[None, :], y2, mask=keep)
            if HAS_TAIL:  # the last 2 frames are also the next conv's cache entry (same pixel strides)
                if t >= T - 2:
                    at -= (T - 2) * sa_t
                    tl.store(tail_ptr + at[:, None] + n1[None, :], y1, mask=keep)
                    tl.store(tail_ptr + at[:, None] + n2[None, :], y2, mask=keep)
        else:
            at = t.to(tl.int64) * so_t + h.to(tl.int64) * so_h + w * so_w
            tl.store(out_ptr + at[:, None] + n1[None, :], acc1.to(out_ptr.dtype.element_ty), mask=keep)
            tl.store(out_ptr + at[:, None] + n2[None, :], acc2.to(out_ptr.dtype.element_ty), mask=keep)


def split_conv_usable(conv: torch.nn.Conv3d, buf: torch.Tensor) -> bool:
    """Whether `split_conv` may run `conv` (a causal 3x3x3, padding 1) on this staged buffer."""
    if not (TensorDescriptor is not None and triton_usable(buf)) or conv.out_channels not in SPLITS:
        return False
    if INTERPRETED:  # the interpreter's tensor-memory loads mishandle bfloat16: CPU tests run float32
        if buf.is_cuda or buf.dtype != torch.float32:
            return False
    elif torch.cuda.get_device_capability(buf.device) != CAPABILITY:
        return False
    shape_ok = conv.kernel_size == (3, 3, 3) and conv.stride == (1, 1, 1) and conv.dilation == (1, 1, 1)
    c = buf.shape[1]
    return (
        shape_ok
        and conv.groups == 1
        and tuple(getattr(conv, "_padding", ())) == (1, 1, 1, 1, 2, 0)
        and conv.in_channels == c
        and c % 16 == 0
        and buf.shape[0] == 1
        and buf.shape[-1] % ROW_MULTIPLE == 0
        and buf.is_contiguous(memory_format=torch.channels_last_3d)
        and buf.dtype == conv.weight.dtype
    )


def pack_split(weight: torch.Tensor) -> torch.Tensor:
    """(Cout, Cin, 3, 3, 3) -> (Cout, 27 * Cin): row o = its taps in order, each tap's input channels together."""
    return weight.detach().permute(0, 2, 3, 4, 1).reshape(weight.shape[0], -1).contiguous()


_chosen: dict[tuple, int] = {}  # (device, dtype, C, Cout) -> index into CONFIGS; -1: none ran (cuDNN from then on)
_failures: list[str] = []


def _pixel_strides(x: torch.Tensor) -> tuple[int, int, int] | None:
    """(frame, row, pixel) strides of a (1, C, T, H, W) view whose channels are adjacent, else None."""
    return tuple(x.stride()[2:]) if x.shape[0] == 1 and x.stride(1) == 1 else None


def split_conv(
    buf: torch.Tensor,
    packed: torch.Tensor,
    bias: torch.Tensor,
    residual: torch.Tensor | None = None,
    *,
    out: torch.Tensor | None = None,
    gamma: torch.Tensor | None = None,
    act: torch.Tensor | None = None,
    tail: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """conv3d(buf, weight, bias, padding (0, 1, 1)) [+ residual] on a staged (1, C, T + 2, H, W) buffer.

    `packed` = pack_split(weight); `bias` float32 (Cout,). Without `gamma` the
    result goes into `out` ((1, Cout, T, H, W) with adjacent channels, e.g. a
    view inside a zero-bordered buffer; new channels-last if None) and is
    returned. With `gamma` (float32: the norm's gamma x scale) the result is
    not stored: SiLU(RMS-norm(result) x gamma) goes into `act` and its last 2
    frames into `tail` (both (1, Cout, ., H, W) with the same pixel strides),
    and `act` is returned. Accumulation and epilogue in float32, one rounding.
    None if no block configuration runs here (the caller takes cuDNN).
    """
    _, c, frames, h, w = buf.shape
    t = frames - 2
    cout = packed.shape[0]
    n1, n2 = SPLITS[cout]
    key = (buf.device, buf.dtype, c, cout)
    if _chosen.get(key, 0) < 0:  # no configuration ran for this shape before: nothing to allocate
        return None
    if gamma is None:
        if out is None:
            out = torch.empty((1, cout, t, h, w), dtype=buf.dtype, device=buf.device, memory_format=CL3)
        target, strides = out, _pixel_strides(out)
    else:
        target, strides = act, _pixel_strides(act)
        if tail is not None and (t < 2 or _pixel_strides(tail) != strides):
            return None
    res_strides = (0, 0, 0) if residual is None else _pixel_strides(residual)
    if strides is None or res_strides is None:
        return None
    block_k = 64 if c % 64 == 0 else 32 if c % 32 == 0 else 16
    view = buf.permute(0, 2, 3, 4, 1)[0]  # (T + 2, H, W, C)
    w1, w2 = packed[:n1], packed[n1:]

    def launch(config: tuple[int, int, int]) -> None:
        block_m, stages, warps = config
        x_desc = TensorDescriptor(view, list(view.shape), list(view.stride()), [1, 1, block_m, block_k])
        w1_desc = TensorDescriptor(w1, list(w1.shape), list(w1.stride()), [n1, block_k])
        w2_desc = TensorDescriptor(w2, list(w2.shape), list(w2.stride()), [n2, block_k])
        _split_conv_kernel[(t * h * triton.cdiv(w, block_m),)](
            x_desc, w1_desc, w2_desc, bias, target if residual is None else residual, target,
            bias if gamma is None else gamma, target, target if tail is None else tail,
            t, h, w, *strides, *res_strides, *strides,
            C=c, N1=n1, N2=n2, BLOCK_M=block_m, BLOCK_K=block_k,
            HAS_RES=residual is not None, NORM=gamma is not None, HAS_TAIL=tail is not None, STAGES=stages,
            PRECISION="ieee" if buf.dtype == torch.float32 else "tf32", num_warps=warps,
        )  # fmt: skip

    return target if first_that_runs(key, CONFIGS, launch, _chosen, _failures) else None
