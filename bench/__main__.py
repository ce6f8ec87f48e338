"""`python -m bench`: set up the Hub simulator and the files, run every comparison, write the report."""

import argparse
import os
import sys
import tempfile
from pathlib import Path

from . import cases, httpstack, link, local, machine, overhead, passthrough, profiles, report, scale
from .data import MIB, big_file, four_files, gguf_file
from .server import HubProcess

FULL = dict(big_mib=1024, gguf_mib=320, four_mib=256, repeats=3, fio_seconds=5)
SMOKE = dict(big_mib=48, gguf_mib=24, four_mib=8, repeats=1, fio_seconds=1)


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="small files, one repeat: checks the harness only")
    parser.add_argument("--out", default="docs", help="where BENCHMARKS.md and benchmarks.png go")
    parser.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "lamina-bench"),
                        help="scratch directory (the generated files are kept here between runs)")
    parser.add_argument("--repeats", type=int, help="rounds per comparison (default 3; smoke 1)")
    parser.add_argument("--no-sweeps", action="store_true", help="skip the read_ahead_kb and block size sweeps")
    parser.add_argument("--only", help="comma-separated cases: " + ",".join(key for key, _, _ in CASES))
    return parser.parse_args(argv)


def run(args):
    shape = dict(SMOKE if args.smoke else FULL)
    if args.repeats:
        shape["repeats"] = args.repeats
    work = Path(args.work) / ("smoke" if args.smoke else "full")
    tools = machine.tools()
    if not args.smoke:
        print("touching free memory once (lazily backed VM memory skews first runs)", flush=True)
        machine.prefault_memory()
    print("making the files", flush=True)
    big = big_file(work / "repo-big", shape["big_mib"] * MIB)
    gguf = gguf_file(work / "repo-gguf", shape["gguf_mib"])
    four = four_files(work / "repo-four", shape["four_mib"] * MIB)
    with HubProcess({"bench/big": big.parent, "bench/gguf": gguf.parent, "bench/four": four[0].parent}) as hub:
        bench = cases.Bench(work, hub, big, gguf, shape["repeats"], shape["fio_seconds"], tools, four_sources=four)
        rows = measure(bench, args.only and set(args.only.split(",")))
        bench.profiles = profile(bench) if not (args.smoke or args.only) and profiles.available() else {}
        sweeps = ([], []) if args.no_sweeps or args.smoke or args.only else (cases.read_ahead_sweep(bench),
                                                                  cases.block_size_sweep(bench))
    return rows, sweeps, bench, shape


CASES = [("cold", "cold sequential reads", cases.cold_sequential),
         ("ttfb", "time to first byte", cases.first_byte),
         ("concurrent", "concurrent readers", cases.concurrent_readers),
         ("hot", "block cache hot", cases.block_cache_hot),
         ("page", "page cache hot", cases.page_cache_hot),
         ("random", "random reads", cases.random_reads),
         ("load", "llama.cpp-style load", cases.llama_load),
         ("coldload", "llama.cpp-style load, cold", cases.llama_load_cold),
         ("link", "cold reads over shaped links, against aria2c -x16 and curl", link.link_rows)]
NEEDS_HOT_CACHE = {"hot", "page", "random", "load"}


def measure(bench, only=None):
    rows = []
    chosen = [case for case in CASES if only is None or case[0] in only]
    if NEEDS_HOT_CACHE & {key for key, _, _ in chosen}:
        print("filling the block cache", flush=True)
        bench.blob = cases.hot_cache(bench)
    for _, name, step in chosen:
        print(name, flush=True)
        rows += step(bench)
    return rows + cases.memory(bench)


def profile(bench):
    print("profiling the daemon (py-spy)", flush=True)
    return {"cold sequential read (fresh block cache)": profiles.profile_read(bench, "cold", True, lambda m: m.big),
            "block cache hot, page cache dropped": profiles.profile_read(bench, "hot", False, lambda m: m.big)}


def notes(bench, tools):
    lines = []
    if "curl" in bench.samples:
        lines.append(f"- Server check: curl reads the 1 stream at {bench.median('curl') / 1e6:,.0f} MB/s; the "
                     f"mount's cold read {bench.median('cold') / 1e6:,.0f} MB/s. The server is not the "
                     "bottleneck when curl is well above the mount.")
    if getattr(bench, "profiles", None):
        lines.append("\n" + profiles.markdown(bench.profiles))
    missing = [name for name, present in tools.items() if not present]
    if missing:
        lines.append(f"- Not installed, so not compared: {', '.join(missing)}.")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    if os.geteuid() != 0:
        sys.exit("the benchmark drops the page cache and mounts: run it as root")
    rows, (read_ahead, block_sizes), bench, shape = run(args)
    print(report.table(rows))
    for line in report.sweeps(read_ahead, block_sizes).splitlines():
        print(line)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    settings = (f"{shape['big_mib']} MiB file, {shape['gguf_mib']} MiB GGUF, {shape['repeats']} repeats, "
                f"fio {shape['fio_seconds']} s")
    page = out / "BENCHMARKS.md"
    shaped = [row for row in rows if row.section == "link"]
    if args.only and set(args.only.split(",")) == {"link"}:
        # Only the shaped-link section is measured: the rest of the page stays as it was.
        report.write_section(page, link.section(rows, machine.describe(), shape), *link.MARKERS)
        print(f"wrote the shaped-link section of {page}")
        return
    rows = [row for row in rows if row.section != "link"]
    shaped_section = link.section(shaped, machine.describe(), shape) if shaped else \
        report.kept_section(page, *link.MARKERS)
    # Sections measured by their own commands (make bench-scale, bench.overhead, bench.local,
    # bench.passthrough, bench.httpstack) stay.
    kept = [shaped_section, scale.kept_section(page), overhead.kept_section(page),
            report.kept_section(page, local.BEGIN, local.END),
            report.kept_section(page, passthrough.BEGIN, passthrough.END),
            report.kept_section(page, httpstack.BEGIN, httpstack.END)]
    page.write_text(report.markdown(rows, read_ahead, block_sizes, machine.describe(), settings,
                                    notes(bench, bench.tools))
                    + "".join(f"\n{section}\n" for section in kept if section))
    plotted = report.plot(rows, out / "benchmarks.png")
    print(f"wrote {out / 'BENCHMARKS.md'}" + (f" and {out / 'benchmarks.png'}" if plotted else
                                                " (no plot: pip install '.[bench]' for matplotlib)"))


if __name__ == "__main__":
    main()
