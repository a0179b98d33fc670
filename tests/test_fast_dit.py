"""The DiT's fused (compiled) elementwise path and the CUDA attention priority, against the eager path (CPU)."""

from __future__ import annotations

import pytest
import torch

import infvsr_core.dit as dit_module
from infvsr_core.attention import CUDA_SDPA_PRIORITY, attention
from infvsr_core.dit import EAGER_OPS, CausalWanDiT, DiTConfig, _Ops, random_dit_state_dict

TINY = DiTConfig.tiny()


@pytest.fixture(scope="module")
def model() -> CausalWanDiT:
    m = CausalWanDiT(TINY).eval()
    sd = random_dit_state_dict(TINY, seed=4, dtype=torch.float32)
    m.load_state_dict({k: v * 10 if k.endswith("modulation") else v for k, v in sd.items()})
    return m


def _two_chunks(model: CausalWanDiT) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    context, t = torch.randn(1, 145, 512, generator=g), torch.tensor([400.0])
    out, cache, offset = [], None, 0
    for _ in range(2):
        latents = torch.randn(1, 16, 3, 6, 8, generator=g)
        pred, cache = model(latents, context, t, time_offset=offset, kv_cache=cache)
        offset += 3
        out += [pred, cache.keys[-1], cache.values[-1]]
    return out


def test_eager_ops_are_the_plain_path(model) -> None:
    """On the CPU the fused path is off by default and the eager ops are used."""
    assert model.fuse_elementwise is None and model._ops(torch.device("cpu")) is EAGER_OPS


@torch.no_grad()
def test_traced_ops_match_eager(model, monkeypatch) -> None:
    """The ops as torch.compile traces them (fullgraph; aot_eager keeps the CPU test cheap) give the eager result."""
    traced = _Ops(lambda fn: torch.compile(fn, backend="aot_eager", fullgraph=True))
    monkeypatch.setattr(dit_module, "_COMPILED_OPS", [traced])
    model.fuse_elementwise = False
    eager = _two_chunks(model)
    model.fuse_elementwise = True
    try:
        fused = _two_chunks(model)
    finally:
        model.fuse_elementwise = None
    for a, b in zip(fused, eager, strict=True):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)


def test_cuda_priority_starts_with_cudnn() -> None:
    assert CUDA_SDPA_PRIORITY[0] == torch.nn.attention.SDPBackend.CUDNN_ATTENTION
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, n, 2, 32, generator=g) for n in (5, 9, 9))
    assert torch.allclose(attention(q, k, v, "sdpa"), attention(q, k, v, "math"), atol=1e-5)



@torch.no_grad()
def test_fused_ffn_matches_the_module() -> None:
    """The fused FFN op equals Wan's Linear -> GELU(tanh) -> Linear (float64: to rounding; bfloat16: no further
    from the float64 result than the module's own bf16 run). Its CUDA branch (cuBLASLt's GELU epilogue) is
    checked on the GPU by bench/check_kernels.py --sections ffn."""
    torch.manual_seed(0)
    ffn = torch.nn.Sequential(torch.nn.Linear(48, 160), torch.nn.GELU(approximate="tanh"), torch.nn.Linear(160, 48))
    x = torch.randn(2, 37, 48) * 3
    reference = ffn.double()(x.double())
    assert torch.allclose(dit_module._ffn_fused_op(ffn, x.double()), reference, rtol=1e-12, atol=1e-12)
    erf = torch.nn.Sequential(ffn[0], torch.nn.GELU(), ffn[2])  # the other GELU would be caught
    assert not torch.allclose(erf(x.double()), reference, rtol=1e-6, atol=1e-6)
    ffn_bf16, x_bf16 = ffn.to(torch.bfloat16), x.to(torch.bfloat16)
    fused = dit_module._ffn_fused_op(ffn_bf16, x_bf16)
    assert fused.shape == x.shape and fused.dtype == torch.bfloat16
    fused_err = (fused.double() - reference).abs().max()
    plain_err = (ffn_bf16(x_bf16).double() - reference).abs().max()
    assert fused_err <= 1.25 * plain_err
