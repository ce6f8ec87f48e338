#!/usr/bin/env python3
"""Holds the FUSE connection of a daemon container while that container is gone.

Under systemd the keeper puts the connection in the unit's file descriptor store
(FDSTORE=1), and a restarted unit gets it back (LISTEN_FDS): readers never see the
restart. A container has no such store: when it ends, so does every holder of the
connection, and the mount is dead. This is that store, run outside the daemon's
container (a container of its own, or a process on the host), as JuiceFS's CSI driver
keeps its mount pods' FUSE descriptors.

    lamina-llm-cache-fdholder serve DIR              the holder: sockets in DIR
    lamina-llm-cache-fdholder exec DIR -- CMD...     the daemon container's entrypoint

`serve` speaks systemd's side of NOTIFY_SOCKET (DIR/notify.sock) for one thing: it keeps
the descriptor of each FDSTORE=1 datagram under its FDNAME, replacing an older one of
that name, and closes it on FDSTOREREMOVE=1 or once the descriptor polls POLLERR (the
connection ended: unmounted, or aborted). Anyone who connects to DIR/fds.sock gets every
kept descriptor, with their names. It never reads from them.

`exec` fetches what the holder keeps, puts it from fd 3 on with LISTEN_FDS,
LISTEN_FDNAMES and LISTEN_PID (this pid: exec keeps it), sets NOTIFY_SOCKET to the
holder, and execs CMD: `lamina-llm-cache mount` then adopts the kept connection as it
adopts systemd's. With no holder listening, it execs CMD with neither.

Standard library only, one thread: small enough to trust with the only live copy of a
connection. When the holder itself ends, it closes what it keeps; a mount whose daemon
is gone too is then dead, as without a holder.
"""

import fcntl
import os
import select
import signal
import socket
import sys
from pathlib import Path

NOTIFY = "notify.sock"
HANDOUT = "fds.sock"
MAX_FDS = 16


def log(message: str) -> None:
    print(f"lamina-llm-cache-fdholder: {message}", file=sys.stderr, flush=True)


class Holder:
    def __init__(self, directory: Path):
        directory.mkdir(parents=True, exist_ok=True)
        self.notify = self._bind(directory / NOTIFY, socket.SOCK_DGRAM)
        self.handout = self._bind(directory / HANDOUT, socket.SOCK_SEQPACKET)
        self.handout.listen(4)
        self.kept: dict[str, int] = {}          # FDNAME -> descriptor
        self.poll = select.poll()
        self.poll.register(self.notify, select.POLLIN)
        self.poll.register(self.handout, select.POLLIN)

    @staticmethod
    def _bind(path: Path, kind: int) -> socket.socket:
        path.unlink(missing_ok=True)            # left by a holder that was killed
        sock = socket.socket(socket.AF_UNIX, kind)
        sock.bind(str(path))
        os.chmod(path, 0o600)
        return sock

    def run(self) -> None:
        log(f"listening on {self.notify.getsockname()} and {self.handout.getsockname()}")
        while True:
            for fd, events in self.poll.poll():
                if fd == self.notify.fileno():
                    self._on_datagram()
                elif fd == self.handout.fileno():
                    self._hand_out()
                elif events & (select.POLLERR | select.POLLHUP | select.POLLNVAL):
                    self._drop(fd, "the connection ended")

    def _on_datagram(self) -> None:
        data, fds, _, _ = socket.recv_fds(self.notify, 4096, MAX_FDS)
        fields = dict(line.split("=", 1) for line in data.decode(errors="replace").splitlines() if "=" in line)
        name = fields.get("FDNAME", "stored")
        if fields.get("FDSTORE") == "1" and len(fds) == 1:
            if name in self.kept:
                self._drop(self.kept[name], "replaced")
            self.kept[name] = fds[0]
            self.poll.register(fds[0], 0)       # POLLERR and POLLHUP are reported regardless
            log(f"keeping {name} ({os.readlink(f'/proc/self/fd/{fds[0]}')})")
            return
        for fd in fds:                          # READY=1, STATUS=..., WATCHDOG=1: not ours to keep
            os.close(fd)
        if fields.get("FDSTOREREMOVE") == "1" and name in self.kept:
            self._drop(self.kept[name], "removed by its sender")

    def _drop(self, fd: int, why: str) -> None:
        name = next((n for n, kept in self.kept.items() if kept == fd), None)
        if name is not None:
            del self.kept[name]
        self.poll.unregister(fd)
        os.close(fd)
        log(f"dropped {name}: {why}")

    def _hand_out(self) -> None:
        conn, _ = self.handout.accept()
        with conn:
            names = list(self.kept)
            socket.send_fds(conn, [":".join(names).encode()], [self.kept[n] for n in names])
        if names:
            log(f"handed out {', '.join(names)}")


def fetch(directory: Path) -> tuple[list[str], list[int]]:
    """The holder's descriptors and their names; none if no holder listens in `directory`."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as sock:
            sock.connect(str(directory / HANDOUT))
            data, fds, _, _ = socket.recv_fds(sock, 4096, MAX_FDS)
    except OSError as exc:
        log(f"no holder at {directory / HANDOUT} ({exc.strerror}): starting without one")
        return [], []
    names = data.decode().split(":") if data else []
    return names, fds


def exec_with_kept(directory: Path, argv: list[str]) -> None:
    names, fds = fetch(directory)
    env = dict(os.environ, NOTIFY_SOCKET=str(directory / NOTIFY))
    if fds:
        above = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 3 + len(fds)) for fd in fds]   # out of 3's way
        for fd in fds:
            os.close(fd)
        for index, fd in enumerate(above):
            os.dup2(fd, 3 + index)              # inheritable, as dup2 makes it
            os.close(fd)
        env.update(LISTEN_FDS=str(len(fds)), LISTEN_FDNAMES=":".join(names), LISTEN_PID=str(os.getpid()))
        log(f"passing on {', '.join(names)} at fd 3")
    os.execvpe(argv[0], argv, env)


def main(argv: list[str]) -> int:
    if len(argv) >= 2 and argv[0] == "serve":
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        Holder(Path(argv[1])).run()
    if len(argv) >= 4 and argv[0] == "exec" and argv[2] == "--":
        exec_with_kept(Path(argv[1]), argv[3:])
    print(__doc__.split("\n\n")[2], file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
