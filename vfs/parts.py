"""One range read as parts fetched side by side into the caller's own buffer.

A CDN carries each response at a rate of its own, so a 16 MiB block asked for in one
request arrives at that one connection's rate. Split into parts (2 MiB and up) fetched
at once, it arrives several times faster; and since every part is received straight into
its slice of the block's buffer, more connections do not mean more memory.

How big a part is follows the link: big enough that its bytes take `PART_SECONDS` at the
rate requests to that origin have been seen to reach (the reply's delay included), never
under `min_part`. On a link of 10-40 MB/s per connection that is the minimum, 2 MiB: a
16 MiB block is 8 parts, and the 4 blocks a stream keeps fetching hold the 32 requests of
the cap (at 0.1 s, a 40 MB/s link with 30 ms replies got 2.7 MiB parts, 6 per block, and
never more than 24 requests: 0.78x the throughput, measured with `python -m
bench.loopback_ab --rate 40MB --delay 0.03`). On loopback, where one request runs at a
GB/s, a block stays one request and pays no extra round trips.

Rules a caller can rely on: `read` returns only once no part is being received any more
(a failed part stops parts not yet started, and waits for the ones under way: the buffer
is never written after `read` has returned or raised), and raises the first part's error.
"""

import queue
import threading
from collections.abc import Callable

PART_SECONDS = 0.05
MIN_PART = 2 * 1024 * 1024
ALIGN = 64 * 1024               # parts start on these boundaries (tidy ranges, whole pages)


def part_size(rate: float, min_part: int = MIN_PART) -> int:
    """The part size for a link whose requests reach `rate` bytes per second (0: not known yet)."""
    return max(min_part, int(rate * PART_SECONDS) // ALIGN * ALIGN)


def split(start: int, length: int, size: int) -> list[tuple[int, int]]:
    """(start, length) of each part of [start, start+length): as even as `ALIGN` allows, none over `size`."""
    count = max(1, -(-length // max(1, size)))
    step = -(-length // count)
    step = -(-step // ALIGN) * ALIGN if step > ALIGN else step
    parts, offset = [], start
    while offset < start + length:
        parts.append((offset, min(step, start + length - offset)))
        offset += step
    return parts


class _Part:
    """One part handed to a thread. The thread drops `work` before setting `done`: once a
    caller has seen every part done, no thread holds a view of its buffer any more."""

    def __init__(self, work: Callable[[], None]):
        self.work: Callable[[], None] | None = work
        self.error: BaseException | None = None
        self.done = threading.Event()
        self.cancelled = False


class PartReader:
    """Fetches the parts of a range in threads of its own; the calling thread fetches the first."""

    def __init__(self, threads: int):
        self._jobs: queue.SimpleQueue[_Part | None] = queue.SimpleQueue()
        self._threads, self._started = max(1, threads), 0
        self._lock = threading.Lock()

    def read(self, start: int, view: memoryview, size: int, read_part: Callable[[int, memoryview], None]) -> None:
        """Fill `view` (the bytes from `start`) by `read_part(part_start, part_view)` per part."""
        pieces = split(start, len(view), size)
        if len(pieces) == 1:
            return read_part(start, view)
        others = [self._submit(_bind(read_part, s, view, s - start, n)) for s, n in pieces[1:]]
        try:
            first, length = pieces[0]
            read_part(first, view[:length])
        except BaseException:
            _stop(others)
            raise
        for part in others:
            part.done.wait()
            if part.error is not None:
                _stop(others)
                raise part.error
        return None

    def close(self) -> None:
        """End the threads once the parts queued now are done (they are daemons: never waited for)."""
        with self._lock:
            count, self._started = self._started, 0
        for _ in range(count):
            self._jobs.put(None)

    def _submit(self, work: Callable[[], None]) -> _Part:
        part = _Part(work)
        with self._lock:
            if self._started < self._threads:
                self._started += 1
                threading.Thread(target=self._work, name=f"lamina-part-{self._started}", daemon=True).start()
        self._jobs.put(part)
        return part

    def _work(self) -> None:
        while (part := self._jobs.get()) is not None:
            work, part.work = part.work, None
            try:
                if not part.cancelled and work is not None:     # a part is taken once
                    work()
            except BaseException as exc:  # noqa: BLE001 - handed to the caller, who raises it
                part.error = exc.with_traceback(None)
            finally:
                del work
                part.done.set()


def _bind(read_part: Callable[[int, memoryview], None], start: int, view: memoryview, offset: int,
          length: int) -> Callable[[], None]:
    def work() -> None:
        with view[offset:offset + length] as piece:
            read_part(start, piece)
    return work


def _stop(parts: list[_Part]) -> None:
    """Skip the parts not started; wait for those under way (they write into the buffer)."""
    for part in parts:
        part.cancelled = True
    for part in parts:
        part.done.wait()
