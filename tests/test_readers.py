"""The three-reader harness sees what it is there to see: wrong bytes, errors, a daemon's death."""

import time

import pytest

from conftest import needs_fuse
from vfs.testing.readers import ONE_MODEL_MANIFEST, Readers, read_through, write_reference

MiB = 1024 * 1024


def test_readers_of_a_file_with_other_bytes_count_wrong_bytes(tmp_path):
    served = write_reference(tmp_path / "served", 8 * MiB, seed=1)
    other = write_reference(tmp_path / "other", 8 * MiB, seed=2)
    with Readers(served, other) as readers:
        readers.wait_for_progress(20)
    results = readers.results
    assert {r.kind for r in results.readers if r.wrong_bytes} == {"pread", "mmap"}
    assert results.wrong_bytes > MiB
    assert not results.ok


def test_readers_of_the_same_bytes_find_nothing(tmp_path):
    served = write_reference(tmp_path / "served", 8 * MiB, seed=1)
    with Readers(served, served, drop_every=0.2) as readers:
        readers.wait_for_progress(20)
        time.sleep(0.5)
    results = readers.results
    assert results.ok, results.problems()
    assert all(r.ops >= 20 for r in results.readers if r.kind != "drop")
    assert {r.kind for r in results.readers} == {"pread", "mmap", "stat"}


@needs_fuse
@pytest.mark.slow
def test_readers_see_a_killed_daemon_as_errors(hub, mount_factory, tmp_path):
    """Without anyone holding the connection, a SIGKILL is an outage the harness must report."""
    reference = write_reference(tmp_path / "model.gguf", 32 * MiB)
    hub.add_repo("readers/model", files={"model.gguf": reference})
    # Through the daemon: a passthrough file's open handles are served by the kernel alone.
    mount = mount_factory(ONE_MODEL_MANIFEST, hub.endpoint, args=["--no-passthrough"])
    path = mount.mountpoint / "model" / "model.gguf"
    read_through(path)
    with Readers(path, reference, drop_every=0.5) as readers:
        mount.process.kill()
        mount.process.wait()
        time.sleep(1.5)
    results = readers.results
    assert results.errors >= 3, results.summary()      # every reader, each its own way
    assert results.wrong_bytes == 0
    assert any(r.died == "killed by SIGBUS" or "ENOTCONN" in r.errors or "ECONNABORTED" in r.errors
               for r in results.readers if r.kind == "mmap"), results.problems()
