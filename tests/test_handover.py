"""Hand-over through real mounts: a successor serves the live connection; readers see a stall, not an error."""

import ctypes
import json
import os
import signal
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import eventually, needs_fuse
from served_model import model, served_file  # noqa: F401 - model is a fixture
from vfs.daemons import daemon_of
from vfs.handover import SESSION_FILE, state_dir
from vfs.keeper import mounted_device
from vfs.testing.handovers import wait_for_successor
from vfs.testing.readers import ONE_MODEL_MANIFEST, Readers

MiB = 1024 * 1024
pytestmark = [needs_fuse, pytest.mark.fuse]


def upgrade(mount, timeout=120):
    return subprocess.run([sys.executable, "-m", "vfs", "upgrade", str(mount.mountpoint)],
                          capture_output=True, text=True, timeout=timeout)


def gone(pid):
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except OSError:
        return True


def serving_pid(mount):
    """The serving daemon: the keeper's child, or without a keeper whoever the pid file names."""
    return mount.daemon_pid() if mount.keeper else daemon_of(mount.mountpoint)


def new_daemon(mount, old):
    """The daemon serving after `old`, once it serves."""
    if mount.keeper:
        return wait_for_successor(mount, old)
    assert eventually(lambda: serving_pid(mount) not in (None, old), timeout=60)
    return serving_pid(mount)


@pytest.fixture
def unmount_at_end():
    """Mount points whose daemon the test's mount object no longer runs (it handed over)."""
    points = []
    yield points.append
    for point in points:
        subprocess.run([sys.executable, "-m", "vfs", "unmount", str(point)], capture_output=True, timeout=60)


def passthrough_of(path):
    return os.getxattr(path, "user.lamina.passthrough").decode()


def check_bytes(fd, reference, offsets=(0, 5 * MiB + 123, 16 * MiB - 4096)):
    data = reference.read_bytes()
    for offset in offsets:
        assert os.pread(fd, 4096, offset) == data[offset:offset + 4096]


@pytest.mark.parametrize("keeper", [True, False], ids=["keeper", "no-keeper"])
def test_upgrade_keeps_open_files_and_inodes_and_the_old_daemon_exits(hub, model, mount_factory, keeper,
                                                                      unmount_at_end):
    mount = mount_factory(ONE_MODEL_MANIFEST, hub.endpoint, keeper=keeper)
    unmount_at_end(mount.mountpoint)
    path = served_file(mount)
    inode = os.stat(path).st_ino
    fd = os.open(path, os.O_RDONLY)
    try:
        check_bytes(fd, model)
        old = serving_pid(mount)
        result = upgrade(mount)
        assert result.returncode == 0, result.stderr
        assert f"pid {old} handed over to pid" in result.stdout
        assert gone(old), "upgrade returned before the old daemon exited"
        new = new_daemon(mount, old)
        check_bytes(fd, model)                  # a handle the old daemon issued, served by the new one
        assert os.stat(path).st_ino == inode
        assert path.read_bytes() == model.read_bytes()
    finally:
        os.close(fd)
    assert f"hand-over: pid {new} serves" in mount.log_text()


def test_sigkill_of_the_serving_child_is_resent_and_adopted_under_readers(hub, model, mount_factory):
    mount = mount_factory(ONE_MODEL_MANIFEST, hub.endpoint, keeper=True)
    path = served_file(mount)
    path.read_bytes()
    inode = os.stat(path).st_ino
    with Readers(path, model, drop_every=0.5) as readers:
        for _ in range(2):
            assert readers.wait_for_progress(3, timeout=30)
            old = mount.daemon_pid()
            os.kill(old, signal.SIGKILL)
            new_daemon(mount, old)
        assert readers.wait_for_progress(3, timeout=30)
    results = readers.results
    assert results.ok, results.problems()
    assert results.errors == 0 and results.wrong_bytes == 0
    assert os.stat(path).st_ino == inode
    assert mount.log_text().count("was killed by SIGKILL; starting a successor on the same connection") == 2


def test_upgrade_under_the_three_readers(hub, model, mount_factory):
    mount = mount_factory(ONE_MODEL_MANIFEST, hub.endpoint, keeper=True)
    path = served_file(mount)
    path.read_bytes()
    with Readers(path, model, drop_every=0.5) as readers:
        for _ in range(2):
            assert readers.wait_for_progress(3, timeout=30)
            result = upgrade(mount)
            assert result.returncode == 0, result.stderr
        assert readers.wait_for_progress(3, timeout=30)
    assert readers.results.ok, readers.results.problems()
    assert readers.results.longest_stall < 2.0


def test_mount_on_a_live_mount_point_of_ours_takes_it_over(hub, model, mount_factory):
    first = mount_factory(ONE_MODEL_MANIFEST, hub.endpoint)
    path = served_file(first)
    fd = os.open(path, os.O_RDONLY)
    try:
        check_bytes(fd, model)
        second = mount_factory(ONE_MODEL_MANIFEST, hub.endpoint, mountpoint=first.mountpoint)
        assert first.process.wait(30) == 0, "the old daemon exits 0 once it handed over"
        check_bytes(fd, model)
        assert "serving" in second.log_text() and f"hand-over: pid {second.process.pid} serves" in first.log_text()
    finally:
        os.close(fd)
    assert sum(1 for line in Path("/proc/self/mountinfo").read_text().splitlines()
               if f" {os.path.realpath(first.mountpoint)} " in line) == 1, "mounts stacked"
    # The second stops first: the first's clean-up, a lazy unmount of the mount point, would
    # cut the connection under the second while it answers the RELEASE of that close.
    second.stop()
    assert second.process.returncode == 0
    assert mounted_device(os.path.realpath(first.mountpoint)) is None


def test_a_successor_that_fails_before_it_asks_leaves_the_old_daemon_serving(hub, model, mount_factory):
    mount = mount_factory(ONE_MODEL_MANIFEST, hub.endpoint, keeper=True)
    old = mount.daemon_pid()
    mount.manifest.write_text("models: [this is not a manifest\n")     # the successor reads it again
    result = upgrade(mount)
    assert result.returncode == 1
    assert "failed" in result.stdout + result.stderr and "serves on" in result.stderr
    assert mount.daemon_pid() == old
    assert served_file(mount).read_bytes() == model.read_bytes()
    mount.expect_log_errors("error")


def test_a_successor_that_dies_holding_the_connection_leaves_the_old_daemon_serving(hub, model, mount_factory):
    """The successor receives the connection and fails to adopt it (its saved INIT is broken):
    the old daemon makes sure it is dead, resends what it may have read, and serves on."""
    mount = mount_factory(ONE_MODEL_MANIFEST, hub.endpoint)
    path = served_file(mount)
    fd = os.open(path, os.O_RDONLY)
    state = state_dir(mount.mountpoint) / SESSION_FILE
    saved = state.read_text()
    try:
        check_bytes(fd, model)
        broken = json.loads(saved)
        broken["init"] = "AAAA"                                          # 3 bytes: no INIT at all
        state.write_text(json.dumps(broken))
        result = upgrade(mount)
        assert result.returncode == 1, result.stdout
        assert "serves on" in result.stderr
        assert mount.process.poll() is None
        check_bytes(fd, model)
        assert path.read_bytes() == model.read_bytes()
        assert "failed (it did not say it serves); serving on" in mount.log_text()
    finally:
        os.close(fd)
        state.write_text(saved)
    mount.expect_log_errors("", tracebacks=True)


def wait_until_passed_through(path):
    """Read once so the blob is complete, then wait until opens pass through (after its crc check)."""
    path.read_bytes()
    assert eventually(lambda: passthrough_of(path) == "yes (on open)", timeout=30), passthrough_of(path)


def fresh_mtime_ns(path):
    """The file's mtime as the daemon says it now: statx with AT_STATX_FORCE_SYNC makes the
    kernel ask (os.stat would answer from the attributes it cached, for an hour here)."""
    buf = ctypes.create_string_buffer(256)
    libc = ctypes.CDLL(None, use_errno=True)
    at_fdcwd, force_sync, statx_mtime = -100, 0x2000, 0x40
    if libc.statx(at_fdcwd, os.fsencode(path), force_sync, statx_mtime, buf) != 0:
        raise OSError(ctypes.get_errno(), "statx")
    seconds, nanoseconds = struct.unpack_from("qI", buf, 112)      # struct statx: stx_mtime
    return seconds * 1_000_000_000 + nanoseconds


def test_an_upgrade_keeps_file_times_and_the_crc_checks_done(hub, model, mount_factory):
    """The successor shows the times its predecessor showed (a new mtime makes the kernel drop
    every page it cached of the file), and takes over the old daemon's block crc checks: a
    file whose opens passed through before passes through at once, without a check of its
    blocks first."""
    mount = mount_factory(ONE_MODEL_MANIFEST, hub.endpoint, keeper=True)
    path = served_file(mount)
    wait_until_passed_through(path)
    before = fresh_mtime_ns(path)
    old = mount.daemon_pid()
    assert upgrade(mount).returncode == 0
    new_daemon(mount, old)
    assert fresh_mtime_ns(path) == before
    assert passthrough_of(path) == "yes (on open)"
    with open(path, "rb") as opened:
        assert passthrough_of(path) == "yes"
        check_bytes(opened.fileno(), model)


@pytest.mark.parametrize("how", ["upgrade", "sigkill"])
def test_passthrough_opens_survive_and_new_opens_reuse_the_backing_id(hub, model, mount_factory, how):
    mount = mount_factory(ONE_MODEL_MANIFEST, hub.endpoint, keeper=True)
    path = served_file(mount)
    wait_until_passed_through(path)
    fd = os.open(path, os.O_RDONLY)
    try:
        assert passthrough_of(path) == "yes"
        old = mount.daemon_pid()
        if how == "upgrade":
            assert upgrade(mount).returncode == 0
        else:
            os.kill(old, signal.SIGKILL)
        new_daemon(mount, old)
        check_bytes(fd, model)
        # The kernel holds the inode in passthrough mode with the old daemon's backing id: a new
        # open must reuse it (another id, or a daemon-served open, would fail with EIO).
        assert passthrough_of(path) == "yes"
        again = os.open(path, os.O_RDONLY)
        check_bytes(again, model)
        os.close(again)
    finally:
        os.close(fd)
    assert path.read_bytes() == model.read_bytes()


def test_the_hand_over_soak_tool_counts_what_readers_saw(tmp_path):
    """vfs.testing.handovers, the tool behind docs/RELIABILITY.md's figures, on a short run."""
    from vfs.testing.handovers import soak
    report = soak(["kill", "upgrade"], 16 * MiB, work=tmp_path, drop_every=0.5)
    assert report.failure is None, report.log[-2000:]
    assert [r.kind for r in report.rounds] == ["kill", "upgrade"]
    assert report.results is not None and report.results.errors == 0 and report.results.wrong_bytes == 0
    assert report.results.ops > 0 and report.leftover == []
    assert report.ok(max_stall=5.0), report.summary()


def test_llama_cpp_generates_the_same_text_across_an_upgrade_and_a_sigkill():
    from vfs.testing.llamagen import EVENTS, run
    outcome = run(rounds=7, size_mib=16)
    assert outcome["child_exit"] == 0, "llama.cpp died (SIGBUS from a dead mount?)"
    assert len(outcome["rounds"]) == 7 and outcome["same"], outcome
    assert [e["kind"] for e in outcome["events"]] == [EVENTS[n] for n in sorted(EVENTS)]


def free_port():
    import socket
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_the_rest_api_moves_to_the_successor(hub, model, mount_factory, unmount_at_end):
    import urllib.request
    port = free_port()
    mount = mount_factory(ONE_MODEL_MANIFEST, hub.endpoint, args=("--api", f"127.0.0.1:{port}"))
    unmount_at_end(mount.mountpoint)
    old = serving_pid(mount)
    result = upgrade(mount)
    assert result.returncode == 0, result.stderr
    new = new_daemon(mount, old)

    def answers():
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as reply:
                return reply.status == 200
        except OSError:
            return False
    assert eventually(answers, timeout=20), "the successor serves the API on the same port"
    assert new != old


TWO_MODELS = """\
models:
  a: {path: /models/a/a.gguf, backend: llama.cpp, hf: org/a, file: a.gguf}
  b: {path: /models/b/b.gguf, backend: llama.cpp, hf: org/b, file: b.gguf}
"""


def test_inode_numbers_made_by_a_refresh_survive_an_upgrade(hub, mount_factory, unmount_at_end):
    """A fresh daemon would number the refreshed tree from scratch (c would get a's old
    numbers); the successor builds its tree on its predecessor's table, and serves a file
    the refresh removed to whoever still has it open."""
    import urllib.request
    for name in "abc":
        hub.add_repo(f"org/{name}", files={f"{name}.gguf": name.encode() * 1000})
    port = free_port()
    mount = mount_factory(TWO_MODELS, hub.endpoint, args=("--api", f"127.0.0.1:{port}"))
    unmount_at_end(mount.mountpoint)
    root = mount.mountpoint
    old_a = os.stat(root / "a" / "a.gguf").st_ino
    held = os.open(root / "a" / "a.gguf", os.O_RDONLY)      # kept open while a refresh removes it
    mount.manifest.write_text(TWO_MODELS.replace("org/a, file: a.gguf", "org/c, file: c.gguf")
                              .replace("a: {path: /models/a/a.gguf", "c: {path: /models/c/c.gguf"))
    request = urllib.request.Request(f"http://127.0.0.1:{port}/refresh", method="POST")
    with urllib.request.urlopen(request, timeout=30) as reply:
        assert reply.status == 200
    numbers = {path: os.stat(root / path).st_ino for path in ("b", "b/b.gguf", "c", "c/c.gguf")}
    assert old_a not in numbers.values()
    assert upgrade(mount).returncode == 0
    Path("/proc/sys/vm/drop_caches").write_text("2")    # the kernel forgets its entries: looked up anew
    assert {path: os.stat(root / path).st_ino for path in numbers} == numbers
    assert (root / "c" / "c.gguf").read_bytes() == b"c" * 1000
    assert not (root / "a").exists()
    try:    # the removed file, open since before the refresh, still reads (and stats) after the upgrade
        assert os.pread(held, 1000, 0) == b"a" * 1000
        assert os.fstat(held).st_ino == old_a
    finally:
        os.close(held)
