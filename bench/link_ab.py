"""`python -m bench.link_ab BASELINE --case four|load`: a shaped-link row, a baseline commit's daemon against this checkout's.

For a change meant to move one row of `python -m bench --only link` (block buffers,
the controller's ramp): both daemons run the same case against the same simulator and
link, cold (fresh block cache, page cache dropped, the server's files read back in), in
alternating order each round, so that the machine's load hits both alike.

- `four`: four cold readers of four different files at once; the total MB/s, the
  slowest reader's time over the fastest's, the MiB served from the cache's disk
  (blocks fetched ahead and recycled before their reader got there, read back), and the
  requests in flight at the simulator's CDN, on average over the read.
- `load`: a llama.cpp-style load (header reads, then mmap MAP_POPULATE) of a GGUF
  through a cold mount; seconds.

Each also gives the daemon's CPU time per MiB (all its threads, from /proc), which moves
far less with the machine's load than the throughput does, and the machine's idle share
while the case ran: near 0%, the cores were the limit, not the link.
"""

import argparse
import os
import shutil
import statistics
import tempfile

from vfs.testing.link import parse_rate
from vfs.testing.mounts import MountProcess, isolated_environment

from .data import MIB, four_files, gguf_file
from .link import InFlightSampler, _free_port, _parallel_reads, served_from_disk
from .loopback_ab import daemons_to_compare, knows_no_keeper
from .machine import drop_caches, warm
from .overhead import daemon_cpu_seconds
from .probes import llama_style_load_seconds
from .server import HubProcess

MANIFEST = ("models:\n  four:\n    path: /models/four/\n    backend: vllm\n    hf: bench/four\n"
            "  gguf:\n    path: /models/gguf/model.gguf\n    backend: llama.cpp\n    hf: bench/gguf\n"
            "    file: model.gguf\n")


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m bench.link_ab", description=__doc__.splitlines()[0])
    parser.add_argument("baseline", help="the commit to compare against (e.g. the one before a change)")
    parser.add_argument("--candidate", metavar="COMMIT",
                        help="compare this commit's daemon with the baseline's, not this checkout's")
    parser.add_argument("--case", choices=("four", "load"), default="four")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--four-mib", type=int, default=256, help="size of each of the four files")
    parser.add_argument("--gguf-mib", type=int, default=320)
    parser.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "lamina-bench-link-ab"))
    parser.add_argument("--rate", type=parse_rate, default=40e6, metavar="BYTES/S",
                        help="cap each response at this rate (default 40MB)")
    parser.add_argument("--delay", type=float, default=0.03, metavar="SECONDS",
                        help="wait this long before every reply (default 0.03)")
    parser.add_argument("--mount-args", default="", help="more arguments for both daemons, e.g. '--memory 256M'")
    return parser.parse_args(argv)


def one_round(case, hub, work, name, pythonpath, files, extra_args):
    """The case's figures for one daemon: {figure: value}."""
    cache = work / f"cache-{name}"
    shutil.rmtree(cache, ignore_errors=True)
    api = f"127.0.0.1:{_free_port()}"
    env = isolated_environment(work, {"PYTHONPATH": str(pythonpath)})
    mount = MountProcess(work / "models.yaml", work / "mnt", cache, hub.endpoint, work / f"{name}.log", env=env,
                         extra_args=["--api", api, *extra_args], keeper=not knows_no_keeper(pythonpath))
    mount.start()
    try:
        drop_caches()
        warm(*files["four"], files["gguf"])
        before, idle_before = daemon_cpu_seconds(mount.process.pid), machine_idle_ticks()
        if case == "four":
            with InFlightSampler(hub.client) as in_flight:
                total, seconds = _parallel_reads(sorted((work / "mnt" / "four").iterdir()))
            figures = {"MB/s": total / max(seconds) / 1e6, "spread": max(seconds) / min(seconds),
                       "MiB from disk": served_from_disk(api) / MIB, "mean in flight": in_flight.summary()[0]}
        else:
            total = files["gguf"].stat().st_size
            figures = {"seconds": llama_style_load_seconds(work / "mnt" / "gguf" / "model.gguf")}
        figures["us CPU per MiB"] = (daemon_cpu_seconds(mount.process.pid) - before) * 1e6 / (total / MIB)
        # Whether the machine or the link was the limit: at 0% idle, every process (the
        # daemon, the simulator, the readers) waited for a core, not for bytes.
        idle_after = machine_idle_ticks()
        figures["% machine idle"] = idle_share(idle_before, idle_after, 0)
        figures["% machine iowait"] = idle_share(idle_before, idle_after, 1)
        return figures
    finally:
        mount.stop()


def machine_idle_ticks():
    """(idle, iowait, total) CPU ticks of the whole machine so far (/proc/stat)."""
    ticks = [int(v) for v in open("/proc/stat").readline().split()[1:]]
    return ticks[3], ticks[4], sum(ticks)


def idle_share(before, after, which):
    """The share of the machine's CPU time (in %) between two `machine_idle_ticks` that was
    idle (`which` 0) or waiting on the disk (1)."""
    return 100.0 * (after[which] - before[which]) / max(1, after[2] - before[2])


def compare(results, base):
    ours, theirs = results["this checkout"], results[base]
    for figure in ours[0]:
        mine, other = [r[figure] for r in ours], [r[figure] for r in theirs]
        ratios = [o / t if t else float("nan") for o, t in zip(mine, other)]
        print(f"{figure}: baseline median {statistics.median(other):,.2f} ({', '.join(f'{v:,.2f}' for v in other)}); "
              f"this checkout median {statistics.median(mine):,.2f} ({', '.join(f'{v:,.2f}' for v in mine)}); "
              f"per round this / baseline {', '.join(f'{r:.2f}' for r in ratios)}")


def main(argv=None):
    args = parse_args(argv)
    work, base, daemons = daemons_to_compare(args, MANIFEST)
    files = {"four": four_files(work / "repo-four", args.four_mib * MIB),
             "gguf": gguf_file(work / "repo-gguf", args.gguf_mib)}
    os.chdir(work)          # not the checkout: PYTHONPATH alone decides which code a daemon runs
    results: dict[str, list[dict]] = {name: [] for name in daemons}
    print(f"uptime: {os.getloadavg()}", flush=True)
    with HubProcess({"bench/four": files["four"][0].parent, "bench/gguf": files["gguf"].parent}) as hub:
        hub.client.set_link(rate=args.rate, delay=args.delay)
        print(f"case {args.case}; link: {args.rate / 1e6:g} MB/s per response, {args.delay * 1000:g} ms per reply",
              flush=True)
        for round_ in range(args.rounds):
            order = list(daemons) if round_ % 2 == 0 else list(reversed(daemons))
            for name in order:
                figures = one_round(args.case, hub, work, name.split()[0], daemons[name], files,
                                    args.mount_args.split())
                results[name].append(figures)
                print(f"round {round_ + 1}: {name}: " + ", ".join(f"{k} {v:,.2f}" for k, v in figures.items()),
                      flush=True)
    if args.candidate:
        print(f"'this checkout' above is commit {args.candidate}")
    compare(results, base)
    print(f"load average at the end: {os.getloadavg()}")


if __name__ == "__main__":
    main()
