"""Cold reads through a real mount over a shaped link: exact bytes, the cap held, a 429 storm ridden out."""

import os
import threading
import time

import pytest

from conftest import needs_fuse, unexpected_log_lines
from vfs.testing.hubsim import Fault

pytestmark = [needs_fuse, pytest.mark.fuse, pytest.mark.slow]

MiB = 1024 * 1024
RATE = 20e6                     # bytes per second per response
MANIFEST = """\
models:
  weights:
    path: /models/weights/
    backend: vllm
    hf: org/weights
"""


@pytest.fixture
def files(hub):
    contents = {"a.safetensors": os.urandom(48 * MiB + 4321), "b.safetensors": os.urandom(32 * MiB + 7)}
    hub.add_repo("org/weights", files=dict(contents))
    hub.set_link(rate=RATE, delay=0.02)
    return contents


def read_all(path):
    with open(path, "rb", buffering=0) as source:
        return b"".join(iter(lambda: source.read(MiB), b""))


def timed_read(path):
    started = time.monotonic()
    data = read_all(path)
    return data, time.monotonic() - started


def test_a_cold_read_fills_the_link_and_never_exceeds_the_cap(hub, files, mount_factory):
    mount = mount_factory(MANIFEST, hub.endpoint, args=("--max-in-flight", "6"))
    data, seconds = timed_read(mount.mountpoint / "weights" / "a.safetensors")
    assert data == files["a.safetensors"]
    rate = len(data) / seconds
    print(f"48 MiB at {RATE / 1e6:.0f} MB/s per response: {rate / 1e6:.0f} MB/s, "
          f"most requests in flight {hub.most_in_flight('cdn')}")
    assert hub.most_in_flight("cdn") <= 6
    # One response at a time could not pass RATE; the cap of 6 allows about 100 MB/s. Twice
    # RATE, not three times: under a loaded suite the read ran at 61-78 MB/s.
    assert rate > 2 * RATE
    assert unexpected_log_lines(mount.log_text()) == []


def test_two_cold_readers_share_the_cap(hub, files, mount_factory):
    mount = mount_factory(MANIFEST, hub.endpoint, args=("--max-in-flight", "8"))
    results = {}

    def read(name):
        results[name] = timed_read(mount.mountpoint / "weights" / name)

    threads = [threading.Thread(target=read, args=(name,)) for name in files]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    for name, content in files.items():
        assert results[name][0] == content
    rates = [len(files[name]) / results[name][1] for name in files]
    print(f"two readers: {[f'{r / 1e6:.0f} MB/s' for r in rates]}, most in flight {hub.most_in_flight('cdn')}")
    assert hub.most_in_flight("cdn") <= 8
    assert max(rates) <= 2 * min(rates)          # neither starves the other


def test_a_429_storm_slows_the_mount_and_fails_no_read(hub, files, mount_factory):
    mount = mount_factory(MANIFEST, hub.endpoint, args=("--max-in-flight", "8"))
    # Twenty CDN GETs in a row are told to come back in a second: a rate-limited CDN edge.
    storm = hub.add_fault(Fault("rate_limit", origin="cdn", method="GET", times=20, seconds=1))
    data, seconds = timed_read(mount.mountpoint / "weights" / "a.safetensors")
    assert data == files["a.safetensors"]
    print(f"48 MiB through a storm of {storm.hits} 429s: {seconds:.1f} s")
    assert storm.hits == 20 and seconds >= 1.0
    assert hub.most_in_flight("cdn") <= 8       # retries after the storm never go past the cap
    assert unexpected_log_lines(mount.log_text()) == []
