"""Fetching the published weight files, only when asked: `python -m infvsr_core download` and the loader node's
`download_missing` toggle both call `download_weights`.

Nothing here runs on import or while loading. For each file: already in the folder, it is left alone; in the
local Hugging Face cache, it is hard-linked (else copied) into the folder, with no network; otherwise it is
fetched with huggingface_hub's `hf_hub_download` into the folder (interrupted downloads resume from
`<folder>/.cache/huggingface/download`). No torch here.
"""

from __future__ import annotations

import os
import shutil
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from .errors import DownloadError, UsageError
from .weight_files import (
    WEIGHT_FILES,
    HubFile,
    WeightFile,
    cached_weight,
    find_in_folders,
    hf_cache_dir,
    hf_offline,
)

Report = Callable[[str], None]

# Exception class names (anywhere in an exception's MRO) that mean "no connection": httpx/httpx2 name their
# transport errors so, requests its ConnectionError; huggingface_hub has used all three over its versions.
_NETWORK_NAMES = {"TransportError", "NetworkError", "TimeoutException", "ProxyError", "ConnectionError", "Timeout"}


@dataclass(frozen=True)
class Fetched:
    """What `download_weights` did for one file: `how` is "present", "hard-linked", "copied" or "downloaded"."""

    role: str
    path: Path
    how: str
    source: str
    size: int | None


def download_weights(
    models_dir: str | os.PathLike,
    roles: Iterable[str] | None = None,
    *,
    report: Report | None = None,
    endpoint: str | None = None,
) -> list[Fetched]:
    """Make sure `models_dir` holds the files of `roles` (default: all four); says what it does through `report`.

    Files already there are skipped and cached ones placed first, so an offline run still places every
    cached file before it fails on the first one it would have to fetch. Raises `DownloadError` (one line:
    the file, its repository, why) when a file cannot be fetched; the files placed before it stay.
    """
    roles = list(roles) if roles is not None else list(WEIGHT_FILES)
    unknown = [r for r in roles if r not in WEIGHT_FILES]
    if unknown:
        raise UsageError(f"unknown weight file role(s) {', '.join(unknown)}; choose from {', '.join(WEIGHT_FILES)}")
    folder = Path(models_dir).expanduser()
    say = report or (lambda line: None)
    done: list[Fetched] = []
    remote: list[str] = []
    for role in roles:
        spec = WEIGHT_FILES[role]
        present = find_in_folders(role, [folder])
        if present is not None:
            size = present.stat().st_size
            say(f"{role}: {present.name} is already in {folder} ({size_text(size)}): skipped")
            done.append(Fetched(role, present, "present", str(folder), size))
            continue
        cached = cached_weight(role)
        if cached is None:
            remote.append(role)
            continue
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / spec.filename
        how = _place(cached[1], target)
        size = target.stat().st_size
        label = cached[0].label
        say(
            f"{role}: {spec.filename} found in the Hugging Face cache ({label}): {how} into {target} "
            f"({size_text(size)})"
        )
        done.append(Fetched(role, target, how, label, size))
    for role in remote:
        done.append(_fetch(WEIGHT_FILES[role], folder, say, endpoint))
    return done


def size_text(size: int | None) -> str:
    """Bytes as people read them (GiB, MiB, KiB); "size unknown" for None."""
    if size is None:
        return "size unknown"
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size >= scale:
            return f"{size / scale:.2f} {unit}"
    return f"{size} bytes"


def _place(cached: Path, target: Path) -> str:
    """Hard-link the cached file's blob to `target` (no extra disk space), else copy it; atomic either way."""
    source = cached.resolve()
    partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
    try:
        try:
            os.link(source, partial)
            how = "hard-linked"
        except OSError:  # another file system, or one without hard links
            shutil.copyfile(source, partial)
            how = "copied"
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    return how


def _fetch(spec: WeightFile, folder: Path, say: Report, endpoint: str | None) -> Fetched:
    """Download `spec` from the first of its repositories that has it."""
    hubs = spec.hub_files
    if not hubs:
        raise DownloadError(
            f"{spec.filename} is not published on Hugging Face: download it from {spec.source} and put it in '{folder}'"
        )
    if hf_offline():
        raise DownloadError(_unreachable(spec, hubs[0], folder, "offline mode: HF_HUB_OFFLINE is set"))
    try:
        from huggingface_hub import hf_hub_download
    except ImportError as exc:
        raise DownloadError(
            f"cannot download {spec.filename}: huggingface_hub is not installed (pip install huggingface_hub), "
            f"or download it from {spec.source} and put it in '{folder}'"
        ) from exc
    absent: list[str] = []
    for hub in hubs:
        size = _remote_size(spec, hub, folder, endpoint)
        say(
            f"{spec.role}: downloading {spec.filename} from {hub.label}"
            f"{f' at {hub.revision[:12]}' if hub.revision else ''} ({size_text(size)}) into {folder}"
        )
        folder.mkdir(parents=True, exist_ok=True)
        try:
            got = Path(
                hf_hub_download(
                    hub.repo_id,
                    hub.filename,
                    revision=hub.revision,
                    repo_type=hub.repo_type,
                    local_dir=folder,
                    endpoint=endpoint,
                )
            )
        except Exception as exc:  # noqa: BLE001 - every failure becomes one line naming the file and repository
            kind, why = _classify(exc)
            if kind == "absent":
                absent.append(f"{hub.label}: {why}")
                continue
            if kind == "network":
                raise DownloadError(_unreachable(spec, hub, folder, why)) from exc
            raise DownloadError(
                f"cannot download {spec.filename} from {hub.label}: {why}; or download it from {spec.source} "
                f"and put it in '{folder}'"
            ) from exc
        target = folder / spec.filename
        if got.resolve() != target.resolve():  # a repository that keeps the file in a subfolder
            os.replace(got, target)
        size = target.stat().st_size
        say(f"{spec.role}: saved {target} ({size_text(size)})")
        return Fetched(spec.role, target, "downloaded", hub.label, size)
    raise DownloadError(
        f"cannot download {spec.filename}: {'; '.join(absent)}; download it from {spec.source} and put it in '{folder}'"
    )


def _remote_size(spec: WeightFile, hub: HubFile, folder: Path, endpoint: str | None) -> int | None:
    """The file's size on the Hub (best effort: None when the Hub does not say); no connection raises."""
    try:
        from huggingface_hub import HfApi

        infos = HfApi(endpoint=endpoint).get_paths_info(
            hub.repo_id, [hub.filename], revision=hub.revision, repo_type=hub.repo_type
        )
    except Exception as exc:  # noqa: BLE001 - only a lost connection matters here; hf_hub_download reports the rest
        kind, why = _classify(exc)
        if kind == "network":
            raise DownloadError(_unreachable(spec, hub, folder, why)) from exc
        return None
    sizes = [getattr(info, "size", None) for info in infos]
    return next((s for s in sizes if isinstance(s, int)), None)


def _unreachable(spec: WeightFile, hub: HubFile, folder: Path, why: str) -> str:
    return (
        f"cannot download {spec.filename} ({hub.label}): the network is unreachable ({why}) and the file is not in "
        f"the Hugging Face cache '{hf_cache_dir()}'; run this where the network is reachable "
        f"(with HF_HUB_OFFLINE unset), or download it from {spec.source} and put it in '{folder}'"
    )


def _chain(exc: BaseException) -> list[BaseException]:
    """The exception and its causes, outermost first."""
    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and all(current is not seen for seen in chain):
        chain.append(current)
        current = current.__cause__ or current.__context__
    return chain


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:300]}" if text else type(exc).__name__


def _classify(exc: BaseException) -> tuple[str, str]:
    """("network" | "absent" | "refused" | "other", a short reason) for a huggingface_hub failure."""
    chain = _chain(exc)
    names = [{cls.__name__ for cls in type(e).__mro__} for e in chain]
    if any("OfflineModeIsEnabled" in mro for mro in names):
        return "network", "offline mode: HF_HUB_OFFLINE is set"
    for e, mro in zip(chain, names, strict=True):
        if mro & _NETWORK_NAMES or isinstance(e, (ConnectionError, TimeoutError, socket.gaierror)):
            return "network", _one_line(e)
    first, mro = chain[0], names[0]
    if "GatedRepoError" in mro:
        return "refused", "the repository is gated: accept its terms on huggingface.co and log in (`hf auth login`)"
    if "LocalEntryNotFoundError" in mro:  # hf_hub_download's word for "could not reach the Hub"
        return "network", "the Hub could not be reached"
    if mro & {"RepositoryNotFoundError", "RevisionNotFoundError", "EntryNotFoundError", "RemoteEntryNotFoundError"}:
        return "absent", "not found there (repository, revision or file)"
    status = getattr(getattr(first, "response", None), "status_code", None)
    if status in (401, 403):
        return "refused", f"access refused (HTTP {status}): log in with `hf auth login`"
    return "other", _one_line(first)
