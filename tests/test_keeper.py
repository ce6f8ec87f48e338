"""The keeper: `mount` as a small parent holding the FUSE connection, its serving daemon a child."""

import errno
import fcntl
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import eventually, needs_fuse
from served_model import model, served_file  # noqa: F401 - model is a fixture
from vfs.keeper import FDSTORE_NAME, mounted_device
from vfs.testing.mounts import MountProcess, _read_with_deadline
from vfs.testing.readers import ONE_MODEL_MANIFEST, Readers
pytestmark = [needs_fuse, pytest.mark.fuse]


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


# systemd's side of a start with stored descriptors: they come from fd 3 on, LISTEN_PID names the
# process they are for. exec keeps the pid, so the wrapper names itself and becomes the keeper.
AS_SYSTEMD_STARTS = ("import os, sys; stored = int(sys.argv[1]); os.dup2(stored, 3); os.close(stored); "
                     "os.environ['LISTEN_PID'] = str(os.getpid()); os.execv(sys.argv[2], sys.argv[2:])")
RESTART_SECONDS = 60.0          # the whole restart, readers included; past it the connection is aborted


def start_as_systemd_would(mount, stored_fd, log_path):
    """A new keeper for `mount`'s mount point, started with `stored_fd` handed back at fd 3."""
    env = dict(mount.env, LISTEN_FDS="1", LISTEN_FDNAMES=FDSTORE_NAME)
    restarted = MountProcess(mount.manifest, mount.mountpoint, mount.cache_dir, mount.endpoint, log_path,
                             env=env, keeper=True)
    read_end, write_end = os.pipe()
    # Above 3, so that neither lands where the wrapper puts the stored descriptor.
    ready, stored = (fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10) for fd in (write_end, stored_fd))
    os.close(write_end)
    try:
        argv = [sys.executable, "-c", AS_SYSTEMD_STARTS, str(stored), *restarted.command(ready)]
        restarted.process = subprocess.Popen(argv, pass_fds=(ready, stored), env=env, stdin=subprocess.DEVNULL,
                                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    finally:
        os.close(ready)
        os.close(stored)
    try:
        restarted.served = _read_with_deadline(read_end, 30).startswith(b"ready")
    finally:
        os.close(read_end)
    return restarted


def expire_root_attributes(connection_fd):
    """FUSE_NOTIFY_INVAL_INODE of the root (offset -1: its attributes only), as if an hour had passed
    since the last stat: the next stat of the mount point asks the server, and waits for one."""
    header, body = struct.Struct("=IiQ"), struct.Struct("=Qqq")     # fuse_out_header, fuse_notify_inval_inode_out
    os.write(connection_fd, header.pack(header.size + body.size, 2, 0) + body.pack(1, -1, 0))


def abort_connection(device):
    """Fail every request of the mount `device` ("major:minor") with ENOTCONN: nothing stays in D state."""
    try:
        Path(f"/sys/fs/fuse/connections/{device.split(':')[1]}/abort").write_text("1")
    except OSError:
        pass


def test_a_restart_of_the_whole_unit_adopts_the_stored_connection(hub, model, mount_factory, tmp_path):
    """Keeper and daemon both killed, systemd holding the connection: the next keeper adopts it."""
    systemd = FakeSystemd(tmp_path / "notify.sock")
    mount = mount_factory(ONE_MODEL_MANIFEST, hub.endpoint, keeper=True, env={"NOTIFY_SOCKET": systemd.address})
    real = os.path.realpath(mount.mountpoint)
    device = mounted_device(real)
    assert device is not None
    # From here on this process must not touch the mount: with no server a stat waits. A hang
    # is cut by the watchdog, so that the test fails instead.
    watchdog = threading.Timer(RESTART_SECONDS, abort_connection, [device])
    restarted = None
    passed = False
    try:
        assert eventually(lambda: FDSTORE_NAME in systemd.store)
        watchdog.start()
        with Readers(served_file(mount), model, drop_every=0.5) as readers:
            old_daemon = mount.daemon_pid()
            assert old_daemon is not None
            for pid in (mount.process.pid, old_daemon):
                os.kill(pid, signal.SIGKILL)
            mount.process.wait(10)
            assert eventually(lambda: not Path(f"/proc/{old_daemon}").exists())
            assert mounted_device(real) == device, "the stored connection keeps the mount"
            expire_root_attributes(systemd.store[FDSTORE_NAME])
            restarted = start_as_systemd_would(mount, systemd.store[FDSTORE_NAME], tmp_path / "restarted.log")
            assert restarted.served, restarted.log_text() or restarted.stderr_text()
            new_daemon = restarted.daemon_pid()
            assert new_daemon not in (None, old_daemon)
            assert readers.wait_for_progress(3, timeout=30)
        assert readers.results.ok, readers.results.problems()
        assert readers.results.errors == 0 and readers.results.wrong_bytes == 0
        assert mounted_device(real) == device, "the same mount, not a new one"
        assert "keeper: adopting the connection systemd kept" in restarted.log_text()
        restarted.stop()
        assert restarted.process.wait(10) == 0
        assert mounted_device(real) is None
        assert restarted.log_problems() == []
        passed = True
    finally:
        watchdog.cancel()
        if not passed:
            abort_connection(device)
        if restarted is not None:
            restarted.kill()
        systemd.close()
