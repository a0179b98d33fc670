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
