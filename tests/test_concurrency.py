"""The concurrency controller, without FUSE or a network: a simulated link and real threads."""

import random
import threading
import time
from dataclasses import dataclass

import pytest

from vfs import errors
from vfs.concurrency import Controller, OriginLimit

MB = 1e6
MIB = 1024 * 1024


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


@dataclass
class Transfer:
    started: float
    wait: float         # the reply's delay still to come
    left: float         # body bytes still to come
    rate: float = float("inf")      # this response's own cap


def simulate(limit, clock, seconds, per_request, total=float("inf"), delay=0.08, part=2 * MIB, step=0.002,
             refuse_when=lambda in_flight: False, rate_jitter=0.0):
    """Run `limit` against a link: each response at most `per_request` B/s (less by up to
    `rate_jitter` of it, at random: a busy host's responses), all together at most
    `total`, each reply about `delay` late (jittered, as real replies are: without it every
    request would start, wait and end in lockstep); demand never runs out (a pull). Returns
    the bytes carried in the second half of the run per second, and the most requests that
    were in flight at once."""
    jitter = random.Random(7)
    active, carried, most = [], 0.0, 0
    while clock.now < seconds:
        limit.demand_exceeds_limit()
        while limit.may_start():
            limit.started()
            if refuse_when(limit.in_flight):
                limit.refused(1.0)
            else:
                active.append(Transfer(clock.now, delay * jitter.uniform(0.5, 1.5), part,
                                       per_request * jitter.uniform(1 - rate_jitter, 1)))
        most = max(most, len(active))
        sending = [t for t in active if t.wait <= 0]
        share = total / len(sending) if sending else 0.0
        for transfer in active:
            if transfer.wait > 0:
                transfer.wait -= step
            else:
                got = min(transfer.rate, share) * step
                transfer.left -= got
                if clock.now >= seconds / 2:
                    carried += got
        clock.now += step
        for transfer in [t for t in active if t.left <= 0]:
            active.remove(transfer)
            limit.finished(part, clock.now - transfer.started)
    return carried / (seconds / 2), most


def test_grows_to_fill_a_link_capped_per_response():
    clock = Clock()
    limit = OriginLimit(cap=32, clock=clock)
    rate, most = simulate(limit, clock, 12, per_request=10 * MB)
    per_request = 2 * MIB / (0.08 + 2 * MIB / (10 * MB))   # a part's bytes over its whole time
    assert limit.limit == 32 and most == 32
    assert rate >= 0.9 * 32 * per_request


def test_grows_to_fill_a_link_whose_responses_vary_in_rate():
    # On a busy host one response runs at 60% of the cap, the next at 100%: the fastest of
    # them is no yardstick for all (the mean of them then looks like a full link).
    clock = Clock()
    limit = OriginLimit(cap=32, clock=clock)
    rate, most = simulate(limit, clock, 12, per_request=40 * MB, delay=0.03, rate_jitter=0.4)
    assert limit.limit == 32 and most == 32
    per_request = 2 * MIB / (0.03 + 2 * MIB / (0.8 * 40 * MB))
    assert rate >= 0.8 * 32 * per_request


def test_reaches_the_cap_of_a_fast_link_within_a_few_round_trips():
    # A cold load of a few hundred MiB takes about a second on this link: a ramp of half
    # a second (8 -> 16 -> 32 in epochs of 0.2 s) cost a good part of it.
    clock = Clock()
    limit = OriginLimit(cap=32, clock=clock)
    reached = []
    finished = limit.finished

    def note(*args, **kwargs):
        finished(*args, **kwargs)
        if limit.limit >= 32 and not reached:
            reached.append(clock.now)

    limit.finished = note
    simulate(limit, clock, 2, per_request=40 * MB, delay=0.03)
    assert reached and reached[0] <= 0.3


def test_stops_growing_when_the_total_stops_growing():
    clock = Clock()
    limit = OriginLimit(cap=32, clock=clock)
    rate, most = simulate(limit, clock, 20, per_request=10 * MB, total=60 * MB)
    assert rate >= 0.9 * 60 * MB            # the link is full...
    assert limit.limit <= 16                # ...with far fewer than the cap: more would only queue


def test_never_exceeds_its_cap():
    clock = Clock()
    limit = OriginLimit(cap=5, initial=8, clock=clock)
    _, most = simulate(limit, clock, 5, per_request=10 * MB)
    assert most == 5 and limit.limit == 5 and limit.most_in_flight == 5


def test_backs_off_on_429_and_waits_out_retry_after():
    clock = Clock()
    limit = OriginLimit(cap=32, initial=16, clock=clock)
    limit.started()
    limit.refused(wait=2.0)
    assert limit.limit == 8
    assert not limit.may_start()                # nothing new before Retry-After has passed
    assert limit.wait_hint() == pytest.approx(2.0)
    clock.now = 1.9
    assert not limit.may_start()
    clock.now = 2.0
    assert limit.may_start()


def test_a_storm_of_refusals_halves_once_per_request_duration():
    clock = Clock()
    limit = OriginLimit(cap=32, initial=32, clock=clock)
    for _ in range(32):
        limit.started()
    for _ in range(32):
        limit.refused(wait=1.0)                 # every request in flight refused at once
    assert limit.limit == 16
    clock.now = 5.0
    limit.started()
    limit.refused(wait=1.0)                     # a later storm halves again
    assert limit.limit == 8


def test_503_halves_and_pauses_briefly_and_timeouts_halve():
    clock = Clock()
    limit = OriginLimit(cap=32, initial=16, clock=clock)
    limit.started()
    limit.refused()                             # 503, no hint
    assert limit.limit == 8 and not limit.may_start()
    clock.now = 0.6
    assert limit.may_start()
    limit.started()
    limit.failed(timed_out=True)
    assert limit.limit == 4
    clock.now = 2.0
    limit.started()
    limit.failed()                              # a reset connection: not congestion
    assert limit.limit == 4


def test_ratelimit_headers_are_honoured():
    clock = Clock()
    limit = OriginLimit(cap=32, initial=16, clock=clock)
    limit.started()
    limit.finished(MIB, 0.1, {"RateLimit": '"api";r=0;t=3'})
    assert not limit.may_start() and limit.wait_hint() == pytest.approx(3.0)
    clock.now = 3.0
    assert limit.may_start()
    limit.started()
    limit.finished(MIB, 0.1, {"ratelimit-remaining": "2", "ratelimit-reset": "10"})
    for _ in range(2):
        assert limit.may_start()
        limit.started()
    assert not limit.may_start()                # the quota is spent until its reset
    clock.now = 13.1
    assert limit.may_start()


def test_a_link_that_refuses_beyond_a_number_is_not_pushed_past_it():
    clock = Clock()
    limit = OriginLimit(cap=32, clock=clock)
    rate, _ = simulate(limit, clock, 20, per_request=10 * MB, refuse_when=lambda in_flight: in_flight > 12)
    assert limit.limit <= 16
    assert rate >= 0.6 * 12 * 2 * MIB / (0.08 + 2 * MIB / (10 * MB))


# ---------------------------------------------------------------------------
# The Controller, with real threads


def hold_slots(controller, origin, count, stream, seconds, seen, gate=None):
    """Threads that each take a slot, note it, and hold it `seconds` (after `gate` is set, if given)."""
    def work():
        with controller.slot(origin, stream, deadline=time.monotonic() + 30) as slot:
            with seen["lock"]:
                seen["now"] += 1
                seen["most"] = max(seen["most"], seen["now"])
                seen["order"].append(stream)
            if gate is not None:
                assert gate.wait(30)
            time.sleep(seconds)
            with seen["lock"]:
                seen["now"] -= 1
            slot.failed()           # no learning: the limit stays where the test set it
    return [threading.Thread(target=work) for _ in range(count)]


def new_seen():
    return {"lock": threading.Lock(), "now": 0, "most": 0, "order": []}


def run_all(threads):
    for thread in threads:
        thread.start()
        time.sleep(0.001)           # in this order
    for thread in threads:
        thread.join(30)


def test_threads_never_exceed_the_cap():
    controller = Controller(max_in_flight=3, initial=32)
    seen = new_seen()
    run_all(hold_slots(controller, "cdn", 40, "file", 0.01, seen))
    assert seen["most"] == 3
    assert controller.stats()["cdn"]["most"] == 3
    assert controller.stats()["cdn"]["in_flight"] == 0


def start_and_queue(controller, threads, waiting):
    """Start `threads` and return once `waiting` requests wait at the controller (however
    slowly a loaded host starts threads)."""
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 30
    while controller.stats().get("cdn", {}).get("waiting", 0) < waiting:
        assert time.monotonic() < deadline, "the threads never queued"
        time.sleep(0.001)


def test_several_readers_share_an_origin_fairly():
    controller = Controller(max_in_flight=1, initial=1)
    seen = new_seen()
    gate = threading.Event()        # the first request holds the slot until everyone queued
    # One reader queues 10 requests, then a second one 3: the second is served every other
    # time, not after the first reader's whole queue.
    first = hold_slots(controller, "cdn", 10, "first", 0.0, seen, gate)
    second = hold_slots(controller, "cdn", 3, "second", 0.0, seen, gate)
    start_and_queue(controller, first, 9)
    start_and_queue(controller, second, 12)
    gate.set()
    for thread in first + second:
        thread.join(30)
    order = seen["order"]
    assert len(order) == 13
    assert [i for i, stream in enumerate(order) if stream == "second"] == [1, 3, 5], order


def test_an_urgent_request_goes_before_queued_read_ahead():
    controller = Controller(max_in_flight=1, initial=1)
    seen = new_seen()
    gate = threading.Event()
    queued = hold_slots(controller, "cdn", 6, "ahead", 0.0, seen, gate)

    def urgent():
        with controller.slot("cdn", "reader", deadline=time.monotonic() + 30, urgent=True):
            with seen["lock"]:
                seen["order"].append("urgent")
    start_and_queue(controller, queued, 5)                          # one holds the slot, five wait
    reader = threading.Thread(target=urgent)
    start_and_queue(controller, [reader], 6)
    gate.set()
    for thread in [*queued, reader]:
        thread.join(30)
    assert seen["order"].index("urgent") == 1


def test_waiting_past_the_deadline_is_a_clear_error():
    controller = Controller(max_in_flight=1, initial=1)
    with controller.slot("cdn", "a"):
        started = time.monotonic()
        with pytest.raises(errors.FetchError, match="deadline"):
            with controller.slot("cdn", "b", deadline=time.monotonic() + 0.2):
                pass
        assert 0.18 <= time.monotonic() - started < 2
    with controller.slot("cdn", "b", deadline=time.monotonic() + 1):
        pass                                    # the withdrawn waiter left nothing behind


def test_retry_after_holds_new_requests_back_across_threads():
    controller = Controller(max_in_flight=4, initial=4)
    with controller.slot("cdn", "a") as slot:
        slot.refused(wait=0.5)
    started = time.monotonic()
    with controller.slot("cdn", "a", deadline=time.monotonic() + 5):
        pass
    assert time.monotonic() - started >= 0.45


def test_origins_have_budgets_of_their_own():
    controller = Controller(max_in_flight=1, initial=1)
    with controller.slot("cdn-a", "x"):
        with controller.slot("cdn-b", "x", deadline=time.monotonic() + 0.5):
            pass
