"""Format-aware warm-up: fetch a model file's blocks in the order its loader will touch them.

A loader reads a small header, then touches tensor data. If that data is fetched only as
the loader faults on it, every fault waits for the network. Warm-up reads the header as
soon as the file is first read at offset 0, works out the loader's order, and fetches
blocks in that order, a few at a time, while the loader is still parsing:

- GGUF (llama.cpp): 4 KiB header reads, then one `MAP_POPULATE` mmap of the whole file,
  which faults pages in file order. So: the header, then the tensors by offset, which is
  the file in order.
- safetensors (transformers, vLLM): an 8-byte length, a JSON header, then the loader
  asks for tensors by name through an mmap; `safe_open().keys()` is sorted, so that is
  the order the bytes are touched in.

The file's format is sniffed from its first bytes, not its name. Warm-up stops as soon as
no handle of the blob is open (a `file` or `head` of a 70 GB model must not fetch it all),
and a failed fetch stops it quietly: the loader's own read reports the error.
"""

import json
import struct
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING

import trio

from . import readahead

if TYPE_CHECKING:
    from .blockcache import BlobHandle, BlockSource
    from .reader import Reader

Ranges = list[tuple[int, int]]                  # [start, end) byte ranges, in loader order
Parser = Callable[[bytes, int], Ranges]        # (header bytes, file size) -> ranges

FIRST_LOOK = 64 * 1024            # a safetensors header's length and usually all of it
MAX_HEADER = 100 * 1024 * 1024   # safetensors caps its header at 100 MB


class Truncated(Exception):
    """The header goes on past the bytes read so far; `need` bytes would do (0: unknown)."""

    def __init__(self, need: int = 0):
        super().__init__(need)
        self.need = need


async def run(reader: "Reader", blob: "BlobHandle", source: "BlockSource", parallel: Callable[[], int]) -> None:
    """Warm `blob` up if it is a GGUF or safetensors file (a background task: run it under
    tasks.spawn_guarded, which logs a failed fetch at INFO: the loader's read reports it);
    `parallel()` blocks at once, asked again as the link's budget changes (readahead.py)."""
    ranges = await loader_ranges(lambda start, end: reader.read_blocks(blob, source, start, end), blob.size)
    if ranges:
        order = block_order(ranges, reader.cache.block_size, blob.block_count)
        await fetch_in_order(blob, source, order, parallel)


async def loader_ranges(read: Callable[[int, int], Awaitable[bytes]], size: int) -> Ranges | None:
    """Byte ranges in the order a loader touches them, or None if not a known format."""
    head = await read(0, min(size, FIRST_LOOK))
    parse = sniff(head)
    while parse is not None:
        try:
            # A header can be MiBs of JSON: parsing it is CPU work, and the trio thread
            # must keep serving reads meanwhile.
            return await trio.to_thread.run_sync(parse, head, size)
        except (ValueError, KeyError, TypeError, struct.error):
            return None             # it only looked like one: leave it to read-ahead
        except Truncated as short:
            want = max(short.need, 4 * len(head))
            if len(head) >= size or want > MAX_HEADER:
                return None
            head = await read(0, min(size, want))
    return None


def sniff(head: bytes) -> Parser | None:
    """The header parser for the format `head` starts like, or None."""
    if head[:4] == b"GGUF":
        return gguf_ranges
    if len(head) >= 9 and head[8:9] == b"{" and 2 <= struct.unpack_from("<Q", head)[0] <= MAX_HEADER:
        return safetensors_ranges
    return None


def block_order(ranges: Ranges, block_size: int, blocks: int) -> list[int]:
    """Block indexes covering `ranges`, each once, in the order first touched."""
    seen: set[int] = set()
    order: list[int] = []
    for start, end in ranges:
        for index in range(start // block_size, min(blocks, (end - 1) // block_size + 1)):
            if index not in seen:
                seen.add(index)
                order.append(index)
    return order


async def fetch_in_order(blob: "BlobHandle", source: "BlockSource", order: Sequence[int], parallel: Callable[[], int]) -> None:
    """Fetch the absent blocks of `order`, at most `parallel()` at once, in that order."""
    slots = readahead.Depth(parallel)

    async def fetch_one(index: int) -> None:
        try:
            await blob.read(index, 0, 1, source)
        finally:
            slots.release()

    async with trio.open_nursery() as nursery:
        for index in order:
            await slots.acquire()
            if not blob.in_use:
                slots.release()
                break
            if blob.is_present(index) or blob.is_fetching(index):
                slots.release()
                continue
            nursery.start_soon(fetch_one, index)


# ---------------------------------------------------------------------------
# safetensors: u64 header length, JSON {name: {dtype, shape, data_offsets: [b, e]}}


def safetensors_ranges(head: bytes, size: int) -> Ranges:
    (length,) = struct.unpack_from("<Q", head)
    data_start = 8 + length
    if data_start > size:
        raise ValueError("safetensors header longer than the file")
    if len(head) < data_start:
        raise Truncated(data_start)
    header = json.loads(bytes(head[8:data_start]))
    tensors = sorted((name, entry["data_offsets"]) for name, entry in header.items() if name != "__metadata__")
    return [(0, data_start)] + [(data_start + begin, data_start + end) for _, (begin, end) in tensors if end > begin]


# ---------------------------------------------------------------------------
# GGUF: magic, version, tensor count, key/value count, ... then aligned tensor data


def gguf_ranges(head: bytes, size: int) -> Ranges:
    """The whole file, in file order: that is the order llama.cpp touches it.

    Its MAP_POPULATE faults the mapping in from the first page to the last, and tensor
    data follows the header in ascending offsets. Walking the key/values to find where the
    data starts would give the same blocks in the same order, at the price of a Python loop
    over the vocabulary (7.5 MiB, 320k strings for a 320 MiB model): measured, that walk
    held the GIL long enough to slow the load it was meant to speed up by 15%.
    """
    if len(head) < 24:
        raise Truncated(24)
    (version,) = struct.unpack_from("<I", head, 4)
    if version < 2:
        raise ValueError(f"GGUF version {version} is not supported")
    return [(0, size)]
