"""FUSE passthrough of files that are already on this host: local models' files, and copies
from the Hugging Face cache, through a real mount.

A local file is complete by definition. It is handed to the kernel as the backing file when
the open's own read-only descriptor matches the scan (size, mtime, inode, device) and nobody
has the file open for writing; otherwise, and with --no-local-passthrough, the daemon serves
it and checks every read against the scan. A copy in the Hugging Face cache fills the mount's
own blob, which is passed through once verified.
"""

import errno
import os
import random

import pytest

from conftest import call_api, eventually, needs_fuse, unexpected_log_lines
from test_passthrough import (READ_MMAP_SENDFILE, Served, free_port, needs_passthrough, run_elsewhere,  # noqa: F401
                              sha256_of, sources)
from vfs.testing.models import write_gguf, write_safetensors_dir

pytestmark = [needs_fuse, pytest.mark.fuse, needs_passthrough]

MiB = 1024 * 1024


def write_bytes(path, size, seed):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(random.Random(seed).randbytes(size))
    return path


@pytest.fixture
def local_dir(tmp_path):
    model = write_safetensors_dir(tmp_path / "finetune")
    write_bytes(model / "big.bin", 9 * MiB + 4321, seed=3)
    write_gguf(tmp_path / "quantized.gguf", size_mib=6)
    return model


def manifest(model, gguf):
    return f"""
models:
  finetune:
    path: /models/finetune/
    backend: transformers
    local: {model}/
  tiny:
    path: /models/tiny/model.gguf
    backend: llama.cpp
    local: {gguf}
"""


def start(hub, mount_factory, local_dir, *args):
    port = free_port()
    mount = mount_factory(manifest(local_dir, local_dir.parent / "quantized.gguf"), hub.endpoint,
                          args=("--api", f"127.0.0.1:{port}", *args))
    return Served(mount, port)


@pytest.fixture
def served(hub, mount_factory, local_dir):
    return start(hub, mount_factory, local_dir)


def test_a_local_file_is_passed_through_by_read_mmap_and_sendfile_without_the_daemon(served, local_dir, tmp_path):
    path = served.root / "finetune" / "big.bin"
    assert served.passthrough("finetune/big.bin") == "yes (on open)"
    before = served.reads()
    with open(path, "rb"):
        assert served.passthrough("finetune/big.bin") == "yes"
        hashes = run_elsewhere(READ_MMAP_SENDFILE, path, tmp_path / "copy").split()
    assert hashes == [sha256_of(local_dir / "big.bin")] * 3
    gguf = served.root / "tiny" / "model.gguf"
    assert sha256_of(gguf) == sha256_of(local_dir.parent / "quantized.gguf")
    assert served.reads() == before           # the daemon's read handler was never called
    assert served.passthrough("finetune/big.bin") == "yes (on open)"      # the id went with the last close
    assert not unexpected_log_lines(served.mount.log_text())


def test_a_local_file_changed_since_the_scan_is_refused_at_open_beside_a_passthrough_open(served, local_dir):
    """The open-time check holds for every open, also one that would share a live backing id;
    an open already passed through reads the file as it is, as a local reader would."""
    served.mount.expect_log_errors("changed since it was scanned")
    source = local_dir / "big.bin"
    original = source.read_bytes()
    path = served.root / "finetune" / "big.bin"
    with open(path, "rb") as held:
        assert served.passthrough("finetune/big.bin") == "yes"
        with open(source, "r+b") as out:                 # in place: same inode, new mtime
            out.write(b"\xff" * 4096)
        with pytest.raises(OSError) as failure:
            open(path, "rb")
        assert failure.value.errno == errno.EIO
        assert held.read(8192) == b"\xff" * 4096 + original[4096:8192]
    assert call_api(served.port, "POST", "/refresh")[0] == 200
    assert path.read_bytes() == b"\xff" * 4096 + original[4096:]
    assert served.passthrough("finetune/big.bin") == "yes (on open)"


def test_a_local_file_open_for_writing_elsewhere_is_served_by_the_daemon_until_the_writer_closes(served, local_dir):
    source = local_dir / "big.bin"
    path = served.root / "finetune" / "big.bin"
    writer = open(source, "r+b")              # a writer that has not written (yet)
    try:
        before = served.reads()
        with open(path, "rb") as f:
            assert f.read() == source.read_bytes()
            assert served.passthrough("finetune/big.bin").startswith("no: open through the daemon")
        assert served.reads() > before        # the daemon served it, checking every read
    finally:
        writer.close()
    before = served.reads()
    with open(path, "rb") as f:
        assert served.passthrough("finetune/big.bin") == "yes"
        assert f.read() == source.read_bytes()
    assert served.reads() == before
    assert "open for writing elsewhere" in served.mount.log_text()


def test_no_local_passthrough_keeps_the_daemons_check_of_every_read(hub, mount_factory, local_dir):
    served = start(hub, mount_factory, local_dir, "--no-local-passthrough")
    path = served.root / "finetune" / "big.bin"
    assert served.passthrough("finetune/big.bin") == ("no: local files are served by the daemon "
                                                      "(--no-local-passthrough)")
    before = served.reads()
    assert path.read_bytes() == (local_dir / "big.bin").read_bytes()
    assert served.reads() > before


def test_info_says_whether_a_local_model_is_passed_through(served, local_dir, tmp_path):
    from test_local import lamina
    assert served.mount.cache_dir == tmp_path / "cache"          # the cache `lamina` looks at
    out = lamina(tmp_path, served.mount.manifest.read_text(), "info", "finetune").stdout
    assert "passthrough yes, unless open for writing elsewhere" in out


def test_a_file_copied_from_the_hugging_face_cache_is_passed_through_once_its_blob_is_verified(
        hub, sources, mount_factory, tmp_path):
    """The mount fills its own blob from huggingface_hub's copy (no CDN byte), verifies it, and
    then passes that blob through; huggingface_hub's copy is never the backing file."""
    from test_passthrough import start
    big = sources["weights"]["big.bin"]
    planted = tmp_path / "hf-cache" / "models--org--weights" / "blobs" / sha256_of(big)
    planted.parent.mkdir(parents=True)
    os.link(big, planted)
    served = start(hub, mount_factory, env={"HF_HUB_CACHE": str(tmp_path / "hf-cache")})
    path = served.root / "weights" / "big.bin"
    assert sha256_of(path) == sha256_of(big)
    assert hub.bytes_sent(origin="cdn") == 0
    assert eventually(lambda: served.passthrough("weights/big.bin") == "yes (on open)", timeout=30)
    before = served.reads()
    with open(path, "rb") as f:
        assert served.passthrough("weights/big.bin") == "yes"
        assert sha256_of(path) == sha256_of(big)
    assert served.reads() == before
