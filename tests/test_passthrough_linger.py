"""A released blob's backing id lingers for a reopen, through a real mount: and when it goes.

The daemon runs with tests/passthrough_faults on its PYTHONPATH, tracing every registration
and close of a backing id into a file (LAMINA_TEST_BACKING_TRACE) and with the linger time
the test sets (LAMINA_TEST_PASSTHROUGH_LINGER).
"""

import fcntl
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import eventually, needs_fuse, unexpected_log_lines
from served_model import model, served_file  # noqa: F401 - model is a fixture
from test_passthrough import FAULTS, MANIFEST, MiB, Served, fill, free_port, needs_passthrough, sources  # noqa: F401
from vfs.testing.handovers import wait_for_successor
from vfs.testing.readers import ONE_MODEL_MANIFEST

pytestmark = [needs_fuse, pytest.mark.fuse, needs_passthrough]


class Traced(Served):
    """A mount whose backing ids are traced: `ids()` are the (pid, what, id) lines so far."""

    def __init__(self, mount, port, trace: Path):
        super().__init__(mount, port)
        self.trace = trace

    def ids(self, what=None):
        lines = [line.split() for line in self.trace.read_text().splitlines()] if self.trace.exists() else []
        return [(int(pid), verb, int(number)) for pid, verb, number in lines if what in (None, verb)]

    def blob_file(self, relative):
        algo, digest = os.getxattr(self.root / relative, "user.lamina.content_id").decode().split(":")
        return self.mount.cache_dir / "blobs" / algo / digest[:2] / f"{digest}.data"

    def held(self, relative):
        """Whether a process holds the blob open (its shared flock: gc and eviction skip it)."""
        fd = os.open(self.blob_file(relative), os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return False
        except BlockingIOError:
            return True
        finally:
            os.close(fd)


def traced_env(tmp_path, linger):
    return {"PYTHONPATH": os.pathsep.join([str(FAULTS), os.environ.get("PYTHONPATH", "")]),
            "LAMINA_TEST_BACKING_TRACE": str(tmp_path / "backing-ids"),
            "LAMINA_TEST_PASSTHROUGH_LINGER": str(linger)}


def start_traced(hub, mount_factory, tmp_path, linger, *args):
    port = free_port()
    mount = mount_factory(MANIFEST, hub.endpoint, env=traced_env(tmp_path, linger),
                          args=("--block-size", "1M", "--api", f"127.0.0.1:{port}", *args))
    return Traced(mount, port, tmp_path / "backing-ids")


def passed_through_once(served, relative):
    """Fill the file, wait until its opens pass through, and open and close it once so."""
    fill(served, relative)
    assert eventually(lambda: served.passthrough(relative) == "yes (on open)", timeout=30)
    with open(served.root / relative, "rb") as f:
        assert served.passthrough(relative) == "yes"
        f.read(4096)
    [(_, _, backing_id)] = served.ids("open")
    return backing_id


def gc_everything(served):
    gc = subprocess.run([sys.executable, "-m", "vfs", "gc", "--max-size", "0", "-m", str(served.mount.manifest),
                         "--cache-dir", str(served.mount.cache_dir)], capture_output=True, text=True,
                        env=served.mount.env, timeout=60)
    assert gc.returncode == 0, gc.stderr


def test_a_reopen_reuses_the_lingering_id_which_holds_the_blob_until_it_expires(hub, sources, mount_factory, tmp_path):
    served = start_traced(hub, mount_factory, tmp_path, linger=3)
    path, expected = served.root / "weights/big.bin", sources["weights"]["big.bin"].read_bytes()
    backing_id = passed_through_once(served, "weights/big.bin")
    blob = served.blob_file("weights/big.bin")      # (asked now: the mount's xattrs open the blob)
    # Released, its id lingers: the next open answers with it, registering nothing.
    assert served.passthrough("weights/big.bin") == "yes (on open)"
    before = served.reads()
    for _ in range(3):
        with open(path, "rb") as again:
            assert again.read() == expected
    assert served.reads() == before
    assert served.ids() == [(served.mount.process.pid, "open", backing_id)]
    # It keeps the blob as an open file does: gc beside the mount skips it.
    assert served.held("weights/big.bin")
    gc_everything(served)
    assert blob.exists()
    # Expired, the id is closed and the blob let go of; gc may then take it.
    assert eventually(lambda: served.ids("close") == [(served.mount.process.pid, "close", backing_id)], timeout=15)
    assert not served.held("weights/big.bin")
    gc_everything(served)
    assert not blob.exists()
    assert not unexpected_log_lines(served.mount.log_text())


def test_a_lingering_id_is_closed_when_the_kernel_forgets_the_inode(hub, sources, mount_factory, tmp_path):
    served = start_traced(hub, mount_factory, tmp_path, linger=600)
    backing_id = passed_through_once(served, "weights/big.bin")
    assert served.ids("close") == []

    def forgotten():
        Path("/proc/sys/vm/drop_caches").write_text("2")    # unused dentries and inodes: FORGET
        return [number for _, _, number in served.ids("close")] == [backing_id]
    assert eventually(forgotten, timeout=15)
    assert not served.held("weights/big.bin")
    with open(served.root / "weights/big.bin", "rb") as again:     # a new id for a new open
        assert again.read() == sources["weights"]["big.bin"].read_bytes()
    assert len(served.ids("open")) == 2


def test_eviction_lets_go_of_a_lingering_id_first_but_never_of_a_live_one(hub, sources, mount_factory, tmp_path):
    served = start_traced(hub, mount_factory, tmp_path, 600, "--max-size", "10M")
    backing_id = passed_through_once(served, "weights/big.bin")
    blob, other = served.blob_file("weights/big.bin"), (tmp_path / "sources" / "other.bin").read_bytes()
    # Not one block more fits beside 9 MiB under 10M: the lingering id goes, then the blob.
    assert (served.root / "other/other.bin").read_bytes() == other
    assert eventually(lambda: [number for _, _, number in served.ids("close")] == [backing_id]), served.mount.log_text()
    assert eventually(lambda: not blob.exists())
    assert served.passthrough("weights/big.bin") == "no: not complete and verified yet"
    # The evicted file is fetched again, correctly, and while it is open its id holds it.
    fill(served, "weights/big.bin")
    assert eventually(lambda: served.passthrough("weights/big.bin") == "yes (on open)", timeout=30)
    with open(served.root / "weights/big.bin", "rb") as held:
        os.posix_fadvise(held.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        assert (served.root / "other/other.bin").read_bytes() == other    # no room made: big.bin is open
        assert held.read() == sources["weights"]["big.bin"].read_bytes()
        assert blob.exists()


def test_a_lingering_id_is_closed_at_unmount(hub, sources, mount_factory, tmp_path):
    served = start_traced(hub, mount_factory, tmp_path, linger=600)
    backing_id = passed_through_once(served, "weights/big.bin")
    pid, blob = served.mount.process.pid, served.blob_file("weights/big.bin")
    served.mount.stop()
    assert served.ids("close") == [(pid, "close", backing_id)]
    fd = os.open(blob, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)      # nobody holds the blob any more
    finally:
        os.close(fd)


def test_a_lingering_id_goes_to_the_successor_which_reuses_it_and_closes_it(hub, model, mount_factory, tmp_path):
    mount = mount_factory(ONE_MODEL_MANIFEST, hub.endpoint, keeper=True, env=traced_env(tmp_path, 4))
    served = Traced(mount, 0, tmp_path / "backing-ids")
    path = served_file(mount)
    path.read_bytes()
    assert eventually(lambda: served.passthrough("model/model.gguf") == "yes (on open)", timeout=30)
    with open(path, "rb"):
        pass
    old = mount.daemon_pid()
    [(_, _, backing_id)] = served.ids("open")
    upgrade = subprocess.run([sys.executable, "-m", "vfs", "upgrade", str(mount.mountpoint)],
                             capture_output=True, text=True, timeout=120)
    assert upgrade.returncode == 0, upgrade.stderr
    new = wait_for_successor(mount, old)
    # The predecessor left the id to its successor, which answers a reopen with it.
    assert served.ids("close") == []
    assert path.read_bytes() == model.read_bytes()
    assert served.ids("open") == [(old, "open", backing_id)]
    assert eventually(lambda: served.ids("close") == [(new, "close", backing_id)], timeout=20)
    assert path.read_bytes() == model.read_bytes()      # a new id, registered by the successor
    assert [pid for pid, _, _ in served.ids("open")] == [old, new]
