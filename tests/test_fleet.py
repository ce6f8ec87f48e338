"""A fleet behind one mirror: three mounts, each with its own cache, through a real olah in front of the Hub.

olah (PyPI) is the Hugging Face mirror a fleet puts in front of the Hub; every node's
--endpoint points at it. The simulator plays the Hub; olah fetches from it once and
serves every mount from its own cache.
"""

import os
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from conftest import needs_fuse, unexpected_log_lines

pytestmark = [needs_fuse, pytest.mark.fuse, pytest.mark.slow]

MiB = 1024 * 1024
OLAH = Path(sys.executable).with_name("olah-cli")
MANIFEST = """\
models:
  weights:
    path: /models/weights/
    backend: vllm
    hf: org/weights
"""


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def netloc(url):
    return url.split("://", 1)[1].rstrip("/")


@pytest.fixture
def olah(hub, tmp_path):
    """An olah mirror on loopback whose upstream Hub is the simulator; its URL."""
    if not OLAH.exists():
        pytest.fail(f"olah is a test dependency (pip install -e '.[test]'); {OLAH} is missing")
    port = free_port()
    log = open(tmp_path / "olah.log", "wb")
    process = subprocess.Popen(
        [str(OLAH), "--host", "127.0.0.1", "--port", str(port),
         "--hf-scheme", "http", "--hf-netloc", netloc(hub.endpoint), "--hf-lfs-netloc", netloc(hub.cdn_endpoint),
         "--mirror-scheme", "http", "--mirror-netloc", f"127.0.0.1:{port}",
         "--mirror-lfs-netloc", f"127.0.0.1:{port}",
         "--repos-path", str(tmp_path / "olah-repos"), "--log-path", str(tmp_path / "olah-logs")],
        stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_for(url, process)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


def _wait_for(url, process, timeout=60):
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"olah exited with {process.returncode}")
        try:
            opener.open(f"{url}/api/models/org/weights", timeout=5).read()
            return
        except urllib.error.HTTPError:
            return                  # it answers (the repo need not exist yet)
        except OSError:
            time.sleep(0.2)
    raise RuntimeError("olah did not answer")


def received_bytes(api_port):
    """What a mount received from its origin, from its /metrics."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    text = opener.open(f"http://127.0.0.1:{api_port}/metrics", timeout=10).read().decode()
    return float(re.search(r"^lamina_fetch_received_bytes_total (\S+)$", text, re.M).group(1))


def read_all(path):
    with open(path, "rb", buffering=0) as source:
        return b"".join(iter(lambda: source.read(MiB), b""))


def test_three_mounts_behind_one_olah_mirror_fetch_each_file_once(hub, olah, tmp_path, mount_factory):
    files = {"model.safetensors": os.urandom(40 * MiB + 321), "tokenizer.json": b'{"version": "1.0"}' * 1000}
    hub.add_repo("org/weights", files=dict(files))
    ports = [free_port() for _ in range(3)]
    mounts = [mount_factory(MANIFEST, olah, cache_dir=tmp_path / f"cache-{i}",
                            args=("--block-size", "4M", "--api", f"127.0.0.1:{ports[i]}")) for i in range(3)]
    results = {}

    def read(index):
        results[index] = {name: read_all(mounts[index].mountpoint / "weights" / name) for name in files}

    threads = [threading.Thread(target=read, args=(i,)) for i in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(180)
    for index in range(3):
        assert results[index] == files, f"mount {index} read other bytes"
    total = sum(len(data) for data in files.values())
    served = {name: hub.bytes_sent(path_contains=name) for name in files}
    received = [received_bytes(port) for port in ports]
    print(f"three mounts through olah, {total / MiB:.1f} MiB of files: the Hub sent "
          f"{ {name: f'{sent / len(files[name]):.2f}x' for name, sent in served.items()} }, "
          f"the mounts received {[f'{r / total:.3f}x' for r in received]}")
    for name, data in files.items():
        assert served[name] <= 1.05 * len(data), f"the Hub sent {name} {served[name] / len(data):.2f} times"
    for amount in received:
        assert amount <= 1.05 * total
    for mount in mounts:
        assert unexpected_log_lines(mount.log_text()) == []
