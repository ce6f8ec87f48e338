"""Whole-block disk I/O for the block cache: O_DIRECT where it can, buffered where it must.

Blocks move between the cache's data files and page-aligned memory buffers
(blockmemory.py). O_DIRECT skips the page cache, whose fresh pages are the costliest
part of storing or loading a block; what O_DIRECT cannot do (a filesystem without it,
such as ramfs, a block size or tail not a multiple of the device's block) goes
through the ordinary file descriptor. Both see the same bytes: the kernel keeps direct
and buffered I/O of one file coherent. Blocking: called in worker threads.
"""

import errno
import mmap
import os
from collections.abc import Callable, Iterator
from pathlib import Path

from .blockmemory import ALIGNMENT

try:
    # The same crc32 as zlib's, with SIMD: ~60 GB/s against ~7 here. Every block is
    # checksummed when stored and when first read back; with zlib's, that was ~10% of the
    # CPU of a hot sequential read.
    from zlib_ng.zlib_ng import crc32
except ImportError:             # a platform without its wheel: correct, only slower
    from zlib import crc32


# What a filesystem says when O_DIRECT cannot do this file or this alignment.
NO_DIRECT_IO = (errno.EINVAL, errno.EOPNOTSUPP)
HASH_CHUNK = 8 * 1024 * 1024    # a verification reads the blob this much at a time


def open_direct(path: Path, block_size: int) -> int | None:
    """A second descriptor on `path` with O_DIRECT, or None where that cannot work."""
    if block_size % ALIGNMENT or not hasattr(os, "O_DIRECT"):
        return None
    try:
        return os.open(path, os.O_RDWR | os.O_DIRECT)
    except OSError as exc:
        if exc.errno in NO_DIRECT_IO:       # the filesystem has no O_DIRECT
            return None
        raise


def write_block(data_fd: int, direct_fd: int | None, offset: int, view: memoryview) -> int:
    """Write `view` (a page-aligned buffer's block) at `offset`; its crc32."""
    crc = crc32(view)  # here, not on the trio thread: milliseconds per block
    aligned = len(view) - len(view) % ALIGNMENT if direct_fd is not None else 0
    if aligned and direct_fd is not None and _direct(_pwrite_all, direct_fd, view[:aligned], offset) is None:
        aligned = 0
    _pwrite_all(data_fd, view[aligned:], offset + aligned)
    return crc


def read_block(data_fd: int, direct_fd: int | None, offset: int, view: memoryview, length: int,
               with_crc: bool) -> tuple[int, int | None]:
    """Read `length` bytes at `offset` into `view`; (bytes read, crc32 of them or None)."""
    wanted = -(-length // ALIGNMENT) * ALIGNMENT     # whole device blocks; EOF cuts it short
    got: int | None = None
    if direct_fd is not None and wanted <= len(view):
        got = _direct(_pread_all, direct_fd, view[:wanted], offset)
    if got is None:
        got = _pread_all(data_fd, view[:length], offset)
    got = min(got, length)
    return got, (crc32(view[:got]) if with_crc else None)


def load_block(data_fd: int, offset: int, view: memoryview, length: int,
               with_crc: bool) -> tuple[int, int | None]:
    """`read_block` through the page cache (its read-ahead), then drop the pages it used.

    The caller keeps the bytes (a block buffer, then the FUSE page cache under keep_cache):
    pages of the data file left behind would be a second copy of the model in memory."""
    got, crc = read_block(data_fd, None, offset, view, length, with_crc)
    drop_cached(data_fd, offset, length)
    return got, crc


def pread_once(fd: int, length: int, offset: int) -> bytes:
    """os.pread, leaving no page of the range in the page cache (see `load_block`)."""
    data = os.pread(fd, length, offset)
    drop_cached(fd, offset, length)
    return data


def drop_cached(fd: int, offset: int, length: int) -> None:
    """Ask the kernel to drop the file's cached pages of [offset, offset+length)."""
    try:
        os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)
    except OSError:
        pass                    # advice only: a file system without it keeps its pages


def file_chunks(data_fd: int, direct_fd: int | None, size: int, chunk: int = HASH_CHUNK) -> Iterator[memoryview]:
    """The file's bytes in order, as views of one private buffer (each valid until the next).

    For hashing a whole blob: through O_DIRECT, so a verification does not fill the page
    cache with a copy of a file nobody is reading that way."""
    view = memoryview(mmap.mmap(-1, chunk))  # freed with the last view of it, not before
    for offset in range(0, size, chunk):
        length = min(chunk, size - offset)
        got, _ = read_block(data_fd, direct_fd, offset, view, length, with_crc=False)
        yield view[:got]


def _direct(io: Callable[[int, memoryview, int], int], fd: int, view: memoryview, offset: int) -> int | None:
    """`io` through the O_DIRECT descriptor; None if the kernel refused the alignment."""
    try:
        return io(fd, view, offset)
    except OSError as exc:
        if exc.errno in NO_DIRECT_IO:
            return None
        raise


def _pwrite_all(fd: int, view: memoryview, offset: int) -> int:
    total = len(view)
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written
    return total


def _pread_all(fd: int, view: memoryview, offset: int) -> int:
    got = 0
    while got < len(view):
        n = os.preadv(fd, [view[got:]], offset + got)
        if n == 0:
            break
        got += n
    return got
