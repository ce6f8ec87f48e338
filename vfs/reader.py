"""File offset/length -> blocks, and the read-ahead policy: streams, first touches, warm-up.

A FUSE read is answered in full (up to EOF) by looping over the blocks it touches. Each
open handle keeps a little state, and three policies decide what to fetch beyond it:

- Sequential streams. A read that continues where the handle's last one ended (give or
  take the kernel's reordering) doubles the handle's window; the blocks of the window are
  fetched in the background, each as parts side by side. How deep the window may grow is
  counted in parts, not blocks (readahead.py): as many blocks as hold the requests the
  concurrency controller gives this stream, plus one, within MAX_AHEAD bytes (half the
  block buffers at most) and within the stream's share of the buffers: split among the
  streams reading now, less the block each is reading. So the controller decides how
  many requests carry one cold stream, a stream given few requests keeps few blocks, and
  several streams never want more blocks than there are buffers. The first blocks of the
  window already cached are read into memory ahead of the reader (and crc-checked, the
  first time), off the trio thread. A jump resets the window: random readers fetch only
  what they touch. A read whose bytes are in memory or in the page cache is answered on
  the spot.
- Cold first touches. A read that jumps to a block nobody has fetched or is fetching
  would otherwise wait for the whole block (16 MiB by default: a transfer, not a round
  trip). It is answered by a Range request for exactly its bytes (DIRECT_READS at once)
  while the block is fetched around it, so the time to first byte is one small request.
  The Hub's redirect is resolved when the file is opened; a first read arriving before
  that ends waits for it (fetch.py resolves each URL once at a time) rather than
  resolving it a second time.
- Warm-up. The first read at offset 0 of a GGUF or safetensors file starts `warmup`,
  which fetches the file's blocks in the order its loader will touch them.

Memory stays bounded whatever the number of readers: blocks live in the block cache's
fixed set of buffers; direct reads are small and few.
"""

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar, TypeVarTuple, Unpack

import trio

from . import errors, readahead, warmup
from .blockcache import BlobHandle, BlockCache, BlockSource, WholeBody, fill_from, whole_body_opener
from .fetch import received
from .logs import where
from .metrics import STATS
from .tasks import guard, spawn_guarded
from .workers import Workers

log = logging.getLogger(__name__)

MIB = 1024 * 1024
SEQUENTIAL_SLACK = 2 * MIB      # the kernel may deliver a stream's reads slightly out of order
MAX_AHEAD = 64 * MIB            # how far a stream's window may reach ahead of the reader, at most
DIRECT_READS = 4                # cold first touches answered by their own small request at once
DIRECT_READ_MAX = 4 * MIB       # a bigger first touch just waits for its blocks
WARMUP_PARALLEL = 4             # blocks a warm-up keeps fetching at once
RESOLVES_ON_OPEN = 2            # threads following the Hub's redirect for files just opened
LOAD_AHEAD = 4                  # cached blocks read into memory ahead of a stream
STREAM_IDLE = 1.0               # seconds: a stream that read nothing for this long no longer shares the buffers
SCRATCH_SIZE = 4 * MIB          # above FUSE's largest read (1 MiB today)

Result = TypeVar("Result")
Args = TypeVarTuple("Args")


@dataclass
class OpenFile:
    """One open file's view: the blob it reads, and its sequential-access state."""

    blob: BlobHandle
    source: BlockSource
    size: int
    next_offset: int = 0
    window: int = 0                 # blocks to keep fetched ahead of the reader (doubles up to the depth)
    depth: int = 0                  # how deep the window may grow; asked again once per block read
    depth_block: int = -1           # the block the last read ended in when the depth was asked
    reads: int = 0

    @property
    def describe(self) -> str:
        return self.source.describe

    def close(self) -> None:
        """The handle was released: its blob may be evicted again once no other handle holds it."""
        self.blob.close()


class Reader:
    def __init__(self, cache: BlockCache, max_ahead: int = MAX_AHEAD, direct_reads: int = DIRECT_READS,
                 warmup_parallel: int = WARMUP_PARALLEL):
        """Derived from the cache (its block size and buffers), so built once the cache directory is open."""
        self.cache = cache
        # At most half the block buffers ahead of one stream: fetching further would reuse
        # buffers of blocks fetched ahead before the reader got to them (and costs CPU on
        # loopback, measured). Within it, the depth is counted in parts (readahead.py).
        self.max_window = max(1, min(max_ahead // cache.block_size, cache.buffer_count // 2))
        self.warmup_parallel = warmup_parallel
        self.direct_reads = direct_reads
        self._direct_limiter = trio.CapacityLimiter(direct_reads)
        self._nursery: trio.Nursery | None = None
        self._first_reads: Workers | None = None
        self._resolves: Workers | None = None
        self._warming: set[str] = set()     # content ids whose warm-up has run in this process
        self._prepared: set[str] = set()    # content ids whose source was prepared on open
        self._scratch = memoryview(bytearray(SCRATCH_SIZE))   # warm reads land here
        # content id -> when a stream of it last read on: readers of one file share its
        # blocks, so they count once
        self._streams: dict[str, float] = {}

    def start(self, nursery: trio.Nursery) -> None:
        """Background work (warm-ups, resolves on open, cached blocks readied ahead) runs in
        `nursery`, one per mount; without it the reader does none of it."""
        self._nursery = nursery
        self._first_reads = Workers(self.direct_reads, "lamina-first-read")
        self._resolves = Workers(RESOLVES_ON_OPEN, "lamina-resolve")

    def opened(self, handle: OpenFile) -> None:
        """A handle was opened: get its source ready (the Hub's redirect) before its first read."""
        blob = handle.blob
        if self._resolves is None or blob.state().complete or blob.content_id in self._prepared:
            return
        self._prepared.add(blob.content_id)
        # Handed to a thread at once: it runs while the kernel gets the open's answer and
        # sends the first read.
        self._resolves.submit(_prepare_quietly, handle.source)

    async def read(self, handle: OpenFile, offset: int, size: int) -> bytes | bytearray | memoryview:
        """The bytes at [offset, offset+size), short only at end of file."""
        end = min(offset + size, handle.size)
        if offset >= end:
            return b""
        if handle.reads == 0 and offset == 0:
            self._start_warmup(handle)
        continuing = self._track(handle, offset, end)
        if not continuing and self._untouched(handle.blob, offset, end) and not ignores_range(handle.source):
            return await self._read_direct(handle, offset, end)
        self._read_ahead(handle, end)
        index, inside = divmod(offset, self.cache.block_size)
        if (end - 1) // self.cache.block_size == index:
            # Valid until the next await: the caller (pyfuse3) copies it out at once.
            data = handle.blob.read_now(index, inside, end - offset, self._scratch)
            if data is not None:
                return data
        return await self.read_blocks(handle.blob, handle.source, offset, end, STATS.served)

    async def read_blocks(self, blob: BlobHandle, source: BlockSource, offset: int, end: int,
                          served: dict[str, int] | None = None) -> bytes:
        """The bytes at [offset, end) through the block cache (fetching what is missing);
        `served` counts them by where they came from (see BlockCache._read)."""
        pieces: list[bytes] = []
        block_size = self.cache.block_size
        position = offset
        while position < end:
            index, inside = divmod(position, block_size)
            length = min(end - position, block_size - inside)
            pieces.append(await blob.read(index, inside, length, source, served))
            position += length
        return pieces[0] if len(pieces) == 1 else b"".join(pieces)

    def depth(self, source: BlockSource) -> int:
        """How many blocks a read-ahead of `source` keeps fetching at once (readahead.py), within
        its stream's share of the block buffers."""
        return min(readahead.blocks_ahead(source, self.cache.block_size, self.max_window), self._buffer_share())

    def _buffer_share(self) -> int:
        """Blocks one stream may keep ahead: the buffers split among the files being read as
        streams now, less the block each is reading. Beyond it, the streams' blocks fetched
        ahead push each other out of memory before their readers get there (four readers on
        8 buffers wanted 12) and are read back from the disk."""
        now = trio.current_time()
        for key in [k for k, last in self._streams.items() if now - last > STREAM_IDLE]:
            del self._streams[key]
        return max(1, self.cache.buffer_count // max(1, len(self._streams)) - 1)

    def _track(self, handle: OpenFile, offset: int, end: int) -> bool:
        """Note this read in the handle's state; True if it continues the handle's stream."""
        continuing = handle.reads > 0 and abs(offset - handle.next_offset) <= SEQUENTIAL_SLACK
        last = (end - 1) // self.cache.block_size
        if continuing:
            self._streams[handle.blob.content_id] = trio.current_time()
        if continuing and last != handle.depth_block:
            # The budget takes the controller's lock: asked once per block, not per FUSE read
            # (a 1 GiB read is 1,024-8,192 of them, 64 blocks). The window moves per block anyway.
            handle.depth, handle.depth_block = self.depth(handle.source), last
        # The buffers' share is asked every read (it is cheap): a stream that started alone
        # gives its buffers up as soon as others start, not a block later.
        handle.window = min(handle.depth, self._buffer_share(), max(1, handle.window * 2)) if continuing else 0
        handle.next_offset = end
        handle.reads += 1
        return continuing

    def _untouched(self, blob: BlobHandle, offset: int, end: int) -> bool:
        """True for a read inside one block that nobody has fetched or is fetching."""
        # A one-block blob is hashed before any byte of it is served: no shortcut there.
        index = offset // self.cache.block_size
        return (blob.block_count > 1 and (end - 1) // self.cache.block_size == index
                and end - offset <= DIRECT_READ_MAX
                and not blob.is_present(index) and not blob.is_fetching(index))

    async def _read_direct(self, handle: OpenFile, offset: int, end: int) -> bytes | bytearray:
        """A first touch: its own small Range request, while its block is fetched around it."""
        # The block's flight starts now (so concurrent readers of the block wait for it, not
        # fetch it again) and is built from these very bytes plus the rest: what is served
        # here is what gets hashed against the content id, and discarded if wrong.
        spliced = SplicedSource(handle.source, offset, end)
        handle.blob.prefetch(offset // self.cache.block_size, spliced)
        data: bytes | bytearray | None = None
        try:
            async with self._direct_limiter:
                data = await self._in_thread(handle.source.fetch, offset, end - offset)
        except errors.RangeIgnored:
            pass                    # the server sends whole files: the block comes in one pass
        finally:
            if data is not None and self._nursery is not None:
                # After this task has answered the kernel: the block's other fetches would
                # otherwise take the GIL from the reply the reader is waiting for.
                self._nursery.start_soon(_provide, spliced, data)
            else:
                spliced.provide(data)
        if data is None:
            return await self.read_blocks(handle.blob, handle.source, offset, end, STATS.served)
        STATS.served["network"] += len(data)
        return data

    async def _in_thread(self, function: Callable[[Unpack[Args]], Result], *args: Unpack[Args]) -> Result:
        if self._first_reads is None:
            return await trio.to_thread.run_sync(function, *args)
        return await self._first_reads.run(function, *args)

    def _read_ahead(self, handle: OpenFile, end: int) -> None:
        blob, last = handle.blob, (end - 1) // self.cache.block_size
        for index in range(last + 1, min(blob.block_count, last + 1 + handle.window)):
            if not blob.is_present(index):
                blob.prefetch(index, handle.source)
            elif index <= last + LOAD_AHEAD:
                # Cached: read from disk into memory ahead of the reader (a few blocks
                # suffice: the disk is faster than the network, and memory is shared).
                blob.load_ahead(index)

    def _start_warmup(self, handle: OpenFile) -> None:
        blob = handle.blob
        if self._nursery is None or blob.content_id in self._warming:
            return
        self._warming.add(blob.content_id)
        spawn_guarded(self._nursery, f"{handle.source.describe}: warm-up", warmup.run,
                      self, blob, handle.source,
                      lambda: readahead.blocks_ahead(handle.source, self.cache.block_size, self.warmup_parallel),
                      level=logging.INFO, extra=where(handle.source.describe))


def ignores_range(source: BlockSource) -> bool:
    """Whether `source`'s server is known to answer ranges with whole files (no small reads then)."""
    ignores: Callable[[], bool] | None = getattr(source, "ignores_range", None)
    return ignores is not None and ignores()


def _prepare_quietly(source: BlockSource) -> None:
    # Any failure: the first read meets the same problem and says so (a source without
    # `prepare`, a test's, is an AttributeError logged at DEBUG).
    with guard(f"{source.describe}: resolving ahead of the first read", expected=(Exception,), level=logging.DEBUG):
        prepare: Callable[[], None] = getattr(source, "prepare")
        prepare()


async def _provide(spliced: "SplicedSource", data: bytes | bytearray) -> None:
    spliced.provide(data)


class SplicedSource:
    """A block's source whose bytes [start, end) come from a first-touch read in another thread."""

    def __init__(self, source: BlockSource, start: int, end: int, patience: float = 120.0):
        self.source, self.start, self.end, self.patience = source, start, end, patience
        self.describe = source.describe
        self._ready = threading.Event()
        self._data: bytes | bytearray | None = None

    def provide(self, data: bytes | bytearray | None) -> None:
        """The first-touch read's bytes, or None if it failed (then they are fetched here)."""
        self._data = data
        self._ready.set()

    def fetch(self, start: int, length: int) -> bytearray:
        return received(length, lambda view: self.fetch_into(start, view))

    def ignores_range(self) -> bool:
        return ignores_range(self.source)

    def open_whole_body(self, start: int, size: int) -> WholeBody:
        return whole_body_opener(self.source)(start, size)

    def splice_into(self, block_start: int, view: memoryview) -> None:
        """Put the first-touch read's bytes into a block that came another way (a one-pass
        read), so that what was served is what gets hashed."""
        if not block_start <= self.start < self.end <= block_start + len(view):
            return
        self._ready.wait(self.patience)
        if self._data is not None and len(self._data) == self.end - self.start:
            view[self.start - block_start:self.end - block_start] = self._data

    def fetch_into(self, start: int, view: memoryview) -> None:
        end = start + len(view)
        if not start <= self.start < self.end <= end:
            return fill_from(self.source, start, view)
        # The first-touch read goes first, alone: it is what a reader is waiting for.
        self._ready.wait(self.patience)     # that read has its own deadline; this is a backstop
        head, middle, tail = self.start - start, self.end - start, len(view)
        if head:
            fill_from(self.source, start, view[:head])
        if middle < tail:
            fill_from(self.source, self.end, view[middle:])
        if self._data is not None and len(self._data) == middle - head:
            view[head:middle] = self._data
        else:
            fill_from(self.source, self.start, view[head:middle])
