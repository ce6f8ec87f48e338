"""`python -m bench.overhead --baseline REF`: this checkout's daemon against REF's, rounds interleaved.

For a change that must cost nothing measurable on the hot path (the metrics counters):
both daemons serve the same hot block cache from the same simulator, in alternating
order each round, and each round measures

Each figure comes with the daemon's CPU time per MiB or per read, which other work on
the machine hardly moves (throughput does, a lot, on a shared machine).

- a sequential read with the blob file in the page cache and the mount's pages dropped
  (every 1 MiB FUSE read reaches the daemon and is answered from memory: the most
  Python per byte);
- the same with the blob file's pages dropped too (the cache disk in the path);
- fio 4 KiB random reads (psync) with the blob file in the page cache.

Pages are dropped per file (posix_fadvise), never machine-wide: other work on the machine
keeps its page cache, and the figures do not swing with it. REF's code is exported with
`git archive` and put first on the daemon's PYTHONPATH. Medians per side, the ratio of
medians, and the spread of the per-round ratios (the noise) are printed and written to
the "Metrics overhead" section of docs/BENCHMARKS.md.
"""

import argparse
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
from io import BytesIO
from pathlib import Path

from . import probes
from .daemon import BenchMount
from .data import MIB, big_file, gguf_file
from .server import HubProcess

ROOT = Path(__file__).resolve().parent.parent
CASES = (("seq-page", "sequential read, blob file in the page cache, mount's pages dropped", "MB/s"),
         ("seq-disk", "sequential read, block cache hot, both files' pages dropped", "MB/s"),
         ("fio", "fio 4 KiB random reads (psync), blob file in the page cache", "IOPS"))
CPU_UNITS = {"MB/s": "us per MiB", "IOPS": "us per read"}
BEGIN, END = "<!-- metrics-overhead:begin -->", "<!-- metrics-overhead:end -->"


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m bench.overhead", description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", required=True, help="git commit to compare with (e.g. the parent of a change)")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--size-mib", type=int, default=256, help="the file read (default 256 MiB)")
    parser.add_argument("--fio-seconds", type=int, default=5)
    parser.add_argument("--out", default="docs", help="where BENCHMARKS.md is (its section is replaced)")
    parser.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "lamina-bench-overhead"))
    args = parser.parse_args(argv)
    args.out, args.work = os.path.abspath(args.out), os.path.abspath(args.work)     # run() changes directory
    return args


def export(ref, into):
    """REF's `vfs` package under `into` (for PYTHONPATH); returns REF's full commit id."""
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", ref], capture_output=True, text=True,
                            check=True).stdout.strip()
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", commit, "vfs"], capture_output=True,
                             check=True).stdout
    target = Path(into) / commit[:12]
    if not target.exists():
        with tarfile.open(fileobj=BytesIO(archive)) as tar:
            tar.extractall(target, filter="data")
    return commit, target


def drop_pages(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def daemon_cpu_seconds(pid):
    """User + system CPU time of the daemon so far, all its threads (from /proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def timed(mount, measure):
    """(the measure's figure, the daemon's CPU seconds it cost)."""
    before = daemon_cpu_seconds(mount.pid)
    figure = measure()
    return figure, daemon_cpu_seconds(mount.pid) - before


def measure_round(mount, blob, fio_seconds):
    """Each case once through `mount` (its daemon already started): {case: (figure, CPU per unit)}.

    CPU per unit is the daemon's CPU microseconds per MiB read (sequential) or per read (fio):
    unlike throughput, it hardly moves when other work on the machine takes the cores."""
    size_mib = mount.big.stat().st_size / MIB
    subprocess.run(["cat", str(blob)], stdout=subprocess.DEVNULL, check=True)
    drop_pages(mount.big)
    seq_page, cpu_page = timed(mount, lambda: probes.read_sequential(mount.big) / 1e6)
    drop_pages(mount.big)
    drop_pages(blob)
    seq_disk, cpu_disk = timed(mount, lambda: probes.read_sequential(mount.big) / 1e6)
    subprocess.run(["cat", str(blob)], stdout=subprocess.DEVNULL, check=True)
    fio, cpu_fio = timed(mount, lambda: probes.fio_random_iops(mount.big, fio_seconds))  # fio drops pages itself
    return {"seq-page": (seq_page, cpu_page * 1e6 / size_mib), "seq-disk": (seq_disk, cpu_disk * 1e6 / size_mib),
            "fio": (fio, cpu_fio * 1e6 / (fio * fio_seconds))}


def run(args):
    work = Path(args.work)
    commit, baseline = export(args.baseline, work / "baseline")
    source = big_file(work / "repo-big", args.size_mib * MIB)
    gguf = gguf_file(work / "repo-gguf", 4)        # the bench manifest names it; not measured here
    samples = {side: {key: [] for key, _, _ in CASES} for side in ("before", "after")}
    code = {"before": str(baseline), "after": str(ROOT)}
    # `python -m vfs` puts the working directory first on sys.path, ahead of PYTHONPATH:
    # daemons start from a directory without a vfs/ of its own, so PYTHONPATH decides.
    os.chdir(work)
    with HubProcess({"bench/big": source.parent, "bench/gguf": gguf.parent}) as hub:
        def mount(side):
            return BenchMount(work, hub.endpoint, work / "cache-hot", env={"PYTHONPATH": code[side]})
        with BenchMount(work, hub.endpoint, work / "cache-hot", fresh=True) as filling:
            probes.read_sequential(filling.big)
            filling.wait_verified(filling.big)
            blob = filling.blob_file(filling.big)
        for round_number in range(args.rounds):
            order = ("before", "after") if round_number % 2 == 0 else ("after", "before")
            for side in order:
                with mount(side) as mounted:
                    figures = measure_round(mounted, blob, args.fio_seconds)
                for key, value in figures.items():
                    samples[side][key].append(value)
                print(f"round {round_number + 1} {side:6} " + "  ".join(
                    f"{k} {figure:,.0f} ({cpu:,.1f} us CPU)" for k, (figure, cpu) in figures.items()), flush=True)
    return commit, samples


def rows(samples):
    """Per case and measure: (title, unit, median before, median after, ratio, per-round min, max, noise b, a)."""
    found = []
    for key, title, unit in CASES:
        for measure, name, what in ((0, title, unit), (1, f"{title}: daemon CPU", CPU_UNITS[unit])):
            before = [sample[measure] for sample in samples["before"][key]]
            after = [sample[measure] for sample in samples["after"][key]]
            per_round = [a / b for a, b in zip(after, before)]
            found.append((name, what, statistics.median(before), statistics.median(after),
                          statistics.median(after) / statistics.median(before), min(per_round), max(per_round),
                          _spread(before), _spread(after)))
    return found


def _spread(values):
    """Half the range of the middle values, relative to the median (a robust noise figure)."""
    ordered = sorted(values)
    trim = len(ordered) // 4
    middle = ordered[trim:len(ordered) - trim] or ordered
    return (middle[-1] - middle[0]) / 2 / statistics.median(values)


def counting_cost_ns():
    """Nanoseconds the counters add to one FUSE read, timed on the same objects the daemon uses
    (ops.handler's count, Operations.read's two clock reads and histogram, a served-bytes count)."""
    import timeit
    from time import perf_counter

    from vfs.metrics import Stats
    stats = Stats()
    counts, served, histogram = stats.fuse_ops, stats.served, stats.read_seconds

    def counted():
        counts["read"] += 1
        started = perf_counter()
        served["block_buffers"] += 4096
        histogram.observe(perf_counter() - started)

    def bare():
        pass
    number = 200_000
    timing = min(timeit.repeat(counted, number=number, repeat=5)) - min(timeit.repeat(bare, number=number, repeat=5))
    return timing / number * 1e9


def markdown(commit, samples, args):
    lines = [BEGIN, "## Metrics overhead", "",
             f"`python -m bench.overhead --baseline {commit[:12]} --rounds {args.rounds} --size-mib "
             f"{args.size_mib}`: the daemon before the metrics counters ({commit[:12]}) against this "
             f"checkout's, same hot block cache, {args.rounds} rounds, the order alternating each round. "
             "Taken on a loaded 2-core machine (other work ran beside it), hence the per-round ratios "
             "and the spread: a difference smaller than the noise is not a cost. The daemon's CPU time per "
             "MiB or per read (its /proc stat, all threads) moves far less with the machine's load than "
             "throughput does: it is the figure to read for a per-operation cost.", "",
             "| case | before | after | after / before (medians) | per-round ratios | noise before | noise after |",
             "| --- | ---: | ---: | ---: | --- | ---: | ---: |"]
    for title, unit, before, after, ratio, low, high, noise_before, noise_after in rows(samples):
        lines.append(f"| {title} | {before:,.1f} {unit} | {after:,.1f} {unit} | {ratio:.3f} | "
                     f"{low:.2f} - {high:.2f} | ±{noise_before:.1%} | ±{noise_after:.1%} |")
    per_read = counting_cost_ns()
    fio_cpu = statistics.median(sample[1] for sample in samples["after"]["fio"])
    lines += ["", "Noise: half the spread of the middle half of the rounds, relative to the median.", "",
              f"What the counters add to one FUSE read, timed alone on this machine: {per_read:,.0f} ns, "
              f"{per_read / 1e3 / fio_cpu:.1%} of the {fio_cpu:,.1f} us of daemon CPU a 4 KiB random read "
              "costs above (a sequential read's 1 MiB requests pay it once per MiB).", END]
    return "\n".join(lines)


def kept_section(path):
    """The section as it stands in `path` ("" when none): `make bench` rewrites the rest."""
    text = path.read_text() if path.exists() else ""
    if BEGIN in text and END in text:
        return BEGIN + text.split(BEGIN, 1)[1].split(END, 1)[0] + END
    return ""


def write_section(path, section):
    """Put `section` in place of the old one in BENCHMARKS.md (appended if there is none)."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + section + rest.split(END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    path.write_text(text)


def main(argv=None):
    args = parse_args(argv)
    if os.geteuid() != 0:
        sys.exit("the benchmark mounts: run it as root")
    commit, samples = run(args)
    section = markdown(commit, samples, args)
    print(section)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_section(out / "BENCHMARKS.md", section)
    print(f"wrote the section into {out / 'BENCHMARKS.md'}")


if __name__ == "__main__":
    main()
