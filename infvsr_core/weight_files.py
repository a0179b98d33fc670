"""The four published weight files: what each is, where it is published, and where this machine keeps it.

Search order for a file: the given folders first (the published name, then the same stem with any
accepted suffix), then the local Hugging Face cache (`HF_HUB_CACHE`, else `HF_HOME/hub`, else
`~/.cache/huggingface/hub`) for every Hub repository that publishes it. The cache is only read: nothing
here touches the network; `download.download_weights` (`python -m infvsr_core download`) does, when asked.

No torch here, and huggingface_hub only when the cache is searched, so the command line's `download`
and the nodes' dropdowns stay cheap; `loader` re-exports these names.
"""

from __future__ import annotations

import os
import shlex
from dataclasses import dataclass, replace
from pathlib import Path

from .errors import WeightFileError

INFVSR_HF_REPO = "zzqingz/InfVSR"
"""The Hub repository of InfVSR.ckpt. Taken from the InfVSR README (github.com/Kai-Liu001/InfVSR, "Download the
model": `hf download zzqingz/InfVSR InfVSR.ckpt`); not confirmed by the publisher beyond that README, hence
the environment variable `INFVSR_HF_REPO`, which replaces it."""

DAPE_HF_REPO = "alexnasa/SEESR"
"""The Hub copy of DAPE.pth that the InfVSR README links (pinned below). SeeSR's own release (github.com/cswry/SeeSR)
publishes DAPE.pth on Google Drive and OneDrive only, which huggingface_hub cannot fetch; this repository is a
third party's copy, hence the environment variable `INFVSR_DAPE_HF_REPO`, which replaces it."""


@dataclass(frozen=True)
class HubFile:
    """One place on the Hugging Face Hub that publishes a weight file.

    `revision` pins the commit the InfVSR README links (None: the main branch); `env` names an environment
    variable whose value replaces `repo_id` (and drops the pin), for a repository id that is not confirmed or
    has moved; `note` says where the entry comes from.
    """

    repo_id: str
    filename: str
    revision: str | None = None
    repo_type: str = "model"
    env: str | None = None
    note: str = ""

    def resolved(self) -> HubFile:
        """This entry with the environment's override applied (read now, so a changed environment counts)."""
        override = os.environ.get(self.env, "").strip() if self.env else ""
        if override and override != self.repo_id:
            return replace(self, repo_id=override, revision=None)
        return self

    @property
    def label(self) -> str:
        """`owner/name, file F` as messages show it ("space owner/name" for a Space)."""
        kind = "" if self.repo_type == "model" else f"{self.repo_type} "
        return f"{kind}{self.repo_id}, file {self.filename}"


@dataclass(frozen=True)
class WeightFile:
    """One published file: its name, what it is, and where users get it.

    `hub` lists the Hub repositories that publish it: the first is where `download` fetches it from, and
    all of them are searched in the local Hugging Face cache.
    """

    role: str
    filename: str
    description: str
    source: str
    unwrap: tuple[str, ...] = ()
    hub: tuple[HubFile, ...] = ()

    @property
    def stem(self) -> str:
        return Path(self.filename).stem

    @property
    def hub_files(self) -> tuple[HubFile, ...]:
        """`hub` with the environment's overrides applied."""
        return tuple(h.resolved() for h in self.hub)

    @property
    def hf_repo(self) -> str | None:
        """The repository `download` fetches from (after the environment's override)."""
        return self.hub_files[0].repo_id if self.hub else None

    @property
    def hf_filename(self) -> str | None:
        return self.hub[0].filename if self.hub else None


# The repository table: the one place that says where each file is published. Pinned revisions are the
# commits the InfVSR README links (github.com/Kai-Liu001/InfVSR, "Download the model").
WEIGHT_FILES: dict[str, WeightFile] = {
    "dit": WeightFile(
        "dit",
        "InfVSR.ckpt",
        "the InfVSR causal DiT checkpoint (plain state dict, bf16)",
        f"the InfVSR authors' release (github.com/Kai-Liu001/InfVSR, 'pretrained models': {INFVSR_HF_REPO} "
        "on Hugging Face)",
        hub=(
            HubFile(
                INFVSR_HF_REPO,
                "InfVSR.ckpt",
                env="INFVSR_HF_REPO",
                note="the InfVSR README's `hf download` command; publisher's confirmation pending",
            ),
        ),
    ),
    "vae": WeightFile(
        "vae",
        "Wan2.1_VAE.pth",
        "the original Wan2.1 causal 3D VAE state dict",
        "Wan-AI/Wan2.1-T2V-1.3B on Hugging Face",
        unwrap=("model_state", "state_dict"),
        hub=(
            HubFile(
                "Wan-AI/Wan2.1-T2V-1.3B",
                "Wan2.1_VAE.pth",
                revision="37ec512624d61f7aa208f7ea8140a131f93afc9a",
                note="Wan-AI's release; the commit the InfVSR README links",
            ),
        ),
    ),
    "ram": WeightFile(
        "ram",
        "ram_swin_large_14m.pth",
        "the RAM tagging model ({'model': state dict}); its Swin-L visual encoder and image_proj are used",
        "xinyu1205/recognize_anything_model on Hugging Face (also the Space xinyu1205/recognize-anything)",
        unwrap=("model",),
        hub=(
            HubFile(
                "xinyu1205/recognize_anything_model",
                "ram_swin_large_14m.pth",
                note="the RAM authors' model repository",
            ),
            HubFile(
                "xinyu1205/recognize-anything",
                "ram_swin_large_14m.pth",
                revision="7c76cec1377de0d46df8091a032c4b667aea4459",
                repo_type="space",
                note="the RAM authors' Space; the commit the InfVSR README links",
            ),
        ),
    ),
    "dape": WeightFile(
        "dape",
        "DAPE.pth",
        "the DAPE LoRA for RAM's Swin qkv layers",
        f"the SeeSR release (github.com/cswry/SeeSR: Google Drive / OneDrive; the InfVSR README links the "
        f"Hugging Face copy {DAPE_HF_REPO})",
        hub=(
            HubFile(
                DAPE_HF_REPO,
                "DAPE.pth",
                revision="4059ae0246bf52f5ac5017821bb6e59a6849a758",
                env="INFVSR_DAPE_HF_REPO",
                note="a third party's copy of SeeSR's DAPE.pth; the commit the InfVSR README links",
            ),
        ),
    ),
}

WEIGHT_SUFFIXES = (".safetensors", ".pth", ".ckpt", ".pt", ".bin")
ENV_TRUE = {"1", "ON", "YES", "TRUE"}


def default_models_dir(package_file: str | os.PathLike | None = None) -> Path:
    """`$INFVSR_MODELS`, else ComfyUI's `models/infvsr` when installed in a ComfyUI tree (found from
    `package_file`, this module by default), else `./models/infvsr` if it exists, else `~/.cache/infvsr`."""
    env = os.environ.get("INFVSR_MODELS")
    if env:
        return Path(env).expanduser()
    here = Path(package_file or __file__).resolve()
    for parent in here.parents:
        if parent.name == "custom_nodes":
            return parent.parent / "models" / "infvsr"
    cwd_models = Path.cwd() / "models" / "infvsr"
    if cwd_models.is_dir():
        return cwd_models
    return Path.home() / ".cache" / "infvsr"


def hf_cache_dir() -> Path:
    """The Hugging Face hub cache, by huggingface_hub's own rule, read from the environment now.

    huggingface_hub fixes `constants.HF_HUB_CACHE` when it is imported; reading the variables at each call lets a
    process (or a test) that sets HF_HOME / HF_HUB_CACHE later still be obeyed.
    """
    env = os.environ
    chosen = env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE")
    if not chosen:
        home = env.get("HF_HOME") or os.path.join(
            env.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "huggingface"
        )
        chosen = os.path.join(home, "hub")
    return Path(os.path.expandvars(os.path.expanduser(chosen)))


def hf_offline() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) is set now, or was when huggingface_hub was imported."""
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(name, "").upper() in ENV_TRUE:
            return True
    try:
        from huggingface_hub import constants
    except ImportError:
        return False
    return bool(getattr(constants, "HF_HUB_OFFLINE", False))


def _hf_hub_available() -> bool:
    try:
        import huggingface_hub  # noqa: F401
    except ImportError:
        return False
    return True


def cached_hub_file(hub: HubFile, cache_dir: Path | None = None) -> Path | None:
    """`hub`'s file in the local Hugging Face cache, through huggingface_hub's own look-up; never the network.

    The main branch's snapshot first, then the pinned commit, then any other snapshot of the repository
    (a file fetched at another revision is still the published file), newest first.
    """
    try:
        from huggingface_hub import try_to_load_from_cache
        from huggingface_hub.file_download import repo_folder_name
    except ImportError:
        return None
    cache_dir = Path(cache_dir) if cache_dir is not None else hf_cache_dir()
    snapshots = cache_dir / repo_folder_name(repo_id=hub.repo_id, repo_type=hub.repo_type) / "snapshots"
    if not snapshots.is_dir():
        return None
    revisions = ["main", *([hub.revision] if hub.revision else [])]
    others = sorted(snapshots.iterdir(), key=lambda p: p.stat().st_mtime, reverse=True)
    revisions += [p.name for p in others if p.name not in revisions]
    for revision in revisions:
        try:
            found = try_to_load_from_cache(
                hub.repo_id, hub.filename, cache_dir=cache_dir, revision=revision, repo_type=hub.repo_type
            )
        except (ValueError, OSError):  # a malformed repository id (from an environment override), an unreadable cache
            return None
        if isinstance(found, str) and Path(found).is_file():
            return Path(found)
    return None


def cached_weight(role: str, cache_dir: Path | None = None) -> tuple[HubFile, Path] | None:
    """The repository and cached path of `role`'s file, from the first repository of the table that is cached."""
    for hub in WEIGHT_FILES[role].hub_files:
        found = cached_hub_file(hub, cache_dir)
        if found is not None:
            return hub, found
    return None


def find_in_hf_cache(role: str, cache_dir: Path | None = None) -> Path | None:
    """The file for `role` from any repository that publishes it, in the local Hugging Face cache."""
    found = cached_weight(role, cache_dir)
    return found[1] if found is not None else None


def find_in_folders(role: str, folders: list[Path]) -> Path | None:
    """The file for `role` in the first folder that has it: the published name, then its stem with any suffix."""
    spec = WEIGHT_FILES[role]
    for folder in folders:
        exact = folder / spec.filename
        if exact.is_file():
            return exact
        for suffix in WEIGHT_SUFFIXES:
            candidate = folder / (spec.stem + suffix)
            if candidate.is_file():
                return candidate
    return None


def find_weight_file(role: str, folders: list[Path] | Path, *, hf_cache: bool = True) -> Path:
    """The file for `role`: the given folders first, then (unless `hf_cache=False`) the local Hugging Face cache.

    Raises `WeightFileError` naming the file, every folder searched, the cache and its repositories, where the
    file is published and the command that fetches it.
    """
    folders = [folders] if isinstance(folders, (str, os.PathLike)) else list(folders)
    folders = [Path(f) for f in folders]
    found = find_in_folders(role, folders)
    if found is None and hf_cache:
        found = find_in_hf_cache(role)
    if found is not None:
        return found
    raise WeightFileError(missing_message(role, folders, hf_cache=hf_cache))


def missing_message(role: str, folders: list[Path], *, hf_cache: bool = True) -> str:
    """One line: the file, where it was looked for (folders, cache, repositories), and how to get it."""
    spec = WEIGHT_FILES[role]
    searched = ", ".join(f"'{f.resolve()}'" for f in folders) or "(no folder given)"
    repos = "; ".join(h.label for h in spec.hub_files)
    if not hf_cache:
        cache = ""
    elif _hf_hub_available():
        cache = f" and the Hugging Face cache '{hf_cache_dir()}' ({repos})"
    else:
        cache = " (not the Hugging Face cache: huggingface_hub is not installed)"
    into = shlex.quote(str(folders[0])) if folders else "DIR"
    return (
        f"missing weight file '{spec.filename}' ({spec.description}); searched {searched}{cache}; "
        f"fetch it with `python -m infvsr_core download --models {into} --only {role}`, or download it from "
        f"{spec.source} and put it in one of those folders"
    )
