"""/metrics as Prometheus scrapes it, with the counts a real mount's readers and faults produce."""

import errno
import os
import re
import socket
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import eventually, needs_fuse
from faultkit import MiB, timed_pread
from vfs.testing.hubsim import Fault

pytestmark = [needs_fuse, pytest.mark.fuse]

MANIFEST = """
models:
  big:
    path: /models/big/model.gguf
    backend: llama.cpp
    hf: org/big
    file: big.gguf
  other:
    path: /models/other/model.gguf
    backend: llama.cpp
    hf: org/other
    file: other.gguf
"""
METRICS_DOC = Path(__file__).resolve().parent.parent / "docs" / "METRICS.md"


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Scrape:
    """One scrape of /metrics: samples by (name, labels)."""

    def __init__(self, port):
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as answer:
            self.content_type = answer.headers["Content-Type"]
            self.text = answer.read().decode()
        self.families = {f.name: f for f in text_string_to_metric_families(self.text)}

    def value(self, name, **labels):
        for family in self.families.values():
            for sample in family.samples:
                if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                    return sample.value
        return 0.0


def scrape(port):
    return Scrape(port)


@pytest.fixture
def sources(hub, random_file):
    files = {"big": random_file("big.gguf", 3 * MiB + 5).read_bytes(),
             "other": random_file("other.gguf", 2 * MiB, seed=2).read_bytes()}
    hub.add_repo("org/big", files={"big.gguf": files["big"]})
    hub.add_repo("org/other", files={"other.gguf": files["other"]})
    return files


def mount_with_api(hub, mount_factory, *args):
    port = free_port()
    mount = mount_factory(MANIFEST, hub.endpoint, args=("--block-size", "1M", "--api", f"127.0.0.1:{port}", *args))
    return mount, port


def drop_pages(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def test_a_cold_then_warm_read_shows_in_every_family(hub, sources, mount_factory):
    # The daemon's path: with passthrough the warm read would not reach the daemon at all.
    mount, port = mount_with_api(hub, mount_factory, "--no-passthrough")
    path = mount.mountpoint / "big" / "model.gguf"
    assert path.read_bytes() == sources["big"]
    assert eventually(lambda: scrape(port).value("lamina_model_verified", model="big") == 1, timeout=30)
    cold = scrape(port)
    assert cold.content_type.startswith("text/plain; version=0.0.4")
    size = len(sources["big"])
    served_cold = sum(cold.value("lamina_read_bytes_total", source=s) for s in ("block_buffers", "cache_disk",
                                                                                 "network"))
    print(f"cold read of {size} bytes: served {served_cold:.0f}, network "
          f"{cold.value('lamina_read_bytes_total', source='network'):.0f}, received "
          f"{cold.value('lamina_fetch_received_bytes_total'):.0f}")
    assert served_cold >= size and cold.value("lamina_read_bytes_total", source="network") > 0
    assert cold.value("lamina_fetch_requests_total", method="GET", status="206") >= 1
    assert cold.value("lamina_fetch_received_bytes_total") >= size
    assert cold.value("lamina_fetch_first_byte_seconds_count") >= 1
    reads = cold.value("lamina_fuse_operations_total", op="read")
    assert reads >= 1 and cold.value("lamina_read_duration_seconds_count") == reads
    assert cold.value("lamina_model_cached_bytes", model="big") == size
    assert cold.value("lamina_model_size_bytes", model="big") == size
    assert cold.value("lamina_model_cached_bytes", model="other") == 0
    assert cold.value("lamina_model_verified", model="other") == 0
    assert cold.value("lamina_cache_used_bytes") >= size

    drop_pages(path)
    assert path.read_bytes() == sources["big"]
    warm = scrape(port)
    from_cache = sum(warm.value("lamina_read_bytes_total", source=s) - cold.value("lamina_read_bytes_total", source=s)
                     for s in ("block_buffers", "cache_disk"))
    assert from_cache >= size
    assert warm.value("lamina_read_bytes_total", source="network") == cold.value("lamina_read_bytes_total",
                                                                                 source="network")
    assert warm.value("lamina_fetch_received_bytes_total") == cold.value("lamina_fetch_received_bytes_total")


def test_failed_requests_count_by_errno_and_status(hub, sources, mount_factory):
    mount, port = mount_with_api(hub, mount_factory, "--read-timeout", "1", "--read-deadline", "2")
    mount.expect_log_errors("HTTP 503 (gave up after")
    path = mount.mountpoint / "big" / "model.gguf"
    hub.add_fault(Fault("status", code=503, origin="cdn", method="GET"))
    assert timed_pread(path, MiB, 4096).error == errno.EIO
    with pytest.raises(OSError) as missing:
        os.getxattr(path, "user.lamina.no_such_attribute")
    assert missing.value.errno == errno.ENODATA
    after = scrape(port)
    print("errors:", {tuple(s.labels.values()): s.value for s in after.families["lamina_fuse_errors"].samples})
    assert after.value("lamina_fuse_errors_total", op="read", errno="EIO") >= 1
    assert after.value("lamina_fuse_errors_total", op="getxattr", errno="ENODATA") == 1
    assert after.value("lamina_fetch_requests_total", method="GET", status="503") >= 2
    assert after.value("lamina_fetch_retries_total") >= 1


def test_evictions_under_the_cap_are_counted(hub, sources, mount_factory):
    mount, port = mount_with_api(hub, mount_factory, "--max-size", "3M")
    assert scrape(port).value("lamina_cache_max_bytes") == 3 * MiB
    for name in ("big", "other"):
        assert (mount.mountpoint / name / "model.gguf").read_bytes() == sources[name]
        time.sleep(0.5)     # the kernel releases a closed file a moment later: open blobs are never evicted
    assert eventually(lambda: scrape(port).value("lamina_cache_evictions_total") >= 1, timeout=30)


def test_a_blob_that_fails_its_hash_counts_as_a_verification_failure(hub, sources, mount_factory):
    mount, port = mount_with_api(hub, mount_factory)
    mount.expect_log_errors("does not match its content id")
    assert scrape(port).value("lamina_verification_failures_total") == 0
    hub.add_fault(Fault("wrong_bytes", origin="cdn", method="GET"))
    with open(mount.mountpoint / "other" / "model.gguf", "rb") as reader:
        reader.read()
    assert eventually(lambda: scrape(port).value("lamina_verification_failures_total") >= 1, timeout=30)
    hub.clear_faults()


def test_docs_metrics_lists_exactly_the_metrics_served(hub, sources, mount_factory):
    _, port = mount_with_api(hub, mount_factory, "--max-size", "1G")
    served = set(scrape(port).families)
    documented = set(re.findall(r"^\| `(lamina_[a-z_]+)`", METRICS_DOC.read_text(), re.MULTILINE))
    documented = {re.sub(r"_total$", "", name) for name in documented}
    assert served == documented, (served - documented, documented - served)
