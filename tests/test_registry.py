"""The Comfy Registry metadata in pyproject.toml (the registry's formats, one repository or its marked
placeholder, what the package ships, `comfy node validate`), and that the pack's requirements never pin torch."""

import os
import re
import shutil
import subprocess
from pathlib import Path
from urllib.parse import urlparse

import pytest

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


PLACEHOLDER = "REPLACE-WITH-PUBLISHER"
# The registry's version requirement: [operator]major.minor.patch[-suffix], comma-separated parts.
REQUIREMENT = re.compile(r"^(==|>=|<=|!=|~=|>|<|<>|=)?\s*\d+\.\d+\.\d+(-[A-Za-z0-9]+)?$")


def _meta() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_version_and_comfyui_requirement_in_the_registry_format():
    meta = _meta()
    assert re.fullmatch(r"\d+\.\d+\.\d+", meta["project"]["version"])
    requirement = meta["tool"]["comfy"]["requires-comfyui"]
    assert all(REQUIREMENT.match(part.strip()) for part in requirement.split(",")), requirement
    assert "0.3.64" in requirement  # the version tests/test_comfy_integration.py runs


def test_urls_name_one_repository_and_no_guess():
    """Repository, Documentation, Issues and Icon point at one GitHub repository: the publisher's, or, until they
    publish, the marked placeholder that the README tells them to replace (never a repository we guessed)."""
    meta = _meta()
    urls = dict(meta["project"]["urls"])
    urls["Icon"] = meta["tool"]["comfy"]["Icon"]
    repositories = set()
    for name, url in urls.items():
        parsed = urlparse(url)
        assert parsed.scheme == "https", (name, url)
        parts = parsed.path.strip("/").split("/")
        if parsed.netloc == "raw.githubusercontent.com":
            assert parts[3:] == ["web", "icon.svg"], url  # the icon this pack ships
        else:
            assert parsed.netloc == "github.com", url
        repositories.add("/".join(parts[:2]))
    assert len(repositories) == 1, repositories
    (repository,) = repositories
    publisher = meta["tool"]["comfy"]["PublisherId"]
    if any("replace-with-publisher" in v.lower() for v in (repository, publisher)):
        readme = (ROOT / "README.md").read_text()
        assert PLACEHOLDER in readme and publisher in readme
        assert "comfy node publish" in readme


def test_includes_ship_the_frontend_workflows_and_thumbnails():
    includes = _meta()["tool"]["comfy"]["includes"]
    shipped = [ROOT / "web" / "infvsr.js", ROOT / "web" / "icon.svg"]
    for workflow in sorted((ROOT / "workflows").glob("*.json")):
        shipped += [workflow, workflow.with_suffix(".jpg")]
    for path in shipped:
        relative = path.relative_to(ROOT).as_posix()
        assert path.is_file(), relative
        assert any(relative == i or relative.startswith(i.rstrip("/") + "/") for i in includes), relative


COMFY_CLI = os.environ.get("COMFY_CLI") or shutil.which("comfy")


@pytest.mark.skipif(not COMFY_CLI, reason="comfy-cli (pip install comfy-cli; or COMFY_CLI=path) is not installed")
def test_comfy_node_validate_passes_without_warnings():
    """What `comfy node publish` checks before it uploads; offline. A warning means a field the registry drops."""
    done = subprocess.run([COMFY_CLI, "--skip-prompt", "--no-enable-telemetry", "node", "validate"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert "warning" not in output.lower() and "error" not in output.lower(), output
