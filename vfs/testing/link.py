"""The simulated network between a client and the Hub simulator: link shaping and in-flight counts.

Loopback is not the Hub. On a real link each response is carried at a rate the CDN edge
and the path set (tens of MB/s per connection, sometimes under 10), and every reply
waits a round trip before its first byte. A `Link` says how the simulator imitates that:

- `rate`: bytes per second, per response body. Each response is paced on its own, so
  N responses side by side get N times the rate, as N connections to a CDN do.
- `delay`: seconds every reply waits before its status line (a round trip plus the
  server's time to first byte), error answers included.
- `max_in_flight`: beyond this many requests being served at once on an origin, the
  simulator refuses the extra ones with `refuse_status` (503, or 429 with `Retry-After:
  retry_after`), as a CDN protecting itself does.

`InFlight` counts the requests an origin is serving and remembers the most it ever
served at once since the last reset: "most requests in flight", the figure tests and
benchmarks hold a client's concurrency to.
"""

import argparse
import re
import threading
import time
from dataclasses import asdict, dataclass

MIN_PACE_CHUNK = 16 * 1024
MAX_PACE_CHUNK = 256 * 1024
PACE_TICKS_PER_SECOND = 100     # a paced body is sent in about this many pieces a second
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmg]i?b?|b)?\s*(?:/s)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "m": 1e6, "mb": 1e6, "g": 1e9, "gb": 1e9,
          "ki": 1024, "kib": 1024, "mi": 1024 ** 2, "mib": 1024 ** 2, "gi": 1024 ** 3, "gib": 1024 ** 3}


@dataclass(frozen=True)
class Link:
    """How every response is shaped; the default is loopback as it is (no shaping)."""

    rate: float | None = None           # bytes per second per response body; None: unlimited
    delay: float = 0.0                  # seconds before each reply's status line
    max_in_flight: int | None = None    # per origin; more at once are refused
    refuse_status: int = 503            # 503, or 429 (then Retry-After is sent)
    retry_after: float = 1.0            # seconds, sent with a 429 refusal

    def __post_init__(self):
        if self.rate is not None and self.rate <= 0:
            raise ValueError(f"link rate must be positive, not {self.rate!r}")
        if self.delay < 0:
            raise ValueError(f"link delay must not be negative, not {self.delay!r}")
        if self.max_in_flight is not None and self.max_in_flight < 1:
            raise ValueError(f"max_in_flight must be at least 1, not {self.max_in_flight!r}")
        if self.refuse_status not in (429, 503):
            raise ValueError(f"refuse_status must be 429 or 503, not {self.refuse_status!r}")

    def to_dict(self):
        return asdict(self)

    @classmethod
    def from_dict(cls, data):
        return cls(**data)

    def pace_chunk(self):
        """Bytes sent between two checks of the clock: small enough to pace smoothly."""
        if self.rate is None:
            return None
        return int(min(MAX_PACE_CHUNK, max(MIN_PACE_CHUNK, self.rate / PACE_TICKS_PER_SECOND)))


class Pacer:
    """Holds one response body to `rate` bytes per second from its first byte on."""

    def __init__(self, rate, sleep):
        self.rate, self._sleep = rate, sleep
        self._started = None
        self._sent = 0

    def before(self, count):
        """Wait until the schedule lets the next `count` bytes go, then count them.

        Waiting before a piece, not after it, ends the body with its last byte: a client
        that has read it all finds the request over."""
        now = time.monotonic()
        if self._started is None:
            self._started = now
        due = self._started + self._sent / self.rate
        if due > now:
            self._sleep(due - now)
        self._sent += count


class InFlight:
    """Requests an origin is serving now, and the most it served at once since `reset_peak`."""

    def __init__(self):
        self._lock = threading.Lock()
        self.now = 0
        self.peak = 0

    def enter(self):
        """Count one more request; returns how many are in flight with it."""
        with self._lock:
            self.now += 1
            self.peak = max(self.peak, self.now)
            return self.now

    def leave(self):
        with self._lock:
            self.now -= 1

    def reset_peak(self):
        with self._lock:
            self.peak = self.now

    def to_dict(self):
        with self._lock:
            return {"now": self.now, "peak": self.peak}


def parse_rate(text):
    """Bytes per second from "40MB", "40 MB/s", "8.7MiB" or a plain number of bytes."""
    match = _SIZE.match(str(text))
    if not match:
        raise ValueError(f"not a rate: {text!r} (try 40MB or 10MiB)")
    number, unit = match.groups()
    return float(number) * _UNITS[(unit or "").lower()]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The link-shaping flags, for every command line that starts a simulator."""
    parser.add_argument("--rate", type=parse_rate, metavar="BYTES/S",
                        help="cap each response body at this rate, e.g. 40MB or 10MiB (default: unlimited)")
    parser.add_argument("--delay", type=float, default=0.0, metavar="SECONDS",
                        help="wait this long before every reply, e.g. 0.03 (default 0)")
    parser.add_argument("--delay-ms", type=float, metavar="MS",
                        help="the same in milliseconds, e.g. 50 (a Hub 50 ms away); wins over --delay")
    parser.add_argument("--max-in-flight", type=int, metavar="N",
                        help="refuse requests beyond N served at once on an origin (default: no limit)")
    parser.add_argument("--refuse-status", type=int, default=503, choices=(429, 503),
                        help="how those are refused (default 503; 429 sends Retry-After)")


def from_arguments(args) -> Link:
    delay = args.delay_ms / 1000 if getattr(args, "delay_ms", None) is not None else args.delay
    return Link(rate=args.rate, delay=delay, max_in_flight=args.max_in_flight,
                refuse_status=args.refuse_status)
