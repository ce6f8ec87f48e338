"""docs/BENCHMARKS.md and docs/benchmarks.png from the rows of one run."""

import datetime
from pathlib import Path


def _num(value):
    if value is None:
        return "-"
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:,.2f}" if abs(value) >= 1 else f"{value:.3f}"


def _verdict(row):
    return "-" if row.met is None else ("met" if row.met else "**missed**")


def table(rows):
    lines = ["| figure | lamina-llm-cache | compared with | theirs | ratio | target | |",
             "| --- | ---: | --- | ---: | ---: | --- | --- |"]
    for row in rows:
        ratio = "-" if row.ratio is None else f"{row.ratio:.2f}x"
        lines.append(f"| {row.figure} | {_num(row.ours)} {row.unit} | {row.against or '-'} | "
                     f"{_num(row.theirs) + ' ' + row.unit if row.theirs is not None else '-'} | {ratio} | "
                     f"{row.target} | {_verdict(row)} |")
    return "\n".join(lines)


def sweeps(read_ahead, block_sizes):
    lines = []
    if read_ahead:
        lines += ["| read_ahead_kb asked | read back from sysfs | llama.cpp-style load, hot | sequential read, hot |",
                  "| ---: | ---: | ---: | ---: |"]
        lines += [f"| {kb} | {actual} | {_num(load)} MB/s | {_num(seq)} MB/s |" for kb, actual, load, seq in read_ahead]
        lines.append("")
    if block_sizes:
        lines += ["| block size | cold sequential read |", "| ---: | ---: |"]
        lines += [f"| {size} | {_num(speed)} MB/s |" for size, speed in block_sizes]
    return "\n".join(lines)


def analysis():
    """The hand-written reading of the figures (bench/ANALYSIS.md), kept across reruns."""
    path = Path(__file__).with_name("ANALYSIS.md")
    return "\n" + path.read_text() if path.exists() else ""


def markdown(rows, read_ahead, block_sizes, machine, settings, notes):
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return f"""# Benchmarks

Written by `make bench` ({when}); rerun it to refresh this page and `benchmarks.png`.
Every pair below was measured back to back in one run against the same Hub simulator (its
own process, serving from the page cache), {settings}; medians are quoted and the ratio
is ours / theirs. "Cold" means a fresh block cache and a dropped page cache (`echo 3 >
/proc/sys/vm/drop_caches`, then the server's source files read back in), except for the
time to first byte: a fresh mount over an empty block cache, without dropping the page
cache (that would time the daemon paging its own code back in).

Machine: {machine}

{table(rows)}

![ratios against targets](benchmarks.png)

## Sweeps

{sweeps(read_ahead, block_sizes)}

## Notes

{notes}
{analysis()}
## How to rerun

    make bench          # full run: installs the bench extras, fio, rclone, curl and aria2 first
    make bench-smoke    # a small file and one repeat: only checks the harness works
    sudo .venv/bin/python -m bench --only link --out docs   # only the shaped-link section
    sudo .venv/bin/python -m bench.loopback_ab COMMIT       # cold reads: COMMIT's daemon against this checkout's
    sudo .venv/bin/python -m bench.loopback_ab COMMIT --rate 40MB --delay 0.03   # the same on a shaped link
    .venv/bin/python -m bench.httpstack --out docs          # only the HTTP stack A/B (no root)

Running it by hand: `sudo .venv/bin/python -m bench --help` (root: it drops the page
cache and mounts).
"""


def kept_section(path, begin, end):
    """The section between `begin` and `end` in the file at `path`, markers included, or ""."""
    text = path.read_text() if path.exists() else ""
    if begin in text and end in text:
        return begin + text.split(begin, 1)[1].split(end, 1)[0] + end
    return ""


def write_section(path, section, begin, end):
    """Put `section` in place of the one between the markers in `path` (appended if none)."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + section + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    path.write_text(text)


def plot(rows, path):
    """Write the ratios as a bar chart; False if matplotlib (the bench extra) is missing."""
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [row for row in rows if row.ratio is not None]
    labels = [f"{row.figure}\nvs {row.against}" for row in rows]
    # Bars show how far each figure is from its target: >= 1 is met, whichever way is better.
    ratios = [row.ratio if row.higher_is_better else 1 / row.ratio for row in rows]
    colors = ["tab:gray" if row.met is None else "tab:green" if row.met else "tab:red" for row in rows]
    figure, axes = plt.subplots(figsize=(10, 0.7 * len(rows) + 1.5))
    axes.barh(range(len(rows)), ratios, color=colors)
    axes.set_yticks(range(len(rows)), labels, fontsize=7)
    axes.invert_yaxis()
    axes.axvline(1.0, color="black", linewidth=0.8)
    for index, row in enumerate(rows):
        axes.text(ratios[index], index, f" {row.ratio:.2f}x ({row.target})", va="center", fontsize=7)
    axes.set_xlabel("lamina-llm-cache vs alternative (>1 is better; green: target met, red: missed, gray: no target)")
    axes.set_xscale("log")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True
