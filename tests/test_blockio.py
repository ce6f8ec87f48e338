"""Whole-block disk I/O: O_DIRECT where the filesystem allows, buffered otherwise, same bytes. No root."""

import mmap
import os
import zlib

import pytest

from vfs import blockio

BLOCK = 64 * 1024


def aligned_buffer(size):
    return memoryview(mmap.mmap(-1, size))


@pytest.fixture
def data_file(tmp_path):
    path = tmp_path / "blob.data"
    with open(path, "wb") as out:
        out.truncate(3 * BLOCK)
    fd = os.open(path, os.O_RDWR)
    direct = blockio.open_direct(path, BLOCK)
    yield path, fd, direct
    for descriptor in (fd, direct):
        if descriptor is not None:
            os.close(descriptor)


@pytest.mark.parametrize("length", [BLOCK, BLOCK - 100, 4096, 1])
@pytest.mark.parametrize("use_direct", [True, False])
def test_a_written_block_reads_back_exactly_with_its_crc(data_file, length, use_direct):
    path, fd, direct = data_file
    direct = direct if use_direct else None
    buffer = aligned_buffer(BLOCK)
    buffer[:length] = os.urandom(length)
    crc = blockio.write_block(fd, direct, BLOCK, buffer[:length])
    assert crc == zlib.crc32(buffer[:length])
    back = aligned_buffer(BLOCK)
    got, read_crc = blockio.read_block(fd, direct, BLOCK, back, length, with_crc=True)
    assert got == length and read_crc == crc and back[:length] == buffer[:length]
    with open(path, "rb") as plain:                 # what any other reader of the file sees
        plain.seek(BLOCK)
        assert plain.read(length) == bytes(buffer[:length])


def test_a_read_past_the_end_of_the_file_is_short(data_file):
    _, fd, direct = data_file
    back = aligned_buffer(BLOCK)
    got, _ = blockio.read_block(fd, direct, 3 * BLOCK - 10, back, BLOCK, with_crc=False)
    assert got == 10


def test_no_o_direct_for_a_block_size_the_device_cannot_align(tmp_path):
    path = tmp_path / "odd.data"
    path.write_bytes(b"")
    assert blockio.open_direct(path, 4096 + 512) is None


def test_file_chunks_yield_the_whole_file_in_order(tmp_path):
    path = tmp_path / "blob.data"
    content = os.urandom(3 * BLOCK + 5)
    path.write_bytes(content)
    fd = os.open(path, os.O_RDONLY)
    try:
        joined = b"".join(bytes(chunk) for chunk in blockio.file_chunks(fd, None, len(content), chunk=BLOCK))
    finally:
        os.close(fd)
    assert joined == content
