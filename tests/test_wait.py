"""`wait` as an init container or ExecStartPre meets it: from the cache directory, no API, no Hub."""

import subprocess
import sys
import time

import pytest

from conftest import needs_fuse
from faultkit import MiB, run_cli
from vfs.testing.mounts import isolated_environment

MANIFEST = """
models:
  big:
    path: /models/big/model.gguf
    backend: llama.cpp
    hf: org/big
    file: big.gguf
  by-hand:
    path: /models/by-hand/
    backend: llama.cpp
"""
NO_HUB = "http://127.0.0.1:9"          # wait must never need the Hub: nothing listens here


@pytest.fixture
def big(hub, random_file):
    source = random_file("big.gguf", 3 * MiB + 5)
    hub.add_repo("org/big", files={"big.gguf": source})
    return source.read_bytes()


def wait_cli(tmp_path, mount, *args, timeout=60):
    return run_cli("wait", *args, "-m", mount.manifest, "--cache-dir", mount.cache_dir, "--endpoint", NO_HUB,
                   home=tmp_path, timeout=timeout)


@pytest.fixture
def mounted(hub, big, mount_factory):
    return mount_factory(MANIFEST, hub.endpoint, args=("--block-size", "1M"))


@needs_fuse
@pytest.mark.fuse
def test_wait_sees_listed_then_cached_then_verified_as_a_reader_fetches(mounted, big, tmp_path):
    status, out, err, _ = wait_cli(tmp_path, mounted, "big", "by-hand", "--timeout", "5")
    assert status == 0, err
    assert out.splitlines() == ["wait: big: listed", "wait: by-hand: listed"]
    status, out, err, seconds = wait_cli(tmp_path, mounted, "big", "--cached", "--timeout", "1")
    print(f"wait --cached on an empty cache: exit {status} after {seconds:.1f}s: {err.strip()}")
    assert status == 1 and err.strip() == (
        f"wait: big: not cached after 1s: 0 of {len(big)} bytes cached (0%); 1 of 1 files incomplete")
    waiting = subprocess.Popen(
        [sys.executable, "-m", "vfs", "wait", "big", "--verified", "--timeout", "60", "-m", str(mounted.manifest),
         "--cache-dir", str(mounted.cache_dir), "--endpoint", NO_HUB],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=isolated_environment(tmp_path))
    time.sleep(1.0)
    assert waiting.poll() is None                       # still waiting: nothing was read yet
    assert (mounted.mountpoint / "big" / "model.gguf").read_bytes() == big
    out, err = waiting.communicate(timeout=60)
    assert waiting.returncode == 0, err
    assert out == "wait: big: verified\n"


@needs_fuse
@pytest.mark.fuse
def test_wait_names_what_is_still_missing_when_cached_but_not_verified(mounted, big, tmp_path):
    (mounted.mountpoint / "big" / "model.gguf").read_bytes()
    status, out, err, _ = wait_cli(tmp_path, mounted, "big", "--cached", "--timeout", "30")
    assert status == 0 and out == "wait: big: cached\n", err
    # Take the verification away: the blob's .ok marker is what `verified` means on disk.
    for marker in mounted.cache_dir.glob("blobs/*/*/*.ok"):
        marker.unlink()
    status, _, err, _ = wait_cli(tmp_path, mounted, "big", "--verified", "--timeout", "0.5")
    assert status == 1 and "cached, but 1 files not yet verified (first: big.gguf)" in err


def test_wait_for_an_unknown_model_is_a_usage_error(tmp_path):
    (tmp_path / "models.yaml").write_text(MANIFEST)
    status, _, err, _ = run_cli("wait", "big", "nope", "-m", tmp_path / "models.yaml",
                                "--cache-dir", tmp_path / "cache", home=tmp_path)
    assert status == 2 and "no model named 'nope'" in err


def test_wait_before_any_mount_times_out_saying_there_is_no_cache_yet(tmp_path):
    (tmp_path / "models.yaml").write_text(MANIFEST)
    status, _, err, seconds = run_cli("wait", "big", "--timeout", "0.5", "-m", tmp_path / "models.yaml",
                                      "--cache-dir", tmp_path / "cache", home=tmp_path)
    assert status == 1 and f"no cache at {tmp_path / 'cache'} yet" in err
    assert not (tmp_path / "cache").exists()            # waiting never creates the cache


def test_wait_sees_a_model_a_pull_fetched_without_any_mount(hub, big, tmp_path):
    (tmp_path / "models.yaml").write_text(MANIFEST)
    common = ("-m", tmp_path / "models.yaml", "--cache-dir", tmp_path / "cache")
    status, _, err, _ = run_cli("pull", "big", *common, "--endpoint", hub.endpoint, home=tmp_path)
    assert status == 0, err
    status, out, err, _ = run_cli("wait", "big", "--verified", "--timeout", "5", *common, "--endpoint", NO_HUB,
                                  home=tmp_path)
    assert status == 0 and out == "wait: big: verified\n", err


def test_a_user_without_a_home_can_wait_on_an_explicit_cache(tmp_path, monkeypatch):
    """A systemd DynamicUser may have no HOME and no passwd entry: ~ cannot be expanded."""
    import importlib
    import os.path

    import vfs.settings
    monkeypatch.setattr(os.path, "expanduser", lambda path: str(path))      # what Python does without a home
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.delenv("HF_HOME", raising=False)
    settings = importlib.reload(vfs.settings).from_environment(env={}, cache_dir=tmp_path / "cache")
    assert settings.cache_dir == tmp_path / "cache" and settings.token is None
