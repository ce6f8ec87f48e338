"""When to try a remote call again, and how long to wait first: the one retry policy of hub and fetch.

A remote call (a Hub metadata request, a range read) is tried again after a failure
worth another try (`Retryable`), waiting first the server's hint when it gave one
(`Retry-After`, `RateLimit`'s t=; at most MAX_WAIT), else an exponential backoff from
0.25 s. `Attempts` keeps one call's count and says when to give up: after `max_retries`
counted failures, or when the wait would end past the call's deadline. A failure that is
only the server asking us to slow down may be left uncounted (the fetcher's 429/503: a
rate-limited origin slows reads down, it does not fail them); the deadline still holds.
What a failure *is* (which statuses, which exceptions) is each caller's to say; how
long to wait and when to stop is decided here only.
"""

import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from email.message import Message

RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
Headers = Mapping[str, str] | Message     # an answer's headers: http.client's, or a plain mapping
MAX_WAIT = 60.0
_RATELIMIT_T = re.compile(r"\bt=(\d+)")


def backoff(attempt: int, hinted: float | None = None) -> float:
    """Seconds before retry `attempt`: the server's hint when it gave one, else exponential."""
    if hinted is not None:
        return min(hinted, MAX_WAIT)
    return min(0.25 * (2 ** attempt), 8.0)


def server_hint(headers: Headers) -> float | None:
    """Seconds the server asked us to wait (`Retry-After: N` or `RateLimit: ...;t=N`), or None."""
    value = (headers.get("retry-after") or "").strip()
    if value.isdigit():
        return float(value)
    match = _RATELIMIT_T.search(headers.get("ratelimit") or "")
    return float(match.group(1)) if match else None


@dataclass(frozen=True)
class Retryable:
    """A failure worth another try, and how the server asked to be treated."""

    hint: float | None = None       # seconds the server asked for (server_hint), if any
    counted: bool = True            # False: a throttle, not held against max_retries
    at_most: int | None = None      # a tighter limit on retries for this kind of failure


class Attempts:
    """The tries of one remote call under `max_retries` and a deadline (time.monotonic())."""

    def __init__(self, max_retries: int, deadline: float):
        self.max_retries, self.deadline = max_retries, deadline
        self.failed = 0         # failed tries so far
        self.counted = 0        # of those, the ones held against max_retries

    @classmethod
    def within(cls, max_retries: int, seconds: float) -> "Attempts":
        return cls(max_retries, time.monotonic() + seconds)

    def wait_after(self, failure: Retryable) -> float | None:
        """Record one failed try; the seconds to wait before the next, or None: give up."""
        self.failed += 1
        wait = backoff(self.counted, failure.hint)
        limit = self.max_retries if failure.at_most is None else min(self.max_retries, failure.at_most)
        if self.counted >= limit or time.monotonic() + wait > self.deadline:
            return None
        self.counted += failure.counted
        return wait
