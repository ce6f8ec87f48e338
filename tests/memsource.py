"""An in-memory block source and a cache over a temp directory, for tests without FUSE or a network."""

import hashlib
import random
import threading

from vfs.blockcache import BlockCache
from vfs.cachedir import CacheDir

BLOCK = 64 * 1024


def random_bytes(size, seed=1):
    return random.Random(seed).randbytes(size)


def content_id_of(data):
    return "sha256:" + hashlib.sha256(data).hexdigest()


class MemorySource:
    """A blob's bytes from memory. Records every fetch; can hold fetches until released,
    serve wrong bytes, or fail."""

    def __init__(self, data, describe="test/file"):
        self.data = bytearray(data)
        self.describe = describe
        self.fetches = []               # (start, length) in the order asked
        self.gate = threading.Event()
        self.gate.set()                 # open: fetches answer at once
        self.failure = None             # an exception every fetch raises
        self._lock = threading.Lock()

    def hold(self):
        self.gate.clear()

    def release(self):
        self.gate.set()

    def fetch(self, start, length):
        with self._lock:
            self.fetches.append((start, length))
        if not self.gate.wait(30):
            raise TimeoutError("the test never released the source")
        if self.failure is not None:
            raise self.failure
        return bytes(self.data[start:start + length])

    def fetched_blocks(self, block_size=BLOCK):
        return [start // block_size for start, _ in self.fetches]


def make_cache(root, block_size=BLOCK, buffers=8, **options):
    return BlockCache(CacheDir(root, block_size), memory=buffers * block_size, **options)
