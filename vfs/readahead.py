"""How many blocks to keep fetching ahead: enough parts for the requests the link is given, within the budget.

A block of a remote file is fetched as parts (parts.py), each part one request, and the
concurrency controller (concurrency.py) decides how many requests an origin gets. A
read-ahead (a sequential reader's window, `pull`, warm-up) has a budget of blocks: half
the block buffers (`--memory`), 64 MiB by default; every block being fetched holds a
buffer, and the blocks fetched ahead must still be in memory when the reader gets there.
Within that budget the depth is counted in parts:

- a stream wants the requests it may have, its fair share of its origin's limit
  (`request_budget()` of its source), plus one block's parts: the block nearest the
  reader is then allowed to finish its last parts while the next block's parts already
  queue, and the controller sees more demand than it grants (it learns only from epochs
  whose demand reached the limit);
- a stream given few requests (one of several readers, a link that is already full)
  keeps few blocks: the buffers go to the streams that need them.

Measured on loopback (`python -m bench.loopback_ab`): a budget of the buffers less two
(6 of 8 blocks) cost the daemon 20-45% more CPU per MiB on a cold read there, for no
gain, so the budget stayed at half the buffers. More requests in flight then mean
smaller parts of the same blocks, never more memory.

A source without a request budget (a local copy, an in-memory test source) keeps the
whole budget.
"""

from collections.abc import Callable

import trio

SLACK_BLOCKS = 1            # one block's parts beyond the requests the stream may have


def request_budget(source: object) -> tuple[int, int] | None:
    """(part size, requests) the source's origin gives one stream now, or None if it has no budget."""
    budget = getattr(source, "request_budget", None)
    return budget() if budget is not None else None


def blocks_ahead(source: object, block_size: int, most: int) -> int:
    """How many blocks a read-ahead of `source` keeps fetching at once, at most `most` (its budget)."""
    most = max(1, most)
    budget = request_budget(source)
    if budget is None:
        return most
    part, requests = budget
    per_block = -(-block_size // max(1, min(part, block_size)))
    return max(1, min(most, -(-requests // per_block) + SLACK_BLOCKS))


class Depth:
    """At most `depth()` of a caller's tasks at once, `depth()` asked again each time one starts
    (the link's budget changes while a blob is filled). Trio thread only."""

    def __init__(self, depth: Callable[[], int]) -> None:
        self.depth = depth
        self.running = 0
        self._changed = trio.Event()

    async def acquire(self) -> None:
        while self.running >= self.depth():
            # A finished task is the only thing that frees room; a budget that grew is seen then.
            if self._changed.is_set():
                self._changed = trio.Event()
            await self._changed.wait()
        self.running += 1

    def release(self) -> None:
        self.running -= 1
        self._changed.set()
