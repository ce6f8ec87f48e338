"""systemd's file descriptor store, the start side: the descriptors handed back (LISTEN_FDS) by name.

A service with `FileDescriptorStoreMax=` may give systemd descriptors to keep
(`FDSTORE=1` with `FDNAME=`, notify.py's `Notifier.store_fd`). When the service starts
again (after a crash, a watchdog abort, an automatic restart) systemd passes them back
from descriptor 3 on, and says so in the environment: LISTEN_FDS (how many), LISTEN_PID
(for which process: a variable inherited by another process is not for it) and
LISTEN_FDNAMES (their names, colon-separated, in order).
"""

import os

LISTEN_FDS_START = 3


def listened_fds(listen_fds: str | None, listen_pid: str | None, names: str | None,
                 pid: int | None = None) -> dict[str, int]:
    """{name: fd} of the descriptors systemd passed to this process; {} if none are ours.

    Each is made close-on-exec: a child gets one only when it is given explicitly."""
    if not listen_fds or not listen_pid:
        return {}
    try:
        count, owner = int(listen_fds), int(listen_pid)
    except ValueError:
        return {}
    if owner != (os.getpid() if pid is None else pid) or count <= 0:
        return {}
    labels = names.split(":") if names else []
    labels += ["unknown"] * (count - len(labels))
    found: dict[str, int] = {}
    for index, label in enumerate(labels[:count]):
        fd = LISTEN_FDS_START + index
        try:
            os.set_inheritable(fd, False)
        except OSError:
            continue                # not open after all: nothing was passed there
        found.setdefault(label, fd)
    return found
