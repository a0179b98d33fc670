"""Where the weight files are found (folders, then the Hugging Face cache) and the explicit `download`.

No test touches the network: the Hugging Face cache is built in a temporary folder in huggingface_hub's own
layout (checked with its own `try_to_load_from_cache` and `scan_cache_dir`), HF_HUB_OFFLINE is set, and the one
test of a lost connection talks to a closed local port.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from huggingface_hub import scan_cache_dir, try_to_load_from_cache
from huggingface_hub.file_download import repo_folder_name

import nodes
from infvsr_core import cli
from infvsr_core.download import download_weights
from infvsr_core.errors import DownloadError
from infvsr_core.loader import load_pipeline
from infvsr_core.weight_files import (
    WEIGHT_FILES,
    find_in_hf_cache,
    find_weight_file,
    hf_cache_dir,
)
from infvsr_core.weights import WeightFileError
from nodes import comfy
from nodes.model_nodes import fetch_missing
from tests.conftest import make_clip

ROOT = Path(__file__).resolve().parents[1]
FILES = tuple(spec.filename for spec in WEIGHT_FILES.values())


def cache_file(
    cache: Path, repo_id: str, filename: str, source: Path, *, repo_type: str = "model", main: bool = True
) -> Path:
    """Put `source` into `cache` as hf_hub_download leaves a file: blobs/<sha256>, snapshots/<commit>/<file> (a
    relative symlink to the blob, a copy where symlinks are refused) and refs/main -> <commit> (unless `main` is
    False: a file fetched at a pinned commit only)."""
    repo = cache / repo_folder_name(repo_id=repo_id, repo_type=repo_type)
    data = source.read_bytes()
    blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
    commit = hashlib.sha1(f"{repo_id}/{filename}".encode()).hexdigest()
    snapshot = repo / "snapshots" / commit / filename
    blob.parent.mkdir(parents=True, exist_ok=True)
    blob.write_bytes(data)
    snapshot.parent.mkdir(parents=True, exist_ok=True)
    try:
        snapshot.symlink_to(os.path.relpath(blob, snapshot.parent))
    except OSError:
        shutil.copyfile(blob, snapshot)
    if main:
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / "main").write_text(commit)
    # huggingface_hub's own look-up finds it: the layout is the library's
    revision = "main" if main else commit
    found = try_to_load_from_cache(repo_id, filename, cache_dir=cache, revision=revision, repo_type=repo_type)
    assert found == str(snapshot)
    return snapshot


def cache_roles(cache: Path, source: Path, roles=tuple(WEIGHT_FILES)) -> dict[str, Path]:
    """The fixture files of `roles` cached under the first repository of the table that publishes each."""
    paths = {}
    for role in roles:
        spec = WEIGHT_FILES[role]
        hub = spec.hub_files[0]
        paths[role] = cache_file(cache, hub.repo_id, hub.filename, source / spec.filename, repo_type=hub.repo_type)
    return paths


@pytest.fixture
def hf(tmp_path, monkeypatch) -> Path:
    """An empty Hugging Face cache in tmp_path (HF_HUB_CACHE), offline, and an empty default models folder."""
    cache = tmp_path / "hf-hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("INFVSR_MODELS", str(tmp_path / "default-models"))
    return cache


# -- the table -----------------------------------------------------------------------------------------------


def test_repository_table():
    """One table, as data: the repositories and file names `download` and the cache look-up use."""
    table = {role: (spec.hf_repo, spec.hf_filename) for role, spec in WEIGHT_FILES.items()}
    assert table == {
        "dit": ("zzqingz/InfVSR", "InfVSR.ckpt"),
        "vae": ("Wan-AI/Wan2.1-T2V-1.3B", "Wan2.1_VAE.pth"),
        "ram": ("xinyu1205/recognize_anything_model", "ram_swin_large_14m.pth"),
        "dape": ("alexnasa/SEESR", "DAPE.pth"),
    }
    assert all(spec.hub and spec.hub[0].note for spec in WEIGHT_FILES.values())


# -- the Hugging Face cache ------------------------------------------------------------------------------------


def test_cached_files_are_found_in_huggingface_hubs_layout(hf, tiny_models):
    paths = cache_roles(hf, tiny_models)
    scan = scan_cache_dir(hf)
    assert not scan.warnings and len(scan.repos) == 4
    assert {r.repo_id for r in scan.repos} == {spec.hf_repo for spec in WEIGHT_FILES.values()}
    for role, path in paths.items():
        assert find_in_hf_cache(role) == path
        assert find_weight_file(role, [hf.parent / "empty"]) == path


@pytest.mark.parametrize("folder", [None, "empty"])
def test_load_pipeline_takes_the_cached_files(hf, tiny_models, tiny_pipeline, tmp_path, folder):
    """No folder given (the default folder is empty) or an empty folder: all four come from the cache."""
    cache_roles(hf, tiny_models)
    models = None if folder is None else tmp_path / folder
    if models is not None:
        models.mkdir()
    pipe = load_pipeline(models, device="cpu", dtype="fp32")
    clip = make_clip(5, 8, 8)
    assert torch.equal(pipe.upscale(clip, 2), tiny_pipeline.upscale(clip, 2))


def test_folders_come_before_the_cache(hf, tiny_models, tmp_path):
    cached = cache_roles(hf, tiny_models)
    folder = tmp_path / "models"
    folder.mkdir()
    shutil.copy(tiny_models / "DAPE.pth", folder / "DAPE.pth")
    assert find_weight_file("dape", [folder]) == folder / "DAPE.pth"
    assert find_weight_file("dit", [folder]) == cached["dit"]
    with pytest.raises(WeightFileError, match="missing weight file 'InfVSR.ckpt'"):
        find_weight_file("dit", [folder], hf_cache=False)


def test_missing_file_names_the_cache_the_repository_and_the_command(hf, tiny_models, tmp_path):
    with pytest.raises(WeightFileError) as err:
        find_weight_file("ram", [])
    # every repository searched is named, the Space included
    assert "xinyu1205/recognize_anything_model, file" in str(err.value)
    assert "space xinyu1205/recognize-anything, file" in str(err.value)
    folder = tmp_path / "my models"
    cache_roles(hf, tiny_models, roles=("dit", "vae", "ram"))
    with pytest.raises(WeightFileError) as err:
        load_pipeline(folder, device="cpu")
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("missing weight file 'DAPE.pth'")
    assert f"searched '{folder.resolve()}' and the Hugging Face cache '{hf}'" in message
    assert "alexnasa/SEESR, file DAPE.pth" in message and "SeeSR" in message
    assert f"python -m infvsr_core download --models '{folder}' --only dape" in message


def test_cache_also_searches_other_repositories_and_revisions(hf, tiny_models):
    """RAM cached from the Space the InfVSR README links; the VAE fetched at the pinned commit only (no refs/main)."""
    space = WEIGHT_FILES["ram"].hub[1]
    ram = cache_file(hf, space.repo_id, space.filename, tiny_models / "ram_swin_large_14m.pth", repo_type="space")
    assert find_in_hf_cache("ram") == ram
    vae = WEIGHT_FILES["vae"].hub[0]
    pinned = cache_file(hf, vae.repo_id, vae.filename, tiny_models / "Wan2.1_VAE.pth", main=False)
    assert find_in_hf_cache("vae") == pinned
    assert find_in_hf_cache("dit") is None


def test_infvsr_repository_is_overridable(hf, tiny_models, monkeypatch):
    mirror = cache_file(hf, "someone/infvsr-mirror", "InfVSR.ckpt", tiny_models / "InfVSR.ckpt")
    assert find_in_hf_cache("dit") is None
    monkeypatch.setenv("INFVSR_HF_REPO", "someone/infvsr-mirror")
    assert WEIGHT_FILES["dit"].hf_repo == "someone/infvsr-mirror"
    assert find_in_hf_cache("dit") == mirror
    monkeypatch.setenv("INFVSR_DAPE_HF_REPO", "someone/dape-mirror")
    with pytest.raises(WeightFileError, match="someone/dape-mirror, file DAPE.pth"):
        find_weight_file("dape", [])


def test_hf_home_is_respected(monkeypatch, tmp_path, tiny_models):
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    assert hf_cache_dir() == tmp_path / "home" / "hub"
    path = cache_file(
        tmp_path / "home" / "hub", "Wan-AI/Wan2.1-T2V-1.3B", "Wan2.1_VAE.pth", tiny_models / "Wan2.1_VAE.pth"
    )
    assert find_in_hf_cache("vae") == path
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "elsewhere"))
    assert find_in_hf_cache("vae") is None


# -- download ------------------------------------------------------------------------------------------------


def test_download_offline_with_nothing_cached_is_one_line(hf, tmp_path, capsys):
    models = tmp_path / "models"
    assert cli.main(["download", "--models", str(models)]) == 1
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1, captured.err
    assert err[0].startswith(
        "error: cannot download InfVSR.ckpt (zzqingz/InfVSR, file InfVSR.ckpt): the network is "
        "unreachable (offline mode: HF_HUB_OFFLINE is set)"
    )
    assert str(hf) in err[0] and str(models) in err[0]
    assert not models.exists() or not any(models.iterdir())


def test_download_places_cached_files_and_then_reports_them_present(hf, tiny_models, tmp_path, capsys):
    cache_roles(hf, tiny_models)
    models = tmp_path / "models"
    assert cli.main(["download", "--models", str(models)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 5, out
    for line, (role, spec) in zip(out, WEIGHT_FILES.items(), strict=False):
        assert line.startswith(f"{role}: {spec.filename} found in the Hugging Face cache ({spec.hub[0].label})")
        assert str(models / spec.filename) in line and ("hard-linked" in line or "copied" in line)
        assert "KiB" in line or "MiB" in line
        assert (models / spec.filename).read_bytes() == (tiny_models / spec.filename).read_bytes()
    assert out[-1] == f"4 file(s) in {models}: 4 placed now, 0 already there"
    assert load_pipeline(models, device="cpu", dtype="fp32") is not None  # found in the folder now

    assert cli.main(["download", "--models", str(models), "--only", "dape,dit"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"dape: DAPE.pth is already in {models} (") and out[0].endswith("): skipped")
    assert out[1].startswith("dit: InfVSR.ckpt is already in")
    assert out[2] == f"2 file(s) in {models}: 0 placed now, 2 already there"


def test_download_places_what_is_cached_before_failing_on_the_rest(hf, tiny_models, tmp_path, capsys):
    cache_roles(hf, tiny_models, roles=("dit", "vae", "ram"))
    models = tmp_path / "models"
    assert cli.main(["download", "--models", str(models)]) == 1
    captured = capsys.readouterr()
    assert len(captured.out.splitlines()) == 3
    assert captured.err.count("\n") == 1 and "cannot download DAPE.pth (alexnasa/SEESR, file DAPE.pth)" in captured.err
    assert sorted(p.name for p in models.iterdir()) == sorted(FILES[:3])


def test_download_reports_an_unreachable_network(hf, tmp_path, monkeypatch):
    """Not offline, no connection: a closed local port stands for the Hub."""
    import huggingface_hub.constants

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(DownloadError) as err:
        download_weights(tmp_path / "models", ["vae"], endpoint=f"http://127.0.0.1:{port}")
    message = str(err.value)
    assert message.startswith(
        "cannot download Wan2.1_VAE.pth (Wan-AI/Wan2.1-T2V-1.3B, file Wan2.1_VAE.pth): the network is unreachable ("
    )
    assert "\n" not in message


def test_only_takes_known_roles(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["download", "--only", "dit,unet"])
    assert exit_.value.code == 2 and "unet: choose from dit, vae, ram, dape" in capsys.readouterr().err


def test_download_command_needs_neither_torch_nor_huggingface_hub_to_start(tiny_models, tmp_path):
    """--help builds without either; with every file present, the command runs without torch."""
    code = (
        "import sys\n"
        "from infvsr_core import cli\n"
        "cli.build_parser().parse_args(['download'])\n"
        "assert 'torch' not in sys.modules and 'huggingface_hub' not in sys.modules, 'parser'\n"
        f"assert cli.main(['download', '--models', {str(tiny_models)!r}]) == 0\n"
        "assert 'torch' not in sys.modules, 'command'\n"
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "4 file(s) in" in result.stdout


# -- the loader node -------------------------------------------------------------------------------------------


@pytest.fixture
def comfy_models(tmp_path):
    """A models/infvsr stand-in for the nodes, restored afterwards (other tests set their own)."""
    saved = dict(comfy._overrides)
    folder = tmp_path / "comfy-models"
    folder.mkdir()
    comfy.set_directories(models=folder)
    yield folder
    comfy._overrides.clear()
    comfy._overrides.update(saved)


def test_node_dropdowns_list_the_files_that_fit_each_slot(comfy_models):
    for name in (
        "InfVSR.ckpt",
        "old/InfVSR.safetensors",
        "Wan2.1_VAE.pth",
        "ram_swin_large_14m.pth",
        "DAPE.pth",
        "backup/dape.PT",
        "my_finetune.safetensors",
        "notes.txt",
    ):
        (comfy_models / name).parent.mkdir(parents=True, exist_ok=True)
        (comfy_models / name).write_bytes(b"")
    required = nodes.LoadInfVSRModel.INPUT_TYPES()["required"]
    assert required["dit"][0] == ["InfVSR.ckpt", "old/InfVSR.safetensors", "my_finetune.safetensors"]
    assert required["vae"][0] == ["Wan2.1_VAE.pth", "my_finetune.safetensors"]
    assert required["ram"][0] == ["ram_swin_large_14m.pth", "my_finetune.safetensors"]
    assert required["dape"][0] == ["DAPE.pth", "backup/dape.PT", "my_finetune.safetensors"]
    assert "no other slot claims" in required["dit"][1]["tooltip"]
    assert "zzqingz/InfVSR" in required["dit"][1]["tooltip"]
    optional = nodes.LoadInfVSRModel.INPUT_TYPES()["optional"]
    assert list(optional)[-2:] == ["download_missing", "lora"]  # appended last: saved widget values keep places
    assert optional["download_missing"][1]["default"] is False


def test_node_published_names_fall_back_to_the_cache(hf, tiny_models, comfy_models, tiny_pipeline):
    cached = cache_roles(hf, tiny_models)
    required = nodes.LoadInfVSRModel.INPUT_TYPES()["required"]
    assert [required[role][0] for role in WEIGHT_FILES] == [[name] for name in FILES]  # an empty folder
    (model,) = nodes.LoadInfVSRModel().load(*FILES, dtype="fp32")
    assert model.files == cached
    clip = make_clip(5, 8, 8)
    assert torch.equal(model.pipeline.upscale(clip, 2), tiny_pipeline.upscale(clip, 2))
    with pytest.raises(WeightFileError, match="missing weight file 'my_dit.safetensors'"):
        nodes.LoadInfVSRModel().load("my_dit.safetensors", *FILES[1:], download_missing=True)


def test_node_download_missing_uses_the_core_download(hf, tiny_models, comfy_models, monkeypatch):
    cache_roles(hf, tiny_models, roles=("dit", "vae", "ram"))
    with pytest.raises(WeightFileError, match="python -m infvsr_core download .*switch on this node's download_m"):
        nodes.LoadInfVSRModel().load(*FILES, dtype="fp32")  # off by default: nothing fetched
    assert not any(comfy_models.iterdir())
    with pytest.raises(DownloadError, match=r"cannot download DAPE.pth .*network is unreachable"):
        nodes.LoadInfVSRModel().load(*FILES, dtype="fp32", download_missing=True)

    calls = []

    def fake_download(folder, roles, report=None):
        calls.append((Path(folder), list(roles)))
        for role in roles:
            shutil.copy(tiny_models / WEIGHT_FILES[role].filename, Path(folder) / WEIGHT_FILES[role].filename)

    monkeypatch.setattr("nodes.model_nodes.download_weights", fake_download)
    (model,) = nodes.LoadInfVSRModel().load(*FILES, dtype="fp32", download_missing=True)
    assert calls == [(comfy_models, ["dape"])]
    assert model.files["dape"] == comfy_models / "DAPE.pth"
    assert fetch_missing(dict(zip(WEIGHT_FILES, FILES, strict=True))) == []  # nothing left to fetch
