"""The reader's policies over an in-memory source: read-ahead window, first touches, EOF.

No FUSE, no network, no root: Reader.read is called as Operations.read would call it.
"""

import pytest
import trio

from memsource import BLOCK, MemorySource, content_id_of, make_cache, random_bytes
from vfs.reader import OpenFile, Reader

SIZE = 40 * BLOCK + 77
KIB = 1024


@pytest.fixture
def data():
    return random_bytes(SIZE, seed=5)


@pytest.fixture
def setup(tmp_path, data, nursery):
    """(reader, open file, source) over a fresh cache with 16 block buffers."""
    cache = make_cache(tmp_path / "cache", buffers=16)
    cache.start(nursery)
    reader = Reader(cache)
    reader.start(nursery)
    source = MemorySource(data)
    blob = cache.open(content_id_of(data), SIZE)
    yield reader, OpenFile(blob, source, SIZE), source
    blob.close()


async def quiet(reader):
    """Wait until the cache has no fetch in flight."""
    with trio.fail_after(10):
        while reader.cache._inflight:
            await trio.sleep(0.01)


async def test_sequential_reads_double_the_window_up_to_half_the_buffers(setup, data):
    reader, handle, _ = setup
    windows = []
    for number in range(7):
        offset = number * 32 * KIB
        assert await reader.read(handle, offset, 32 * KIB) == data[offset:offset + 32 * KIB]
        windows.append(handle.window)
    assert reader.max_window == 8                     # 16 buffers: a stream gets half
    assert windows == [0, 1, 2, 4, 8, 8, 8]


async def test_a_stream_fetches_its_window_ahead_of_the_reader(setup, data):
    reader, handle, source = setup
    for number in range(6):
        await reader.read(handle, number * 32 * KIB, 32 * KIB)      # reads end inside block 2
    await quiet(reader)
    assert set(source.fetched_blocks()) >= set(range(3, 2 + 1 + 8))  # the window of 8 beyond block 2
    assert max(source.fetched_blocks()) <= 2 + 8


async def test_a_jump_resets_the_window_and_fetches_only_what_it_touches(setup, data):
    reader, handle, source = setup
    for number in range(5):
        await reader.read(handle, number * 32 * KIB, 32 * KIB)
    assert handle.window > 1
    far = 39 * BLOCK + 5                    # further than the kernel's reordering reaches
    assert await reader.read(handle, far, 4 * KIB) == data[far:far + 4 * KIB]
    assert handle.window == 0
    await quiet(reader)
    assert {index for index in source.fetched_blocks() if index > 20} == {39}


async def test_a_cold_first_touch_asks_for_exactly_its_bytes_and_the_block_is_built_around_them(setup, data):
    reader, handle, source = setup
    offset = 12 * BLOCK + 1000
    assert await reader.read(handle, offset, 4 * KIB) == data[offset:offset + 4 * KIB]
    await quiet(reader)
    assert source.fetches[0] == (offset, 4 * KIB)         # the reader's own small request, first
    block_start = 12 * BLOCK
    assert sorted(source.fetches[1:]) == [(block_start, 1000), (offset + 4 * KIB, BLOCK - 1000 - 4 * KIB)]
    source.fetches.clear()
    assert await reader.read(handle, block_start, BLOCK) == data[block_start:block_start + BLOCK]
    assert source.fetches == []


async def test_a_read_across_blocks_is_whole_and_a_read_at_the_end_is_short(setup, data):
    reader, handle, _ = setup
    across = 3 * BLOCK - 100
    assert await reader.read(handle, across, 300) == data[across:across + 300]
    assert await reader.read(handle, SIZE - 10, 4 * KIB) == data[SIZE - 10:]
    assert await reader.read(handle, SIZE, 4 * KIB) == b""
    assert await reader.read(handle, SIZE + BLOCK, 4 * KIB) == b""


async def test_concurrent_readers_of_one_file_get_exact_bytes_and_one_fetch_per_block(setup, data):
    reader, handle, source = setup
    second = OpenFile(handle.blob, handle.source, SIZE)
    answers = {}

    async def read_all(name, open_file):
        pieces = []
        for offset in range(0, SIZE, 128 * KIB):
            pieces.append(bytes(await reader.read(open_file, offset, 128 * KIB)))
        answers[name] = b"".join(pieces)

    async with trio.open_nursery() as readers:
        readers.start_soon(read_all, "first", handle)
        readers.start_soon(read_all, "second", second)
    await quiet(reader)
    assert answers["first"] == answers["second"] == data
    whole_blocks = [start for start, length in source.fetches if length == BLOCK or start == 40 * BLOCK]
    assert len(whole_blocks) == len(set(whole_blocks))


def test_the_window_never_exceeds_half_the_buffers(tmp_path):
    cache = make_cache(tmp_path / "cache", buffers=4)
    assert Reader(cache, max_ahead=1 << 40).max_window == 2
    assert Reader(cache, max_ahead=BLOCK).max_window == 1


async def test_streams_reading_at_once_share_the_buffers_and_lose_no_block_fetched_ahead(tmp_path, nursery):
    # Four sequential readers of four files on 8 buffers: each may keep one block ahead
    # (8 / 4, less the block it reads). With half the buffers each (4 ahead), their blocks
    # fetched ahead pushed each other out of memory before the readers got there.
    cache = make_cache(tmp_path / "cache", buffers=8)
    cache.start(nursery)
    reader = Reader(cache)
    reader.start(nursery)
    files = [random_bytes(12 * BLOCK, seed=number) for number in range(4)]
    handles = [OpenFile(cache.open(content_id_of(data), len(data)), MemorySource(data), len(data))
               for data in files]
    windows = set()
    for offset in range(0, 12 * BLOCK, 16 * KIB):
        for handle, data in zip(handles, files):
            assert await reader.read(handle, offset, 16 * KIB) == data[offset:offset + 16 * KIB]
            windows.add(handle.window)
        await trio.sleep(0.001)             # the fetches ahead land between the readers' reads
    assert max(windows) == 1
    assert cache._memory.recycled_unread == 0
    await quiet(reader)
    for handle in handles:
        handle.blob.close()


async def test_a_stream_alone_keeps_its_whole_window(setup, data):
    reader, handle, _ = setup
    for number in range(8):
        await reader.read(handle, number * 32 * KIB, 32 * KIB)
    assert handle.window == reader.max_window == 8


async def test_readers_of_one_file_count_as_one_stream(setup, data):
    # They read the same blocks: four handles on one file keep its whole window.
    reader, handle, _ = setup
    handles = [handle] + [OpenFile(handle.blob, handle.source, SIZE) for _ in range(3)]
    for number in range(8):
        for each in handles:
            assert await reader.read(each, number * 32 * KIB, 32 * KIB) == data[number * 32 * KIB:(number + 1) * 32 * KIB]
    assert [each.window for each in handles] == [reader.max_window] * 4
