"""`make bench-smoke` keeps working: the benchmark harness runs end to end on a small file.

It measures nothing worth reading (one repeat, 48 MiB); it only proves every comparison
still runs. It needs what the benchmark needs, and skips without it.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TOOLS = ("fio", "rclone", "curl", "fusermount3")

pytestmark = [
    pytest.mark.fuse,
    pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/dev/fuse"),
                       reason="the benchmark mounts and drops the page cache: needs root and /dev/fuse"),
    pytest.mark.skipif(not all(shutil.which(tool) for tool in TOOLS),
                       reason=f"the benchmark compares against {', '.join(TOOLS[:3])}: not all installed"),
]


def test_the_smoke_benchmark_writes_a_report_with_every_comparison(tmp_path):
    result = subprocess.run([sys.executable, "-m", "bench", "--smoke", "--out", str(tmp_path / "out"),
                             "--work", str(tmp_path / "work")], cwd=ROOT, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    report = (tmp_path / "out" / "BENCHMARKS.md").read_text()
    for figure in ("curl", "hf_hub_download", "rclone", "blob file", "local copy", "fio",
                   "MAP_POPULATE", "first byte", "concurrent", "RSS"):
        assert figure in report, f"{figure} missing from the report"
