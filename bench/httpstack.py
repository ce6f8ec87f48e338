"""`python -m bench.httpstack`: the fetcher's ranged reads through connections.Pool (http.client by hand) against urllib3, side by side.

The question it answers: does the project's hand-written connection pool earn its
keep, or would urllib3 (the pool beneath requests: pooling, proxies, CONNECT, Retry)
do the fetcher's work as fast? Everything but the pool is the same code: one
`fetch.RangeFetcher` per run (a fresh pool: connections are opened cold), whose `pool`
is either `connections.Pool` or `Urllib3Pool` below (urllib3's PoolManager behind the
same three calls). The work is what the block cache asks of the fetcher on a cold
read: a big file read block by block (16 MiB) into page-aligned buffers with
`read_range_into`, `fetch_workers` blocks at a time, each block in parts side by side
(parts.py), through the Hub's redirect to its CDN.

Per link (loopback as it is, then a shaped link like a CDN's), the two pools run in
alternating order each round; the medians of MB/s and of the client's CPU seconds per
GiB (user + system, this process only: the simulator runs in its own) are compared as
ratios. CPU per GiB is the steadier figure on a shared machine. No root and no mount
are needed.

urllib3's `HTTPResponse.readinto` reads into a new bytes object and copies it into the
buffer; the third row (`urllib3, body read from its http.client response`) reads the
body through urllib3's private `_fp` to show what that copy costs.
"""

import argparse
import contextlib
import datetime
import mmap
import os
import queue
import resource
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from vfs import tls
from vfs.connections import USER_AGENT
from vfs.fetch import RangeFetcher
from vfs.metrics import STATS
from vfs.settings import DEFAULT_BLOCK_SIZE, Settings

from . import machine, report
from .data import MIB, big_file
from .machine import warm
from .server import HubProcess

GIB = 1024 * MIB
REPO = "bench/big"
LINKS = (("loopback", None, 0.0), ("40 MB/s per response, 30 ms per reply", 40e6, 0.03))
BEGIN, END = "<!-- http-stack:begin -->", "<!-- http-stack:end -->"


class Urllib3Pool:
    """connections.Pool's three calls (request, connect_ahead, close) over a urllib3 PoolManager."""

    def __init__(self, connect_timeout, read_timeout, max_idle, ca_bundle=None, raw_body=False):
        import urllib3      # the test extra's (requests'): `python -m bench` runs without it
        self.manager = urllib3.PoolManager(
            num_pools=16, maxsize=max_idle, block=False, retries=False,
            timeout=urllib3.Timeout(connect=connect_timeout, read=read_timeout),
            ssl_context=tls.client_context(ca_bundle), headers={"User-Agent": USER_AGENT, "Accept-Encoding": "identity"})
        self.raw_body = raw_body

    @contextlib.contextmanager
    def request(self, method, url, headers):
        asked = time.perf_counter()
        try:
            response = self.manager.request(method, url, headers=headers, preload_content=False,
                                            decode_content=False, redirect=False, retries=False)
        except BaseException:
            STATS.fetch_answered(method, "error")
            raise
        STATS.fetch_answered(method, str(response.status), time.perf_counter() - asked if method == "GET" else None)
        body = _RawBody(response) if self.raw_body else response
        try:
            yield body
        except BaseException:
            response.close()
            raise
        if method == "HEAD" or response.length_remaining == 0:
            response.release_conn()
        else:
            response.close()        # a body left unread: the connection cannot serve another request

    def connect_ahead(self, url):
        pass                        # urllib3 connects on a request's first use of a connection

    def close(self):
        self.manager.clear()


class _RawBody:
    """A urllib3 response whose body is read straight into the caller's buffer (its `_fp`)."""

    def __init__(self, response):
        self._response = response
        self.status, self.headers = response.status, response.headers

    def readinto(self, view):
        got = self._response._fp.readinto(view)
        if self._response.length_remaining is not None:
            self._response.length_remaining -= got
        return got

    def read(self, amount):
        return self._response.read(amount)


STACKS = {
    "connections.Pool (http.client by hand)": None,
    "urllib3 PoolManager": dict(raw_body=False),
    "urllib3, body read from its http.client response": dict(raw_body=True),
}


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m bench.httpstack", description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--loopback-mib", type=int, default=1024, help="bytes read per run on loopback")
    parser.add_argument("--link-mib", type=int, default=256, help="bytes read per run on the shaped link")
    parser.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "lamina-bench-httpstack"))
    parser.add_argument("--out", help="write the section of BENCHMARKS.md in this directory (e.g. docs)")
    return parser.parse_args(argv)


def fetcher_with(stack, settings):
    fetcher = RangeFetcher(settings, settings.block_size)
    options = STACKS[stack]
    if options is not None:
        fetcher.pool.close()
        fetcher.pool = Urllib3Pool(settings.connect_timeout, settings.read_timeout, settings.max_in_flight + 4,
                                   settings.ca_bundle, **options)
    return fetcher


def cold_read(fetcher, url, size, block, workers):
    """(MB/s, CPU seconds per GiB) of reading `size` bytes of `url` as the block cache does."""
    buffers = queue.Queue()
    for _ in range(workers):
        buffers.put(mmap.mmap(-1, block))         # page-aligned, as BlockMemory's are

    def one_block(start):
        buffer = buffers.get()
        try:
            length = min(block, size - start)
            fetcher.read_range_into(url, start, memoryview(buffer)[:length], "bench/big")
        finally:
            buffers.put(buffer)

    cpu_before, started = _cpu_seconds(), time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        for done in [pool.submit(one_block, start) for start in range(0, size, block)]:
            done.result()
    elapsed, cpu = time.perf_counter() - started, _cpu_seconds() - cpu_before
    return size / elapsed / 1e6, cpu / (size / GIB)


def _cpu_seconds():
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def measure_link(hub, settings, url, size, rounds):
    figures = {stack: ([], []) for stack in STACKS}
    for round_ in range(rounds):
        order = list(STACKS) if round_ % 2 == 0 else list(reversed(STACKS))
        for stack in order:
            fetcher = fetcher_with(stack, settings)
            try:
                rate, cpu = cold_read(fetcher, url, size, settings.block_size, settings.fetch_workers)
            finally:
                fetcher.close()
            figures[stack][0].append(rate)
            figures[stack][1].append(cpu)
            print(f"  round {round_ + 1}: {stack}: {rate:,.0f} MB/s, {cpu:.2f} CPU s/GiB", flush=True)
    return figures


def medians(figures):
    """stack -> (median MB/s, median CPU s/GiB)."""
    return {stack: (statistics.median(rates), statistics.median(cpus)) for stack, (rates, cpus) in figures.items()}


def table(results):
    baseline = next(iter(STACKS))
    lines = ["| link | stack | MB/s (median) | vs connections.Pool | client CPU s/GiB (median) | vs connections.Pool "
             "| CPU s/GiB, every round |",
             "| --- | --- | ---: | ---: | ---: | ---: | --- |"]
    for link, figures in results.items():
        middle = medians(figures)
        base_rate, base_cpu = middle[baseline]
        for stack, (rate, cpu) in middle.items():
            rounds = ", ".join(f"{value:.2f}" for value in figures[stack][1])
            lines.append(f"| {link} | {stack} | {rate:,.0f} | {rate / base_rate:.2f}x | {cpu:.2f} | "
                         f"{cpu / base_cpu:.2f}x | {rounds} |")
    return "\n".join(lines)


def reading(results):
    """What the figures say of urllib3 against connections.Pool, link by link, in words."""
    base, candidate = list(STACKS)[:2]
    said = []
    for link, figures in results.items():
        middle = medians(figures)
        cpu, rate = middle[candidate][1] / middle[base][1], middle[candidate][0] / middle[base][0]
        apart = min(figures[candidate][1]) > max(figures[base][1])
        said.append(f"{link}: {cpu:.2f}x the client CPU per GiB "
                    f"({'above connections.Pool in every round' if apart else 'the rounds overlap'}), "
                    f"{rate:.2f}x the throughput")
    return "; ".join(said)


def section(results, args, started):
    command = (f"python -m bench.httpstack --rounds {args.rounds} --loopback-mib {args.loopback_mib} "
               f"--link-mib {args.link_mib}")
    lines = [
        BEGIN, "## The HTTP stack: connections.Pool against urllib3", "",
        f"`{command}` ({started:%Y-%m-%d %H:%M} UTC; no root, no mount): the fetcher's cold read of a big file "
        "(16 MiB blocks into page-aligned buffers, 8 blocks at a time, each in parts side by side, through the "
        "Hub's redirect to its CDN) with the project's own pool (`connections.Pool`, http.client by hand) and "
        "with urllib3's `PoolManager` behind the same three calls, everything else the same code. Each round "
        "runs the stacks in alternating order against the simulator in its own process; medians of "
        f"{args.rounds} rounds. Taken on a loaded 2-core machine (other work ran beside it): the client's CPU "
        "seconds per GiB (this process, all threads) is the steadier figure; throughput on loopback is "
        "mostly the simulator's.", "",
        f"Machine: {machine.describe()}", "",
        table(results), "",
        f"Reading it, urllib3 against connections.Pool: {reading(results)}. Part of urllib3's cost is its "
        "`HTTPResponse.readinto`, which reads into a new bytes object and copies it into the buffer (the copy "
        "the fetcher exists to avoid: bodies go straight into the block's buffer); reading the body through "
        "urllib3's private `_fp` (third row) takes part of that back, and is not an API to build on. On a "
        "shared machine throughput moves with the load; the CPU a GiB costs the client is the figure that "
        "decides.", "",
        "Decision: `connections.Pool` stays the one HTTP stack, and the Hub's metadata calls (a revision's "
        "commit, a commit's tree) moved onto it from huggingface_hub's client, so proxies (CONNECT included) "
        "and TLS trust are one policy for metadata and bytes alike (docs/DESIGN.md).", "",
        "Rerun: `.venv/bin/python -m bench.httpstack --out docs` (add `--rounds`, `--loopback-mib`, `--link-mib`).",
        END]
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    started = datetime.datetime.now(datetime.timezone.utc)
    work = Path(args.work)
    big = big_file(work / "repo-big", max(args.loopback_mib, args.link_mib) * MIB)
    results = {}
    with HubProcess({REPO: big.parent}) as hub:
        settings = Settings(endpoint=hub.endpoint, cache_dir=work / "cache", block_size=DEFAULT_BLOCK_SIZE)
        url = hub.resolve_url(REPO, big.name)
        for name, rate, delay in LINKS:
            size = (args.loopback_mib if rate is None else args.link_mib) * MIB
            print(f"{name}: {size // MIB} MiB per run, {args.rounds} rounds", flush=True)
            hub.client.set_link(rate=rate, delay=delay)
            warm(big)
            results[name] = measure_link(hub, settings, url, size, args.rounds)
        hub.client.set_link()
    print()
    print(table(results))
    if args.out:
        report.write_section(Path(args.out) / "BENCHMARKS.md", section(results, args, started), BEGIN, END)
        print(f"wrote the HTTP stack section of {Path(args.out) / 'BENCHMARKS.md'}")


if __name__ == "__main__":
    main()
