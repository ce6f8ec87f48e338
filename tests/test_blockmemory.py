"""The block buffers: bounded, least recently used recycled first, never one still in use."""

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


async def test_the_least_recently_used_block_is_recycled_first():
    memory = BlockMemory(BLOCK, 3)
    for index in range(3):
        await filled(memory, ("a", index), index)
    assert bytes(memory.get(("a", 0)).bytes_of(0, 4)) == b"\0\0\0\0"     # 0 is now the most recent
    await filled(memory, ("a", 3), 3)
    assert memory.get(("a", 1)) is None                                  # 1 was the oldest
    assert memory.get(("a", 0)) is not None and memory.get(("a", 2)) is not None
    assert bytes(memory.get(("a", 3)).bytes_of(BLOCK - 2, 2)) == b"\3\3"


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
