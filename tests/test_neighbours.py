"""Neighbours of a running mount: gc beside it, a second mount, concurrent `add`, `unmount` waiting."""

import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from conftest import eventually, needs_fuse
from vfs.testing.mounts import isolated_environment

MiB = 1024 * 1024
BLOCK = ("--block-size", "1M")

MANIFEST = """
models:
  big:
    path: /models/big/model.gguf
    backend: llama.cpp
    hf: org/big
    file: big.gguf
  small:
    path: /models/small/model.gguf
    backend: llama.cpp
    hf: org/small
    file: small.gguf
"""


def cli(tmp_path, hub, *args, manifest=None, cache=None, timeout=120):
    command = [sys.executable, "-m", "vfs", *args]
    if manifest is not None:
        command += ["-m", str(manifest), "--cache-dir", str(cache or tmp_path / "cache"), "--endpoint", hub.endpoint]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                          env=isolated_environment(tmp_path))


def blob_data_files(cache):
    return sorted((cache / "blobs").glob("*/*/*.data"))


@pytest.fixture
def sources(hub, random_file):
    big = random_file("big.gguf", 6 * MiB + 7, seed=21)
    small = random_file("small.gguf", 2 * MiB, seed=22)
    hub.add_repo("org/big", files={"big.gguf": big})
    hub.add_repo("org/small", files={"small.gguf": small})
    return {"big": big.read_bytes(), "small": small.read_bytes()}


@needs_fuse
@pytest.mark.fuse
def test_gc_beside_a_mount_keeps_the_blob_it_has_open_and_evicts_an_idle_one(
        hub, sources, mount_factory, tmp_path):
    mount = mount_factory(MANIFEST, hub.endpoint, args=BLOCK)
    root = mount.mountpoint
    assert (root / "small" / "model.gguf").read_bytes() == sources["small"]       # read, then closed
    with open(root / "big" / "model.gguf", "rb") as handle:
        head = handle.read(MiB)                                              # open, half filled
        assert eventually(lambda: int(os.getxattr(root / "big" / "model.gguf", "user.lamina.cached_bytes")) >= MiB)
        nothing = tmp_path / "nothing.yaml"
        nothing.write_text("models:\n")
        result = cli(tmp_path, hub, "gc", manifest=nothing)                 # every blob is unnamed here
        print(result.stdout.strip())
        assert result.returncode == 0, result.stderr
        assert "1 in use by another process, kept" in result.stdout
        assert len(blob_data_files(tmp_path / "cache")) == 1               # the open one
        assert head + handle.read() == sources["big"]
    assert (root / "small" / "model.gguf").read_bytes() == sources["small"]    # fetched again, exact
    mount.stop()
    again = mount_factory(MANIFEST, hub.endpoint, cache_dir=tmp_path / "cache", args=BLOCK)
    big = again.mountpoint / "big" / "model.gguf"
    assert int(os.getxattr(big, "user.lamina.cached_bytes")) >= MiB      # what it held survived gc
    assert big.read_bytes() == sources["big"]


@needs_fuse
@pytest.mark.fuse
def test_a_second_mount_on_the_same_cache_is_refused_with_the_reason(hub, sources, mount_factory, tmp_path):
    first = mount_factory(MANIFEST, hub.endpoint, args=BLOCK)
    second = mount_factory(MANIFEST, hub.endpoint, cache_dir=tmp_path / "cache", args=BLOCK, start=False)
    with pytest.raises(Exception) as refused:
        second.start()
    print(refused.value)
    assert f"is in use by another mount (pid {first.process.pid})" in str(refused.value)
    assert (first.mountpoint / "small" / "model.gguf").read_bytes() == sources["small"]


def test_ten_concurrent_adds_keep_all_ten_and_the_comments(hub, tmp_path):
    manifest = tmp_path / "models.yaml"
    manifest.write_text("# the host's models\nmodels:\n  # first one\n  seed:\n    path: /models/seed/\n"
                        "    backend: vllm   # by hand\n")
    command = [sys.executable, "-m", "vfs", "add", "NAME", "--hf", "org/x", "--file", "m.gguf", "-m", str(manifest)]
    adders = [subprocess.Popen([part.replace("NAME", f"m{number}") for part in command],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=isolated_environment(tmp_path))
              for number in range(10)]
    for adder in adders:
        assert adder.wait(60) == 0, adder.stderr.read()
    text = manifest.read_text()
    models = yaml.safe_load(text)["models"]
    assert sorted(models) == sorted(["seed"] + [f"m{n}" for n in range(10)])
    for comment in ("# the host's models", "# first one", "# by hand"):
        assert comment in text


def mount_in_background(tmp_path, hub, sources):
    manifest = tmp_path / "models.yaml"
    manifest.write_text(MANIFEST)
    result = cli(tmp_path, hub, "mount", str(tmp_path / "mnt"), "--background", manifest=manifest)
    assert result.returncode == 0, result.stderr
    return int(result.stdout.split("(pid ")[1].split(",")[0])


def gone(pid):
    try:
        with open(f"/proc/{pid}/status") as status:
            return any(line.startswith("State:") and "Z" in line for line in status)
    except FileNotFoundError:
        return True


@needs_fuse
@pytest.mark.fuse
def test_unmount_returns_after_the_daemon_has_exited(hub, sources, tmp_path):
    pid = mount_in_background(tmp_path, hub, sources)
    try:
        result = cli(tmp_path, hub, "unmount", str(tmp_path / "mnt"))
        assert result.returncode == 0, result.stderr
        assert gone(pid), "unmount returned while the daemon was still running"
    finally:
        if not gone(pid):
            os.kill(pid, signal.SIGKILL)


@needs_fuse
@pytest.mark.fuse
def test_unmount_says_so_when_the_daemon_does_not_exit_within_its_timeout(hub, sources, tmp_path):
    pid = mount_in_background(tmp_path, hub, sources)
    os.kill(pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        result = cli(tmp_path, hub, "unmount", str(tmp_path / "mnt"), "--timeout", "1")
        print(result.stderr.strip())
        assert result.returncode == 1 and time.monotonic() - started < 10
        assert f"the daemon (pid {pid}) did not exit within 1s" in result.stderr
    finally:
        os.kill(pid, signal.SIGKILL)
        os.kill(pid, signal.SIGCONT)
        subprocess.run(["fusermount3", "-u", "-z", str(tmp_path / "mnt")], capture_output=True)


@needs_fuse
@pytest.mark.fuse
def test_verify_beside_a_mount_never_truncates_a_blob_the_mount_has_open(hub, sources, mount_factory, tmp_path):
    mount = mount_factory(MANIFEST, hub.endpoint, args=BLOCK)
    path = mount.mountpoint / "small" / "model.gguf"
    with open(path, "rb") as handle:
        assert handle.read() == sources["small"]
        assert eventually(lambda: os.getxattr(path, "user.lamina.verified") == b"yes")
        (data,) = [p for p in blob_data_files(tmp_path / "cache") if p.stat().st_size == len(sources["small"])]
        with open(data, "r+b") as blob:                  # the disk rots under the mount
            blob.seek(12345)
            blob.write(bytes([blob.read(1)[0] ^ 0xFF]))
        log_size = data.with_suffix(".log").stat().st_size
        result = cli(tmp_path, hub, "verify", "small", manifest=mount.manifest)
        print(result.stdout.strip())
        assert "MISMATCH: another process has it open; left for it to discard" in result.stdout
        assert result.returncode == 1
        assert data.with_suffix(".log").stat().st_size == log_size        # not truncated under the mount


@needs_fuse
@pytest.mark.fuse
def test_pull_beside_a_mount_filling_the_same_blob_leaves_exact_bytes(hub, sources, mount_factory, tmp_path):
    mount = mount_factory(MANIFEST, hub.endpoint, args=BLOCK)
    path = mount.mountpoint / "big" / "model.gguf"
    with open(path, "rb") as handle:
        head = handle.read(MiB)                  # the mount is filling the blob now
        result = cli(tmp_path, hub, "pull", "big", manifest=mount.manifest)
        assert result.returncode == 0, result.stderr
        assert "1 of 1 files complete and verified" in result.stdout
        assert head + handle.read() == sources["big"]
    assert eventually(lambda: os.getxattr(path, "user.lamina.verified") == b"yes")
    (data,) = [p for p in blob_data_files(tmp_path / "cache") if p.stat().st_size == len(sources["big"])]
    assert data.read_bytes() == sources["big"]
