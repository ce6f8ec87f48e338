"""The keeper: `mount` as a small parent holding the FUSE connection, its serving daemon a child."""

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import eventually, needs_fuse
from vfs.keeper import FDSTORE_NAME, mounted_device
from vfs.testing.readers import ONE_MODEL_MANIFEST, read_through, write_reference

MiB = 1024 * 1024
pytestmark = [needs_fuse, pytest.mark.fuse]


@pytest.fixture
def model(hub, tmp_path):
    reference = write_reference(tmp_path / "reference.gguf", 16 * MiB)
    hub.add_repo("readers/model", files={"model.gguf": reference})
    return reference


def served_file(mount):
    return mount.mountpoint / "model" / "model.gguf"


def threads_of(pid):
    status = Path(f"/proc/{pid}/status").read_text()
    return int(status.split("Threads:")[1].split()[0])


def maps_of(pid):
    return Path(f"/proc/{pid}/maps").read_text()


def test_the_keeper_is_a_small_parent_and_sigterm_unmounts(hub, model, mount_factory):
    mount = mount_factory(ONE_MODEL_MANIFEST, hub.endpoint, keeper=True)
    keeper, daemon = mount.process.pid, mount.daemon_pid()
    assert daemon is not None and daemon != keeper
    assert served_file(mount).read_bytes() == model.read_bytes()
    # One thread, and neither libfuse nor pyfuse3 loaded: nothing of the daemon's in it.
    assert threads_of(keeper) == 1
    assert "fuse" not in maps_of(keeper) and "fuse" in maps_of(daemon)
    mount.process.send_signal(signal.SIGTERM)
    assert mount.process.wait(30) == 0
    assert mounted_device(str(mount.mountpoint)) is None
    assert not Path(f"/proc/{daemon}").exists()
    assert "keeper: SIGTERM: passing it to the serving daemon" in mount.log_text()


def test_the_keeper_module_does_not_import_the_daemon(tmp_path):
    """What `mount` imports before it starts its child: no pyfuse3, no trio."""
    code = ("import sys; from vfs import cli, keeper, notify, manifest, settings, fdstore, resend; "
            "print(sorted(m for m in ('pyfuse3', 'trio') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_unmount_returns_once_the_keeper_has_exited(hub, model, mount_factory, tmp_path):
    mount = mount_factory(ONE_MODEL_MANIFEST, hub.endpoint, keeper=True)
    result = subprocess.run([sys.executable, "-m", "vfs", "unmount", str(mount.mountpoint)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert mount.process.poll() == 0        # exited before unmount returned, not after


class FakeSystemd:
    """systemd's side of NOTIFY_SOCKET: datagrams, and the descriptors FDSTORE=1 sends with them."""

    def __init__(self, path):
        self.socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.socket.bind(str(path))
        self.socket.settimeout(0.2)
        self.address = str(path)
        self.messages = []
        self.store = {}             # FDNAME -> our duplicate of the descriptor
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop:
            try:
                text, fds, _, _ = socket.recv_fds(self.socket, 4096, 8)
            except TimeoutError:
                continue
            fields = dict(line.split("=", 1) for line in text.decode().splitlines() if "=" in line)
            self.messages.append(fields)
            if fields.get("FDSTORE") == "1":
                for fd in fds:
                    self.store[fields.get("FDNAME", "stored")] = fd
            else:
                for fd in fds:
                    os.close(fd)

    def close(self):
        self._stop = True
        self._thread.join()
        self.socket.close()
        for fd in self.store.values():
            os.close(fd)


def test_the_keeper_puts_the_connection_in_systemds_store(hub, model, mount_factory, tmp_path):
    systemd = FakeSystemd(tmp_path / "notify.sock")
    try:
        mount = mount_factory(ONE_MODEL_MANIFEST, hub.endpoint, keeper=True,
                              env={"NOTIFY_SOCKET": systemd.address})
        assert eventually(lambda: FDSTORE_NAME in systemd.store)
        assert os.readlink(f"/proc/self/fd/{systemd.store[FDSTORE_NAME]}") == "/dev/fuse"
        assert eventually(lambda: any(m.get("READY") == "1" for m in systemd.messages))
        mount.stop()
    finally:
        systemd.close()


def test_a_mount_left_dead_by_keeper_and_daemon_is_found_and_cleared(hub, model, mount_factory):
    """Both holders of the connection killed: the mount stays, dead; the next `mount` clears it."""
    first = mount_factory(ONE_MODEL_MANIFEST, hub.endpoint, keeper=True)
    daemon = first.daemon_pid()
    first.process.kill()
    first.process.wait()
    assert served_file(first).read_bytes() == model.read_bytes(), "the child serves on without its keeper"
    os.kill(daemon, signal.SIGKILL)
    assert eventually(lambda: not Path(f"/proc/{daemon}").exists())
    # Dead: still listed in the mount table (os.path.ismount() may say either), every call ENOTCONN.
    assert mounted_device(os.path.realpath(first.mountpoint)) is not None
    with pytest.raises(OSError) as dead:
        os.statvfs(first.mountpoint)
    assert dead.value.errno == errno.ENOTCONN
    second = mount_factory(ONE_MODEL_MANIFEST, hub.endpoint, mountpoint=first.mountpoint, keeper=True)
    assert "a previous daemon died and left a dead mount; clearing it" in second.log_text()
    assert served_file(second).read_bytes() == model.read_bytes()
    assert sum(1 for line in Path("/proc/self/mountinfo").read_text().splitlines()
               if f" {os.path.realpath(first.mountpoint)} " in line) == 1, "mounts stacked"
    # The second stops first: the first's clean-up, a lazy unmount of the same mount point,
    # would cut the connection under the second while it answers the RELEASE of that read.
    second.stop()
