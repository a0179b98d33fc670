"""fp8: the DiT's matrix products with float8 operands, an opt-in precision (`dtype="fp8"`).

Why: GPUs with fp8 tensor cores (Ada, Hopper, Blackwell) multiply float8
matrices at twice the bf16 rate, and float8 weights take half the memory. In
the DiT the blocks' linear layers change (attention projections and the FFN,
where the work is) and, where FlashAttention-3 runs float8 (Hopper), the
self-attention's operands; norms, modulation, embeddings and the output head
keep their bf16/fp32 arithmetic. (The VAE's float8 convolutions are
vae/fp8_convs.py's.)

Scales: a weight is quantized per output channel (row) and an activation per
token (row), each row's largest magnitude mapped to float8_e4m3fn's largest
finite value, so one outlier channel or token costs only its own row's
precision. The product `(x / sx) @ (w / sw).T * sx * sw.T` is PyTorch's scaled
matrix product with row-wise scales, accumulating in float32. Where the GPU
has no fp8 tensor cores (or on the CPU), the weights stay float8 in memory and
are expanded to the compute dtype per layer call: the memory is saved, the
speed is that of the compute dtype.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)
WEIGHT_SCALE_SUFFIX = ".weight_scale"
"""A quantized weight `NAME.weight` (float8) has its per-row scales in `NAME.weight_scale` (float32, (out, 1))."""
QUANTIZED_LINEARS = ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o", "cross_attn.q", "cross_attn.o",
                     "ffn.0", "ffn.2")
"""The linears of a DiT block that take fp8: every product over the video's tokens. The cross-attention's k and v
project the visual prompt's few tokens (no speed to gain, and every query reads them), so they stay bf16."""

FLOAT8_ATTENTION = True
"""Whether an fp8 DiT's self-attention runs in float8 where FlashAttention-3 can (measured faster at every size,
the fidelity target kept: bench/RESULTS.md round 17)."""


def to_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """float8 of x / scale, saturated at the format's largest finite value and rounded to nearest even: the one
    rounding every quantization here uses (a Triton pass that writes float8 must agree with it). x is multiplied
    by the scale's float32 reciprocal, as the VAE norm's float8 store and cast kernel do, so that every pass
    stores the same bytes (a quotient could round apart from the product, by one float8 step)."""
    return (x.float() * scale.to(x.device, torch.float32).reciprocal()).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def scale_for(amax: torch.Tensor) -> torch.Tensor:
    """The float8 scale that maps a largest magnitude `amax` (float32) to the format's largest finite value; 1
    where amax is 0, so that zeros dequantize to zeros rather than dividing by zero."""
    return torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (..., K) -> (float8 values of x / scale, float32 scale (..., 1)): each row's largest magnitude maps to the
    format's largest finite value (an all-zero row gets scale 1 rather than 0, so it dequantizes to zeros)."""
    scale = scale_for(x.detach().abs().amax(dim=-1, keepdim=True).float())
    values = to_fp8(x, scale)
    return values, scale


def quantize_heads(*parts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention operands (B, L_i, H, D), joined along the tokens -> (float8 values (B, sum L_i, H, D), float32
    scale (B, H)): one scale per batch and head, the form a float8 attention kernel takes (its "descale"), from the
    operand's extremes (the DiT's values; its queries and keys have `normed_head_scale`). Joining here (the previous
    chunk's values and this chunk's) lets a compiled caller write the float8 operand with no bf16 copy of the
    whole."""
    x = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
    scale = scale_for(x.detach().abs().amax(dim=(1, 3)).float())
    return to_fp8(x, scale[:, None, :, None]), scale


# Headroom over the bound below for the roundings between the norm and the rotation (bf16 at the norm's output and
# its weight's product, float32 rotation rounded to bf16: each well under 1 %).
NORMED_BOUND_MARGIN = 1.02


def normed_head_scale(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """A float8 scale per head (heads,) for an RMSNorm over the full width with `weight`, then a rotation of pairs
    (RoPE), that no input can exceed: the normalized vector's squares sum to the width, so no element (nor a
    rotated pair) passes sqrt(width) times the head's largest |weight|. Known before the data, it needs no pass
    over it (queries and keys quantize in the pass that norms them); it costs no precision to the format's normal
    values, whose relative spacing does not depend on the scale."""
    bound = weight.detach().float().abs().unflatten(0, (heads, -1)).amax(dim=1) * math.sqrt(weight.shape[0])
    return scale_for(bound * NORMED_BOUND_MARGIN)


def dequantize_rows(values: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The inverse of `quantize_rows`, in `dtype`."""
    return (values.float() * scale).to(dtype)


def fp8_matmul_supported(device: torch.device) -> bool:
    """Whether `device` multiplies float8 matrices natively (CUDA compute capability 8.9 and up)."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    return torch.cuda.get_device_capability(device) >= (8, 9)


class FP8Linear(nn.Module):
    """A linear layer whose weight is stored in float8 with per-output-channel scales.

    `native`: None (default) multiplies in fp8 where the device can (`fp8_matmul_supported`); False always
    expands the weight to the input's dtype (the path for GPUs without fp8 cores); True always multiplies in fp8.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, dtype: torch.dtype = torch.bfloat16,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=FP8_DTYPE, device=device))
        self.register_buffer("weight_scale", torch.ones(out_features, 1, dtype=torch.float32, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False) if bias \
            else None
        self.native: bool | None = None

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> FP8Linear:
        """The fp8 form of `linear` (its weight quantized per output channel; its bias kept in its dtype)."""
        weight = linear.weight.detach()
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, weight.dtype, weight.device)
        layer.weight, layer.weight_scale = quantize_rows(weight)
        if linear.bias is not None:
            layer.bias.data = linear.bias.detach().clone()
        return layer

    def dequantized_weight(self, dtype: torch.dtype) -> torch.Tensor:
        return dequantize_rows(self.weight, self.weight_scale, dtype)

    def _native(self, x: torch.Tensor) -> bool:
        if self.native is not None:
            return self.native  # forced (True also runs the scaled product where PyTorch has a CPU kernel: tests)
        if x.dtype not in (torch.bfloat16, torch.float16):
            return False
        # The scaled product needs both inner and outer sizes to be multiples of 16.
        return fp8_matmul_supported(x.device) and self.in_features % 16 == 0 and self.out_features % 16 == 0

    def _bias(self, dtype: torch.dtype) -> torch.Tensor | None:
        return self.bias if self.bias is None or self.bias.dtype == dtype else self.bias.to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._native(x):
            return F.linear(x, self.dequantized_weight(x.dtype), self._bias(x.dtype))
        flat = x.reshape(-1, self.in_features)
        return self.forward_quantized(quantize_rows(flat), x.dtype).view(*x.shape[:-1], self.out_features)

    def forward_quantized(self, x: tuple[torch.Tensor, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        """The scaled product of an input already quantized per row (`quantize_rows` of (M, K)): layers that
        read the same input (q, k, v) quantize it once. Returns (M, out_features) in `dtype`.

        Fast accumulation (Hopper's fp8 tensor cores promote their partial sums to float32 less often): the
        error it adds is far below the operands' own fp8 rounding (bench/RESULTS.md, the fp8 round)."""
        values, scale = x[0], x[1]
        return torch._scaled_mm(
            values,
            self.weight.t(),
            scale_a=scale,
            scale_b=self.weight_scale.t(),
            bias=self._bias(dtype),
            out_dtype=dtype,
            use_fast_accum=True,
        )

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, fp8"


class Quantized(NamedTuple):
    """An activation quantized per row where it was made (the compiled norm that produces it, one pass): float8
    values (M, K), float32 scales (M, 1), and the shape and dtype of the tensor it stands for."""

    values: torch.Tensor
    scale: torch.Tensor
    shape: torch.Size
    dtype: torch.dtype


def takes_fp8(layer: nn.Module, x: torch.Tensor) -> bool:
    """Whether `layer` multiplies x natively in fp8 (then its input may be handed over `Quantized`)."""
    return isinstance(layer, FP8Linear) and layer._native(x)


def _quantized(x: torch.Tensor | Quantized, quantize) -> Quantized:
    if isinstance(x, Quantized):
        return x
    values, scale = (quantize or quantize_rows)(x.reshape(-1, x.shape[-1]))
    return Quantized(values, scale, x.shape, x.dtype)


def project(layers: tuple[nn.Module, ...], x: torch.Tensor | Quantized, quantize=None) -> list[torch.Tensor]:
    """Each of `layers` applied to x; fp8 layers that multiply natively share one quantization of x (`quantize`:
    the compiled `quantize_rows` of the caller's ops, default the eager one), or take x already `Quantized`."""
    if not isinstance(x, Quantized) and not all(takes_fp8(layer, x) for layer in layers):
        return [layer(x) for layer in layers]
    q = _quantized(x, quantize)
    return [layer.forward_quantized(q, q.dtype).view(*q.shape[:-1], layer.out_features) for layer in layers]


# The tanh GELU's minimum: where it is (it falls below, rises above) and a bound on its magnitude there.
GELU_ARGMIN, GELU_MIN_BOUND = -0.7518, 0.1701
GELU_TANH_2C = 2 * math.sqrt(2 / math.pi)  # 2u = GELU_TANH_2C * (x + 0.044715 x^3)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """Wan's tanh GELU, 0.5 x (1 + tanh u), in float32, written as x * sigmoid(2u) (the same function): compiled,
    an exponential where the tanh form computes a tanh, the FFN quantization's largest cost
    (bench/check_dit_quantize.py times it). Its values agree with F.gelu(approximate="tanh") to float32 rounding."""
    x = x.float()
    return x * torch.sigmoid(GELU_TANH_2C * (x + 0.044715 * x * x * x))


def gelu_row_scale(h: torch.Tensor) -> torch.Tensor:
    """The float8 scale per row (..., 1) of `gelu_tanh(h)`, from the row's extremes alone: the GELU rises on
    [GELU_ARGMIN, inf), so its largest value over a row is gelu(max), and its most negative is gelu(min) where
    min >= GELU_ARGMIN, at most GELU_MIN_BOUND in magnitude otherwise. No element passes it (it may exceed the
    row's true largest magnitude when every entry is small, which costs nothing: float8 keeps its relative
    precision over a range of 2**14); the compiled pass finds it without computing the GELU twice."""
    top = gelu_tanh(h.amax(dim=-1, keepdim=True))
    low = h.amin(dim=-1, keepdim=True).float()
    under = torch.where(low < GELU_ARGMIN, torch.full_like(low, GELU_MIN_BOUND), -gelu_tanh(low))
    return scale_for(torch.maximum(top, under))


def gelu_quantize_rows(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Wan's tanh GELU of h (..., K) as float8 values and float32 scales per row (`gelu_row_scale`): the FFN's
    hidden activations go straight to the down projection's fp8 operand (compiled, one pass over the FFN's
    largest tensor)."""
    scale = gelu_row_scale(h)
    return to_fp8(gelu_tanh(h), scale), scale


def ffn_fp8(ffn: nn.Sequential, x: torch.Tensor | Quantized, quantize=None, gelu_quantize=None) -> torch.Tensor:
    """Wan's FFN (up, tanh GELU, down) with fp8 products: x quantized once (or handed over `Quantized`), the
    GELU fused with the hidden activations' quantization (`quantize`, `gelu_quantize`: the caller's compiled
    ops, default eager)."""
    up, _, down = ffn
    if not isinstance(x, Quantized) and not (takes_fp8(up, x) and takes_fp8(down, x)):
        return ffn(x)
    q = _quantized(x, quantize)
    hidden = up.forward_quantized(q, q.dtype)
    out = down.forward_quantized((gelu_quantize or gelu_quantize_rows)(hidden), q.dtype)
    return out.view(*q.shape[:-1], down.out_features)


def _quantizable(blocks: nn.Module) -> Iterator[tuple[nn.Module, str, nn.Linear]]:
    """(parent, attribute, linear) of every linear `QUANTIZED_LINEARS` names, in every block."""
    for block in blocks:
        for path in QUANTIZED_LINEARS:
            owner_path, _, attribute = path.rpartition(".")
            owner = block.get_submodule(owner_path)
            layer = owner[int(attribute)] if isinstance(owner, nn.Sequential) else getattr(owner, attribute)
            yield owner, attribute, layer


def set_float8_attention(dit: nn.Module, on: bool) -> nn.Module:
    """Whether the DiT's self-attention takes float8 operands where a kernel runs them (dit.SelfAttention)."""
    for block in dit.blocks:
        block.self_attn.float8_attention = on
    dit.graphs.clear()
    return dit


def quantize_dit(dit: nn.Module) -> nn.Module:
    """Replace the DiT blocks' `QUANTIZED_LINEARS` by `FP8Linear`s, in place (quantizing their weights), and set
    its self-attention's precision to `FLOAT8_ATTENTION`."""
    for owner, attribute, layer in list(_quantizable(dit.blocks)):
        if isinstance(layer, nn.Linear):
            _replace(owner, attribute, FP8Linear.from_linear(layer))
    return set_float8_attention(dit, FLOAT8_ATTENTION)


def is_fp8_state_dict(state: dict[str, torch.Tensor]) -> bool:
    """Whether a DiT state dict is an fp8 copy (`save_fp8_dit`): float8 weights with their scales."""
    return any(k.endswith(WEIGHT_SCALE_SUFFIX) for k in state)


def prepare_for_fp8_state(dit: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Give `dit` the fp8 layers (empty) so that an fp8 copy's state dict loads into it."""
    for owner, attribute, layer in list(_quantizable(dit.blocks)):
        if isinstance(layer, nn.Linear):
            fp8 = FP8Linear(layer.in_features, layer.out_features, layer.bias is not None, dtype,
                            layer.weight.device if layer.weight.device.type != "meta" else "cpu")
            _replace(owner, attribute, fp8)
    return set_float8_attention(dit, FLOAT8_ATTENTION)


def _replace(owner: nn.Module, attribute: str, layer: nn.Module) -> None:
    if isinstance(owner, nn.Sequential):
        owner[int(attribute)] = layer
    else:
        setattr(owner, attribute, layer)


def cast_except_fp8(module: nn.Module, device: torch.device | str, dtype: torch.dtype) -> nn.Module:
    """`module.to(device, dtype)` that leaves float8 weights and their float32 scales in their own dtypes
    (Module.to would cast every floating-point tensor)."""
    for sub in module.modules():
        keep = isinstance(sub, FP8Linear)
        for param in sub.parameters(recurse=False):
            param.data = param.data.to(device=device, dtype=dtype)
        for name, buf in list(sub.named_buffers(recurse=False)):
            target = buf.dtype if keep and name in ("weight", "weight_scale") else dtype
            if not buf.is_floating_point():
                target = buf.dtype
            sub._buffers[name] = buf.to(device=device, dtype=target)
    return module
