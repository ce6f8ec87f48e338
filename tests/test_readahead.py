"""How deep a read-ahead goes: counted in parts of the requests the link gives a stream, within the buffers.

No FUSE, no network: sources that state a request budget, over the in-memory cache.
"""

import trio

from memsource import BLOCK, MemorySource, content_id_of, make_cache, random_bytes
from vfs import readahead
from vfs.concurrency import Controller
from vfs.reader import OpenFile, Reader

MIB = 1024 * 1024
KIB = 1024


class Budgeted:
    """A source whose origin gives it `requests` requests of `part` bytes each."""

    def __init__(self, part, requests):
        self.part, self.requests = part, requests

    def request_budget(self):
        return self.part, self.requests


class BudgetedMemory(MemorySource):
    def __init__(self, data, part, requests):
        super().__init__(data)
        self.part, self.requests = part, requests

    def request_budget(self):
        return self.part, self.requests


def test_the_depth_holds_the_streams_requests_plus_one_block():
    block = 16 * MIB
    # 32 requests of 2 MiB parts: 4 blocks' worth, and one more for the block finishing.
    assert readahead.blocks_ahead(Budgeted(2 * MIB, 32), block, most=64) == 5
    # Bigger parts: more blocks hold the same requests (4 MiB parts: 8 blocks hold 32).
    assert readahead.blocks_ahead(Budgeted(4 * MIB, 32), block, most=64) == 9
    # Parts as big as a block (loopback): one block per request.
    assert readahead.blocks_ahead(Budgeted(64 * MIB, 3), block, most=64) == 4
    # A stream given few requests keeps few blocks.
    assert readahead.blocks_ahead(Budgeted(2 * MIB, 1), block, most=64) == 2


def test_the_depth_never_exceeds_its_budget_of_blocks():
    assert readahead.blocks_ahead(Budgeted(2 * MIB, 64), 16 * MIB, most=4) == 4
    assert readahead.blocks_ahead(Budgeted(2 * MIB, 64), 16 * MIB, most=0) == 1


def test_a_source_without_a_budget_gets_the_whole_budget():
    assert readahead.blocks_ahead(object(), 16 * MIB, most=4) == 4


def test_a_streams_share_of_an_origin_is_split_among_the_streams_using_it():
    controller = Controller(max_in_flight=32, initial=32)
    assert controller.share("cdn", "a") == 32
    with controller.slot("cdn", "a") as first:
        first.answered()                        # the origin's probe is over: more may go
        with controller.slot("cdn", "b"):
            assert controller.share("cdn", "a") == 16
            assert controller.share("cdn", "c") == 11      # a newcomer counts itself in
    assert controller.share("cdn", "a") == 32


async def test_a_sequential_window_is_counted_in_the_parts_of_the_streams_requests(tmp_path, nursery):
    data = random_bytes(40 * BLOCK, seed=3)
    cache = make_cache(tmp_path / "cache", buffers=16)
    cache.start(nursery)
    reader = Reader(cache, max_ahead=8 * BLOCK)
    reader.start(nursery)
    # Parts of a quarter block, 24 requests: 6 blocks' worth, plus one (of a budget of 8).
    source = BudgetedMemory(data, BLOCK // 4, 24)
    blob = cache.open(content_id_of(data), len(data))
    handle = OpenFile(blob, source, len(data))
    try:
        for number in range(8):
            offset = number * 32 * KIB
            assert await reader.read(handle, offset, 32 * KIB) == data[offset:offset + 32 * KIB]
        assert handle.window == 7               # not the 8 blocks a budget-less source gets
        source.requests = 4                     # the controller gave it less: the window follows
        await reader.read(handle, 8 * 32 * KIB, 32 * KIB)
        assert handle.window == 2
    finally:
        blob.close()


async def test_a_fill_keeps_only_as_many_blocks_in_flight_as_the_budget_says(tmp_path, nursery):
    data = random_bytes(24 * BLOCK, seed=4)
    cache = make_cache(tmp_path / "cache", buffers=16)
    cache.start(nursery)
    source = BudgetedMemory(data, BLOCK // 2, 2)       # one block's worth of requests, plus one
    source.hold()
    blob = cache.open(content_id_of(data), len(data))
    try:
        async with trio.open_nursery() as filling:
            filling.start_soon(blob.fill, source)
            with trio.fail_after(10):
                while len(source.fetches) < 2:
                    await trio.sleep(0.01)
            await trio.sleep(0.2)               # no more than that start while they are held
            assert sorted(source.fetched_blocks()) == [0, 1]      # not the 4 a fill takes at most
            source.release()
        with trio.fail_after(10):
            while cache._inflight:              # the last blocks are still being written
                await trio.sleep(0.01)
        assert blob.state().complete
    finally:
        blob.close()
