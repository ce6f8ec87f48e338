"""Fixtures shared by the suite: the Hub simulator, a cache, and real mounts; the suite's own rules.

Rules every test is held to:
- Under `CI=true` (set by .ci/run) a skipped test is a failure: a CI run that cannot mount,
  or lacks a tool a test needs, must not go green. A test that can never run on the CI
  machine says so with `@pytest.mark.may_skip_in_ci(reason=...)`.
- Every mount started through `mount_factory` has its daemon log checked when the test
  ends: a traceback or an ERROR line the test did not declare (`mount.expect_log_errors`)
  fails it. `mount_factory(..., check_log=False)` opts out, for tests that read the log
  themselves.
- pytest-timeout (pyproject.toml) fails a test that hangs.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from vfs.testing.hubsim import HubSimulator
from vfs.testing.mounts import MountProcess, isolated_environment


def in_ci():
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Under CI, a skip is a failure unless the test is marked may_skip_in_ci."""
    outcome = yield
    report = outcome.get_result()
    if not (in_ci() and report.skipped and not hasattr(report, "wasxfail")):
        return
    if item.get_closest_marker("may_skip_in_ci") is not None:
        return
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    report.outcome = "failed"
    report.longrepr = f"skipped under CI=true, which does not allow skips: {reason}"


def fuse_available():
    return os.path.exists("/dev/fuse") and shutil.which("fusermount3") and os.geteuid() == 0


needs_fuse = pytest.mark.skipif(not fuse_available(), reason="needs /dev/fuse, fusermount3 and root")


def pytest_collection_modifyitems(items):
    """Every test that needs a real mount carries the `fuse` marker, however it says so, so
    `pytest -m "not fuse"` runs exactly what any user can run."""
    for item in items:
        skips_without_fuse = any("/dev/fuse" in str(mark.kwargs.get("reason", ""))
                                 for mark in item.iter_markers("skipif"))
        if skips_without_fuse or "mount_factory" in item.fixturenames:
            item.add_marker(pytest.mark.fuse)


@pytest.fixture
def hub():
    with HubSimulator() as simulator:
        yield simulator


@pytest.fixture
def mount_factory(tmp_path):
    """Builds MountProcess objects for a manifest text; stops them all at the end."""
    mounts = []

    def make(manifest_text, endpoint, *, cache_dir=None, mountpoint=None, env=None, args=(), start=True,
             check_log=True, keeper=False):
        index = len(mounts)
        manifest = tmp_path / f"models-{index}.yaml"
        manifest.write_text(manifest_text)
        mount = MountProcess(
            manifest, mountpoint or tmp_path / f"mnt-{index}", cache_dir or tmp_path / "cache",
            endpoint, tmp_path / f"mount-{index}.log",
            env=isolated_environment(tmp_path, env), extra_args=args, keeper=keeper)
        mount.check_log = check_log
        mounts.append(mount)
        return mount.start() if start else mount

    yield make
    # Last started, first stopped: a mount that cleared a dead one at the same mount point
    # must be gone before the dead one's clean-up (a lazy unmount of that mount point) runs,
    # or the clean-up cuts the connection under it while it answers.
    for mount in reversed(mounts):
        mount.stop()
    forget_runtime_entries(mounts)
    problems = [f"{mount.log_path.name}: {line}" for mount in mounts if mount.check_log
                for line in mount.log_problems()]
    if problems:
        pytest.fail("the daemon logged what the test did not expect (mount.expect_log_errors declares "
                    "provoked errors):\n" + "\n".join(problems), pytrace=False)


def forget_runtime_entries(mounts):
    """Remove the pid file, control socket and hand-over state of each mount whose daemon
    is gone.

    A daemon a test SIGKILLs never removes them (a new mount on the same mount point copes
    with them); without this, every run of the suite left a dozen under /run."""
    from vfs import control, daemons, handover
    for mount in mounts:
        pid_file = daemons.pid_file(mount.mountpoint)
        try:
            pid = int(pid_file.read_text().split()[0])
            os.kill(pid, 0)
            continue                    # a daemon still serves it: not the suite's to clear
        except (OSError, ValueError, IndexError):
            pass
        pid_file.unlink(missing_ok=True)
        control.socket_path(mount.mountpoint).unlink(missing_ok=True)
        shutil.rmtree(handover.state_dir(mount.mountpoint), ignore_errors=True)


def eventually(condition, timeout=10.0):
    """Poll `condition` until it holds or `timeout` passes; its last answer."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


def unexpected_log_lines(text, allowed=()):
    """Log lines at WARNING or above that a test did not expect."""
    bad = [line for line in text.splitlines()
           if (" WARNING " in line or " ERROR " in line or "Traceback" in line)]
    return [line for line in bad if not any(pattern in line for pattern in allowed)]


@pytest.fixture
def random_file(tmp_path):
    """Writes `size` deterministic pseudo-random bytes to a file and returns its path."""
    def make(name, size, seed=1):
        import random
        path = Path(tmp_path) / "sources" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        generator = random.Random(seed)
        with open(path, "wb") as out:
            remaining = size
            while remaining:
                chunk = min(remaining, 1 << 20)
                out.write(generator.randbytes(chunk))
                remaining -= chunk
        return path
    return make


def run_elsewhere(code, *args):
    """Run `code` in another Python process and return its stdout.

    mmap'd reads through the mount must not happen in this process: a page fault holds
    the GIL while it waits for the daemon, and the Hub simulator runs on threads here.
    """
    result = subprocess.run([sys.executable, "-c", code, *map(str, args)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def call_api(port, method, path):
    """(status, JSON answer) of one REST API request to a mount's --api port."""
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method)
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as failure:
        return failure.code, json.loads(failure.read())
