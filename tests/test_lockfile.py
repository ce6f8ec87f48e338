"""models.lock: deterministic, resolved from with no Hub call, --frozen, --upgrade, /refresh keeps it."""

import json
import socket
import subprocess
import sys
import urllib.request

import pytest
import yaml

from conftest import needs_fuse
from vfs.testing.mounts import isolated_environment

MANIFEST = """# the fleet's models
models:
  tiny:
    path: /models/tiny/model.gguf
    backend: llama.cpp
    hf: org/tiny
    file: m.gguf
  folder:
    path: /models/folder/
    backend: vllm
    hf: org/folder
    include: ["*.json", "b/*"]
  also-tiny:
    path: /models/also-tiny/model.gguf
    backend: llama.cpp
    hf: org/tiny
    file: m.gguf
"""

EXTRA = """  late:
    path: /models/late/
    backend: vllm
    hf: org/folder
"""


@pytest.fixture
def workspace(hub, tmp_path):
    hub.add_repo("org/tiny", files={"m.gguf": b"GGUF v1"})
    hub.add_repo("org/folder", files={"config.json": b"{}", "b/z.json": b"[1]", "b/a.bin": b"x", "c.txt": b"c"})
    (tmp_path / "models.yaml").write_text(MANIFEST)
    return tmp_path


def run_cli(workspace, hub, *args, check=True, cache="cache", endpoint=None):
    command = [sys.executable, "-m", "vfs", *args, "-m", str(workspace / "models.yaml"),
               "--cache-dir", str(workspace / cache), "--endpoint", endpoint or hub.endpoint]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120,
                            env=isolated_environment(workspace))
    if check:
        assert result.returncode == 0, result.stderr
    return result


def resolve_requests(hub):
    """Requests that resolve (resolve a revision, list a tree): content reads are not counted."""
    return [r.path for r in hub.log if r.origin == "api" and ("/revision/" in r.path or "/tree/" in r.path)]


def test_lock_is_deterministic_sorted_one_file_a_line_and_valid_yaml(workspace, hub):
    run_cli(workspace, hub, "lock")
    text = (workspace / "models.lock").read_text()
    (workspace / "models.lock").unlink()
    run_cli(workspace, hub, "lock")
    assert (workspace / "models.lock").read_text() == text
    document = yaml.safe_load(text)
    assert document == json.loads(text)
    assert list(document["models"]) == ["also-tiny", "folder", "tiny"]
    folder = document["models"]["folder"]
    assert [f["path"] for f in folder["files"]] == ["b/a.bin", "b/z.json", "config.json"]
    assert folder["select"] == {"include": ["*.json", "b/*"]} and folder["revision"] == "main"
    assert sum('"path": ' in line for line in text.splitlines()) == 5      # one file per line
    print(text)


def test_under_a_lock_list_and_pull_resolve_with_no_hub_call_and_keep_the_locked_commit(workspace, hub):
    run_cli(workspace, hub, "lock")
    locked = json.loads((workspace / "models.lock").read_text())["models"]["tiny"]["commit"]
    hub.add_commit("org/tiny", files={"m.gguf": b"GGUF v2, moved on"})
    hub.clear_log()
    listed = {m["name"]: m for m in json.loads(run_cli(workspace, hub, "list", "--json").stdout)}
    assert listed["tiny"]["commit"] == locked and listed["tiny"]["size"] == len(b"GGUF v1")
    run_cli(workspace, hub, "pull", "tiny")
    assert resolve_requests(hub) == []
    assert any(locked in r.path for r in hub.log)         # the bytes came from the locked commit


def test_wait_judges_a_locked_model_at_its_locked_commit(workspace, hub):
    run_cli(workspace, hub, "lock", cache="cache-of-the-locker")
    run_cli(workspace, hub, "pull", "tiny", cache="cache")        # resolved from the lock: no ref stored
    no_hub = "http://127.0.0.1:9"
    result = run_cli(workspace, hub, "wait", "tiny", "--cached", "--timeout", "5", endpoint=no_hub)
    assert result.stdout.strip() == "wait: tiny: cached"


def test_frozen_refuses_with_exit_2_naming_the_model_the_lock_lacks(workspace, hub):
    run_cli(workspace, hub, "lock")
    with open(workspace / "models.yaml", "a") as manifest:
        manifest.write(EXTRA)
    for command in (("list",), ("pull", "tiny"), ("mount", str(workspace / "mnt"))):
        result = run_cli(workspace, hub, *command, "--frozen", check=False)
        assert result.returncode == 2, result.stderr
        assert "model 'late': not in the lock" in result.stderr, result.stderr
    print(result.stderr.strip())
    assert "run `lamina-llm-cache lock`" in result.stderr
    run_cli(workspace, hub, "list")                       # without --frozen: resolved without the lock


def test_frozen_names_a_changed_revision(workspace, hub):
    run_cli(workspace, hub, "lock")
    (workspace / "models.yaml").write_text(MANIFEST.replace("file: m.gguf\n  folder", "file: m.gguf\n"
                                                            "    revision: v2\n  folder", 1))
    result = run_cli(workspace, hub, "list", "--frozen", check=False)
    assert result.returncode == 2 and "model 'tiny'" in result.stderr and "'v2'" in result.stderr


def test_lock_keeps_commits_and_upgrade_moves_only_the_named_models(workspace, hub):
    run_cli(workspace, hub, "lock")
    old = json.loads((workspace / "models.lock").read_text())["models"]
    moved = hub.add_commit("org/tiny", files={"m.gguf": b"GGUF v2"})
    assert "0 models changed" in run_cli(workspace, hub, "lock").stdout
    out = run_cli(workspace, hub, "lock", "--upgrade", "tiny").stdout
    now = json.loads((workspace / "models.lock").read_text())["models"]
    assert "1 model changed (tiny)" in out
    assert now["tiny"]["commit"] == moved and now["also-tiny"]["commit"] == old["also-tiny"]["commit"]
    run_cli(workspace, hub, "lock", "--upgrade")
    assert json.loads((workspace / "models.lock").read_text())["models"]["also-tiny"]["commit"] == moved
    result = run_cli(workspace, hub, "lock", "tiny", check=False)
    assert result.returncode == 2 and "--upgrade" in result.stderr


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@needs_fuse
@pytest.mark.fuse
def test_a_mount_under_a_lock_resolves_with_no_hub_call_and_refresh_never_moves_a_locked_commit(
        workspace, hub, mount_factory):
    port = free_port()
    mount = mount_factory(MANIFEST, hub.endpoint, args=("--api", f"127.0.0.1:{port}"), start=False)
    run_cli(workspace, hub, "lock")
    (workspace / "models.lock").rename(mount.manifest.with_suffix(".lock"))
    hub.add_commit("org/tiny", files={"m.gguf": b"GGUF v2, moved on"})
    hub.clear_log()
    mount.start()
    path = mount.mountpoint / "tiny" / "model.gguf"
    assert path.read_bytes() == b"GGUF v1"
    request = urllib.request.Request(f"http://127.0.0.1:{port}/refresh", method="POST")
    with urllib.request.urlopen(request, timeout=30) as answer:
        assert answer.status == 200
    assert path.read_bytes() == b"GGUF v1"
    assert resolve_requests(hub) == []
    assert "resolved without the lock" not in mount.log_text()
    upgrade = subprocess.run([sys.executable, "-m", "vfs", "lock", "--upgrade", "tiny", "-m", str(mount.manifest),
                              "--cache-dir", str(workspace / "cache-of-the-locker"), "--endpoint", hub.endpoint],
                             capture_output=True, text=True, timeout=120, env=isolated_environment(workspace))
    assert upgrade.returncode == 0, upgrade.stderr
    with urllib.request.urlopen(request, timeout=30) as answer:    # the lock moved: so does the mount
        assert answer.status == 200
    assert (mount.mountpoint / "tiny" / "model.gguf").read_bytes() == b"GGUF v2, moved on"
