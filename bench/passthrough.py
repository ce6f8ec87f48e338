"""`python -m bench.passthrough`: hot-cache reads with FUSE passthrough and without, against local files.

Both paths of the same checkout, in interleaved rounds over one hot block cache: the
mount with passthrough (the default) and with `--no-passthrough` (the daemon serves every
read). Each round mounts each path afresh and measures, each time beside its reference:

- llama.cpp-style load (4 KiB header reads + mmap MAP_POPULATE), page cache dropped, vs a
  local copy;
- re-read with the page cache hot, vs a local copy;
- fio 4 KiB random reads (psync), page cache dropped, vs a local copy;
- sequential read, page cache dropped, vs reading the cached blob file itself;
- safetensors load (safe_open + every tensor), page cache dropped, vs a local copy;
- `Cached:` growth of /proc/meminfo for one read of the big file, page cache dropped first,
  as a multiple of the file's size.

A daemon that has just started checks a verified file's block crcs once before it lets
the kernel serve it (docs/PASSTHROUGH.md): on the passthrough path each mount first opens
the files and waits for that, so the rounds measure what every later open gets. Medians
and ratios go to the "Passthrough" section of docs/BENCHMARKS.md.
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from . import probes, report
from .daemon import BenchMount
from .data import MIB, big_file, four_files, gguf_file
from .machine import describe, drop_caches
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
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--size-mib", type=int, default=1024, help="the big file (default 1 GiB)")
    parser.add_argument("--gguf-mib", type=int, default=320)
    parser.add_argument("--safetensors-mib", type=int, default=256)
    parser.add_argument("--fio-seconds", type=int, default=5)
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


class Run:
    def __init__(self, args, work, hub, sources):
        self.args, self.work, self.hub, self.sources = args, work, hub, sources
        self.samples: dict[str, list[float]] = {}
        self.blob = None

    def record(self, name, value):
        self.samples.setdefault(name, []).append(value)

    def mount(self, args=(), fresh=False):
        return BenchMount(self.work, self.hub.endpoint, self.work / "cache", fresh, args)

    def fill(self):
        with self.mount(fresh=True) as mount:
            for path in (mount.big, mount.gguf, mount.root / "big" / ST_NAME):
                probes.read_sequential(path)
                mount.wait_verified(path)
            self.blob = mount.blob_file(mount.big)

    def round(self, name, args):
        big, gguf, st = self.sources["big"], self.sources["gguf"], self.sources["st"]
        with self.mount(args) as mount:
            mounted_st = mount.root / "big" / ST_NAME
            if name == "passthrough":
                wait_for_passthrough((mount.big, mount.gguf, mounted_st))
            self.measure_loads(name, mount, mounted_st, gguf, st)
            self.measure_reads(name, mount, big)

    def measure_loads(self, name, mount, mounted_st, gguf, st):
        size = gguf.stat().st_size
        drop_caches()
        self.record(f"{name} load", size / probes.llama_style_load_seconds(mount.gguf))
        drop_caches()
        self.record(f"{name} load local", size / probes.llama_style_load_seconds(gguf))
        drop_caches()
        self.record(f"{name} st", st.stat().st_size / seconds_of(_ST_LOAD, mounted_st))
        drop_caches()
        self.record(f"{name} st local", st.stat().st_size / seconds_of(_ST_LOAD, st))

    def measure_reads(self, name, mount, big):
        drop_caches()
        before = cached_bytes()
        self.record(f"{name} seq", probes.read_sequential(mount.big))
        self.record(f"{name} growth", (cached_bytes() - before) / big.stat().st_size)
        drop_caches()
        self.record(f"{name} seq blob", probes.read_sequential(self.blob))
        probes.read_sequential(mount.big)
        probes.read_sequential(big)
        self.record(f"{name} reread", probes.read_sequential(mount.big))
        self.record(f"{name} reread local", probes.read_sequential(big))
        drop_caches()
        self.record(f"{name} fio", probes.fio_random_iops(mount.big, self.args.fio_seconds))
        drop_caches()
        self.record(f"{name} fio local", probes.fio_random_iops(big, self.args.fio_seconds))

    def median(self, name):
        return statistics.median(self.samples[name])


ROWS = (("llama.cpp-style load (MAP_POPULATE), block cache hot, page cache dropped", "load", "load local",
         "a local copy", "MB/s", 0.95),
        ("page-cache-hot re-read", "reread", "reread local", "a local copy", "MB/s", 0.9),
        ("fio 4 KiB random reads, block cache hot, page cache dropped", "fio", "fio local", "a local copy",
         "IOPS", 0.9),
        ("sequential read, block cache hot, page cache dropped", "seq", "seq blob", "the blob file", "MB/s",
         0.95),
        ("safetensors load (safe_open + every tensor), page cache dropped", "st", "st local", "a local copy",
         "MB/s", None))


def markdown(run, args, seconds):
    lines = [BEGIN, "## Passthrough", "",
             f"`python -m bench.passthrough --rounds {args.rounds}` (root), {time.strftime('%Y-%m-%d')}, "
             f"{describe()}; {args.size_mib} MiB file, {args.gguf_mib} MiB GGUF, {args.safetensors_mib} MiB "
             f"safetensors, fio {args.fio_seconds} s; medians of {args.rounds} interleaved rounds, "
             f"{seconds:.0f} s in all. Taken on a 2-core machine shared with other work (other processes "
             "ran and dropped caches meanwhile): the ratios, measured side by side, are the figures to read.",
             "", "| row | path | mount | reference | ratio | target | met |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for figure, ours, theirs, against, unit, target in ROWS:
        for name, _ in PATHS:
            o, t = run.median(f"{name} {ours}"), run.median(f"{name} {theirs}")
            scale = 1e6 if unit == "MB/s" else 1
            ratio = o / t
            met = "-" if target is None else ("yes" if ratio >= target else "**no**")
            lines.append(f"| {figure} | {name} | {o / scale:,.0f} {unit} | {t / scale:,.0f} ({against}) | "
                         f"{ratio:.2f}x | {'-' if target is None else f'>= {target}x'} | {met} |")
    for name, _ in PATHS:
        growth = run.median(f"{name} growth")
        lines.append(f"| `Cached:` growth, one read of the {args.size_mib} MiB file, page cache dropped | {name} "
                     f"| {growth:.2f}x the file | - | - | <= 1.1x | {'yes' if growth <= 1.1 else '**no**'} |")
    lines += ["", "Per-round samples:", ""]
    lines += [f"- {key}: " + ", ".join(f"{value:,.2f}" for value in values) for key, values in sorted(run.samples.items())]
    return "\n".join(lines + [END])


def main(argv=None):
    args = parse_args(argv)
    if os.geteuid() != 0:
        sys.exit("the benchmark drops the page cache and mounts: run it as root")
    work = Path(args.work)
    started = time.monotonic()
    big = big_file(work / "repo-big", args.size_mib * MIB)
    st = safetensors_file(work / "repo-big", args.safetensors_mib)
    gguf = gguf_file(work / "repo-gguf", args.gguf_mib)
    four = four_files(work / "repo-four", 1)     # the bench manifest names it; not read here
    with HubProcess({"bench/big": big.parent, "bench/gguf": gguf.parent, "bench/four": four[0].parent}) as hub:
        run = Run(args, work, hub, {"big": big, "gguf": gguf, "st": st})
        print("filling the block cache", flush=True)
        run.fill()
        for number in range(args.rounds):
            for name, mount_args in (PATHS if number % 2 == 0 else PATHS[::-1]):
                print(f"round {number + 1}: {name}", flush=True)
                run.round(name, mount_args)
    section = markdown(run, args, time.monotonic() - started)
    print(section)
    out = Path(args.out)
    report.write_section(out / "BENCHMARKS.md", section, BEGIN, END)
    print(f"wrote the section into {out / 'BENCHMARKS.md'}")


if __name__ == "__main__":
    main()
