"""FUSE passthrough through a real mount: who serves a file, and that its bytes are right."""

import os
import re
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

import pyfuse3
from conftest import eventually, needs_fuse, unexpected_log_lines
from vfs.testing.models import write_gguf, write_safetensors_dir

MiB = 1024 * 1024
FAULTS = Path(__file__).parent / "passthrough_faults"


def kernel_has_passthrough():
    major, minor = (int(part) for part in os.uname().release.split(".")[:2])
    return (major, minor) >= (6, 9)


needs_passthrough = pytest.mark.skipif(
    not (hasattr(pyfuse3, "backing_open") and kernel_has_passthrough()),
    reason="needs pyfuse3 built by contrib/build-passthrough.sh and Linux >= 6.9")
pytestmark = [needs_fuse, pytest.mark.fuse, needs_passthrough]

MANIFEST = """
models:
  llama:
    path: /models/llama/model.gguf
    backend: llama.cpp
    hf: org/llama-GGUF
    file: llama.gguf
  weights:
    path: /models/weights/
    backend: vllm
    hf: org/weights
  other:
    path: /models/other/
    backend: vllm
    hf: org/other
"""


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def sources(hub, tmp_path, random_file):
    gguf = tmp_path / "sources" / "llama.gguf"
    gguf.parent.mkdir(parents=True, exist_ok=True)
    write_gguf(gguf, size_mib=6)
    weights = {str(p.relative_to(tmp_path / "st")): p
               for p in write_safetensors_dir(tmp_path / "st").rglob("*") if p.is_file()}
    weights["big.bin"] = random_file("big.bin", 9 * MiB + 4321)
    hub.add_repo("org/llama-GGUF", files={"llama.gguf": gguf})
    hub.add_repo("org/weights", files=weights)
    hub.add_repo("org/other", files={"other.bin": random_file("other.bin", 6 * MiB, seed=9)})
    return {"gguf": gguf, "weights": weights}


class Served:
    """A mount with its API, to count the daemon's read handler calls."""

    def __init__(self, mount, port):
        self.mount, self.port, self.root = mount, port, mount.mountpoint

    def reads(self):
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=30) as answer:
            text = answer.read().decode()
        found = re.search(r'^lamina_fuse_operations_total\{op="read"\} (\S+)$', text, re.M)
        return int(float(found.group(1))) if found else 0

    def passthrough(self, relative):
        return os.getxattr(self.root / relative, "user.lamina.passthrough").decode()

    def verified(self, relative):
        return os.getxattr(self.root / relative, "user.lamina.verified") == b"yes"


def start(hub, mount_factory, *args, env=None):
    port = free_port()
    mount = mount_factory(MANIFEST, hub.endpoint, args=("--block-size", "1M", "--api", f"127.0.0.1:{port}",
                                                        *args), env=env)
    return Served(mount, port)


@pytest.fixture
def served(hub, sources, mount_factory):
    return start(hub, mount_factory)


def fill(served, relative):
    """Read the file once through the daemon and wait until its blob is verified."""
    with open(served.root / relative, "rb") as f:
        while f.read(MiB):
            pass
    assert eventually(lambda: served.verified(relative), timeout=30)


def drop_mount_pages(path):
    """Drop the kernel's cached pages of a mounted file, so a daemon-served open must ask again."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def run_elsewhere(code, *args):
    """Client code in another process (an mmap page fault there must not hold this GIL)."""
    result = subprocess.run([sys.executable, "-c", code, *map(str, args)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout


READ_MMAP_SENDFILE = """
import mmap, os, sys, hashlib
path, out = sys.argv[1], sys.argv[2]
with open(path, "rb") as f:
    by_read = hashlib.sha256(f.read()).hexdigest()
    with mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as m:
        by_mmap = hashlib.sha256(m).hexdigest()
with open(path, "rb") as f, open(out, "wb") as sink:
    size, sent = os.fstat(f.fileno()).st_size, 0
    while sent < size:
        sent += os.sendfile(sink.fileno(), f.fileno(), sent, size - sent)
with open(out, "rb") as copy:
    by_sendfile = hashlib.sha256(copy.read()).hexdigest()
print(by_read, by_mmap, by_sendfile)
"""


def sha256_of(path):
    import hashlib
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def test_a_verified_file_is_served_by_passthrough_read_mmap_and_sendfile_alike(served, sources, tmp_path):
    fill(served, "weights/big.bin")
    drop_mount_pages(served.root / "weights/big.bin")
    before = served.reads()
    with open(served.root / "weights/big.bin", "rb"):
        assert served.passthrough("weights/big.bin") == "yes"
        hashes = run_elsewhere(READ_MMAP_SENDFILE, served.root / "weights/big.bin", tmp_path / "copy").split()
    assert hashes == [sha256_of(sources["weights"]["big.bin"])] * 3
    assert served.reads() == before           # the daemon's read handler was never called
    assert not unexpected_log_lines(served.mount.log_text())


def test_gguf_and_safetensors_clients_load_through_passthrough_without_the_daemon(served, sources):
    fill(served, "llama/model.gguf")
    names = [name for name in sources["weights"] if name.endswith(".safetensors")]
    for name in names:
        fill(served, f"weights/{name}")
        drop_mount_pages(served.root / "weights" / name)
    drop_mount_pages(served.root / "llama/model.gguf")
    before = served.reads()
    code = """
import sys, hashlib
import gguf
from safetensors import safe_open
reader = gguf.GGUFReader(sys.argv[1])
print(len(reader.tensors), hashlib.sha256(b"".join(t.data.tobytes() for t in reader.tensors)).hexdigest())
for path in sys.argv[2:]:
    with safe_open(path, "np") as f:
        print(path.rsplit("/", 1)[1], hashlib.sha256(b"".join(f.get_tensor(k).tobytes() for k in sorted(f.keys()))).hexdigest())
"""
    mounted = run_elsewhere(code, served.root / "llama/model.gguf", *(served.root / "weights" / n for n in names))
    local = run_elsewhere(code, sources["gguf"], *(sources["weights"][n] for n in names))
    assert mounted.split()[0] != "0" and mounted.split()[1:] == local.split()[1:]
    assert served.reads() == before


def test_a_file_completed_while_open_switches_only_for_opens_after_the_last_daemon_open(served, sources):
    path, expected = served.root / "weights/big.bin", sources["weights"]["big.bin"].read_bytes()
    first = open(path, "rb")
    try:
        assert first.read(MiB) == expected[:MiB]
        assert served.passthrough("weights/big.bin") == "no: open through the daemon; opens after those close use passthrough"
        assert first.read() == expected[MiB:]
        assert eventually(lambda: served.verified("weights/big.bin"), timeout=30)
        with open(path, "rb") as second:            # completed, but the inode is in the daemon's mode
            assert served.passthrough("weights/big.bin").startswith("no: open through the daemon")
            drop_mount_pages(path)
            before = served.reads()
            assert second.read() == expected
            assert served.reads() > before       # served by the daemon, correctly
    finally:
        first.close()
    # RELEASE reaches the daemon just after close returns.
    assert eventually(lambda: served.passthrough("weights/big.bin") == "yes (on open)")
    drop_mount_pages(path)
    before = served.reads()
    with open(path, "rb") as third:
        assert served.passthrough("weights/big.bin") == "yes"
        assert third.read() == expected
    assert served.reads() == before


def test_concurrent_opens_share_one_backing_id_closed_on_the_last_release(served, sources):
    fill(served, "weights/big.bin")
    path, expected = served.root / "weights/big.bin", sources["weights"]["big.bin"].read_bytes()
    files = [open(path, "rb") for _ in range(3)]
    for f in files:
        assert f.read() == expected
    files.pop().close()
    assert served.passthrough("weights/big.bin") == "yes"
    for f in files:
        f.close()
    assert eventually(lambda: served.passthrough("weights/big.bin") == "yes (on open)")
    with open(path, "rb") as again:                 # a new id for a new round of opens
        assert again.read() == expected
    assert not unexpected_log_lines(served.mount.log_text())


def test_eviction_never_takes_a_blob_with_a_live_backing_id(hub, sources, mount_factory, tmp_path):
    served = start(hub, mount_factory, "--max-size", "12M")
    fill(served, "weights/big.bin")
    path, expected = served.root / "weights/big.bin", sources["weights"]["big.bin"].read_bytes()
    with open(path, "rb") as held:
        assert served.passthrough("weights/big.bin") == "yes"
        # 6 MiB more does not fit beside 9 MiB under 12M: eviction runs, and must skip big.bin.
        assert (served.root / "other/other.bin").read_bytes() == sources_bytes(tmp_path, "other.bin")
        gc = subprocess.run([sys.executable, "-m", "vfs", "gc", "--max-size", "0", "-m", str(served.mount.manifest),
                             "--cache-dir", str(served.mount.cache_dir)], capture_output=True, text=True,
                            env=served.mount.env, timeout=60)
        assert gc.returncode == 0, gc.stderr
        drop_mount_pages(path)
        assert held.read() == expected
        assert served.verified("weights/big.bin")
    assert served.mount.process.poll() is None


def sources_bytes(tmp_path, name):
    return (tmp_path / "sources" / name).read_bytes()


def test_info_says_per_file_whether_the_mount_serves_it_by_passthrough(served, sources):
    fill(served, "weights/big.bin")
    info = subprocess.run([sys.executable, "-m", "vfs", "info", "weights", "-m", str(served.mount.manifest),
                           "--cache-dir", str(served.mount.cache_dir)], capture_output=True, text=True,
                          env=served.mount.env, timeout=60)
    assert info.returncode == 0, info.stderr
    lines = {line.split()[0]: line for line in info.stdout.splitlines() if line.startswith("  ")}
    assert lines["big.bin"].endswith("passthrough: yes")
    others = [line for name, line in lines.items() if name != "big.bin"]
    assert others and all(line.endswith("passthrough: no: not complete and verified yet") for line in others)


FALLBACKS = {
    "eperm": "passthrough off: the kernel refused a backing file: not permitted",
    "eloop": "passthrough off: the kernel refused a backing file: the cache's file system is stacked too deep",
    "stock": "passthrough off: pyfuse3 has no passthrough support",
    "old-kernel": "passthrough off: the kernel (",
    "non-root": "passthrough off: the daemon is not root",
    "flag": "passthrough off: turned off (--no-passthrough)",
}


@pytest.mark.parametrize("fault", sorted(FALLBACKS))
def test_each_reason_passthrough_is_refused_falls_back_with_one_log_line(fault, hub, sources, mount_factory):
    env = {"PYTHONPATH": os.pathsep.join([str(FAULTS), os.environ.get("PYTHONPATH", "")]),
           "LAMINA_TEST_PASSTHROUGH_FAULT": "" if fault == "flag" else fault}
    served = start(hub, mount_factory, *(["--no-passthrough"] if fault == "flag" else []), env=env)
    path, expected = served.root / "weights/big.bin", sources["weights"]["big.bin"].read_bytes()
    fill(served, "weights/big.bin")
    for _ in range(2):
        drop_mount_pages(path)
        before = served.reads()
        with open(path, "rb") as f:
            assert f.read() == expected
        assert served.reads() > before               # the daemon served it
    assert served.passthrough("weights/big.bin").startswith("no: ")
    log = served.mount.log_text()
    assert sum(FALLBACKS[fault] in line for line in log.splitlines()) == 1, log
    allowed = ("kernel refused a backing file",) if fault in ("eperm", "eloop") else ()
    assert not unexpected_log_lines(log, allowed=allowed)


def test_a_partial_blob_is_served_by_the_daemon_and_logged_once(served, sources):
    path, expected = served.root / "weights/big.bin", sources["weights"]["big.bin"].read_bytes()
    for _ in range(2):
        with open(path, "rb") as f:
            assert f.read(100) == expected[:100]
    assert eventually(lambda: served.passthrough("weights/big.bin") == "no: not complete and verified yet")
    log = served.mount.log_text()
    assert sum("served by the daemon until its blob is complete" in line for line in log.splitlines()) == 1


def test_o_direct_opens_read_exact_bytes_beside_passthrough_opens(served, sources):
    import mmap
    fill(served, "weights/big.bin")
    path, expected = served.root / "weights/big.bin", sources["weights"]["big.bin"].read_bytes()
    # Before any passthrough open: the daemon serves O_DIRECT (direct_io), unaligned reads too.
    direct = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        assert os.pread(direct, 1000, 12345) == expected[12345:13345]
        with open(path, "rb") as passed:            # the O_DIRECT open does not hold it off
            assert served.passthrough("weights/big.bin") == "yes"
            assert passed.read() == expected
            # Now every open of the inode must pass through; O_DIRECT then follows the cache
            # file system's rules (aligned offset, length and buffer), as a local file does.
            aligned = os.open(path, os.O_RDONLY | os.O_DIRECT)
            try:
                buffer = mmap.mmap(-1, 8192)
                assert os.preadv(aligned, [buffer], 4096) == 8192
                assert buffer[:] == expected[4096:12288]
            finally:
                os.close(aligned)
        assert os.pread(direct, 5000, 3 * MiB + 7) == expected[3 * MiB + 7:3 * MiB + 5007]
    finally:
        os.close(direct)
