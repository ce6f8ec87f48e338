"""A fixed set of page-aligned block buffers, kept as a small LRU cache of whole blocks.

Every block a stream reads passes through one of these: downloads land in them and are
written out with O_DIRECT, cached blocks are loaded into them from disk (buffered reads:
blockcache.BlockCache._load_into_memory says why), and readers are served from them.
Why not the page cache: filling fresh page-cache pages is the costliest thing the daemon
does per byte (measured: a buffered 1 GiB write into a new file runs at ~0.5 GB/s here,
the same with O_DIRECT from a reused buffer at ~2 GB/s), and each byte would take it
twice, once for the cache file and once for the mount's own pages. Reused buffers are
touched once, so memory stays flat however many gigabytes pass through.

A buffer is *held* while a download or a load fills it or a write drains it; only
buffers no one holds are recycled. Which first: a buffer that holds nothing, then a block
a reader has been served from (least recently read first), and only then a block fetched
ahead that no reader has reached yet (oldest first). Least recently used alone would do
the reverse under pressure: a block fetched ahead was taken before the reader read the
blocks behind it, so it is the older one, and four readers sharing 8 buffers saw blocks
thrown away before their reader got there and read back from the cache's disk
(docs/BENCHMARKS.md, the shaped-link analysis). Trio thread only.
"""

import mmap
from collections import OrderedDict

import trio

BlockKey = tuple[str, int]     # (content id, block index)
ALIGNMENT = 4096        # O_DIRECT wants buffer, offset and length aligned to the device's block


class Buffer:
    """One block-sized buffer: which block it holds, how many bytes of it are valid."""

    def __init__(self, size: int):
        self.memory = mmap.mmap(-1, size)           # page-aligned, as O_DIRECT requires
        self.view = memoryview(self.memory)
        self.key: BlockKey | None = None
        self.length = 0
        self.ready = False          # holds the block's bytes (filled and, if checked, good)
        self.holds = 0
        self.served = False         # a reader was served from it (not a block fetched ahead, unreached)

    def bytes_of(self, start: int, length: int) -> memoryview:
        return self.view[start:start + length]


class BlockMemory:
    def __init__(self, block_size: int, count: int):
        self.block_size, self.count = block_size, max(2, count)
        self._buffers: list[Buffer] = []                          # allocated lazily: an idle mount stays small
        self._by_key: OrderedDict[BlockKey, Buffer] = OrderedDict()   # key -> Buffer, least recently used first
        self._waiting = trio.lowlevel.ParkingLot()     # takers waiting for a buffer no one holds
        self.recycled_unread = 0    # blocks fetched ahead and recycled before a reader reached them

    def get(self, key: BlockKey) -> Buffer | None:
        """The ready buffer holding `key`, marked recently used; None if it is not here."""
        buffer = self._by_key.get(key)
        if buffer is None or not buffer.ready:
            return None
        self._by_key.move_to_end(key)
        return buffer

    def serve(self, key: BlockKey) -> Buffer | None:
        """`get`, for bytes going to a reader: the block is no longer one fetched ahead and unread."""
        buffer = self.get(key)
        if buffer is not None:
            buffer.served = True
        return buffer

    def is_ready(self, key: BlockKey) -> bool:
        """Whether `key`'s bytes are in memory (its place in the recycling order unchanged)."""
        buffer = self._by_key.get(key)
        return buffer is not None and buffer.ready

    def holds(self, key: BlockKey) -> bool:
        return key in self._by_key

    async def take(self, key: BlockKey, length: int) -> Buffer:
        """A held buffer for `key` (not ready until filled), recycled in the order the module's
        docstring gives: one holding nothing, a block read, then a block fetched ahead."""
        while True:
            buffer = self._unused()
            if buffer is not None:
                break
            await self._waiting.park()
        self.forget(key)
        if buffer.key is not None:
            del self._by_key[buffer.key]
        if buffer.key is not None and not buffer.served and buffer.ready:
            self.recycled_unread += 1
        buffer.key, buffer.length, buffer.ready, buffer.holds, buffer.served = key, length, False, 1, False
        self._by_key[key] = buffer
        return buffer

    def _unused(self) -> Buffer | None:
        if len(self._buffers) < self.count:
            self._buffers.append(Buffer(self.block_size))
            return self._buffers[-1]
        for buffer in self._buffers:                # dropped ones first: they hold nothing
            if buffer.key is None and buffer.holds == 0:
                return buffer
        unread = None
        for buffer in self._by_key.values():        # least recently used first
            if buffer.holds == 0:
                if buffer.served or not buffer.ready:   # a reader was here, or nothing to lose
                    return buffer
                unread = unread or buffer               # fetched ahead: only if nothing else is free
        return unread

    def release(self, buffer: Buffer) -> None:
        """Let go of a buffer `take` handed out; the last release makes it recyclable."""
        buffer.holds -= 1
        if buffer.holds == 0:
            self._waiting.unpark_all()

    def forget(self, key: BlockKey) -> None:
        """Drop `key` (its bytes are wrong or gone); a held buffer is dropped when released."""
        buffer = self._by_key.pop(key, None)
        if buffer is not None:
            buffer.key, buffer.ready = None, False

    def forget_blob(self, content_id: str) -> None:
        for key in [k for k in self._by_key if k[0] == content_id]:
            self.forget(key)
