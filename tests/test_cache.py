"""The block cache through a real mount: durable, verified, shared, offline, bounded, reused."""

import hashlib
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from conftest import eventually, needs_fuse
from vfs.testing.hubsim import Fault

pytestmark = [needs_fuse, pytest.mark.fuse]

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
    path: /models/small/
    backend: vllm
    hf: org/small
"""


@pytest.fixture
def big_source(hub, random_file):
    source = random_file("big.gguf", 24 * MiB + 777)
    hub.add_repo("org/big", files={"big.gguf": source})
    small = random_file("small.safetensors", 3 * MiB, seed=2)
    hub.add_repo("org/small", files={"model.safetensors": small, "config.json": b'{"x": 1}\n'})
    return source


def xattr(path, name):
    return os.getxattr(path, f"user.lamina.{name}").decode()


def cdn_bytes(hub):
    return hub.bytes_sent(origin="cdn")


def sha256_of(path):
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(MiB), b""):
            digest.update(chunk)
    return digest.hexdigest()


def drop_page_cache():
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def blob_data_file(cache_dir, content_id):
    algo, digest = content_id.split(":")
    return Path(cache_dir) / "blobs" / algo / digest[:2] / f"{digest}.data"


def test_sigkill_mid_download_keeps_every_block_it_reported(hub, big_source, mount_factory, tmp_path):
    mount = mount_factory(MANIFEST, hub.endpoint, args=BLOCK)
    path = mount.mountpoint / "big" / "model.gguf"
    hub.add_fault(Fault("delay", origin="cdn", seconds=0.05))      # a slow link: kill lands mid-download
    reader = subprocess.Popen(["cat", str(path)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert eventually(lambda: int(xattr(path, "cached_bytes")) >= 6 * MiB, timeout=30)
    mount.process.send_signal(signal.SIGKILL)
    mount.process.wait()
    reader.wait(timeout=30)
    mount.kill()
    hub.clear_faults()

    again = mount_factory(MANIFEST, hub.endpoint, cache_dir=tmp_path / "cache", args=BLOCK)
    path = again.mountpoint / "big" / "model.gguf"
    present = int(xattr(path, "cached_bytes"))
    print(f"after SIGKILL: {present} of {big_source.stat().st_size} bytes present")
    assert 6 * MiB <= present < big_source.stat().st_size
    hub.clear_log()
    assert sha256_of(path) == sha256_of(big_source)
    assert cdn_bytes(hub) == big_source.stat().st_size - present      # nothing present fetched again


def test_wrong_bytes_from_the_hub_are_caught_logged_and_fetched_again(hub, big_source, mount_factory):
    mount = mount_factory(MANIFEST, hub.endpoint, args=BLOCK)
    mount.expect_log_errors("does not match its content id")
    path = mount.mountpoint / "big" / "model.gguf"
    hub.add_fault(Fault("wrong_bytes", origin="cdn", times=1))
    with open(path, "rb") as handle:
        handle.read()
    assert eventually(lambda: "does not match its content id" in mount.log_text())
    assert xattr(path, "verified") == "no"
    line = next(l for l in mount.log_text().splitlines() if "does not match" in l)
    assert "big/big.gguf" in line
    # No drop of the page cache here: the mount made the kernel forget the wrong pages.
    assert sha256_of(path) == sha256_of(big_source)
    assert eventually(lambda: xattr(path, "verified") == "yes")


def test_a_small_file_with_wrong_bytes_is_never_served(hub, big_source, mount_factory):
    mount = mount_factory(MANIFEST, hub.endpoint, args=BLOCK)
    mount.expect_log_errors("bytes from the Hub do not match")
    path = mount.mountpoint / "small" / "config.json"
    hub.add_fault(Fault("wrong_bytes", path="config.json", times=None))
    with pytest.raises(OSError) as failure:
        path.read_bytes()
    print("reader saw:", failure.value)
    hub.clear_faults()
    assert path.read_bytes() == b'{"x": 1}\n'


def test_a_block_corrupted_on_disk_is_caught_and_fetched_again(hub, big_source, mount_factory, tmp_path):
    mount = mount_factory(MANIFEST, hub.endpoint, args=BLOCK)
    path = mount.mountpoint / "big" / "model.gguf"
    sha256_of(path)
    assert eventually(lambda: xattr(path, "verified") == "yes")
    data_file = blob_data_file(tmp_path / "cache", xattr(path, "content_id"))
    mount.stop()
    with open(data_file, "r+b") as blob:
        blob.seek(5 * MiB + 10)
        blob.write(b"\xffrot\xff")
    again = mount_factory(MANIFEST, hub.endpoint, cache_dir=tmp_path / "cache", args=BLOCK)
    again.expect_log_errors("is corrupt on disk; fetching it again")
    hub.clear_log()
    assert sha256_of(again.mountpoint / "big" / "model.gguf") == sha256_of(big_source)
    assert "corrupt on disk" in again.log_text()
    assert cdn_bytes(hub) == MiB          # exactly the one bad block


def test_four_cold_readers_share_one_download(hub, big_source, mount_factory):
    mount = mount_factory(MANIFEST, hub.endpoint, args=BLOCK)
    path = mount.mountpoint / "big" / "model.gguf"
    readers = [subprocess.Popen(["sha256sum", str(path)], stdout=subprocess.PIPE, text=True) for _ in range(4)]
    digests = {reader.communicate(timeout=60)[0].split()[0] for reader in readers}
    assert digests == {sha256_of(big_source)}
    ratio = cdn_bytes(hub) / big_source.stat().st_size
    print(f"4 readers: server sent {ratio:.3f}x the file")
    assert ratio <= 1.02


def test_direct_io_readers_share_one_download_too(hub, big_source, mount_factory):
    mount = mount_factory(MANIFEST, hub.endpoint, args=BLOCK)
    path = mount.mountpoint / "big" / "model.gguf"
    command = ["dd", f"if={path}", "of=/dev/null", "bs=1M", "iflag=direct", "status=none"]
    readers = [subprocess.Popen(command) for _ in range(3)]
    assert all(reader.wait(timeout=60) == 0 for reader in readers)
    assert cdn_bytes(hub) <= 1.02 * big_source.stat().st_size


def test_offline_mount_lists_serves_cached_bytes_and_fails_uncached_reads_fast(
        hub, big_source, mount_factory, tmp_path):
    mount = mount_factory(MANIFEST, hub.endpoint, args=BLOCK)
    path = mount.mountpoint / "big" / "model.gguf"
    with open(path, "rb") as handle:
        head = handle.read(3 * MiB)
    assert eventually(lambda: int(xattr(path, "cached_bytes")) >= 3 * MiB)
    mount.stop()
    hub.stop()

    offline = mount_factory(MANIFEST, hub.endpoint, cache_dir=tmp_path / "cache",
                            args=BLOCK + ("--read-deadline", "5"))
    offline.expect_log_errors("not cached, offline (the Hub is unreachable)")      # the uncached read, Hub gone
    root = offline.mountpoint
    assert sorted(os.listdir(root)) == ["big", "small"]
    assert os.stat(root / "big" / "model.gguf").st_size == big_source.stat().st_size
    assert os.stat(root / "small" / "model.safetensors").st_size == 3 * MiB
    with open(root / "big" / "model.gguf", "rb") as handle:
        assert handle.read(3 * MiB) == head
        started = time.monotonic()
        with pytest.raises(OSError) as failure:
            os.pread(handle.fileno(), 4096, 20 * MiB)
        waited = time.monotonic() - started
    print(f"uncached read offline: {failure.value} after {waited:.1f}s")
    assert failure.value.errno == 5 and waited < 15


def test_eviction_under_max_size_keeps_open_and_kept_files(hub, random_file, mount_factory):
    files = {f"m{i}": random_file(f"m{i}.gguf", 4 * MiB, seed=10 + i) for i in range(4)}
    manifest = "models:\n"
    for name, source in files.items():
        hub.add_repo(f"org/{name}", files={"w.gguf": source})
        keep = "    keep: true\n" if name == "m0" else ""
        manifest += (f"  {name}:\n    path: /models/{name}/w.gguf\n    backend: llama.cpp\n"
                     f"    hf: org/{name}\n    file: w.gguf\n{keep}")
    mount = mount_factory(manifest, hub.endpoint, args=BLOCK + ("--max-size", "10M"))
    root = mount.mountpoint
    kept_open = open(root / "m1" / "w.gguf", "rb")
    try:
        for name in ("m0", "m1", "m2", "m3"):
            (root / name / "w.gguf").read_bytes()
            time.sleep(0.3)      # distinct last-use times
        cached = {name: int(xattr(root / name / "w.gguf", "cached_bytes")) for name in files}
        print("cached after reading all four under a 10 MiB cap:", cached)
        assert cached["m0"] == 4 * MiB          # kept
        assert cached["m1"] == 4 * MiB          # open
        assert cached["m2"] == 0                # least recently used, evicted
        assert sum(cached.values()) <= 12 * MiB
    finally:
        kept_open.close()


@pytest.fixture
def tiny_tmpfs(tmp_path):
    target = tmp_path / "tmpfs-cache"
    target.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(target)], check=True)
    yield target
    subprocess.run(["umount", "-l", str(target)])


@pytest.fixture(params=["ramfs", "overlay"])
def odd_filesystem(request, tmp_path):
    """ramfs has neither O_DIRECT (EINVAL) nor RWF_NOWAIT reads (EOPNOTSUPP); overlayfs, a
    container's root filesystem, has no RWF_NOWAIT."""
    target = tmp_path / f"{request.param}-cache"
    target.mkdir()
    if request.param == "ramfs":
        command = ["mount", "-t", "ramfs", "ramfs", str(target)]
    else:
        for part in ("lower", "upper", "work"):
            (tmp_path / part).mkdir()
        layers = f"lowerdir={tmp_path / 'lower'},upperdir={tmp_path / 'upper'},workdir={tmp_path / 'work'}"
        command = ["mount", "-t", "overlay", "overlay", "-o", layers, str(target)]
    subprocess.run(command, check=True)
    yield target
    subprocess.run(["umount", "-l", str(target)])


# The cache's filesystem comes before mount_factory in these tests' arguments: fixtures are
# torn down last set up first, so the mounts stop before their cache's filesystem goes (the
# other order unmounted it under a daemon still storing blocks read ahead: logged errors).
def test_a_cache_on_a_filesystem_without_o_direct_or_nowait_reads_still_works(
        hub, big_source, odd_filesystem, mount_factory):
    mount = mount_factory(MANIFEST, hub.endpoint, cache_dir=odd_filesystem / "cache", args=BLOCK)
    path = mount.mountpoint / "big" / "model.gguf"
    assert sha256_of(path) == sha256_of(big_source)
    assert eventually(lambda: xattr(path, "verified") == "yes")
    mount.stop()
    # Two block buffers: blocks read once leave memory, and re-reads go to the data file.
    again = mount_factory(MANIFEST, hub.endpoint, cache_dir=odd_filesystem / "cache",
                          args=(*BLOCK, "--memory", "2M"))
    hub.clear_log()
    path = again.mountpoint / "big" / "model.gguf"
    assert sha256_of(path) == sha256_of(big_source)      # from the cache: loads (crc checked)
    drop_page_cache()
    with open(path, "rb") as handle:                     # re-reads: the RWF_NOWAIT path
        for offset in (5 * MiB + 3, 17 * MiB, 24 * MiB):
            handle.seek(offset)
            assert handle.read(4096) == big_source.read_bytes()[offset:offset + 4096]
    assert cdn_bytes(hub) == 0
    assert "Traceback" not in again.log_text() and "ERROR" not in again.log_text()


def test_a_full_disk_never_corrupts_the_cache_and_reads_stay_exact(hub, big_source, tiny_tmpfs, mount_factory):
    mount = mount_factory(MANIFEST, hub.endpoint, cache_dir=tiny_tmpfs / "cache", args=BLOCK)
    mount.expect_log_errors("not cached (disk full); served from memory")
    path = mount.mountpoint / "big" / "model.gguf"
    assert sha256_of(path) == sha256_of(big_source)
    drop_page_cache()
    assert sha256_of(path) == sha256_of(big_source)
    assert "not cached" in mount.log_text() or "evicted" in mount.log_text()
    print("log:", [l for l in mount.log_text().splitlines() if "cached" in l or "evict" in l][:3])


def test_a_blob_in_the_hugging_face_cache_is_used_instead_of_downloading(hub, big_source, mount_factory, tmp_path):
    hf_cache = tmp_path / "hf-cache"
    content = hashlib.sha256(big_source.read_bytes()).hexdigest()
    planted = hf_cache / "models--org--big" / "blobs" / content
    planted.parent.mkdir(parents=True)
    os.link(big_source, planted)
    mount = mount_factory(MANIFEST, hub.endpoint, args=BLOCK, env={"HF_HUB_CACHE": str(hf_cache)})
    path = mount.mountpoint / "big" / "model.gguf"
    assert sha256_of(path) == content
    assert cdn_bytes(hub) == 0
    assert eventually(lambda: xattr(path, "verified") == "yes")


def test_a_wrong_blob_in_the_hugging_face_cache_is_not_trusted(hub, big_source, mount_factory, tmp_path, random_file):
    hf_cache = tmp_path / "hf-cache"
    content = hashlib.sha256(big_source.read_bytes()).hexdigest()
    planted = hf_cache / "models--org--big" / "blobs" / content
    planted.parent.mkdir(parents=True)
    planted.write_bytes(random_file("impostor", big_source.stat().st_size, seed=99).read_bytes())
    mount = mount_factory(MANIFEST, hub.endpoint, args=BLOCK, env={"HF_HUB_CACHE": str(hf_cache)})
    mount.expect_log_errors("does not match its content id")
    path = mount.mountpoint / "big" / "model.gguf"
    sha256_of(path)
    assert eventually(lambda: "does not match its content id" in mount.log_text())
    drop_page_cache()
    assert sha256_of(path) == content
    assert eventually(lambda: xattr(path, "verified") == "yes")


def test_one_blob_serves_every_model_and_revision_naming_the_same_content(hub, big_source, mount_factory):
    hub.add_repo("org/mirror", files={"renamed.gguf": big_source, "other.txt": b"x"})
    manifest = MANIFEST + """  mirror:
    path: /models/mirror/
    backend: llama.cpp
    hf: org/mirror
    include: ["*.gguf"]
"""
    mount = mount_factory(manifest, hub.endpoint, args=BLOCK)
    first = mount.mountpoint / "big" / "model.gguf"
    second = mount.mountpoint / "mirror" / "renamed.gguf"
    assert xattr(first, "content_id") == xattr(second, "content_id")
    assert sha256_of(first) == sha256_of(big_source)
    assert eventually(lambda: xattr(second, "verified") == "yes")
    assert sha256_of(second) == sha256_of(big_source)
    assert cdn_bytes(hub) == big_source.stat().st_size


def page_cache_bytes(path):
    """Bytes of `path` the page cache holds (util-linux fincore)."""
    out = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", str(path)],
                         capture_output=True, text=True, check=True).stdout
    return int(out.split()[0])


def test_the_cache_keeps_no_second_copy_of_a_file_in_the_page_cache(hub, big_source, mount_factory, tmp_path):
    # Blocks go to disk and come back with O_DIRECT: the page cache holds the mounted
    # file's pages (what readers use), not a second copy of the cache's data file.
    # The daemon's path: fincore of a passthrough file would report its backing file's pages.
    mount = mount_factory(MANIFEST, hub.endpoint, args=BLOCK + ("--no-passthrough",))
    path = mount.mountpoint / "big" / "model.gguf"
    assert sha256_of(path) == sha256_of(big_source)
    assert eventually(lambda: xattr(path, "verified") == "yes")
    data_file = blob_data_file(tmp_path / "cache", xattr(path, "content_id"))
    assert page_cache_bytes(data_file) <= 64 * 1024          # at most the unaligned tail
    assert page_cache_bytes(path) >= big_source.stat().st_size // 2


def test_a_block_size_o_direct_cannot_use_still_caches_exact_bytes(hub, big_source, mount_factory, tmp_path):
    odd = ("--block-size", "1000001")       # not a multiple of the device block: buffered I/O
    mount = mount_factory(MANIFEST, hub.endpoint, args=odd)
    path = mount.mountpoint / "big" / "model.gguf"
    assert sha256_of(path) == sha256_of(big_source)
    assert eventually(lambda: xattr(path, "verified") == "yes")
    mount.stop()
    drop_page_cache()
    again = mount_factory(MANIFEST, hub.endpoint, cache_dir=tmp_path / "cache", args=odd)
    hub.clear_log()
    assert sha256_of(again.mountpoint / "big" / "model.gguf") == sha256_of(big_source)
    assert cdn_bytes(hub) == 0
