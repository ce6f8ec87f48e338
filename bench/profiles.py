"""Where the daemon's time goes: py-spy samples of it during a cold and a hot read, summed.

Run after the measurements (a sampler perturbs what it samples). The summary is each
thread group's busiest functions by own time, idle waits included, so a stream waiting on
the disk shows as such and not as nothing.
"""

import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from . import probes
from .machine import drop_caches

# The bench extra installs py-spy beside the interpreter, which need not be on PATH.
PYSPY = str(Path(sys.executable).parent / "py-spy") if (Path(sys.executable).parent / "py-spy").exists() \
    else shutil.which("py-spy")


def available():
    return PYSPY is not None


def profile_read(bench, cache, fresh, path_of, seconds_hint=10):
    """(top frames of the trio thread, top frames of worker threads) during one read."""
    out = bench.work / f"profile-{cache}.txt"
    with bench.mount(cache=cache, fresh=fresh) as mount:
        drop_caches() if not fresh else bench.cold()
        spy = subprocess.Popen([PYSPY, "record", "-p", str(mount.pid), "-o", str(out), "-f", "raw", "-r", "200",
                                "--threads", "--idle", "--nonblocking", "-d", str(seconds_hint * 6)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(1.0)                     # py-spy attaches
        probes.read_sequential(path_of(mount))
        spy.send_signal(2)
        spy.wait(timeout=60)
    return summarize(out)


def summarize(path, top=8):
    groups = {"trio thread": Counter(), "worker threads": Counter()}
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        group = groups["trio thread" if "MainThread" in frames[0] else "worker threads"]
        ours = [frame for frame in frames if "vfs/" in frame]
        where = ours[-1].split(" (")[0] if ours else "(outside vfs)"
        group[f"{where} > {frames[-1].split(' (')[0]}"] += int(count)
    return {name: _shares(counter, top) for name, counter in groups.items()}


def _shares(counter, top):
    total = sum(counter.values()) or 1
    return [(100.0 * count / total, frame) for frame, count in counter.most_common(top)]


def markdown(profiles):
    lines = []
    for title, groups in profiles.items():
        lines.append(f"**{title}** (py-spy, share of each thread group's samples, idle included)\n")
        for group, shares in groups.items():
            lines.append(f"- {group}: " + "; ".join(f"{share:.0f}% `{frame}`" for share, frame in shares[:6]))
        lines.append("")
    return "\n".join(lines)
