"""bench.arenas keeps measuring what it says: its second daemon is this code without the arena cap."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.arenas import CAP_CALL, variants  # noqa: E402


def test_the_uncapped_variant_is_this_code_less_the_mallopt_call(tmp_path):
    capped, uncapped = variants(tmp_path).values()
    here = (Path(__file__).resolve().parent.parent / "vfs" / "mount.py").read_text()
    assert (capped / "vfs" / "mount.py").read_text() == here and CAP_CALL in here
    assert (uncapped / "vfs" / "mount.py").read_text() == here.replace(CAP_CALL, "        return\n")
