"""The long-run soak (vfs/testing/soak.py) keeps working: a short run with everything compressed.

The 20-minute run is a command (docs/RELIABILITY.md); this runs the same harness for 40 s
with the token rotated, a branch moved and gc run every few seconds, so the harness and
what it checks cannot rot between long runs. What the long run found gets a test here.
"""

import os
import subprocess
import sys
import time

import pytest

from conftest import needs_fuse
from vfs.blockcache import SWEEP_EVERY
from vfs.testing import soak
from vfs.testing.mounts import isolated_environment

MiB = 1024 * 1024

pytestmark = [needs_fuse, pytest.mark.fuse, pytest.mark.slow]


def test_a_short_soak_sees_exact_bytes_through_rotations_moves_gc_and_expiry(tmp_path, monkeypatch):
    for name, seconds in {"ROTATE_EVERY": 9, "GRACE": 2, "MOVE_EVERY": 7, "GC_EVERY": 6, "SAMPLE_EVERY": 5}.items():
        monkeypatch.setattr(soak, name, seconds)
    run = soak.Soak(tmp_path, minutes=40 / 60, readers=2, seed=7, url_seconds=3)
    result = run.run()
    print(soak.describe(result))
    assert result["reads"] > 1000 and result["bytes_checked"] > 0
    if "passthrough on" in run.mount.log_text():    # mixed: the kernel serves complete files
        assert 0 < result["passthrough_opens"] < result["opens"]
    assert result["mismatches"] == 0 and result["reader_errors"] == 0, result["problems"]
    assert result["failures"] == [] and result["log_problems"] == []
    assert result["stale_token_requests"] == 0
    events = result["events"]
    assert events["token rotations"] >= 3 and events["branch moves"] >= 4 and events["gc runs"] >= 5
    assert events["blobs evicted by gc"] > 0
    assert result["resolves"] > 10                  # URLs good for 3 s: resolved again and again


def deleted_blob_descriptors(pid):
    """The daemon's descriptors on blob files that are gone from the cache directory."""
    names = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if "/blobs/" in target and target.endswith(" (deleted)"):
            names.append(target)
    return names


def test_a_blob_gc_evicted_beside_the_mount_is_let_go_of_even_if_never_opened_again(
        hub, random_file, mount_factory, tmp_path):
    # Found by the 20-minute soak: after a branch moved, the old revision's blobs were
    # evicted by gc but never opened again, so the mount kept their descriptors (and
    # their deleted files' disk space) for the rest of its life, 3 more per move.
    sources = {name: random_file(name, 2 * MiB + i, seed=i).read_bytes() for i, name in enumerate(["a.bin", "b.bin"])}
    hub.add_repo("org/m", files=dict(sources))
    mount = mount_factory("models:\n  m:\n    path: /models/m/\n    backend: vllm\n    hf: org/m\n", hub.endpoint,
                          args=("--block-size", "1M"))
    assert (mount.mountpoint / "m" / "a.bin").read_bytes() == sources["a.bin"]
    manifest = mount.manifest
    gc = subprocess.run([sys.executable, "-m", "vfs", "gc", "--max-size", "0", "-m", str(manifest),
                         "--cache-dir", str(mount.cache_dir)], env=isolated_environment(tmp_path),
                        capture_output=True, text=True, timeout=60)
    assert gc.returncode == 0 and "evicted" in gc.stdout, gc.stdout + gc.stderr
    held = deleted_blob_descriptors(mount.process.pid)
    print(f"right after gc the mount holds {len(held)} descriptors on deleted blob files")
    time.sleep(SWEEP_EVERY + 0.5)
    assert (mount.mountpoint / "m" / "b.bin").read_bytes() == sources["b.bin"]      # any open looks
    assert deleted_blob_descriptors(mount.process.pid) == []
    assert (mount.mountpoint / "m" / "a.bin").read_bytes() == sources["a.bin"]      # fetched again, exact
