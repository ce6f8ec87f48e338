"""The simulator's link shaping: a rate per response, a delay per reply, requests in flight."""

import concurrent.futures
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from conftest import eventually
from vfs.testing.hubsim import HubSimulator, SimulatorClient
from vfs.testing.link import Link, parse_rate

REPO_ROOT = Path(__file__).resolve().parents[1]
MIB = 1024 * 1024


@pytest.fixture
def payload():
    return os.urandom(MIB)


@pytest.fixture
def sim(payload):
    with HubSimulator() as simulator:
        simulator.add_repo("org/model", files={"model.safetensors": payload})
        yield simulator


def cdn_url(sim):
    answer = requests.head(f"{sim.endpoint}/org/model/resolve/main/model.safetensors", allow_redirects=False)
    return answer.headers["Location"]


def timed_get(url, byte_range=None):
    headers = {"Range": f"bytes={byte_range[0]}-{byte_range[1]}"} if byte_range else {}
    started = time.monotonic()
    answer = requests.get(url, headers=headers)
    return answer, time.monotonic() - started


def test_each_response_is_paced_to_the_rate_on_its_own(sim, payload):
    url = cdn_url(sim)
    sim.set_link(rate=4e6)
    answer, alone = timed_get(url)
    assert answer.content == payload
    assert 0.24 <= alone < 1.0          # 1 MiB at 4 MB/s: 0.26 s

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        started = time.monotonic()
        answers = list(pool.map(lambda part: timed_get(url, (part * MIB // 4, (part + 1) * MIB // 4 - 1)), range(4)))
        together = time.monotonic() - started
    assert b"".join(answer.content for answer, _ in answers) == payload
    # Four quarters side by side: each at the full rate, so a quarter of the time.
    assert together < alone * 0.6


def test_every_reply_waits_the_delay(sim):
    sim.set_link(delay=0.2)
    started = time.monotonic()
    answer = requests.head(f"{sim.endpoint}/org/model/resolve/main/model.safetensors", allow_redirects=False)
    assert answer.status_code == 302
    assert time.monotonic() - started >= 0.2
    sim.set_link(Link())
    started = time.monotonic()
    requests.head(f"{sim.endpoint}/org/model/resolve/main/model.safetensors", allow_redirects=False)
    assert time.monotonic() - started < 0.2


def test_the_most_requests_in_flight_is_counted_per_origin(sim):
    url = cdn_url(sim)
    sim.set_link(rate=2e6)          # each response lasts ~0.5 s, so five overlap
    with concurrent.futures.ThreadPoolExecutor(5) as pool:
        list(pool.map(lambda _: timed_get(url), range(5)))
    assert sim.most_in_flight("cdn") == 5
    assert eventually(lambda: sim.in_flight("cdn") == {"now": 0, "peak": 5})
    assert sim.most_in_flight("api") == 1           # the one resolve
    sim.reset_in_flight_peak()
    assert sim.most_in_flight("cdn") == 0


@pytest.mark.parametrize("status", [503, 429])
def test_requests_beyond_max_in_flight_are_refused(sim, status):
    url = cdn_url(sim)
    sim.set_link(rate=2e6, max_in_flight=2, refuse_status=status, retry_after=3)
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        answers = [answer for answer, _ in pool.map(lambda _: timed_get(url), range(4))]
    codes = sorted(answer.status_code for answer in answers)
    assert codes.count(200) >= 2 and set(codes) <= {200, status} and status in codes
    refused = next(answer for answer in answers if answer.status_code == status)
    assert refused.headers.get("Retry-After") == ("3" if status == 429 else None)
    assert sim.most_in_flight("cdn") >= 3           # the refused ones were in flight too, briefly
    assert any(record.fault == "max_in_flight" for record in sim.log)


def test_link_is_set_and_read_over_http_control(sim):
    client = SimulatorClient(sim.endpoint)
    assert client.set_link(rate=5e6, delay=0.01) == Link(rate=5e6, delay=0.01)
    assert sim.link == Link(rate=5e6, delay=0.01)
    requests.get(cdn_url(sim))
    assert client.most_in_flight("cdn") == 1
    assert eventually(lambda: client.in_flight("cdn")["now"] == 0)
    client.reset_in_flight_peak()
    assert client.in_flight("cdn") == {"now": 0, "peak": 0}


def test_rates_are_read_as_people_write_them():
    assert parse_rate("40MB") == 40e6
    assert parse_rate("10 MB/s") == 10e6
    assert parse_rate("8.7MiB") == pytest.approx(8.7 * MIB)
    assert parse_rate("1234") == 1234
    with pytest.raises(ValueError):
        parse_rate("fast")
    with pytest.raises(ValueError):
        Link(rate=0)


def test_command_line_shapes_the_link(tmp_path, payload):
    (tmp_path / "repo").mkdir()
    (tmp_path / "repo" / "model.safetensors").write_bytes(payload)
    process = subprocess.Popen(
        [sys.executable, "-m", "vfs.testing.hubsim", "--repo", f"org/model={tmp_path / 'repo'}",
         "--rate", "4MB", "--delay", "0.05", "--max-in-flight", "3", "--refuse-status", "429", "--ignore-range"],
        stdout=subprocess.PIPE, text=True, cwd=REPO_ROOT)
    try:
        endpoint = process.stdout.readline().split()[1]
        client = SimulatorClient(endpoint)
        assert client.link == Link(rate=4e6, delay=0.05, max_in_flight=3, refuse_status=429)
        answer = requests.get(f"{endpoint}/org/model/resolve/main/model.safetensors", headers={"Range": "bytes=0-9"})
        assert answer.status_code == 200 and answer.content == payload     # --ignore-range
        assert [fault["kind"] for fault in client.faults] == ["ignore_range"]
    finally:
        process.terminate()
        process.wait(10)
