"""The mount under test: one daemon over the benchmark's repos, in its own process."""

import os
import shutil
from pathlib import Path

from vfs.testing.mounts import MountProcess, isolated_environment

from .probes import rss_peak_bytes

MANIFEST = """\
models:
  big:
    path: /models/big/
    backend: vllm
    hf: bench/big
  four:
    path: /models/four/
    backend: vllm
    hf: bench/four
  gguf:
    path: /models/gguf/model.gguf
    backend: llama.cpp
    hf: bench/gguf
    file: model.gguf
"""


class BenchMount:
    """`with BenchMount(...) as mount:` mounts; the peak RSS is kept in `peaks` on the way out."""

    peaks = []      # (VmHWM, which mount) of every daemon, for the RSS row

    def __init__(self, work, endpoint, cache_dir, fresh=False, args=(), env=None):
        """`env` adds to the daemon's environment (PYTHONPATH: another version's code)."""
        self.work, self.cache_dir = Path(work), Path(cache_dir)
        if fresh:
            shutil.rmtree(self.cache_dir, ignore_errors=True)
        manifest = self.work / "models.yaml"
        manifest.write_text(MANIFEST)
        self.root = self.work / "mnt"
        self.process = MountProcess(manifest, self.root, self.cache_dir, endpoint, self.work / "mount.log",
                                    env=isolated_environment(self.work, env), extra_args=list(args))

    def __enter__(self):
        self.process.start()
        return self

    def __exit__(self, *exc):
        try:
            args = list(self.process.extra_args)
            if "--api" in args:         # where its API listened says nothing about the mount
                del args[args.index("--api"):args.index("--api") + 2]
            label = " ".join([self.cache_dir.name, *args])
            self.peaks.append((rss_peak_bytes(self.process.process.pid), label))
        finally:
            self.process.stop()

    @property
    def big(self):
        return self.root / "big" / "big.bin"

    @property
    def four(self):
        """The four files of bench/four, in the mount."""
        return sorted((self.root / "four").iterdir())

    @property
    def gguf(self):
        return self.root / "gguf" / "model.gguf"

    @property
    def pid(self):
        return self.process.process.pid

    def read_ahead_kb(self):
        """The kernel's read_ahead_kb for this mount, read back from sysfs."""
        target = os.path.realpath(self.root)
        with open("/proc/self/mountinfo") as table:
            for line in table:
                fields = line.split()
                if fields[4] == target:
                    return int(Path(f"/sys/class/bdi/{fields[2]}/read_ahead_kb").read_text())
        return None

    def blob_file(self, path):
        """The block cache's data file behind a mounted file (its content id is an xattr)."""
        content_id = os.getxattr(path, "user.lamina.content_id").decode()
        algo, digest = content_id.split(":")
        return self.cache_dir / "blobs" / algo / digest[:2] / f"{digest}.data"

    def wait_verified(self, path, timeout=120):
        import time
        deadline = time.monotonic() + timeout
        while os.getxattr(path, "user.lamina.verified") != b"yes":
            if time.monotonic() > deadline:
                raise TimeoutError(f"{path} not verified after {timeout}s")
            time.sleep(0.05)
