from pathlib import Path

import pytest
import torch

# CI and developer machines have 2 cores: keep the tests from oversubscribing them.
torch.set_num_threads(2)

SHARED = Path(__file__).resolve().parents[2] / "shared"
DATA = SHARED / "data"


@pytest.fixture(autouse=True)
def _triton_never_fell_back():
    """A Triton kernel that fails falls back to PyTorch for good, silently: under the interpreter
    (test_triton_interpreted.py) that would leave the kernels unchecked, so it fails the test instead."""
    yield
    from infvsr_core.kernels import norm_silu

    assert not norm_silu._TRITON_BROKEN, norm_silu._TRITON_BROKEN


@pytest.fixture(autouse=True)
def _no_real_hugging_face_cache(monkeypatch, tmp_path_factory):
    """Weight look-ups fall back to the Hugging Face cache: point it at an empty folder, so a developer's own
    cached weights never change what a test finds, and keep huggingface_hub offline."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path_factory.getbasetemp() / "empty-hf-hub-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for name in ("INFVSR_HF_REPO", "INFVSR_DAPE_HF_REPO"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> Path:
    """The four files in the published formats, tiny configuration, fixed seed."""
    from infvsr_core.fixtures import write_fixtures

    folder = tmp_path_factory.mktemp("tiny_models")
    write_fixtures(folder, tiny=True, seed=0)
    return folder


@pytest.fixture(scope="session")
def tiny_pipeline(tiny_models):
    from infvsr_core.loader import load_pipeline

    return load_pipeline(tiny_models, device="cpu", dtype="fp32")


def make_clip(frames: int, height: int = 12, width: int = 20, seed: int = 0) -> torch.Tensor:
    """A smooth moving pattern with noise, (T, H, W, 3) in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(frames, dtype=torch.float32)[:, None, None]
    y = torch.arange(height, dtype=torch.float32)[None, :, None]
    x = torch.arange(width, dtype=torch.float32)[None, None, :]
    shape = (frames, height, width)
    channels = [torch.sin((x + 0.7 * t) / 3), torch.cos((y - 0.5 * t) / 4), torch.sin((x + y + t) / 5)]
    base = torch.stack([c.expand(shape) for c in channels], -1)
    return ((base + 1) / 2 * 0.8 + 0.2 * torch.rand(frames, height, width, 3, generator=g)).clamp(0, 1)


def smooth_vae_clip(frames: int, seed: int) -> torch.Tensor:
    """VAE input (1, 3, T, 32, 48) in [-1, 1]: random 8x12 frames upsampled, so it has VAE-like content."""
    gen = torch.Generator().manual_seed(seed)
    low = torch.rand(1, 3, frames, 8, 12, generator=gen) * 2 - 1
    return torch.nn.functional.interpolate(low, size=(frames, 32, 48), mode="trilinear")


@pytest.fixture(scope="module")
def bikes() -> torch.Tensor:
    """The first 24 frames of the cut clip (640x272), read once for the io tests."""
    from infvsr_core.io import VideoReader
    from tests.io_media import BIKES

    with VideoReader(BIKES, max_frames=24) as reader:
        return reader.read_all().frames


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("io")
