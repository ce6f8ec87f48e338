"""The on-disk block cache: blobs, block presence, single-flight fetch, verification.

Knows nothing of FUSE, inodes or the Hub: a blob is a content id and a size, and bytes
come from a `BlockSource` the caller hands in.

The surface is narrow: `BlockCache.open(content_id, size)` hands out a `BlobHandle`, and
callers read, prefetch, fill, verify and ask the state of a blob only through it. A
handle is a context manager owning one share of the blob's open count (an open blob is
never evicted). The presence map, the in-flight table and the block buffers stay inside
this module. `BlockCache.peek` tells a blob's state without opening it.

Layout (format 1) under the cache directory:

    format                              "lamina-llm-cache cache" / "format 1" / "block_size N"
    CACHEDIR.TAG                        so backup tools skip the cache
    blobs/<algo>/<hh>/<hex>.data        sparse file of the blob's full size
    blobs/<algo>/<hh>/<hex>.log         presence log: one 16-byte record per block stored
    blobs/<algo>/<hh>/<hex>.ok          present once the whole blob hashed to its content id

Durability rules:
- A block's bytes are pwritten and fdatasync'ed *before* its record is appended to the
  log and the log is fdatasync'ed. A record is the only proof that a block is present,
  so after a crash or SIGKILL every block counted present is on disk.
- A record carries the block's crc32 and its own crc32; a torn or garbled record is
  ignored (its block is fetched again). Later records for a block win over earlier ones.
- A block read from disk for the first time in this process is checked against its crc
  before it is served; a mismatch drops it and fetches it again. (A daemon that took a
  live mount over takes its predecessor's checks: `adopt_checked`.)
- When every block is present the blob is hashed against its content id (sha256 for LFS
  files, git blob sha1 for small ones); only then is `.ok` written. A mismatch discards
  the blob's presence and says so in the log. Blobs of one block are hashed before a
  single byte of them is served.

Concurrency rules:
- In-memory state (_Blob.present/.crcs/.checked/.open_count, the in-flight table, the
  block buffers) is only touched from the trio thread. Worker threads do blocking work (HTTP, pwrite + fsync, hashing) on
  values handed to them and return results; they never touch that state.
- One fetch per (blob, block) at a time, whatever the number of readers or handles: the
  first asker starts it, later askers wait for the same Flight and share its bytes. A
  flight stays in the table until its bytes are durable, so nobody fetches it twice.
- Blocks pass through a fixed set of page-aligned memory buffers (blockmemory.py,
  `memory` bytes in all): a download lands in one and is held there until written
  with O_DIRECT; a cached block a stream reads is loaded into one (buffered: the kernel's
  read-ahead on the data file). Readers are served from them; after a block leaves
  memory, readers pread it from disk.
- One copy in memory: the data file's pages a load or a pread brought in are dropped
  (posix_fadvise DONTNEED) once read, since the bytes go on to the FUSE page cache.
- A big read never waits on the disk on the trio thread: a pread that might goes to a
  worker thread; the trio thread waits itself only for small reads (SMALL_READ), where a
  hand-off costs more.
- Other processes (`pull`) append to the same logs. Before fetching a block that looks
  absent, the log's new records are read in, so their work is reused.

Origins that ignore Range (a mirror or proxy that answers every range with the whole
file): fetching block by block would send the file's prefix again for every block, so a
blob of such a source is filled in one pass instead (`_run_stream`). One GET, asked from
the first block wanted with an open-ended Range, is read in order into block buffers,
filling every block that is absent (its prefix too, when the server sends it whole). Each
block still has its own flight: the stream hands the flight a held buffer with the
block's bytes, and the flight wakes its readers, writes and records the block as for any
download, so readers are served as their blocks arrive and verification is unchanged. At
most one stream per blob; a block behind a running stream waits for it to end and starts
the next one.
"""

import errno
import hashlib
import logging
import mmap
import os
import struct
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Awaitable, Callable, Iterable
from typing import Protocol

import trio

from . import blockio, cachedir, errors, readahead
from .atomic import write_atomically
from .blockmemory import BlockKey, BlockMemory, Buffer
from .cachedir import CacheDir
from .logs import where
from .metrics import STATS
from .settings import DEFAULT_MEMORY
from .tasks import guard, spawn_guarded

log = logging.getLogger(__name__)

RECORD = struct.Struct("<4sIII")       # magic, block index, block crc32, record crc32
RECORD_MAGIC = b"BLK1"
SMALL_READ = 64 * 1024                 # a read this small waits for the disk on the trio thread
READ_ROUNDS = 3                        # a read retries when its block left memory under it
PEEK_SCAN_FROM = 64                    # peek_many scans the blob folders for this many blobs
STREAM_TRIES = 3                       # a one-pass read whose body breaks is reopened this often
SWEEP_EVERY = 10.0                     # seconds between looks for idle blobs another process evicted
FILL_PARALLEL = 4                      # blocks a fill fetches at once, at most
DISK_THREADS = 4                       # block loads, writes and hashes in worker threads at once
SYNC_THREADS = 2                       # fsyncs at once (each may wait on the whole device)


class BlockSource(Protocol):
    """Where a blob's bytes come from when they are not cached.

    Every source has these two; a source may also have any of `RangedSource`'s methods,
    which the cache looks up by name (`fill_from`, `_ignores_range`, `_check_streamed`,
    `whole_body_opener`): sources.RemoteSource, sources.HfCacheSource and
    reader.SplicedSource have them all, a test's in-memory source only these two."""

    describe: str   # "model/file" for log lines

    def fetch(self, start: int, length: int) -> bytes | bytearray:
        """Exactly `length` bytes from `start` (blocking; called in a worker thread)."""
        ...


class WholeBody(Protocol):
    """A source's bytes from `position` to the end of the file, read in order (one GET:
    fetch.WholeBody). Blocking, one worker thread at a time."""

    position: int

    def readinto(self, view: memoryview) -> None:
        """Fill `view` exactly with the next bytes, or raise FetchError."""
        ...

    def discard(self, count: int) -> None: ...

    def close(self) -> None: ...


class RangedSource(BlockSource, Protocol):
    """The optional methods of a BlockSource (blocking ones run in worker threads)."""

    def fetch_into(self, start: int, view: memoryview) -> None:
        """Fill `view` exactly with the bytes from `start`, received straight into it."""
        ...

    def ignores_range(self) -> bool:
        """Its server is known to answer every range with the whole file (non-blocking)."""
        ...

    def open_whole_body(self, start: int, size: int) -> WholeBody:
        """Its bytes from `start` to `size` in one pass (called once its server ignored Range)."""
        ...

    def splice_into(self, block_start: int, view: memoryview) -> None:
        """Put bytes already served from this block into it (reader.SplicedSource)."""
        ...

    def prepare(self) -> None:
        """Get ready for a first read: follow the Hub's redirect (reader.Reader.opened)."""
        ...


@dataclass(eq=False)
class Flight:
    """One block being fetched: readers wait on `done`, then take `data` or `error`."""

    done: trio.Event = field(default_factory=trio.Event)
    error: BaseException | None = None
    written: bool = False           # its bytes are in the data file (durable or not yet)
    streamed: bool = False          # its bytes come from the blob's one-pass stream


@dataclass(eq=False)
class _Delivery:
    """One block's buffer handed from a blob's stream to the block's flight."""

    ready: trio.Event = field(default_factory=trio.Event)
    buffer: Buffer | None = None
    error: BaseException | None = None


class _NotReached(Exception):
    """A stream ended without passing a block (its server honoured the Range after all)."""


class _BlobStream:
    """One pass over a blob's bytes, in order; `position` is the next block not decided yet.

    Until its body is open, every block may still be reached (a server that ignores Range
    sends the file from its first byte); after, those from `position` on."""

    def __init__(self, first: int) -> None:
        self.position = first
        self.opened = False
        self.deliveries: dict[int, _Delivery] = {}
        self.ended = trio.Event()

    def will_deliver(self, index: int) -> bool:
        if self.ended.is_set():
            return False
        return index in self.deliveries or not self.opened or index >= self.position

    def first_wanted(self) -> int:
        pending = [i for i, d in self.deliveries.items() if not d.ready.is_set()]
        return min([self.position, *pending])

    def delivery(self, index: int) -> _Delivery:
        return self.deliveries.setdefault(index, _Delivery())

    def end(self, error: BaseException | None) -> None:
        self.ended.set()
        for delivery in self.deliveries.values():
            if not delivery.ready.is_set():
                delivery.error = error or _NotReached()
                delivery.ready.set()


@dataclass(frozen=True)
class BlobState:
    """What is cached of one blob, as a user is told it."""

    blocks: int                     # blocks the blob has in all
    present_blocks: int             # blocks durable on disk
    cached_bytes: int
    verified: bool                  # hashed whole against its content id
    failed_verifications: int = 0   # in this process

    @property
    def complete(self) -> bool:
        return self.present_blocks == self.blocks


class _Blob:
    """One content id's cached bytes and presence; shared by every handle of that content."""

    def __init__(self, base: Path, content_id: str, size: int, block_size: int):
        self.content_id, self.size, self.block_size = content_id, size, block_size
        self.data_path = base.with_suffix(".data")
        self.log_path = base.with_suffix(".log")
        self.ok_path = base.with_suffix(".ok")
        self.blocks = max(1, -(-size // block_size))
        self.present = bytearray(self.blocks)
        self.checked = bytearray(self.blocks)
        self.crcs = [0] * self.blocks
        self.log_read = 0               # bytes of the log already applied
        self.verified = self.is_empty_content()
        self.failed_verifications = 0
        self.open_count = 0             # open BlobHandles: an open blob is never evicted
        self.users = 0                  # open handles + flights: while > 0, `hold_fd` holds a
        self.hold_fd: int | None = None  # shared flock other processes' eviction respects
        self._data_fd: int | None = None    # None while its files are closed
        self._log_fd: int | None = None
        self.direct_fd: int | None = None   # None also where O_DIRECT cannot be had

    def is_empty_content(self) -> bool:
        """An empty file whose content id is that of no bytes: verified with nothing to fetch
        (no block of it is ever filled, so nothing else would ever hash it)."""
        return self.size == 0 and matches_content_id(self.content_id, 0, ())

    @property
    def data_fd(self) -> int:
        return _opened(self._data_fd, self)

    @property
    def log_fd(self) -> int:
        return _opened(self._log_fd, self)

    def block_range(self, index: int) -> tuple[int, int]:
        start = index * self.block_size
        return start, min(self.block_size, self.size - start)

    def cached_bytes(self) -> int:
        return sum(self.block_range(i)[1] for i in range(self.blocks) if self.present[i])

    def complete(self) -> bool:
        return all(self.present)

    def state(self, verified: bool | None = None) -> BlobState:
        return BlobState(self.blocks, sum(self.present), self.cached_bytes(),
                         self.verified if verified is None else verified, self.failed_verifications)

    def open_files(self) -> None:
        self.data_path.parent.mkdir(parents=True, exist_ok=True)
        self._data_fd = data_fd = os.open(self.data_path, os.O_RDWR | os.O_CREAT, 0o644)
        if os.fstat(data_fd).st_size != self.size:
            os.ftruncate(data_fd, self.size)
        self.direct_fd = blockio.open_direct(self.data_path, self.block_size)
        self._log_fd = os.open(self.log_path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
        self.verified = self.ok_path.exists() or self.is_empty_content()
        self.read_new_records()

    def open_log_only(self) -> None:
        """For a look at its presence (BlockCache.peek): FileNotFoundError if it has no log."""
        self._log_fd = os.open(self.log_path, os.O_RDONLY)

    def read_new_records(self) -> None:
        """Apply log records appended since the last look (by us or another process)."""
        end = os.fstat(self.log_fd).st_size
        if end < self.log_read:      # the log was reset (blob discarded elsewhere)
            self.forget_all()
        whole = (end - self.log_read) // RECORD.size * RECORD.size
        raw = os.pread(self.log_fd, whole, self.log_read) if whole else b""
        self.log_read += len(raw)
        for offset in range(0, len(raw), RECORD.size):
            self._apply(raw[offset:offset + RECORD.size])

    def _apply(self, record: bytes) -> None:
        magic, index, crc, own_crc = RECORD.unpack(record)
        if magic != RECORD_MAGIC or own_crc != zlib.crc32(record[:12]) or index >= self.blocks:
            return                      # torn or foreign record: its block stays absent
        if not self.present[index] or self.crcs[index] != crc:
            self.checked[index] = 0
        self.present[index], self.crcs[index] = 1, crc

    def forget_all(self) -> None:
        self.present[:] = bytes(self.blocks)
        self.checked[:] = bytes(self.blocks)
        self.log_read = 0
        self.verified = False

    def close_files(self) -> None:
        for fd in (self._data_fd, self._log_fd, self.direct_fd, self.hold_fd):
            if fd is not None:
                os.close(fd)
        self._data_fd = self._log_fd = self.direct_fd = self.hold_fd = None

    def on_disk(self) -> bool:
        """Its data file is still the one this process has open (no other process evicted it)."""
        try:
            return os.stat(self.data_path).st_ino == os.fstat(self.data_fd).st_ino
        except FileNotFoundError:
            return False

    def use(self) -> None:
        """One more user (a handle or a flight); the first takes the shared flock."""
        self.users += 1
        if self.users > 1:
            return
        self.hold_fd = cachedir.hold_shared(self.data_path)
        if self.hold_fd is None or os.fstat(self.hold_fd).st_ino != os.fstat(self.data_fd).st_ino:
            # Evicted by another process between our open and this hold: start over on a
            # fresh file (nobody else uses this blob in this process right now).
            self.close_files()
            self.forget_all()
            self.open_files()
            self.hold_fd = cachedir.hold_shared(self.data_path)

    def unuse(self) -> None:
        self.users -= 1
        if self.users == 0 and self.hold_fd is not None:
            os.close(self.hold_fd)
            self.hold_fd = None


def _touched(blob: _Blob) -> bool:
    """Mark the blob recently used (its mtime, for LRU eviction); False if its file is no longer
    the one this process has open. gc beside the mount may delete an idle blob at any moment,
    also between a look and the touch: a FileNotFoundError here is that, not a failed open."""
    try:
        os.utime(blob.data_path)
    except FileNotFoundError:
        return False
    return blob.on_disk()


def make_record(index: int, crc: int) -> bytes:
    head = struct.pack("<4sII", RECORD_MAGIC, index, crc)
    return head + struct.pack("<I", zlib.crc32(head))


def content_hasher(content_id: str, size: int) -> "hashlib._Hash":
    """A hashlib object primed so its hexdigest equals the content id's hex when bytes match."""
    algo, _ = content_id.split(":", 1)
    if algo == "sha256":
        return hashlib.sha256()
    hasher = hashlib.sha1()
    hasher.update(b"blob %d\0" % size)  # git hashes a header before the bytes
    return hasher


def matches_content_id(content_id: str, size: int, chunks: Iterable[bytes | memoryview]) -> bool:
    hasher = content_hasher(content_id, size)
    for chunk in chunks:
        hasher.update(chunk)
    return hasher.hexdigest() == content_id.split(":", 1)[1]


class BlobHandle:
    """One holder's use of a blob: its reads, fetches, verification and state.

    Got from `BlockCache.open`; a context manager. Open, it keeps the blob from eviction;
    `close` gives that up (a closed handle still reads while the blob stays cached, so a
    warm-up ending after its file was closed does no harm). Every handle of a content id
    shares one set of file descriptors, one presence map and one fetch per block.

    A handle carries nothing the cache directory does not: a successor process can take
    over a blob by opening a handle on the same content id. Resources a holder ties to
    the blob for as long as it is open (a kernel passthrough backing id, say) are handed
    to `on_close`, which releases them when the handle closes, newest first.
    Trio thread only.
    """

    def __init__(self, cache: "BlockCache", blob: _Blob):
        self._cache, self._blob = cache, blob
        self._closers: list[Callable[[], None]] = []
        self._open = True
        blob.open_count += 1
        blob.use()

    @property
    def content_id(self) -> str:
        return self._blob.content_id

    @property
    def size(self) -> int:
        return self._blob.size

    @property
    def block_count(self) -> int:
        return self._blob.blocks

    @property
    def in_use(self) -> bool:
        """True while any handle of this blob (this one or another) is open."""
        return self._blob.open_count > 0

    def is_present(self, index: int) -> bool:
        """Block `index` is durable in the cache (it may still be fetched again if corrupt)."""
        return index < self._blob.blocks and bool(self._blob.present[index])

    def is_fetching(self, index: int) -> bool:
        return (self._blob.content_id, index) in self._cache._inflight

    def state(self) -> BlobState:
        return self._blob.state()

    @property
    def failed_verifications(self) -> int:
        """Times this blob was discarded in this process (cheap: sources ask it per fetch)."""
        return self._blob.failed_verifications

    def verified_data_fd(self) -> int | None:
        """The data file's descriptor once the whole blob is verified (its bytes can no longer
        change while the handle is open) and every block's crc was checked in this process,
        else None. For serving it without the daemon: the kernel reading the file directly
        would not notice bytes that rotted on disk since the blob was verified."""
        blob = self._blob
        return blob.data_fd if blob.verified and blob.checked.count(0) == 0 else None

    def needs_check(self) -> bool:
        """Verified, but some block's crc not yet checked in this process (see `check_blocks`)."""
        return self._blob.verified and self._blob.checked.count(0) > 0

    async def check_blocks(self) -> bool:
        """Check every unchecked block's crc (O_DIRECT: no page cache); a bad block is dropped
        and fetched again later, as on a read. True if every block checked out."""
        return await self._cache._check_blocks(self._blob)

    def read_now(self, index: int, start: int, length: int, into: memoryview) -> memoryview | bytes | None:
        """Block `index`'s bytes [start, start+length) if they can be had without waiting, else None.

        Valid until the next await. See `BlockCache._read_now`."""
        return self._cache._read_now(self._blob, index, start, length, into)

    async def read(self, index: int, start: int, length: int, source: BlockSource,
                   served: dict[str, int] | None = None) -> bytes:
        """`length` bytes at `start` inside block `index` (a copy of its own), fetched if missing;
        `served` counts them by where they came from (metrics.STATS.served for a reader's read)."""
        return await self._cache._read(self._blob, index, start, length, source, served)

    def prefetch(self, index: int, source: BlockSource) -> None:
        """Start fetching block `index` in the background unless it is here or coming."""
        self._cache._prefetch(self._blob, index, source)

    def load_ahead(self, index: int) -> None:
        """Start reading cached block `index` into memory unless it is there or on its way."""
        self._cache._load_ahead(self._blob, index)

    async def fill(self, source: BlockSource, on_block: Callable[[int], object] = lambda length: None,
                   parallel: int = FILL_PARALLEL) -> None:
        """Fetch every absent block, the first failure raised as itself. As many blocks at a time
        as hold the requests the link gives this file (readahead.py), `parallel` at most."""
        await self._cache._fill(self._blob, source, on_block, parallel)

    async def verify(self, describe: str = "") -> bool:
        """Hash the complete blob; mark it verified, or discard it on a mismatch (False)."""
        return await self._cache._verify(self._blob, describe)

    def on_close(self, release: Callable[[], None]) -> None:
        """Call `release` when this handle closes (at once if it is closed already)."""
        if not self._open:
            release()
            return
        self._closers.append(release)

    def close(self) -> None:
        if not self._open:
            return
        self._open = False
        self._blob.open_count -= 1
        self._blob.unuse()
        while self._closers:
            self._closers.pop()()

    def __enter__(self) -> "BlobHandle":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class BlockCache:
    """The blobs of one cache directory, the block buffers, and every fetch and load of them."""

    def __init__(self, directory: CacheDir, fetch_workers: int = 8, max_size: int | None = None,
                 min_free_fraction: float = 0.05, kept: Iterable[str] = frozenset(),
                 memory: int = DEFAULT_MEMORY):
        self.directory = directory
        self.block_size = directory.block_size
        self.max_size, self.min_free_fraction = max_size, min_free_fraction
        self.kept = set(kept)           # content ids eviction must not touch
        self._blobs: dict[str, _Blob] = {}
        self._next_sweep = 0.0          # when idle blobs evicted by another process are next let go of
        self._inflight: dict[tuple[str, int], Flight] = {}
        self._streams: dict[str, _BlobStream] = {}          # content id -> its one-pass fill
        self._fetch_limiter = trio.CapacityLimiter(fetch_workers)
        self._memory = BlockMemory(self.block_size, memory // self.block_size)
        self._loads: dict[tuple[str, int], trio.Event] = {}     # blocks being read into memory
        self._disk_limiter = trio.CapacityLimiter(DISK_THREADS)
        self._sync_limiter = trio.CapacityLimiter(SYNC_THREADS)
        self._evicting = trio.Lock()    # one eviction at a time: each sees the room the last made
        self._verifying: set[str] = set()   # content ids being hashed in the background
        self._usage: int | None = None  # bytes on disk, kept current between scans
        self._nursery: trio.Nursery | None = None
        # Called (from the trio thread) with a content id whose bytes were discarded, so a
        # mount can make the kernel drop pages it cached from them.
        self.on_discard: Callable[[str], Awaitable[None]] | None = None
        # A command beside a mount (pull, verify) never truncates a blob another process
        # holds; a mount discards bad bytes itself, since it is the one serving them.
        self.defer_discards = False
        # Blocks a predecessor daemon on the same connection checked (`adopt_checked`),
        # applied when the blob is first opened here.
        self._handed_checks: dict[str, tuple[int, dict[int, int]]] = {}

    def start(self, nursery: trio.Nursery) -> None:
        """Background fetches and verifications run in `nursery` (one per mount)."""
        self._nursery = nursery

    def _started(self) -> trio.Nursery:
        """The nursery background fetches run in (`start`)."""
        if self._nursery is None:
            raise RuntimeError("BlockCache.start was not called: nowhere to fetch in the background")
        return self._nursery

    @property
    def buffer_count(self) -> int:
        """How many blocks fit in memory at once (the block buffers)."""
        return self._memory.count

    def open(self, content_id: str, size: int) -> BlobHandle:
        """A handle on `content_id`'s blob, opened on first use; marks the blob recently used."""
        self._let_go_of_evicted_blobs()
        blob = self._blobs.get(content_id)
        if blob is not None and not _touched(blob) and blob.users == 0:
            self._forget_blob(content_id)      # another process evicted it while unused here
            blob = None
        if blob is None:
            blob = _Blob(self.directory.blob_base(content_id), content_id, size, self.block_size)
            blob.open_files()
            self._blobs[content_id] = blob
            self._apply_handed_checks(blob)
        return BlobHandle(self, blob)

    def export_checked(self) -> dict[str, list]:
        """The blocks whose crc this process checked, by blob: [data file inode, [[index,
        crc], ...]], for a successor daemon on the same connection (`adopt_checked`)."""
        out: dict[str, list] = {}
        for content_id, blob in self._blobs.items():
            if blob._data_fd is None or not any(blob.checked):
                continue
            checked = [[index, blob.crcs[index]] for index in range(blob.blocks)
                       if blob.checked[index] and blob.present[index]]
            out[content_id] = [os.fstat(blob._data_fd).st_ino, checked]
        return out

    def adopt_checked(self, exported: dict[str, list]) -> None:
        """Take a predecessor's checks as this process's own (`export_checked`).

        The crc check on a block's first read in a process guards against bytes that
        changed on disk since they were written. A predecessor that held this cache's
        mount.lock until the hand-over checked these moments ago; a block counts as
        checked here only if it is still present with the same crc, in the same data
        file (its inode), so anything written or replaced since is checked again."""
        for content_id, (inode, checked) in exported.items():
            self._handed_checks[content_id] = (inode, {index: crc for index, crc in checked})
        for blob in self._blobs.values():
            self._apply_handed_checks(blob)

    def _apply_handed_checks(self, blob: _Blob) -> None:
        handed = self._handed_checks.pop(blob.content_id, None)
        if handed is None or blob._data_fd is None:
            return
        inode, checked = handed
        if os.fstat(blob._data_fd).st_ino != inode:
            return                      # replaced since (evicted and fetched again): check it here
        for index, crc in checked.items():
            if index < blob.blocks and blob.present[index] and blob.crcs[index] == crc:
                blob.checked[index] = 1

    def peek_many(self, blobs: list[tuple[str, int]]) -> list[BlobState]:
        """`peek` of many (content id, size) pairs, for reports on repos of many files.

        One scan of the blob folders says which blobs have a log at all (most of a big
        repo has none) and which are verified whole (`.ok`: no log to read); only the
        rest are peeked one by one."""
        if len(blobs) < PEEK_SCAN_FROM:
            return [self.peek(content_id, size) for content_id, size in blobs]
        on_disk = self.directory.blob_files()
        absent: dict[int, BlobState] = {}      # blocks -> the state of a blob with none cached
        states = []
        for content_id, size in blobs:
            suffixes = on_disk.get(content_id)
            blocks = max(1, -(-size // self.block_size))
            if suffixes is None and content_id not in self._blobs:
                state = absent.get(blocks) or absent.setdefault(blocks, BlobState(blocks, 0, 0, False))
            elif content_id not in self._blobs and suffixes is not None and {".ok", ".log"} <= suffixes:
                state = BlobState(blocks, blocks, size, True)
            else:
                state = self.peek(content_id, size)
            states.append(state)
        return states

    def peek(self, content_id: str, size: int) -> BlobState:
        """The state of a blob, read from disk without opening it for use."""
        blob = self._blobs.get(content_id)
        if blob is not None:
            return blob.state()
        probe = _Blob(self.directory.blob_base(content_id), content_id, size, self.block_size)
        try:
            probe.open_log_only()
        except FileNotFoundError:
            return probe.state()
        try:
            probe.read_new_records()
            return probe.state(verified=probe.ok_path.exists() or probe.is_empty_content())
        finally:
            probe.close_files()

    def _inflight_at(self, blob: _Blob, index: int) -> bool:
        return (blob.content_id, index) in self._inflight

    def _read_now(self, blob: _Blob, index: int, start: int, length: int, into: memoryview) -> memoryview | None:
        """The bytes if they can be had without waiting, else None; valid until the next await.

        That is a block in memory. The trio thread must never wait on the disk: one stalled
        pread stalls every reader of the mount. (Reads of the data file with RWF_NOWAIT
        were tried here too: a miss still starts the kernel's read-ahead, whose pages then
        stay behind as a second copy of the model beside the FUSE page cache.)
        """
        buffer = self._memory.serve((blob.content_id, index))
        if buffer is None:
            return None
        STATS.served["block_buffers"] += length
        return buffer.bytes_of(start, length)

    async def _read(self, blob: _Blob, index: int, start: int, length: int, source: BlockSource,
                    served: dict[str, int] | None = None) -> bytes:
        """`length` bytes at `start` inside block `index` of `blob` (a copy of its own).

        `served`, a dict like metrics.STATS.served, counts the bytes by where they came
        from: a reader's read passes it, a warm-up's touch does not."""
        key = (blob.content_id, index)
        fetched = False
        for _ in range(READ_ROUNDS):
            await self._loaded(key)
            # A warm-up's touch (no `served`) leaves a block fetched ahead as one: unread.
            buffer = self._memory.get(key) if served is None else self._memory.serve(key)
            if buffer is not None:
                _tally(served, "network" if fetched else "block_buffers", length)
                return bytes(buffer.bytes_of(start, length))
            if blob.present[index] and blob.checked[index]:
                _tally(served, "network" if fetched else "cache_disk", length)
                return await self._pread(blob, index, start, length)
            if blob.present[index]:
                buffer = await self._load(blob, index)
                if buffer is not None:      # still ours: nothing ran since the load ended
                    buffer.served = buffer.served or served is not None
                    _tally(served, "cache_disk", length)
                    return bytes(buffer.bytes_of(start, length))
                continue
            flight = await self._fetched(blob, index, source)
            fetched = flight is not None
            if flight is not None and flight.written and not self._memory.holds(key):
                _tally(served, "network", length)
                return await self._pread(blob, index, start, length)
        # Only under memory pressure so extreme that a block leaves memory before its waiter runs.
        raise errors.FetchError(f"block {index} of {blob.content_id} kept leaving memory before it was read")

    async def _pread(self, blob: _Blob, index: int, start: int, length: int) -> bytes:
        offset = blob.block_range(index)[0] + start
        if length <= SMALL_READ:
            # One disk read of a few pages costs about what a hand-off to a worker thread
            # does: a random reader waits half as long (fio 4 KiB: 5.5k -> 11k IOPS here).
            return blockio.pread_once(blob.data_fd, length, offset)
        # In a worker thread: pages not in the page cache mean waiting on the disk.
        return await trio.to_thread.run_sync(blockio.pread_once, blob.data_fd, length, offset)

    def _load_ahead(self, blob: _Blob, index: int) -> None:
        key = (blob.content_id, index)
        if (index < blob.blocks and blob.present[index] and key not in self._loads
                and not self._memory.is_ready(key) and self._nursery is not None):
            # Any failure: the reader meets the same problem and says so.
            spawn_guarded(self._nursery, f"{blob.content_id}: loading block {index} ahead", self._load,
                          blob, index, expected=(Exception,), level=logging.DEBUG)

    async def _loaded(self, key: BlockKey) -> None:
        """Wait for a load of `key` in progress, if there is one."""
        loading = self._loads.get(key)
        if loading is not None:
            await loading.wait()

    async def _load(self, blob: _Blob, index: int) -> Buffer | None:
        """Read a cached block into memory, checking its crc on its first read in this process.

        Returns its buffer (ready), or None if another load had it or its bytes were bad
        (then the block is absent again and gets fetched).
        """
        key = (blob.content_id, index)
        if key in self._loads:
            await self._loaded(key)
            return None
        self._loads[key] = loading = trio.Event()
        try:
            return await self._load_into_memory(blob, index, key)
        finally:
            del self._loads[key]
            loading.set()

    async def _load_into_memory(self, blob: _Blob, index: int, key: BlockKey) -> Buffer | None:
        block_start, block_len = blob.block_range(index)
        buffer = await self._memory.take(key, block_len)
        try:
            check = not blob.checked[index]
            # Buffered, not O_DIRECT: the kernel's read-ahead on the data file measured faster
            # here for a stream's loads (whole blocks, in order) than direct 8-16 MiB reads.
            # Its pages are dropped once read: the bytes go on to the FUSE page cache.
            async with self._disk_limiter:
                got, crc = await trio.to_thread.run_sync(
                    blockio.load_block, blob.data_fd, block_start, buffer.view, block_len, check)
        finally:
            self._memory.release(buffer)
        if buffer.key != key or not blob.present[index]:
            return None                     # the blob was discarded meanwhile
        if got != block_len or (check and crc != blob.crcs[index]):
            self._memory.forget(key)
            self._corrupt_on_disk(blob, index, block_start)
            return None
        blob.checked[index] = 1
        buffer.ready = True
        return buffer

    async def _check_blocks(self, blob: _Blob) -> bool:
        view = memoryview(mmap.mmap(-1, self.block_size))     # page-aligned, for O_DIRECT
        for index in range(blob.blocks):
            if blob.checked[index] or not blob.present[index]:
                continue
            block_start, block_len = blob.block_range(index)
            async with self._disk_limiter:
                got, crc = await trio.to_thread.run_sync(
                    blockio.read_block, blob.data_fd, blob.direct_fd, block_start, view, block_len, True)
            if not blob.present[index] or blob.checked[index]:
                continue                    # discarded or checked by a reader meanwhile
            if got != block_len or crc != blob.crcs[index]:
                self._corrupt_on_disk(blob, index, block_start)
                return False
            blob.checked[index] = 1
        return blob.checked.count(0) == 0

    def _corrupt_on_disk(self, blob: _Blob, index: int, block_start: int) -> None:
        log.error("%s: block %d (offset %d) is corrupt on disk; fetching it again",
                  blob.content_id, index, block_start)
        blob.present[index] = 0
        if blob.verified:
            blob.verified = False
            _unlink_quietly(blob.ok_path)

    async def _fill(self, blob: _Blob, source: BlockSource, on_block: Callable[[int], object],
                    parallel: int) -> None:
        blob.read_new_records()
        slots = readahead.Depth(lambda: readahead.blocks_ahead(source, self.block_size,
                                                               min(parallel, max(1, self.buffer_count // 2))))
        failures: list[errors.LaminaError] = []

        async def fetch_one(index: int, cancel_scope: trio.CancelScope) -> None:
            try:
                await self._fetched(blob, index, source)
                on_block(blob.block_range(index)[1])
            except errors.LaminaError as exc:
                failures.append(exc)
                cancel_scope.cancel()
            finally:
                slots.release()

        async with trio.open_nursery() as nursery:
            for index in range(blob.blocks):
                if not blob.present[index] and not failures:
                    await slots.acquire()
                    nursery.start_soon(fetch_one, index, nursery.cancel_scope)
        if failures:
            raise failures[0]

    def _prefetch(self, blob: _Blob, index: int, source: BlockSource) -> None:
        if index >= blob.blocks or blob.present[index] or self._inflight_at(blob, index):
            return
        self._start_flight(blob, index, source)

    async def _fetched(self, blob: _Blob, index: int, source: BlockSource) -> Flight | None:
        """Block `index` fetched (by this call or one already under way): its Flight, or None
        if another process had stored it meanwhile."""
        flight = self._inflight.get((blob.content_id, index))
        if flight is None:
            blob.read_new_records()       # another process may have stored it meanwhile
            if blob.present[index]:
                return None
            flight = self._start_flight(blob, index, source)
        await flight.done.wait()
        if flight.error is not None:
            raise flight.error
        return flight

    def _start_flight(self, blob: _Blob, index: int, source: BlockSource, streamed: bool | None = None) -> Flight:
        flight = Flight(streamed=_ignores_range(source) if streamed is None else streamed)
        self._inflight[(blob.content_id, index)] = flight
        blob.use()                          # a blob being filled is held, open or not
        self._started().start_soon(self._fly, blob, index, source, flight)   # guarded inside: it cleans up
        return flight

    async def _fly(self, blob: _Blob, index: int, source: BlockSource, flight: Flight) -> None:
        """Fetch, store and record one block; the flight leaves the table only at the end,
        so nobody fetches the block again while its bytes are on their way to the disk."""
        try:
            with guard(f"{source.describe}: storing block {index}", expected=()):
                crc = await self._download_and_write(blob, index, source, flight)
                if crc is not None:
                    await self._make_durable(blob, index, crc, source.describe)
        finally:
            del self._inflight[(blob.content_id, index)]
            blob.unuse()
            flight.done.set()           # already set, unless the download failed
        if (flight.error is None and blob.complete() and not blob.verified
                and blob.content_id not in self._verifying):
            # The last blocks of a blob often land together: one of them starts the hash.
            self._verifying.add(blob.content_id)
            spawn_guarded(self._started(), f"{source.describe}: verifying {blob.content_id}", self._verify_in_background,
                          blob, source.describe, expected=())

    async def _download_and_write(self, blob: _Blob, index: int, source: BlockSource, flight: Flight) -> int | None:
        """Download the block into a buffer, wake its readers, write it (not yet durable).

        Its crc, or None if it was not written. The buffer is held from the download until
        the write: the fixed number of buffers bounds the daemon's memory whatever the
        number of readers and read-aheads. Making the bytes durable (fdatasync) comes
        after, out of memory's way.
        """
        key = (blob.content_id, index)
        try:
            buffer = await self._receive(blob, index, source, flight)
        except Exception as exc:  # noqa: BLE001 - handed to every waiting reader
            flight.error = exc
            return None
        try:
            buffer.ready = buffer.key == key
            flight.done.set()
            crc = await self._write(blob, index, buffer, source)
            flight.written = crc is not None
            return crc
        finally:
            self._memory.release(buffer)

    async def _verify_in_background(self, blob: _Blob, describe: str) -> None:
        try:
            await self._verify(blob, describe)
        finally:
            self._verifying.discard(blob.content_id)

    async def _receive(self, blob: _Blob, index: int, source: BlockSource, flight: Flight) -> Buffer:
        """A held buffer holding block `index`'s bytes, downloaded or from the blob's stream."""
        key = (blob.content_id, index)
        if not flight.streamed:
            buffer = await self._memory.take(key, blob.block_range(index)[1])
            try:
                await self._download(blob, index, source, buffer)
                return buffer
            except errors.RangeIgnored:
                flight.streamed = True          # read the blob in one pass instead
            except BaseException:
                self._memory.forget(key)
                self._memory.release(buffer)
                raise
            self._memory.forget(key)
            self._memory.release(buffer)
        buffer = await self._streamed(blob, index, source)
        try:
            await self._check_streamed(blob, index, source, buffer)
        except BaseException:
            self._memory.forget(key)
            self._memory.release(buffer)
            raise
        return buffer

    async def _check_streamed(self, blob: _Blob, index: int, source: BlockSource, buffer: Buffer) -> None:
        block_start, block_len = blob.block_range(index)
        view = buffer.view[:block_len]
        splice: Callable[[int, memoryview], None] | None = getattr(source, "splice_into", None)
        if splice is not None:      # bytes a first-touch read served go into what is hashed
            await trio.to_thread.run_sync(splice, block_start, view)
        await self._check_single_block(blob, source, view)

    async def _streamed(self, blob: _Blob, index: int, source: BlockSource) -> Buffer:
        """Block `index`'s buffer from the blob's stream (one is started if none will pass it)."""
        while True:
            stream = self._streams.get(blob.content_id)
            if stream is None:
                stream = self._streams[blob.content_id] = _BlobStream(index)
                blob.use()
                self._started().start_soon(self._run_stream, blob, source, stream)
            if stream.will_deliver(index):
                delivery = stream.delivery(index)
                await delivery.ready.wait()
                if isinstance(delivery.error, _NotReached):
                    continue                # the next stream starts at this block
                if delivery.error is not None:
                    raise delivery.error
                assert delivery.buffer is not None      # a delivery is ready with its buffer or its error
                return delivery.buffer
            await stream.ended.wait()       # it has passed this block: the next one starts here

    async def _run_stream(self, blob: _Blob, source: BlockSource, stream: _BlobStream) -> None:
        error: BaseException | None = None
        try:
            for attempt in range(STREAM_TRIES):
                try:
                    await self._stream_from(blob, source, stream)
                    error = None
                    break
                except errors.FetchError as exc:    # the body broke: open it again where it broke
                    error = exc
                    log.info("%s: one-pass read broke at block %d (%s); %s", source.describe, stream.position,
                             exc, "reopening" if attempt + 1 < STREAM_TRIES else "giving up")
        except Exception as exc:  # noqa: BLE001 - handed to the flights waiting for their blocks
            error = exc
        finally:
            if self._streams.get(blob.content_id) is stream:
                del self._streams[blob.content_id]
            stream.end(error)
            blob.unuse()

    async def _stream_from(self, blob: _Blob, source: BlockSource, stream: _BlobStream) -> None:
        stream.opened = False
        start = blob.block_range(stream.first_wanted())[0]
        body = await trio.to_thread.run_sync(whole_body_opener(source), start, blob.size)
        try:
            # A server that ignores Range sends it all from 0: its prefix fills blocks too.
            stream.position = body.position // self.block_size
            stream.opened = True
            while stream.position < blob.blocks:
                await self._stream_block(blob, source, stream, body)
        finally:
            await trio.to_thread.run_sync(body.close)

    async def _stream_block(self, blob: _Blob, source: BlockSource, stream: _BlobStream, body: WholeBody) -> None:
        """Receive the stream's next block into a buffer for its flight, or skip its bytes."""
        index = stream.position
        key = (blob.content_id, index)
        flight = self._inflight.get(key)
        wanted = (index in stream.deliveries or (flight is not None and flight.streamed and not flight.done.is_set())
                  or (flight is None and not blob.present[index]))
        block_len = blob.block_range(index)[1]
        if not wanted:
            await trio.to_thread.run_sync(body.discard, block_len)
            stream.position += 1
            return
        delivery = stream.delivery(index)          # reserved before its flight asks for it
        if flight is None:
            self._start_flight(blob, index, source, streamed=True)
        buffer = await self._memory.take(key, block_len)
        try:
            await trio.to_thread.run_sync(body.readinto, buffer.view[:block_len])
        except BaseException:
            self._memory.forget(key)
            self._memory.release(buffer)
            raise
        delivery.buffer = buffer
        delivery.ready.set()
        stream.position += 1

    async def _download(self, blob: _Blob, index: int, source: BlockSource, buffer: Buffer) -> None:
        block_start, block_len = blob.block_range(index)
        view = buffer.view[:block_len]
        async with self._fetch_limiter:
            await trio.to_thread.run_sync(fill_from, source, block_start, view)
        await self._check_single_block(blob, source, view)

    async def _check_single_block(self, blob: _Blob, source: BlockSource, view: memoryview) -> None:
        if blob.blocks == 1 and not await trio.to_thread.run_sync(
                matches_content_id, blob.content_id, blob.size, [view]):
            raise errors.IntegrityError(
                f"{source.describe}: bytes from the Hub do not match {blob.content_id}")

    async def _write(self, blob: _Blob, index: int, buffer: Buffer, source: BlockSource) -> int | None:
        """Write the block's bytes (not yet durable); its crc, or None if the disk is full
        (then readers are served from memory while it lasts, and it is not cached)."""
        block_start, block_len = blob.block_range(index)
        view = buffer.view[:block_len]
        for attempt in (1, 2):
            await self._make_room(block_len, force=attempt > 1)
            try:
                async with self._disk_limiter:
                    return await trio.to_thread.run_sync(
                        blockio.write_block, blob.data_fd, blob.direct_fd, block_start, view)
            except OSError as exc:
                if exc.errno != errno.ENOSPC or attempt > 1:
                    cause = "disk full" if exc.errno == errno.ENOSPC else exc.strerror
                    log.error("%s: block %d not cached (%s); served from memory", source.describe, index, cause,
                              extra=where(source.describe, block_start))
                    return None
        return None

    async def _make_durable(self, blob: _Blob, index: int, crc: int, describe: str) -> None:
        """fdatasync the block's bytes, then record it: only then is it present.

        A full disk can still refuse here (ext4 allocates delayed blocks at the sync; the
        record needs room in the log): then the block stays unrecorded, so not cached."""
        try:
            async with self._sync_limiter:
                await trio.to_thread.run_sync(_sync_block, blob.data_fd, blob.log_fd, index, crc)
        except OSError as exc:
            cause = "disk full" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else exc.strerror
            log.error("%s: block %d not cached (%s); served from memory", describe, index, cause,
                      extra=where(describe, blob.block_range(index)[0]))
            return
        self._usage = (self._usage or 0) + blob.block_range(index)[1]
        blob.read_new_records()
        blob.checked[index] = 1

    async def _make_room(self, incoming: int, force: bool = False) -> None:
        """Evict least recently used blobs when `incoming` bytes would break the budget."""
        if self._usage is None:
            self._usage = await trio.to_thread.run_sync(self.directory.usage)
        over_cap = self.max_size is not None and self._usage + incoming > self.max_size
        if not (force or over_cap or await trio.to_thread.run_sync(self._below_free_floor, incoming)):
            return
        # Writers that found the budget broken at the same time evict one after the other;
        # each measures again first, so the room one made is not made twice.
        async with self._evicting:
            # On ENOSPC (force) free a margin, so the very next block does not hit it again.
            extra = incoming * (8 if force else 1)
            amount = await trio.to_thread.run_sync(
                self.directory.bytes_to_free, self.max_size, self.min_free_fraction, extra)
            eviction = await trio.to_thread.run_sync(self.directory.evict, amount, self._protected())
            STATS.evictions += len(eviction.evicted)
            for content_id in eviction.evicted:
                self._forget_blob(content_id)
            self._usage = await trio.to_thread.run_sync(self.directory.usage)

    def _below_free_floor(self, incoming: int) -> bool:
        disk = os.statvfs(self.directory.root)
        return disk.f_bavail * disk.f_frsize - incoming < disk.f_blocks * disk.f_frsize * self.min_free_fraction

    def _protected(self) -> set[str]:
        busy = {blob.content_id for blob in self._blobs.values() if blob.open_count > 0}
        busy |= {content_id for content_id, _ in self._inflight}
        busy |= self._verifying         # its hash reads the files an eviction would close
        return busy | self.kept

    def _let_go_of_evicted_blobs(self) -> None:
        """Close the files of idle blobs another process (gc) evicted, at most every SWEEP_EVERY s.

        Otherwise a blob nobody opens again (an old revision's, after a branch moved) keeps
        its descriptors, and its deleted file's disk space, for the rest of the mount's life:
        found by the long-run soak (vfs/testing/soak.py), 3 descriptors per evicted blob."""
        now = time.monotonic()
        if now < self._next_sweep:
            return
        self._next_sweep = now + SWEEP_EVERY
        for content_id in [c for c, blob in self._blobs.items() if blob.users == 0 and not blob.on_disk()]:
            self._forget_blob(content_id)

    def _forget_blob(self, content_id: str) -> None:
        self._memory.forget_blob(content_id)
        blob = self._blobs.pop(content_id, None)
        if blob is not None:
            blob.close_files()

    async def _record_verified(self, blob: _Blob, describe: str) -> None:
        """Write the blob's `.ok`; a disk too full for it costs only a hash in the next process."""
        try:
            await trio.to_thread.run_sync(write_atomically, blob.ok_path, b"")
        except OSError as exc:
            log.warning("%s: %s verified, but not recorded (%s); the next process hashes it again",
                        describe or blob.content_id, blob.content_id, exc.strerror)

    async def _verify(self, blob: _Blob, describe: str = "") -> bool:
        """Hash the complete blob; mark it verified, or discard it on a mismatch."""
        async with self._disk_limiter:
            chunks = blockio.file_chunks(blob.data_fd, blob.direct_fd, blob.size)
            good = await trio.to_thread.run_sync(matches_content_id, blob.content_id, blob.size, chunks)
        if good:
            await self._record_verified(blob, describe)
            blob.verified = True
            return True
        if self.defer_discards and not (blob.hold_fd is not None and cachedir.try_exclusive(blob.hold_fd)):
            log.error("%s: %s does not match its content id; another process has it open, so it is "
                      "left for that process to discard", describe or blob.content_id, blob.content_id)
            return False
        await trio.to_thread.run_sync(_reset_log, blob.log_fd)
        if self.defer_discards and blob.hold_fd is not None:     # it is: try_exclusive took it
            cachedir.share_again(blob.hold_fd)
        blob.failed_verifications += 1
        STATS.verification_failures += 1
        self._memory.forget_blob(blob.content_id)
        blob.forget_all()
        blob.read_new_records()
        if self.on_discard is not None:
            await self.on_discard(blob.content_id)
        log.error("%s: %s does not match its content id; discarded, it will be fetched again",
                  describe or blob.content_id, blob.content_id, extra=where(describe) if describe else None)
        return False


def _tally(served: dict[str, int] | None, source: str, length: int) -> None:
    if served is not None:
        served[source] += length


def _ignores_range(source: BlockSource) -> bool:
    ignores: Callable[[], bool] | None = getattr(source, "ignores_range", None)
    return ignores is not None and ignores()


def whole_body_opener(source: BlockSource) -> Callable[[int, int], WholeBody]:
    """`source.open_whole_body`: only the fetcher's sources stream (the others never
    say their server ignores Range, nor raise RangeIgnored)."""
    opener: Callable[[int, int], WholeBody] = getattr(source, "open_whole_body")
    return opener


def fill_from(source: BlockSource, start: int, view: memoryview) -> None:
    """Fill `view` with exactly the source's bytes from `start`, or raise FetchError."""
    fetch_into: Callable[[int, memoryview], None] | None = getattr(source, "fetch_into", None)
    if fetch_into is not None:
        fetch_into(start, view)
        return
    data = source.fetch(start, len(view))
    if len(data) != len(view):
        raise errors.FetchError(f"{source.describe}: got {len(data)} of {len(view)} bytes at offset {start}")
    view[:] = data


def _opened(fd: int | None, blob: _Blob) -> int:
    if fd is None:
        raise errors.CacheError(f"{blob.content_id}: its cache files are closed (evicted)")
    return fd


def _sync_block(data_fd: int, log_fd: int, index: int, crc: int) -> None:
    os.fdatasync(data_fd)
    _append_record(log_fd, make_record(index, crc))
    os.fdatasync(log_fd)


def _append_record(log_fd: int, record: bytes) -> None:
    """Append one whole record, or none: a torn one would shift every later record."""
    try:
        written = os.write(log_fd, record)
    except OSError:
        _trim_torn_record(log_fd)
        raise
    if written != len(record):
        _trim_torn_record(log_fd)
        raise OSError(errno.ENOSPC, "the block log took part of a record")


def _trim_torn_record(log_fd: int) -> None:
    size = os.fstat(log_fd).st_size
    if size % RECORD.size:
        os.ftruncate(log_fd, size - size % RECORD.size)


def _reset_log(log_fd: int) -> None:
    os.ftruncate(log_fd, 0)
    os.fsync(log_fd)


def _unlink_quietly(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
