"""The three-reader harness: preads, mmap page touches and an ls/stat loop over one mounted
file, each checking every byte, counting errors and wrong bytes, timing its longest stall.

It is what hand-overs and crashes are judged by: a reader that keeps a file open across a
daemon's death must see a stall, never an errno, never a wrong byte, never a hang.

    python -m vfs.testing.readers PATH REFERENCE [--seconds 10] [--drop-every 2] [--drop file|all]
    python -m vfs.testing.readers --baseline [--seconds 20]     # its own simulated Hub and mount

PATH is the file in the mount, REFERENCE a local file with the same bytes. Each reader is
a process of its own (a page fault on a FUSE mapping holds its whole process, and a
daemon's death kills an mmap reader with SIGBUS: both must stay out of the caller):

- `pread`: 1 MiB preads at random offsets through one descriptor held open for the whole
  run (the hard case: a handle that outlives its daemon), every 16th through a fresh open;
- `mmap`: random 4 KiB page touches of one mapping held for the whole run;
- `stat`: listdir of every directory from the mount root down to the file, and a stat of
  the file; the size and the inode number must never change.

With `drop_every`, the page cache is dropped that often, so reads keep reaching the daemon:
`file` (the default) drops only this file's pages, by each reader for itself
(posix_fadvise; the mmap reader first lets go of its own mapped pages with madvise, which
the kernel would otherwise keep), `all` adds a process that writes
/proc/sys/vm/drop_caches (what the issue's reference figure used; it disturbs everything
else on the machine).

A reader stops when its stdin closes; it prints a progress line every PROGRESS_SECONDS
(between operations only, so a stuck reader falls silent) and a JSON summary at the end.
A reader that does not finish within STOP_SECONDS of being asked is `hung`.
"""

import argparse
import errno
import json
import mmap
import os
import random
import select
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

MiB = 1024 * 1024
PREAD_SIZE = 1 * MiB
PAGE = mmap.PAGESIZE
FRESH_OPEN_EVERY = 16
PROGRESS_SECONDS = 0.25
STOP_SECONDS = 20.0
NOTED_STALL = 0.05              # operations at least this long are listed (when, how long)
NOTED_STALLS_KEPT = 500
KINDS = ("pread", "mmap", "stat")


# ---------------------------------------------------------------------------
# One reader (a child process)


class Tally:
    """What one reader saw: operations, bytes checked, errors by kind, wrong bytes, the longest stall."""

    def __init__(self, kind: str):
        self.kind = kind
        self.ops = 0
        self.bytes_checked = 0
        self.wrong_bytes = 0
        self.errors: dict[str, int] = {}
        self.longest_stall = 0.0
        self.longest_stall_at: float | None = None     # wall-clock time the longest operation started
        self.stalls: list[tuple[float, float]] = []     # (wall-clock start, seconds) of each >= NOTED_STALL
        self.first_problem: str | None = None

    def timed(self, operation):
        """Run `operation()`, timing it; an OSError is counted, not raised. Its result or None."""
        wall, started = time.time(), time.monotonic()
        try:
            return operation()
        except OSError as exc:
            code = exc.errno or 0
            self.error(errno.errorcode.get(code, str(code)), str(exc))
            return None
        finally:
            took = time.monotonic() - started
            self.ops += 1
            if took > self.longest_stall:
                self.longest_stall, self.longest_stall_at = took, wall
            if took >= NOTED_STALL and len(self.stalls) < NOTED_STALLS_KEPT:
                self.stalls.append((wall, took))

    def error(self, kind: str, detail: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1
        self.first_problem = self.first_problem or detail

    def check(self, got: bytes, expected: bytes, where: str) -> None:
        self.bytes_checked += len(expected)
        if got == expected:
            return
        if len(got) != len(expected):
            # A short read is legal for pread, but not from a file of this size: an error, whose
            # bytes (those it did return) are checked below.
            self.error("short read", f"{len(got)} of {len(expected)} bytes at {where}")
        wrong = sum(1 for a, b in zip(got, expected) if a != b)
        if wrong:
            self.wrong_bytes += wrong
            self.first_problem = self.first_problem or f"{wrong} wrong bytes at {where}"

    def as_dict(self) -> dict:
        return {"kind": self.kind, "ops": self.ops, "bytes_checked": self.bytes_checked,
                "wrong_bytes": self.wrong_bytes, "errors": self.errors,
                "longest_stall": self.longest_stall, "longest_stall_at": self.longest_stall_at,
                "stalls": self.stalls, "first_problem": self.first_problem}


def _asked_to_stop() -> bool:
    readable, _, _ = select.select([sys.stdin], [], [], 0)
    return bool(readable)       # the parent closed our stdin (EOF is readable)


def _loop(tally: Tally, step, drop_every: float | None = None, on_drop=None) -> None:
    last_progress = last_drop = time.monotonic()
    while not _asked_to_stop():
        step()
        now = time.monotonic()
        if drop_every and on_drop and now - last_drop >= drop_every:
            on_drop()
            last_drop = now
        if now - last_progress >= PROGRESS_SECONDS:
            print(json.dumps({"progress": tally.ops}), flush=True)
            last_progress = now


def read_by_pread(path: Path, reference: Path, seed: int, tally: Tally, drop_every=None) -> None:
    size = reference.stat().st_size
    rng = random.Random(seed)
    with open(reference, "rb") as ref:
        held = os.open(path, os.O_RDONLY)
        try:
            def step():
                offset = rng.randrange(max(1, size - PREAD_SIZE // 2))
                if tally.ops % FRESH_OPEN_EVERY == FRESH_OPEN_EVERY - 1:
                    got = tally.timed(lambda: _pread_fresh(path, offset))
                else:
                    got = tally.timed(lambda: os.pread(held, PREAD_SIZE, offset))
                if got is not None:
                    tally.check(got, os.pread(ref.fileno(), PREAD_SIZE, offset), f"offset {offset}")
            _loop(tally, step, drop_every, lambda: _drop_file_pages(held))
        finally:
            os.close(held)


def _pread_fresh(path, offset):
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.pread(fd, PREAD_SIZE, offset)
    finally:
        os.close(fd)


def read_by_mmap(path: Path, reference: Path, seed: int, tally: Tally, drop_every=None) -> None:
    size = reference.stat().st_size
    rng = random.Random(seed)
    pages = max(1, size // PAGE)
    with open(path, "rb") as mounted, open(reference, "rb") as ref:
        mapping = mmap.mmap(mounted.fileno(), size, prot=mmap.PROT_READ)
        try:
            def step():
                offset = rng.randrange(pages) * PAGE
                got = tally.timed(lambda: mapping[offset:offset + PAGE])
                tally.check(got, os.pread(ref.fileno(), PAGE, offset), f"page at {offset}")
            def drop():
                # Our own mapped pages cannot be dropped from the page cache: unmap them first.
                mapping.madvise(mmap.MADV_DONTNEED)
                _drop_file_pages(mounted.fileno())
            _loop(tally, step, drop_every, drop)
        finally:
            mapping.close()


def read_by_stat(path: Path, reference: Path, seed: int, tally: Tally, drop_every=None) -> None:
    size = reference.stat().st_size
    chain = _directories_down_to(path)
    first = os.stat(path)

    def step():
        for directory, child in chain:
            names = tally.timed(lambda: os.listdir(directory))
            if names is not None and child not in names:
                tally.error("missing", f"{child} not listed in {directory}")
        found = tally.timed(lambda: os.stat(path))
        if found is not None and (found.st_size, found.st_ino) != (size, first.st_ino):
            tally.error("changed", f"stat says size {found.st_size} inode {found.st_ino}, "
                                   f"expected {size} and {first.st_ino}")
    _loop(tally, step)


def _directories_down_to(path: Path) -> list[tuple[Path, str]]:
    """(directory, name of the next step) from the mount root down to `path`."""
    root = Path(path)
    while not os.path.ismount(root) and root.parent != root:
        root = root.parent
    parts = Path(path).relative_to(root).parts
    return [(root.joinpath(*parts[:i]), parts[i]) for i in range(len(parts))]


def _drop_file_pages(fd: int) -> None:
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    except OSError:
        pass            # advice only: a dead mount shows in the reads, not here


def drop_all_pages(tally: Tally, drop_every: float) -> None:
    """Drop the whole machine's page cache every `drop_every` seconds."""
    def step():
        time.sleep(drop_every)
        tally.timed(lambda: Path("/proc/sys/vm/drop_caches").write_text("1\n"))
    _loop(tally, step)


READERS = {"pread": read_by_pread, "mmap": read_by_mmap, "stat": read_by_stat}


def run_one(kind: str, path: Path, reference: Path, seed: int, drop_every: float | None, drop: str) -> None:
    """A reader process's body: read until stdin closes, then print the tally as JSON."""
    tally = Tally(kind)
    if kind == "drop":
        drop_all_pages(tally, drop_every or 2.0)
    else:
        READERS[kind](path, reference, seed, tally, drop_every=drop_every)
    print(json.dumps({"result": tally.as_dict()}), flush=True)


# ---------------------------------------------------------------------------
# The harness (in the caller's process)


@dataclass
class ReaderResult:
    kind: str
    ops: int = 0
    bytes_checked: int = 0
    wrong_bytes: int = 0
    errors: dict = field(default_factory=dict)
    longest_stall: float = 0.0
    longest_stall_at: float | None = None
    stalls: list = field(default_factory=list)     # [wall-clock start, seconds] of each stall >= NOTED_STALL
    first_problem: str | None = None
    died: str | None = None         # "SIGBUS", "exit 1", "hung": the reader did not finish cleanly

    @property
    def error_count(self) -> int:
        return sum(self.errors.values()) + (1 if self.died else 0)


@dataclass
class Results:
    readers: list[ReaderResult]

    @property
    def errors(self) -> int:
        return sum(r.error_count for r in self.readers if r.kind != "drop")

    @property
    def wrong_bytes(self) -> int:
        return sum(r.wrong_bytes for r in self.readers)

    @property
    def longest_stall(self) -> float:
        return max((r.longest_stall for r in self.readers if r.kind != "drop"), default=0.0)

    @property
    def ops(self) -> int:
        return sum(r.ops for r in self.readers if r.kind != "drop")

    @property
    def ok(self) -> bool:
        return self.errors == 0 and self.wrong_bytes == 0

    def problems(self) -> list[str]:
        return [f"{r.kind}: died={r.died} errors={r.errors} wrong={r.wrong_bytes} first: {r.first_problem}"
                for r in self.readers if r.error_count or r.wrong_bytes]

    def summary(self) -> str:
        each = ", ".join(f"{r.kind} {r.ops} ops {r.longest_stall * 1000:.0f} ms"
                         for r in self.readers if r.kind != "drop")
        return (f"{self.errors} errors, {self.wrong_bytes} wrong bytes, longest stall "
                f"{self.longest_stall * 1000:.0f} ms ({each})")

    def as_dict(self) -> dict:
        return {"errors": self.errors, "wrong_bytes": self.wrong_bytes, "longest_stall": self.longest_stall,
                "ops": self.ops, "readers": [vars(r) for r in self.readers]}


class _Child:
    """One reader process and what it has said so far."""

    def __init__(self, kind, argv, env):
        self.kind = kind
        self.process = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, env=env)
        self.progress = 0
        self.last_heard = time.monotonic()
        self.result = None
        self._listener = threading.Thread(target=self._listen, daemon=True)
        self._listener.start()

    def _listen(self):
        assert self.process.stdout is not None
        for line in self.process.stdout:
            message = json.loads(line)
            self.progress = message.get("progress", self.progress)
            self.result = message.get("result", self.result)
            self.last_heard = time.monotonic()

    def stop(self, deadline) -> ReaderResult:
        try:
            if self.process.stdin is not None:
                self.process.stdin.close()
        except OSError:
            pass
        try:
            self.process.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            return ReaderResult(self.kind, ops=self.progress, died="hung",
                                first_problem=f"no answer {STOP_SECONDS:.0f} s after being asked to stop")
        self._listener.join(5)
        return self._outcome()

    def _outcome(self) -> ReaderResult:
        code = self.process.returncode
        if code == 0 and self.result is not None:
            return ReaderResult(**self.result)
        died = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit {code}"
        output = self.process.stderr.read() if self.process.stderr is not None else b""
        stderr = output.decode(errors="replace").strip().splitlines()
        return ReaderResult(self.kind, ops=self.progress, died=died,
                            first_problem=stderr[-1] if stderr else None)


class Readers:
    """The three readers over `path` (and, with drop="all", a page-cache dropper), checked against `reference`.

        with Readers(path, reference, drop_every=2.0) as readers:
            ...                         # kill, upgrade, hand over
            readers.wait_for_progress()
        print(readers.results.summary())
    """

    def __init__(self, path, reference, seed: int = 0, drop_every: float | None = None,
                 drop: str = "file", kinds=KINDS):
        self.path, self.reference = Path(path), Path(reference)
        self.seed, self.drop_every, self.drop, self.kinds = seed, drop_every, drop, tuple(kinds)
        self.children: list[_Child] = []
        self.results: Results | None = None

    def start(self) -> "Readers":
        kinds = self.kinds + (("drop",) if self.drop_every and self.drop == "all" else ())
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [_source_root(), os.environ.get("PYTHONPATH")])))
        for index, kind in enumerate(kinds):
            argv = [sys.executable, "-m", "vfs.testing.readers", "--one", kind, str(self.path), str(self.reference),
                    "--seed", str(self.seed + index), "--drop", self.drop]
            if self.drop_every:
                argv += ["--drop-every", str(self.drop_every)]
            self.children.append(_Child(kind, argv, env))
        self.wait_for_progress()
        return self

    def progress(self) -> dict[str, int]:
        return {child.kind: child.progress for child in self.children}

    def wait_for_progress(self, operations: int = 3, timeout: float = 30.0) -> bool:
        """Wait until every reader has done `operations` more operations than now; whether they did."""
        wanted = {child: child.progress + operations for child in self.children if child.kind != "drop"}
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(child.progress >= goal or child.process.poll() is not None for child, goal in wanted.items()):
                return all(child.process.poll() is None for child in wanted)
            time.sleep(0.02)
        return False

    def stop(self) -> Results:
        deadline = time.monotonic() + STOP_SECONDS
        self.results = Results([child.stop(deadline) for child in self.children])
        return self.results

    def __enter__(self) -> "Readers":
        return self.start()

    def __exit__(self, *exc) -> None:
        if self.results is None:
            self.stop()


def _source_root() -> str:
    """The directory holding the `vfs` package, so a reader imports this very code."""
    return str(Path(__file__).resolve().parents[2])


# ---------------------------------------------------------------------------
# Baseline: the same readers on a fresh mount, with no hand-over


def baseline(seconds: float, drop_every: float, drop: str, size: int = 256 * MiB, mount_args=()) -> Results:
    """The reference stall: the three readers on a mount of the simulator, nothing handed over."""
    import tempfile

    from .hubsim import HubSimulator
    from .mounts import MountProcess

    with tempfile.TemporaryDirectory(prefix="lamina-readers-") as scratch, HubSimulator() as hub:
        work = Path(scratch)
        reference = write_reference(work / "model.gguf", size)
        hub.add_repo("readers/model", files={"model.gguf": reference})
        manifest = work / "models.yaml"
        manifest.write_text(ONE_MODEL_MANIFEST)
        with MountProcess(manifest, work / "mnt", work / "cache", hub.endpoint, work / "mount.log",
                          extra_args=mount_args) as mounted:
            path = mounted.mountpoint / "model" / "model.gguf"
            read_through(path)          # stalls measured are the hand-over's, not first fetches
            with Readers(path, reference, drop_every=drop_every, drop=drop) as readers:
                time.sleep(seconds)
            return readers.stop()


def read_through(path: Path) -> None:
    """Read `path` once to the end (so the daemon's cache holds every block)."""
    with open(path, "rb") as f:
        while f.read(4 * MiB):
            pass


ONE_MODEL_MANIFEST = """\
models:
  model: {path: /models/model/model.gguf, backend: llama.cpp, hf: readers/model, file: model.gguf}
"""


def write_reference(path: Path, size: int, seed: int = 7) -> Path:
    """`size` deterministic pseudo-random bytes at `path` (the simulator serves them; readers check them)."""
    rng = random.Random(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as out:
        left = size
        while left:
            out.write(rng.randbytes(min(left, 4 * MiB)))
            left -= min(left, 4 * MiB)
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vfs.testing.readers", description=__doc__.split("\n")[0])
    parser.add_argument("path", nargs="?", type=Path)
    parser.add_argument("reference", nargs="?", type=Path)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--drop-every", type=float, default=None)
    parser.add_argument("--drop", choices=("file", "all"), default="file")
    parser.add_argument("--baseline", action="store_true", help="mount a simulated model and measure, no hand-over")
    parser.add_argument("--no-passthrough", action="store_true",
                        help="with --baseline: every read through the daemon")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--one", choices=KINDS + ("drop",), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        run_one(args.one, args.path, args.reference, args.seed, args.drop_every, args.drop)
        return 0
    if args.baseline:
        results = baseline(args.seconds, args.drop_every or 2.0, args.drop,
                           mount_args=["--no-passthrough"] if args.no_passthrough else [])
    elif args.path and args.reference:
        with Readers(args.path, args.reference, args.seed, args.drop_every, args.drop) as readers:
            time.sleep(args.seconds)
            results = readers.stop()
    else:
        parser.error("give PATH and REFERENCE, or --baseline")
    print(json.dumps(results.as_dict(), indent=2) if args.json else results.summary())
    return 0 if results.ok else 1


if __name__ == "__main__":
    sys.exit(main())
