"""`python -m bench.overhead --baseline REF`: this checkout's daemon against REF's, rounds interleaved.

For a change that must cost nothing measurable on the hot path (the metrics counters):
both daemons serve the same hot block cache from the same simulator, in alternating
order each round, and each round measures

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
BEGIN, END = "<!-- metrics-overhead:begin -->", "<!-- metrics-overhead:end -->"


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m bench.overhead", description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", required=True, help="git commit to compare with (e.g. the parent of a change)")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--size-mib", type=int, default=256, help="the file read (default 256 MiB)")
    parser.add_argument("--fio-seconds", type=int, default=5)
    parser.add_argument("--out", default="docs", help="where BENCHMARKS.md is (its section is replaced)")
    parser.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "lamina-bench-overhead"))
    return parser.parse_args(argv)


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


def measure_round(mount, blob, fio_seconds):
    """One of each case through `mount` (its daemon already started)."""
    subprocess.run(["cat", str(blob)], stdout=subprocess.DEVNULL, check=True)
    drop_pages(mount.big)
    seq_page = probes.read_sequential(mount.big) / 1e6
    drop_pages(mount.big)
    drop_pages(blob)
    seq_disk = probes.read_sequential(mount.big) / 1e6
    subprocess.run(["cat", str(blob)], stdout=subprocess.DEVNULL, check=True)
    fio = probes.fio_random_iops(mount.big, fio_seconds)      # fio drops the file's pages itself
    return {"seq-page": seq_page, "seq-disk": seq_disk, "fio": fio}


def run(args):
    work = Path(args.work)
    commit, baseline = export(args.baseline, work / "baseline")
    source = big_file(work / "repo-big", args.size_mib * MIB)
    gguf = gguf_file(work / "repo-gguf", 4)        # the bench manifest names it; not measured here
    samples = {side: {key: [] for key, _, _ in CASES} for side in ("before", "after")}
    with HubProcess({"bench/big": source.parent, "bench/gguf": gguf.parent}) as hub:
        def mount(side):
            env = {"PYTHONPATH": str(baseline)} if side == "before" else {}
            return BenchMount(work, hub.endpoint, work / "cache-hot", env=env)
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
                print(f"round {round_number + 1} {side:6} " + "  ".join(f"{k} {v:,.0f}" for k, v in figures.items()),
                      flush=True)
    return commit, samples


def rows(samples):
    """(case, unit, median before, median after, ratio of medians, per-round ratios min..max)."""
    found = []
    for key, title, unit in CASES:
        before, after = samples["before"][key], samples["after"][key]
        per_round = [a / b for a, b in zip(after, before)]
        found.append((title, unit, statistics.median(before), statistics.median(after),
                      statistics.median(after) / statistics.median(before), min(per_round), max(per_round),
                      _spread(before), _spread(after)))
    return found


def _spread(values):
    """Half the range of the middle values, relative to the median (a robust noise figure)."""
    ordered = sorted(values)
    trim = len(ordered) // 4
    middle = ordered[trim:len(ordered) - trim] or ordered
    return (middle[-1] - middle[0]) / 2 / statistics.median(values)


def markdown(commit, samples, args):
    lines = [BEGIN, "## Metrics overhead", "",
             f"`python -m bench.overhead --baseline {commit[:12]} --rounds {args.rounds} --size-mib "
             f"{args.size_mib}`: the daemon before the metrics counters ({commit[:12]}) against this "
             f"checkout's, same hot block cache, {args.rounds} rounds, the order alternating each round. "
             "Taken on a loaded 2-core machine (other work ran beside it), hence the per-round ratios "
             "and the spread: a difference smaller than the noise is not a cost.", "",
             "| case | before | after | after / before (medians) | per-round ratios | noise before | noise after |",
             "| --- | ---: | ---: | ---: | --- | ---: | ---: |"]
    for title, unit, before, after, ratio, low, high, noise_before, noise_after in rows(samples):
        lines.append(f"| {title} | {before:,.0f} {unit} | {after:,.0f} {unit} | {ratio:.3f} | "
                     f"{low:.2f} - {high:.2f} | ±{noise_before:.1%} | ±{noise_after:.1%} |")
    lines += ["", "Noise: half the spread of the middle half of the rounds, relative to the median.", END]
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
