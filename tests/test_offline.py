"""Offline means offline: an uncached read fails at once with EIO and one log line per file."""

import errno
import os
import time

import pytest

from conftest import eventually, needs_fuse
from vfs.testing.hubsim import HubSimulator

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
    path: /models/small/model.gguf
    backend: llama.cpp
    hf: org/small
    file: small.gguf
"""


@pytest.fixture
def weights(random_file):
    return {"big.gguf": random_file("big.gguf", 6 * MiB, seed=31), "small.gguf": random_file("small.gguf", MiB // 2)}


def cache_the_small_file(hub, weights, mount_factory):
    """Online once: `small` read whole (and verified), `big` never read."""
    hub.add_repo("org/big", files={"big.gguf": weights["big.gguf"]})
    hub.add_repo("org/small", files={"small.gguf": weights["small.gguf"]})
    online = mount_factory(MANIFEST, hub.endpoint, args=BLOCK)
    path = online.mountpoint / "small" / "model.gguf"
    assert path.read_bytes() == weights["small.gguf"].read_bytes()
    assert eventually(lambda: os.getxattr(path, "user.lamina.verified") == b"yes")
    online.stop()


def timed_uncached_read(path, offset):
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    started = time.monotonic()
    try:
        os.preadv(fd, [memoryview(bytearray(4096))], offset)
    except OSError as failure:
        return failure.errno, time.monotonic() - started
    finally:
        os.close(fd)
    return None, time.monotonic() - started


def test_with_hf_hub_offline_an_uncached_read_fails_at_once_with_one_line_per_file(
        hub, weights, mount_factory, tmp_path):
    cache_the_small_file(hub, weights, mount_factory)
    offline = mount_factory(MANIFEST, hub.endpoint, cache_dir=tmp_path / "cache", args=BLOCK,
                            env={"HF_HUB_OFFLINE": "1"})
    offline.expect_log_errors("read: big/big.gguf: not cached, offline")
    path = offline.mountpoint / "big" / "model.gguf"
    hub.clear_log()
    results = [timed_uncached_read(path, offset) for offset in (3 * MiB, 4 * MiB, 5 * MiB)]
    print("offline reads of uncached blocks:", [f"errno {e} in {s * 1000:.1f} ms" for e, s in results])
    assert all(error == errno.EIO and seconds <= 0.1 for error, seconds in results)
    assert sum("not cached, offline" in line for line in offline.log_text().splitlines()) == 1
    small = offline.mountpoint / "small" / "model.gguf"
    assert small.read_bytes() == weights["small.gguf"].read_bytes()        # cached bytes: served
    assert hub.log == []                # asked to be offline: never tried


def test_a_hub_unreachable_at_start_fails_uncached_reads_at_once_and_recovers_when_back(
        hub, weights, mount_factory, tmp_path):
    cache_the_small_file(hub, weights, mount_factory)
    ports = [int(url.rsplit(":", 1)[1]) for url in (hub.endpoint, hub.cdn_endpoint)]
    hub.stop()
    mount = mount_factory(MANIFEST, hub.endpoint, cache_dir=tmp_path / "cache", args=BLOCK)
    mount.expect_log_errors("read: big/big.gguf: not cached, offline")
    path = mount.mountpoint / "big" / "model.gguf"
    assert eventually(lambda: "the Hub is unreachable" in mount.log_text())
    error, seconds = timed_uncached_read(path, 4 * MiB)
    print(f"Hub down at start: uncached read errno {error} in {seconds * 1000:.1f} ms")
    assert error == errno.EIO and seconds <= 0.1
    back = HubSimulator(port=ports[0], cdn_port=ports[1])
    back.add_repo("org/big", files={"big.gguf": weights["big.gguf"]})
    back.add_repo("org/small", files={"small.gguf": weights["small.gguf"]})
    with back.start():
        assert eventually(lambda: timed_uncached_read(path, 4 * MiB)[0] is None, timeout=20)
    assert "the Hub answers again" in mount.log_text()
