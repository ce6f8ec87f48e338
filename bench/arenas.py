"""`python -m bench.arenas`: the daemon's peak RSS over a cold sequential read, with glibc's malloc arenas capped and not.

What `mount.limit_malloc_arenas` buys: both daemons run this checkout's code, one as it
is and one with the cap taken out (a copy of `vfs/` with the mallopt call removed), over
the same big file from the same simulator, cold (fresh block cache, page cache dropped),
in alternating order each round. Peak RSS is the daemon's VmHWM at the end of the read;
the daemon's CPU time per MiB (all its threads, from /proc) says whether fewer arenas
cost the threads that allocate (throughput on a shared machine swings too much to).
Root: it drops the page cache and mounts.
"""

import argparse
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

from vfs.testing.mounts import MountProcess, isolated_environment

from .data import MIB, big_file
from .machine import drop_caches, warm
from .overhead import ROOT, daemon_cpu_seconds
from .probes import read_sequential, rss_peak_bytes
from .server import HubProcess

MANIFEST = "models:\n  big:\n    path: /models/big/\n    backend: vllm\n    hf: bench/big\n"
CAP_CALL = "        ctypes.CDLL(None).mallopt(M_ARENA_MAX, arenas)\n"


def variants(work: Path) -> dict[str, Path]:
    """name -> a directory to put on PYTHONPATH: this checkout's vfs/, and a copy without the cap."""
    capped, uncapped = work / "capped", work / "uncapped"
    for target in (capped, uncapped):
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(ROOT / "vfs", target / "vfs")
    mount_py = uncapped / "vfs" / "mount.py"
    text = mount_py.read_text()
    if CAP_CALL not in text:
        sys.exit("vfs/mount.py no longer caps the arenas with the call this benchmark takes out")
    mount_py.write_text(text.replace(CAP_CALL, "        return\n"))
    return {"arenas capped (2)": capped, "glibc's default arenas": uncapped}


def cold_read(hub: HubProcess, work: Path, name: str, pythonpath: Path, big: Path) -> tuple[float, float, float]:
    """(MB/s, daemon CPU microseconds per MiB, peak RSS MiB) of one cold read of `big` through a fresh mount."""
    cache = work / f"cache-{name.split()[0]}"
    shutil.rmtree(cache, ignore_errors=True)
    env = isolated_environment(work, {"PYTHONPATH": str(pythonpath)})
    mount = MountProcess(work / "models.yaml", work / "mnt", cache, hub.endpoint, work / "mount.log", env=env)
    mount.start()
    try:
        drop_caches()
        warm(big)
        assert mount.process is not None
        before = daemon_cpu_seconds(mount.process.pid)
        rate = read_sequential(work / "mnt" / "big" / big.name)
        cpu = daemon_cpu_seconds(mount.process.pid) - before
        return rate / 1e6, cpu * 1e6 / (big.stat().st_size / MIB), rss_peak_bytes(mount.process.pid) / MIB
    finally:
        mount.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.arenas", description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "lamina-bench-arenas"))
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        sys.exit("the benchmark drops the page cache and mounts: run it as root")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    (work / "models.yaml").write_text(MANIFEST)
    daemons = variants(work)
    big = big_file(work / "repo-big", args.size_mib * MIB)
    os.chdir(work)          # not the checkout: PYTHONPATH alone decides which code a daemon runs
    figures: dict[str, dict[str, list[float]]] = {name: {"MB/s": [], "us CPU per MiB": [], "MiB peak RSS": []}
                                                  for name in daemons}
    with HubProcess({"bench/big": big.parent}) as hub:
        for round_ in range(args.rounds):
            for name in list(daemons) if round_ % 2 == 0 else list(reversed(daemons)):
                rate, cpu, peak = cold_read(hub, work, name, daemons[name], big)
                for unit, value in zip(figures[name], (rate, cpu, peak)):
                    figures[name][unit].append(value)
                print(f"round {round_ + 1}: {name}: {rate:,.0f} MB/s, {cpu:,.0f} us CPU per MiB, "
                      f"peak RSS {peak:.0f} MiB", flush=True)
    capped, uncapped = daemons
    for unit in figures[capped]:
        ratios = [c / u for c, u in zip(figures[capped][unit], figures[uncapped][unit])]
        for name in daemons:
            values = figures[name][unit]
            print(f"{unit}, {name}: median {statistics.median(values):,.0f} ({', '.join(f'{v:,.0f}' for v in values)})")
        print(f"{unit}, capped / default per round: {', '.join(f'{r:.2f}' for r in ratios)} "
              f"(median {statistics.median(ratios):.2f})")


if __name__ == "__main__":
    main()
