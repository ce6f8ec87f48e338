"""Resolving models to snapshots: commits, listings, the stored snapshots, offline answers."""

import pytest

from vfs import errors
from vfs.hub import Hub
from vfs.manifest import parse_manifest
from vfs.settings import Settings
from vfs.snapshots import SnapshotStore

MANIFEST = """
models:
  single:
    path: /models/single/model.gguf
    backend: llama.cpp
    hf: org/repo
    file: weights/m.gguf
  folder:
    path: /models/folder/
    backend: vllm
    hf: org/repo
    include: ["weights/*"]
    exclude: ["*.bin"]
"""


@pytest.fixture
def repo(hub):
    first = hub.add_repo("org/repo", files={"weights/m.gguf": b"GGUF" + b"\0" * 100,
                                            "weights/extra.bin": b"x" * 10, "README.md": b"hi"})
    return first


def hub_for(endpoint, tmp_path):
    settings = Settings(endpoint=endpoint, cache_dir=tmp_path / "cache", max_retries=1, read_deadline=5)
    return Hub(settings, SnapshotStore(settings.cache_dir))


def specs(text=MANIFEST):
    return {spec.name: spec for spec in parse_manifest(text).models}


def test_a_single_file_model_resolves_to_the_commit_with_size_and_content_id(hub, repo, tmp_path):
    snapshot = hub_for(hub.endpoint, tmp_path).resolve(specs()["single"])
    assert snapshot.commit == repo
    (only,) = snapshot.files
    assert (only.path, only.size) == ("weights/m.gguf", 104)
    assert only.content_id.startswith("sha256:") and len(only.content_id) == 7 + 64


def test_a_directory_model_keeps_only_what_include_and_exclude_select(hub, repo, tmp_path):
    snapshot = hub_for(hub.endpoint, tmp_path).resolve(specs()["folder"])
    assert [f.path for f in snapshot.files] == ["weights/m.gguf"]


def test_small_files_are_named_by_git_blob_sha1(hub, tmp_path):
    hub.add_repo("org/small", files={"config.json": b"{}\n"})
    spec = specs("models:\n  s:\n    path: /models/s/\n    backend: vllm\n    hf: org/small\n")["s"]
    (config,) = hub_for(hub.endpoint, tmp_path).resolve(spec).files
    assert config.content_id == "sha1:" + __import__("hashlib").sha1(b"blob 3\0{}\n").hexdigest()


def test_a_branch_stays_resolved_offline_and_moves_when_online(hub, repo, tmp_path):
    spec = specs()["single"]
    hub_for(hub.endpoint, tmp_path).resolve(spec)
    moved = hub.add_commit("org/repo", files={"weights/m.gguf": b"GGUF v2"})
    offline = hub_for(hub.endpoint, tmp_path).resolve(spec, online=False)
    assert offline.commit == repo
    online = hub_for(hub.endpoint, tmp_path).resolve(spec)
    assert online.commit == moved and online.files[0].size == 7


def test_an_unreachable_hub_falls_back_to_the_stored_snapshot(hub, repo, tmp_path):
    spec = specs()["single"]
    endpoint = hub.endpoint
    hub_for(endpoint, tmp_path).resolve(spec)
    hub.stop()
    fallback = hub_for(endpoint, tmp_path)
    assert fallback.resolve(spec).commit == repo
    assert fallback.reachable is False


def test_a_commit_revision_needs_no_hub_once_seen(hub, repo, tmp_path):
    spec = specs(MANIFEST.replace("    file: weights/m.gguf", f"    file: weights/m.gguf\n    revision: {repo}"))["single"]
    hub_for(hub.endpoint, tmp_path).resolve(spec)
    hub.clear_log()
    assert hub_for(hub.endpoint, tmp_path).resolve(spec).commit == repo
    assert hub.log == []


def test_never_resolved_and_offline_is_a_clear_error(hub, repo, tmp_path):
    endpoint = hub.endpoint
    hub.stop()
    with pytest.raises(errors.HubUnreachable, match="model 'single'.*Hub unreachable"):
        hub_for(endpoint, tmp_path).resolve(specs()["single"])


@pytest.mark.parametrize("change, error, message", [
    ("hf: org/repo", errors.RepoNotFound, "model 'single': org/nope@main: repository not found"),
    ("file: weights/m.gguf", errors.EntryNotFound, "model 'single': file 'weights/none.gguf' is not in org/repo"),
])
def test_missing_repos_and_files_name_the_model(hub, repo, tmp_path, change, error, message):
    replacement = {"hf: org/repo": "hf: org/nope", "file: weights/m.gguf": "file: weights/none.gguf"}[change]
    spec = specs(MANIFEST.replace(change, replacement, 1))["single"]
    with pytest.raises(error) as failure:
        hub_for(hub.endpoint, tmp_path).resolve(spec)
    assert message in str(failure.value)


def test_an_unknown_revision_names_the_model(hub, repo, tmp_path):
    spec = specs(MANIFEST.replace("    file: weights/m.gguf", "    file: weights/m.gguf\n    revision: v9"))["single"]
    with pytest.raises(errors.RevisionNotFound, match="model 'single': org/repo@v9: revision 'v9' not found"):
        hub_for(hub.endpoint, tmp_path).resolve(spec)
