"""A random-read oracle for the mount (fsx-style): seeded random reads, every byte checked.

Readers run in worker processes (`python -m vfs.testing.fsx worker ...`): several readers
are what a host really has, and an mmap'd read faults pages in while holding the GIL, so
it must never share a process with an in-process Hub simulator. Each worker replays the
operations `random.Random(seed)` draws and compares every byte with the source file:

    pread    a random offset and length, biased to block edges and the end of the file
    stream   sequential reads from a random offset, in a random chunk size
    mmap     a slice of a read-only mmap of the whole file
    direct   a pread through an O_DIRECT descriptor (no page cache: it reaches the daemon;
             on a passthrough open it reaches the cache's file, whose O_DIRECT rules hold:
             then offset, length and buffer are aligned to 4 KiB)
    forget   posix_fadvise(DONTNEED): drop the file's cached pages, so later reads reach
             the daemon again (served from the block cache, not the kernel's); on a
             passthrough open a no-op (the advice does not reach the cache's file)
    reopen   close the file's descriptors and maps and open it again
    stat     size and mode, as the source and 0444

The first mismatch (or error) stops that worker and is reported with its seed: a run is
replayed with `--seed`. Counts are kept per operation kind.

The soak runs `--rounds` rounds, each on a fresh cache and mount, so every round starts
cold. Each round without `--chaos` has two halves: the first on the cold mount (the daemon serves every
open), then every file is read whole and verified, and the second half's opens are
served by FUSE passthrough where the mount has it, beside O_DIRECT opens the daemon
serves. Workers count their opens by who served them (the `user.lamina.passthrough`
xattr right after the open). With `--chaos`, a thread keeps one transient fault pending in the simulator (5xx,
429, reset, short body, stall, ignored Range, delay), a new one at most every `SPACING`
requests so that no range can meet more faults than its retries: each must be ridden out
with exact bytes and no error in the daemon's log.

    python -m vfs.testing.fsx --ops 100000 [--processes 4] [--seed N] [--chaos]  soak: own Hub and mount
    python -m vfs.testing.fsx check --file MOUNTED=SOURCE ... [--ops N] [--seed N]  a live mount
"""

import argparse
import json
import mmap
import os
import random
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

MiB = 1024 * 1024
PAGE = 4096
KINDS = {"pread": 40, "stream": 10, "mmap": 20, "direct": 15, "forget": 5, "reopen": 6, "stat": 4}
# Sizes that cross many 1 MiB block edges, sit exactly on them, or are smaller than a page.
SOURCE_SIZES = {"empty.json": 0, "one.json": 1, "page.json": 4095, "block.bin": MiB,
                "block-plus-one.bin": MiB + 1, "odd.bin": 7 * MiB + 12345, "large.safetensors": 24 * MiB + 777}


# ---------------------------------------------------------------------------
# One worker: a seeded sequence of operations over a few files


class Mismatch(Exception):
    """A read that did not return the source's bytes (or failed)."""


@dataclass
class CheckedFile:
    """A file under test: its path in the mount, its source, and this worker's open handles."""

    mounted: str
    source: str
    size: int
    source_fd: int = -1
    fd: int = -1
    direct_fd: int = -1
    view: mmap.mmap | None = None
    passed: bool = False            # its open is served by FUSE passthrough

    def open(self):
        self.source_fd = os.open(self.source, os.O_RDONLY)
        return self.reopen()

    def reopen(self):
        """Open the file again; True if passthrough serves the new open."""
        self.close_mount_handles()
        self.fd = os.open(self.mounted, os.O_RDONLY)
        self.direct_fd = os.open(self.mounted, os.O_RDONLY | os.O_DIRECT)
        self.view = mmap.mmap(self.fd, 0, access=mmap.ACCESS_READ) if self.size else None
        try:
            self.passed = os.getxattr(self.mounted, "user.lamina.passthrough") == b"yes"
        except OSError:
            self.passed = False     # not a lamina mount (check mode on any file system)
        return self.passed

    def close_mount_handles(self):
        if self.view is not None:
            self.view.close()
        for fd in (self.fd, self.direct_fd):
            if fd >= 0:
                os.close(fd)
        self.fd = self.direct_fd = -1
        self.view = None

    def close(self):
        self.close_mount_handles()
        os.close(self.source_fd)

    def expected(self, offset, length):
        return os.pread(self.source_fd, length, offset)


@dataclass
class Tally:
    ops: Counter = field(default_factory=Counter)
    reads: int = 0
    bytes: int = 0
    opens: Counter = field(default_factory=Counter)     # "passthrough" / "daemon"


class Worker:
    def __init__(self, files, seed, block_size):
        self.files, self.seed, self.block_size = files, seed, block_size
        self.random = random.Random(seed)
        self.tally = Tally()

    def run(self, count):
        """Run `count` operations; a dict report (with the first mismatch, if any)."""
        for checked in self.files:
            self.count_open(checked.open())
        problem, index = None, 0
        try:
            for index in range(count):
                self.step(index)
        except (Mismatch, OSError, ValueError) as exc:
            problem = {"seed": self.seed, "op": index, "error": f"{type(exc).__name__}: {exc}"}
        finally:
            for checked in self.files:
                checked.close()
        return {"seed": self.seed, "ops": sum(self.tally.ops.values()), "kinds": dict(self.tally.ops),
                "reads": self.tally.reads, "bytes": self.tally.bytes, "opens": dict(self.tally.opens),
                "mismatch": problem}

    def count_open(self, passed_through):
        self.tally.opens["passthrough" if passed_through else "daemon"] += 1

    def step(self, index):
        kind = self.random.choices(list(KINDS), weights=list(KINDS.values()))[0]
        checked = self.random.choice(self.files)
        getattr(self, f"do_{kind}")(checked, index)
        self.tally.ops[kind] += 1

    # -- drawing offsets and lengths

    def offset(self, size):
        roll = self.random.random()
        if roll < 0.45 or size == 0:
            return self.random.randint(0, size)
        if roll < 0.85:            # near a block edge, on either side
            edge = self.random.randint(0, size // self.block_size) * self.block_size
            return min(size, max(0, edge + self.random.randint(-4096, 4096)))
        return max(0, size - self.random.randint(0, 8192))    # near the end of the file

    def length(self):
        return self.random.choice((1, self.random.randint(1, 4096), self.random.randint(1, 65536),
                                   self.random.randint(1, 3 * self.block_size)))

    # -- operations

    def check(self, checked, index, kind, offset, length, got):
        want = checked.expected(offset, length)
        self.tally.reads += 1
        self.tally.bytes += len(got)
        if got != want:
            first = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
            raise Mismatch(f"op {index} {kind} {checked.mounted} offset {offset} length {length}: got "
                           f"{len(got)} bytes, want {len(want)}; first difference at +{first}")

    def do_pread(self, checked, index):
        offset, length = self.offset(checked.size), self.length()
        self.check(checked, index, "pread", offset, length, os.pread(checked.fd, length, offset))

    def do_direct(self, checked, index):
        offset, length = self.offset(checked.size), self.length()
        if checked.passed:
            offset, length = offset // PAGE * PAGE, -(-length // PAGE) * PAGE
            buffer = mmap.mmap(-1, length)              # page-aligned, as O_DIRECT wants
            got = os.preadv(checked.direct_fd, [buffer], offset)
            data = buffer[:got]
            buffer.close()
        else:
            data = os.pread(checked.direct_fd, length, offset)
        self.check(checked, index, "direct", offset, length, data)

    def do_stream(self, checked, index):
        offset, chunk = self.offset(checked.size), self.random.choice((4096, 65536, 131072, MiB))
        for _ in range(self.random.randint(2, 8)):
            self.check(checked, index, "stream", offset, chunk, os.pread(checked.fd, chunk, offset))
            offset += chunk

    def do_mmap(self, checked, index):
        if checked.view is None:
            return
        offset, length = self.offset(checked.size), self.length()
        self.check(checked, index, "mmap", offset, length, checked.view[offset:offset + length])

    def do_forget(self, checked, index):
        os.posix_fadvise(checked.fd, 0, 0, os.POSIX_FADV_DONTNEED)

    def do_reopen(self, checked, index):
        self.count_open(checked.reopen())

    def do_stat(self, checked, index):
        info = os.stat(checked.mounted)
        if info.st_size != checked.size or stat.S_IMODE(info.st_mode) != 0o444:
            raise Mismatch(f"op {index} stat {checked.mounted}: size {info.st_size}, mode {info.st_mode:o}")


def checked_files(pairs):
    return [CheckedFile(str(mounted), str(source), os.path.getsize(source)) for mounted, source in pairs]


# ---------------------------------------------------------------------------
# Many workers, in their own processes


@dataclass
class Summary:
    seed: int
    processes: int
    ops: int = 0
    reads: int = 0
    bytes: int = 0
    kinds: Counter = field(default_factory=Counter)
    opens: Counter = field(default_factory=Counter)      # by who served them
    faults: Counter = field(default_factory=Counter)     # chaos: injected faults that hit a request
    mismatches: list = field(default_factory=list)
    seconds: float = 0.0

    def add(self, report):
        self.ops += report["ops"]
        self.reads += report["reads"]
        self.bytes += report["bytes"]
        self.kinds.update(report["kinds"])
        self.opens.update(report.get("opens", {}))
        if report["mismatch"]:
            self.mismatches.append(report["mismatch"])

    def __str__(self):
        kinds = ", ".join(f"{kind} {count}" for kind, count in sorted(self.kinds.items()))
        faults = ", ".join(f"{kind} {count}" for kind, count in sorted(self.faults.items()))
        return (f"fsx seed {self.seed}: {self.ops} ops ({kinds}) in {self.processes} processes, "
                f"{self.reads} reads, {self.bytes / MiB:.0f} MiB checked, opens: "
                f"{self.opens['passthrough']} passthrough, {self.opens['daemon']} daemon (+ O_DIRECT), "
                f"{len(self.mismatches)} mismatches, "
                f"{self.seconds:.1f}s" + (f"; faults ridden out: {sum(self.faults.values())} ({faults})" if faults else ""))


def worker_command(pairs, seed, ops, block_size):
    return [sys.executable, "-m", "vfs.testing.fsx", "worker", "--seed", str(seed), "--ops", str(ops),
            "--block-size", str(block_size), *(f"--file={mounted}={source}" for mounted, source in pairs)]


def run(pairs, seed=None, ops=3000, processes=3, block_size=MiB, timeout=3600, summary=None):
    """Run `ops` operations split over `processes` workers (worker i uses seed + i)."""
    seed = random.randrange(1 << 32) if seed is None else seed
    summary = summary or Summary(seed, processes)
    started = time.monotonic()
    share = [ops // processes + (i < ops % processes) for i in range(processes)]
    workers = [subprocess.Popen(worker_command(pairs, seed + i, share[i], block_size), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True) for i in range(processes)]
    for worker in workers:
        out, err = worker.communicate(timeout=timeout)
        if worker.returncode != 0:
            summary.mismatches.append({"seed": seed, "error": f"worker exited {worker.returncode}: {err.strip()}"})
            continue
        summary.add(json.loads(out))
    summary.seconds += time.monotonic() - started
    return summary


# ---------------------------------------------------------------------------
# Soak: its own Hub simulator and mount


def write_sources(directory, sizes=SOURCE_SIZES):
    directory.mkdir(parents=True, exist_ok=True)
    generator = random.Random(20240521)
    for name, size in sizes.items():
        (directory / name).write_bytes(generator.randbytes(size))
    return {name: directory / name for name in sizes}


def soak(ops, processes, seed, rounds=5, chaos=False):
    """`ops` operations over `rounds` fresh mounts of a simulated repo: (Summary, bad daemon log lines)."""
    from .hubsim import HubSimulator

    seed = random.randrange(1 << 32) if seed is None else seed
    summary, bad_log = Summary(seed, processes), []
    with tempfile.TemporaryDirectory(prefix="lamina-fsx-") as scratch, HubSimulator() as sim:
        root = Path(scratch)
        sources = write_sources(root / "sources")
        sim.add_repo("fsx/files", files=sources)
        (root / "models.yaml").write_text("models:\n  fsx:\n    path: /models/fsx/\n    backend: vllm\n"
                                          "    hf: fsx/files\n")
        for number in range(rounds):
            share = ops // rounds + (number < ops % rounds)
            bad_log += soak_round(sim, root / f"round-{number}", root, sources, summary, share, chaos)
    return summary, bad_log


def soak_round(sim, directory, root, sources, summary, ops, chaos):
    """One round on a fresh cache and mount; the daemon log's ERROR and Traceback lines."""
    from .mounts import MountProcess, isolated_environment

    bounds = ["--read-timeout", "2", "--read-deadline", "30"] if chaos else []
    directory.mkdir(parents=True)
    mount = MountProcess(root / "models.yaml", directory / "mnt", directory / "cache", sim.endpoint,
                         directory / "mount.log", env=isolated_environment(directory),
                         extra_args=["--block-size", "1M", *bounds])
    with mount, Chaos(sim, summary.seed + summary.ops, active=chaos):
        pairs = [(mount.mountpoint / "fsx" / name, path) for name, path in sources.items()]
        if chaos:       # every open on the daemon's path, faults ridden out by its fetches
            run(pairs, summary.seed + summary.ops, ops, summary.processes, summary=summary)
        else:
            run(pairs, summary.seed + summary.ops, ops // 2, summary.processes, summary=summary)
            complete_and_verify(pairs, summary)
            run(pairs, summary.seed + summary.ops, ops - ops // 2, summary.processes, summary=summary)
    for fault in sim.faults:
        summary.faults[fault.kind] += fault.hits
    sim.clear_faults()
    return [line for line in mount.log_text().splitlines() if " ERROR " in line or "Traceback" in line]


def complete_and_verify(pairs, summary, timeout=30):
    """Read every file whole (checking it) and wait until each is verified: opens after this
    are passthrough's where the mount has it."""
    deadline = time.monotonic() + timeout
    for mounted, source in pairs:
        with open(mounted, "rb") as got, open(source, "rb") as want:
            if got.read() != want.read():
                summary.mismatches.append({"seed": summary.seed, "error": f"whole read of {mounted} differs"})
        while os.getxattr(mounted, "user.lamina.verified") != b"yes":
            if time.monotonic() > deadline:     # read whole and never verified: a defect, not a wait
                summary.mismatches.append({"seed": summary.seed, "error": f"{mounted} read whole, not verified "
                                                                           f"after {timeout} s"})
                break
            time.sleep(0.05)


class Chaos:
    """Keeps one transient, recoverable fault pending, spaced by `spacing` requests, while active."""

    SPACING = 8

    def __init__(self, sim, seed, active=True, spacing=SPACING):
        self.sim, self.random, self.active, self.spacing = sim, random.Random(seed), active, spacing
        self._pending, self._requests_then = None, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self):
        if self.active:
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self.active:
            self._thread.join()

    def _loop(self):
        while not self._stop.wait(0.05):
            requests = len(self.sim.log)
            if (self._pending is None or self._pending.hits) and requests >= self._requests_then + self.spacing:
                self._pending, self._requests_then = self.sim.add_fault(self.draw()), requests

    def draw(self):
        from .hubsim import Fault

        cut = self.random.randrange(0, 256 * 1024)
        return self.random.choice((
            lambda: Fault("status", code=self.random.choice((500, 502, 503, 504)), method="GET", times=1),
            lambda: Fault("rate_limit", method="GET", seconds=1, times=1),
            lambda: Fault("reset", method="GET", after_bytes=cut, times=1),
            lambda: Fault("short", method="GET", after_bytes=cut, times=1),
            lambda: Fault("stall", method="GET", seconds=4, after_bytes=cut, times=1),
            lambda: Fault("ignore_range", times=1),
            lambda: Fault("delay", seconds=0.3, times=1),
        ))()


# ---------------------------------------------------------------------------
# Command line


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m vfs.testing.fsx", description=__doc__.splitlines()[0])
    parser.add_argument("mode", nargs="?", default="soak", choices=("soak", "check", "worker"))
    parser.add_argument("--file", action="append", default=[], metavar="MOUNTED=SOURCE",
                        help="a file in the mount and its source (check, worker); repeatable")
    parser.add_argument("--ops", type=int, default=100_000)
    parser.add_argument("--processes", type=int, default=4)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--block-size", type=int, default=MiB)
    parser.add_argument("--rounds", type=int, default=5, help="soak: fresh cache and mount per round")
    parser.add_argument("--chaos", action="store_true", help="soak: inject transient faults all along")
    return parser.parse_args(argv)


def split_pairs(texts):
    return [tuple(text.split("=", 1)) for text in texts]


def main(argv=None):
    args = parse_args(argv)
    if args.mode == "worker":
        report = Worker(checked_files(split_pairs(args.file)), args.seed, args.block_size).run(args.ops)
        print(json.dumps(report))
        return 0
    if args.mode == "check":
        summary, bad_log = run(split_pairs(args.file), args.seed, args.ops, args.processes, args.block_size), []
    else:
        summary, bad_log = soak(args.ops, args.processes, args.seed, args.rounds, args.chaos)
    print(summary)
    for problem in summary.mismatches:
        print(f"MISMATCH {problem}; replay: python -m vfs.testing.fsx {args.mode} --seed {summary.seed} "
              f"--ops {args.ops} --processes {args.processes} --rounds {args.rounds}"
              f"{' --chaos' if args.chaos else ''}", file=sys.stderr)
    for line in bad_log:
        print(f"daemon log: {line}", file=sys.stderr)
    return 1 if summary.mismatches or bad_log else 0


if __name__ == "__main__":
    sys.exit(main())
