"""The machine under test: what it is, and the knobs a fair measurement needs (caches, memory)."""

import os
import platform
import subprocess
from pathlib import Path

MIB = 1024 * 1024


def describe():
    """One line naming the CPU, cores, memory, kernel and Python."""
    cpu = "unknown CPU"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    memory = int(Path("/proc/meminfo").read_text().split()[1]) // (1024 * 1024)
    return (f"{cpu}, {os.cpu_count()} cores, {memory} GiB RAM, Linux {platform.release()}, "
            f"Python {platform.python_version()}")


def drop_caches():
    """Empty the page cache (root only): the next read of any file comes from its source."""
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def warm(*paths):
    """Read files into the page cache (the server's sources: the server is not what we measure)."""
    for path in paths:
        subprocess.run(["cat", str(path)], stdout=subprocess.DEVNULL, check=True)


def prefault_memory(limit_gib=16):
    """Touch free memory once: a VM backs guest pages lazily, and a first touch costs ~10x
    more than later ones, which would land on whichever measurement ran first."""
    available = int(next(line.split()[1] for line in Path("/proc/meminfo").read_text().splitlines()
                         if line.startswith("MemAvailable"))) * 1024
    amount = max(0, min(limit_gib * 1024 * MIB, available - 3 * 1024 * MIB))
    chunks = []
    for _ in range(amount // (256 * MIB)):
        chunk = bytearray(256 * MIB)
        chunk[::4096] = b"\1" * (len(chunk) // 4096)
        chunks.append(chunk)
    del chunks


def tools():
    """Which optional comparison tools are installed."""
    import shutil
    return {name: shutil.which(name) is not None for name in ("curl", "fio", "rclone", "aria2c")}
