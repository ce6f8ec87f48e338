"""The cache directory as a whole: format version, blob layout, usage, LRU eviction, kept models.

Blob files are named by content id (see blockcache.py for what is inside them). A blob's
last use is the mtime of its `.data` file: the daemon touches it when a blob is opened,
and writing blocks moves it too. Eviction removes whole blobs, least recently used first,
never one that is open in this process or kept; what `keep` keeps is stored per model
name in `pins/<name>` (the content ids that model needs), written atomically. The folder
keeps its old name so that caches written before the rename to "keep" stay valid.

Other processes share the cache (a mount beside `gc`, `verify`, `pull`), so the rules
between processes are flocks, which the kernel drops when a process dies:
- A process holds a shared flock on a blob's `.data` file while it has the blob open or
  is filling it (blockcache.py). Eviction takes an exclusive flock without waiting and
  skips the blob when it cannot: nothing is evicted or truncated under a user.
- A mount holds an exclusive flock on `mount.lock` for its lifetime: a second mount on
  the same cache is refused at start with the pid of the first.
"""

import fcntl
import json
import logging
import os
import shutil
from collections.abc import Container, Iterable
from dataclasses import dataclass
from pathlib import Path

from . import errors
from .atomic import fsync_directory, write_atomically

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
CACHEDIR_TAG = b"Signature: 8a477f597d28d172789f06886806bc55\n# lamina-llm-cache block cache\n"
SUFFIXES = (".data", ".log", ".ok")


@dataclass
class Eviction:
    evicted: list[str]     # content ids removed
    in_use: int = 0        # blobs skipped because another process holds them


@dataclass(frozen=True)
class BlobOnDisk:
    content_id: str
    base: Path
    allocated: int        # bytes the blob really occupies (its data file is sparse)
    last_used: float


class CacheDir:
    def __init__(self, root: str | os.PathLike[str], block_size: int):
        self.root = Path(root)
        self.block_size = open_cache_dir(self.root, block_size)

    def blob_base(self, content_id: str) -> Path:
        algo, _, digest = content_id.partition(":")
        if algo not in ("sha256", "sha1") or not digest or not all(c in "0123456789abcdef" for c in digest):
            raise errors.CacheError(f"not a content id: {content_id!r}")
        return self.root / "blobs" / algo / digest[:2] / digest

    def make_blob_directories(self, content_ids: Iterable[str]) -> None:
        """Create the directories these blobs will live in, ahead of their first open (a
        first open that also creates directories costs its reader ~0.4 ms more)."""
        # At most 512 folders for any number of blobs: deduplicated on the id's first
        # characters before any path is built (100k Path objects cost ~1 s here).
        for prefix in {content_id[:content_id.find(":") + 3] for content_id in content_ids}:
            self.blob_base(prefix + "0").parent.mkdir(parents=True, exist_ok=True)

    def blobs(self) -> list[BlobOnDisk]:
        """Every blob stored, with its real disk use and last use.

        Folders and files may vanish while this runs (an eviction here, another process's
        gc): what vanished is simply not listed. (A glob raised FileNotFoundError for a
        folder emptied and removed mid-scan, which failed a block's store on a full disk.)"""
        found = []
        for algo in _entries(self.root / "blobs"):
            for folder in _entries(algo.path):
                for entry in _entries(folder.path):
                    if not entry.name.endswith(".data"):
                        continue
                    try:
                        info = entry.stat()
                    except FileNotFoundError:
                        continue
                    base = Path(entry.path[:-len(".data")])
                    found.append(BlobOnDisk(f"{algo.name}:{base.name}", base, info.st_blocks * 512, info.st_mtime))
        return found

    def blob_files(self) -> dict[str, set[str]]:
        """content id -> the suffixes of its files on disk (".data", ".log", ".ok")."""
        found: dict[str, set[str]] = {}
        for algo in ("sha256", "sha1"):
            try:
                folders = list(os.scandir(self.root / "blobs" / algo))
            except FileNotFoundError:
                continue
            for folder in folders:
                for entry in os.scandir(folder.path):
                    stem, dot, suffix = entry.name.rpartition(".")
                    if dot and "." + suffix in SUFFIXES:
                        found.setdefault(f"{algo}:{stem}", set()).add("." + suffix)
        return found

    def usage(self) -> int:
        return sum(blob.allocated for blob in self.blobs())

    def bytes_to_free(self, max_size: int | None, min_free_fraction: float, extra: int = 0) -> int:
        """How much to evict so the cache fits `max_size` and the disk keeps its free floor."""
        over_cap = (self.usage() + extra - max_size) if max_size is not None else 0
        disk = shutil.disk_usage(self.root)
        under_floor = int(disk.total * min_free_fraction) - (disk.free - extra)
        return max(0, over_cap, under_floor)

    def evict(self, amount: float, protected: Container[str]) -> Eviction:
        """Remove least recently used blobs not in `protected` until `amount` bytes are freed
        (math.inf: every one not protected).

        A blob another process holds (open or filling) is skipped, never removed."""
        freed, result = 0, Eviction([])
        for blob in sorted(self.blobs(), key=lambda b: b.last_used):
            if freed >= amount:
                break
            if blob.content_id in protected:
                continue
            if not remove_blob_unless_held(blob.base):
                result.in_use += 1
                continue
            freed += blob.allocated
            result.evicted.append(blob.content_id)
        if result.evicted:
            log.info("evicted %d blobs (%d bytes), least recently used first", len(result.evicted), freed)
        if result.in_use:
            log.info("kept %d blobs another process has open", result.in_use)
        return result

    def claim_for_mount(self) -> int:
        """Hold `mount.lock` for this process's lifetime (the fd returned); CacheError naming
        the other mount's pid when one already holds it."""
        fd = os.open(self.root / "mount.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise errors.CacheError(
                f"{self.root} is in use by another mount (pid {holder}); two mounts on one cache "
                "are refused: unmount it, or give this mount its own --cache-dir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        return fd

    def keep(self, name: str, content_ids: Iterable[str]) -> None:
        """Keep `name`'s blobs (`content_ids`) out of eviction, replacing what it kept before."""
        write_atomically(self.root / "pins" / name, json.dumps(sorted(content_ids)).encode())

    def unkeep(self, name: str) -> bool:
        """Let eviction have `name`'s blobs again; False when it kept nothing."""
        try:
            os.unlink(self.root / "pins" / name)
        except FileNotFoundError:
            return False
        return True

    def kept(self) -> dict[str, set[str]]:
        """name -> content ids, for every model kept with `keep`."""
        kept: dict[str, set[str]] = {}
        for path in sorted((self.root / "pins").glob("*")):
            try:
                kept[path.name] = set(json.loads(path.read_text()))
            except (OSError, ValueError):
                log.warning("%s: unreadable keep file, ignored", path)
        return kept


def hold_shared(data_path: Path) -> int | None:
    """A descriptor holding a shared flock on a blob's data file (None if it is gone).

    Blocks only while another process evicts or discards this very blob (a few unlinks,
    or a log truncated and synced)."""
    try:
        fd = os.open(data_path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    fcntl.flock(fd, fcntl.LOCK_SH)
    return fd


def try_exclusive(fd: int) -> bool:
    """Turn the shared flock held on `fd` into an exclusive one if no other process holds
    the file; on failure the shared flock is taken again (a conversion may drop it)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        fcntl.flock(fd, fcntl.LOCK_SH)
        return False


def share_again(fd: int) -> None:
    fcntl.flock(fd, fcntl.LOCK_SH)


def remove_blob_unless_held(base: Path) -> bool:
    """Remove a blob unless another process holds it; True when it is gone."""
    try:
        fd = os.open(base.with_suffix(".data"), os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        remove_blob(base)
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    else:
        remove_blob(base)       # under the exclusive flock: nobody can take it up meanwhile
        return True
    finally:
        os.close(fd)


def remove_blob(base: Path) -> None:
    for suffix in (".ok", ".log", ".data"):   # .ok first: never a verified marker without data
        try:
            os.unlink(base.with_suffix(suffix))
        except FileNotFoundError:
            pass


def open_cache_dir(root: Path, block_size: int) -> int:
    """Create or check the cache directory; the block size of an existing cache wins."""
    marker = root / "format"
    if marker.exists():
        return _read_format(marker)
    if root.exists() and any(root.iterdir()):
        raise errors.CacheError(f"{root}: not empty and not a lamina-llm-cache cache; refusing to use it")
    root.mkdir(parents=True, exist_ok=True)
    (root / "CACHEDIR.TAG").write_bytes(CACHEDIR_TAG)
    write_atomically(marker, f"lamina-llm-cache cache\nformat {FORMAT_VERSION}\nblock_size {block_size}\n".encode())
    fsync_directory(root)
    return block_size


def _read_format(marker: Path) -> int:
    try:
        lines = dict(line.split(" ", 1) for line in marker.read_text().splitlines()[1:] if " " in line)
        version, block_size = int(lines["format"]), int(lines["block_size"])
    except (OSError, ValueError, KeyError) as exc:
        raise errors.CacheError(f"{marker}: unreadable cache format marker ({exc})") from None
    if version != FORMAT_VERSION:
        raise errors.CacheError(
            f"{marker.parent}: cache format {version} is not supported by this version "
            f"(it reads format {FORMAT_VERSION}); use another --cache-dir or upgrade")
    return block_size


def _entries(path: str | os.PathLike[str]) -> list[os.DirEntry[str]]:
    """The entries of a folder, or none if it is gone (or is not a folder)."""
    try:
        with os.scandir(path) as entries:
            return list(entries)
    except (FileNotFoundError, NotADirectoryError):
        return []
