"""The one retry policy (vfs/retry.py) the Hub client and the fetcher share.

No FUSE, no network, no root: the waits are computed, not slept.
"""

import time

from vfs.retry import MAX_WAIT, Attempts, Retryable, server_hint

FAILURE = Retryable()


def waits_until_give_up(attempts, failure=FAILURE, limit=50):
    waits = []
    while (wait := attempts.wait_after(failure)) is not None and len(waits) < limit:
        waits.append(wait)
    return waits


def test_a_persistent_failure_backs_off_exponentially_then_gives_up_after_max_retries():
    attempts = Attempts.within(max_retries=5, seconds=60)
    assert waits_until_give_up(attempts) == [0.25, 0.5, 1.0, 2.0, 4.0]
    assert attempts.failed == 6                 # the first try and five retries


def test_no_wait_ends_past_the_deadline(monkeypatch):
    # The figure docs/RELIABILITY.md states for the tests' 3 s deadline: 0.25+0.5+1 s of
    # waits, then the 2 s wait would end past it: a persistent 503 gives up after 1.75 s.
    clock = [100.0]
    monkeypatch.setattr("vfs.retry.time.monotonic", lambda: clock[0])
    attempts = Attempts.within(max_retries=5, seconds=3)
    waits = []
    while (wait := attempts.wait_after(FAILURE)) is not None:
        waits.append(wait)
        clock[0] += wait                        # the caller sleeps it
    assert waits == [0.25, 0.5, 1.0] and sum(waits) == 1.75


def test_the_servers_hint_is_waited_as_asked_up_to_a_cap():
    attempts = Attempts.within(max_retries=5, seconds=600)
    assert attempts.wait_after(Retryable(hint=2.0)) == 2.0
    assert attempts.wait_after(Retryable(hint=500.0)) == MAX_WAIT
    assert server_hint({"retry-after": "7"}) == 7.0
    assert server_hint({"ratelimit": '"api";r=0;t=12'}) == 12.0
    assert server_hint({}) is None


def test_being_asked_to_slow_down_is_not_held_against_max_retries_but_the_deadline_holds():
    attempts = Attempts.within(max_retries=2, seconds=60)
    throttled = Retryable(hint=0.0, counted=False)
    assert waits_until_give_up(attempts, throttled, limit=20) == [0.0] * 20
    assert attempts.counted == 0
    late = Attempts(max_retries=2, deadline=time.monotonic() + 1.0)
    assert late.wait_after(Retryable(hint=5.0, counted=False)) is None


def test_a_kind_of_failure_can_allow_fewer_retries():
    # The Hub client: two quick retries ride out a network blip; then a mount starts
    # from its stored snapshots rather than wait out max_retries.
    attempts = Attempts.within(max_retries=5, seconds=60)
    assert waits_until_give_up(attempts, Retryable(at_most=2)) == [0.25, 0.5]
