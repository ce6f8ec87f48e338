"""Is the mount alive: a statvfs of its root, bounded in time, in the daemon or out of it.

A statvfs always reaches the filesystem's daemon (a stat may be answered from the
kernel's cached attributes even when the daemon is dead), so it is the probe:

- it returns: the mount is serving;
- ENOTCONN: the daemon behind the mount is gone (killed, crashed): a dead mount;
- it does not return within the timeout: the mount is wedged (no FUSE worker answers).

A wedged FUSE mount can block statvfs for ever, and a thread blocked in a system call
cannot be cancelled. So the call runs in a thread of its own that the probe abandons at
its deadline, and at most MAX_STUCK such threads are left behind: while that many are
still blocked, the probe answers "wedged" at once without starting another. A probe
never hangs and never piles up threads, however often it is asked.

The daemon's /healthz runs `check` on its trio loop (an answer proves the loop turns);
`lamina-llm-cache health` runs `check_blocking` from outside, which is what still
answers when the daemon itself is dead.
"""

import errno
import os
import threading
from dataclasses import asdict, dataclass

import trio

from .daemons import real_mountpoint

DEFAULT_TIMEOUT = 2.0
MAX_STUCK = 3


@dataclass(frozen=True)
class Health:
    status: str             # "ok", "dead", "wedged", "not mounted" or "error"
    mountpoint: str
    reason: str = ""

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def as_dict(self) -> dict:
        return {"healthy": self.ok, **asdict(self)}


class MountProbe:
    """statvfs of `mountpoint` with a deadline; see the module docstring for the rules."""

    def __init__(self, mountpoint, timeout: float = DEFAULT_TIMEOUT, max_stuck: int = MAX_STUCK):
        self.mountpoint = str(mountpoint)
        self.timeout, self.max_stuck = timeout, max_stuck
        self._lock = threading.Lock()
        self._running = 0           # probe threads not yet returned (blocked ones included)

    async def check(self) -> Health:
        """From a trio task: the mount's health within `timeout` seconds."""
        if not self._enter():
            return self._too_many_stuck()
        with trio.move_on_after(self.timeout):
            return await trio.to_thread.run_sync(self._probe, abandon_on_cancel=True)
        return self._wedged()

    def check_blocking(self) -> Health:
        """From plain code (the CLI): the mount's health within `timeout` seconds."""
        if not self._enter():
            return self._too_many_stuck()
        answer = []
        thread = threading.Thread(target=lambda: answer.append(self._probe()), daemon=True,
                                  name="lamina-health-probe")
        thread.start()
        thread.join(self.timeout)
        return answer[0] if answer else self._wedged()

    def _enter(self):
        with self._lock:
            if self._running >= self.max_stuck:
                return False
            self._running += 1
            return True

    def _probe(self):
        try:
            return probe_mount(self.mountpoint)
        finally:
            with self._lock:
                self._running -= 1

    def _wedged(self):
        return Health("wedged", self.mountpoint,
                      f"statvfs of the mount root did not return within {self.timeout:g}s: "
                      "the daemon is not answering FUSE requests")

    def _too_many_stuck(self):
        return Health("wedged", self.mountpoint,
                      f"{self.max_stuck} earlier statvfs probes of the mount root are still blocked: "
                      "the daemon is not answering FUSE requests")


def probe_mount(mountpoint: str) -> Health:
    """One blocking statvfs of the mount root, and whether it is a lamina mount at all."""
    try:
        os.statvfs(mountpoint)
    except OSError as exc:
        if exc.errno == errno.ENOTCONN:
            return Health("dead", mountpoint, "the daemon behind the mount is gone (ENOTCONN: "
                          "transport endpoint is not connected); a new `mount` clears it")
        return Health("error", mountpoint, f"statvfs failed: {exc.strerror} ({errno.errorcode.get(exc.errno or 0)})")
    if not is_lamina_mount(mountpoint):
        return Health("not mounted", mountpoint, "no lamina-llm-cache mount is at this path")
    return Health("ok", mountpoint)


def is_lamina_mount(mountpoint: str) -> bool:
    target = real_mountpoint(mountpoint)
    with open("/proc/self/mountinfo") as table:
        for line in table:
            left, _, right = line.partition(" - ")
            fields = left.split()
            if fields[4].replace("\\040", " ") == target and right.startswith("fuse.lamina "):
                return True
    return False
