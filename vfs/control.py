"""The daemon's control socket: hand the live connection to a successor, or start one (`upgrade`).

Each serving daemon listens on a unix socket beside its pid file (`socket_path`, 0600),
one JSON line per request:

- `{"op": "takeover"}`, from a successor (`mount --takeover`, or `mount` on a live mount
  point). The daemon stops its FUSE loop at a request boundary (`pyfuse3.terminate`:
  every request read has been answered when `pyfuse3.main` returns, and none is read
  after), writes its open files into the hand-over state, and answers `{"ok": true,
  "state": DIR}` with two descriptors (SCM_RIGHTS): the /dev/fuse connection and the
  cache's mount.lock (its flock goes along: the cache is never without its mount). The
  successor adopts the connection and answers `{"serving": true}`; the old daemon then
  exits 0 without unmounting. If that answer does not come (the successor crashed, or
  took longer than ACK_SECONDS), the old daemon makes sure the successor is dead,
  writes FUSE_NOTIFY_RESEND (requests it read and never answered come back) and serves
  on: a failed takeover loses nothing.
- `{"op": "upgrade"}`, from `lamina-llm-cache upgrade` when no keeper keeps the mount
  (`--no-keeper`): the daemon starts its successor from the installed code, with its own
  command line and `--takeover`, and answers `{"ok": true, "old": PID, "new": PID}` once
  it has handed over, or `{"ok": false, "error": WHY}` (it serves on).

Only the daemon's own user (or root) may connect (SO_PEERCRED).
"""

import array
import hashlib
import json
import logging
import os
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path

from . import daemons, errors

log = logging.getLogger(__name__)

HANDOVER_SUFFIX = ".handover"    # the hand-over state directory, beside the pid file
SESSION_FILE = "session.json"

ACK_SECONDS = 30.0              # a successor adopts in milliseconds; this bounds a wedged one
STOP_SECONDS = 60.0             # the old daemon's in-flight requests (a cold read waits on the Hub)


def beside_pid_file(mountpoint, suffix: str) -> Path:
    """A file of the mount's beside its pid file, found without a stat of the mount point
    itself (that would wait on the daemon, which may be the caller, not serving yet)."""
    real = daemons.real_mountpoint(mountpoint)
    return daemons.pid_file(real).parent / (urllib.parse.quote(real, safe="") + suffix)


def socket_path(mountpoint) -> Path:
    """Named by a hash of the mount point: a unix socket's path has at most 107 bytes."""
    beside = beside_pid_file(mountpoint, "")
    return beside.parent / (hashlib.sha256(beside.name.encode()).hexdigest()[:24] + ".control")


def _line(sock: socket.socket, fds: array.array | None = None) -> dict:
    """One JSON line from `sock` (descriptors sent with it into `fds`); {} at EOF."""
    data = b""
    while not data.endswith(b"\n"):
        if fds is None:
            chunk = sock.recv(4096)
        else:
            chunk, ancillary, _, _ = sock.recvmsg(4096, socket.CMSG_SPACE(4 * fds.itemsize))
            for level, kind, payload in ancillary:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds.frombytes(payload[:len(payload) - len(payload) % fds.itemsize])
        if not chunk:
            return {}
        data += chunk
    return json.loads(data)


def _say(sock: socket.socket, message: dict, fds: list[int] | None = None) -> None:
    data = (json.dumps(message) + "\n").encode()
    if fds:
        sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())])
    else:
        sock.sendall(data)


def _connect(mountpoint, timeout: float) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(str(socket_path(mountpoint)))
    except OSError as exc:
        sock.close()
        raise errors.LaminaError(f"no lamina-llm-cache daemon answers for {mountpoint} ({exc.strerror})") from None
    return sock


# ---------------------------------------------------------------------------
# The successor's side


CAP_SYS_NICE = 23
STARTUP_NICENESS = 10           # how much lower a successor's priority is while it builds


class QuietStart:
    """A successor's start-up (imports, manifest, tree, cache) at a lower CPU priority.

    Meanwhile the old daemon serves every reader, on the same cores: on a busy two-core
    host, a successor at full priority held a read of the old daemon up for most of a
    second. The priority goes back (`end`) when the successor asks for the connection,
    and is lowered only where it can go back: with CAP_SYS_NICE, or within RLIMIT_NICE."""

    def __init__(self) -> None:
        self.before = os.getpriority(os.PRIO_PROCESS, 0)
        self.lowered = self.before < 19 and _may_raise_priority_to(self.before)
        if self.lowered:
            os.setpriority(os.PRIO_PROCESS, 0, min(19, self.before + STARTUP_NICENESS))

    def end(self) -> None:
        """Every thread back at the priority the process started with (Linux: nice is per thread)."""
        if not self.lowered:
            return
        self.lowered = False
        for task in os.listdir("/proc/self/task"):
            try:
                os.setpriority(os.PRIO_PROCESS, int(task), self.before)
            except ProcessLookupError:
                pass                    # a thread that has ended meanwhile
            except PermissionError as exc:
                log.warning("could not restore thread %s's priority (%s); it serves at a lower one", task, exc)


def _may_raise_priority_to(niceness: int) -> bool:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("CapEff:") and int(line.split()[1], 16) >> CAP_SYS_NICE & 1:
                    return True
    except OSError:
        pass
    import resource
    soft, _ = resource.getrlimit(resource.RLIMIT_NICE)      # lowest niceness allowed: 20 - soft
    return soft == resource.RLIM_INFINITY or 20 - soft <= niceness


class Takeover:
    """Asks the live daemon of a mount point for its connection (`mount --takeover`)."""

    def __init__(self, mountpoint, start: QuietStart | None = None):
        self.mountpoint = mountpoint
        self.start = start
        self._sock: socket.socket | None = None

    def receive(self) -> tuple[int, int | None, str]:
        """(connection fd, mount.lock fd or None, state dir); LaminaError if refused."""
        if self.start is not None:
            self.start.end()            # built: from now on it serves, at full priority
        sock = self._sock = _connect(self.mountpoint, STOP_SECONDS)
        _say(sock, {"op": "takeover"})
        fds = array.array("i")
        answer = _line(sock, fds)
        if not answer.get("ok") or not fds:
            for fd in fds:
                os.close(fd)
            raise errors.LaminaError(f"takeover of {self.mountpoint} refused: "
                                     f"{answer.get('error', 'the daemon closed the control socket')}")
        lock = fds[1] if len(fds) > 1 else None
        if lock is not None:
            os.ftruncate(lock, 0)
            os.pwrite(lock, f"{os.getpid()}\n".encode(), 0)
        return fds[0], lock, answer["state"]

    def serving(self) -> None:
        """Tell the old daemon that this one serves (it exits without unmounting)."""
        if self._sock is not None:
            with self._sock:
                _say(self._sock, {"serving": True})
            self._sock = None


def served_cache(mountpoint) -> str | None:
    """The cache directory the live daemon of `mountpoint` serves from, as its hand-over
    state says (None: no state, e.g. a stock pyfuse3)."""
    try:
        session = json.loads((beside_pid_file(mountpoint, HANDOVER_SUFFIX) / SESSION_FILE).read_text())
    except (OSError, ValueError):
        return None
    return session.get("cache")


def refuse_another_cache(mountpoint, cache_dir: Path) -> None:
    """A `mount` on a live mount point takes it over only to serve the same cache: the cache's
    lock travels with the connection, and a successor on another cache would serve the
    predecessor's inodes from blobs it does not have."""
    theirs = served_cache(mountpoint)
    if theirs is not None and Path(theirs) != cache_dir.resolve():
        raise errors.LaminaError(f"{mountpoint} is already mounted by lamina-llm-cache from another cache "
                                 f"({theirs}); unmount it first, or mount with --cache-dir {theirs} to take it over")


def live_daemon(mountpoint) -> bool:
    """True if a daemon of ours serves `mountpoint` and answers on its control socket."""
    return socket_path(mountpoint).exists() and daemons.daemon_of(mountpoint) is not None


def ask_daemon_to_upgrade(mountpoint, timeout: float) -> dict:
    """`upgrade` without a keeper: the daemon starts its successor; its account of the outcome."""
    try:
        sock = _connect(mountpoint, timeout)
    except errors.LaminaError as exc:
        return {"ok": False, "error": str(exc)}
    with sock:
        _say(sock, {"op": "upgrade"})
        try:
            return _line(sock) or {"ok": False, "error": "the daemon closed the control socket"}
        except TimeoutError:
            return {"ok": False, "error": f"no outcome within {timeout:g}s"}


# ---------------------------------------------------------------------------
# The daemon's side (trio)


def peer_pid(sock) -> int:
    pid, uid, _ = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
    if uid not in (0, os.getuid()):
        raise PermissionError(f"uid {uid} may not control this daemon")
    return pid


def successor_argv(argv: list[str]) -> list[str]:
    """This daemon's command line for its successor: the same mount, taking over, no ready pipe."""
    out, skip = [], False
    for word in argv:
        if skip:
            skip = False
        elif word in ("--ready-fd", "--keeper-fd", "--adopt-fd", "--handover-state"):
            skip = True
        elif word not in ("--takeover", "--background"):
            out.append(word)
    return out + ["--takeover"]


def wait_dead(pid: int, timeout: float = 10.0) -> None:
    """SIGKILL `pid` and wait until it has exited (so that RESEND cannot race its replies)."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
    except ProcessLookupError:
        pass
    try:
        import select
        select.select([pidfd], [], [], timeout)
    finally:
        os.close(pidfd)


def start_successor(argv: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "vfs", *successor_argv(argv)], stdin=subprocess.DEVNULL,
                            start_new_session=True)


def monotonic() -> float:
    return time.monotonic()
