"""Repo ids resolve from a Hugging Face cache built on disk here, in huggingface_hub's layout
(refs/<branch> -> snapshots/<commit>/, files linked to blobs/); nothing touches the network."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
from tiny_qwen2vl import tiny_real_vocab_checkpoint

import qwen2vl
from qwen2vl.default_model import model_or_default
from qwen2vl.errors import CheckpointError
from qwen2vl.generation.pipeline import Pipeline
from qwen2vl.hub import DOWNLOAD_PATTERNS, resolve_model

MAIN, V1 = "a" * 40, "b" * 40


def add_snapshot(cache: Path, repo_id: str, commit: str, files: Path, ref: str | None = "main"):
    """Cache `files` as `commit` of `repo_id` the way huggingface_hub does; `ref` names it."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir(exist_ok=True)
    for f in files.iterdir():
        blob = repo / "blobs" / f"{commit[:8]}-{f.name}"
        shutil.copy(f, blob)
        (snapshot / f.name).symlink_to(blob)
    if ref is not None:
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    return snapshot


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return tiny_real_vocab_checkpoint(tmp_path_factory.mktemp("ckpt"))


@pytest.fixture
def cache(tmp_path, monkeypatch, checkpoint):
    """HF_HUB_CACHE with Org/Name at main and at branch v1; offline."""
    cache = tmp_path / "hub"
    for var in ("HF_HOME", "HUGGINGFACE_HUB_CACHE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    add_snapshot(cache, "Org/Name", MAIN, checkpoint)
    add_snapshot(cache, "Org/Name", V1, checkpoint, ref="v1")
    return cache


@pytest.fixture
def no_hub(monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import raises ImportError


def test_repo_id_resolves_to_the_snapshot_main_points_at(cache):
    assert resolve_model("Org/Name") == cache / "models--Org--Name/snapshots" / MAIN
    assert model_or_default("Org/Name") == resolve_model("Org/Name")


def test_revision_selects_a_branch_or_a_commit(cache):
    snapshots = cache / "models--Org--Name/snapshots"
    assert resolve_model("Org/Name", revision="v1") == snapshots / V1
    assert resolve_model("Org/Name", revision=V1) == snapshots / V1


def test_existing_directory_is_returned_as_is(cache, checkpoint):
    assert resolve_model(checkpoint) == checkpoint
    assert resolve_model(str(checkpoint)) == checkpoint


def test_hf_home_locates_the_cache_when_hub_cache_is_unset(cache, monkeypatch):
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.setenv("HF_HOME", str(cache.parent))
    assert resolve_model("Org/Name") == cache / "models--Org--Name/snapshots" / MAIN


def test_cached_repo_loads_as_a_model(cache):
    model = qwen2vl.load_model(resolve_model("Org/Name"), dtype="float32")
    assert isinstance(model, qwen2vl.Qwen2VL)


def test_pipeline_from_pretrained_takes_a_repo_id(cache):
    pipe = Pipeline.from_pretrained("Org/Name", dtype="float32")
    reply = pipe.chat([{"role": "user", "content": "hi"}], max_new_tokens=2)
    assert isinstance(reply, str)


def test_missing_repo_names_the_repo_and_the_cache_dir(cache):
    with pytest.raises(CheckpointError) as err:
        resolve_model("Org/Missing")
    message = str(err.value)
    assert "Org/Missing" in message and str(cache / "models--Org--Missing") in message
    assert "HF_HUB_OFFLINE" in message and "hf download Org/Missing" in message


@pytest.mark.parametrize("name", ["../x", "/abs", "a/../b", "Org/", "a/b/c", "Org/Na me", "x--y/z"])
def test_bad_ids_are_refused(cache, name):
    with pytest.raises(CheckpointError, match="neither a directory nor"):
        resolve_model(name)


def test_bad_revision_is_refused(cache):
    with pytest.raises(CheckpointError, match="revision"):
        resolve_model("Org/Name", revision="../../etc")


@pytest.mark.parametrize("hub_installed", [True, False])
def test_snapshot_without_weights_is_not_a_checkpoint(
    cache, checkpoint, tmp_path, monkeypatch, hub_installed
):
    if not hub_installed:
        monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    only_config = tmp_path / "only_config"
    only_config.mkdir()
    shutil.copy(checkpoint / "config.json", only_config)
    add_snapshot(cache, "Org/Partial", MAIN, only_config)
    with pytest.raises(CheckpointError, match="Org/Partial"):
        resolve_model("Org/Partial")


def test_without_huggingface_hub_the_cache_is_read_by_hand(cache, no_hub):
    snapshots = cache / "models--Org--Name/snapshots"
    assert resolve_model("Org/Name") == snapshots / MAIN
    assert resolve_model("Org/Name", revision="v1") == snapshots / V1
    assert resolve_model("Org/Name", revision=V1) == snapshots / V1
    with pytest.raises(CheckpointError, match="pip install huggingface_hub") as err:
        resolve_model("Org/Missing")
    assert str(cache / "models--Org--Missing") in str(err.value)


def test_download_goes_through_huggingface_hub_for_what_qwen2vl_reads(
    cache, checkpoint, monkeypatch
):
    hub = pytest.importorskip("huggingface_hub")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    calls = []

    def snapshot_download(repo_id, *, revision, cache_dir, allow_patterns, local_files_only=False):
        calls.append((repo_id, local_files_only, allow_patterns))
        if local_files_only:
            raise hub.errors.LocalEntryNotFoundError("not cached")
        return str(add_snapshot(Path(cache_dir), repo_id, V1, checkpoint))

    monkeypatch.setattr(hub, "snapshot_download", snapshot_download)
    path = resolve_model("Org/New")
    assert path == cache / "models--Org--New/snapshots" / V1
    assert calls == [("Org/New", True, DOWNLOAD_PATTERNS), ("Org/New", False, DOWNLOAD_PATTERNS)]
    assert not any("bin" in p or "pytorch" in p for p in DOWNLOAD_PATTERNS)
    with pytest.raises(CheckpointError, match="hf download Org/Other"):
        resolve_model("Org/Other", download=False)


def test_network_failure_is_a_checkpoint_error(cache, monkeypatch):
    hub = pytest.importorskip("huggingface_hub")
    monkeypatch.delenv("HF_HUB_OFFLINE")

    def snapshot_download(repo_id, *, local_files_only=False, **kwargs):
        raise (hub.errors.LocalEntryNotFoundError if local_files_only else ConnectionError)("down")

    monkeypatch.setattr(hub, "snapshot_download", snapshot_download)
    with pytest.raises(CheckpointError, match="could not download Org/New.*down"):
        resolve_model("Org/New")
