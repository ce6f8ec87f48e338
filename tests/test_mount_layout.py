"""Where `mount` may mount: a mount point (bind mount, volume) is refused, naming the layout that heals."""

import os
import subprocess
import sys

import pytest

from conftest import needs_fuse
from vfs.testing.mounts import isolated_environment, lazy_unmount

pytestmark = [needs_fuse, pytest.mark.fuse]

MANIFEST = """
models:
  notes:
    path: /models/notes/
    backend: llama.cpp
    hf: org/notes
"""


@pytest.fixture
def workspace(hub, tmp_path):
    hub.add_repo("org/notes", files={"a.txt": b"alpha\n"})
    (tmp_path / "models.yaml").write_text(MANIFEST)
    return tmp_path


def mount_cli(workspace, hub, mountpoint, *extra, cache="cache"):
    command = [sys.executable, "-m", "vfs", "mount", str(mountpoint), "-m", str(workspace / "models.yaml"),
               "--cache-dir", str(workspace / cache), "--endpoint", hub.endpoint, *extra]
    return subprocess.run(command, capture_output=True, text=True, timeout=60,
                          env=isolated_environment(workspace))


@pytest.fixture
def bind_mounted(tmp_path):
    """A directory bind-mounted onto itself: what a container sees at a volume's target."""
    target = tmp_path / "volume"
    target.mkdir()
    subprocess.run(["mount", "--bind", str(target), str(target)], check=True)
    yield target
    subprocess.run(["umount", "-l", str(target)], check=False)


def test_a_bind_mount_target_is_refused_with_the_layout_that_heals(workspace, hub, bind_mounted):
    result = mount_cli(workspace, hub, bind_mounted)
    assert result.returncode == 1
    assert f"{bind_mounted} is itself a mount point" in result.stderr
    assert "/host/models" in result.stderr and "docs/DEPLOY.md" in result.stderr
    assert os.listdir(bind_mounted) == []


def test_a_directory_inside_the_bind_mount_mounts_and_serves(workspace, hub, bind_mounted):
    models = bind_mounted / "models"
    result = mount_cli(workspace, hub, models, "--background")
    try:
        assert result.returncode == 0, result.stderr
        assert (models / "notes" / "a.txt").read_bytes() == b"alpha\n"
    finally:
        lazy_unmount(models)


def test_a_second_mount_from_another_cache_over_a_live_one_is_refused(workspace, hub):
    # The same cache takes the mount over (an upgrade: test_handover.py); another cache
    # cannot, since the cache's lock and its blobs go with the connection.
    mountpoint = workspace / "mnt"
    first = mount_cli(workspace, hub, mountpoint, "--background")
    try:
        assert first.returncode == 0, first.stderr
        second = mount_cli(workspace, hub, mountpoint, cache="another-cache")
        assert second.returncode == 1, second.stderr
        assert "is already mounted by lamina-llm-cache from another cache" in second.stderr
        assert "unmount it first, or mount with --cache-dir" in second.stderr
        assert (mountpoint / "notes" / "a.txt").read_bytes() == b"alpha\n"
    finally:
        lazy_unmount(mountpoint)


def test_a_lazy_unmount_detaches_at_once_while_open_files_are_still_served(workspace, hub, mount_factory):
    """The DaemonSet's preStop: a plain unmount is refused while a consumer holds a file open."""
    mount = mount_factory(MANIFEST, hub.endpoint, cache_dir=workspace / "cache")
    with open(mount.mountpoint / "notes" / "a.txt", "rb") as held:
        plain = subprocess.run([sys.executable, "-m", "vfs", "unmount", str(mount.mountpoint)],
                               capture_output=True, text=True, timeout=60)
        assert plain.returncode == 1 and "busy" in plain.stderr
        lazy = subprocess.run([sys.executable, "-m", "vfs", "unmount", "--lazy", str(mount.mountpoint)],
                              capture_output=True, text=True, timeout=60)
        assert lazy.returncode == 0, lazy.stderr
        assert not os.path.ismount(mount.mountpoint)
        assert os.pread(held.fileno(), 100, 0) == b"alpha\n"
        assert mount.process.poll() is None, "the daemon serves the open file"
    # The last open file closed, the kernel ends the connection and the daemon exits by itself.
    assert mount.process.wait(timeout=15) == 0
