"""The random-read oracle (vfs.testing.fsx) in short runs: every byte read through the mount is the source's.

The soak (at least 100,000 operations) is a command, not a test:
    python -m vfs.testing.fsx --ops 100000 --processes 4
    python -m vfs.testing.fsx --ops 100000 --processes 4 --rounds 20 --chaos
Set FSX_SEED to replay a seed these tests printed.
"""

import os
import random

import pytest

from conftest import needs_fuse
from vfs.testing import fsx

MiB = 1024 * 1024

pytestmark = [needs_fuse, pytest.mark.fuse]


@pytest.fixture
def seed():
    chosen = int(os.environ.get("FSX_SEED") or random.randrange(1 << 32))
    print(f"fsx seed {chosen} (replay: FSX_SEED={chosen})")
    return chosen


def replay_hint(summary, command):
    return f"seed {summary.seed}: {summary.mismatches}; replay with FSX_SEED={summary.seed} or `{command}`"


def test_random_reads_by_several_processes_match_the_source_byte_for_byte(hub, mount_factory, tmp_path, seed):
    sources = fsx.write_sources(tmp_path / "sources")
    hub.add_repo("fsx/files", files=sources)
    mount = mount_factory("models:\n  fsx:\n    path: /models/fsx/\n    backend: vllm\n    hf: fsx/files\n",
                          hub.endpoint, args=("--block-size", "1M"))
    pairs = [(mount.mountpoint / "fsx" / name, path) for name, path in sources.items()]
    summary = fsx.run(pairs, seed, ops=4000, processes=3)
    print(summary)
    assert summary.ops == 4000 and set(summary.kinds) == set(fsx.KINDS)
    assert not summary.mismatches, replay_hint(summary, f"python -m vfs.testing.fsx --seed {seed} --ops 4000")


def test_random_reads_ride_out_transient_faults_with_exact_bytes(seed):
    summary, bad_log = fsx.soak(ops=3000, processes=3, seed=seed, rounds=3, chaos=True)
    print(summary)
    assert not summary.mismatches, replay_hint(summary, f"python -m vfs.testing.fsx --chaos --seed {seed}")
    assert not bad_log
    assert sum(summary.faults.values()) > 0


def test_the_soak_round_mixes_daemon_and_passthrough_opens_with_exact_bytes(seed):
    # half the operations on the cold mount, then every file read whole and verified (an
    # empty one included: it never was, and each round waited out its deadline), then the
    # other half with verified files passed through beside the daemon's opens
    summary, bad_log = fsx.soak(ops=2000, processes=2, seed=seed, rounds=1)
    print(summary)
    assert not summary.mismatches, replay_hint(summary, f"python -m vfs.testing.fsx --seed {seed} --ops 2000")
    assert not bad_log
    assert summary.opens["passthrough"] > 0 and summary.opens["daemon"] > 0


def test_random_reads_stay_exact_when_block_memory_is_scarce(hub, mount_factory, tmp_path, seed):
    # Three block buffers for three processes' streams, read-aheads and first touches:
    # buffers are recycled under readers all the time, and takers wait for one to free.
    sources = fsx.write_sources(tmp_path / "sources")
    hub.add_repo("fsx/files", files=sources)
    mount = mount_factory("models:\n  fsx:\n    path: /models/fsx/\n    backend: vllm\n    hf: fsx/files\n",
                          hub.endpoint, args=("--block-size", "1M", "--memory", "3M"))
    pairs = [(mount.mountpoint / "fsx" / name, path) for name, path in sources.items()]
    summary = fsx.run(pairs, seed, ops=3000, processes=3)
    print(summary)
    assert summary.ops == 3000
    assert not summary.mismatches, replay_hint(summary, f"python -m vfs.testing.fsx --seed {seed} --ops 3000")
    assert "Traceback" not in mount.log_text()


# The sizes users get: 16 MiB blocks, 128 MiB of block buffers (no flags), files that cross
# 16 MiB block edges, reads biased to those edges.
DEFAULT_SIZES = {"empty.json": 0, "one.json": 1, "page.json": 4095, "block.bin": 16 * MiB,
                 "block-plus-one.bin": 16 * MiB + 1, "odd.safetensors": 40 * MiB + 12345}


@pytest.mark.slow
def test_random_reads_at_the_default_block_size_and_memory_match_the_source(hub, mount_factory, tmp_path, seed):
    sources = fsx.write_sources(tmp_path / "sources", DEFAULT_SIZES)
    hub.add_repo("fsx/files", files=sources)
    mount = mount_factory("models:\n  fsx:\n    path: /models/fsx/\n    backend: vllm\n    hf: fsx/files\n",
                          hub.endpoint)
    pairs = [(mount.mountpoint / "fsx" / name, path) for name, path in sources.items()]
    summary = fsx.run(pairs, seed, ops=3000, processes=3, block_size=16 * MiB)
    print(summary)
    assert summary.ops == 3000 and set(summary.kinds) == set(fsx.KINDS)
    assert not summary.mismatches, replay_hint(summary, f"FSX_SEED={seed} pytest {__file__}")
