"""The type checker is clean on vfs/, with the configuration in pyproject.toml.

`make test` runs it first (`make typecheck`); this runs it too, so a plain `pytest`
catches a type error as well. No FUSE, no network, no root. Seconds once mypy's cache
(.mypy_cache) is warm; the first run on a fresh checkout takes about a minute.
"""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_mypy_is_clean_on_every_module_of_vfs():
    run = subprocess.run([sys.executable, "-m", "mypy"], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    checked = re.search(r"no issues found in (\d+) source files", run.stdout)
    assert checked is not None, run.stdout
    assert int(checked.group(1)) == len(list((ROOT / "vfs").rglob("*.py")))
