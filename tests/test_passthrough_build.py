"""The build of contrib/build-passthrough.sh: the venv's pyfuse3 loads the venv's libfuse."""

import subprocess
import sys
from pathlib import Path

import pytest

import pyfuse3

PRIVATE_LIBFUSE = Path(sys.prefix) / "libfuse" / "lib"
patched = pytest.mark.skipif(not hasattr(pyfuse3, "backing_open"),
                             reason="stock pyfuse3 (installed without contrib/build-passthrough.sh)")


def loaded_libfuse():
    """The libfuse file a fresh interpreter maps once pyfuse3 is imported (no LD_LIBRARY_PATH)."""
    code = ("import pyfuse3\n"
            "print(*{line.split()[-1] for line in open('/proc/self/maps') if 'libfuse3' in line})")
    env = {"PATH": "/usr/bin:/bin"}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          check=True).stdout.split()


@patched
def test_the_patched_pyfuse3_loads_the_venvs_own_libfuse_when_it_has_one():
    mapped = loaded_libfuse()
    assert len(mapped) == 1
    if PRIVATE_LIBFUSE.exists():
        assert Path(mapped[0]).resolve().parent == PRIVATE_LIBFUSE.resolve()


@patched
def test_the_loaded_libfuse_is_at_least_3_17():
    version = Path(loaded_libfuse()[0]).resolve().name.removeprefix("libfuse3.so.")
    assert tuple(int(part) for part in version.split(".")[:2]) >= (3, 17)


@patched
def test_the_patched_file_info_carries_a_backing_id_and_defaults_to_none():
    assert pyfuse3.FileInfo().backing_id == 0
    assert pyfuse3.FileInfo(backing_id=7, keep_cache=False).backing_id == 7
    assert pyfuse3.passthrough_enabled() is False      # no session: nothing negotiated


SCRIPT = Path(__file__).resolve().parent.parent / "contrib" / "build-passthrough.sh"


def build_cache_shell(home, then):
    """Run the script's cache settings and `then` in sh, for a user whose home is `home`."""
    text = SCRIPT.read_text()
    start, end = text.index("USER_CACHE="), text.index("\n}\n", text.index("move_old_build_cache() {")) + 3
    done = subprocess.run(["sh", "-eu", "-c", text[start:end] + then], env={"HOME": str(home), "PATH": "/usr/bin:/bin"},
                          capture_output=True, text=True, check=True)
    return done.stdout.strip()


def test_the_build_cache_is_never_inside_the_block_caches_default_directory(tmp_path):
    from vfs.settings import Settings
    block_cache = Path(str(Settings().cache_dir).replace(str(Path.home()), str(tmp_path), 1))
    build_cache = Path(build_cache_shell(tmp_path, 'echo "$CACHE"'))
    assert build_cache.is_relative_to(tmp_path) and not build_cache.is_relative_to(block_cache)


def test_a_build_cache_an_older_install_left_in_the_block_caches_directory_is_moved_out(tmp_path):
    old = tmp_path / ".cache" / "lamina-llm-cache" / "passthrough"
    (old / "wheels").mkdir(parents=True)
    (old / "wheels" / "pyfuse3.whl").write_text("built")
    moved = Path(build_cache_shell(tmp_path, 'move_old_build_cache; echo "$CACHE"'))
    assert (moved / "wheels" / "pyfuse3.whl").read_text() == "built"
    assert not (tmp_path / ".cache" / "lamina-llm-cache").exists()      # a mount may make it its cache now
