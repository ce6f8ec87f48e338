"""Ranges fetched as parts side by side: exact bytes in any arrival order, caps, and the fetcher on a shaped link."""

import mmap
import os
import random
import threading
import time

import pytest

from vfs import errors
from vfs.fetch import RangeFetcher
from vfs.parts import ALIGN, MIN_PART, PartReader, part_size, split
from vfs.settings import Settings
from vfs.testing.hubsim import Fault, HubSimulator

MiB = 1024 * 1024


def test_parts_cover_the_range_exactly_and_evenly():
    for start, length, size in [(0, 16 * MiB, 2 * MiB), (777, 5 * MiB + 3, 2 * MiB), (5, 100, 2 * MiB),
                                (0, 16 * MiB, 3 * MiB), (0, 16 * MiB, 64 * MiB)]:
        parts = split(start, length, size)
        assert parts[0][0] == start and sum(n for _, n in parts) == length
        assert all(a + n == b for (a, n), (b, _) in zip(parts, parts[1:]))
        assert all(0 < n <= max(size, ALIGN) for _, n in parts)
        assert len(parts) == -(-length // size)
    assert split(0, 16 * MiB, 2 * MiB) == [(i * 2 * MiB, 2 * MiB) for i in range(8)]


def test_part_size_follows_the_rate_requests_reach():
    assert part_size(0) == MIN_PART                      # nothing measured yet
    assert part_size(10e6) == MIN_PART                   # 10 MB/s: 0.5 MB in 0.05 s, the minimum wins
    # A 40 MB/s link with 30 ms replies: 2 MiB parts reach 25 MB/s each, the delay included.
    # Parts stay the minimum, so a 16 MiB block is 8 of them (4 blocks ahead: 32 requests).
    assert part_size(2 * MiB / (0.03 + 2 * MiB / 40e6)) == MIN_PART
    assert part_size(1e9) >= 16 * MiB                    # loopback: a 16 MiB block stays one request
    assert part_size(40e6, min_part=1 * MiB) % ALIGN == 0


@pytest.fixture
def reader():
    reader = PartReader(8)
    yield reader
    reader.close()


def test_bytes_stay_exact_when_parts_arrive_out_of_order(reader):
    source = os.urandom(16 * MiB + 4321)
    order = []
    jitter = random.Random(3)
    delays = {}

    def read_part(start, view):
        time.sleep(delays.setdefault(start, jitter.uniform(0, 0.05)))
        view[:] = source[start:start + len(view)]
        order.append(start)

    buffer = bytearray(16 * MiB)
    reader.read(4321, memoryview(buffer), 2 * MiB, read_part)
    assert buffer == source[4321:]
    assert order != sorted(order)                        # they did land out of order
    assert len(order) == 8


def test_a_failed_part_is_raised_after_every_part_under_way_has_ended(reader):
    ended = []
    lock = threading.Lock()

    def read_part(start, view):
        if start == 2 * MiB:
            raise errors.FetchError("part failed")
        time.sleep(0.2)
        with lock:
            ended.append(start)

    started = time.monotonic()
    with pytest.raises(errors.FetchError, match="part failed"):
        reader.read(0, memoryview(bytearray(16 * MiB)), 2 * MiB, read_part)
    assert time.monotonic() - started >= 0.2            # waited for the parts under way
    snapshot = list(ended)
    time.sleep(0.3)
    assert ended == snapshot                             # nothing wrote after read() raised


def test_no_part_keeps_the_buffer_exported(reader):
    pages = mmap.mmap(-1, 8 * MiB)
    view = memoryview(pages)
    reader.read(0, view, 2 * MiB, lambda start, part: part.__setitem__(slice(None), bytes(len(part))))
    view.release()
    pages.close()                                        # BufferError if a thread still held a slice


# ---------------------------------------------------------------------------
# The fetcher, parts and the concurrency cap, against the simulator


@pytest.fixture
def hub():
    with HubSimulator() as simulator:
        yield simulator


@pytest.fixture
def content(hub):
    data = os.urandom(16 * MiB + 999)
    hub.add_repo("org/m", files={"big.bin": data})
    return data


def fetcher_for(hub, **overrides):
    values = dict(endpoint=hub.endpoint, read_timeout=5.0, read_deadline=30.0, part_size=2 * MiB)
    return RangeFetcher(settings := Settings(**{**values, **overrides}), settings.block_size)


URL = "{}/org/m/resolve/main/big.bin"


def test_a_block_is_fetched_as_parts_on_connections_kept_alive(hub, content):
    fetcher = fetcher_for(hub)
    try:
        buffer = bytearray(16 * MiB)
        fetcher.read_range_into(URL.format(hub.endpoint), 999, memoryview(buffer))
        assert buffer == content[999:]
        gets = [r for r in hub.log if r.origin == "cdn"]
        assert len(gets) == 8 and all(r.status == 206 for r in gets)
        # Again: the same connections, no new ones.
        accepted = hub.connections("cdn")
        fetcher.read_range_into(URL.format(hub.endpoint), 999, memoryview(buffer))
        assert hub.connections("cdn") == accepted
    finally:
        fetcher.close()


def test_parts_side_by_side_fill_a_link_capped_per_response(hub, content):
    hub.set_link(rate=20e6, delay=0.03)
    one = fetcher_for(hub, part_size=64 * MiB)
    many = fetcher_for(hub)
    try:
        started = time.monotonic()
        one.read_range_into(URL.format(hub.endpoint), 0, memoryview(bytearray(16 * MiB)))
        single = time.monotonic() - started
        started = time.monotonic()
        many.read_range_into(URL.format(hub.endpoint), 0, memoryview(bytearray(16 * MiB)))
        parted = time.monotonic() - started
    finally:
        one.close()
        many.close()
    print(f"16 MiB at 20 MB/s per response: one request {single:.2f} s, parts {parted:.2f} s")
    assert parted < single / 1.5              # 8 parts side by side; loaded machines blur it


def test_requests_in_flight_never_exceed_the_cap(hub, content):
    hub.set_link(rate=20e6)
    fetcher = fetcher_for(hub, max_in_flight=3)
    try:
        threads = [threading.Thread(target=fetcher.read_range_into,
                                    args=(URL.format(hub.endpoint), offset, memoryview(bytearray(4 * MiB))))
                   for offset in range(0, 16 * MiB, 4 * MiB)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert hub.most_in_flight("cdn") == 3
        assert fetcher.link.stats()[("http", "127.0.0.1", int(hub.cdn_endpoint.rsplit(":", 1)[1]))]["most"] == 3
    finally:
        fetcher.close()


def test_a_429_storm_slows_parts_down_and_fails_none(hub, content):
    # Every CDN GET of the first second is told to come back in a second.
    storm = hub.add_fault(Fault("rate_limit", origin="cdn", method="GET", times=12, seconds=1))
    fetcher = fetcher_for(hub, read_deadline=20.0, max_retries=2)
    try:
        buffer = bytearray(16 * MiB)
        started = time.monotonic()
        fetcher.read_range_into(URL.format(hub.endpoint), 999, memoryview(buffer))
        assert buffer == content[999:]
        assert storm.hits == 12 and time.monotonic() - started >= 1.0
    finally:
        fetcher.close()
