"""docs/DESIGN.md stays true: it names every module of vfs/, and the code it quotes exists.

No FUSE, no network, no root: this runs wherever the source tree is.
"""

import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DESIGN = ROOT / "docs" / "DESIGN.md"
# A quoted dotted name whose first part is a module of vfs/: `reader.Reader.read`.
QUOTED_NAME = re.compile(r"`([a-z_]+(?:\.[A-Za-z_]+)+)")
FILE_SUFFIXES = {"py", "md", "yaml", "json", "lock", "log", "data", "ok"}    # `concurrency.py` is a file


def modules():
    return sorted(str(path.relative_to(ROOT)) for path in (ROOT / "vfs").rglob("*.py"))


def vfs_module_names():
    return {path.stem for path in (ROOT / "vfs").glob("*.py")}


@pytest.mark.parametrize("module", modules())
def test_design_names_every_module(module):
    assert f"`{module}`" in DESIGN.read_text(), f"docs/DESIGN.md does not say what {module} owns"


def quoted_names():
    known = vfs_module_names()
    names = {match for match in QUOTED_NAME.findall(DESIGN.read_text())
             if match.split(".")[0] in known and match.split(".")[-1] not in FILE_SUFFIXES}
    return sorted(names)


def test_design_quotes_some_code():
    assert len(quoted_names()) > 20     # the read path is written with real names


@pytest.mark.parametrize("name", quoted_names())
def test_every_name_the_design_quotes_exists(name):
    module_name, *attributes = name.split(".")
    found = importlib.import_module(f"vfs.{module_name}")
    for attribute in attributes:
        assert hasattr(found, attribute), f"docs/DESIGN.md names {name}, which does not exist"
        found = getattr(found, attribute)
