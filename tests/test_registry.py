"""The Comfy Registry metadata in pyproject.toml, and that the pack's requirements never pin torch."""

from pathlib import Path

try:
    import tomllib  # Python 3.11+
except ModuleNotFoundError:  # Python 3.10: the same parser, from requirements-dev.txt
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]


def test_comfy_registry_metadata():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    project, comfy = meta["project"], meta["tool"]["comfy"]
    assert project["name"] and project["version"] and project["description"] and project["license"]
    assert project["urls"]["Repository"].startswith("https://")
    assert comfy["PublisherId"] and comfy["DisplayName"] and comfy["Icon"].startswith("https://")
    for folder in comfy["includes"]:
        assert (ROOT / folder).is_dir(), folder
    assert (ROOT / "web" / "icon.svg").is_file()


def test_no_torch_requirement_that_could_replace_a_users_build():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    listed = [line.split("#")[0].strip() for line in (ROOT / "requirements.txt").read_text().splitlines()]
    for requirement in [*meta["project"]["dependencies"], *listed]:
        name = requirement.split(">")[0].split("=")[0].split("<")[0].strip().lower()
        assert name not in {"torch", "torchvision", "torchaudio"}, requirement
