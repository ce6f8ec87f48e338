"""Format-aware warm-up: fetch a model file's blocks in the order its loader will touch them.

A loader reads a small header, then touches tensor data. If that data is fetched only as
the loader faults on it, every fault waits for the network. Warm-up reads the header as
soon as the file is first read at offset 0, works out the loader's order, and fetches
blocks in that order, a few at a time, while the loader is still parsing:

- GGUF (llama.cpp): 4 KiB header reads, then one `MAP_POPULATE` mmap of the whole file,
  which faults pages in file order. So: the header, then the tensors by offset.
- safetensors (transformers, vLLM): an 8-byte length, a JSON header, then the loader
  asks for tensors by name through an mmap; `safe_open().keys()` is sorted, so that is
  the order the bytes are touched in.

The file's format is sniffed from its first bytes, not its name. Warm-up stops as soon as
no handle of the blob is open (a `file` or `head` of a 70 GB model must not fetch it all),
and a failed fetch stops it quietly: the loader's own read reports the error.
"""

import json
import logging
import struct

import trio

from . import errors

log = logging.getLogger(__name__)

FIRST_LOOK = 1024 * 1024          # covers most GGUF headers (vocabularies) at once
MAX_HEADER = 256 * 1024 * 1024   # more than any real GGUF vocabulary or safetensors header
GGUF_DEFAULT_ALIGNMENT = 32


class Truncated(Exception):
    """The header goes on past the bytes read so far; `need` bytes would do (0: unknown)."""

    def __init__(self, need=0):
        super().__init__(need)
        self.need = need


async def run(reader, blob, source, parallel):
    """Warm `blob` up if it is a GGUF or safetensors file (a background task: never raises)."""
    try:
        ranges = await loader_ranges(lambda start, end: reader.read_blocks(blob, source, start, end), blob.size)
        if ranges:
            order = block_order(ranges, reader.cache.block_size, blob.blocks)
            await fetch_in_order(reader.cache, blob, source, order, parallel)
    except errors.LaminaError as exc:
        log.info("%s: warm-up stopped: %s", source.describe, exc)
    except Exception:  # noqa: BLE001 - a background task must never end the mount
        log.exception("%s: warm-up failed", source.describe)


async def loader_ranges(read, size):
    """Byte ranges in the order a loader touches them, or None if not a known format."""
    head = await read(0, min(size, FIRST_LOOK))
    parse = sniff(head)
    while parse is not None:
        try:
            # A real vocabulary is a few MiB of header: parsing it is CPU work, and the
            # trio thread must keep serving reads meanwhile.
            return await trio.to_thread.run_sync(parse, head, size)
        except (ValueError, KeyError, TypeError, struct.error):
            return None             # it only looked like one: leave it to read-ahead
        except Truncated as short:
            want = max(short.need, 4 * len(head))
            if len(head) >= size or want > MAX_HEADER:
                return None
            head = await read(0, min(size, want))
    return None


def sniff(head):
    """The header parser for the format `head` starts like, or None."""
    if head[:4] == b"GGUF":
        return gguf_ranges
    if len(head) >= 9 and head[8:9] == b"{" and 2 <= struct.unpack_from("<Q", head)[0] <= MAX_HEADER:
        return safetensors_ranges
    return None


def block_order(ranges, block_size, blocks):
    """Block indexes covering `ranges`, each once, in the order first touched."""
    seen, order = set(), []
    for start, end in ranges:
        for index in range(start // block_size, min(blocks, (end - 1) // block_size + 1)):
            if index not in seen:
                seen.add(index)
                order.append(index)
    return order


async def fetch_in_order(cache, blob, source, order, parallel):
    """Fetch the absent blocks of `order`, at most `parallel` at once, in that order."""
    slots = trio.Semaphore(parallel)

    async def fetch_one(index):
        try:
            await cache.read(blob, index, 0, 1, source)
        finally:
            slots.release()

    async with trio.open_nursery() as nursery:
        for index in order:
            await slots.acquire()
            if blob.open_count <= 0:
                slots.release()
                break
            if blob.present[index] or cache.inflight(blob, index):
                slots.release()
                continue
            nursery.start_soon(fetch_one, index)


# ---------------------------------------------------------------------------
# safetensors: u64 header length, JSON {name: {dtype, shape, data_offsets: [b, e]}}


def safetensors_ranges(head, size):
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
# GGUF: magic, version, counts, key/values, tensor infos, aligned tensor data


class _Cursor:
    def __init__(self, data):
        self.data, self.at = memoryview(data), 0

    def take(self, fmt):
        size = struct.calcsize(fmt)
        if self.at + size > len(self.data):
            raise Truncated()
        values = struct.unpack_from(fmt, self.data, self.at)
        self.at += size
        return values[0] if len(values) == 1 else values

    def string(self):
        length = self.take("<Q")
        if self.at + length > len(self.data):
            raise Truncated(self.at + length)
        self.at += length
        return bytes(self.data[self.at - length:self.at])


# GGUF value types -> struct formats (8: string, 9: array are read by hand)
_GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
                 10: "<Q", 11: "<q", 12: "<d"}


def _gguf_value(cursor, kind):
    if kind == 8:
        return cursor.string()
    if kind == 9:
        item_kind, count = cursor.take("<I"), cursor.take("<Q")
        if item_kind in _GGUF_SCALARS:      # skip a scalar array without decoding it
            size = struct.calcsize(_GGUF_SCALARS[item_kind]) * count
            if cursor.at + size > len(cursor.data):
                raise Truncated(cursor.at + size)
            cursor.at += size
        elif item_kind == 8:
            _skip_strings(cursor, count)
        else:
            for _ in range(count):
                _gguf_value(cursor, item_kind)
        return None
    if kind not in _GGUF_SCALARS:
        raise ValueError(f"unknown GGUF value type {kind}")
    return cursor.take(_GGUF_SCALARS[kind])


def _skip_strings(cursor, count):
    """Skip `count` length-prefixed strings (a vocabulary: 100k+ of them, so a tight loop)."""
    data, at, end, unpack = cursor.data, cursor.at, len(cursor.data), struct.Struct("<Q").unpack_from
    for _ in range(count):
        if at + 8 > end:
            raise Truncated()
        at += 8 + unpack(data, at)[0]
    if at > end:
        raise Truncated(at)
    cursor.at = at


def gguf_ranges(head, size):
    cursor = _Cursor(head)
    _magic, version, tensor_count, kv_count = cursor.take("<4sIQQ")
    if version < 2:
        raise ValueError(f"GGUF version {version} is not supported")
    alignment = GGUF_DEFAULT_ALIGNMENT
    for _ in range(kv_count):
        key, kind = cursor.string(), cursor.take("<I")
        value = _gguf_value(cursor, kind)
        if key == b"general.alignment" and isinstance(value, int) and value > 0:
            alignment = value
    offsets = []
    for _ in range(tensor_count):
        cursor.string()
        dims = cursor.take("<I")
        cursor.take(f"<{dims}Q")
        cursor.take("<I")
        offsets.append(cursor.take("<Q"))
    data_start = -(-cursor.at // alignment) * alignment
    bounds = sorted(data_start + offset for offset in offsets) + [size]
    return [(0, data_start)] + [(start, end) for start, end in zip(bounds, bounds[1:]) if end > start]
