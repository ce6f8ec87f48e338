"""The keeper: a small parent that holds the FUSE connection and restarts its serving child.

`lamina-llm-cache mount` runs as this keeper; the daemon that serves is its child. Once
the child serves, it hands the keeper a duplicate of its /dev/fuse descriptor over a
socket pair (SCM_RIGHTS). From then on the connection outlives the child: when the child
dies (SIGKILL, a crash, the OOM killer), the mount stays and its readers wait. The
keeper reaps the child, writes FUSE_NOTIFY_RESEND on the connection (resend.py: the
requests the dead child had read come back to the queue), and starts a successor that
adopts the same connection (`mount --adopt-fd N --handover-state PATH`, the hand-over
path of docs/DESIGN.md). Readers see a stall, not an error.

The keeper is small on purpose, so that it can be reasoned about: it imports neither
pyfuse3 nor trio, runs one thread, holds no cache, and does only this:

- SIGTERM, SIGINT, SIGHUP: passed to the child (a clean unmount, as without a keeper);
  the keeper exits with the child's exit code.
- SIGUSR1 (`upgrade` under a keeper): the keeper starts a successor from the installed
  code with `--takeover`; it takes the connection from the serving child over the
  child's control socket (the child stops at a request boundary and exits without
  unmounting). If the successor fails, the old child serves on. The outcome goes into
  the keeper's record, which `upgrade` reads.
- The child exits while the mount is still ours (listed at the mountpoint with the
  device it was mounted as): RESEND, then a successor. A successor that does not serve
  within START_SECONDS is killed. After RESTARTS_ALLOWED children in a row that died
  before they served, the keeper gives up, unmounts lazily (so nothing is left dead at
  the mountpoint) and exits 1. A child that served resets that count: a daemon killed
  from outside again and again is restarted every time.
- The mount went away (unmounted from outside, or lazily): the keeper exits with the
  child's code.
- Under systemd with `FileDescriptorStoreMax=`, the connection is also put in the
  service's file descriptor store (FDSTORE=1, FDNAME=FDSTORE_NAME), and a keeper started
  with that descriptor handed back (LISTEN_FDS) adopts it instead of mounting: a restart
  of the whole unit keeps the mount and its readers.

When the keeper itself dies, the child goes on serving (it holds the connection too),
but nobody restarts it any more; when the child dies after it, the last holder of the
connection is gone and the mount is dead (ENOTCONN). The next `mount` there clears it.
Under systemd the file descriptor store is one more holder, which outlives both.
"""

import array
import json
import logging
import os
import selectors
import signal
import socket
import stat
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import daemons
from .resend import ResendUnsupported, send_resend

log = logging.getLogger(__name__)

LINK_FLAG = "--keeper-fd"
FDSTORE_NAME = "lamina-fuse"
RESTARTS_ALLOWED = 5            # children in a row that died before they served
START_SECONDS = 120.0           # a successor pins from the store and builds its tree first
PASSED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
UPGRADE_SIGNAL = signal.SIGUSR1


@dataclass
class Connection:
    """The FUSE connection the keeper holds: its descriptor and the mount it belongs to."""

    fd: int
    device: str                 # "major:minor" of the mount, as /proc/self/mountinfo lists it
    state: str | None = None    # the hand-over state file the serving child keeps current


class Keeper:
    """Runs the serving child, holds its connection, and restarts it on the same connection.

    `child` is the daemon that serves (or is starting to); during an upgrade `successor`
    is the one taking over from it, and once that serves, `child` is the successor and
    `previous` the old daemon finishing its last requests."""

    def __init__(self, child_argv: list[str], mountpoint: Path, notifier=None, ready_fd: int | None = None,
                 adopted: Connection | None = None):
        self.child_argv = list(child_argv)
        self.mountpoint = daemons.real_mountpoint(mountpoint)
        self.notifier = notifier
        self.ready_fd = ready_fd
        self.connection = adopted
        self.child: subprocess.Popen | None = None
        self.successor: subprocess.Popen | None = None
        self.previous: subprocess.Popen | None = None
        self.child_serving = False
        self.adoptable = True           # False: a stock pyfuse3, which cannot serve an adopted connection
        self.started_at = 0.0
        self.failed_starts = 0          # children in a row that died before they served
        self.stopping = False
        self.upgrades: dict[str, Any] = {"finished": 0}
        self.exit_code: int | None = None
        self._link, self._child_link = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._selector = selectors.DefaultSelector()

    # -- the loop

    def run(self) -> int:
        wakeup = self._catch_signals()
        self._selector.register(self._link, selectors.EVENT_READ, self._on_message)
        self._selector.register(wakeup, selectors.EVENT_READ, self._on_signal)
        if self.connection is not None:
            self._resend()              # handed back by systemd: whoever held it before is gone
        self.child = self._start(adopt=self.connection is not None)
        while self.exit_code is None:
            for key, _ in self._selector.select(timeout=1.0):
                key.data(key.fileobj)
            self._check_start_deadline()
        self._close()
        return self.exit_code

    def _catch_signals(self):
        read_end, write_end = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(write_end, warn_on_full_buffer=False)
        for signum in PASSED_SIGNALS + (UPGRADE_SIGNAL,):
            signal.signal(signum, lambda *_: None)      # the wakeup fd carries the number
        return read_end

    def _on_signal(self, read_end) -> None:
        for signum in os.read(read_end, 64):
            if signum in PASSED_SIGNALS:
                self._stop(signum)
            elif signum == UPGRADE_SIGNAL:
                self._upgrade()

    def _stop(self, signum) -> None:
        log.info("keeper: %s: passing it to the serving daemon", signal.Signals(signum).name)
        self.stopping = True
        for process in (self.child, self.successor):
            if process is not None and process.poll() is None:
                process.send_signal(signal.SIGTERM)

    def _upgrade(self) -> None:
        if self.connection is None or not self.child_serving or self.successor is not None or self.stopping:
            self._upgrade_finished(False, "no daemon serves, or a hand-over is already under way")
            return
        log.info("keeper: upgrade: starting a successor to take over from pid %d", self.serving.pid)
        self.successor = self._start(takeover=True)

    # -- children

    @property
    def serving(self) -> subprocess.Popen:
        """The current child (started by run(): never None after that)."""
        assert self.child is not None
        return self.child

    @property
    def held(self) -> Connection:
        """The connection, once a child has handed it over (or systemd handed it back)."""
        assert self.connection is not None
        return self.connection

    def _start(self, adopt: bool = False, takeover: bool = False) -> subprocess.Popen:
        argv = _without_ready_fd(self.child_argv) + [LINK_FLAG, str(self._child_link.fileno())]
        passed = [self._child_link.fileno()]
        if adopt:
            connection = self.held
            argv += ["--adopt-fd", str(connection.fd)]
            if connection.state and os.path.exists(connection.state):
                argv += ["--handover-state", connection.state]
            passed.append(connection.fd)
        if takeover:
            argv.append("--takeover")
        if self.ready_fd is not None:           # only the first child says when it serves
            argv += ["--ready-fd", str(self.ready_fd)]
            passed.append(self.ready_fd)
        process = subprocess.Popen(argv, pass_fds=passed, env=_child_environment(), stdin=subprocess.DEVNULL)
        self.started_at = time.monotonic()
        pidfd = os.pidfd_open(process.pid)
        self._selector.register(pidfd, selectors.EVENT_READ, lambda fd: self._on_exit(fd, process))
        if self.ready_fd is not None:
            os.close(self.ready_fd)     # the child's copy says ready, or closes unsaid when it dies
            self.ready_fd = None
        return process

    def _on_message(self, link) -> None:
        fds = array.array("i")
        message, ancillary, _, _ = link.recvmsg(4096, socket.CMSG_SPACE(4 * fds.itemsize))
        for level, kind, data in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(data[:len(data) - len(data) % fds.itemsize])
        if message:
            self._serving(json.loads(message), list(fds))
        else:
            for fd in fds:
                os.close(fd)

    def _serving(self, said: dict, fds: list[int]) -> None:
        fd = fds[0] if fds else None
        for extra in fds[1:]:
            os.close(extra)
        if self.connection is None:
            device = mounted_device(self.mountpoint)
            if fd is None or device is None:
                log.error("keeper: the serving daemon sent no connection; it will not be restarted")
                if fd is not None:
                    os.close(fd)
                return
            self.connection = Connection(fd, device)
            self._store_in_systemd()
        elif fd is not None:
            os.close(fd)                # the same connection we hold already
        self.held.state = said.get("state") or self.held.state
        self.adoptable = bool(said.get("adoptable", True))
        pid = said.get("pid")
        if self.successor is not None and pid == self.successor.pid:
            self.previous, self.child, self.successor = self.serving, self.successor, None
            if self.previous.poll() is not None:
                self._upgrade_done()
        self.child_serving = True
        daemons.record(self.mountpoint)     # `unmount` waits for the keeper, which outlives every child
        self._write_record()
        log.info("keeper: daemon pid %s serves %s", pid, self.mountpoint)

    def _on_exit(self, pidfd: int, process: subprocess.Popen) -> None:
        self._selector.unregister(pidfd)
        os.close(pidfd)
        code = process.wait()
        if process is self.previous:
            self._upgrade_done()
        elif process is self.successor:
            self._successor_failed(code)
        elif process is self.child:
            self._child_exited(code)

    def _child_exited(self, code: int) -> None:
        served, self.child_serving = self.child_serving, False
        if self.stopping or self.connection is None or not self._mount_is_ours():
            if self.stopping and self._mount_is_ours():
                # A daemon that adopted its connection mounted nothing, so its close does not
                # unmount: the keeper does, as libfuse would have (lazily).
                log.info("keeper: unmounting %s", self.mountpoint)
                _lazy_unmount(self.mountpoint)
            elif not self.stopping and self.connection is not None:
                log.info("keeper: %s is no longer mounted; exiting", self.mountpoint)
            self.exit_code = _exit_status(code)
            return
        if self.successor is not None:
            log.info("keeper: upgrade: the old daemon has exited; its successor takes over")
            return
        if code == 0 and served:
            # A clean exit with the mount still ours: it handed the connection over to a
            # daemon this keeper did not start (a `mount` on the live mount point).
            log.info("keeper: the daemon handed %s over to another; the keeper steps aside", self.mountpoint)
            self.exit_code = 0
            return
        if not self.adoptable:
            log.error("keeper: the serving daemon (pid %d) %s, and this build's pyfuse3 cannot adopt a "
                      "connection (make install builds one that can); unmounting %s",
                      self.serving.pid, _describe(code), self.mountpoint)
            _lazy_unmount(self.mountpoint)
            self.exit_code = _exit_status(code) or 1
            return
        log.warning("keeper: the serving daemon (pid %d) %s%s; starting a successor on the same connection",
                    self.serving.pid, _describe(code), "" if served else " before it served")
        self._restart(served)

    def _successor_failed(self, code: int) -> None:
        self.successor = None
        why = f"the successor {_describe(code)} before it served; see the log"
        self._upgrade_finished(False, why)
        if self.serving.poll() is None:
            log.warning("keeper: upgrade failed: %s; pid %d serves on", why, self.serving.pid)
        elif not self.stopping and self._mount_is_ours():
            log.warning("keeper: upgrade failed after the old daemon had gone: %s", why)
            self._restart(served=False)

    def _restart(self, served: bool = True) -> None:
        if not self._may_restart(served):
            return
        self._resend()                  # the predecessor is reaped: nothing of it can answer now
        self.child = self._start(adopt=True)

    def _upgrade_done(self) -> None:
        old, self.previous = self.previous, None
        log.info("keeper: upgrade: pid %d handed over to pid %d", old.pid if old else 0, self.serving.pid)
        self._upgrade_finished(True, None, old.pid if old else None)

    def _upgrade_finished(self, ok: bool, error: str | None, old: int | None = None) -> None:
        self.upgrades = {"finished": self.upgrades["finished"] + 1, "ok": ok, "error": error,
                         "old": old, "new": self.serving.pid if ok else None}
        self._write_record()

    def _check_start_deadline(self) -> None:
        starting = self.successor or (self.child if not self.child_serving and self.connection else None)
        if starting is not None and starting.poll() is None and time.monotonic() - self.started_at > START_SECONDS:
            log.error("keeper: pid %d did not serve within %.0f s; killing it", starting.pid, START_SECONDS)
            starting.kill()

    def _may_restart(self, served: bool) -> bool:
        self.failed_starts = 0 if served else self.failed_starts + 1
        if self.failed_starts <= RESTARTS_ALLOWED:
            return True
        log.error("keeper: %d daemons in a row died before they served; giving up and unmounting %s",
                  self.failed_starts, self.mountpoint)
        _lazy_unmount(self.mountpoint)
        self.exit_code = 1
        return False

    # -- the connection

    def _resend(self) -> None:
        try:
            send_resend(self.held.fd)
        except ResendUnsupported as exc:
            log.warning("keeper: %s: requests the dead daemon had read will not be answered", exc.strerror)
        except OSError as exc:
            log.warning("keeper: FUSE_NOTIFY_RESEND failed: %s", exc.strerror)

    def _mount_is_ours(self) -> bool:
        return self.connection is not None and mounted_device(self.mountpoint) == self.connection.device

    def _store_in_systemd(self) -> None:
        if self.notifier is not None and self.notifier.enabled:
            self.notifier.store_fd(self.held.fd, FDSTORE_NAME)

    def _write_record(self) -> None:
        if self.connection is not None:
            write_record(self.mountpoint, {"keeper": os.getpid(), "child": self.serving.pid,
                                           "device": self.connection.device, "state": self.connection.state,
                                           "upgrades": self.upgrades})

    def _close(self) -> None:
        daemons.forget(self.mountpoint)
        _forget_record(self.mountpoint)
        if self.connection is not None:
            os.close(self.connection.fd)
            self.connection = None
        self._link.close()
        self._child_link.close()


def keep_mount(argv: list[str], mountpoint: Path, ready_fd: int | None, settings) -> int:
    """`mount` as a keeper: run `python -m vfs` with `argv` as the serving child, and keep it serving."""
    from .notify import Notifier

    notifier = Notifier(settings.notify_socket)
    adopted = adopted_connection(mountpoint, settings.stored_fds)
    keeper = Keeper([sys.executable, "-m", "vfs", *argv], mountpoint, notifier, ready_fd, adopted)
    try:
        return keeper.run()
    finally:
        notifier.close()


def _exit_status(code: int) -> int:
    return code if code >= 0 else 128 - code       # a child killed by signal N: 128 + N, as a shell says


def _describe(code: int) -> str:
    return f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with {code}"


def _without_ready_fd(argv: list[str]) -> list[str]:
    """The child's argv without `--ready-fd N`: only the first child reports readiness."""
    out, skip = [], False
    for word in argv:
        if skip:
            skip = False
        elif word == "--ready-fd":
            skip = True
        elif not word.startswith("--ready-fd="):
            out.append(word)
    return out


def _child_environment() -> dict:
    env = dict(os.environ)
    # systemd's fds were ours (LISTEN_PID): the child gets the connection by --adopt-fd. It
    # watches the mount's health for the watchdog; WATCHDOG_PID names the keeper, so drop it.
    for name in ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES", "WATCHDOG_PID"):
        env.pop(name, None)
    return env


# ---------------------------------------------------------------------------
# The mount table


def mounted_device(mountpoint: str) -> str | None:
    """"major:minor" of the top lamina mount at `mountpoint` (a real path), or None.

    Read from /proc/self/mountinfo, never by a stat: a stat of a mount whose daemon is
    dead or busy would wait on it, and os.path.ismount() is False for a dead FUSE mount."""
    found = None
    with open("/proc/self/mountinfo") as table:
        for line in table:
            fields = line.split()
            separator = fields.index("-")
            if _unescape(fields[4]) == mountpoint:
                found = fields[2] if fields[separator + 1] == "fuse.lamina" else None
    return found


def _unescape(path: str) -> str:
    return path.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\")


def _lazy_unmount(mountpoint: str) -> None:
    subprocess.run(["fusermount3", "-u", "-z", mountpoint], capture_output=True)


# ---------------------------------------------------------------------------
# The keeper's record: what a keeper restarted by systemd needs to adopt the stored fd


def _record_path(mountpoint) -> Path:
    return daemons.pid_file(mountpoint).with_suffix(".keeper")


def write_record(mountpoint, record: dict) -> None:
    path = _record_path(mountpoint)
    fresh = path.with_suffix(".tmp")
    fresh.write_text(json.dumps(record))
    os.replace(fresh, path)


def read_record(mountpoint) -> dict | None:
    """The keeper's record for `mountpoint`, if a keeper keeps it (or kept it and was killed)."""
    try:
        return json.loads(_record_path(mountpoint).read_text())
    except (OSError, ValueError):
        return None


def _forget_record(mountpoint) -> None:
    try:
        _record_path(mountpoint).unlink()
    except FileNotFoundError:
        pass


def adopted_connection(mountpoint, stored: dict[str, int]) -> Connection | None:
    """The connection systemd handed back (LISTEN_FDS), if it still is the mount at `mountpoint`.

    A stored descriptor whose mount is gone (unmounted meanwhile) or is not the one the
    record names is closed: the keeper then mounts afresh."""
    fd = stored.get(FDSTORE_NAME)
    if fd is None:
        return None
    if not _is_fuse_device(fd):
        log.warning("keeper: descriptor %d handed back as %s is not /dev/fuse; ignored", fd, FDSTORE_NAME)
        return None
    real = daemons.real_mountpoint(mountpoint)     # no stat: nothing answers the mount before we adopt it
    record = read_record(real)
    if record is None or mounted_device(real) != record.get("device"):
        log.warning("keeper: the connection systemd kept is not the mount at %s any more; mounting afresh", real)
        os.close(fd)
        return None
    log.info("keeper: adopting the connection systemd kept for %s (mount %s)", real, record["device"])
    return Connection(fd, record["device"], record.get("state"))


# ---------------------------------------------------------------------------
# The child's side


def tell_keeper(link_fd: int, state_path: str | None = None) -> None:
    """In the serving daemon, once it serves: give the keeper a duplicate of the connection."""
    pyfuse3 = sys.modules.get("pyfuse3")
    adoptable = pyfuse3 is not None and hasattr(pyfuse3, "adopt")     # the project's patched build
    message = json.dumps({"pid": os.getpid(), "state": state_path, "adoptable": adoptable}).encode()
    fds = array.array("i", [connection_fd()])
    with socket.socket(fileno=os.dup(link_fd)) as link:
        link.sendmsg([message], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds.tobytes())])


FUSE_DEVICE = os.makedev(10, 229)       # /dev/fuse, the misc device "fuse"


def _is_fuse_device(fd: int) -> bool:
    """By the device number, not the path: a descriptor handed over from another mount
    namespace (a container that has ended) no longer reads as /dev/fuse."""
    try:
        info = os.fstat(fd)
    except OSError:
        return False
    return stat.S_ISCHR(info.st_mode) and info.st_rdev == FUSE_DEVICE


def connection_fd() -> int:
    """This process's /dev/fuse descriptor (pyfuse3's session fd)."""
    pyfuse3 = sys.modules.get("pyfuse3")
    if pyfuse3 is not None and hasattr(pyfuse3, "connection_fd"):
        return pyfuse3.connection_fd()
    for name in os.listdir("/proc/self/fd"):
        if _is_fuse_device(int(name)):
            return int(name)
    raise RuntimeError("this process holds no /dev/fuse descriptor")


# ---------------------------------------------------------------------------
# `upgrade` under a keeper


def ask_keeper_to_upgrade(mountpoint, timeout: float) -> dict | None:
    """Ask the keeper of `mountpoint` for an upgrade and wait for its outcome.

    None when no keeper keeps it (the daemon is asked itself). Else the keeper's account:
    {"ok": True, "old": pid, "new": pid} once the successor serves and the old daemon has
    exited, or {"ok": False, "error": why} (the old daemon serves on)."""
    record = read_record(mountpoint)
    if record is None or daemons.daemon_of(mountpoint) != record.get("keeper"):
        return None
    before = record["upgrades"]["finished"]
    os.kill(record["keeper"], UPGRADE_SIGNAL)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        record = read_record(mountpoint) or record
        if record["upgrades"]["finished"] > before:
            return record["upgrades"]
        if daemons.has_exited(record["keeper"]):
            return {"ok": False, "error": "the keeper exited"}
        time.sleep(daemons.POLL_SECONDS)
    return {"ok": False, "error": f"no outcome within {timeout:g}s"}
