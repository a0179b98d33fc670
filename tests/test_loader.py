"""Loading the four files: formats, dtypes, and every error a user can hit."""

import json
import pickle
import shutil
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch

from infvsr_core.dit import DiTConfig
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
    with pytest.raises(WeightFileError, match="InfVSR.ckpt' is truncated or corrupt") as err:
        load_pipeline(models, device="cpu")
    assert "download it again from" in str(err.value) and "Kai-Liu001/InfVSR" in str(err.value)
    assert "miniz" not in str(err.value)  # torch's reason, first sentence only


def test_corrupt_zip_checkpoint(models):
    """The zip's central directory (at the end) overwritten: the file is the right size but unreadable."""
    path = models / "Wan2.1_VAE.pth"
    data = bytearray(path.read_bytes())
    data[-200:] = b"\xff" * 200
    path.write_bytes(bytes(data))
    with pytest.raises(WeightFileError, match="Wan2.1_VAE.pth' is truncated or corrupt") as err:
        load_pipeline(models, device="cpu")
    assert "download it again from Wan-AI/Wan2.1-T2V-1.3B" in str(err.value)


def test_truncated_legacy_pickle(models):
    """The pre-zip torch.save format (still found in old releases) cut in half."""
    path = models / "DAPE.pth"
    torch.save(torch.load(path, weights_only=True), path, _use_new_zipfile_serialization=False)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(WeightFileError, match="DAPE.pth' is truncated or corrupt") as err:
        load_pipeline(models, device="cpu")
    assert "download it again from the SeeSR release" in str(err.value)


def test_legacy_pickle_still_loads(models, tiny_pipeline):
    path = models / "DAPE.pth"
    torch.save(torch.load(path, weights_only=True), path, _use_new_zipfile_serialization=False)
    pipe = load_pipeline(models, device="cpu", dtype="fp32")
    frame = make_clip(1, 8, 8)[0]
    assert torch.equal(pipe.extract_prompt(frame), tiny_pipeline.extract_prompt(frame))


def test_empty_and_non_checkpoint_files(models):
    (models / "Wan2.1_VAE.pth").write_bytes(b"")
    with pytest.raises(WeightFileError, match="Wan2.1_VAE.pth' is empty"):
        load_pipeline(models, device="cpu")
    (models / "Wan2.1_VAE.pth").write_text("<html>404 Not Found</html>")
    with pytest.raises(WeightFileError, match="Wan2.1_VAE.pth' is not a readable PyTorch checkpoint") as err:
        load_pipeline(models, device="cpu")
    assert "'<html>404 Not Found</html>'" in str(err.value) and "web page" in str(err.value)
    assert "download it again" in str(err.value)


@pytest.fixture
def safetensors_models(tmp_path):
    folder = tmp_path / "st"
    write_fixtures(folder, tiny=True, seed=0, safetensors=True)
    return folder


def test_truncated_safetensors(safetensors_models):
    path = safetensors_models / "InfVSR.safetensors"
    full = path.stat().st_size
    path.write_bytes(path.read_bytes()[: full // 2])
    with pytest.raises(WeightFileError) as err:
        load_pipeline(safetensors_models, device="cpu")
    message = str(err.value)
    assert "InfVSR.safetensors' is truncated" in message
    assert f"{full // 2:,} bytes, its header promises {full:,}" in message
    assert "download it again from" in message and "SafetensorError" not in message


def test_not_a_safetensors_file(safetensors_models):
    """Truncated inside the header (or any other file renamed): no size to promise, the loader's reason instead."""
    path = safetensors_models / "DAPE.safetensors"
    path.write_bytes(path.read_bytes()[:20])
    with pytest.raises(WeightFileError, match="DAPE.safetensors' is truncated or not a safetensors file") as err:
        load_pipeline(safetensors_models, device="cpu")
    assert "download it again from the SeeSR release" in str(err.value) and "promises" not in str(err.value)


class _RunsCode:
    """Unpickling this runs print('x') through exec: what a malicious checkpoint does with something worse.
    (exec, not print itself: Ray's shutdown replaces builtins.print, which other tests' jobs run.)"""

    def __reduce__(self):
        return (exec, ("print('x')",))


class _CustomModule:
    """A pickled object of a user class, as torch.save(model) writes (instead of model.state_dict())."""

    def __init__(self) -> None:
        self.weight = torch.zeros(2)


@pytest.mark.parametrize(
    ("payload", "named"), [(_RunsCode(), "'exec'"), (_CustomModule(), f"'{_CustomModule.__module__}._CustomModule'")]
)
def test_pickle_with_code_is_refused_without_running_it(models, capfd, payload, named):
    torch.save({"visual_encoder.layers.0.blocks.0.attn.qkv.lora_A": payload}, models / "DAPE.pth")
    with pytest.raises(WeightFileError) as err:
        load_pipeline(models, device="cpu")
    message = str(err.value)
    assert "DAPE.pth' is not a plain state dict: it contains Python objects other than tensors" in message
    assert f"(it refers to {named})" in message
    assert "InfVSR will not execute code from a weight file" in message
    assert "use the published file, or, if you trust where this one came from, convert it to .safetensors" in message
    assert "weights_only=False" not in message and "weights_only" not in message
    assert "x" not in capfd.readouterr().out


def test_plain_pickle_is_refused(models):
    """pickle.dump instead of torch.save: the safe loader cannot read it, and it is not retried unsafely."""
    with open(models / "DAPE.pth", "wb") as f:
        pickle.dump({"a": torch.zeros(2)}, f, protocol=4)
    with pytest.warns(UserWarning, match="pickle protocol"), pytest.raises(WeightFileError) as err:
        load_pipeline(models, device="cpu")
    message = str(err.value)
    assert "DAPE.pth' is not a PyTorch state dict that can be read safely" in message
    assert "convert this one to .safetensors" in message and "weights_only" not in message


def _config_json(folder: Path, config: DiTConfig) -> Path:
    path = folder / "config.json"
    path.write_text(json.dumps({"model_type": "t2v", **asdict(config)}))
    return path


def test_matching_config_json_is_used(models, tiny_pipeline):
    _config_json(models, DiTConfig.tiny())
    assert load_pipeline(models, device="cpu", dtype="fp32").dit.config == tiny_pipeline.dit.config


def test_malformed_config_json(models):
    (models / "config.json").write_text('{"dim": 256,\n "ffn_dim": 512,,\n}')
    with pytest.raises(WeightFileError) as err:
        load_pipeline(models, device="cpu")
    message = str(err.value)
    assert message.startswith(f"{models / 'config.json'}: not valid JSON (line 2, column 17: Expecting property name")
    assert message.endswith("fix or delete it (without it the DiT's size is inferred from InfVSR.ckpt)")
    (models / "config.json").unlink()
    load_pipeline(models, device="cpu")  # the advice holds


@pytest.mark.parametrize(
    ("text", "found"),
    [
        ("[256, 512]", "not a DiT config object (AttributeError"),
        ('{"dim": "large"}', "'dim' is 'large', expected a positive number"),
        ('{"patch_size": [1, 2]}', "'patch_size' is (1, 2), expected three positive integers"),
        ('{"dim": 256', "not valid JSON (line 1, column 12"),
    ],
)
def test_config_json_that_is_no_config(models, text, found):
    (models / "config.json").write_text(text)
    with pytest.raises(WeightFileError) as err:
        load_pipeline(models, device="cpu")
    assert str(err.value).startswith(f"{models / 'config.json'}: {found}")
    assert "fix or delete it (without it the DiT's size is inferred from InfVSR.ckpt)" in str(err.value)


def test_config_json_that_does_not_match_the_checkpoint_is_blamed(models):
    _config_json(models, replace(DiTConfig.tiny(), dim=512, num_heads=4))
    with pytest.raises(WeightFileError) as err:
        load_pipeline(models, device="cpu")
    message = str(err.value)
    assert message.startswith(f"{models / 'config.json'}: this config.json does not match the DiT checkpoint")
    assert f"'{models / 'InfVSR.ckpt'}'" in message
    assert "it says dim=512 where the checkpoint has dim=256" in message
    assert "InfVSR.ckpt has patch_embedding.weight of shape (256, 16, 1, 2, 2), config.json implies (512, 16" in message
    assert "fix config.json or delete it (without it the DiT's size is inferred from InfVSR.ckpt)" in message


def test_broken_checkpoint_is_still_blamed_with_a_config_json(models):
    """A right config.json and a damaged checkpoint: the checkpoint is named, as without config.json."""
    _config_json(models, DiTConfig.tiny())
    path = models / "InfVSR.ckpt"
    broken = torch.load(path, weights_only=True)
    del broken["blocks.1.ffn.2.bias"]
    torch.save(broken, path)
    with pytest.raises(WeightFileError, match=r"InfVSR.ckpt'\) does not match .* missing keys \(1\): blocks.1.ffn"):
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
