"""`python -m bench.passthrough`: reads with FUSE passthrough and without, against local files.

Two mounts of the same checkout run side by side, each over its own filled block cache:
one with passthrough (the default), one with `--no-passthrough` (the daemon serves every
read: the fallback path). Every measurement is a *pair* of the mount and its reference,
measured ABBA (mount, reference, reference, mount; the reference first in the next
round), and the ratio is taken per round: other work on a shared machine then moves both
sides alike, and on this VM the first of two back-to-back cold reads is often the slower,
whichever file it reads. The median of the per-round ratios is the figure. Each round
measures, for each path:

- llama.cpp-style load (4 KiB header reads + mmap MAP_POPULATE), pages dropped, vs a local copy;
- safetensors load (safe_open + every tensor), pages dropped, vs a local copy;
- sequential read, pages dropped, vs reading the cached blob file itself, with the mean
  size of the disk's read requests; and the growth of `Cached:` in /proc/meminfo during
  the mount's read, as a multiple of the file's size, beside the copies of its bytes left
  in memory counted per file (fincore: other work moves `Cached:`, not these);
- re-read with the page cache hot, vs a local copy, by wall time and by the reader's own
  CPU time (user + system: the copy is all CPU, and a 2-core machine shared with other
  work stretches the wall time of whichever side another process preempts);
- 4 KiB preads at random offsets with the page cache hot, per second of the reader's CPU
  time, vs a local copy: what passthrough adds to each read, free of the disk's noise;
- fio 4 KiB random reads (psync), pages dropped, vs a local copy, with `--fadvise_hint=0`
  on both sides. fio's default hint, POSIX_FADV_RANDOM, turns off the kernel's read-ahead
  on a local file, but posix_fadvise on a FUSE file does not reach a passthrough open's
  backing file: with the default, the two sides do different work (measured in a second
  row, with the pages each side left cached per 4 KiB asked).

"Pages dropped" is per file (POSIX_FADV_DONTNEED on the blob file, the mounted file and
the local copy), not the whole machine's page cache. Then cold rounds, ABBA too: per
measurement a fresh cache and mount, the first sequential read of the big file and the
first llama.cpp-style load of the GGUF, fetched from the local Hub server; the ratio is
passthrough's against the daemon's path (before a blob completes, both serve alike).

A daemon that has just started checks a verified file's block crcs once before it lets
the kernel serve it (docs/PASSTHROUGH.md): the passthrough mount first opens the files
and waits for that. The passthrough mount's read handler calls during the rounds are
counted (from its metrics): the hot rows on that path must not reach the daemon.
Medians, ranges and `uptime` go to the "Passthrough" section of docs/BENCHMARKS.md.
"""

import argparse
import json
import os
import random
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from . import probes, report
from .daemon import BenchMount
from .data import MIB, big_file, four_files, gguf_file
from .machine import describe, warm
from .overhead import drop_pages
from .server import HubProcess

BEGIN, END = "<!-- passthrough:begin -->", "<!-- passthrough:end -->"
PATHS = (("passthrough", ()), ("daemon", ("--no-passthrough",)))
ST_NAME = "model.safetensors"
_ST_LOAD = """
import sys, time
from safetensors import safe_open
started = time.perf_counter()
with safe_open(sys.argv[1], "np") as f:
    for name in f.keys():
        f.get_tensor(name)
print(time.perf_counter() - started)
"""


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m bench.passthrough", description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--cold-rounds", type=int, default=3)
    parser.add_argument("--size-mib", type=int, default=1024, help="the big file (default 1 GiB)")
    parser.add_argument("--gguf-mib", type=int, default=320)
    parser.add_argument("--safetensors-mib", type=int, default=256)
    parser.add_argument("--fio-seconds", type=int, default=2)
    parser.add_argument("--only", choices=("load",),
                        help="load: only the llama.cpp-style load rows (both paths, the same pairs), no cold "
                             "rounds; the table is printed, BENCHMARKS.md is left as it is")
    parser.add_argument("--out", default="docs", help="where BENCHMARKS.md is (its section is replaced)")
    parser.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "lamina-bench-passthrough"))
    return parser.parse_args(argv)


def safetensors_file(directory, size_mib):
    """A safetensors file of `size_mib` MiB of float16 tensors, 8 MiB each (kept between runs)."""
    import numpy as np
    from safetensors.numpy import save_file
    path = Path(directory) / ST_NAME
    marker = path.with_suffix(f".{size_mib}mib")
    if not (path.exists() and marker.exists()):
        generator = np.random.default_rng(7)
        tensors = {f"layers.{i}.weight": generator.standard_normal((2048, 2048)).astype(np.float16)
                   for i in range(max(1, size_mib // 8))}
        save_file(tensors, str(path))
        marker.touch()
    return path


def seconds_of(code, path):
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, check=True)
    return float(out.stdout.split()[-1])


def cached_bytes():
    with open("/proc/meminfo") as meminfo:
        return next(int(line.split()[1]) * 1024 for line in meminfo if line.startswith("Cached:"))


def resident_bytes(path):
    """Bytes of `path` in the page cache (fincore: mmap + mincore of the file itself)."""
    out = subprocess.run(["fincore", "-nb", "-o", "RES", str(path)], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[0])


def disk_reads(path):
    """(read requests completed, sectors read) of the disk holding `path` (/proc/diskstats)."""
    device = os.stat(path).st_dev
    with open("/proc/diskstats") as table:
        for line in table:
            fields = line.split()
            if (int(fields[0]), int(fields[1])) == (os.major(device), os.minor(device)):
                return int(fields[3]), int(fields[5])
    return 0, 0


def read_timed(path):
    """(bytes per wall second, bytes per CPU second of this process) reading `path` whole."""
    buffer, total = bytearray(probes.READ_SIZE), 0
    wall, cpu = time.perf_counter(), time.process_time()
    with open(path, "rb", buffering=0) as source:
        while count := source.readinto(buffer):
            total += count
    return total / (time.perf_counter() - wall), total / max(time.process_time() - cpu, 1e-6)


def fio_iops(path, seconds, hint):
    """4 KiB random-read IOPS of fio (psync, one job); `hint`: fio's --fadvise_hint (1: FADV_RANDOM)."""
    args = ["fio", "--name=rand", f"--filename={path}", "--rw=randread", "--bs=4k", "--ioengine=psync",
            "--numjobs=1", f"--runtime={seconds}", "--time_based", "--output-format=json", "--readonly",
            f"--fadvise_hint={hint}"]
    out = subprocess.run(args, capture_output=True, text=True, check=True).stdout
    return json.loads(out[out.index("{"):])["jobs"][0]["read"]["iops"]


def preads_per_cpu_second(path, count=200_000, seed=5):
    """4 KiB preads at random page-aligned offsets per second of this process's CPU time."""
    fd = os.open(path, os.O_RDONLY)
    try:
        pages, draw = os.fstat(fd).st_size // 4096, random.Random(seed)
        offsets = [draw.randrange(pages) * 4096 for _ in range(count)]
        started = time.process_time()
        for offset in offsets:
            os.pread(fd, 4096, offset)
        return count / max(time.process_time() - started, 1e-6)
    finally:
        os.close(fd)


def uptime():
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for_passthrough(paths, timeout=300):
    """Open each file once, then wait until its next open passes through (crcs checked)."""
    for path in paths:
        with open(path, "rb"):
            pass
        deadline = time.monotonic() + timeout
        while os.getxattr(path, "user.lamina.passthrough") != b"yes (on open)":
            if time.monotonic() > deadline:
                raise TimeoutError(f"{path}: {os.getxattr(path, 'user.lamina.passthrough').decode()}")
            time.sleep(0.1)


class PathMount(BenchMount):
    """One path's mount, in its own directory (manifest, mountpoint, cache, log), with its
    REST API on so its read handler calls can be counted."""

    def __init__(self, work, endpoint, name, args, fresh=False, env=None):
        """`env` adds to the daemon's environment (PYTHONPATH: another checkout's code)."""
        self.port = free_port()
        directory = Path(work) / name
        directory.mkdir(parents=True, exist_ok=True)
        super().__init__(directory, endpoint, directory / "cache", fresh,
                         (*args, "--api", f"127.0.0.1:{self.port}"), env=env)

    @property
    def st(self):
        return self.root / "big" / ST_NAME

    def read_calls(self):
        """The daemon's read handler calls so far (its read-duration histogram's count)."""
        text = urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=30).read().decode()
        found = re.search(r"^lamina_read_duration_seconds_count\S* (\S+)$", text, re.M)
        return float(found.group(1)) if found else float("nan")


class Samples:
    """Per-pair figures and ratios, by row key."""

    def __init__(self):
        self.values: dict[str, list[float]] = {}

    def add(self, key, value):
        self.values.setdefault(key, []).append(value)

    def median(self, key):
        return statistics.median(self.values[key])

    def spread(self, key):
        return min(self.values[key]), max(self.values[key])


def pair(samples, key, number, ours, theirs):
    """Measure `ours` and `theirs` (callables returning a figure) as ABBA, the mount first in
    even rounds and the reference first in odd ones; record the means of each side's two
    figures and their ratio under `key`. On this machine the first of two back-to-back cold
    reads is often the slower, whichever file it reads: ABBA puts each side first once."""
    order = (ours, theirs, theirs, ours) if number % 2 == 0 else (theirs, ours, ours, theirs)
    figures = [measure() for measure in order]
    mine = statistics.mean(f for measure, f in zip(order, figures) if measure is ours)
    reference = statistics.mean(f for measure, f in zip(order, figures) if measure is theirs)
    samples.add(f"{key} mount", mine)
    samples.add(f"{key} reference", reference)
    samples.add(f"{key} ratio", mine / reference)


class Run:
    def __init__(self, args, work, hub, sources):
        self.args, self.work, self.hub, self.sources = args, work, hub, sources
        self.samples = Samples()
        self.mounts: dict[str, PathMount] = {}
        self.blobs: dict[str, dict[str, Path]] = {}

    def fill(self, name, args):
        """Fill this path's cache afresh (read every file, wait until verified)."""
        with PathMount(self.work, self.hub.endpoint, name, args, fresh=True) as mount:
            for path in (mount.big, mount.gguf, mount.st):
                probes.read_sequential(path)
                mount.wait_verified(path)
            self.blobs[name] = {"big": mount.blob_file(mount.big), "gguf": mount.blob_file(mount.gguf),
                                "st": mount.blob_file(mount.st)}

    def drop(self, name, kind, mounted):
        """Drop every copy of a file's pages: the blob's, the mounted file's, the local copy's."""
        for path in (self.blobs[name][kind], mounted, self.sources[kind]):
            drop_pages(path)

    def round(self, number, name):
        mount, local, blob = self.mounts[name], self.sources, self.blobs[name]
        size = {kind: local[kind].stat().st_size for kind in ("big", "gguf", "st")}

        def cold(kind, mounted, measure):
            def measured():
                self.drop(name, kind, mounted)
                return measure()
            return measured

        pair(self.samples, f"{name} load", number,
             cold("gguf", mount.gguf, lambda: size["gguf"] / probes.llama_style_load_seconds(mount.gguf)),
             cold("gguf", mount.gguf, lambda: size["gguf"] / probes.llama_style_load_seconds(local["gguf"])))
        if self.args.only == "load":
            return
        pair(self.samples, f"{name} st", number,
             cold("st", mount.st, lambda: size["st"] / seconds_of(_ST_LOAD, mount.st)),
             cold("st", mount.st, lambda: size["st"] / seconds_of(_ST_LOAD, local["st"])))
        pair(self.samples, f"{name} seq", number,
             cold("big", mount.big, self.counted(f"{name} seq", lambda: self.read_with_growth(name, mount.big))),
             cold("big", mount.big, self.counted(f"{name} seq blob", lambda: probes.read_sequential(blob["big"]))))
        self.hot_reread(number, name, mount.big, local["big"])
        pair(self.samples, f"{name} preads", number, lambda: preads_per_cpu_second(mount.big),
             lambda: preads_per_cpu_second(local["big"]))
        for hint in (0, 1):
            pair(self.samples, f"{name} fio{hint}", number,
                 cold("big", mount.big, lambda: self.fio(name, mount.big, blob["big"], hint)),
                 cold("big", mount.big, lambda: self.fio(name + " local", local["big"], local["big"], hint)))

    def read_with_growth(self, name, path):
        """Read the big file; note `Cached:`'s growth (the whole machine's) and the copies of
        its bytes left in memory (fincore of the blob file, plus the FUSE page cache on the
        daemon's path; a passthrough file's mmap shows the blob's pages, not a copy)."""
        size, before = path.stat().st_size, cached_bytes()
        rate = probes.read_sequential(path)
        self.samples.add(f"{name} growth", (cached_bytes() - before) / size)
        copies = resident_bytes(self.blobs[name]["big"]) + (0 if name == "passthrough" else resident_bytes(path))
        self.samples.add(f"{name} copies", copies / size)
        return rate

    def counted(self, label, measure):
        """`measure`, noting the mean size of the disk's read requests it caused."""
        def measured():
            before = disk_reads(self.work)
            figure = measure()
            requests, sectors = (after - then for after, then in zip(disk_reads(self.work), before))
            self.samples.add(f"{label} KiB per request", sectors * 512 / 1024 / max(requests, 1))
            return figure
        return measured

    def hot_reread(self, number, name, mounted, local):
        """Re-read both with their pages hot, ABBA as `pair`: wall and CPU-time figures."""
        read_timed(mounted), read_timed(local)
        order = (mounted, local, local, mounted) if number % 2 == 0 else (local, mounted, mounted, local)
        figures = [(path, read_timed(path)) for path in order]
        for index, unit in enumerate(("wall", "cpu")):
            ours = statistics.mean(figure[index] for path, figure in figures if path == mounted)
            theirs = statistics.mean(figure[index] for path, figure in figures if path == local)
            self.samples.add(f"{name} reread-{unit} mount", ours)
            self.samples.add(f"{name} reread-{unit} reference", theirs)
            self.samples.add(f"{name} reread-{unit} ratio", ours / theirs)

    def fio(self, label, path, cached_file, hint):
        iops = fio_iops(path, self.args.fio_seconds, hint)
        asked = iops * self.args.fio_seconds * 4096
        self.samples.add(f"{label} fio{hint} cached per asked", resident_bytes(cached_file) / asked)
        return iops

    def hot_rounds(self):
        with PathMount(self.work, self.hub.endpoint, "passthrough", ()) as passthrough, \
                PathMount(self.work, self.hub.endpoint, "daemon", ("--no-passthrough",)) as daemon:
            self.mounts = {"passthrough": passthrough, "daemon": daemon}
            wait_for_passthrough((passthrough.big, passthrough.gguf, passthrough.st))
            calls = passthrough.read_calls()
            for number in range(self.args.rounds):
                for name, _ in (PATHS if number % 2 == 0 else PATHS[::-1]):
                    print(f"round {number + 1}: {name}", flush=True)
                    self.round(number, name)
            self.passthrough_read_calls = passthrough.read_calls() - calls

    def cold_rounds(self):
        """Fresh cache and mount per measurement: the first read and first load from the Hub,
        passthrough against the daemon's path, ABBA as `pair` (the first mount of a round
        was the slower in 8 of 9 AB rounds, whichever path it was)."""
        size = {kind: self.sources[kind].stat().st_size for kind in ("big", "gguf")}
        for number in range(self.args.cold_rounds):
            order = PATHS + PATHS[::-1] if number % 2 == 0 else PATHS[::-1] + PATHS
            figures: dict[str, list[tuple[float, float]]] = {name: [] for name, _ in PATHS}
            for name, args in order:
                print(f"cold round {number + 1}: {name}", flush=True)
                warm(self.sources["big"], self.sources["gguf"])      # the server's reads are not measured
                with PathMount(self.work, self.hub.endpoint, f"cold-{name}", args, fresh=True) as mount:
                    figures[name].append((probes.read_sequential(mount.big),
                                          size["gguf"] / probes.llama_style_load_seconds(mount.gguf)))
                shutil.rmtree(self.work / f"cold-{name}" / "cache", ignore_errors=True)
            for index, key in enumerate(("cold seq", "cold load")):
                pt = statistics.mean(sample[index] for sample in figures["passthrough"])
                daemon = statistics.mean(sample[index] for sample in figures["daemon"])
                self.samples.add(f"{key} mount", pt)
                self.samples.add(f"{key} reference", daemon)
                self.samples.add(f"{key} ratio", pt / daemon)


# (what, row key, reference, unit, target)
ROWS = (("llama.cpp-style load (MAP_POPULATE), block cache hot, pages dropped", "load", "a local copy",
         "MB/s", 0.95),
        ("safetensors load (safe_open + every tensor), block cache hot, pages dropped", "st", "a local copy",
         "MB/s", None),
        ("page-cache-hot re-read, by wall time", "reread-wall", "a local copy", "MB/s", 0.9),
        ("page-cache-hot re-read, by the reader's CPU time", "reread-cpu", "a local copy", "MB/s", 0.9),
        ("4 KiB random preads, page cache hot, per second of the reader's CPU time", "preads",
         "a local copy", "reads/s", None),
        ("fio 4 KiB random reads, block cache hot, pages dropped, `--fadvise_hint=0` both sides", "fio0",
         "a local copy", "IOPS", 0.9),
        ("fio 4 KiB random reads, as above with fio's default FADV_RANDOM (it does not reach a passthrough open's blob file: PASSTHROUGH.md, Measured)",
         "fio1", "a local copy", "IOPS", None),
        ("sequential read, block cache hot, pages dropped", "seq", "the blob file", "MB/s", 0.95))
COLD_ROWS = (("cold sequential read (fresh cache, from the local Hub server)", "cold seq"),
             ("cold llama.cpp-style load (fresh cache, from the local Hub server)", "cold load"))


def figure(value, unit):
    return f"{value / 1e6:,.0f} MB/s" if unit == "MB/s" else f"{value:,.0f} {unit}"


def row_line(run, what, key, against, unit, target):
    samples = run.samples
    ratio, (low, high) = samples.median(f"{key} ratio"), samples.spread(f"{key} ratio")
    met = "-" if target is None else ("yes" if ratio >= target else "**no**")
    return (f"| {what} | {figure(samples.median(f'{key} mount'), unit)} | "
            f"{figure(samples.median(f'{key} reference'), unit)} ({against}) | {ratio:.2f}x | "
            f"{low:.2f}-{high:.2f}x | {'-' if target is None else f'>= {target}x'} | {met} |")


def markdown(run, args, seconds, loads):
    lines = [BEGIN, "## Passthrough", "",
             f"`python -m bench.passthrough --rounds {args.rounds} --cold-rounds {args.cold_rounds}` (root), "
             f"{time.strftime('%Y-%m-%d')}, {describe()}; {args.size_mib} MiB file, {args.gguf_mib} MiB GGUF, "
             f"{args.safetensors_mib} MiB safetensors, fio {args.fio_seconds} s; {seconds:.0f} s in all.",
             "", f"Load: `{loads[0]}` at the start, `{loads[1]}` at the end (2 cores shared with other work).",
             "Each ratio is the median over the rounds of one round's ratio (mount and reference measured "
             "back to back as ABBA, each side first in alternate rounds; a side's figure is the mean of its "
             "two), with the range over the rounds; the MB/s and IOPS are medians too.", ""]
    for name, _ in PATHS:
        lines += [f"**{name}** path ({args.rounds} rounds):", "",
                  "| row | mount | reference | ratio | range | target | met |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        lines += [row_line(run, what, f"{name} {key}", against, unit, target)
                  for what, key, against, unit, target in ROWS]
        growth, (low, high) = run.samples.median(f"{name} growth"), run.samples.spread(f"{name} growth")
        copies, (least, most) = run.samples.median(f"{name} copies"), run.samples.spread(f"{name} copies")
        lines += [f"| `Cached:` growth (the whole machine's), one read of the {args.size_mib} MiB file, pages "
                  f"dropped | {growth:.2f}x the file | - | - | {low:.2f}-{high:.2f}x | <= 1.1x | "
                  f"{'yes' if growth <= 1.1 else '**no**'} |",
                  f"| copies of its bytes in memory after that read (fincore of the blob file"
                  f"{'' if name == 'passthrough' else ' + the FUSE page cache'}) | {copies:.2f}x the file | - | - | "
                  f"{least:.2f}-{most:.2f}x | <= 1.1x | {'yes' if copies <= 1.1 else '**no**'} |", ""]
    lines += [f"**cold** ({args.cold_rounds} rounds; reference: the daemon's path, `--no-passthrough`):", "",
              "| row | passthrough | daemon's path | ratio | range |", "| --- | --- | --- | --- | --- |"]
    for what, key in COLD_ROWS:
        low, high = run.samples.spread(f"{key} ratio")
        lines.append(f"| {what} | {figure(run.samples.median(f'{key} mount'), 'MB/s')} | "
                     f"{figure(run.samples.median(f'{key} reference'), 'MB/s')} | "
                     f"{run.samples.median(f'{key} ratio'):.2f}x | {low:.2f}-{high:.2f}x |")
    request = {label: run.samples.median(f"{label} KiB per request")
               for label in ("passthrough seq", "passthrough seq blob", "daemon seq", "daemon seq blob")}
    lines += ["", f"Read handler calls on the passthrough mount during its hot rounds: "
                  f"{run.passthrough_read_calls:.0f}.", "",
              "Mean size of the disk's read requests during the sequential reads, median: " + ", ".join(
                  f"{label} {kib:,.0f} KiB" for label, kib in request.items()) + ".", "",
              "Pages left in the page cache per 4 KiB fio asked for, median (1.0: no read-ahead): " + ", ".join(
                  f"{label} hint={hint}: {run.samples.median(f'{label} fio{hint} cached per asked'):.2f}"
                  for label in ("passthrough", "passthrough local") for hint in (0, 1)) + "."]
    return "\n".join(lines + [END])


def load_rows(run, args, seconds, loads):
    """`--only load`: the load row of each path, as the section shows it."""
    what, key, against, unit, target = ROWS[0]
    lines = [f"`python -m bench.passthrough --only load --rounds {args.rounds}` (root), {time.strftime('%Y-%m-%d')}, "
             f"{describe()}; {args.gguf_mib} MiB GGUF; {seconds:.0f} s in all.", "",
             f"Load: `{loads[0]}` at the start, `{loads[1]}` at the end.", "",
             "| path | row | mount | reference | ratio | range | target | met |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, _ in PATHS:
        samples = run.samples.values[f"{name} {key} ratio"]
        lines.append(f"| {name} " + row_line(run, what, f"{name} {key}", against, unit, target))
        lines.append(f"| {name} | (geometric mean of the per-round ratios: "
                     f"{statistics.geometric_mean(samples):.3f}x; rounds at or above 1: "
                     f"{sum(ratio >= 1 for ratio in samples)} of {len(samples)}) | | | | | | |")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    if os.geteuid() != 0:
        sys.exit("the benchmark drops pages, mounts and passes files through: run it as root")
    work = Path(args.work)
    started, loads = time.monotonic(), [uptime()]
    big = big_file(work / "repo-big", args.size_mib * MIB)
    st = safetensors_file(work / "repo-big", args.safetensors_mib)
    gguf = gguf_file(work / "repo-gguf", args.gguf_mib)
    four = four_files(work / "repo-four", 1)     # the bench manifest names it; not read here
    with HubProcess({"bench/big": big.parent, "bench/gguf": gguf.parent, "bench/four": four[0].parent}) as hub:
        run = Run(args, work, hub, {"big": big, "gguf": gguf, "st": st})
        for name, mount_args in PATHS:
            print(f"filling the {name} path's block cache", flush=True)
            run.fill(name, mount_args)
        run.hot_rounds()
        if args.only is None:
            run.cold_rounds()
    loads.append(uptime())
    if args.only == "load":
        print(load_rows(run, args, time.monotonic() - started, loads))
        print("per-pair samples:", json.dumps(run.samples.values))
        return
    section = markdown(run, args, time.monotonic() - started, loads)
    print(section)
    print("per-pair samples:", json.dumps(run.samples.values))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report.write_section(out / "BENCHMARKS.md", section, BEGIN, END)
    print(f"wrote the section into {out / 'BENCHMARKS.md'}")


if __name__ == "__main__":
    main()
