"""Shared pieces of the reliability suite: a model repo, short bounds, and a reader that reports.

Every fault test prints what the reader saw (`Reading`), so a run with `-s` reads like a
transcript: the fault, the bytes or errno the reader got, and how long it waited.
"""

import errno
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from vfs.testing.mounts import isolated_environment

MiB = 1024 * 1024
READ_TIMEOUT, READ_DEADLINE = 1.0, 3.0
BLOCK = ("--block-size", "1M")
SHORT_BOUNDS = ("--read-timeout", str(READ_TIMEOUT), "--read-deadline", str(READ_DEADLINE))
# A FUSE read touches at most two blocks, each waited for at most the deadline plus one
# last attempt's timeout; the kernel's immediate re-ask of the page fails at once.
READ_BOUND = 2 * (READ_DEADLINE + READ_TIMEOUT)
SLACK = 3.0                          # scheduling on a loaded two-CPU test machine


def give_up_after(attempt_seconds=0.0):
    """When a fetch whose every attempt fails after `attempt_seconds` gives up under SHORT_BOUNDS:
    attempts and backoff waits (vfs.retry) until the next wait would pass the deadline.

    The figures docs/RELIABILITY.md states: a persistent 503 (attempts fail at once) gives
    EIO after 1.75 s, a stall that never ends (each attempt waits out the read timeout)
    after 3.75 s. A reader that waited twice (the failure memory not working) would wait
    at least double, so `give_up_after() <= waited < 2 * give_up_after()` tells them apart.
    """
    from vfs.retry import backoff
    from vfs.settings import Settings

    elapsed, attempt = 0.0, 0
    while True:
        elapsed += attempt_seconds
        wait = backoff(attempt)
        if attempt >= Settings.max_retries or elapsed + wait > READ_DEADLINE:
            return elapsed
        elapsed, attempt = elapsed + wait, attempt + 1

MANIFEST = """
models:
  weights:
    path: /models/weights/
    backend: vllm
    hf: org/weights
"""
BIG = "big.bin"                      # LFS: bytes come from the CDN origin
SMALL = "config.json"                # small: bytes come from the API origin


@dataclass
class Reading:
    """What one read returned: bytes or an errno, and how long the reader waited."""

    data: bytes | None
    error: int | None
    seconds: float

    def __str__(self):
        got = f"{len(self.data)} bytes" if self.error is None else errno.errorcode[self.error]
        return f"{got} after {self.seconds:.2f}s"


def timed_pread(path, offset, length, direct=False):
    """One pread; `direct` (O_DIRECT) bypasses the page cache and the kernel's read-ahead."""
    started = time.monotonic()
    try:
        fd = os.open(path, os.O_RDONLY | (os.O_DIRECT if direct else 0))
        try:
            data = os.pread(fd, length, offset)
        finally:
            os.close(fd)
    except OSError as exc:
        return Reading(None, exc.errno, time.monotonic() - started)
    return Reading(data, None, time.monotonic() - started)


def report(what, reading):
    print(f"{what}: reader saw {reading}")
    return reading


@pytest.fixture
def weights(hub, random_file):
    """org/weights: a 5 MiB LFS file (CDN) and a 300 kB one-block file (API); their bytes by name.

    The small file is fetched by exactly one GET, so a fault on it is one the reader waits on.
    """
    sources = {BIG: random_file(BIG, 5 * MiB + 12345).read_bytes(),
               SMALL: random_file(SMALL, 300_000, seed=2).read_bytes()}
    hub.add_repo("org/weights", files=dict(sources))
    return sources


@pytest.fixture
def weights_mount(hub, weights, mount_factory):
    """A mount of org/weights with 1 MiB blocks and short timeouts, so faults resolve fast."""
    return mount_factory(MANIFEST, hub.endpoint, args=BLOCK + SHORT_BOUNDS)


def file_path(mount, name=BIG):
    return mount.mountpoint / "weights" / name


def error_lines(text):
    return [line for line in text.splitlines() if " ERROR " in line]


def ranges_of(records):
    """(start, end) of each record's `Range: bytes=a-b` header (records without one skipped)."""
    found = []
    for record in records:
        match = re.fullmatch(r"bytes=(\d+)-(\d+)", record.range or "")
        if match:
            found.append((int(match[1]), int(match[2])))
    return found


def gets(hub, origin="cdn"):
    return [r for r in hub.log if r.origin == origin and r.method == "GET"]


def run_cli(*args, home, env=None, timeout=60):
    """`python -m vfs ARGS` in a clean environment: (exit code, stdout, stderr, seconds)."""
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "vfs", *map(str, args)], capture_output=True, text=True,
                            timeout=timeout, env=isolated_environment(home, env))
    return result.returncode, result.stdout, result.stderr, time.monotonic() - started


def cli_error(stderr):
    """The one `lamina-llm-cache: error: ...` line of a failed command."""
    lines = [line for line in stderr.splitlines() if line.startswith("lamina-llm-cache: error: ")]
    assert len(lines) == 1, stderr
    return lines[0].removeprefix("lamina-llm-cache: error: ")


def is_mounted(path):
    target = os.path.realpath(path)
    return any(line.split()[4] == target for line in Path("/proc/self/mountinfo").read_text().splitlines())
