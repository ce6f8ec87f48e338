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
- SIGUSR1 (`upgrade` under a keeper): the child is asked to hand over (SIGUSR1 to it:
  it stops at a request boundary and exits without unmounting); once it has exited, a
  successor from the installed code adopts the connection.
- The child exits while the mount is still ours (listed at the mountpoint with the
  device it was mounted as): RESEND, then a successor. At most RESTARTS_ALLOWED in
  RESTART_WINDOW seconds, and a successor that does not serve within START_SECONDS is
  killed and counts as one; past that the keeper gives up, unmounts lazily (so nothing
  is left dead at the mountpoint) and exits 1.
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
import collections
import json
import logging
import os
import selectors
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from . import daemons
from .resend import ResendUnsupported, send_resend

log = logging.getLogger(__name__)

LINK_FLAG = "--keeper-fd"
FDSTORE_NAME = "lamina-fuse"
RESTARTS_ALLOWED = 5
RESTART_WINDOW = 60.0
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
    """Runs the serving child, holds its connection, and restarts it on the same connection."""

    def __init__(self, child_argv: list[str], mountpoint: Path, notifier=None, ready_fd: int | None = None,
                 adopted: Connection | None = None):
        self.child_argv = list(child_argv)
        self.mountpoint = os.path.realpath(mountpoint)
        self.notifier = notifier
        self.ready_fd = ready_fd
        self.connection = adopted
        self.child: subprocess.Popen | None = None
        self.child_serving = False
        self.started_at = 0.0
        self.restarts = collections.deque()
        self.stopping = False
        self.upgrading = False
        self.exit_code = None
        self._link, self._child_link = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._selector = selectors.DefaultSelector()

    # -- the loop

    def run(self) -> int:
        wakeup = self._catch_signals()
        self._selector.register(self._link, selectors.EVENT_READ, self._on_message)
        self._selector.register(wakeup, selectors.EVENT_READ, self._on_signal)
        if self.connection is not None:
            self._resend()              # handed back by systemd: whoever held it before is gone
        self._start_child(adopt=self.connection is not None)
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
        self._wakeup_write = write_end
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
        if self.child is not None and self.child.poll() is None:
            self.child.send_signal(signal.SIGTERM)

    def _upgrade(self) -> None:
        if self.connection is None or not self.child_serving or self.stopping:
            log.warning("keeper: upgrade asked while no daemon serves; ignored")
            return
        log.info("keeper: upgrade: asking the serving daemon (pid %d) to hand over", self.child.pid)
        self.upgrading = True
        self.child.send_signal(UPGRADE_SIGNAL)

    # -- the child

    def _start_child(self, adopt: bool) -> None:
        argv = _without_ready_fd(self.child_argv) + [LINK_FLAG, str(self._child_link.fileno())]
        passed = [self._child_link.fileno()]
        if adopt:
            argv += ["--adopt-fd", str(self.connection.fd)]
            if self.connection.state:
                argv += ["--handover-state", self.connection.state]
            passed.append(self.connection.fd)
        if self.ready_fd is not None:           # only the first child says when it serves
            argv += ["--ready-fd", str(self.ready_fd)]
            passed.append(self.ready_fd)
        self.child = subprocess.Popen(argv, pass_fds=passed, env=_child_environment(), stdin=subprocess.DEVNULL)
        self.child_serving = False
        self.started_at = time.monotonic()
        pidfd = os.pidfd_open(self.child.pid)
        self._selector.register(pidfd, selectors.EVENT_READ, self._on_child_exit)
        if self.ready_fd is not None:
            os.close(self.ready_fd)     # the child's copy says ready, or closes unsaid when it dies
            self.ready_fd = None

    def _on_message(self, link) -> None:
        fds = array.array("i")
        message, ancillary, _, _ = link.recvmsg(4096, socket.CMSG_SPACE(fds.itemsize))
        for level, kind, data in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(data[:len(data) - len(data) % fds.itemsize])
        if not message:
            return
        said = json.loads(message)
        self._serving(said, fds[0] if fds else None)

    def _serving(self, said: dict, fd: int | None) -> None:
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
        self.connection.state = said.get("state") or self.connection.state
        self.child_serving = True
        daemons.record(self.mountpoint)     # `unmount` waits for the keeper, which outlives every child
        _write_record(self.mountpoint, self.connection)
        log.info("keeper: daemon pid %d serves %s", said.get("pid", self.child.pid), self.mountpoint)

    def _on_child_exit(self, pidfd) -> None:
        self._selector.unregister(pidfd)
        os.close(pidfd)
        code = self.child.wait()
        served, self.child_serving = self.child_serving, False
        if self.stopping or self.connection is None:
            self.exit_code = code if code >= 0 else 128 - code
            return
        if not self._mount_is_ours():
            log.info("keeper: %s is no longer mounted; exiting", self.mountpoint)
            self.exit_code = code if code >= 0 else 128 - code
            return
        if self.upgrading:
            self.upgrading = False
            log.info("keeper: upgrade: the old daemon has exited (%s); starting the new one", _describe(code))
        else:
            log.warning("keeper: the serving daemon (pid %d) %s%s; starting a successor on the same connection",
                        self.child.pid, _describe(code), "" if served else " before it served")
            if not self._may_restart():
                return
        self._resend()
        self._start_child(adopt=True)

    def _check_start_deadline(self) -> None:
        if (self.child is not None and not self.child_serving and self.connection is not None
                and self.child.poll() is None and time.monotonic() - self.started_at > START_SECONDS):
            log.error("keeper: the successor (pid %d) did not serve within %.0f s; killing it",
                      self.child.pid, START_SECONDS)
            self.child.kill()

    def _may_restart(self) -> bool:
        now = time.monotonic()
        self.restarts.append(now)
        while self.restarts and now - self.restarts[0] > RESTART_WINDOW:
            self.restarts.popleft()
        if len(self.restarts) <= RESTARTS_ALLOWED:
            return True
        log.error("keeper: %d restarts within %.0f s; giving up and unmounting %s",
                  len(self.restarts), RESTART_WINDOW, self.mountpoint)
        _lazy_unmount(self.mountpoint)
        self.exit_code = 1
        return False

    # -- the connection

    def _resend(self) -> None:
        try:
            send_resend(self.connection.fd)
        except ResendUnsupported as exc:
            log.warning("keeper: %s: requests the dead daemon had read will not be answered", exc.strerror)
        except OSError as exc:
            log.warning("keeper: FUSE_NOTIFY_RESEND failed: %s", exc.strerror)

    def _mount_is_ours(self) -> bool:
        return self.connection is not None and mounted_device(self.mountpoint) == self.connection.device

    def _store_in_systemd(self) -> None:
        if self.notifier is not None and self.notifier.enabled:
            self.notifier.store_fd(self.connection.fd, FDSTORE_NAME)

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


def _write_record(mountpoint, connection: Connection) -> None:
    path = _record_path(mountpoint)
    fresh = path.with_suffix(".tmp")
    fresh.write_text(json.dumps({"device": connection.device, "state": connection.state}))
    os.replace(fresh, path)


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
    real = os.path.realpath(mountpoint)
    try:
        record = json.loads(_record_path(real).read_text())
    except (OSError, ValueError):
        record = None
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
    message = json.dumps({"pid": os.getpid(), "state": state_path}).encode()
    fds = array.array("i", [connection_fd()])
    with socket.socket(fileno=os.dup(link_fd)) as link:
        link.sendmsg([message], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds.tobytes())])


def connection_fd() -> int:
    """This process's /dev/fuse descriptor (pyfuse3's session fd)."""
    pyfuse3 = sys.modules.get("pyfuse3")
    if pyfuse3 is not None and hasattr(pyfuse3, "connection_fd"):
        return pyfuse3.connection_fd()
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{name}") == "/dev/fuse":
                return int(name)
        except OSError:
            continue
    raise RuntimeError("this process holds no /dev/fuse descriptor")
