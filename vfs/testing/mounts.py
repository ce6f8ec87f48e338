"""A real mount in a subprocess, for tests, demos and benchmarks.

The daemon runs as `python -m vfs mount` with a private ready pipe, so the caller knows
the moment the mount serves (or why it failed) and keeps the process handle to signal
or kill it. It runs with `--no-keeper` (the process is the serving daemon) unless
`keeper=True`: then the process is the keeper and `daemon_pid()` its serving child. Stopping always leaves no mount behind: a clean unmount when the daemon
answers, a lazy one plus SIGKILL when it does not.

`log_problems()` is what the test fixtures check after every mount stops: tracebacks and
ERROR lines of the daemon log that the test did not declare with `expect_log_errors`.
"""

import os
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

BASE_ENV = {"HF_HUB_DISABLE_XET": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}
# A log line at ERROR or above, in the text format (`time LEVEL name: message`) or as JSON.
_ERROR_LINE = re.compile(r' (ERROR|CRITICAL) |"(level|levelname)": ?"(ERROR|CRITICAL)"')


def isolated_environment(home, extra=None):
    """An environment with no inherited Hub token or cache, rooted in `home`."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("HF_", "HUGGING_FACE_"))}
    env.update(BASE_ENV, HF_HOME=str(Path(home) / "hf-home"))
    env.update(extra or {})
    return env


class MountFailed(RuntimeError):
    pass


class MountProcess:
    def __init__(self, manifest, mountpoint, cache_dir, endpoint, log_path, env=None, extra_args=(), keeper=False):
        self.manifest, self.mountpoint = Path(manifest), Path(mountpoint)
        self.cache_dir, self.endpoint, self.log_path = Path(cache_dir), endpoint, Path(log_path)
        self.env = env or isolated_environment(self.log_path.parent)
        self.extra_args = list(extra_args)
        self.keeper = keeper
        self.process: subprocess.Popen | None = None
        self.expected_errors = []       # substrings of ERROR lines the test provokes on purpose
        self.tracebacks_expected = False
        self.served = False             # the daemon said ready: a mount that failed to start says why in ERROR lines

    def expect_log_errors(self, *patterns, tracebacks=False):
        """Declare ERROR lines containing one of `patterns` as provoked by the test (and tracebacks,
        if `tracebacks`); returns self. Everything else at ERROR fails the test at teardown."""
        if not patterns and not tracebacks:
            raise ValueError("name the ERROR lines the test expects")
        self.expected_errors.extend(patterns)
        self.tracebacks_expected = self.tracebacks_expected or tracebacks
        return self

    def log_problems(self):
        """Lines of the daemon log no test asked for: tracebacks and unexpected ERROR/CRITICAL lines
        (of a mount that never served, only tracebacks: its ERROR line is the failure the test saw)."""
        expected = self.expected_errors if self.served else [""]
        return log_problems(self.log_text(), expected, self.tracebacks_expected)

    def command(self, ready_fd):
        return [sys.executable, "-m", "vfs", "mount", str(self.mountpoint), "-m", str(self.manifest),
                "--cache-dir", str(self.cache_dir), "--endpoint", self.endpoint,
                "--log-file", str(self.log_path), "--ready-fd", str(ready_fd),
                *([] if self.keeper else ["--no-keeper"]), *self.extra_args]

    def start(self, timeout=60):
        """Start the daemon and wait until it serves; MountFailed with its message if not."""
        read_end, write_end = os.pipe()
        self.process = subprocess.Popen(self.command(write_end), pass_fds=(write_end,), env=self.env,
                                        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.PIPE)
        os.close(write_end)
        try:
            answer = _read_with_deadline(read_end, timeout)
        finally:
            os.close(read_end)
        if not answer.startswith(b"ready"):
            self.kill()
            raise MountFailed(answer.decode(errors="replace").strip() or self.stderr_text())
        self.served = True
        return self

    def daemon_pid(self) -> int | None:
        """The serving daemon's pid: the process itself, or under a keeper its child (None if none)."""
        if self.process is None:
            return None
        if not self.keeper:
            return self.process.pid
        try:
            children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children").read_text().split()
        except OSError:
            return None
        return int(children[0]) if children else None

    def stderr_text(self):
        if self.process and self.process.stderr and self.process.poll() is not None:
            return self.process.stderr.read().decode(errors="replace")
        return ""

    def log_text(self):
        try:
            return self.log_path.read_text()
        except OSError:
            return ""

    def stop(self, timeout=15):
        """SIGTERM (a clean unmount); on a hang, a lazy unmount and SIGKILL."""
        if self.process is None or self.process.poll() is not None:
            lazy_unmount(self.mountpoint)
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self):
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        lazy_unmount(self.mountpoint)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def log_problems(text, expected_errors=(), tracebacks_expected=False):
    """Tracebacks (unless expected) and ERROR/CRITICAL lines matching none of `expected_errors`."""
    problems = []
    for line in text.splitlines():
        if "Traceback (most recent call last)" in line:
            if not tracebacks_expected:
                problems.append(line)
        elif _ERROR_LINE.search(line) and not any(pattern in line for pattern in expected_errors):
            problems.append(line)
    return problems


def _read_with_deadline(fd, timeout):
    deadline = time.monotonic() + timeout
    chunks = []
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            break
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        chunks.append(chunk)
        if b"\n" in chunk:
            break
    return b"".join(chunks)


def lazy_unmount(mountpoint):
    subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], capture_output=True)
