"""`python -m bench.loopback_ab BASELINE`: cold sequential reads on loopback, a baseline commit's daemon against this checkout's.

For a change to the fetch path that must not slow the unshaped case (parts and the
concurrency controller): both daemons read the same big file from the same simulator,
cold (fresh block cache, page cache dropped, the server's file read back in), in
alternating order each round, and the medians are compared.
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
from .overhead import ROOT, export
from .probes import read_sequential
from .server import HubProcess

MANIFEST = "models:\n  big:\n    path: /models/big/\n    backend: vllm\n    hf: bench/big\n"


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m bench.loopback_ab", description=__doc__.splitlines()[0])
    parser.add_argument("baseline", help="the commit to compare against (e.g. the one before a change)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "lamina-bench-ab"))
    return parser.parse_args(argv)


def cold_read(hub, work, name, pythonpath, big):
    cache = work / f"cache-{name}"
    shutil.rmtree(cache, ignore_errors=True)
    env = isolated_environment(work, {"PYTHONPATH": str(pythonpath)})
    mount = MountProcess(work / "models.yaml", work / "mnt", cache, hub.endpoint, work / f"{name}.log", env=env)
    mount.start()
    try:
        drop_caches()
        warm(big)
        return read_sequential(work / "mnt" / "big" / big.name)
    finally:
        mount.stop()


def main(argv=None):
    args = parse_args(argv)
    if os.geteuid() != 0:
        sys.exit("the benchmark drops the page cache and mounts: run it as root")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    (work / "models.yaml").write_text(MANIFEST)
    commit, baseline = export(args.baseline, work / "exports")
    daemons = {f"baseline {commit[:12]}": baseline, "this checkout": ROOT}
    big = big_file(work / "repo-big", args.size_mib * MIB)
    os.chdir(work)          # not the checkout: PYTHONPATH alone decides which code a daemon runs
    figures = {name: [] for name in daemons}
    with HubProcess({"bench/big": big.parent}) as hub:
        for round_ in range(args.rounds):
            order = list(daemons) if round_ % 2 == 0 else list(reversed(daemons))
            for name in order:
                figures[name].append(cold_read(hub, work, name.split()[0], daemons[name], big) / 1e6)
                print(f"round {round_ + 1}: {name}: {figures[name][-1]:,.0f} MB/s", flush=True)
    medians = {name: statistics.median(values) for name, values in figures.items()}
    for name, values in figures.items():
        print(f"{name}: median {medians[name]:,.0f} MB/s ({', '.join(f'{v:,.0f}' for v in values)})")
    print(f"this checkout / baseline: {medians['this checkout'] / medians[f'baseline {commit[:12]}']:.2f}x")


if __name__ == "__main__":
    main()
