"""The block buffers: bounded, blocks already read recycled before blocks fetched ahead, never one still in use."""

import ctypes

import trio

from vfs.blockmemory import ALIGNMENT, BlockMemory

BLOCK = 64 * 1024


async def filled(memory, key, byte):
    buffer = await memory.take(key, BLOCK)
    buffer.view[:BLOCK] = bytes([byte]) * BLOCK
    buffer.ready = True
    memory.release(buffer)
    return buffer


async def test_buffers_are_page_aligned_for_o_direct():
    memory = BlockMemory(BLOCK, 2)
    buffer = await memory.take(("a", 0), BLOCK)
    address = ctypes.addressof(ctypes.c_char.from_buffer(buffer.memory))
    assert address % ALIGNMENT == 0 and len(buffer.view) == BLOCK


async def test_a_block_taken_but_not_filled_is_not_served():
    memory = BlockMemory(BLOCK, 2)
    await memory.take(("a", 0), BLOCK)
    assert memory.get(("a", 0)) is None
    assert memory.holds(("a", 0))


async def test_the_least_recently_read_block_is_recycled_first():
    memory = BlockMemory(BLOCK, 3)
    for index in range(3):
        await filled(memory, ("a", index), index)
    for index in (1, 2, 0):
        memory.serve(("a", index))
    assert bytes(memory.serve(("a", 0)).bytes_of(0, 4)) == b"\0\0\0\0"     # 0 is now the most recent
    await filled(memory, ("a", 3), 3)
    assert memory.get(("a", 1)) is None                                  # 1 was read longest ago
    assert memory.get(("a", 0)) is not None and memory.get(("a", 2)) is not None
    assert bytes(memory.get(("a", 3)).bytes_of(BLOCK - 2, 2)) == b"\3\3"


async def test_blocks_a_reader_has_passed_go_before_blocks_fetched_ahead():
    # A stream: blocks 1 and 2 fetched ahead while the reader was in block 0, then block
    # 0 read to its end. Block 0 was filled first and read last; it is still what goes.
    memory = BlockMemory(BLOCK, 3)
    for index in range(3):
        await filled(memory, ("a", index), index)
    memory.serve(("a", 0))
    await filled(memory, ("a", 3), 3)                   # the window moves on
    assert memory.get(("a", 0)) is None
    assert memory.is_ready(("a", 1)) and memory.is_ready(("a", 2))
    assert memory.recycled_unread == 0


async def test_a_warm_up_touch_or_a_check_leaves_a_block_unread():
    memory = BlockMemory(BLOCK, 2)
    await filled(memory, ("a", 0), 0)
    await filled(memory, ("a", 1), 1)
    memory.serve(("a", 1))
    memory.get(("a", 0))                    # a touch that serves no reader
    assert memory.is_ready(("a", 0))
    await filled(memory, ("a", 2), 2)
    assert memory.is_ready(("a", 0)) and not memory.is_ready(("a", 1))


async def test_blocks_fetched_ahead_are_recycled_oldest_first_when_nothing_else_is_free():
    # Every buffer holds a block no reader has reached (four streams on eight buffers):
    # one of them must go, and the oldest goes, so a stream abandoned half-way does not
    # keep its blocks for ever.
    memory = BlockMemory(BLOCK, 3)
    for index in range(3):
        await filled(memory, ("a", index), index)
    await filled(memory, ("a", 3), 3)
    assert not memory.is_ready(("a", 0))
    assert memory.is_ready(("a", 1)) and memory.is_ready(("a", 2)) and memory.is_ready(("a", 3))
    assert memory.recycled_unread == 1


async def test_a_block_waited_for_is_served_before_its_buffer_can_go():
    # A download holds its buffer until written; the reader waiting for it is woken
    # before that and served, so the block is no longer unread when the buffer is let go.
    memory = BlockMemory(BLOCK, 2)
    await filled(memory, ("b", 0), 9)                   # fetched ahead, unread
    downloading = await memory.take(("a", 0), BLOCK)
    downloading.view[:BLOCK] = b"\7" * BLOCK
    done = trio.Event()
    served = []

    async def reader():
        await done.wait()
        served.append(bytes(memory.serve(("a", 0)).bytes_of(0, 2)))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(reader)
        downloading.ready = True
        done.set()
        await trio.sleep(0.01)                          # the block's write, in a thread
        memory.release(downloading)
    assert served == [b"\7\7"]
    await filled(memory, ("c", 0), 3)
    assert memory.is_ready(("b", 0)) and not memory.is_ready(("a", 0))


async def test_a_held_buffer_is_never_recycled_and_takers_wait_for_one():
    memory = BlockMemory(BLOCK, 2)
    first = await memory.take(("a", 0), BLOCK)
    second = await memory.take(("a", 1), BLOCK)
    got = []

    async def taker():
        got.append(await memory.take(("a", 2), BLOCK))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(taker)
        await trio.sleep(0.05)
        assert got == []                    # both held: the taker waits
        memory.release(second)
    assert got == [second] and got[0].key == ("a", 2)
    assert first.key == ("a", 0) and first.holds == 1


async def test_forgetting_a_blob_drops_its_blocks_only():
    memory = BlockMemory(BLOCK, 4)
    await filled(memory, ("a", 0), 1)
    await filled(memory, ("a", 1), 2)
    await filled(memory, ("b", 0), 3)
    memory.forget_blob("a")
    assert memory.get(("a", 0)) is None and memory.get(("a", 1)) is None
    assert memory.get(("b", 0)) is not None


async def test_memory_never_grows_past_its_buffers():
    memory = BlockMemory(BLOCK, 3)
    for index in range(50):
        await filled(memory, ("a", index), index % 256)
    assert len(memory._buffers) == 3
