"""One pause shared by every thread that calls the Hub: a 429 or a spent RateLimit budget holds them all.

Resolving asks the Hub from several threads at once. When one of them is told to slow down
(a 429 with `Retry-After`, or a `RateLimit` header whose remaining budget `r` is 0), the
others would otherwise keep spending the same budget and earn 429s of their own. So the
hint is written here, and every thread waits on it before its next request.
"""

import re
import threading
import time

from .retry import MAX_WAIT

_REMAINING = re.compile(r"\br=(\d+)")
_RESET = re.compile(r"\bt=(\d+)")


def budget_spent_for(headers) -> float | None:
    """Seconds until the budget refills when the answer says none is left, else None.

    Reads the IETF draft's `RateLimit: "api";r=0;t=30` and the older pair
    `RateLimit-Remaining: 0` / `RateLimit-Reset: 30`.
    """
    combined = headers.get("ratelimit") or ""
    remaining_field, reset_field = _REMAINING.search(combined), _RESET.search(combined)
    remaining: int | None
    reset: int | None
    if remaining_field is None:
        remaining = _digits(headers.get("ratelimit-remaining"))
        reset = _digits(headers.get("ratelimit-reset"))
    else:
        remaining, reset = int(remaining_field.group(1)), int(reset_field.group(1)) if reset_field else None
    if remaining is None or remaining > 0:
        return None
    return float(min(reset if reset is not None else 1, MAX_WAIT))


def _digits(value: str | None) -> int | None:
    value = (value or "").strip()
    return int(value) if value.isdigit() else None


class RateGate:
    """`wait()` before a request; `hold(seconds)` when the Hub asked for a pause."""

    def __init__(self, clock=time.monotonic, sleep=time.sleep):
        self._lock = threading.Lock()
        self._not_before = 0.0
        self._clock, self._sleep = clock, sleep

    def hold(self, seconds: float) -> None:
        with self._lock:
            self._not_before = max(self._not_before, self._clock() + seconds)

    def observe(self, headers) -> None:
        """Note a successful answer's RateLimit header: a spent budget pauses everyone."""
        pause = budget_spent_for(headers)
        if pause is not None:
            self.hold(pause)

    def wait(self) -> None:
        while True:
            with self._lock:
                delay = self._not_before - self._clock()
            if delay <= 0:
                return
            self._sleep(delay)
