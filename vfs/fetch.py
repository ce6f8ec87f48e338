"""Ranged HTTP reads of one file's bytes: resolve, retries, backoff, timeouts, checks.

Blocking: callers run it in worker threads, which share one connection pool
(`connections.Pool`), so a connection opened by one thread (the resolve on open, or the
connection made ahead to the CDN) serves the next request of any other. Bytes are
received straight into the caller's buffer (`read_range_into`).

Every ranged answer is checked before a byte of it is used: status 206, the exact
Content-Range asked for, and exactly the length asked for. A server that ignores Range
(200 + whole body: some mirrors and proxies) is remembered as such for
IGNORES_RANGE_MEMORY seconds, and the read raises RangeIgnored: the block cache then reads
the blob in one pass (`open_whole_body`), never one range at a time, which would send the
file's prefix again for every block. The whole body that answered is not thrown away: it
is parked for a few seconds and is what `open_whole_body` hands out first (or what a
plain `read_range` near the start of the file skips through). A connection that dies mid-body resumes after the last byte kept: a clean close at
the exact byte, a reset or timeout at the start of the read call it broke (bytes that
call was receiving are asked for again). The token goes only to the Hub's own origin,
never to the CDN a redirect points to.

The CDN URL a resolve yields is signed for a limited time. It is resolved again a little
before the expiry it carries (signedurl.py), and whenever the CDN refuses it (401/403): a
URL that has expired, or that was signed for another range, is asked for again at once,
within the read's deadline. A URL the Hub signed moments ago that the CDN still refuses
is an error (EACCES), not a loop. The resolve is asked without a Range header, so the URL
is good for every range of the file (a resolve asked with Range may be signed for that
range alone).

Every request takes a slot from the concurrency controller (concurrency.py) for the
origin it goes to, so that at most `max_in_flight` are in flight per origin, and reports
how it ended (bytes and time, 429/503 and their hints, timeouts) so the controller learns
how many are worth having. A range bigger than a part is fetched as parts side by side
(parts.py), sized to the rate the origin's requests reach. A 429 or 503 is waited out as
the server asks and tried again within the read's deadline, without counting against
`max_retries`: a rate-limited origin slows reads down, it does not fail them.

The token is the one of the moment (tokens.py: a rotated token file is used by the next
request). When the Hub refuses it (401/403), requests for that token and repository fail
at once for a wait that doubles with each refusal (1 s up to 30 s), so many readers of a
repository the token cannot read never become a storm of refused requests; a new token
is tried at once.

A read that failed (retries exhausted, or refused) makes reads in the same block of the
same file fail at once, with the same error object, for RECENT_FAILURE seconds (the block
is the cache's: its size comes from the cache directory, not from the settings): the
kernel asks again for the first page right after a failed read-ahead, and a reader must
not wait out the deadline twice, nor see one failure logged twice because a block fetch
and a small first-touch read of that block failed side by side.
"""

import contextlib
import logging
import math
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from http.client import HTTPResponse
from typing import NoReturn

from . import concurrency, connections, errors, parts, signedurl, tls, tokens
from .connections import TRANSPORT_ERRORS, Origin, origin
from .logs import where
from .metrics import STATS
from .retry import RETRY_STATUSES, Attempts, Retryable, server_hint
from .settings import Settings, token_source

log = logging.getLogger(__name__)

MAX_REDIRECTS = 5
CHUNK = 1024 * 1024
IGNORES_RANGE_MEMORY = 600.0    # seconds an origin seen ignoring Range is treated so
MAX_SKIP = 16 * 1024 * 1024     # a first-touch read skips at most this much of a whole body
PARKED_SECONDS = 10.0           # a whole body received for a ranged read waits this long to be used
RECENT_FAILURE = 2.0            # seconds a failed block's reads fail at once with the same error
REDIRECTS = (301, 302, 303, 307, 308)
THROTTLED = frozenset({429, 503})

FailureKey = tuple[str, int]      # (url, block index of the cache)


class _Retry(Exception):
    """One attempt failed in a way worth another try; `wait` is the server's hint."""

    def __init__(self, reason: str, wait: float | None = None, status: int | None = None, timed_out: bool = False):
        super().__init__(reason)
        self.wait, self.status, self.timed_out = wait, status, timed_out
        self.got = 0                            # bytes the failed attempt received first
        self.fresh_refusal: int | None = None   # the CDN's status refusing a URL signed this attempt

    @property
    def throttled(self) -> bool:
        """The origin asked us to slow down (not a failure of this request's own)."""
        return self.status in THROTTLED

    @property
    def retryable(self) -> Retryable:
        # Being asked to slow down is not held against max_retries: it slows reads, it does not fail them.
        return Retryable(hint=self.wait, counted=not self.throttled)


@dataclass(frozen=True)
class _Target:
    """Where a file's bytes come from after the Hub's redirects, and until when to trust it."""

    url: str
    resolved_at: float          # time.monotonic() when the Hub gave it
    refresh_at: float = math.inf  # time.monotonic() after which it is resolved again

    @classmethod
    def received(cls, url: str) -> "_Target":
        now = time.monotonic()
        return cls(url, now, now + signedurl.refresh_after(url, time.time()))

    def fresh(self, now: float) -> bool:
        return now < self.refresh_at


class RangeFetcher:
    def __init__(self, settings: Settings, block_size: int):
        """`block_size`: the cache directory's (CacheDir.block_size), the span a failure is remembered for."""
        self.settings = settings
        self.block_size = block_size
        # Idle connections for every request that may be in flight, plus first-touch reads:
        # each part reuses one (keep-alive), none pays a new handshake.
        self.pool = connections.Pool(settings.connect_timeout, settings.read_timeout, dict(settings.proxies),
                                     max_idle=settings.max_in_flight + 4, ca_bundle=settings.ca_bundle)
        self.link = concurrency.Controller(settings.max_in_flight)
        self._parts = parts.PartReader(2 * settings.max_in_flight)
        self._range_ignored: dict[Origin, float] = {}   # origin -> when it last answered a Range with 200
        self._parked: dict[str, tuple[WholeBody, float]] = {}   # url -> (a whole body a ranged read got, kept until)
        self._targets: dict[str, _Target] = {}          # resolve URL -> where the bytes come from (after redirects)
        self._resolving: dict[str, threading.Event] = {}    # resolve URL -> set when the resolve under way ends
        self._failures: dict[FailureKey, tuple[float, errors.LaminaError]] = {}     # -> (when, error), recent ones
        self._lock = threading.Lock()
        self.tokens = token_source(settings)
        self.refusals = tokens.RefusalBackoff()

    def _headers_for(self, url: str, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        """The headers of a request to `url`: the token of the moment, to the Hub's own origin only.

        AccessDenied at once, without a request, while the Hub's last refusal of that token for
        this repository is being backed off."""
        headers = dict(extra or {})
        if origin(url) != origin(self.settings.endpoint):
            return headers
        token = self.tokens.current()
        refusal = self.refusals.refusal(token, _repo_of(url))
        if refusal is not None:
            raise refusal.with_traceback(None)
        if token:
            headers["Authorization"] = f"Bearer {token}"
        return headers

    def _hub_answered(self, url: str, headers: Mapping[str, str], response: HTTPResponse) -> None:
        """Keep the refusal backoff of the token `headers` carried to the Hub up to date; raise
        the Hub's refusal (401/403) here, so the backoff holds the very error readers get."""
        if origin(url) != origin(self.settings.endpoint):
            return
        sent = headers.get("Authorization", "").removeprefix("Bearer ") or None
        if response.status in (401, 403):
            refusal = _hub_refusal(response)
            self.refusals.refused(sent, _repo_of(url), refusal)
            raise refusal
        if response.status < 400:
            self.refusals.accepted(sent, _repo_of(url))

    def read_range(self, url: str, start: int, length: int, what: str = "", skip_whole: bool = True) -> bytearray:
        """Exactly `length` bytes of `url` from `start`, or a LaminaError within the deadline.

        From a server that ignores Range, the whole body that answered is read up to
        `start` (at most MAX_SKIP bytes) when `skip_whole`; else RangeIgnored is raised."""
        # Small reads (a first touch: a reader waits for exactly these bytes) come here, and
        # go before queued read-ahead; a block is received into its own buffer through
        # read_range_into.
        return received(length, lambda view: self._read_first_touch(url, start, view, what, skip_whole))

    def _read_first_touch(self, url: str, start: int, view: memoryview, what: str, skip_whole: bool) -> None:
        try:
            self.read_range_into(url, start, view, what, urgent=True)
        except errors.RangeIgnored:
            body = self._claim(url) if skip_whole and start <= MAX_SKIP else None
            if body is None:
                raise
            try:
                body.discard(start - body.position)
                body.readinto(view)
            finally:
                body.close()

    def read_range_into(self, url: str, start: int, view: memoryview, what: str = "", urgent: bool = False) -> None:
        """Fill the writable buffer `view` with the bytes of `url` from `start`, exactly, or raise
        a LaminaError within the deadline (then `view` holds a part of them, or nothing)."""
        view = memoryview(view).cast("B")
        if not view.nbytes:
            return
        key = (url, start // self.block_size)
        with self._lock:
            recent = self._recent_failure(key, time.monotonic())
        if recent is not None:
            raise recent.with_traceback(None)
        deadline = time.monotonic() + self.settings.read_deadline
        try:
            self._parts.read(start, view, self._part_size(url),
                             lambda part, part_view: self._read_with_retries(url, part, part_view, what, deadline, urgent))
        except errors.RangeIgnored:
            raise                   # not a failure: the caller reads the blob in one pass
        except errors.LaminaError as exc:
            raise self._remember_failure(key, exc).with_traceback(None) from None

    def ignores_range(self, url: str) -> bool:
        """Whether the server of `url`'s bytes was seen answering Range with the whole body lately."""
        with self._lock:
            target = self._targets.get(url)
        return target is not None and self._range_ignored_at(target)

    def _range_ignored_at(self, target: _Target) -> bool:
        with self._lock:
            seen = self._range_ignored.get(origin(target.url))
        return seen is not None and time.monotonic() - seen < IGNORES_RANGE_MEMORY

    def open_whole_body(self, url: str, size: int, start: int, what: str = "") -> "WholeBody":
        """The bytes of `url` from `start` (or from 0) to its end, to be read in order (WholeBody).

        Asked with an open-ended Range: a server that honours it after all sends only what is
        wanted (and is no longer taken for one that ignores Range); one that ignores it sends
        the whole body, and the WholeBody's `position` is 0."""
        parked = self._claim(url)
        if parked is not None:
            return parked
        attempts = Attempts.within(self.settings.max_retries, self.settings.read_deadline)
        while True:
            try:
                return self._open_whole_body(url, size, start, attempts.deadline)
            except _Retry as problem:
                self._wait_or_give_up(problem, attempts, what, start)

    def _open_whole_body(self, url: str, size: int, start: int, deadline: float) -> "WholeBody":
        target = self.resolve(url)
        key = origin(target.url)
        slot = self.link.slot(key, url, deadline)
        exchange = self.pool.request("GET", target.url, self._headers_for(target.url, {"Range": f"bytes={start}-"}))
        try:
            response = exchange.__enter__()
        except TRANSPORT_ERRORS as exc:
            slot.failed(timed_out=isinstance(exc, TimeoutError))
            raise _Retry(f"request failed: {type(exc).__name__}") from None
        except BaseException:
            slot.failed()
            raise
        try:
            position = self._check_whole_body(url, target, response, size, start)
            slot.answered()
            return WholeBody(exchange, response, slot, position)
        except BaseException as exc:
            # The connection goes (its body is unread); the slot says how the request ended.
            if isinstance(exc, _Retry):
                _report(slot, exc)
            slot.failed()
            exchange.__exit__(*sys.exc_info())
            raise

    def _check_whole_body(self, url: str, target: _Target, response: HTTPResponse, size: int, start: int) -> int:
        """Where this answer's body begins in the file: `start`, or 0 for a whole body."""
        length = response.headers.get("content-length")
        if response.status == 206:
            with self._lock:
                self._range_ignored.pop(origin(target.url), None)
            _check_partial(response, start, size - 1)
            return start
        if response.status == 200:
            self._note_range_ignored(target)
            if length is not None and length.strip() != str(size):
                raise errors.FetchError(f"whole body of {length} bytes, the file has {size}")
            return 0
        self._check_response(url, target, response, start, size - 1, time.monotonic())
        raise errors.FetchError(f"unexpected HTTP {response.status}")

    def _unless_range_ignored(self, url: str, target: _Target) -> None:
        if self._range_ignored_at(target):
            # Asking would only fetch the whole file again to use a slice of it.
            raise errors.RangeIgnored(f"{_safe(url)} ignores Range")

    def _park(self, url: str, body: "WholeBody") -> None:
        """Keep a whole body a ranged read received, for `open_whole_body` (a few seconds at most)."""
        with self._lock:
            older = self._parked.pop(url, None)
            self._parked[url] = (body, time.monotonic() + PARKED_SECONDS)
        if older is not None:
            older[0].close()

    def _claim(self, url: str) -> "WholeBody | None":
        """The body parked for `url`, if any; parked bodies nobody claimed in time are closed."""
        now = time.monotonic()
        with self._lock:
            found = self._parked.pop(url, None)
            stale = [self._parked.pop(key)[0] for key, (_, until) in list(self._parked.items()) if until < now]
        for body in stale:
            body.close()
        return found[0] if found is not None else None

    def _note_range_ignored(self, target: _Target) -> None:
        with self._lock:
            first = origin(target.url) not in self._range_ignored
            self._range_ignored[origin(target.url)] = time.monotonic()
        if first:
            log.warning("%s ignored the Range header; its files are read in one pass from now on",
                        _safe(target.url))

    def close(self) -> None:
        """Let the part threads go and close idle connections (at unmount)."""
        with self._lock:
            parked, self._parked = self._parked, {}
        for body, _ in parked.values():
            body.close()
        self._parts.close()
        self.pool.close()

    def request_budget(self, url: str) -> tuple[int, int]:
        """(part size, requests) for a read-ahead of `url`: its parts' size and its fair share of
        the requests its origin may have in flight (see readahead.py)."""
        with self._lock:
            target = self._targets.get(url)
        if target is None:              # not resolved yet: a first guess, learnt on the first answers
            return parts.part_size(0.0, self.settings.part_size), concurrency.INITIAL_LIMIT
        return self._part_size(url), self.link.share(origin(target.url), url)

    def _part_size(self, url: str) -> int:
        """Parts as big as the rate the origin's requests reach allows (see parts.py)."""
        with self._lock:
            target = self._targets.get(url)
        rate = self.link.limit(origin(target.url)).best_per_request if target is not None else 0.0
        return parts.part_size(rate, self.settings.part_size)

    def prepare(self, url: str) -> None:
        """Resolve `url` and open a connection to where its bytes come from, ahead of a first read."""
        self._connect_ahead(self.resolve(url).url)

    def connect_to_hub(self) -> None:
        """Open a connection to the Hub ahead of the first file's resolve (at mount time)."""
        self._connect_ahead(self.settings.endpoint)

    def _connect_ahead(self, url: str) -> None:
        try:
            self.pool.connect_ahead(url)
        except (errors.LaminaError, *TRANSPORT_ERRORS) as exc:
            # A read meets the same problem, retries it and says so.
            log.debug("connecting ahead to %s failed: %s", _safe(url), type(exc).__name__)

    def _recent_failure(self, key: FailureKey, now: float) -> errors.LaminaError | None:
        when, error = self._failures.get(key, (0.0, None))
        return error if now - when < RECENT_FAILURE else None

    def _remember_failure(self, key: FailureKey, error: errors.LaminaError) -> errors.LaminaError:
        """The error to raise: one already remembered for `key` (a concurrent read's), or this one."""
        now = time.monotonic()
        with self._lock:
            earlier = self._recent_failure(key, now)
            if earlier is not None:
                return earlier
            for old in [k for k, (when, _) in self._failures.items() if now - when >= RECENT_FAILURE]:
                del self._failures[old]
            self._failures[key] = (now, error)
        return error

    def _read_with_retries(self, url: str, start: int, view: memoryview, what: str, deadline: float,
                           urgent: bool = False) -> None:
        attempts = Attempts(self.settings.max_retries, deadline)
        got, last, fresh_refused = 0, None, False
        while True:
            try:
                self._read_into(url, start + got, view[got:], deadline, urgent)
                return
            except _Retry as problem:
                got += problem.got
                last = str(problem)
                # One fresh URL refused can be a URL signed for a moment that ran out on the
                # way (a loaded host, a tiny lifetime); two in a row is the CDN saying no.
                if problem.fresh_refusal and fresh_refused:
                    raise errors.AccessDenied(f"the CDN refused (HTTP {problem.fresh_refusal}) two URLs "
                                              "the Hub had just signed for this file") from None
                fresh_refused = bool(problem.fresh_refusal)
                self._wait_or_give_up(problem, attempts, what, start + got)
            except concurrency.NoSlot as exc:
                # The origin's pause (Retry-After) outlasted the deadline: say why it paused.
                cause = f"{last} (gave up after {attempts.failed} tries)" if last else str(exc)
                raise errors.FetchError(f"{what}: offset {start + got}: {cause}") from None

    def _wait_or_give_up(self, problem: _Retry, attempts: Attempts, what: str, offset: int) -> None:
        wait = attempts.wait_after(problem.retryable)
        if wait is None:
            raise errors.FetchError(f"{what}: offset {offset}: {problem} (gave up after {attempts.failed} tries)")
        log.info("%s: offset %d: %s; retry in %.2fs", what, offset, problem, wait, extra=where(what, offset))
        STATS.fetch_retried()
        time.sleep(wait)

    def _read_into(self, url: str, start: int, view: memoryview, deadline: float, urgent: bool = False) -> int:
        """One attempt: fill `view` from `start`; on failure raise _Retry carrying bytes got."""
        asked_at = time.monotonic()
        target = self.resolve(url)
        self._unless_range_ignored(url, target)
        with self.link.slot(origin(target.url), url, deadline, urgent) as slot, contextlib.ExitStack() as exchange:
            # Again, now that a slot is ours: while this waited, a signed URL may have come
            # due for renewal, or the origin may have shown it ignores Range.
            if not target.fresh(time.monotonic()):
                asked_at = time.monotonic()
                target = self.resolve(url)
            self._unless_range_ignored(url, target)
            end = start + len(view) - 1
            headers = self._headers_for(target.url, {"Range": f"bytes={start}-{end}"})
            try:
                response = exchange.enter_context(self.pool.request("GET", target.url, headers))
                try:
                    self._hub_answered(target.url, headers, response)
                    skip = self._check_response(url, target, response, start, end, asked_at)
                except errors.RangeIgnored:
                    # The whole file is on its way: keep it for the one-pass read to come.
                    slot.answered()
                    self._park(url, WholeBody(exchange.pop_all(), response, slot.keep(), 0))
                    raise
                slot.answered()
                got = self._read_body(response, view, skip)
                slot.finished(got, response.headers)
                return got
            except TRANSPORT_ERRORS as exc:
                # Only the request and the answer's head get here: _read_body turns its own.
                slot.failed(timed_out=isinstance(exc, TimeoutError))
                raise _transport_failure(target.url, exc) from None
            except _Retry as problem:
                _report(slot, problem)
                raise

    def _check_response(self, url: str, target: _Target, response: HTTPResponse, start: int, end: int,
                        asked_at: float) -> int:
        """Bytes to skip before the asked range begins (0 unless the server ignored Range)."""
        status = response.status
        if status == 206:
            _check_partial(response, start, end)
            return 0
        if status == 200:
            self._note_range_ignored(target)
            raise errors.RangeIgnored(f"{_safe(url)} answered a Range request with the whole body")
        if status in REDIRECTS and "location" in response.headers:
            # The CDN moved the bytes on: ask there next time (never with the token).
            self._replace_target(url, target, _Target.received(urllib.parse.urljoin(target.url, response.headers["location"])))
            raise _Retry(f"the CDN redirected (HTTP {status})")
        if status in (401, 403) and origin(target.url) != origin(self.settings.endpoint):
            self._cdn_refused(url, target, status, asked_at)
        self._raise_for_status(url, response)

    def _cdn_refused(self, url: str, target: _Target, status: int, asked_at: float) -> NoReturn:
        """The CDN refused its signed URL: resolve again now. A URL the Hub signed during this
        very attempt is marked, so the read gives up (EACCES) when a second one is refused."""
        self._replace_target(url, target, None)
        if target.resolved_at >= asked_at:
            problem = _Retry(f"the CDN refused (HTTP {status}) a URL the Hub had just signed", wait=0.0)
            problem.fresh_refusal = status
            raise problem
        raise _Retry(f"the CDN refused its signed URL (HTTP {status}: expired, or signed for another range); "
                     "resolving it again", wait=0.0)

    def _replace_target(self, url: str, old: _Target, new: _Target | None) -> None:
        """Swap `url`'s target for `new` (None: forget it), unless another thread already did."""
        with self._lock:
            if self._targets.get(url) is old:
                if new is None:
                    del self._targets[url]
                else:
                    self._targets[url] = new

    def _raise_for_status(self, url: str, response: HTTPResponse) -> NoReturn:
        status = response.status
        if status in (401, 403):
            raise _hub_refusal(response)
        if status == 404:
            raise errors.EntryNotFound("the file is gone from the Hub (HTTP 404)")
        if status == 416:
            raise errors.FetchError("range not satisfiable: the Hub's file is shorter than its listing")
        if status in RETRY_STATUSES:
            raise _Retry(f"HTTP {status}", server_hint(response.headers), status=status)
        raise errors.FetchError(f"unexpected HTTP {status}")

    def _read_body(self, response: HTTPResponse, view: memoryview, skip: int) -> int:
        got = 0
        try:
            _discard(response, skip)
            STATS.fetch_received(skip)
            while got < len(view):
                # Bounded reads: when the connection breaks, the bytes already in are counted
                # and the retry resumes at the exact byte, not at the attempt's first one.
                n = response.readinto(view[got:got + CHUNK])
                if not n:
                    break
                got += n
        except TRANSPORT_ERRORS as exc:
            # No local name for the _Retry: exception -> traceback -> this frame -> it would
            # be a cycle, keeping the caller's buffer exported until the next gc.
            raise _with_progress(_Retry(f"connection broke mid-body: {type(exc).__name__}",
                                        timed_out=isinstance(exc, TimeoutError)), got) from None
        finally:
            STATS.fetch_received(got)
        if got < len(view):
            raise _with_progress(_Retry(f"short body ({got} of {len(view)} bytes)"), got)
        return got

    def resolve(self, url: str) -> _Target:
        """Where the bytes of `url` come from: follows the Hub's redirects, remembers the
        target until it is due to be asked for again (its signature's expiry) or refused.

        One resolve per URL at a time: a first read arriving while the resolve begun on
        open is under way waits for it, in its own thread, rather than sending another.
        """
        with self._lock:
            known = self._fresh_target(url)
            if known is not None:
                return known
            underway = self._resolving.get(url)
            if underway is None:
                self._resolving[url] = threading.Event()
        if underway is not None:
            underway.wait(self.settings.connect_timeout + self.settings.read_timeout)
            with self._lock:
                known = self._fresh_target(url)
            # None: that one failed, and this read tries for itself.
            return known if known is not None else _Target.received(self._follow_redirects(url))
        try:
            target = _Target.received(self._follow_redirects(url))
            with self._lock:
                self._targets[url] = target
            return target
        finally:
            with self._lock:
                self._resolving.pop(url).set()

    def _fresh_target(self, url: str) -> _Target | None:
        target = self._targets.get(url)
        return target if target is not None and target.fresh(time.monotonic()) else None

    def _follow_redirects(self, url: str) -> str:
        """Follow the Hub's redirects; each hop and the Hub's own answer must look like the Hub's."""
        current, seen = url, {url}
        for _ in range(MAX_REDIRECTS + 1):
            response = self._head(current)
            if response.status in REDIRECTS and "location" in response.headers:
                following = urllib.parse.urljoin(current, response.headers["location"])
                if following in seen:
                    raise errors.FetchError(f"redirect loop: {_safe(current)} redirects back to {_safe(following)}")
                _require_hub_headers(response, "redirect")
                if origin(following) != origin(current):
                    # The Hub has answered; the CDN is checked by the ranged GET itself
                    # (206 + Content-Range), so a HEAD there would only cost a round trip.
                    return following
                current = following
                seen.add(current)
                continue
            if response.status == 200:
                if current == url:
                    _require_hub_headers(response, "answer")
                return current
            self._raise_for_status(url, response)
        raise errors.FetchError(f"too many redirects (more than {MAX_REDIRECTS}): a redirect loop")

    def _head(self, url: str) -> HTTPResponse:
        """The answer to a HEAD of `url` (status and headers; its connection is back in the pool)."""
        deadline = time.monotonic() + self.settings.connect_timeout + self.settings.read_timeout
        headers = self._headers_for(url)
        with self.link.slot(origin(url), url, deadline, urgent=True) as slot:
            try:
                with self.pool.request("HEAD", url, headers) as response:
                    if response.status in THROTTLED:
                        slot.refused(server_hint(response.headers))
                    else:
                        slot.finished(0, response.headers)
                    self._hub_answered(url, headers, response)
                    return response
            except TRANSPORT_ERRORS as exc:
                slot.failed(timed_out=isinstance(exc, TimeoutError))
                raise _transport_failure(url, exc) from None


def received(length: int, fill: Callable[[memoryview], object]) -> bytearray:
    """A new buffer of `length` bytes filled by `fill(view)`: the bytes-returning form of a
    call that fills a caller's buffer (a source's `fetch` from its `fetch_into`)."""
    buffer = bytearray(length)
    fill(memoryview(buffer))
    return buffer


def _hub_refusal(response: HTTPResponse) -> errors.AccessDenied:
    gated = response.headers.get("x-error-code") == "GatedRepo"
    hint = "the repository is gated: accept its terms on the Hub and set HF_TOKEN" if gated else "check HF_TOKEN"
    return errors.AccessDenied(f"the Hub refused access (HTTP {response.status}); {hint}")


def _transport_failure(url: str, exc: BaseException) -> errors.LaminaError | _Retry:
    """What a failed request becomes: a refused TLS certificate is final (another try meets the
    same certificate) and says so; anything else is worth another try."""
    refusal = tls.refused_certificate(exc)
    if refusal is not None:
        return errors.FetchError(tls.describe(refusal, urllib.parse.urlsplit(url).netloc))
    return _Retry(f"request failed: {type(exc).__name__}")


def _repo_of(url: str) -> str:
    """The repository part of a Hub URL (`/org/name` of `/org/name/resolve/...`): refusals are per repository."""
    path = urllib.parse.urlsplit(url).path
    return path.split("/resolve/", 1)[0]


class WholeBody:
    """A body being read in order from `position` on (one GET), for a blob filled in one pass.

    It holds its request's concurrency slot and connection until `close`; reads are
    blocking (worker threads), one thread at a time."""

    def __init__(self, exchange: contextlib.AbstractContextManager, response: HTTPResponse, slot: concurrency.Slot,
                 position: int):
        self._exchange, self._response, self._slot = exchange, response, slot
        self.position = position
        self._received = 0

    def readinto(self, view: memoryview) -> None:
        """Fill `view` exactly with the next bytes, or raise FetchError."""
        view = memoryview(view).cast("B")
        got = 0
        try:
            while got < len(view):
                n = self._response.readinto(view[got:got + CHUNK])
                if not n:
                    break
                got += n
        except TRANSPORT_ERRORS as exc:
            raise errors.FetchError(f"connection broke at offset {self.position + got}: {type(exc).__name__}") from None
        finally:
            self.position += got
            self._received += got
            STATS.fetch_received(got)
        if got < len(view):
            raise errors.FetchError(f"body ended at offset {self.position}, before the file's end")

    def discard(self, count: int) -> None:
        if count <= 0:
            return
        scratch = memoryview(bytearray(min(count, CHUNK)))
        while count > 0:
            step = min(count, CHUNK)
            self.readinto(scratch[:step])
            count -= step

    def close(self) -> None:
        self._slot.finished(self._received)
        self._exchange.__exit__(None, None, None)


def _check_partial(response: HTTPResponse, start: int, end: int) -> None:
    expected = f"bytes {start}-{end}/"
    content_range = response.headers.get("content-range", "")
    if not content_range.startswith(expected):
        raise errors.FetchError(f"wrong Content-Range {content_range!r}, asked for bytes {start}-{end}")
    length = response.headers.get("content-length")
    if length is not None and length.strip() != str(end - start + 1):
        raise errors.FetchError(f"wrong Content-Length {length}, asked for {end - start + 1} bytes")


def _require_hub_headers(response: HTTPResponse, what: str) -> None:
    """A Hub answer names the commit and the content; without them it is not the Hub (a proxy?)."""
    if "x-repo-commit" not in response.headers:
        raise errors.FetchError(f"the Hub's {what} has no X-Repo-Commit header: not the Hub, or a proxy in the way")
    if not (response.headers.get("x-linked-etag") or response.headers.get("etag")):
        raise errors.FetchError(f"the Hub's {what} has no ETag: not the Hub, or a proxy in the way")


def _discard(response: HTTPResponse, count: int) -> None:
    while count > 0:
        chunk = response.read(min(count, CHUNK))
        if not chunk:
            raise _Retry("body ended before the asked offset")
        count -= len(chunk)


def _report(slot: concurrency.Slot, problem: _Retry) -> None:
    """Tell the controller how a failed attempt ended: throttled, timed out, or broken."""
    if problem.throttled:
        slot.refused(problem.wait)
    else:
        slot.failed(timed_out=problem.timed_out)


def _with_progress(problem: _Retry, got: int) -> _Retry:
    problem.got = got
    return problem


def _safe(url: str) -> str:
    """A URL fit for a log line: no query string (signed CDN URLs carry credentials there)."""
    parts = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))
