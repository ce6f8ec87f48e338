"""`python -m bench.loopback_ab BASELINE`: cold sequential reads on loopback, a baseline commit's daemon against this checkout's.

For a change to the fetch path that must not slow the unshaped case (parts and the
concurrency controller): both daemons read the same big file from the same simulator,
cold (fresh block cache, page cache dropped, the server's file read back in), in
alternating order each round. With `--rate` and `--delay` the simulator shapes the link
as `python -m bench --only link` does, and each read also reports the requests in flight
at the simulator (sampled every 50 ms: their mean and the most seen), for a
change meant to fill a shaped link. Two figures per read: the throughput, and the daemon's CPU
time per MiB read (all its threads, from /proc). On a machine shared with other work the
throughput swings by 2x from one read to the next; the CPU a daemon spends per MiB moves
far less with the load, and is what a cost in the fetch path would show as. Each is
compared by its medians and by the per-round ratios (this checkout / baseline, the two
reads of a round taken back to back).
"""

import argparse
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

from vfs.testing.link import parse_rate
from vfs.testing.mounts import MountProcess, isolated_environment

from .data import MIB, big_file
from .link import InFlightSampler
from .machine import drop_caches, warm
from .overhead import ROOT, daemon_cpu_seconds, export
from .probes import read_sequential
from .server import HubProcess

MANIFEST = "models:\n  big:\n    path: /models/big/\n    backend: vllm\n    hf: bench/big\n"


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m bench.loopback_ab", description=__doc__.splitlines()[0])
    parser.add_argument("baseline", help="the commit to compare against (e.g. the one before a change)")
    parser.add_argument("--candidate", metavar="COMMIT",
                        help="compare this commit's daemon with the baseline's, not this checkout's")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "lamina-bench-ab"))
    parser.add_argument("--rate", type=parse_rate, metavar="BYTES/S",
                        help="shape the link: cap each response at this rate, e.g. 40MB (default: loopback as is)")
    parser.add_argument("--delay", type=float, default=0.0, metavar="SECONDS",
                        help="shape the link: wait this long before every reply, e.g. 0.03")
    parser.add_argument("--verbose", action="store_true",
                        help="daemons log at DEBUG (the controller's decisions) into WORK/NAME.log")
    return parser.parse_args(argv)


def cold_read(hub, work, name, pythonpath, big, extra_args=()):
    """(MB/s, daemon CPU microseconds per MiB, (mean, most) in flight) of one cold read of
    `big` through a fresh mount."""
    cache = work / f"cache-{name}"
    shutil.rmtree(cache, ignore_errors=True)
    env = isolated_environment(work, {"PYTHONPATH": str(pythonpath)})
    mount = MountProcess(work / "models.yaml", work / "mnt", cache, hub.endpoint, work / f"{name}.log", env=env,
                         extra_args=list(extra_args), keeper=not knows_no_keeper(pythonpath))
    mount.start()
    try:
        drop_caches()
        warm(big)
        before = daemon_cpu_seconds(mount.process.pid)
        with InFlightSampler(hub.client) as in_flight:
            rate = read_sequential(work / "mnt" / "big" / big.name)
        cpu = daemon_cpu_seconds(mount.process.pid) - before
        return rate / 1e6, cpu * 1e6 / (big.stat().st_size / MIB), in_flight.summary()
    finally:
        mount.stop()


def knows_no_keeper(pythonpath):
    """Whether that version's daemon takes --no-keeper (older ones have no keeper: the process
    started is the daemon either way, and its CPU is what is measured)."""
    return "--no-keeper" in (Path(pythonpath) / "vfs" / "cli.py").read_text()


def summary(name, values, unit):
    return f"{name}: median {statistics.median(values):,.0f} {unit} ({', '.join(f'{v:,.0f}' for v in values)})"


def compare(figures, base, unit, what):
    ours, theirs = figures["this checkout"], figures[base]
    ratios = [o / t for o, t in zip(ours, theirs)]
    for name in (base, "this checkout"):
        print(summary(f"{what}, {name}", figures[name], unit))
    print(f"{what}, this checkout / baseline: {statistics.median(ours) / statistics.median(theirs):.2f}x of the "
          f"medians; per round {', '.join(f'{r:.2f}' for r in ratios)} (median {statistics.median(ratios):.2f}, "
          f"{sum(r > 1 for r in ratios)} of {len(ratios)} above 1)")


def daemons_to_compare(args, manifest: str) -> tuple[Path, str, dict]:
    """The work directory (with `manifest` in it), the baseline's label, and the code each
    compared daemon runs, by label: the baseline's and this checkout's (or --candidate's)."""
    if os.geteuid() != 0:
        sys.exit("the benchmark drops the page cache and mounts: run it as root")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    (work / "models.yaml").write_text(manifest)
    commit, baseline = export(args.baseline, work / "exports")
    base = f"baseline {commit[:12]}"
    theirs = export(args.candidate, work / "exports") if args.candidate else None
    return work, base, {base: baseline, "this checkout": theirs[1] if theirs else ROOT}


def main(argv=None):
    args = parse_args(argv)
    work, base, daemons = daemons_to_compare(args, MANIFEST)
    big = big_file(work / "repo-big", args.size_mib * MIB)
    os.chdir(work)          # not the checkout: PYTHONPATH alone decides which code a daemon runs
    rates = {name: [] for name in daemons}
    cpu = {name: [] for name in daemons}
    with HubProcess({"bench/big": big.parent}) as hub:
        if args.rate or args.delay:
            hub.client.set_link(rate=args.rate, delay=args.delay)
            print(f"link: {args.rate / 1e6 if args.rate else 'unlimited'} MB/s per response, "
                  f"{args.delay * 1000:g} ms per reply", flush=True)
        for round_ in range(args.rounds):
            order = list(daemons) if round_ % 2 == 0 else list(reversed(daemons))
            for name in order:
                rate, per_mib, (mean, most) = cold_read(hub, work, name.split()[0], daemons[name], big,
                                                           ["-v"] if args.verbose else [])
                rates[name].append(rate)
                cpu[name].append(per_mib)
                print(f"round {round_ + 1}: {name}: {rate:,.0f} MB/s, {per_mib:,.0f} us CPU per MiB, "
                      f"requests in flight: mean {mean:.1f}, most {most}", flush=True)
    if args.candidate:
        print(f"'this checkout' above is commit {args.candidate}")
    compare(rates, base, "MB/s", "throughput")
    compare(cpu, base, "us per MiB", "daemon CPU")


if __name__ == "__main__":
    main()
