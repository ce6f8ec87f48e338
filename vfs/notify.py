"""systemd's notify protocol: READY, STATUS, STOPPING and WATCHDOG datagrams to $NOTIFY_SOCKET.

A unit with `Type=notify` starts its dependents when the daemon says READY=1; this
daemon says it at the moment `--background` would return (the mount has answered a
stat). STATUS= lines show in `systemctl status`. With `WatchdogSec=`, systemd sets
WATCHDOG_USEC and expects WATCHDOG=1 at least that often: the daemon sends it every half
interval, and only while a statvfs of its mount root answers (health.py), so a wedged
mount, and not only a dead process, gets restarted.

FDSTORE=1 (`store_fd`) gives systemd a duplicate of a descriptor to keep for the service
(`FileDescriptorStoreMax=`), sent with SCM_RIGHTS; it comes back at the next start
(fdstore.py). The keeper stores the FUSE connection this way (keeper.py).

Without NOTIFY_SOCKET (not under systemd) every call does nothing. A datagram that
cannot be sent is dropped: the daemon must never block or fail on its supervisor.
The keeper uses the Notifier too, so trio is imported only by the daemon's loops below.
"""

import array
import logging
import os
import socket

log = logging.getLogger(__name__)


class Notifier:
    def __init__(self, socket_path: str | None, watchdog_usec: int | None = None,
                 watchdog_pid: int | None = None):
        self.address = _address(socket_path) if socket_path else None
        # WATCHDOG_PID names the process systemd watches; another process must not ping for it.
        mine = watchdog_pid is None or watchdog_pid == os.getpid()
        self.watchdog_interval = watchdog_usec / 2e6 if watchdog_usec and mine and self.address else None
        self._socket: socket.socket | None = None
        self._stopping_sent = False

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def ready(self, status: str) -> None:
        self.send(f"READY=1\nSTATUS={status}")

    def status(self, status: str) -> None:
        self.send(f"STATUS={status}")

    def stopping(self) -> None:
        if not self._stopping_sent:
            self._stopping_sent = True
            self.send("STOPPING=1\nSTATUS=unmounting")

    def watchdog(self) -> None:
        self.send("WATCHDOG=1")

    def store_fd(self, fd: int, name: str) -> None:
        """Have systemd keep a duplicate of `fd` under `name` (handed back as LISTEN_FDNAMES)."""
        self.send(f"FDSTORE=1\nFDNAME={name}", fds=[fd])

    def send(self, message: str, fds: list[int] | tuple = ()) -> None:
        if self.address is None:
            return
        try:
            if self._socket is None:
                self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._socket.setblocking(False)
            rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
            self._socket.sendmsg([message.encode()], rights, 0, self.address)
        except OSError as exc:
            log.debug("could not notify systemd (%s): %s", exc.strerror, message.splitlines()[0])

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None


def _address(path: str) -> str | bytes:
    """An '@name' socket is in the abstract namespace (a leading NUL byte), as systemd means it."""
    return b"\0" + path[1:].encode() if path.startswith("@") else path


STATUS_SECONDS = 15.0


def status_of(reports: list[dict]) -> str:
    """One STATUS= line from the models' reports: what is resolved and how much is cached."""
    resolved = sum(1 for model in reports if model["commit"])
    size = sum(model["size"] for model in reports)
    cached = sum(model["cached_bytes"] for model in reports)
    share = f" ({cached / size:.0%})" if size else ""
    return f"{resolved} of {len(reports)} models resolved; {_size(cached)} of {_size(size)} cached{share}"


def _size(count):
    return f"{count / 2**30:.2f} GiB" if count >= 2**30 else f"{count / 2**20:.1f} MiB"


async def keep_informed(notifier: Notifier, reports, probe) -> None:
    """STATUS= every STATUS_SECONDS, and WATCHDOG=1 every half interval while `probe` says healthy.

    `reports()` gives the models' reports; `probe.check()` is a health.MountProbe's."""
    import trio

    if not notifier.enabled:
        return
    async with trio.open_nursery() as nursery:
        if notifier.watchdog_interval:
            nursery.start_soon(_pet_watchdog, notifier, probe)
        while True:
            await trio.sleep(STATUS_SECONDS)
            notifier.status(status_of(reports()))


async def _pet_watchdog(notifier, probe):
    import trio

    while True:
        health = await probe.check()
        if health.ok:
            notifier.watchdog()
        else:
            log.warning("not petting systemd's watchdog: %s", health.reason)
        await trio.sleep(notifier.watchdog_interval)
