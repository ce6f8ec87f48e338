"""Models served from local files: the scan of a `local:` path, and reads that never mix bytes.

What the mount shows of a local model is what `scan` found when the mount started or at the
last /refresh: each file's size, mtime, inode and device (its `Signature`). The bytes are not
copied into the block cache; they are read from the local file itself.

The promise: a reader gets the scanned bytes or EIO, never a mix of old and new bytes.
- Open: the file is opened by its real path (O_NOFOLLOW) and its fstat must match the
  signature: a file replaced, rewritten, truncated or deleted since the scan fails with EIO.
- Read: fstat, pread, fstat. A write that overlaps the pread has moved the mtime (the kernel
  stamps it before copying the data), and a truncation the size; a file unlinked under an
  open handle has no links left. Either fstat then differs from the signature and the read
  fails with EIO. Since Linux 6.13 a change right after an fstat gets a fine-grained
  timestamp, so two changes within one clock tick are told apart too.
- One log line per changed file, until /refresh scans it again (a new inode is shown then).

Safety of the scan: a symlink whose target lies outside the local directory is skipped with
one warning per model (so is a symlink to a folder: folders are walked only as themselves);
FIFOs, sockets and devices are skipped; files the daemon cannot open are listed and give
EACCES. Nothing here opens a local file for anything but reading.
"""

import errno
import hashlib
import logging
import os
import stat
from dataclasses import dataclass, field

import trio

from . import errors
from .metrics import STATS

log = logging.getLogger(__name__)

MAX_ENTRIES = 100_000       # directory entries walked per model; more is a mistake, not a model
HASH_CHUNK = 16 * 1024 * 1024
_EXAMPLES = 3               # skipped names quoted in a warning
_OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK


@dataclass(frozen=True)
class Signature:
    """What identifies a local file's bytes without reading them."""

    size: int
    mtime_ns: int
    inode: int
    device: int

    @classmethod
    def of(cls, info: os.stat_result) -> "Signature":
        return cls(info.st_size, info.st_mtime_ns, info.st_ino, info.st_dev)


@dataclass(eq=False)
class LocalFile:
    """One file of a local model: where its bytes are, and what they were when scanned."""

    model: str
    path: str                   # as shown under the model's path ('/'-separated)
    source: str                 # the real path read from
    signature: Signature
    readable: bool              # the daemon could open it when it was scanned
    reported: bool = field(default=False)   # its change or refusal was logged (once per scan)

    @property
    def size(self) -> int:
        return self.signature.size

    @property
    def identity(self):
        """Equal for the same bytes: a refresh keeps the inode (and page cache) of an unchanged file."""
        return ("local", self.source, self.signature)

    @property
    def describe(self) -> str:
        return f"{self.model}/{self.path}"


@dataclass(frozen=True)
class LocalSnapshot:
    """A local model as scanned: its real root and its files."""

    root: str
    files: tuple[LocalFile, ...]
    commit = None               # what a Hub snapshot resolves to: a local model has none


# ---------------------------------------------------------------- scanning


def scan(spec) -> LocalSnapshot:
    """The files of the local model `spec` as they are now (blocking; reads metadata only)."""
    root = os.path.realpath(spec.local)
    if not spec.is_dir:
        try:
            info = os.stat(root)
        except OSError as exc:
            raise errors.LaminaError(f"model {spec.name!r}: {spec.local}: {exc.strerror}") from None
        if not stat.S_ISREG(info.st_mode):
            raise errors.LaminaError(f"model {spec.name!r}: {spec.local} is no longer a regular file")
        found = _local_file(spec.name, spec.parts[-1], root, info)
        _warn_unreadable(spec.name, [found])
        return LocalSnapshot(root, (found,))
    walk = _Walk(spec, root)
    files = walk.run()
    walk.report()
    _warn_unreadable(spec.name, files)
    return LocalSnapshot(root, tuple(files))


def _local_file(model, shown, source, info):
    return LocalFile(model, shown, source, Signature.of(info), _can_open(source))


def _can_open(path):
    try:
        os.close(os.open(path, _OPEN_FLAGS))
    except OSError:
        return False
    return True


def _warn_unreadable(model, files):
    unreadable = [f.path for f in files if not f.readable]
    if unreadable:
        log.warning("model %r: %d file(s) the daemon cannot open are listed and give EACCES, e.g. %s",
                    model, len(unreadable), ", ".join(map(repr, unreadable[:_EXAMPLES])))


def is_inside(path, root):
    """Whether real path `path` is `root` or lies under it."""
    return path == root or path.startswith(root.rstrip("/") + "/")


class _Walk:
    """A walk of one local directory model; skipped entries are gathered and reported once."""

    def __init__(self, spec, root):
        self.spec, self.root = spec, root
        self.files: list[LocalFile] = []
        self.skipped: dict[str, list[str]] = {}      # reason -> shown paths
        self.entries = 0

    def run(self):
        folders = [""]
        while folders:
            folder = folders.pop()
            for entry in self._entries(folder):
                shown = f"{folder}/{entry.name}" if folder else entry.name
                if entry.is_dir(follow_symlinks=False):
                    folders.append(shown)
                elif self.spec.wants(shown):
                    self._consider(entry, shown)
        self.files.sort(key=lambda f: f.path)
        return self.files

    def _entries(self, folder):
        try:
            with os.scandir(os.path.join(self.root, folder)) as listing:
                entries = list(listing)
        except OSError as exc:
            self.skipped.setdefault(f"folders that cannot be listed ({exc.strerror})", []).append(folder)
            return []
        self.entries += len(entries)
        if self.entries > MAX_ENTRIES:
            raise errors.LaminaError(
                f"model {self.spec.name!r}: {self.spec.local} holds more than {MAX_ENTRIES} entries; refused")
        return sorted(entries, key=lambda e: e.name)

    def _consider(self, entry, shown):
        source = entry.path
        if entry.is_symlink():
            source = os.path.realpath(entry.path)
            if not is_inside(source, self.root):
                self._skip("symlinks that point outside the model's directory", f"{shown} -> {source}")
                return
        try:
            info = os.stat(source)
        except OSError as exc:
            self._skip(f"entries that cannot be read ({exc.strerror})", shown)
            return
        if stat.S_ISDIR(info.st_mode):
            self._skip("symlinks to folders (not followed)", shown)
        elif not stat.S_ISREG(info.st_mode):
            self.skipped.setdefault("special files (FIFOs, sockets, devices)", []).append(shown)
        else:
            self.files.append(_local_file(self.spec.name, shown, source, info))

    def _skip(self, reason, what):
        self.skipped.setdefault(reason, []).append(what)

    def report(self):
        """One log line per kind of skipped entry: a warning, except for special files."""
        for reason, names in self.skipped.items():
            level = logging.INFO if reason.startswith("special") else logging.WARNING
            log.log(level, "model %r: skipped %d %s, e.g. %s", self.spec.name, len(names), reason,
                    ", ".join(map(repr, names[:_EXAMPLES])))


# ---------------------------------------------------------------- reading


class LocalHandle:
    """An open local file: its own descriptor, checked against the scanned signature.

    The descriptor is what a passthrough open hands the kernel as the backing file.
    """

    def __init__(self, file: LocalFile, fd: int):
        self.file, self.fd = file, fd
        self.size, self.describe = file.size, file.describe
        self._nowait = hasattr(os, "RWF_NOWAIT")

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def read(self, offset: int, length: int) -> bytes:
        """Exactly the scanned bytes at [offset, offset+length) (short only at EOF), or
        LocalFileChanged. Blocking: run in a worker thread."""
        want = max(0, min(length, self.size - offset))
        self._check()
        data = _pread_exactly(self.fd, want, offset)
        self._check()
        if len(data) != want:
            raise self._changed(f"{len(data)} of {want} bytes at offset {offset}")
        return data

    def read_cached(self, offset: int, length: int, into: memoryview) -> memoryview | None:
        """The same bytes when they are all in the page cache (no waiting on the disk), read
        into `into` (a view of it is returned, valid until `into` is reused), else None."""
        want = max(0, min(length, self.size - offset))
        if not self._nowait or want == 0 or want > len(into):
            return None
        self._check()
        try:
            got = os.preadv(self.fd, [into[:want]], offset, os.RWF_NOWAIT)
        except OSError as exc:
            if exc.errno in (errno.EOPNOTSUPP, errno.EINVAL):
                self._nowait = False        # this filesystem has no RWF_NOWAIT
            return None
        if got != want:
            return None                     # partly cached: the worker thread reads it all
        self._check()
        return into[:want]

    def _check(self):
        info = os.fstat(self.fd)
        now = Signature.of(info)
        if now != self.file.signature or info.st_nlink == 0:
            raise self._changed(_difference(self.file.signature, now, info.st_nlink))

    def _changed(self, what):
        return errors.LocalFileChanged(
            f"{self.describe}: {self.file.source} changed since it was scanned ({what}); "
            "reads fail with EIO until /refresh")


def _difference(before, now, links):
    if links == 0:
        return "deleted"
    if before.size != now.size:
        return f"size {before.size} -> {now.size}"
    if (before.inode, before.device) != (now.inode, now.device):
        return "replaced by another file"
    return "modified"


def _pread_exactly(fd, length, offset):
    pieces, got = [], 0
    while got < length:
        piece = os.pread(fd, length - got, offset + got)
        if not piece:
            break
        pieces.append(piece)
        got += len(piece)
    return pieces[0] if len(pieces) == 1 else b"".join(pieces)


def open_local(file: LocalFile) -> LocalHandle:
    """A handle on `file`; EACCES if the daemon may not read it, EIO if it changed since the scan."""
    try:
        fd = _open_quietly(file.source)
    except OSError as exc:
        if exc.errno in (errno.EACCES, errno.EPERM):
            raise _once(file, errors.LocalUnreadable(
                f"{file.describe}: {file.source}: {exc.strerror}")) from None
        raise _once(file, errors.LocalFileChanged(
            f"{file.describe}: {file.source} changed since it was scanned ({exc.strerror}); "
            "reads fail with EIO until /refresh")) from None
    handle = LocalHandle(file, fd)
    try:
        handle._check()
    except errors.LocalFileChanged as exc:
        handle.close()
        raise _once(file, exc) from None
    return handle


def _open_quietly(path):
    """A read-only descriptor that does not update the file's access time where allowed."""
    try:
        return os.open(path, _OPEN_FLAGS | os.O_NOATIME)
    except PermissionError as exc:
        if exc.errno != errno.EPERM:    # O_NOATIME needs ownership; EACCES is a real refusal
            raise
    return os.open(path, _OPEN_FLAGS)


def _once(file, exc):
    """Log `exc` if it is the first failure of `file` since its scan; reported either way."""
    if not file.reported:
        file.reported = True
        log.error("%s", exc)
    errors.REPORTED.add(exc)
    return exc


# Reads answered on the trio thread land here. One buffer serves every handle: the view
# returned is copied out by pyfuse3 before the next await, so no two reads overlap in it.
_SCRATCH = memoryview(bytearray(4 * 1024 * 1024))      # above FUSE's largest read (1 MiB)


async def read(handle: LocalHandle, offset: int, length: int) -> bytes | memoryview:
    """A FUSE read of a local file: on the spot from the page cache, else in a worker thread.
    A view returned is valid until the next await (the caller, pyfuse3, copies it at once)."""
    try:
        data: bytes | memoryview | None = handle.read_cached(offset, length, _SCRATCH)
        if data is None:
            data = await trio.to_thread.run_sync(handle.read, offset, length)
    except errors.LocalFileChanged as exc:
        raise _once(handle.file, exc) from None
    STATS.served["local_files"] += len(data)      # on the trio thread, as the metrics rule asks
    return data


# ---------------------------------------------------------------- hashing


def sha256_of(file: LocalFile) -> str:
    """'sha256:<hex>' of the file's scanned bytes; LocalFileChanged if it moves while hashed."""
    handle = open_local(file)
    try:
        digest = hashlib.sha256()
        for offset in range(0, file.size, HASH_CHUNK):
            digest.update(handle.read(offset, HASH_CHUNK))
        return f"sha256:{digest.hexdigest()}"
    finally:
        handle.close()
