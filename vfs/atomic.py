"""Crash-safe small-file writes: temp file, fsync, rename, fsync of the directory."""

import os
import tempfile
from pathlib import Path


def write_atomically(path, data: bytes):
    """Replace `path` with `data` so a crash leaves either the old or the new file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, _mode_for(path))
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        with _ignoring_errors():
            os.unlink(tmp)
        raise
    fsync_directory(path.parent)


def _mode_for(path):
    """Keep an existing file's mode; a new file gets 0666 less the umask, like open()."""
    try:
        return os.stat(path).st_mode & 0o7777
    except FileNotFoundError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def fsync_directory(path):
    """Make a rename or a new file in `path` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _ignoring_errors:
    def __enter__(self):
        return self

    def __exit__(self, kind, value, tb):
        return isinstance(value, OSError)
