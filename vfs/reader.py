"""File offset/length -> blocks, and the read-ahead policy for sequential readers.

A FUSE read is answered in full (up to EOF) by looping over the blocks it touches. Each
open handle keeps a little state: where its last read ended and how far ahead to fetch.
Reads that continue where the last one ended grow the window (1 block, doubling up to
`max_window` blocks); a jump resets it, so random readers fetch only what they touch.
Fetched-ahead blocks go straight to disk, so memory stays bounded by the number of
fetches in flight, whatever the number of readers.
"""

from dataclasses import dataclass

from .blockcache import BlockCache, BlockSource


@dataclass
class OpenFile:
    """One open handle's view: what it reads, and its sequential-access state."""

    blob: object
    source: BlockSource
    size: int
    next_offset: int = 0
    window: int = 0                 # blocks to keep fetched ahead of the reader


class Reader:
    def __init__(self, cache: BlockCache, max_window=8):
        self.cache = cache
        self.max_window = max_window

    async def read(self, handle: OpenFile, offset, size):
        """The bytes at [offset, offset+size), short only at end of file."""
        end = min(offset + size, handle.size)
        if offset >= end:
            return b""
        self._read_ahead(handle, offset, end)
        pieces = []
        block_size = self.cache.block_size
        position = offset
        while position < end:
            index, inside = divmod(position, block_size)
            length = min(end - position, block_size - inside)
            pieces.append(await self.cache.read(handle.blob, index, inside, length, handle.source))
            position += length
        return pieces[0] if len(pieces) == 1 else b"".join(pieces)

    def _read_ahead(self, handle, offset, end):
        block_size = self.cache.block_size
        # The kernel may deliver a stream's reads slightly out of order: allow some slack.
        sequential = abs(offset - handle.next_offset) <= 2 * 1024 * 1024 or offset == 0
        last = (end - 1) // block_size
        if not sequential:
            handle.window = 0
        elif last > handle.next_offset // block_size or handle.window == 0:
            handle.window = min(self.max_window, max(1, handle.window * 2))
        handle.next_offset = end
        for index in range(last + 1, last + 1 + handle.window):
            self.cache.prefetch(handle.blob, index, handle.source)
