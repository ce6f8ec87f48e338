"""A real FUSE mount in a subprocess, against the Hub simulator: what a user sees."""

import errno
import os
import random
import stat
from pathlib import Path

import pytest

from conftest import eventually, needs_fuse, run_elsewhere, unexpected_log_lines
from vfs.testing.models import write_gguf, write_safetensors_dir

pytestmark = [needs_fuse, pytest.mark.fuse]

MiB = 1024 * 1024
BLOCK = ("--block-size", "1M")      # small blocks: every test crosses many block edges

MANIFEST = """
models:
  tiny-llama:
    path: /models/tiny-llama/model.gguf
    backend: llama.cpp
    hf: org/tiny-GGUF
    file: tiny.Q4_K_M.gguf
  weights:
    path: /models/weights/
    backend: vllm
    hf: org/weights
    exclude: ["*.md"]
  by-hand:
    path: /models/by-hand/
    backend: llama.cpp
"""


def repo_files(directory):
    root = Path(directory)
    return {str(p.relative_to(root)): p for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def sources(hub, tmp_path, random_file):
    gguf = tmp_path / "sources" / "tiny.gguf"
    gguf.parent.mkdir(parents=True, exist_ok=True)
    write_gguf(gguf, size_mib=6)
    weights = repo_files(write_safetensors_dir(tmp_path / "weights"))
    weights["big.bin"] = random_file("big.bin", 5 * MiB + 12345)
    weights["notes.md"] = b"not shown: excluded by the manifest\n"
    weights["empty.txt"] = b""
    hub.add_repo("org/tiny-GGUF", files={"tiny.Q4_K_M.gguf": gguf, "README.md": b"# tiny\n"})
    hub.add_repo("org/weights", files=weights)
    return {"gguf": gguf, "weights": weights}


@pytest.fixture
def mounted(hub, sources, mount_factory):
    return mount_factory(MANIFEST, hub.endpoint, args=BLOCK)


def expected_bytes(value):
    return value.read_bytes() if isinstance(value, Path) else value


def test_root_lists_exactly_the_manifest_models(mounted):
    assert sorted(os.listdir(mounted.mountpoint)) == ["by-hand", "tiny-llama", "weights"]
    assert os.listdir(mounted.mountpoint / "tiny-llama") == ["model.gguf"]
    assert os.listdir(mounted.mountpoint / "by-hand") == []


def test_sizes_are_real_before_any_byte_is_fetched(hub, sources, mounted):
    info = os.stat(mounted.mountpoint / "tiny-llama" / "model.gguf")
    assert info.st_size == sources["gguf"].stat().st_size
    assert stat.S_ISREG(info.st_mode) and stat.S_IMODE(info.st_mode) == 0o444
    assert os.stat(mounted.mountpoint / "weights" / "big.bin").st_size == 5 * MiB + 12345
    assert not [r for r in hub.log if r.method == "GET" and "/resolve/" in r.path or r.origin == "cdn"]


def test_single_file_model_reads_byte_exact_under_its_manifest_name(sources, mounted):
    data = (mounted.mountpoint / "tiny-llama" / "model.gguf").read_bytes()
    assert data == sources["gguf"].read_bytes()


def test_directory_model_shows_the_repo_files_with_subfolders(sources, mounted):
    root = mounted.mountpoint / "weights"
    shown = {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}
    assert shown == set(sources["weights"]) - {"notes.md"}
    assert any("/" in name for name in shown)
    for name in shown:
        assert (root / name).read_bytes() == expected_bytes(sources["weights"][name]), name


def test_large_file_reads_sequentially_at_random_offsets_and_through_mmap(sources, mounted):
    expected = sources["weights"]["big.bin"].read_bytes()
    path = mounted.mountpoint / "weights" / "big.bin"
    generator = random.Random(7)
    with open(path, "rb") as handle:
        for _ in range(200):
            offset = generator.randrange(len(expected))
            length = generator.choice([1, 511, 4096, 65536, 3 * MiB])
            assert os.pread(handle.fileno(), length, offset) == expected[offset:offset + length]
    with open(path, "rb", buffering=0) as handle:
        chunks = iter(lambda: handle.read(1 << 17), b"")
        assert b"".join(chunks) == expected


MMAP_DIGEST = """
import hashlib, mmap, sys
with open(sys.argv[1], "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as view:
    print(hashlib.sha256(view).hexdigest(), view[int(sys.argv[2]):int(sys.argv[2]) + 6].hex())
"""


def test_a_cold_file_reads_through_mmap(sources, mounted):
    import hashlib
    expected = sources["weights"]["big.bin"].read_bytes()
    out = run_elsewhere(MMAP_DIGEST, mounted.mountpoint / "weights" / "big.bin", MiB - 3)
    assert out.split() == [hashlib.sha256(expected).hexdigest(), expected[MiB - 3:MiB + 3].hex()]


GGUF_SUMMARY = """
import hashlib, sys, gguf
reader = gguf.GGUFReader(sys.argv[1])
print(reader.fields["general.architecture"].contents())
for tensor in reader.tensors:
    print(tensor.name, hashlib.sha256(tensor.data.tobytes()).hexdigest())
"""


def test_gguf_reader_opens_the_model_through_the_mount(sources, mounted):
    through_mount = run_elsewhere(GGUF_SUMMARY, mounted.mountpoint / "tiny-llama" / "model.gguf")
    assert through_mount.splitlines()[0] == "llama"
    assert len(through_mount.splitlines()) > 2
    assert through_mount == run_elsewhere(GGUF_SUMMARY, sources["gguf"])


@pytest.mark.parametrize("attempt", [
    lambda p: open(p / "tiny-llama" / "model.gguf", "r+b"),
    lambda p: open(p / "tiny-llama" / "new.gguf", "wb"),
    lambda p: os.mkdir(p / "new-model"),
    lambda p: os.unlink(p / "tiny-llama" / "model.gguf"),
    lambda p: os.rmdir(p / "by-hand"),
    lambda p: os.rename(p / "tiny-llama" / "model.gguf", p / "tiny-llama" / "x.gguf"),
    lambda p: os.symlink("model.gguf", p / "tiny-llama" / "link"),
    lambda p: os.link(p / "tiny-llama" / "model.gguf", p / "tiny-llama" / "hard"),
    lambda p: os.truncate(p / "tiny-llama" / "model.gguf", 0),
    lambda p: os.chmod(p / "tiny-llama" / "model.gguf", 0o644),
    lambda p: os.chown(p / "tiny-llama" / "model.gguf", 1, 1),
    lambda p: os.utime(p / "tiny-llama" / "model.gguf", (0, 0)),
    lambda p: os.setxattr(p / "tiny-llama" / "model.gguf", "user.x", b"1"),
], ids=["open-rw", "create", "mkdir", "unlink", "rmdir", "rename", "symlink", "link",
        "truncate", "chmod", "chown", "utime", "setxattr"])
def test_every_write_path_fails_with_erofs(mounted, attempt):
    with pytest.raises(OSError) as failure:
        attempt(mounted.mountpoint)
    assert failure.value.errno == errno.EROFS


def test_missing_names_are_enoent(mounted):
    for missing in ("nope", "tiny-llama/tokenizer.json", "weights/original/nope.bin"):
        with pytest.raises(FileNotFoundError):
            os.stat(mounted.mountpoint / missing)
    with pytest.raises(NotADirectoryError):
        os.listdir(mounted.mountpoint / "tiny-llama" / "model.gguf")


def test_extended_attributes_say_what_is_cached(sources, mounted):
    path = mounted.mountpoint / "tiny-llama" / "model.gguf"
    assert os.getxattr(path, "user.lamina.repo") == b"org/tiny-GGUF"
    assert os.getxattr(path, "user.lamina.cached_bytes") == b"0"
    path.read_bytes()
    size = str(sources["gguf"].stat().st_size).encode()
    # Bytes are served before they are durable; the xattr counts only durable ones.
    assert eventually(lambda: os.getxattr(path, "user.lamina.cached_bytes") == size)
    assert eventually(lambda: os.getxattr(path, "user.lamina.verified") == b"yes")
    assert len(os.getxattr(path, "user.lamina.commit")) == 40
    assert os.getxattr(path, "user.lamina.content_id").startswith(b"sha256:")


def test_cached_bytes_are_served_after_the_hub_goes_away(hub, sources, mounted):
    path = mounted.mountpoint / "weights" / "big.bin"
    expected = sources["weights"]["big.bin"].read_bytes()
    with open(path, "rb") as handle:
        first = handle.read(2 * MiB)
    hub.stop()
    os.system(f"echo 3 > /proc/sys/vm/drop_caches")
    with open(path, "rb") as handle:
        assert handle.read(2 * MiB) == first == expected[:2 * MiB]


def test_a_clean_mount_logs_no_warnings(sources, mounted):
    (mounted.mountpoint / "tiny-llama" / "model.gguf").read_bytes()
    mounted.stop()
    assert unexpected_log_lines(mounted.log_text()) == []
    assert "unmounted" in mounted.log_text()
