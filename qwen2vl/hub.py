"""Model names to checkpoint directories: the one resolver behind `--model`,
`Pipeline.from_pretrained` and `load_for_inference`. A directory is taken as is; a Hugging Face
repo id (`Org/Name`) is found in the local hub cache without network, else downloaded through
`huggingface_hub` when it is installed and the network is allowed (HF_HUB_OFFLINE=1 forbids it).

The cache layout is huggingface_hub's, documented in its guide "Manage the cache":
    $HF_HUB_CACHE  (else $HF_HOME/hub, else ~/.cache/huggingface/hub)
      models--Org--Name/refs/main              a commit hash (one file per branch or tag)
      models--Org--Name/snapshots/<commit>/    the files of that commit
Without huggingface_hub that layout is read by hand, read-only; downloading needs the package.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from types import ModuleType

from qwen2vl.errors import CheckpointError, shown

log = logging.getLogger(__name__)

# What qwen2vl reads: config, tokenizer and processor JSON, chat template, safetensors weights.
DOWNLOAD_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model"]
WEIGHTS = ("model.safetensors", "model.safetensors.index.json")
_NAME = r"[A-Za-z0-9](?:[A-Za-z0-9_.-]*[A-Za-z0-9])?"  # the Hub's rule, less its length limit
REPO_ID = re.compile(rf"{_NAME}/{_NAME}")
REVISION = re.compile(r"[A-Za-z0-9_.-]+(?:/[A-Za-z0-9_.-]+)*")  # branches may hold "/": refs/pr/1
COMMIT = re.compile(r"[0-9a-f]{40}")


def resolve_model(
    name_or_path: str | Path, *, revision: str | None = None, download: bool = True
) -> Path:
    """The checkpoint directory for a local directory or a repo id `Org/Name` (at `revision`, the
    default branch when None): from the local cache, else downloaded when `download` allows."""
    path = Path(name_or_path)
    if path.is_dir():
        return path
    repo_id = str(name_or_path)
    if not is_repo_id(repo_id):
        raise CheckpointError(
            f"{shown(repo_id)} is neither a directory nor a Hugging Face repo id (Org/Name); "
            "pass a checkpoint directory or a repo id such as Qwen/Qwen2-VL-2B-Instruct"
        )
    if revision is not None and (".." in revision or not REVISION.fullmatch(revision)):
        raise CheckpointError(f"revision {shown(revision)} is not a branch, tag or commit name")
    cache, hub = hub_cache_dir(), _import_hub()
    found = _cached_snapshot(hub, repo_id, revision, cache)
    if found is not None:
        return found
    if hub is None or not download or offline():
        raise _not_cached(repo_id, revision, cache, hub is None)
    return _download(hub, repo_id, revision, cache)


def is_repo_id(name: str) -> bool:
    """`Org/Name` with the Hub's characters; refuses `..`, `--`, absolute and deeper paths."""
    return bool(REPO_ID.fullmatch(name)) and ".." not in name and "--" not in name


def hub_cache_dir() -> Path:
    """Where huggingface_hub keeps repos, read from the environment now (its own constants are
    read once at import, so a later change of HF_HOME would otherwise go unseen)."""
    hub_cache = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if hub_cache:
        return Path(os.path.expandvars(hub_cache)).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or "~/.cache"
    home = os.environ.get("HF_HOME") or os.path.join(xdg, "huggingface")
    return Path(os.path.expandvars(home)).expanduser() / "hub"


def offline() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) set true, as huggingface_hub reads it."""
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.upper() in {"1", "ON", "YES", "TRUE"}


def is_checkpoint(path: Path) -> bool:
    """A snapshot counts only with its config and safetensors weights (a partial download or a
    repo with only pytorch_model.bin does not)."""
    return (path / "config.json").is_file() and any((path / w).is_file() for w in WEIGHTS)


def _import_hub() -> ModuleType | None:
    try:
        import huggingface_hub
    except ImportError:
        return None
    return huggingface_hub


def _cached_snapshot(
    hub: ModuleType | None, repo_id: str, revision: str | None, cache: Path
) -> Path | None:
    if hub is None:
        snapshot = _snapshot_by_hand(repo_id, revision, cache)
    else:
        try:
            snapshot = Path(
                hub.snapshot_download(
                    repo_id,
                    revision=revision,
                    cache_dir=cache,
                    local_files_only=True,
                    allow_patterns=DOWNLOAD_PATTERNS,
                )
            )
        except FileNotFoundError:  # LocalEntryNotFoundError: not cached (or known incomplete)
            return None
    return snapshot if snapshot is not None and is_checkpoint(snapshot) else None


def _snapshot_by_hand(repo_id: str, revision: str | None, cache: Path) -> Path | None:
    """The layout in the module docstring, read without huggingface_hub."""
    repo = cache / _repo_folder(repo_id)
    revision = revision or "main"
    if COMMIT.fullmatch(revision) and (repo / "snapshots" / revision).is_dir():
        return repo / "snapshots" / revision
    ref = repo / "refs" / revision
    if not ref.is_file():
        return None
    commit = ref.read_text().strip()
    return repo / "snapshots" / commit if COMMIT.fullmatch(commit) else None


def _download(hub: ModuleType, repo_id: str, revision: str | None, cache: Path) -> Path:
    log.info("downloading %s into %s", repo_id, cache)
    try:
        path = hub.snapshot_download(
            repo_id, revision=revision, cache_dir=cache, allow_patterns=DOWNLOAD_PATTERNS
        )
    # Broad on purpose: the Hub's errors, and its HTTP stack's (httpx or requests by version),
    # all end here as one message instead of a traceback.
    except Exception as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"could not download {_at(repo_id, revision)} into {cache}: {shown(reason, 300)}; "
            f"check the name and the network, or pass a local checkpoint directory"
        ) from e
    if not is_checkpoint(Path(path)):
        raise CheckpointError(
            f"{_at(repo_id, revision)} downloaded to {path} has no config.json with "
            f"{' or '.join(WEIGHTS)}; qwen2vl reads only safetensors checkpoints"
        )
    return Path(path)


def _not_cached(repo_id: str, revision: str | None, cache: Path, no_hub: bool) -> CheckpointError:
    looked = (
        f"no directory {repo_id!r}, and no complete snapshot of {_at(repo_id, revision)} "
        f"(config.json + safetensors weights) in the Hugging Face cache "
        f"{cache / _repo_folder(repo_id)}"
    )
    if no_hub:
        how = "to download it, `pip install huggingface_hub` and rerun"
    elif offline():
        how = f"HF_HUB_OFFLINE is set: unset it and rerun to download, or {_fetch(repo_id)}"
    else:
        how = _fetch(repo_id)
    return CheckpointError(f"{looked}; {how}; or pass a local checkpoint directory")


def _fetch(repo_id: str) -> str:
    return f"fetch it with `hf download {repo_id}` (`huggingface-cli download` on older versions)"


def _repo_folder(repo_id: str) -> str:
    return "models--" + repo_id.replace("/", "--")


def _at(repo_id: str, revision: str | None) -> str:
    return repo_id if revision is None else f"{repo_id}@{revision}"
