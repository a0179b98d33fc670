"""Loading the four files: formats, dtypes, and every error a user can hit."""

import shutil
from pathlib import Path

import pytest
import torch

from infvsr_core.fixtures import main as fixtures_main
from infvsr_core.fixtures import write_fixtures
from infvsr_core.loader import WEIGHT_FILES, default_models_dir, find_weight_file, load_pipeline
from infvsr_core.weights import WeightFileError
from tests.conftest import make_clip


@pytest.fixture
def models(tiny_models, tmp_path):
    """A private copy of the tiny fixtures that a test may damage."""
    folder = tmp_path / "models"
    shutil.copytree(tiny_models, folder)
    return folder


def test_fixture_files_have_the_published_layout(tiny_models):
    dit = torch.load(tiny_models / "InfVSR.ckpt", weights_only=True)
    assert "blocks.0.self_attn.q.weight" in dit and dit["patch_embedding.weight"].dtype == torch.bfloat16
    assert dit["patch_embedding.weight"].shape == (256, 16, 1, 2, 2)
    vae = torch.load(tiny_models / "Wan2.1_VAE.pth", weights_only=True)
    assert "encoder.conv1.weight" in vae and "decoder.middle.0.residual.0.gamma" in vae and "conv2.weight" in vae
    ram = torch.load(tiny_models / "ram_swin_large_14m.pth", weights_only=True)
    assert set(ram) == {"model"} and "image_proj.weight" in ram["model"]
    dape = torch.load(tiny_models / "DAPE.pth", weights_only=True)
    assert "visual_encoder.layers.0.blocks.0.attn.qkv.lora_A" in dape


def test_fixtures_cli_is_deterministic(tmp_path, capsys):
    fixtures_main([str(tmp_path / "a"), "--tiny", "--seed", "3"])
    write_fixtures(tmp_path / "b", tiny=True, seed=3)
    assert "InfVSR.ckpt" in capsys.readouterr().out
    for spec in WEIGHT_FILES.values():
        a = torch.load(tmp_path / "a" / spec.filename, weights_only=True)
        b = torch.load(tmp_path / "b" / spec.filename, weights_only=True)
        a, b = a.get("model", a), b.get("model", b)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_safetensors_give_the_same_output(tiny_pipeline, tmp_path):
    write_fixtures(tmp_path, tiny=True, seed=0, safetensors=True)
    assert (tmp_path / "InfVSR.safetensors").is_file()
    pipe = load_pipeline(tmp_path, device="cpu", dtype="fp32")
    clip = make_clip(9, 8, 8)
    assert torch.equal(pipe.upscale(clip, 2), tiny_pipeline.upscale(clip, 2))


@pytest.mark.parametrize(
    ("dtype", "expected"), [("bf16", torch.bfloat16), ("fp16", torch.float16), ("fp32", torch.float32)]
)
def test_dtype_choice(tiny_models, dtype, expected):
    pipe = load_pipeline(tiny_models, device="cpu", dtype=dtype)
    assert pipe.dtype == expected
    assert next(pipe.dit.parameters()).dtype == expected
    assert next(pipe.guidance.parameters()).dtype == expected
    if expected == torch.bfloat16:  # fp16 matmuls are slow on CPU; bf16 stands for the half types
        out = pipe.upscale(make_clip(5, 8, 8), 2)
        assert torch.isfinite(out).all()


def test_default_device_and_dtype_on_cpu(tiny_models):
    pipe = load_pipeline(tiny_models)
    assert pipe.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert pipe.dtype == (torch.bfloat16 if torch.cuda.is_available() else torch.float32)
    with pytest.raises(ValueError, match="unknown dtype 'int8'"):
        load_pipeline(tiny_models, dtype="int8")


def test_missing_file_names_file_folder_and_source(models):
    (models / "DAPE.pth").unlink()
    with pytest.raises(WeightFileError) as err:
        load_pipeline(models, device="cpu")
    message = str(err.value)
    assert "DAPE.pth" in message and str(models.resolve()) in message and "SeeSR" in message


def test_missing_file_lists_every_folder_searched(tmp_path):
    with pytest.raises(WeightFileError, match="searched '.*a', '.*b'") as err:
        find_weight_file("dit", [tmp_path / "a", tmp_path / "b"])
    assert "InfVSR.ckpt" in str(err.value) and "Kai-Liu001/InfVSR" in str(err.value)


def test_explicit_missing_path(models):
    with pytest.raises(WeightFileError, match="'nope.pth' not found in folder"):
        load_pipeline(models, vae=models / "nope.pth", device="cpu")


def test_truncated_file(models):
    path = models / "InfVSR.ckpt"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(WeightFileError, match="InfVSR.ckpt' is not a readable PyTorch/safetensors checkpoint"):
        load_pipeline(models, device="cpu")


def test_empty_and_non_checkpoint_files(models):
    (models / "Wan2.1_VAE.pth").write_bytes(b"")
    with pytest.raises(WeightFileError, match="Wan2.1_VAE.pth' is empty"):
        load_pipeline(models, device="cpu")
    (models / "Wan2.1_VAE.pth").write_text("<html>404 Not Found</html>")
    with pytest.raises(WeightFileError, match="Wan2.1_VAE.pth' is not a readable"):
        load_pipeline(models, device="cpu")


def test_not_a_state_dict(models):
    torch.save([1, 2, 3], models / "DAPE.pth")
    with pytest.raises(WeightFileError, match="does not hold a state dict of tensors"):
        load_pipeline(models, device="cpu")


def test_missing_unexpected_and_misshaped_dit_keys(models):
    path = models / "InfVSR.ckpt"
    good = torch.load(path, weights_only=True)

    broken = dict(good)
    del broken["blocks.1.ffn.2.bias"]
    torch.save(broken, path)
    with pytest.raises(WeightFileError, match=r"missing keys \(1\): blocks.1.ffn.2.bias") as err:
        load_pipeline(models, device="cpu")
    assert "InfVSR.ckpt" in str(err.value)

    broken = dict(good, **{"blocks.0.extra.weight": torch.zeros(3)})
    torch.save(broken, path)
    with pytest.raises(WeightFileError, match=r"unexpected keys \(1\): blocks.0.extra.weight"):
        load_pipeline(models, device="cpu")

    broken = dict(good)
    broken["blocks.0.self_attn.o.weight"] = torch.zeros(256, 128)
    torch.save(broken, path)
    with pytest.raises(
        WeightFileError, match=r"blocks.0.self_attn.o.weight: file has \(256, 128\), expected \(256, 256\)"
    ):
        load_pipeline(models, device="cpu")


def test_wrong_file_in_the_dit_slot(models):
    shutil.copy(models / "Wan2.1_VAE.pth", models / "InfVSR.ckpt")
    with pytest.raises(WeightFileError, match="InfVSR.ckpt.*missing key 'patch_embedding.weight'"):
        load_pipeline(models, device="cpu")


def test_default_models_dir_honours_env(monkeypatch, tmp_path):
    monkeypatch.setenv("INFVSR_MODELS", str(tmp_path))
    assert default_models_dir() == tmp_path


def test_default_models_dir_inside_comfyui_then_cwd_then_cache(monkeypatch, tmp_path):
    monkeypatch.delenv("INFVSR_MODELS", raising=False)
    inside = tmp_path / "ComfyUI" / "custom_nodes" / "ComfyUI-InfVSR" / "infvsr_core" / "loader.py"
    assert default_models_dir(inside) == tmp_path / "ComfyUI" / "models" / "infvsr"
    outside = tmp_path / "src" / "infvsr_core" / "loader.py"
    monkeypatch.chdir(tmp_path)
    assert default_models_dir(outside) == Path.home() / ".cache" / "infvsr"
    (tmp_path / "models" / "infvsr").mkdir(parents=True)
    assert default_models_dir(outside) == tmp_path / "models" / "infvsr"
