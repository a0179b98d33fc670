"""The attention seam: every attention call of the DiT goes through `attention()`.

Tensors are laid out (B, L, H, D) as the DiT produces them. "auto" (the
default) takes FlashAttention-3 where it is installed and can run (a Hopper
GPU, bf16), else PyTorch's SDPA with cuDNN's kernel first. Other kernels
(SageAttention, ...) plug in with `register_attention_backend` without
touching the model code. `float8_attention` takes operands already in float8
(fp8.py's `quantize_heads`), for the fp8 DiT where FlashAttention-3 runs them.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import sys
from collections.abc import Callable
from types import ModuleType

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


# On CUDA, cuDNN's attention first: it is faster than PyTorch's default pick (flash) on the DiT's shapes
# (bench/check_attention.py).
# Backends that refuse a shape fall through to the next one in this order.
CUDA_SDPA_PRIORITY: list[SDPBackend] = [
    SDPBackend.CUDNN_ATTENTION,
    SDPBackend.FLASH_ATTENTION,
    SDPBackend.EFFICIENT_ATTENTION,
    SDPBackend.MATH,
]


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """PyTorch's fused kernel; it wants (B, H, L, D). On CUDA the backends are tried in CUDA_SDPA_PRIORITY order."""
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if q.is_cuda and CUDA_SDPA_PRIORITY:
        with sdpa_kernel(CUDA_SDPA_PRIORITY, set_priority=True):
            out = F.scaled_dot_product_attention(q, k, v)
    else:
        out = F.scaled_dot_product_attention(q, k, v)
    return out.transpose(1, 2)


def _math(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Plain softmax(Q K^T / sqrt(d)) V in float32: the reference the fast kernels are checked against."""
    qf, kf, vf = q.float(), k.float(), v.float()
    scores = torch.einsum("bqhd,bkhd->bhqk", qf, kf) / math.sqrt(q.shape[-1])
    out = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(dim=-1), vf)
    return out.to(q.dtype)


# FlashAttention-3's Python modules, first found wins: the official build (`flash_attn_3`, Hopper only) and the
# forward-only wheel `fa3_fwd`. On Hopper it runs the DiT's attention faster than cuDNN's kernel
# (bench/RESULTS.md). Neither is a dependency: "auto" uses one when it is installed.
FLASH3_MODULES = ("flash_attn_interface", "fa3_fwd_interface")
# FA3's kernels exist for Hopper (compute capability 9.x); the forward-only wheel has no fp16 kernels.
FLASH3_DTYPES = (torch.bfloat16,)
FLASH3_MAX_HEAD_DIM = 256
_flash3: list[ModuleType | None] = []


def flash3_installed() -> str | None:
    """The name of the importable FlashAttention-3 module, without importing it (None if there is none)."""
    for name in FLASH3_MODULES:
        try:
            if importlib.util.find_spec(name) is not None:
                return name
        except (ImportError, ValueError):
            continue
    return None


def _flash3_module() -> ModuleType | None:
    """FlashAttention-3's interface module, imported once (None if missing or if it fails to load)."""
    if not _flash3:
        name = flash3_installed()
        module = None
        if name == "fa3_fwd_interface" and "flash_attn_config" not in sys.modules:
            try:  # the wheel's helpers import its build config under the upstream name
                sys.modules["flash_attn_config"] = importlib.import_module("fa3_fwd_config")
            except ImportError:
                pass
        if name is not None:
            try:
                module = importlib.import_module(name)
            except Exception as error:  # noqa: BLE001 (a broken build: fall back to SDPA, and say why once)
                print(f"[InfVSR] FlashAttention-3 ({name}) failed to load, using SDPA: {error}", file=sys.stderr)
        _flash3.append(module)
    return _flash3[0]


def flash3_supports(q: torch.Tensor, k: torch.Tensor) -> bool:
    """Whether FlashAttention-3 is installed and has a kernel for these tensors on their device."""
    if not (q.is_cuda and q.dtype in FLASH3_DTYPES and k.dtype == q.dtype and q.shape[-1] <= FLASH3_MAX_HEAD_DIM):
        return False
    if q.shape[-1] % 8 or k.shape[1] == 0 or torch.cuda.get_device_capability(q.device)[0] != 9:
        return False
    return _flash3_module() is not None


def _flash3_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """FlashAttention-3 (its layout is ours: (B, L, H, D)); older builds also return the log-sum-exp."""
    module = _flash3_module()
    if module is None:
        raise RuntimeError(
            "the 'flash3' attention backend needs FlashAttention-3 (the 'flash_attn_3' or 'fa3_fwd' package) "
            "on a Hopper GPU; use 'auto' or 'sdpa'"
        )
    out = module.flash_attn_func(q, k, v)
    return out[0] if isinstance(out, tuple) else out


def flash3_float8(q: torch.Tensor) -> bool:
    """Whether FlashAttention-3 runs float8 operands for attention over tensors like q (bf16, on their device):
    a Hopper GPU, and a build with its float8 kernels (the builds can leave them out)."""
    if not flash3_supports(q, q):
        return False
    config = sys.modules.get("flash_attn_config") or sys.modules.get("fa3_fwd_config")
    flags = getattr(config, "CONFIG", {}).get("build_flags", {})
    return not flags.get("FLASHATTENTION_DISABLE_FP8", False)


def float8_attention_runs(q: torch.Tensor, backend: str) -> bool:
    """Whether `float8_attention` has a kernel for this call: FlashAttention-3's float8 one under "auto" or
    "flash3"; "math" always (its float32 reference, for checks on any device); SDPA has no float8 kernel."""
    if backend == "math":
        return True
    return backend in ("auto", "flash3") and flash3_float8(q)


def float8_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, descale: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    backend: str = "auto", dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """Attention of float8 operands, each (B, L, H, D) with a float32 scale per (batch, head) (`descale`, as
    `fp8.quantize_heads` makes them) -> (B, Lq, H, D) in `dtype`. Where `float8_attention_runs`: FlashAttention-3's
    float8 kernel (which also rounds the softmax's probabilities to float8 for their product with V), or
    under "math" the operands' exact values through float32 math."""
    if backend == "math":
        q, k, v = (x.float() * s[:, None, :, None] for x, s in zip((q, k, v), descale, strict=True))
        return _math(q, k, v).to(dtype)
    module = _flash3_module()
    if module is None:
        raise RuntimeError("float8 attention needs FlashAttention-3 (with its float8 kernels) on a Hopper GPU")
    q_scale, k_scale, v_scale = (s.contiguous() for s in descale)
    out = module.flash_attn_func(q, k, v, q_descale=q_scale, k_descale=k_scale, v_descale=v_scale)
    out = out[0] if isinstance(out, tuple) else out
    return out.to(dtype)


def _auto(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """FlashAttention-3 where it is installed and supports the call, else SDPA."""
    return _flash3_attention(q, k, v) if flash3_supports(q, k) else _sdpa(q, k, v)


ATTENTION_BACKENDS: dict[str, AttentionFn] = {"auto": _auto, "sdpa": _sdpa, "math": _math}
if flash3_installed():
    ATTENTION_BACKENDS["flash3"] = _flash3_attention


def backend_names() -> list[str]:
    """The selectable backends, "auto" first: the loader node's and the command line's choices."""
    return ["auto", *sorted(set(ATTENTION_BACKENDS) - {"auto"})]


def register_attention_backend(name: str, fn: AttentionFn) -> None:
    """Make `fn(q, k, v)` (all (B, L, H, D), returns (B, Lq, H, D)) selectable by `name`."""
    ATTENTION_BACKENDS[name] = fn


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """Unmasked multi-head attention: q (B, Lq, H, D), k/v (B, Lk, H, D) -> (B, Lq, H, D)."""
    fn = ATTENTION_BACKENDS.get(backend)
    if fn is None:
        raise ValueError(f"unknown attention backend '{backend}'; available: {', '.join(sorted(ATTENTION_BACKENDS))}")
    return fn(q, k, v)
