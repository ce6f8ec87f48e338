"""Cold reads over links shaped like a CDN's, against aria2c -x16 and one curl stream.

Loopback is not the Hub: there one HTTP stream runs as fast as the CPU. Each link here
caps every response at a rate and delays every reply (the simulator's link shaping), as
a CDN edge and the distance to it do. On each link, in one run, back to back:

- a cold sequential read of the big file through the mount, against aria2c -x16 (16
  connections) downloading it, and one curl stream (over its first CURL_MIB: at
  10 MB/s a whole GiB would take two minutes and say nothing more);
- a llama.cpp-style load (header reads, then mmap MAP_POPULATE) of the GGUF through a
  cold mount, against aria2c's download of it followed by the same load from local disk;
- four cold readers of four different files at once, three ways side by side: the
  default mount (at most 32 requests to the origin) against aria2c -x16 -j4 downloading
  the four (64 connections), the same mount against aria2c -x8 -j4 (32 connections: the
  same number of requests in flight), and a mount with `--max-in-flight 64` against
  aria2c -x16 -j4; and once more against aria2c -x8 -j4 writing into memory (tmpfs), since
  aria2c waits on its own writes and a slow disk makes it slower than the link (then only
  the row against memory says how well the mount fills the link). Each mount's slowest
  reader against its fastest, and how much of the four files it read back from its own
  disk (blocks fetched ahead and recycled before their reader got there: /metrics,
  lamina_read_bytes{source="cache_disk"}).

Each mount's most requests in flight at the simulator's CDN origin is recorded, and
their mean over the cold read (sampled every SAMPLE_SECONDS): how full the mount kept the
link (the daemon's peak RSS goes into the benchmark's memory row).
"""

import datetime
import os
import re
import shutil
import socket
import statistics
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

from . import probes, report
from .cases import MB, MIB, Row

LINKS = (("40 MB/s per response, 30 ms per reply", 40e6, 0.03),
         ("10 MB/s per response, 80 ms per reply", 10e6, 0.08))
CURL_MIB = 64
MEMORY_SCRATCH = Path("/dev/shm/lamina-bench-aria2c")   # tmpfs: aria2c's downloads without a disk under them
RAISED_CAP = 64                 # the four-reader row again with the cap raised to aria2c -x16 -j4's connections
SAMPLE_SECONDS = 0.05           # how often the requests in flight at the simulator are sampled
MARKERS = ("<!-- link-rows:begin -->", "<!-- link-rows:end -->")
RERUN = "sudo .venv/bin/python -m bench --only link --repeats {repeats} --out docs"
LOAD_AVERAGES: list[float] = []    # the machine's 1-minute load average as each link began, and at the end


def link_rows(bench):
    rows = []
    LOAD_AVERAGES[:] = []
    try:
        for name, rate, delay in LINKS:
            print(f"  link: {name}", flush=True)
            LOAD_AVERAGES.append(os.getloadavg()[0])
            bench.hub.client.set_link(rate=rate, delay=delay)
            rows += _one_link(bench, name)
    finally:
        bench.hub.client.set_link()         # the loopback rows are measured unshaped
        LOAD_AVERAGES.append(os.getloadavg()[0])
    return rows


def section(rows, machine, shape):
    """The shaped-link section of BENCHMARKS.md, markers included."""
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    loads = ", ".join(f"{load:.1f}" for load in LOAD_AVERAGES) or "not recorded"
    return f"""{MARKERS[0]}
## Cold reads over shaped links

Written by `{RERUN.format(repeats=shape['repeats'])}` ({when}; `make bench` writes it too). The simulator caps every
response at a rate and delays every reply, as a CDN edge and the distance to it do;
aria2c -x16 (for four readers also -x8, and the mount also with --max-in-flight 64) and one
curl stream read the same files from the same simulator, back to back in the same run: {shape['big_mib']} MiB file, {shape['gguf_mib']} MiB GGUF, four files of
{shape['four_mib']} MiB, {shape['repeats']} rounds, medians (the most-in-flight and spread rows:
the worst round). "Cold": a fresh block cache and a dropped page cache. The machine was
shared with other work while this ran (2 cores; load average {loads} as each link began
and at the end): read the ratios more than the figures.

Machine: {machine}

{report.table(rows)}
{MARKERS[1]}"""


def _one_link(bench, name):
    tag = name.split(",")[0]
    for _ in range(bench.repeats):
        _cold_read(bench, tag)
        _cold_load(bench, tag)
        _four_readers(bench, tag)
    return _rows(bench, name, tag)


def _rows(bench, name, tag):
    def med(key):
        return bench.median(f"{tag} {key}")

    read, aria, curl = med("mount") / MB, med("aria2c") / MB, med("curl") / MB
    load, aria_load = med("load mount"), med("load aria2c")
    four, aria_four = med("four mount") / MB, med("four aria2c") / MB
    aria_four_32 = med("four aria2c x8") / MB
    aria_four_memory = med("four aria2c x8 memory") / MB
    four_64 = med("four mount cap64") / MB
    spread = max(bench.samples[f"{tag} four spread"])
    spread_64 = max(bench.samples[f"{tag} four cap64 spread"])
    most = max(bench.samples[f"{tag} in flight"])
    most_64 = max(bench.samples[f"{tag} in flight cap64"])
    mean = med("mean in flight")
    rows = [
        Row(f"cold sequential read, {name}", read, "aria2c -x16", aria, "MB/s", ">= 0.9x", read >= 0.9 * aria),
        Row(f"cold sequential read, {name}", read, f"one curl stream (first {CURL_MIB} MiB)", curl, "MB/s",
            "-", None),
        Row(f"cold llama.cpp-style load (mmap MAP_POPULATE), {name}", load,
            "aria2c -x16 download, then the same load from local disk", aria_load, "s", "<= 1.0x",
            load <= aria_load, higher_is_better=False),
        Row(f"4 cold readers of different files, total, {name}", four, "aria2c -x16 -j4 of the four files",
            aria_four, "MB/s", ">= 0.9x", four >= 0.9 * aria_four),
        Row(f"4 cold readers of different files, total, {name}", four,
            "aria2c -x8 -j4 of the four files (32 connections, as many as the mount's cap)",
            aria_four_32, "MB/s", ">= 0.9x", four >= 0.9 * aria_four_32),
        Row(f"4 cold readers of different files, total, {name}", four,
            "aria2c -x8 -j4 of the four files into memory (tmpfs: the link alone, no disk under aria2c)",
            aria_four_memory, "MB/s", ">= 0.9x", four >= 0.9 * aria_four_memory),
        Row(f"4 cold readers of different files, total, mount with --max-in-flight {RAISED_CAP}, {name}", four_64,
            "aria2c -x16 -j4 of the four files", aria_four, "MB/s", ">= 0.9x", four_64 >= 0.9 * aria_four),
        Row(f"4 cold readers: slowest reader's time / fastest's (worst round), {name}", spread, "", None, "x",
            "<= 2x", spread <= 2.0, higher_is_better=False),
        Row(f"4 cold readers, --max-in-flight {RAISED_CAP}: slowest reader's time / fastest's (worst round), {name}",
            spread_64, "", None, "x", "<= 2x", spread_64 <= 2.0, higher_is_better=False),
        Row(f"4 cold readers: bytes read back from the cache's disk (median), {name}",
            med("four disk") / MIB, "", None, "MiB", "-", None),
        Row(f"most requests in flight at the CDN origin (any round), {name}", most, "", None, "requests",
            "<= 32", most <= 32, higher_is_better=False),
        Row(f"most requests in flight at the CDN origin, --max-in-flight {RAISED_CAP} (any round), {name}", most_64,
            "", None, "requests", f"<= {RAISED_CAP}", most_64 <= RAISED_CAP, higher_is_better=False),
        Row(f"mean requests in flight during the cold sequential read, {name}", mean, "", None, "requests",
            "-", None),
    ]
    for row in rows:
        row.section = "link"
    return rows


def _cold_read(bench, tag):
    size = bench.big_source.stat().st_size
    with bench.mount(fresh=True) as mount:
        bench.cold()
        bench.hub.client.reset_in_flight_peak()
        with InFlightSampler(bench.hub.client) as sampler:
            bench.record(f"{tag} mount", probes.read_sequential(mount.big))
        bench.record(f"{tag} mean in flight", sampler.summary()[0])
        bench.record(f"{tag} in flight", bench.hub.client.most_in_flight("cdn"))
    bench.cold()
    bench.record(f"{tag} aria2c", size / aria2c_seconds(bench, [bench.hub.cdn_url("bench/big", "big.bin")]))
    bench.cold()
    url = bench.hub.cdn_url("bench/big", "big.bin")
    bench.record(f"{tag} curl", probes.curl(url, f"0-{CURL_MIB * MIB - 1}")[0])


def _cold_load(bench, tag):
    with bench.mount(fresh=True) as mount:
        bench.cold()
        bench.hub.client.reset_in_flight_peak()
        bench.record(f"{tag} load mount", probes.llama_style_load_seconds(mount.gguf))
        bench.record(f"{tag} in flight", bench.hub.client.most_in_flight("cdn"))
    bench.cold()
    target = bench.work / "aria2c-download"
    downloaded = aria2c_seconds(bench, [bench.hub.cdn_url("bench/gguf", "model.gguf")], keep=target)
    try:
        # Right after the download, as a user would: the file is in the page cache then.
        bench.record(f"{tag} load aria2c", downloaded + probes.llama_style_load_seconds(target / "0"))
    finally:
        shutil.rmtree(target, ignore_errors=True)


def _four_readers(bench, tag):
    urls = [bench.hub.cdn_url("bench/four", path.name) for path in bench.four_sources]
    total = sum(path.stat().st_size for path in bench.four_sources)
    for cap in (None, RAISED_CAP):
        suffix = "" if cap is None else f" cap{cap}"
        api = f"127.0.0.1:{_free_port()}"
        args = ["--api", api] + ([] if cap is None else ["--max-in-flight", str(cap)])
        with bench.mount(fresh=True, args=args) as mount:
            bench.cold()
            bench.hub.client.reset_in_flight_peak()
            total, seconds = _parallel_reads(mount.four)
            bench.record(f"{tag} four mount{suffix}", total / max(seconds))
            bench.record(f"{tag} four{suffix} spread", max(seconds) / min(seconds))
            bench.record(f"{tag} in flight{suffix}", bench.hub.client.most_in_flight("cdn"))
            if cap is None:
                bench.record(f"{tag} four disk", served_from_disk(api))
        bench.cold()
        connections = 16 if cap is None else 8     # the second round of aria2c: as many connections as our cap
        bench.record(f"{tag} four aria2c" + ("" if cap is None else " x8"),
                     total / aria2c_seconds(bench, urls, jobs=4, connections=connections))
    # aria2c waits on its own writes (one event loop): on a slow disk it is slower than the
    # link, and the rows above then flatter the mount (the four files at -x8: 144 MB/s to
    # the disk here, 290 to memory, the same minute). Into memory it measures the link alone.
    bench.cold()
    bench.record(f"{tag} four aria2c x8 memory",
                 total / aria2c_seconds(bench, urls, jobs=4, connections=8, directory=MEMORY_SCRATCH))


def _parallel_reads(paths):
    seconds = {}

    def read(path):
        started = time.perf_counter()
        probes.read_sequential(path)
        seconds[path] = time.perf_counter() - started

    threads = [threading.Thread(target=read, args=(path,)) for path in paths]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sum(path.stat().st_size for path in paths), list(seconds.values())


def aria2c_seconds(bench, urls, jobs=1, keep=None, connections=16, directory=None):
    """Seconds for aria2c -x`connections` to download `urls` (`jobs` at once) into a fresh directory
    (`directory`, else one in the benchmark's work directory, on its disk).

    The files are deleted after, unless `keep` names the directory (they are named 0, 1...)."""
    target = keep or directory or bench.work / "aria2c-scratch"
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    listing = "".join(f"{url}\n  out={index}\n" for index, url in enumerate(urls))
    args = ["aria2c", "-q", f"-x{connections}", f"-s{connections}", "-k1M", f"-j{jobs}", "--file-allocation=none",
            "--allow-overwrite=true", "--auto-file-renaming=false", "--check-certificate=false",
            "-d", str(target), "-i", "-"]
    started = time.perf_counter()
    subprocess.run(args, input=listing, text=True, check=True, env=_no_proxy_env())
    seconds = time.perf_counter() - started
    if keep is None:
        shutil.rmtree(target, ignore_errors=True)
    return seconds


class InFlightSampler:
    """The simulator's CDN requests in flight, sampled in a thread while a read runs."""

    def __init__(self, client):
        self.client, self.samples = client, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def _sample(self):
        while not self._stop.wait(SAMPLE_SECONDS):
            self.samples.append(self.client.in_flight("cdn")["now"])

    def summary(self):
        """(mean, most) requests in flight over the read."""
        return (statistics.mean(self.samples), max(self.samples)) if self.samples else (0.0, 0)


def served_from_disk(api):
    """Bytes the mount behind `api` served readers from its cache's disk (not from its block buffers)."""
    with urllib.request.urlopen(f"http://{api}/metrics", timeout=10) as answer:
        text = answer.read().decode()
    found = re.search(r'^lamina_read_bytes_total\{source="cache_disk"\} (\S+)$', text, re.MULTILINE)
    return float(found.group(1)) if found else float("nan")


def _free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _no_proxy_env():
    return {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
