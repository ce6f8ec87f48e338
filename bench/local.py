"""`python -m bench.local`: a `local:` model read through the mount against the same file read directly.

A local model's bytes come from the local file (no block cache); what the mount adds is
FUSE and the daemon's checked reads (fstat, pread, fstat). Each round measures, in
alternating order, the same file directly and through the mount:

- a sequential read with both files' pages dropped (the disk in the path);
- a sequential read with the local file in the page cache and the mount's pages dropped
  (every 1 MiB FUSE read reaches the daemon and is answered from memory: the daemon's
  cost per byte, alone);
- fio 4 KiB random reads (psync), the local file in the page cache, the mount's pages
  as fio leaves them;
- a warm sequential read (the mount's pages cached too: the kernel answers, no daemon).

Pages are dropped per file (posix_fadvise), never machine-wide. Medians per side, the
ratio of medians and the per-round ratios are printed and written to the "Local models"
section of docs/BENCHMARKS.md, with the daemon's CPU time per MiB or per read.
"""

import argparse
import os
import shutil
import statistics
import tempfile
from pathlib import Path

from vfs.testing.mounts import MountProcess, isolated_environment

from . import probes
from .data import MIB, big_file
from .overhead import daemon_cpu_seconds, drop_pages

CASES = (("seq-disk", "sequential read, both files' pages dropped", "MB/s"),
         ("seq-page", "sequential read, local file in the page cache, mount's pages dropped", "MB/s"),
         ("fio", "fio 4 KiB random reads (psync), local file in the page cache", "IOPS"),
         ("seq-warm", "sequential read, everything in the page cache", "MB/s"))
BEGIN, END = "<!-- local-models:begin -->", "<!-- local-models:end -->"


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m bench.local", description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--size-mib", type=int, default=512, help="the file read (default 512 MiB)")
    parser.add_argument("--fio-seconds", type=int, default=4)
    parser.add_argument("--out", default="docs", help="where BENCHMARKS.md is (its section is replaced)")
    parser.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "lamina-bench-local"))
    return parser.parse_args(argv)


def mount_local(work, source):
    manifest = work / "models.yaml"
    manifest.write_text(f"models:\n  local-big:\n    path: /models/local-big/\n    backend: vllm\n"
                        f"    local: {source.parent}/\n")
    shutil.rmtree(work / "cache", ignore_errors=True)
    return MountProcess(manifest, work / "mnt", work / "cache", "http://127.0.0.1:9", work / "mount.log",
                        env=isolated_environment(work)).start()


def prepare(path, source, key):
    """Put the page caches in the state case `key` measures (`path`: the file read)."""
    if key == "seq-disk":
        drop_pages(path)
        drop_pages(source)
        return
    probes.read_sequential(source)
    if key == "seq-page":
        drop_pages(path)
    elif key == "seq-warm":
        probes.read_sequential(path)


def measure(path, key, fio_seconds):
    if key == "fio":
        return probes.fio_random_iops(path, fio_seconds)
    return probes.read_sequential(path) / 1e6


def run(args):
    work = Path(args.work)
    source = big_file(work / "local" / "model", args.size_mib * MIB)
    samples = {side: {key: [] for key, _, _ in CASES} for side in ("direct", "mount")}
    cpu = {key: [] for key, _, _ in CASES}
    mount = mount_local(work, source)
    try:
        shown = mount.mountpoint / "local-big" / source.name
        pid = mount.process.pid
        for round_number in range(args.rounds):
            for key, _, unit in CASES:
                order = ("direct", "mount") if round_number % 2 == 0 else ("mount", "direct")
                for side in order:
                    path = source if side == "direct" else shown
                    prepare(path, source, key)
                    before = daemon_cpu_seconds(pid)
                    figure = measure(path, key, args.fio_seconds)
                    samples[side][key].append(figure)
                    if side == "mount":
                        units = args.size_mib if unit == "MB/s" else figure * args.fio_seconds
                        cpu[key].append((daemon_cpu_seconds(pid) - before) * 1e6 / units)
            print(f"round {round_number + 1}: " + "  ".join(
                f"{key} {samples['direct'][key][-1]:,.0f} / {samples['mount'][key][-1]:,.0f}"
                for key, _, _ in CASES), flush=True)
    finally:
        mount.stop()
    return samples, cpu


def markdown(samples, cpu, args):
    lines = [BEGIN, "## Local models", "",
             f"`python -m bench.local --rounds {args.rounds} --size-mib {args.size_mib}`: a {args.size_mib} MiB "
             "file of a `local:` model read through the mount against the same file read directly, "
             f"{args.rounds} rounds, the order alternating each round. Taken on a loaded 2-core machine "
             "(other work ran beside it): read the ratios and the per-round spread, not the absolute figures.", "",
             "| case | direct | through the mount | mount / direct (medians) | per-round ratios | daemon CPU |",
             "| --- | ---: | ---: | ---: | --- | ---: |"]
    for key, title, unit in CASES:
        direct, mounted = samples["direct"][key], samples["mount"][key]
        ratios = [m / d for m, d in zip(mounted, direct)]
        per = "us per MiB" if unit == "MB/s" else "us per read"
        lines.append(f"| {title} | {statistics.median(direct):,.0f} {unit} | {statistics.median(mounted):,.0f} {unit} "
                     f"| {statistics.median(mounted) / statistics.median(direct):.2f} | "
                     f"{min(ratios):.2f} - {max(ratios):.2f} | {statistics.median(cpu[key]):,.1f} {per} |")
    lines += ["", "The daemon CPU column is its /proc stat (all threads) over the case, per MiB read or per "
              "fio read; near zero for the warm case, where the kernel answers from the mount's own page "
              "cache. Where the daemon answers, each byte is copied from the local file's page cache into "
              "the daemon's buffer, from there into the FUSE reply and the mount's page cache, then to the "
              "reader: three copies against one for a direct read (a 1 MiB pread from the page cache alone "
              "costs ~0.5 ms on this machine). Passthrough (docs/PASSTHROUGH.md) would take the daemon out "
              "of these cases; until then a local model reads at a fraction of the disk's speed on a cold "
              "read, and at page-cache speed once the mount's pages are warm.", END]
    return "\n".join(lines) + "\n"


def write_section(text, out):
    path = Path(out) / "BENCHMARKS.md"
    document = path.read_text()
    if BEGIN in document:
        head, rest = document.split(BEGIN, 1)
        document = head + text + rest.split(END, 1)[1].lstrip("\n")
    else:
        document = document.rstrip("\n") + "\n\n" + text
    path.write_text(document)


def main(argv=None):
    args = parse_args(argv)
    samples, cpu = run(args)
    text = markdown(samples, cpu, args)
    print(text)
    write_section(text, args.out)


if __name__ == "__main__":
    main()
