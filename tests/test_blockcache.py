"""The block cache over an in-memory source and a temp directory: no FUSE, no network, no root.

Single flight, buffer pressure, crc checks on load, the presence log's recovery after a
crash, verification, eviction, and the handle's contract.
"""

import errno
import os
import threading

import pytest
import trio

from memsource import BLOCK, MemorySource, content_id_of, make_cache, random_bytes
from vfs import errors
from vfs import blockcache
from vfs.blockcache import RECORD, make_record

SIZE = 5 * BLOCK + 123          # five whole blocks and a short tail


@pytest.fixture
def data():
    return random_bytes(SIZE)


async def read_all(handle, source):
    pieces = []
    for index in range(handle.block_count):
        length = min(BLOCK, handle.size - index * BLOCK)
        pieces.append(await handle.read(index, 0, length, source))
    return b"".join(pieces)


async def settle(cache):
    """Wait until no fetch is in flight (they finish in the background)."""
    while cache._inflight:
        await trio.sleep(0.01)


async def test_a_read_returns_exact_bytes_and_stores_the_block(tmp_path, data, nursery):
    cache = make_cache(tmp_path / "cache")
    cache.start(nursery)
    source = MemorySource(data)
    with cache.open(content_id_of(data), SIZE) as handle:
        assert await handle.read(2, 100, 1000, source) == data[2 * BLOCK + 100:2 * BLOCK + 1100]
        await settle(cache)
        assert handle.is_present(2) and not handle.is_present(1)
        assert handle.state().cached_bytes == BLOCK


async def test_second_reader_waits_for_the_same_fetch(tmp_path, data, nursery):
    cache = make_cache(tmp_path / "cache")
    cache.start(nursery)
    source = MemorySource(data)
    source.hold()
    answers = {}
    with cache.open(content_id_of(data), SIZE) as handle:
        async def read(start):
            answers[start] = await handle.read(1, start, 100, source)

        async with trio.open_nursery() as readers:
            for start in (0, 10, 5000, 60000):
                readers.start_soon(read, start)
            await trio.sleep(0.1)
            assert handle.is_fetching(1) and len(source.fetches) == 1
            source.release()
    assert source.fetched_blocks() == [1]
    for start, answer in answers.items():
        assert answer == data[BLOCK + start:BLOCK + start + 100]


async def test_a_stored_block_is_served_from_disk_by_the_next_process(tmp_path, data, nursery):
    first = make_cache(tmp_path / "cache")
    first.start(nursery)
    with first.open(content_id_of(data), SIZE) as handle:
        assert await read_all(handle, MemorySource(data)) == data
        await settle(first)
    again = MemorySource(data)
    second = make_cache(tmp_path / "cache")
    second.start(nursery)
    with second.open(content_id_of(data), SIZE) as handle:
        assert handle.state().complete
        assert await read_all(handle, again) == data
    assert again.fetches == []


async def test_a_block_corrupt_on_disk_is_caught_by_its_crc_and_fetched_again(tmp_path, data, nursery, caplog):
    first = make_cache(tmp_path / "cache")
    first.start(nursery)
    content_id = content_id_of(data)
    with first.open(content_id, SIZE) as handle:
        await read_all(handle, MemorySource(data))
        await settle(first)
    data_file = first.directory.blob_base(content_id).with_suffix(".data")
    with open(data_file, "r+b") as damaged:
        damaged.seek(3 * BLOCK + 7)
        damaged.write(b"\xff" * 16)
    again = MemorySource(data)
    second = make_cache(tmp_path / "cache")
    second.start(nursery)
    with second.open(content_id, SIZE) as handle:
        assert await handle.read(3, 0, BLOCK, again) == data[3 * BLOCK:4 * BLOCK]
    assert again.fetched_blocks() == [3]
    assert "block 3" in caplog.text and "corrupt on disk" in caplog.text


def log_path(cache, content_id):
    return cache.directory.blob_base(content_id).with_suffix(".log")


async def test_a_torn_or_garbled_record_leaves_its_block_absent(tmp_path, data, nursery):
    cache = make_cache(tmp_path / "cache")
    content_id = content_id_of(data)
    with cache.open(content_id, SIZE):
        pass
    with open(log_path(cache, content_id), "ab") as log:
        log.write(make_record(0, 123))                          # a good record (crc irrelevant here)
        garbled = bytearray(make_record(1, 456))
        garbled[5] ^= 0xFF                                      # its own crc no longer matches
        log.write(garbled)
        log.write(make_record(2, 789)[:RECORD.size - 3])        # torn: a crash mid-append
    state = make_cache(tmp_path / "cache").peek(content_id, SIZE)
    assert state.present_blocks == 1 and state.cached_bytes == BLOCK


def full_disk(*args):
    raise OSError(errno.ENOSPC, "No space left on device")


async def test_a_record_the_disk_takes_only_part_of_is_trimmed_so_later_records_stay_aligned(tmp_path, monkeypatch):
    log = tmp_path / "blob.log"
    log.write_bytes(make_record(0, 1))
    real_write = os.write
    monkeypatch.setattr(blockcache.os, "write", lambda fd, data: real_write(fd, data[:5]))   # a full disk's short write
    fd = os.open(log, os.O_WRONLY | os.O_APPEND)
    try:
        with pytest.raises(OSError) as refused:
            blockcache._append_record(fd, make_record(1, 2))
    finally:
        os.close(fd)
    assert refused.value.errno == errno.ENOSPC
    assert log.read_bytes() == make_record(0, 1)


async def test_a_block_the_disk_refuses_to_sync_or_record_is_served_but_not_cached(tmp_path, data, nursery,
                                                                                   monkeypatch, caplog):
    monkeypatch.setattr(blockcache, "_sync_block", full_disk)
    cache = make_cache(tmp_path / "cache")
    cache.start(nursery)
    with cache.open(content_id_of(data), SIZE) as handle:
        assert await handle.read(1, 0, BLOCK, MemorySource(data)) == data[BLOCK:2 * BLOCK]
        await settle(cache)
        assert not handle.is_present(1)
    assert "block 1 not cached (disk full); served from memory" in caplog.text


async def test_a_blob_verified_on_a_disk_too_full_for_its_mark_is_still_served(tmp_path, data, nursery,
                                                                                 monkeypatch, caplog):
    monkeypatch.setattr(blockcache, "write_atomically", full_disk)
    cache = make_cache(tmp_path / "cache")
    cache.start(nursery)
    with cache.open(content_id_of(data), SIZE) as handle:
        assert await read_all(handle, MemorySource(data)) == data
        while not handle.state().verified:
            await trio.sleep(0.01)
    assert "verified, but not recorded (No space left on device)" in caplog.text
    assert not make_cache(tmp_path / "cache").peek(content_id_of(data), SIZE).verified


async def test_a_block_written_but_never_recorded_is_fetched_again(tmp_path, data, nursery):
    # A crash between the data write and the log append: the bytes are there, the proof is not.
    cache = make_cache(tmp_path / "cache")
    content_id = content_id_of(data)
    with cache.open(content_id, SIZE):
        pass
    with open(cache.directory.blob_base(content_id).with_suffix(".data"), "r+b") as out:
        out.write(data[:BLOCK])
    source = MemorySource(data)
    again = make_cache(tmp_path / "cache")
    again.start(nursery)
    with again.open(content_id, SIZE) as handle:
        assert not handle.is_present(0)
        assert await handle.read(0, 0, 10, source) == data[:10]
    assert source.fetched_blocks() == [0]


async def test_blocks_another_process_stored_are_not_fetched_again(tmp_path, data, nursery):
    ours, theirs = make_cache(tmp_path / "cache"), make_cache(tmp_path / "cache")
    ours.start(nursery)
    theirs.start(nursery)
    content_id = content_id_of(data)
    with ours.open(content_id, SIZE) as mine, theirs.open(content_id, SIZE) as other:
        await other.read(4, 0, 10, MemorySource(data))
        await settle(theirs)
        source = MemorySource(data)
        assert await mine.read(4, 0, BLOCK, source) == data[4 * BLOCK:5 * BLOCK]
    assert source.fetches == []


async def test_many_readers_share_two_buffers_and_all_get_exact_bytes(tmp_path, nursery):
    data = random_bytes(12 * BLOCK, seed=7)
    cache = make_cache(tmp_path / "cache", buffers=2)
    cache.start(nursery)
    source = MemorySource(data)
    answers = {}
    with cache.open(content_id_of(data), len(data)) as handle:
        async def read(index):
            answers[index] = await handle.read(index, 0, BLOCK, source)

        async with trio.open_nursery() as readers:
            for index in range(12):
                readers.start_soon(read, index)
        await settle(cache)
    assert all(answers[i] == data[i * BLOCK:(i + 1) * BLOCK] for i in range(12))
    assert len(cache._memory._buffers) == 2


async def test_a_complete_blob_is_verified_against_its_content_id(tmp_path, data, nursery):
    cache = make_cache(tmp_path / "cache")
    cache.start(nursery)
    content_id = content_id_of(data)
    with cache.open(content_id, SIZE) as handle:
        await handle.fill(MemorySource(data))
        await settle(cache)
        with trio.fail_after(10):
            while not handle.state().verified:
                await trio.sleep(0.01)
    assert cache.directory.blob_base(content_id).with_suffix(".ok").exists()
    assert cache.peek(content_id, SIZE).verified


async def test_an_empty_file_is_verified_with_nothing_to_fetch_and_a_false_empty_one_is_not(tmp_path, nursery):
    # nothing ever fills a block of an empty file: without this, `wait --verified` on a
    # model with an empty file waited forever and the API never said verified
    cache = make_cache(tmp_path / "cache")
    cache.start(nursery)
    empty, git_empty, claims_bytes = content_id_of(b""), "sha1:e69de29bb2d1d6434b8b29ae775ad8c2e48c5391", content_id_of(b"x")
    assert cache.peek(empty, 0).verified and cache.peek(git_empty, 0).verified
    with cache.open(git_empty, 0) as handle:
        assert handle.state().verified
    assert not cache.peek(claims_bytes, 0).verified       # a size that contradicts its id


async def test_wrong_bytes_are_discarded_when_the_blob_is_hashed(tmp_path, data, nursery, caplog):
    cache = make_cache(tmp_path / "cache")
    cache.start(nursery)
    lying = MemorySource(data)
    lying.data[2 * BLOCK] ^= 1
    discarded = []

    async def on_discard(content_id):
        discarded.append(content_id)

    cache.on_discard = on_discard
    with cache.open(content_id_of(data), SIZE) as handle:
        await handle.fill(lying)           # the last block stored starts the hash
        await settle(cache)
        with trio.fail_after(10):
            while not discarded:
                await trio.sleep(0.01)
        await trio.sleep(0.2)
        assert handle.state().present_blocks == 0 and not handle.state().verified
        assert handle.failed_verifications == 1     # hashed once, however many blocks landed last
    assert discarded == [content_id_of(data)]
    assert caplog.text.count("does not match its content id") == 1


async def test_a_one_block_blob_with_wrong_bytes_is_never_served(tmp_path, nursery):
    data = random_bytes(1000)
    cache = make_cache(tmp_path / "cache")
    cache.start(nursery)
    lying = MemorySource(data)
    lying.data[0] ^= 1
    with cache.open(content_id_of(data), len(data)) as handle:
        with pytest.raises(errors.IntegrityError):
            await handle.read(0, 0, 10, lying)
        assert not handle.is_present(0)


async def test_a_failed_fetch_reaches_every_waiting_reader_and_is_not_remembered(tmp_path, data, nursery):
    cache = make_cache(tmp_path / "cache")
    cache.start(nursery)
    source = MemorySource(data)
    source.failure = errors.FetchError("the Hub is down")
    with cache.open(content_id_of(data), SIZE) as handle:
        for _ in range(2):
            with pytest.raises(errors.FetchError):
                await handle.read(0, 0, 10, source)
        source.failure = None
        assert await handle.read(0, 0, 10, source) == data[:10]
    assert source.fetched_blocks() == [0, 0, 0]


async def test_an_open_blob_is_never_evicted_and_the_least_recently_used_goes_first(tmp_path, nursery):
    blobs = [random_bytes(2 * BLOCK, seed=seed) for seed in range(4)]
    cache = make_cache(tmp_path / "cache", max_size=6 * BLOCK, min_free_fraction=0.0)
    cache.start(nursery)
    ids = [content_id_of(blob) for blob in blobs]
    held = cache.open(ids[0], 2 * BLOCK)            # the oldest, but open
    await held.fill(MemorySource(blobs[0]))
    for number in (1, 2):
        with cache.open(ids[number], 2 * BLOCK) as handle:
            await handle.fill(MemorySource(blobs[number]))
        await settle(cache)
        os.utime(cache.directory.blob_base(ids[number]).with_suffix(".data"), (number, number))
    with cache.open(ids[3], 2 * BLOCK) as handle:
        await handle.fill(MemorySource(blobs[3]))
    await settle(cache)
    left = {blob.content_id for blob in cache.directory.blobs()}
    assert ids[0] in left and ids[1] not in left and {ids[2], ids[3]} <= left
    held.close()


async def test_a_blob_being_hashed_is_never_evicted_under_its_hash(tmp_path, nursery, monkeypatch):
    blobs = [random_bytes(2 * BLOCK, seed=seed) for seed in range(2)]
    ids = [content_id_of(blob) for blob in blobs]
    hashing, finish = threading.Event(), threading.Event()
    real_match = blockcache.matches_content_id

    def slow_match(content_id, size, chunks):
        if content_id == ids[0]:
            hashing.set()
            finish.wait(10)
        return real_match(content_id, size, chunks)
    monkeypatch.setattr(blockcache, "matches_content_id", slow_match)
    cache = make_cache(tmp_path / "cache", max_size=2 * BLOCK, min_free_fraction=0.0)
    cache.start(nursery)
    with cache.open(ids[0], 2 * BLOCK) as handle:
        await handle.fill(MemorySource(blobs[0]))
    await trio.to_thread.run_sync(hashing.wait, 10)          # closed, its hash under way
    with cache.open(ids[1], 2 * BLOCK) as handle:            # needs the room the first one takes
        await handle.fill(MemorySource(blobs[1]))
    await settle(cache)                                      # every block of it written, the hash still held
    finish.set()
    while ids[0] in cache._verifying:
        await trio.sleep(0.01)
    assert cache.peek(ids[0], 2 * BLOCK).verified


async def test_a_handle_owns_one_share_of_the_open_count_and_its_releases(tmp_path, data):
    cache = make_cache(tmp_path / "cache")
    released = []
    first = cache.open(content_id_of(data), SIZE)
    second = cache.open(content_id_of(data), SIZE)
    first.on_close(lambda: released.append("backing id"))
    first.close()
    first.close()                               # closing twice gives up one share, once
    assert released == ["backing id"] and second.in_use
    second.close()
    assert not first.in_use
    first.on_close(lambda: released.append("late"))
    assert released == ["backing id", "late"]   # a closed handle releases at once


async def test_a_successor_takes_the_crc_checks_only_of_blocks_unchanged_since(tmp_path, data, nursery):
    """A daemon that takes a live mount over counts its predecessor's crc checks as its own
    (BlockCache.adopt_checked), but only for a block still recorded with the crc it was
    checked against, in the same data file."""
    first = make_cache(tmp_path / "cache")
    first.start(nursery)
    content_id = content_id_of(data)
    with first.open(content_id, SIZE) as handle:
        await read_all(handle, MemorySource(data))
        await settle(first)
        assert await handle.verify()
        assert handle.verified_data_fd() is not None        # every block checked in `first`
    exported = first.export_checked()

    def successor():
        cache = make_cache(tmp_path / "cache")
        cache.start(nursery)
        cache.adopt_checked(exported)
        return cache

    with successor().open(content_id, SIZE) as handle:
        assert handle.verified_data_fd() is not None        # served without a check of its blocks
    with make_cache(tmp_path / "cache").open(content_id, SIZE) as handle:
        assert handle.needs_check()                         # without them: checked again
    with open(log_path(first, content_id), "ab") as log:
        log.write(make_record(1, 12345))                    # block 1 recorded again, another crc
    with successor().open(content_id, SIZE) as handle:
        assert handle.needs_check()
        assert handle._blob.checked[0] and not handle._blob.checked[1]
    data_file = first.directory.blob_base(content_id).with_suffix(".data")
    copy = data_file.read_bytes()
    data_file.unlink()
    data_file.write_bytes(copy)                             # another file: nothing is taken
    with successor().open(content_id, SIZE) as handle:
        assert not any(handle._blob.checked)
