"""The cache directory as a whole: format version, blob layout, usage, LRU eviction, pins.

Blob files are named by content id (see blockcache.py for what is inside them). A blob's
last use is the mtime of its `.data` file: the daemon touches it when a blob is opened,
and writing blocks moves it too. Eviction removes whole blobs, least recently used first,
never one that is open in this process or pinned; pins are kept per model name in
`pins/<name>` (the content ids that model needs), written atomically.
"""

import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from . import errors
from .atomic import fsync_directory, write_atomically

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
CACHEDIR_TAG = b"Signature: 8a477f597d28d172789f06886806bc55\n# lamina-llm-cache block cache\n"
SUFFIXES = (".data", ".log", ".ok")


@dataclass(frozen=True)
class BlobOnDisk:
    content_id: str
    base: Path
    allocated: int        # bytes the blob really occupies (its data file is sparse)
    last_used: float


class CacheDir:
    def __init__(self, root, block_size):
        self.root = Path(root)
        self.block_size = open_cache_dir(self.root, block_size)

    def blob_base(self, content_id):
        algo, _, digest = content_id.partition(":")
        if algo not in ("sha256", "sha1") or not digest or not all(c in "0123456789abcdef" for c in digest):
            raise errors.CacheError(f"not a content id: {content_id!r}")
        return self.root / "blobs" / algo / digest[:2] / digest

    def make_blob_directories(self, content_ids):
        """Create the directories these blobs will live in, ahead of their first open (a
        first open that also creates directories costs its reader ~0.4 ms more)."""
        for parent in {self.blob_base(content_id).parent for content_id in content_ids}:
            parent.mkdir(parents=True, exist_ok=True)

    def blobs(self):
        """Every blob stored, with its real disk use and last use."""
        found = []
        for data in (self.root / "blobs").glob("*/*/*.data"):
            content_id = f"{data.parent.parent.name}:{data.stem}"
            try:
                info = data.stat()
            except FileNotFoundError:
                continue
            found.append(BlobOnDisk(content_id, data.with_suffix(""), info.st_blocks * 512, info.st_mtime))
        return found

    def usage(self):
        return sum(blob.allocated for blob in self.blobs())

    def bytes_to_free(self, max_size, min_free_fraction, extra=0):
        """How much to evict so the cache fits `max_size` and the disk keeps its free floor."""
        over_cap = (self.usage() + extra - max_size) if max_size is not None else 0
        disk = shutil.disk_usage(self.root)
        under_floor = int(disk.total * min_free_fraction) - (disk.free - extra)
        return max(0, over_cap, under_floor)

    def evict(self, amount, protected):
        """Remove least recently used blobs not in `protected` until `amount` bytes are freed."""
        freed, evicted = 0, []
        for blob in sorted(self.blobs(), key=lambda b: b.last_used):
            if freed >= amount:
                break
            if blob.content_id in protected:
                continue
            remove_blob(blob.base)
            freed += blob.allocated
            evicted.append(blob.content_id)
        if evicted:
            log.info("evicted %d blobs (%d bytes), least recently used first", len(evicted), freed)
        return evicted

    def pin(self, name, content_ids):
        write_atomically(self.root / "pins" / name, json.dumps(sorted(content_ids)).encode())

    def unpin(self, name):
        try:
            os.unlink(self.root / "pins" / name)
        except FileNotFoundError:
            return False
        return True

    def pinned(self):
        """name -> content ids, for every model pinned with `pin`."""
        pins = {}
        for path in sorted((self.root / "pins").glob("*")):
            try:
                pins[path.name] = set(json.loads(path.read_text()))
            except (OSError, ValueError):
                log.warning("%s: unreadable pin file, ignored", path)
        return pins


def remove_blob(base):
    for suffix in (".ok", ".log", ".data"):   # .ok first: never a verified marker without data
        try:
            os.unlink(base.with_suffix(suffix))
        except FileNotFoundError:
            pass


def open_cache_dir(root: Path, block_size):
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


def _read_format(marker):
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
