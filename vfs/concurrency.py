"""How many HTTP requests go to one origin at once: an adaptive limit under a hard cap, shared fairly.

A CDN carries each connection at a rate its edge sets (often 10-100 MB/s), so a cold read
is as fast as the number of ranged requests in flight allows. Too few leave the link
idle; too many queue behind each other, cost the server, and get refused. Each origin
gets an `OriginLimit`, which learns how many requests are worth having in flight:

- It measures each request's own rate (its bytes over its time, the wait for the first
  byte included). Per epoch (a few request durations) it compares the epoch's rate per
  request with the best epoch's of the last few: their ratio is the efficiency, and the
  total the origin carried is about (requests in flight, time-averaged) x rate per
  request, so "useful" = requests in flight x efficiency is how many requests' worth of
  bytes the link actually carried.
- Start-up: while requests still run at (nearly) the best rate, more requests mean more
  total: the limit doubles each epoch (a short one: one request duration, 0.1 s at least).
- Steady state: while efficiency stays high, the total still grows with the limit: +1 per
  epoch. When it falls well below (the link or the CPU is full, extra requests only queue
  and share it), the limit drops to what was useful, plus one to keep probing.
- Only epochs where demand reached the limit count: a reader that wants 3 requests says
  nothing about whether 30 would be faster.
- A 429 or 503 halves the limit; a `Retry-After` or `RateLimit` reset stops new requests
  to the origin until it has passed (requests under way go on). A timeout halves it too.
  `RateLimit: ...;r=N` (or `remaining=N`) allows at most N more requests before its reset.
- Never more than `cap` requests in flight per origin (32 by default), nor fewer than one.
  A new origin gets one request until its first answer arrives (a probe: an origin that
  ignores Range is learnt from one whole-file answer, not from dozens side by side).

`Controller` hands out slots under those limits, blocking the calling thread (fetches run
in worker threads). When a slot frees, it goes to an urgent waiter first (a reader waiting
for exactly those bytes), else to the stream (a file being read) with the fewest requests in
flight, then the one served least recently (round robin), oldest request first: several
readers share an origin's budget evenly.

Concurrency: one lock guards every origin's state and the waiters; nothing blocks on the
network while holding it. `OriginLimit` itself is not thread-safe: the Controller's lock
covers it, and the unit tests drive it alone, with a simulated clock.
"""

import collections
import itertools
import logging
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from . import errors
from .retry import Headers

log = logging.getLogger(__name__)

DEFAULT_MAX_IN_FLIGHT = 32
INITIAL_LIMIT = 8                # a 16 MiB block in 2 MiB parts
MIN_EPOCH = 0.2                 # seconds: shorter epochs are mostly noise
EPOCH_DURATIONS = 2.0           # an epoch spans about this many request durations
START_EPOCH = 0.1               # seconds, and one request duration: epochs while the limit doubles
GROW_EFFICIENCY = 0.85          # at or above this share of the best rate, more requests still pay
SHRINK_EFFICIENCY = 0.7         # below it, requests only share a full link: keep what was useful
BEST_EPOCHS = 8                 # the best per-request rate is the best of this many epochs (links change)
REFUSED_PAUSE = 0.5             # seconds without new requests after a 503 that gave no hint
MAX_PAUSE = 60.0
MAX_STREAMS_REMEMBERED = 4096
WAITER_POLL = 0.25              # a waiter looks again this often (a pause or a quota may have ended)
_RATELIMIT_PAIRS = re.compile(r"\b(r|t|remaining|reset)\s*=\s*(\d+)", re.IGNORECASE)


class NoSlot(errors.FetchError):
    """No request slot to the origin came free before the read's deadline."""


class OriginLimit:
    """The adaptive limit of one origin (see the module's docstring); the caller holds a lock."""

    def __init__(self, cap: int = DEFAULT_MAX_IN_FLIGHT, initial: int = INITIAL_LIMIT,
                 clock: Callable[[], float] = time.monotonic):
        self.cap = max(1, cap)
        self.limit = float(min(self.cap, max(1, initial)))
        self.clock = clock
        self.in_flight = 0
        self.most_in_flight = 0
        self.paused_until = 0.0
        self.starting = True            # start-up: double while it pays
        # Until a first answer: one request alone. A server that ignores Range answers each
        # request with the whole file; learning that from one costs one file's prefix, not 32.
        self.probing = True
        # Per epoch: the fastest request's rate (what a part is sized by), and the rate per
        # request of the epoch as a whole (the yardstick of efficiency: on a busy host requests
        # vary, and the fastest of a few dozen would make any epoch's mean look like a full link).
        self._fastest = collections.deque([0.0], maxlen=BEST_EPOCHS)
        self._means: collections.deque[float] = collections.deque([], maxlen=BEST_EPOCHS)
        self._quota: tuple[int, float] | None = None    # (requests left, until when) from a RateLimit header
        self._epoch = _Epoch(clock())
        self._duration = 0.0            # smoothed seconds per request
        self._decreased = float("-inf")

    # -- admission

    def may_start(self) -> bool:
        now = self.clock()
        if now < self.paused_until or self.in_flight >= (1 if self.probing else int(self.limit)):
            return False
        return self._quota is None or self._quota[0] > 0 or now >= self._quota[1]

    def started(self) -> None:
        self._account()
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        if self._quota is not None:
            left, until = self._quota
            self._quota = None if self.clock() >= until else (left - 1, until)

    def answered(self) -> None:
        """A request to the origin got its answer's head: the origin is known, stop probing."""
        self.probing = False

    def demand_exceeds_limit(self) -> None:
        """Someone waited for a slot: this epoch's figures say something about the limit."""
        self._epoch.saturated = True

    def wait_hint(self) -> float | None:
        """Seconds until a pause or an exhausted quota ends, or None if neither holds."""
        now = self.clock()
        ends = [self.paused_until] if now < self.paused_until else []
        if self._quota is not None and self._quota[0] <= 0 and now < self._quota[1]:
            ends.append(self._quota[1])
        return max(ends) - now if ends else None

    # -- outcomes

    def finished(self, received: int, seconds: float, headers: Headers | None = None) -> None:
        """A request ended with its answer read; `received` body bytes in `seconds`."""
        self.probing = False
        self._account()
        self.in_flight -= 1
        self._epoch.bytes += received
        self._epoch.completions += 1
        if seconds > 0:
            self._epoch.seconds += seconds
            self._fastest[-1] = max(self._fastest[-1], received / seconds)
        self._duration = seconds if not self._duration else 0.8 * self._duration + 0.2 * seconds
        if headers:
            self.rate_limit_headers(headers)
        if self._epoch_over():
            self._adapt()

    def refused(self, wait: float | None = None) -> None:
        """The origin said 429 or 503: halve the limit, and pause as asked (or briefly)."""
        self.probing = False
        self._account()
        self.in_flight -= 1
        self._decrease()
        self.pause(REFUSED_PAUSE if wait is None else wait)

    def failed(self, timed_out: bool = False) -> None:
        """A request broke (connection error, timeout): a timeout counts as congestion."""
        self.probing = False
        self._account()
        self.in_flight -= 1
        if timed_out:
            self._decrease()

    def rate_limit_headers(self, headers: Headers) -> None:
        """Honour `RateLimit: "policy";r=N;t=S` (or remaining=/reset=, or RateLimit-Remaining/-Reset)."""
        headers = {name.lower(): value for name, value in headers.items()}
        fields = {k.lower(): int(v) for k, v in _RATELIMIT_PAIRS.findall(headers.get("ratelimit") or "")}
        remaining = fields.get("r", fields.get("remaining", _int(headers.get("ratelimit-remaining"))))
        reset = fields.get("t", fields.get("reset", _int(headers.get("ratelimit-reset"))))
        if remaining is None or reset is None:
            return
        until = self.clock() + min(reset, MAX_PAUSE)
        self._quota = (remaining, until)
        if remaining == 0:
            self.pause(until - self.clock())

    # -- learning

    @property
    def best_per_request(self) -> float:
        """The fastest a request to this origin ran lately (bytes per second, the wait included)."""
        return max(self._fastest)

    def _account(self):
        now = self.clock()
        if now > self._epoch.last:      # an epoch may start in the future: at a pause's end
            self._epoch.busy += self.in_flight * (now - self._epoch.last)
            self._epoch.last = now

    def _epoch_over(self):
        epoch, now = self._epoch, self.clock()
        # Start-up asks only "does doubling still pay?", which one round of requests
        # answers: shorter epochs then take a cold read to the cap sooner (8 -> 32 in
        # 0.25 s instead of 0.43 on a 40 MB/s link with 30 ms replies, simulated).
        if self.starting:
            length = max(START_EPOCH, self._duration)
        else:
            length = max(MIN_EPOCH, EPOCH_DURATIONS * self._duration)
        return now - epoch.started >= length and epoch.completions >= max(2, int(self.limit) // 2)

    def _adapt(self):
        epoch, now = self._epoch, self.clock()
        self._epoch = _Epoch(now)
        self._fastest.append(0.0)
        elapsed = now - epoch.started
        if elapsed <= 0 or epoch.seconds <= 0:
            return
        mean = epoch.bytes / epoch.seconds
        best = max(self._means, default=mean)
        self._means.append(mean)
        if not epoch.saturated or best <= 0:
            return                      # the demand was below the limit: nothing learnt
        efficiency, before = mean / best, self.limit
        if efficiency >= GROW_EFFICIENCY:
            self.limit = min(self.cap, self.limit * 2 if self.starting else self.limit + 1)
        else:
            self.starting = False
            if efficiency < SHRINK_EFFICIENCY:
                useful = epoch.busy / elapsed * efficiency
                self.limit = max(1.0, min(self.limit, useful + 1))
        # The controller's decisions, for `-v`: one line per epoch that taught it something.
        log.debug("request limit %.1f -> %.1f: efficiency %.2f, %.1f in flight on average, %.0f MB/s in %.2f s",
                  before, self.limit, efficiency, epoch.busy / elapsed, epoch.bytes / elapsed / 1e6, elapsed)

    def _decrease(self):
        # Once per request duration: a storm of refusals of requests that were all in
        # flight together is one signal, not one per request (TCP halves once per RTT).
        now = self.clock()
        if now - self._decreased < max(MIN_EPOCH, self._duration):
            return
        self._decreased = now
        self.starting = False
        log.debug("request limit %.1f -> %.1f: refused or timed out", self.limit, max(1.0, self.limit / 2))
        self.limit = max(1.0, self.limit / 2)
        self._epoch = _Epoch(now)

    def pause(self, seconds: float) -> None:
        self.paused_until = max(self.paused_until, self.clock() + min(seconds, MAX_PAUSE))
        # What happens during a pause says nothing about the link: learn again after it.
        self._epoch = _Epoch(max(self.clock(), self.paused_until))


@dataclass
class _Epoch:
    started: float
    last: float = 0.0
    bytes: int = 0
    completions: int = 0
    seconds: float = 0.0            # the completed requests' durations, added up
    busy: float = 0.0               # integral of requests in flight over time
    saturated: bool = False

    def __post_init__(self):
        self.last = self.started


def _int(value):
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


@dataclass(eq=False)
class _Waiter:
    stream: object
    urgent: bool
    order: int
    granted: bool = False
    event: threading.Event = field(default_factory=threading.Event)


class Slot:
    """One request's permission to be in flight; report how it ended, or it counts as failed."""

    def __init__(self, controller, origin, stream):
        self._controller, self.origin, self.stream = controller, origin, stream
        self._started = time.monotonic()
        self._reported = False
        self._kept = False

    def __enter__(self) -> "Slot":
        return self

    def __exit__(self, *exc_info) -> None:
        if not self._kept:
            self.failed()           # nothing if the request reported how it ended

    def keep(self) -> "Slot":
        """Outlive the `with` block: its request goes on elsewhere, which reports how it ended."""
        self._kept = True
        return self

    def answered(self) -> None:
        """The answer's head arrived (the slot is still held until the body is read)."""
        self._controller._update(self.origin, OriginLimit.answered)

    def finished(self, received: int, headers: Headers | None = None) -> None:
        self._report(lambda limit: limit.finished(received, time.monotonic() - self._started, headers))

    def refused(self, wait: float | None = None) -> None:
        self._report(lambda limit: limit.refused(wait))

    def failed(self, timed_out: bool = False) -> None:
        self._report(lambda limit: limit.failed(timed_out))

    def _report(self, update):
        if not self._reported:
            self._reported = True
            self._controller._release(self.origin, self.stream, update)


class Controller:
    """Slots for requests, per origin, under each origin's adaptive limit (thread-safe)."""

    def __init__(self, max_in_flight: int = DEFAULT_MAX_IN_FLIGHT, initial: int = INITIAL_LIMIT,
                 clock: Callable[[], float] = time.monotonic):
        self.max_in_flight, self.initial, self.clock = max_in_flight, initial, clock
        self._lock = threading.Lock()
        self._limits: dict[object, OriginLimit] = {}
        self._waiters: dict[object, list[_Waiter]] = {}
        self._streams: dict[tuple[object, object], int] = {}    # (origin, stream) -> requests in flight
        self._served: dict[tuple[object, object], int] = {}     # (origin, stream) -> its last grant's number
        self._order = itertools.count()

    def limit(self, origin) -> OriginLimit:
        with self._lock:
            return self._limit(origin)

    def stats(self) -> dict:
        """Per origin: the current limit, requests in flight and waiting, the most in flight so far."""
        with self._lock:
            return {origin: {"limit": limit.limit, "in_flight": limit.in_flight, "most": limit.most_in_flight,
                             "waiting": len(self._waiters.get(origin, ()))}
                    for origin, limit in self._limits.items()}

    def share(self, origin, stream=None) -> int:
        """The requests `stream` may have in flight to `origin` now: the origin's limit split
        evenly among the streams with requests in flight or waiting (this one included).

        What a read-ahead sizes its demand by (readahead.py): the controller, not the number
        of blocks ahead, decides how many requests carry a stream."""
        with self._lock:
            limit = self._limit(origin)
            streams = {key[1] for key in self._streams if key[0] == origin}
            streams.update(waiter.stream for waiter in self._waiters.get(origin, ()))
            streams.add(stream)
            return max(1, -(-int(limit.limit) // len(streams)))

    def slot(self, origin, stream=None, deadline: float | None = None, urgent: bool = False) -> Slot:
        """A Slot for one request to `origin` on behalf of `stream`, held for a `with` block.

        Waits (the calling thread) until one is free; FetchError if `deadline` (a
        time.monotonic() value) passes first. Leaving the block without a report counts
        the request as failed (not as congestion)."""
        self._acquire(origin, stream, deadline, urgent)
        return Slot(self, origin, stream)

    def _limit(self, origin):
        limit = self._limits.get(origin)
        if limit is None:
            limit = self._limits[origin] = OriginLimit(self.max_in_flight, self.initial, self.clock)
        return limit

    def _acquire(self, origin, stream, deadline, urgent):
        with self._lock:
            limit = self._limit(origin)
            queue = self._waiters.setdefault(origin, [])
            if not queue and limit.may_start():
                return self._grant(origin, stream, limit)
            limit.demand_exceeds_limit()
            waiter = _Waiter(stream, urgent, next(self._order))
            queue.append(waiter)
        while True:
            with self._lock:
                if waiter.granted:
                    return None
                self._dispatch(origin)
                if waiter.granted:
                    return None
                hint = limit.wait_hint()
            timeout = None if deadline is None else deadline - time.monotonic()
            if timeout is not None and timeout <= 0:
                if self._withdraw(origin, waiter):
                    raise NoSlot("no request slot to the origin within the read deadline")
                return None
            # A pause or a quota ends without anyone releasing a slot: look again then.
            waiter.event.wait(min(w for w in (timeout, hint, WAITER_POLL) if w is not None))
            waiter.event.clear()

    def _withdraw(self, origin, waiter):
        """Take a waiter that gave up out of the queue; False if it was granted meanwhile."""
        with self._lock:
            if waiter.granted:
                return False
            self._waiters[origin].remove(waiter)
            return True

    def _grant(self, origin, stream, limit):
        limit.started()
        key = (origin, stream)
        self._streams[key] = self._streams.get(key, 0) + 1
        if len(self._served) > MAX_STREAMS_REMEMBERED:
            self._served.clear()        # only the order among current readers matters
        self._served[key] = next(self._order)

    def _update(self, origin, update):
        with self._lock:
            update(self._limits[origin])
            self._dispatch(origin)

    def _release(self, origin, stream, update):
        with self._lock:
            update(self._limits[origin])
            key = (origin, stream)
            self._streams[key] -= 1
            if not self._streams[key]:
                del self._streams[key]
            self._dispatch(origin)

    def _dispatch(self, origin):
        """Grant free slots to waiters: urgent first, then the least-served stream, oldest first."""
        limit, queue = self._limits[origin], self._waiters.get(origin)
        while queue and limit.may_start():
            waiter = min(queue, key=lambda w: (not w.urgent, self._streams.get((origin, w.stream), 0),
                                               self._served.get((origin, w.stream), -1), w.order))
            queue.remove(waiter)
            self._grant(origin, waiter.stream, limit)
            waiter.granted = True
            waiter.event.set()
