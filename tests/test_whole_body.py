"""A server that ignores Range (200 + the whole file): each blob is filled in one pass, not re-sent per block."""

import os
import threading

import pytest

from conftest import eventually, needs_fuse, unexpected_log_lines
from vfs.testing.hubsim import Fault

pytestmark = [needs_fuse, pytest.mark.fuse]

MiB = 1024 * 1024
SIZE = 40 * MiB + 12345
MANIFEST = """\
models:
  weights:
    path: /models/weights/
    backend: vllm
    hf: org/weights
"""
ALLOWED = ["ignored the Range header"]



@pytest.fixture
def content():
    return os.urandom(SIZE)


@pytest.fixture
def ignoring_hub(hub, content):
    hub.add_repo("org/weights", files={"model.safetensors": content})
    hub.add_fault(Fault("ignore_range", origin="cdn"))
    return hub


def mounted_file(mount):
    return mount.mountpoint / "weights" / "model.safetensors"


def read_all(path, chunk=MiB):
    with open(path, "rb", buffering=0) as source:
        return b"".join(iter(lambda: source.read(chunk), b""))


def test_a_file_read_once_is_sent_about_once(ignoring_hub, content, mount_factory):
    mount = mount_factory(MANIFEST, ignoring_hub.endpoint, args=("--block-size", "1M"))
    assert read_all(mounted_file(mount)) == content
    sent = ignoring_hub.bytes_sent(origin="cdn")
    print(f"{SIZE / MiB:.1f} MiB read once: the server sent {sent / MiB:.1f} MiB ({sent / SIZE:.3f}x)")
    assert sent <= 1.05 * SIZE
    assert eventually(lambda: os.getxattr(mounted_file(mount), "user.lamina.verified") == b"yes", timeout=30)
    assert unexpected_log_lines(mount.log_text(), allowed=ALLOWED) == []


def test_readers_far_apart_are_served_as_the_pass_reaches_them(ignoring_hub, content, mount_factory):
    mount = mount_factory(MANIFEST, ignoring_hub.endpoint, args=("--block-size", "1M"))
    path = mounted_file(mount)
    results = {}

    def read_at(offset, length):
        with open(path, "rb", buffering=0) as source:
            results[offset] = os.pread(source.fileno(), length, offset)

    # Three cold readers at once: near the start, in the middle, at the very end.
    wanted = {3 * MiB + 7: 5000, 25 * MiB + 1: 2 * MiB, SIZE - 100: 100}
    threads = [threading.Thread(target=read_at, args=item) for item in wanted.items()]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    for offset, length in wanted.items():
        assert results[offset] == content[offset:offset + length]
    assert read_all(path) == content
    sent = ignoring_hub.bytes_sent(origin="cdn")
    print(f"three cold readers then a full read: the server sent {sent / MiB:.1f} MiB ({sent / SIZE:.2f}x)")
    assert sent <= 1.05 * SIZE      # one pass served them all, and the full read after
    assert unexpected_log_lines(mount.log_text(), allowed=ALLOWED) == []


def test_a_body_that_breaks_midway_is_reopened_and_the_bytes_stay_exact(hub, content, mount_factory):
    hub.add_repo("org/weights", files={"model.safetensors": content})
    hub.add_fault(Fault("ignore_range", origin="cdn", times=1, reset_after=17 * MiB))
    hub.add_fault(Fault("ignore_range", origin="cdn"))
    mount = mount_factory(MANIFEST, hub.endpoint, args=("--block-size", "1M"))
    assert read_all(mounted_file(mount)) == content
    assert eventually(lambda: os.getxattr(mounted_file(mount), "user.lamina.verified") == b"yes", timeout=30)
    assert "one-pass read broke" in mount.log_text()
