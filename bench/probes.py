"""Single measurements: each runs one client once and returns one number.

Clients that map or fault the mount run in their own process (a page fault taken while
holding the GIL must not be in a process that serves the bytes); plain reads run here.
"""

import json
import os
import subprocess
import sys
import time

MIB = 1024 * 1024
READ_SIZE = MIB


def read_sequential(path):
    """Bytes per second reading `path` start to end, 1 MiB at a time, like `cat` or `dd bs=1M`."""
    buffer = bytearray(READ_SIZE)
    total = 0
    started = time.perf_counter()
    with open(path, "rb", buffering=0) as source:
        while count := source.readinto(buffer):
            total += count
    return total / (time.perf_counter() - started)


def write_fresh_file(path, size, chunk=8 * MIB):
    """Bytes per second writing `size` bytes into a new file (page cache, no fsync): the
    ceiling for any client that keeps what it downloads, this one included."""
    data = os.urandom(chunk)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        started = time.perf_counter()
        for offset in range(0, size, chunk):
            os.pwrite(fd, data[:min(chunk, size - offset)], offset)
        return size / (time.perf_counter() - started)
    finally:
        os.close(fd)
        os.unlink(path)


def first_byte_seconds(path, offset):
    """Seconds from open to holding the byte at `offset`."""
    started = time.perf_counter()
    fd = os.open(path, os.O_RDONLY)
    try:
        data = os.pread(fd, 1, offset)
    finally:
        os.close(fd)
    assert len(data) == 1
    return time.perf_counter() - started


def curl(url, byte_range=None):
    """(bytes per second, seconds to first byte) of one curl download to /dev/null."""
    args = ["curl", "-sS", "-L", "-o", "/dev/null", "-w", "%{speed_download} %{time_starttransfer}", url]
    if byte_range:
        args[1:1] = ["-r", byte_range]
    out = subprocess.run(args, capture_output=True, text=True, check=True).stdout.split()
    return float(out[0]), float(out[1])


def hf_hub_download_seconds(endpoint, repo, filename, hf_home):
    """Seconds for huggingface_hub's hf_hub_download of one file into a fresh cache."""
    code = ("import sys, time, huggingface_hub as h; t = time.perf_counter(); "
            "h.hf_hub_download(sys.argv[1], sys.argv[2]); print(time.perf_counter() - t)")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING_FACE_"))}
    env.update(HF_ENDPOINT=endpoint, HF_HOME=str(hf_home), HF_HUB_DISABLE_XET="1",
               HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_DISABLE_PROGRESS_BARS="1")
    out = subprocess.run([sys.executable, "-c", code, repo, filename], env=env, capture_output=True,
                         text=True, check=True).stdout
    return float(out.split()[-1])


def fio_random_iops(path, seconds, size=None):
    """4 KiB random-read IOPS of fio (psync, one job, page cache as it is)."""
    args = ["fio", "--name=rand", f"--filename={path}", "--rw=randread", "--bs=4k", "--ioengine=psync",
            "--numjobs=1", f"--runtime={seconds}", "--time_based", "--output-format=json", "--readonly"]
    if size:
        args.append(f"--size={size}")
    out = subprocess.run(args, capture_output=True, text=True, check=True).stdout
    return json.loads(out[out.index("{"):])["jobs"][0]["read"]["iops"]


_LOAD = """
import mmap, os, sys, time
started = time.perf_counter()
if sys.argv[2] == "header":          # llama.cpp reads the GGUF header in 4 KiB freads first
    with open(sys.argv[1], "rb", buffering=4096) as header:
        for _ in range(64):
            header.read(4096)
fd = os.open(sys.argv[1], os.O_RDONLY)
mapped = mmap.mmap(fd, os.fstat(fd).st_size, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE, prot=mmap.PROT_READ)
print(time.perf_counter() - started)
"""


def llama_style_load_seconds(path, header=True):
    """llama.cpp's load, in its own process: header freads, then one MAP_POPULATE mmap of it all."""
    out = subprocess.run([sys.executable, "-c", _LOAD, str(path), "header" if header else "-"],
                         capture_output=True, text=True, check=True).stdout
    return float(out.split()[-1])


def rss_peak_bytes(pid):
    """The process's peak resident set (VmHWM)."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0

