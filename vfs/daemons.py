"""Which daemon serves a mountpoint: one pid file per mount, and waiting for that daemon to exit.

`unmount` must not return while the daemon still runs (a restart would race it for the
cache), and it cannot ask the daemon itself: a wedged daemon would hang the question. So
a mount records its pid under a runtime directory, keyed by the mountpoint's real path,
and removes the file when it exits; `unmount` reads it before unmounting and then waits
for that process to end.
"""

import os
import tempfile
import time
import urllib.parse
from pathlib import Path

POLL_SECONDS = 0.05


def _run_dir() -> Path:
    if os.geteuid() == 0 and os.path.isdir("/run") and os.access("/run", os.W_OK):
        return Path("/run/lamina-llm-cache")
    return Path(tempfile.gettempdir()) / f"lamina-llm-cache-{os.getuid()}"


SYMLINKS_FOLLOWED = 40         # as the kernel's path walk (MAXSYMLINKS)


def real_mountpoint(mountpoint) -> str:
    """The real path of `mountpoint`, found without a stat of the mount point itself.

    os.path.realpath() lstats every component, the last one too: on a mount whose server
    is gone, busy, or not started yet (a keeper adopting the connection systemd kept) that
    stat is a FUSE GETATTR nobody answers, and the caller waits for ever. So the parent is
    resolved and the base name joined to it; readlink() of the base name answers without
    the file system below it (a mount point is never a symlink: mount(2) follows them)."""
    path = os.path.abspath(mountpoint)
    for _ in range(SYMLINKS_FOLLOWED):
        parent, name = os.path.split(path)
        path = os.path.join(os.path.realpath(parent), name)
        try:
            target = os.readlink(path)
        except OSError:
            return path             # not a symlink (EINVAL), or not there
        path = os.path.normpath(os.path.join(os.path.dirname(path), target))
    return path


def pid_file(mountpoint) -> Path:
    return _run_dir() / (urllib.parse.quote(real_mountpoint(mountpoint), safe="") + ".pid")


def record(mountpoint) -> None:
    """Note that this process serves `mountpoint`."""
    path = pid_file(mountpoint)
    path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    path.write_text(f"{os.getpid()}\n")


def forget(mountpoint) -> None:
    try:
        path = pid_file(mountpoint)
        if path.read_text().strip() == str(os.getpid()):
            path.unlink()
    except OSError:
        pass


def daemon_of(mountpoint) -> int | None:
    """The pid of the live daemon serving `mountpoint`, or None."""
    try:
        pid = int(pid_file(mountpoint).read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if _is_our_daemon(pid) else None


def _is_our_daemon(pid) -> bool:
    # A pid file left by a daemon killed with SIGKILL may name a reused pid: check it is us.
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
            words = cmdline.read().split(b"\0")
    except OSError:
        return False
    return b"mount" in words and any(w in (b"vfs", b"lamina-llm-cache") or w.endswith(b"/lamina-llm-cache")
                                     for w in words)


def has_exited(pid) -> bool:
    """True once `pid` is gone or a zombie (exited, not yet reaped by its parent)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except (OSError, IndexError):
        return True


def wait_for_exit(pid, timeout) -> bool:
    """Wait up to `timeout` seconds for `pid` to exit; whether it did."""
    deadline = time.monotonic() + timeout
    while not has_exited(pid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(POLL_SECONDS)
    return True
