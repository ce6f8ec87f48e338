"""The comparisons: each measures the mount and what a user would use instead, back to back.

Every case runs `repeats` rounds of (ours, theirs) and quotes medians. "Cold" means a
fresh block cache and a dropped page cache; the server's source files are read back into
the page cache before each cold figure, because the server is not what is measured.
"""

import shutil
import statistics
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import probes
from .daemon import BenchMount
from .machine import drop_caches, warm

MIB = 1024 * 1024
MB = 1e6


@dataclass
class Row:
    figure: str
    ours: float
    against: str
    theirs: float | None
    unit: str
    target: str
    met: bool | None
    higher_is_better: bool = True
    section: str = ""               # "link": written to the shaped-link section of BENCHMARKS.md

    @property
    def ratio(self):
        return None if not self.theirs else self.ours / self.theirs


@dataclass
class Bench:
    work: Path
    hub: object
    big_source: Path
    gguf_source: Path
    repeats: int
    fio_seconds: int
    tools: dict
    samples: dict = field(default_factory=dict)
    blob: Path | None = None        # the hot cache's blob file of the big file
    four_sources: list = field(default_factory=list)    # bench/four's files (the link rows)

    def mount(self, cache="cold", fresh=False, args=()):
        return BenchMount(self.work, self.hub.endpoint, self.work / f"cache-{cache}", fresh, args)

    def cold(self):
        """Client side cold: page cache dropped, the server's sources read back in."""
        drop_caches()
        warm(self.big_source, self.gguf_source)

    def record(self, name, value):
        self.samples.setdefault(name, []).append(value)
        return value

    def median(self, name):
        return statistics.median(self.samples[name])


def throughput_row(bench, figure, ours, theirs, against, factor, target):
    o, t = bench.median(ours) / MB, bench.median(theirs) / MB
    return Row(figure, o, against, t, "MB/s", target, o >= factor * t)


# ---------------------------------------------------------------------------
# cold sequential read against curl, hf_hub_download and rclone


def cold_sequential(bench):
    size = bench.big_source.stat().st_size
    url = bench.hub.resolve_url("bench/big", "big.bin")
    for _ in range(bench.repeats):
        with bench.mount(fresh=True) as mount:
            bench.cold()
            before = bench.hub.bytes_sent()
            bench.record("cold", probes.read_sequential(mount.big))
            bench.record("cold server bytes", bench.hub.bytes_sent() - before)
        bench.cold()
        bench.record("curl", probes.curl(url)[0])
        # Not the daemon's HF_HOME (work/hf-home): the mount would reuse the download.
        hf_home = bench.work / "hf-download"
        shutil.rmtree(hf_home, ignore_errors=True)
        bench.cold()
        bench.record("hf", size / probes.hf_hub_download_seconds(bench.hub.endpoint, "bench/big", "big.bin", hf_home))
        shutil.rmtree(hf_home, ignore_errors=True)
        if bench.tools["rclone"]:
            bench.record("rclone", rclone_read(bench))
        bench.record("fresh write", probes.write_fresh_file(bench.work / "fresh-write.tmp", size))
    rows = [throughput_row(bench, "cold sequential read", "cold", "curl", "curl -o /dev/null, one stream",
                           0.8, ">= 0.8x"),
            throughput_row(bench, "cold sequential read", "cold", "hf", "hf_hub_download, fresh HF cache",
                           3.0, ">= 3x")]
    if bench.tools["rclone"]:
        rows.append(throughput_row(bench, "cold sequential read", "cold", "rclone",
                                   "rclone mount --vfs-cache-mode full", 2.0, ">= 2x"))
    o, t = bench.median("cold") / MB, bench.median("fresh write") / MB
    rows.append(Row("cold sequential read (reference, no target)", o,
                    "pwrite of the same size into a fresh file (page cache, no fsync)", t, "MB/s", "-", None))
    return rows


def rclone_read(bench):
    """Cold sequential read through rclone's http remote over the same simulator."""
    cdn = bench.hub.cdn_url("bench/big", "big.bin")
    prefix, rest = cdn.split("/lfs/", 1)
    base = f"{prefix}/lfs/{rest.split('/')[0]}/files/"     # bench.hubserver lists it
    mountpoint, cache = bench.work / "rclone-mnt", bench.work / "rclone-cache"
    shutil.rmtree(cache, ignore_errors=True)
    mountpoint.mkdir(exist_ok=True)
    process = subprocess.Popen(["rclone", "mount", ":http:", str(mountpoint), "--http-url", base,
                                "--vfs-cache-mode", "full", "--cache-dir", str(cache), "--read-only"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        target = mountpoint / "big.bin"
        deadline = time.monotonic() + 30
        while not target.exists():
            if time.monotonic() > deadline or process.poll() is not None:
                raise RuntimeError("rclone mount did not come up")
            time.sleep(0.1)
        bench.cold()
        return probes.read_sequential(target)
    finally:
        subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], capture_output=True)
        process.wait(timeout=30)


# ---------------------------------------------------------------------------
# warm figures: block cache hot


def hot_cache(bench):
    """Fill the hot cache once: both files read through a mount and verified."""
    with bench.mount(cache="hot", fresh=True) as mount:
        for path in (mount.big, mount.gguf):
            probes.read_sequential(path)
            mount.wait_verified(path)
        return mount.blob_file(mount.big)


def block_cache_hot(bench):
    blob_file = bench.blob
    for _ in range(bench.repeats):
        with bench.mount(cache="hot") as mount:
            drop_caches()
            bench.record("hot", probes.read_sequential(mount.big))
        drop_caches()
        bench.record("blob", probes.read_sequential(blob_file))
    return [throughput_row(bench, "block cache hot, page cache dropped", "hot", "blob",
                           "reading the cached blob file directly", 0.9, ">= 0.9x")]


def page_cache_hot(bench):
    with bench.mount(cache="hot") as mount:
        probes.read_sequential(mount.big)
        probes.read_sequential(bench.big_source)
        for _ in range(bench.repeats):
            bench.record("page hot", probes.read_sequential(mount.big))
            bench.record("local hot", probes.read_sequential(bench.big_source))
    return [throughput_row(bench, "page cache hot re-read", "page hot", "local hot",
                           "reading a local copy", 0.75, ">= 0.75x")]


def random_reads(bench):
    if not bench.tools["fio"]:
        return []
    with bench.mount(cache="hot") as mount:
        for _ in range(bench.repeats):
            drop_caches()
            bench.record("fio mount", probes.fio_random_iops(mount.big, bench.fio_seconds))
            drop_caches()
            bench.record("fio local", probes.fio_random_iops(bench.big_source, bench.fio_seconds))
    ours, theirs = bench.median("fio mount"), bench.median("fio local")
    return [Row("random 4 KiB reads (fio psync), block cache hot, page cache dropped", ours,
                "the same on a local copy", theirs, "IOPS", ">= 0.5x", ours >= 0.5 * theirs)]


def llama_load(bench):
    size = bench.gguf_source.stat().st_size
    with bench.mount(cache="hot") as mount:
        for _ in range(bench.repeats):
            drop_caches()
            bench.record("load mount", size / probes.llama_style_load_seconds(mount.gguf))
            drop_caches()
            bench.record("load local", size / probes.llama_style_load_seconds(bench.gguf_source))
    return [throughput_row(bench, "llama.cpp-style load (4 KiB header reads + mmap MAP_POPULATE), "
                           "block cache hot", "load mount", "load local", "the same on a local copy",
                           0.9, ">= 0.9x")]


def llama_load_cold(bench):
    """Informational: the same load on a cold cache (warm-up's case), against curl of the file."""
    size = bench.gguf_source.stat().st_size
    url = bench.hub.resolve_url("bench/gguf", "model.gguf")
    for _ in range(bench.repeats):
        with bench.mount(fresh=True) as mount:
            bench.cold()
            bench.record("load cold", size / probes.llama_style_load_seconds(mount.gguf))
        bench.cold()
        bench.record("curl gguf", probes.curl(url)[0])
    o, t = bench.median("load cold") / MB, bench.median("curl gguf") / MB
    return [Row("llama.cpp-style load, cold (warm-up)", o, "curl of the same file", t, "MB/s", "-", None)]


# ---------------------------------------------------------------------------
# time to first byte, concurrent readers, memory


def first_byte(bench):
    offset = min(512 * MIB, bench.big_source.stat().st_size // 2)
    url = bench.hub.resolve_url("bench/big", "big.bin")
    for _ in range(bench.repeats):
        # Cold: a fresh mount over an empty block cache (the page cache holds nothing of its
        # files). No drop_caches here: it would evict the daemon's own code, and a first
        # read would time page-ins of Python, not the read path.
        with bench.mount(fresh=True) as mount:
            bench.record("ttfb", probes.first_byte_seconds(mount.big, offset))
        bench.record("curl ttfb", probes.curl(url, f"{offset}-{offset}")[1])
    ours, theirs = bench.median("ttfb") * 1e3, bench.median("curl ttfb") * 1e3
    return [Row(f"time to first byte, cold, 1 byte at {offset // MIB} MiB", ours, "curl's TTFB, same range",
                theirs, "ms", "<= 1.5x + 1 ms", ours <= 1.5 * theirs + 1.0, higher_is_better=False)]


def concurrent_readers(bench, readers=4):
    for _ in range(bench.repeats):
        for count, name in ((1, "one"), (readers, "many")):
            with bench.mount(fresh=True) as mount:
                bench.cold()
                before = bench.hub.bytes_sent()
                bench.record(f"{name} wall", _parallel_reads(mount.big, count))
                bench.record(f"{name} bytes", bench.hub.bytes_sent() - before)
    wall = bench.median("many wall") / bench.median("one wall")
    sent = bench.median("many bytes") / bench.median("one bytes")
    return [Row(f"{readers} concurrent cold readers of one file: wall time", bench.median("many wall"),
                "one reader", bench.median("one wall"), "s", "<= 1.2x", wall <= 1.2, higher_is_better=False),
            Row(f"{readers} concurrent cold readers of one file: bytes from the server",
                bench.median("many bytes") / MIB, "one reader", bench.median("one bytes") / MIB, "MiB",
                "<= 1.02x", sent <= 1.02, higher_is_better=False)]


def _parallel_reads(path, count):
    threads = [threading.Thread(target=probes.read_sequential, args=(path,)) for _ in range(count)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return time.perf_counter() - started


def memory(bench):
    peak, where = max(BenchMount.peaks)
    peak /= MIB
    return [Row(f"daemon peak RSS (VmHWM) over every run above (highest: the {where} mount)", peak, "", None,
                "MiB", "<= 256 MiB", peak <= 256, higher_is_better=False)]


# ---------------------------------------------------------------------------
# sweeps: kernel read-ahead and block size


def read_ahead_sweep(bench, sizes=(128, 1024, 4096)):
    """llama.cpp-style load and sequential read on a hot block cache, per read_ahead_kb."""
    rows = []
    gguf_size = bench.gguf_source.stat().st_size
    for kb in sizes:
        with bench.mount(cache="hot", args=("--read-ahead-kb", str(kb))) as mount:
            actual = mount.read_ahead_kb()
            for _ in range(bench.repeats):
                drop_caches()
                bench.record(f"ra{kb} load", gguf_size / probes.llama_style_load_seconds(mount.gguf))
                drop_caches()
                bench.record(f"ra{kb} seq", probes.read_sequential(mount.big))
        rows.append((kb, actual, bench.median(f"ra{kb} load") / MB, bench.median(f"ra{kb} seq") / MB))
    return rows


def block_size_sweep(bench, sizes=("8M", "16M", "32M")):
    """Cold sequential read per block size (a fresh cache each: the size is fixed per cache)."""
    rows = []
    for size in sizes:
        for _ in range(bench.repeats):
            with bench.mount(cache=f"bs{size}", fresh=True, args=("--block-size", size)) as mount:
                bench.cold()
                bench.record(f"bs{size}", probes.read_sequential(mount.big))
        rows.append((size, bench.median(f"bs{size}") / MB))
    return rows
