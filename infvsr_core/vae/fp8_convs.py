"""Which of the VAE's causal convs run in float8 under `dtype="fp8"`, how, and their float reference.

Why a module of its own: the fast forward (fast_blocks.py) runs these convs
through the float8 kernel (kernels/fp8_conv.py), and the fidelity checks and
tests make diffusers' plain VAE compute the same convs on the same
float8-rounded operands (`emulate_fp8_convs`), where no float8 kernel runs.
Both take their convs from one predicate (`fp8_candidate`).
"""

from __future__ import annotations

import torch
from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d, WanResidualBlock, WanRMS_norm
from torch import nn

from ..derived import derived
from ..fp8 import dequantize_rows, quantize_rows, to_fp8
from ..kernels.fp8_conv import (
    CHANNEL_MULTIPLE,
    fp8_conv,
    fp8_conv_usable,
    pack_fp8_conv_weight,
    pack_fp8_row_weight,
    quantize_staged,
    row_taps_fit,
    static_activation_scale,
)

# The conv widths whose float8 form beats cuDNN's bf16: every tier once the 96-channel taps run as one padded
# 128-deep block (bench/RESULTS.md round 16).
FP8_CONV_OUTPUTS = frozenset({96, 192, 384})


def fp8_candidate(conv: nn.Module, norm: nn.Module | None, widths: frozenset[int]) -> bool:
    """Whether `conv` runs in float8 for `fp8_conv_outputs=widths` (where the kernel runs): a causal 3x3x3 conv of
    one of those output widths, with input channels the kernel takes, fed by a norm + SiLU (whose gamma bounds
    the input: `static_activation_scale`)."""
    return (
        norm is not None
        and isinstance(conv, WanCausalConv3d)
        and conv.out_channels in widths
        and conv.in_channels % CHANNEL_MULTIPLE == 0
        and conv.kernel_size == (3, 3, 3)
    )


def takes_fp8(conv: nn.Module, buf: torch.Tensor, norm: nn.Module | None, widths: frozenset[int]) -> bool:
    """`fp8_candidate`, and the kernel takes this staged buffer here (device, shape, layout)."""
    return fp8_candidate(conv, norm, widths) and fp8_conv_usable(conv, buf)


def conv_fp8(
    conv: WanCausalConv3d,
    buf: torch.Tensor,
    norm: WanRMS_norm,
    bias: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    *,
    next_norm: WanRMS_norm | None = None,
    act: torch.Tensor | None = None,
    tail: torch.Tensor | None = None,
    row_taps: bool = False,
) -> torch.Tensor | None:
    """conv(buf) + bias [+ residual] in float8 (buf: the causal conv's staged input, channels-last, in the
    model's dtype or already in float8 with `input_scale(norm)`), the additions in the kernel's epilogue, into
    `out` (new, in the model's dtype, if None); None where no kernel configuration runs (the caller takes its
    float path).

    With `next_norm` (a resblock's first conv, `holds_pixel`): SiLU(next_norm(result)) goes in float8, with
    `input_scale(next_norm)`, into `act` (the next conv's staged frames) and its last 2 frames in the model's
    dtype into `tail` (that conv's cache entry); the result itself is never stored (fp8_conv's `gamma`).
    `row_taps`: where the taps are padded, the row form (`FastForwardOptions.fp8_row_taps`)."""
    values, scale = quantize_staged(buf, input_scale(norm))
    packed, weight_scale = derived(conv, "_infvsr_fp8", pack_fp8_conv_weight)
    rows = derived(conv, "_infvsr_fp8_rows", pack_fp8_row_weight) if row_taps and row_taps_fit(buf.shape[1]) else None
    normed = {}
    if next_norm is not None:
        normed = {"gamma": scaled_gamma(next_norm), "act": act, "act_scale": input_scale(next_norm), "tail": tail}
    return fp8_conv(values, scale, packed, weight_scale, bias, residual, out=out, out_dtype=conv.weight.dtype,
                    row_packed=rows, **normed)  # fmt: skip


def scaled_gamma(norm: WanRMS_norm) -> torch.Tensor:
    """The norm's gamma x scale in float32 (Cout,): what the kernels that write a norm's output multiply by."""
    return derived(norm, "_infvsr_gamma_scaled", lambda gamma: gamma.reshape(-1).float() * norm.scale, source="gamma")


def input_scale(norm: WanRMS_norm) -> torch.Tensor:
    """The float8 scale of this norm's output: from its gamma, no pass over the data (`static_activation_scale`:
    a norm's output is bounded by its gamma)."""

    def build(gamma: torch.Tensor) -> torch.Tensor:
        return static_activation_scale(gamma, gamma.numel(), norm.bias)

    return derived(norm, "_infvsr_fp8_scale", build, source="gamma")


def staged_values(values: torch.Tensor, norm: WanRMS_norm) -> torch.Tensor:
    """Float8 values that `norm`'s output was stored as (a staged buffer, a cache entry) back to what they stand
    for, in float32: values x `input_scale(norm)`. Where a float8-staged input meets the float path."""
    return values.float() * input_scale(norm)


def _pairs(vae: nn.Module, widths: frozenset[int]) -> list[tuple[WanCausalConv3d, WanRMS_norm]]:
    """The (conv, the norm that makes its input) pairs of diffusers' VAE that `fp8_candidate` takes: the
    resblocks' two convs and the heads'."""
    pairs = []
    for module in vae.modules():
        if isinstance(module, WanResidualBlock):
            pairs += [(module.conv1, module.norm1), (module.conv2, module.norm2)]
        elif isinstance(getattr(module, "conv_out", None), WanCausalConv3d) and hasattr(module, "norm_out"):
            pairs.append((module.conv_out, module.norm_out))
    return [(conv, norm) for conv, norm in pairs if fp8_candidate(conv, norm, widths)]


def emulate_fp8_convs(vae: nn.Module, widths: frozenset[int]) -> int:
    """Make diffusers' VAE (in place) compute the convs that `fp8_conv_outputs=widths` runs in float8 on the same
    float8-rounded operands in its own dtype: weights per output channel, inputs with their norm's static scale
    (PyTorch's rounding). The float8 kernel's reference, and a fidelity check where no float8 kernel runs (a
    CPU). Returns the number of convs changed."""
    pairs = _pairs(vae, widths)
    for conv, norm in pairs:
        values, scales = quantize_rows(conv.weight.detach().reshape(conv.out_channels, -1))
        conv.weight.data = dequantize_rows(values, scales, conv.weight.dtype).reshape(conv.weight.shape)
        scale = static_activation_scale(norm.gamma, norm.gamma.numel(), norm.bias)

        def rounded(x: torch.Tensor | None, scale: torch.Tensor = scale) -> torch.Tensor | None:
            if not isinstance(x, torch.Tensor):
                return x
            return (to_fp8(x, scale).float() * scale).to(x.dtype)

        def forward(x, cache_x=None, _forward=conv.forward, _rounded=rounded):
            return _forward(_rounded(x), _rounded(cache_x))

        conv.forward = forward
    return len(pairs)
