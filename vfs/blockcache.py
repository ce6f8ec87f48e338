"""The on-disk block cache: blobs, block presence, single-flight fetch, verification.

Knows nothing of FUSE, inodes or the Hub: a blob is a content id and a size, and bytes
come from a `BlockSource` the caller hands in.

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
  before it is served; a mismatch drops it and fetches it again.
- When every block is present the blob is hashed against its content id (sha256 for LFS
  files, git blob sha1 for small ones); only then is `.ok` written. A mismatch discards
  the blob's presence and says so in the log. Blobs of one block are hashed before a
  single byte of them is served.

Concurrency rules:
- In-memory state (Blob.present/.crcs/.checked, the in-flight table) is only touched from
  the trio thread. Worker threads do blocking work (HTTP, pwrite + fsync, hashing) on
  values handed to them and return results; they never touch that state.
- One fetch per (blob, block) at a time, whatever the number of readers or handles: the
  first asker starts it, later askers wait for the same Flight and share its bytes. A
  flight stays in the table until its bytes are durable, so nobody fetches it twice.
- A block's bytes are held in memory from download until written (at most MEMORY_BUDGET
  of them at once), then dropped: readers arriving later pread them from the page cache
  while the fdatasync and the record follow, under their own limiter.
- Other processes (`pull`) append to the same logs. Before fetching a block that looks
  absent, the log's new records are read in, so their work is reused.
"""

import errno
import hashlib
import logging
import os
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import trio

from . import errors
from .atomic import write_atomically
from .cachedir import CacheDir

log = logging.getLogger(__name__)

RECORD = struct.Struct("<4sIII")       # magic, block index, block crc32, record crc32
RECORD_MAGIC = b"BLK1"
MEMORY_BUDGET = 64 * 1024 * 1024       # block bytes held in memory between download and disk


class BlockSource(Protocol):
    """Where a blob's bytes come from when they are not cached."""

    describe: str   # "model/file" for log lines

    def fetch(self, start: int, length: int) -> bytes:
        """Exactly `length` bytes from `start` (blocking; called in a worker thread)."""


@dataclass(eq=False)
class Flight:
    """One block being fetched: readers wait on `done`, then take `data` or `error`."""

    done: trio.Event = field(default_factory=trio.Event)
    data: bytes | None = None
    error: BaseException | None = None


class Blob:
    """One content id's cached bytes; shared by every file that has this content."""

    def __init__(self, base: Path, content_id, size, block_size):
        self.content_id, self.size, self.block_size = content_id, size, block_size
        self.data_path = base.with_suffix(".data")
        self.log_path = base.with_suffix(".log")
        self.ok_path = base.with_suffix(".ok")
        self.blocks = max(1, -(-size // block_size))
        self.present = bytearray(self.blocks)
        self.checked = bytearray(self.blocks)
        self.crcs = [0] * self.blocks
        self.log_read = 0               # bytes of the log already applied
        self.verified = False
        self.failed_verifications = 0
        self.open_count = 0
        self.data_fd = self.log_fd = None

    def block_range(self, index):
        start = index * self.block_size
        return start, min(self.block_size, self.size - start)

    def cached_bytes(self):
        return sum(self.block_range(i)[1] for i in range(self.blocks) if self.present[i])

    def complete(self):
        return all(self.present)

    def open_files(self):
        self.data_path.parent.mkdir(parents=True, exist_ok=True)
        self.data_fd = os.open(self.data_path, os.O_RDWR | os.O_CREAT, 0o644)
        if os.fstat(self.data_fd).st_size != self.size:
            os.ftruncate(self.data_fd, self.size)
        self.log_fd = os.open(self.log_path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
        self.verified = self.ok_path.exists()
        self.read_new_records()

    def read_new_records(self):
        """Apply log records appended since the last look (by us or another process)."""
        end = os.fstat(self.log_fd).st_size
        if end < self.log_read:      # the log was reset (blob discarded elsewhere)
            self.forget_all()
        whole = (end - self.log_read) // RECORD.size * RECORD.size
        raw = os.pread(self.log_fd, whole, self.log_read) if whole else b""
        self.log_read += len(raw)
        for offset in range(0, len(raw), RECORD.size):
            self._apply(raw[offset:offset + RECORD.size])

    def _apply(self, record):
        magic, index, crc, own_crc = RECORD.unpack(record)
        if magic != RECORD_MAGIC or own_crc != zlib.crc32(record[:12]) or index >= self.blocks:
            return                      # torn or foreign record: its block stays absent
        if not self.present[index] or self.crcs[index] != crc:
            self.checked[index] = 0
        self.present[index], self.crcs[index] = 1, crc

    def forget_all(self):
        self.present[:] = bytes(self.blocks)
        self.checked[:] = bytes(self.blocks)
        self.log_read = 0
        self.verified = False

    def close_files(self):
        for fd in (self.data_fd, self.log_fd):
            if fd is not None:
                os.close(fd)
        self.data_fd = self.log_fd = None


def make_record(index, crc):
    head = struct.pack("<4sII", RECORD_MAGIC, index, crc)
    return head + struct.pack("<I", zlib.crc32(head))


def content_hasher(content_id, size):
    """A hashlib object primed so its hexdigest equals the content id's hex when bytes match."""
    algo, _ = content_id.split(":", 1)
    if algo == "sha256":
        return hashlib.sha256()
    hasher = hashlib.sha1()
    hasher.update(b"blob %d\0" % size)  # git hashes a header before the bytes
    return hasher


def matches_content_id(content_id, size, chunks):
    hasher = content_hasher(content_id, size)
    for chunk in chunks:
        hasher.update(chunk)
    return hasher.hexdigest() == content_id.split(":", 1)[1]


def file_chunks(fd, size, chunk=8 * 1024 * 1024):
    for offset in range(0, size, chunk):
        yield os.pread(fd, min(chunk, size - offset), offset)


class BlockCache:
    def __init__(self, directory: CacheDir, fetch_workers=8, max_size=None, min_free_fraction=0.05,
                 pinned=frozenset()):
        self.directory = directory
        self.block_size = directory.block_size
        self.max_size, self.min_free_fraction = max_size, min_free_fraction
        self.pinned = set(pinned)       # content ids eviction must not touch
        self._blobs: dict[str, Blob] = {}
        self._inflight: dict[tuple[str, int], Flight] = {}
        self._fetch_limiter = trio.CapacityLimiter(fetch_workers)
        self._memory_limiter = trio.CapacityLimiter(max(2, MEMORY_BUDGET // self.block_size))
        self._disk_limiter = trio.CapacityLimiter(4)
        self._sync_limiter = trio.CapacityLimiter(2)
        self._usage = None              # bytes on disk, kept current between scans
        self._nursery = None
        # Called (from the trio thread) with a content id whose bytes were discarded, so a
        # mount can make the kernel drop pages it cached from them.
        self.on_discard = None

    def start(self, nursery):
        """Background fetches and verifications run in `nursery` (one per mount)."""
        self._nursery = nursery

    def blob(self, content_id, size):
        """The one Blob of `content_id`, opened on first use; marks it recently used."""
        blob = self._blobs.get(content_id)
        if blob is None:
            blob = Blob(self.directory.blob_base(content_id), content_id, size, self.block_size)
            blob.open_files()
            self._blobs[content_id] = blob
        else:
            os.utime(blob.data_path)
        return blob

    def peek(self, content_id, size):
        """(cached bytes, verified) of a blob, read from disk without opening it for use."""
        blob = self._blobs.get(content_id)
        if blob is not None:
            return blob.cached_bytes(), blob.verified
        probe = Blob(self.directory.blob_base(content_id), content_id, size, self.block_size)
        try:
            probe.log_fd = os.open(probe.log_path, os.O_RDONLY)
        except FileNotFoundError:
            return 0, False
        try:
            probe.read_new_records()
            return probe.cached_bytes(), probe.ok_path.exists()
        finally:
            probe.close_files()

    def inflight(self, blob, index):
        return (blob.content_id, index) in self._inflight

    async def read(self, blob, index, start, length, source):
        """`length` bytes at `start` inside block `index` of `blob`."""
        if blob.present[index]:
            data = await self._read_present(blob, index, start, length)
            if data is not None:
                return data
        data = await self._fetched_block(blob, index, source)
        if data is None:                # written, not yet durable: in the page cache
            return os.pread(blob.data_fd, length, blob.block_range(index)[0] + start)
        return bytes(memoryview(data)[start:start + length])

    async def _read_present(self, blob, index, start, length):
        block_start, _ = blob.block_range(index)
        if blob.checked[index]:
            return os.pread(blob.data_fd, length, block_start + start)
        block = await self._check_block(blob, index)
        return None if block is None else bytes(memoryview(block)[start:start + length])

    async def _check_block(self, blob, index):
        """The whole block if its bytes on disk match its crc; else None (and absent)."""
        block_start, block_len = blob.block_range(index)
        async with self._disk_limiter:
            block, crc = await trio.to_thread.run_sync(_read_with_crc, blob.data_fd, block_len, block_start)
        if len(block) == block_len and crc == blob.crcs[index]:
            blob.checked[index] = 1
            return block
        log.error("%s: block %d (offset %d) is corrupt on disk; fetching it again",
                  blob.content_id, index, block_start)
        blob.present[index] = 0
        if blob.verified:
            blob.verified = False
            _unlink_quietly(blob.ok_path)
        return None

    async def fill(self, blob, source, on_block=lambda length: None, parallel=4):
        """Fetch every absent block of `blob`, `parallel` at a time (pull uses this).

        The first failure stops the rest and is raised as itself (not as a group).
        """
        blob.read_new_records()
        slots = trio.Semaphore(parallel)
        failures = []

        async def fetch_one(index, cancel_scope):
            try:
                await self._fetched_block(blob, index, source)
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

    def prefetch(self, blob, index, source):
        """Start fetching block `index` in the background unless it is here or coming."""
        if index >= blob.blocks or blob.present[index] or self.inflight(blob, index):
            return
        self._start_flight(blob, index, source)

    async def _fetched_block(self, blob, index, source):
        flight = self._inflight.get((blob.content_id, index))
        if flight is None:
            blob.read_new_records()       # another process may have stored it meanwhile
            if blob.present[index]:
                data = await self._read_present(blob, index, 0, blob.block_range(index)[1])
                if data is not None:
                    return data
            flight = self._start_flight(blob, index, source)
        await flight.done.wait()
        if flight.error is not None:
            raise flight.error
        return flight.data

    def _start_flight(self, blob, index, source):
        flight = Flight()
        self._inflight[(blob.content_id, index)] = flight
        self._nursery.start_soon(self._fly, blob, index, source, flight)
        return flight

    async def _fly(self, blob, index, source, flight):
        # A block holds memory from its download until its bytes are written (to the page
        # cache); bounding how many do bounds the daemon's memory whatever the number of
        # readers and read-aheads. Making them durable (fdatasync, at disk speed) happens
        # after, out of memory's way: the stream is not held to the disk's write speed.
        crc = None
        async with self._memory_limiter:
            try:
                flight.data = await self._download(blob, index, source)
            except Exception as exc:  # noqa: BLE001 - handed to every waiting reader
                flight.error = exc
                del self._inflight[(blob.content_id, index)]
                flight.done.set()
                return
            flight.done.set()
            try:
                crc = await self._write(blob, index, flight, source)
            except Exception:  # noqa: BLE001 - a background task must never end the mount
                log.exception("%s: storing block %d failed", source.describe, index)
        try:
            if crc is not None:
                await self._make_durable(blob, index, crc)
        except Exception:  # noqa: BLE001 - a background task must never end the mount
            log.exception("%s: storing block %d failed", source.describe, index)
        finally:
            del self._inflight[(blob.content_id, index)]
        if blob.complete() and not blob.verified:
            self._nursery.start_soon(self._verify_in_background, blob, source.describe)

    async def _verify_in_background(self, blob, describe):
        try:
            await self.verify(blob, describe)
        except Exception:  # noqa: BLE001 - a background task must never end the mount
            log.exception("%s: verifying %s failed", describe, blob.content_id)

    async def _download(self, blob, index, source):
        block_start, block_len = blob.block_range(index)
        async with self._fetch_limiter:
            data = await trio.to_thread.run_sync(source.fetch, block_start, block_len)
        if len(data) != block_len:
            raise errors.FetchError(f"{source.describe}: got {len(data)} bytes for block {index}")
        if blob.blocks == 1 and not matches_content_id(blob.content_id, blob.size, [data]):
            raise errors.IntegrityError(
                f"{source.describe}: bytes from the Hub do not match {blob.content_id}")
        return data

    async def _write(self, blob, index, flight, source):
        """Write the block's bytes (not yet durable) and let go of them; its crc, or None if
        the disk is full (then readers are served from memory and it is not cached)."""
        block_start, _ = blob.block_range(index)
        data = flight.data
        for attempt in (1, 2):
            await self._make_room(len(data), force=attempt > 1)
            try:
                async with self._disk_limiter:
                    crc = await trio.to_thread.run_sync(_write_data, blob.data_fd, block_start, data)
                flight.data = None      # later readers pread it: the page cache holds it
                return crc
            except OSError as exc:
                if exc.errno != errno.ENOSPC or attempt > 1:
                    cause = "disk full" if exc.errno == errno.ENOSPC else exc.strerror
                    log.error("%s: block %d not cached (%s); served from memory", source.describe, index, cause)
                    return None
        return None

    async def _make_durable(self, blob, index, crc):
        """fdatasync the block's bytes, then record it: only then is it present."""
        async with self._sync_limiter:
            await trio.to_thread.run_sync(_sync_block, blob.data_fd, blob.log_fd, index, crc)
        self._usage = (self._usage or 0) + blob.block_range(index)[1]
        blob.read_new_records()
        blob.checked[index] = 1

    async def _make_room(self, incoming, force=False):
        """Evict least recently used blobs when `incoming` bytes would break the budget."""
        if self._usage is None:
            self._usage = await trio.to_thread.run_sync(self.directory.usage)
        over_cap = self.max_size is not None and self._usage + incoming > self.max_size
        if not (force or over_cap or await trio.to_thread.run_sync(self._below_free_floor, incoming)):
            return
        # On ENOSPC (force) free a margin, so the very next block does not hit it again.
        extra = incoming * (8 if force else 1)
        amount = await trio.to_thread.run_sync(
            self.directory.bytes_to_free, self.max_size, self.min_free_fraction, extra)
        evicted = await trio.to_thread.run_sync(self.directory.evict, amount, self._protected())
        for content_id in evicted:
            self._forget_blob(content_id)
        self._usage = await trio.to_thread.run_sync(self.directory.usage)

    def _below_free_floor(self, incoming):
        disk = os.statvfs(self.directory.root)
        return disk.f_bavail * disk.f_frsize - incoming < disk.f_blocks * disk.f_frsize * self.min_free_fraction

    def _protected(self):
        busy = {blob.content_id for blob in self._blobs.values() if blob.open_count > 0}
        busy |= {content_id for content_id, _ in self._inflight}
        return busy | self.pinned

    def _forget_blob(self, content_id):
        blob = self._blobs.pop(content_id, None)
        if blob is not None:
            blob.close_files()

    async def verify(self, blob, describe=""):
        """Hash the complete blob; mark it verified, or discard it on a mismatch."""
        async with self._disk_limiter:
            good = await trio.to_thread.run_sync(
                lambda: matches_content_id(blob.content_id, blob.size, file_chunks(blob.data_fd, blob.size)))
        if good:
            await trio.to_thread.run_sync(write_atomically, blob.ok_path, b"")
            blob.verified = True
            return True
        await trio.to_thread.run_sync(_reset_log, blob.log_fd)
        blob.failed_verifications += 1
        blob.forget_all()
        blob.read_new_records()
        if self.on_discard is not None:
            await self.on_discard(blob.content_id)
        log.error("%s: %s does not match its content id; discarded, it will be fetched again",
                  describe or blob.content_id, blob.content_id)
        return False


def _write_data(data_fd, offset, data):
    crc = zlib.crc32(data)  # here, not on the trio thread: 2 ms per 8 MiB stalls every reader
    view = memoryview(data)
    while view:
        written = os.pwrite(data_fd, view, offset)
        view, offset = view[written:], offset + written
    return crc


def _read_with_crc(data_fd, length, offset):
    block = os.pread(data_fd, length, offset)
    return block, zlib.crc32(block)     # in this thread: 2 ms per 8 MiB would stall the loop


def _sync_block(data_fd, log_fd, index, crc):
    os.fdatasync(data_fd)
    os.write(log_fd, make_record(index, crc))
    os.fdatasync(log_fd)


def _reset_log(log_fd):
    os.ftruncate(log_fd, 0)
    os.fsync(log_fd)


def _unlink_quietly(path):
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
