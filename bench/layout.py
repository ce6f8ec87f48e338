"""`python -m bench.layout`: does a blob's on-disk layout move a llama.cpp-style load?

The block cache writes a blob's blocks as they arrive, several at once, into a sparse
file: a blob filled that way ends in more extents than a plain copy of the same bytes.
This measures whether that costs a hot-cache load anything. A passthrough mount's cache
is filled by one cold sequential read of a GGUF (as `bench.passthrough` fills it); then
each round loads, pages dropped first (POSIX_FADV_DONTNEED on the file and on the blob
file behind it):

- the mounted file (passthrough: the kernel reads the blob file);
- the blob file itself, no mount;
- a contiguous copy of the blob (fallocate, then one sequential write: what allocating
  a blob's data file ahead would give);
- the local copy the Hub server serves (copied in one sequential write).

The order rotates per round; the figure is the median of the per-round ratios to the
local copy, with their geometric mean and range. Extents are counted with `filefrag`.
Root: it mounts with passthrough and drops pages.

`--compare-code DIR` adds a second mount whose daemon runs the code of DIR (a checkout of
another commit, on PYTHONPATH), over its own cache filled the same way: the two daemons'
loads side by side (e.g. before and after a change to how opens are answered).
"""

import argparse
import contextlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from . import probes
from .data import MIB, big_file, four_files, gguf_file
from .overhead import drop_pages
from .passthrough import PathMount, wait_for_passthrough
from .server import HubProcess

COPY_CHUNK = 8 * MIB
# probes.llama_style_load_seconds's load, timed by phase: the header freads (one open),
# the second open, the MAP_POPULATE mmap.
_LOAD_PHASES = """
import mmap, os, sys, time
started = time.perf_counter()
with open(sys.argv[1], "rb", buffering=4096) as header:
    for _ in range(64):
        header.read(4096)
headed = time.perf_counter()
fd = os.open(sys.argv[1], os.O_RDONLY)
opened = time.perf_counter()
mapped = mmap.mmap(fd, os.fstat(fd).st_size, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE, prot=mmap.PROT_READ)
print(headed - started, opened - headed, time.perf_counter() - opened)
"""
PHASES = ("header freads", "second open", "MAP_POPULATE")


def extents(path: Path) -> int:
    out = subprocess.run(["filefrag", str(path)], capture_output=True, text=True, check=True).stdout
    return int(out.rsplit(":", 1)[1].split()[0])


def contiguous_copy(source: Path, target: Path) -> Path:
    """`source`'s bytes in a file allocated in one go, then written in order."""
    size = source.stat().st_size
    with open(source, "rb") as reader, open(target, "wb") as writer:
        os.posix_fallocate(writer.fileno(), 0, size)
        while chunk := reader.read(COPY_CHUNK):
            writer.write(chunk)
        os.fsync(writer.fileno())
    return target


def load_phases(path: Path) -> list[float]:
    """Seconds of each of PHASES of a llama.cpp-style load of `path`, in its own process."""
    out = subprocess.run([sys.executable, "-c", _LOAD_PHASES, str(path)], capture_output=True, text=True,
                         check=True).stdout
    return [float(figure) for figure in out.split()]


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.layout", description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--gguf-mib", type=int, default=320)
    parser.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "lamina-bench-layout"))
    parser.add_argument("--compare-code", metavar="DIR", help="also load through a mount running DIR's code")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        sys.exit("the benchmark mounts with passthrough and drops pages: run it as root")
    started, work = time.monotonic(), Path(args.work)
    print(uptime(), flush=True)
    gguf = gguf_file(work / "repo-gguf", args.gguf_mib)
    local = work / "local" / gguf.name
    local.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(gguf, local)            # one sequential write, as a download leaves a file
    big, four = big_file(work / "repo-big", 16 * MIB), four_files(work / "repo-four", 1)   # the manifest names them
    other = {"PYTHONPATH": os.path.abspath(args.compare_code)} if args.compare_code else None
    with HubProcess({"bench/big": big.parent, "bench/gguf": gguf.parent, "bench/four": four[0].parent}) as hub:
        for name, env in (("mount", None), ("other", other)) if other else (("mount", None),):
            with PathMount(work, hub.endpoint, name, (), fresh=True, env=env) as mount:
                probes.read_sequential(mount.gguf)
                mount.wait_verified(mount.gguf)
        with contextlib.ExitStack() as mounts:
            mount = mounts.enter_context(PathMount(work, hub.endpoint, "mount", ()))
            wait_for_passthrough((mount.gguf,))
            blob = mount.blob_file(mount.gguf)
            copy = contiguous_copy(blob, work / "contiguous.gguf")
            files = {"the mount": (mount.gguf, blob), "its blob file": (blob, blob),
                     "a contiguous copy of the blob": (copy, copy), "the local copy": (local, local)}
            if other:
                compared = mounts.enter_context(PathMount(work, hub.endpoint, "other", (), env=other))
                wait_for_passthrough((compared.gguf,))
                files[f"the mount running {args.compare_code}"] = (compared.gguf, compared.blob_file(compared.gguf))
            for name, (path, behind) in files.items():
                print(f"{name}: {extents(behind)} extents", flush=True)
            phases: dict[str, list[list[float]]] = {name: [] for name in files}
            names = list(files)
            for number in range(args.rounds):
                for name in names[number % len(names):] + names[:number % len(names)]:
                    path, behind = files[name]
                    drop_pages(path)
                    drop_pages(behind)
                    phases[name].append(load_phases(path))
    size = local.stat().st_size
    seconds = {name: [sum(load) for load in loads] for name, loads in phases.items()}
    for name in names:
        ratios = [seconds["the local copy"][n] / seconds[name][n] for n in range(args.rounds)]
        print(f"{name}: {size / statistics.median(seconds[name]) / 1e6:,.0f} MB/s, "
              f"{statistics.median(ratios):.3f}x the local copy (geometric mean "
              f"{statistics.geometric_mean(ratios):.3f}x, {min(ratios):.2f}-{max(ratios):.2f}x, {args.rounds} rounds)")
    for name in names:
        print(f"{name}, by phase (medians): " + ", ".join(
            f"{what} {statistics.median(column) * 1e3:.2f} ms" for what, column in zip(PHASES, zip(*phases[name]))))
    print(uptime())
    copy.unlink()
    print(f"{time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    main(sys.argv[1:])
