"""Simulates one way passthrough fails, in a daemon started with this folder on PYTHONPATH.

LAMINA_TEST_PASSTHROUGH_FAULT names it: eperm / eloop (the kernel refuses the backing
file), stock (pyfuse3 without the patch), old-kernel (INIT grants no passthrough),
non-root (no CAP_SYS_ADMIN). Tests only: the daemon's own fallback code then runs.

Two more knobs watch backing ids rather than break them: LAMINA_TEST_BACKING_TRACE names a
file each registration and close of a backing id is appended to ("PID open ID", "PID close
ID"), and LAMINA_TEST_PASSTHROUGH_LINGER sets how long a released blob's id lingers.
"""

import errno
import os

FAULT = os.environ.get("LAMINA_TEST_PASSTHROUGH_FAULT")
TRACE = os.environ.get("LAMINA_TEST_BACKING_TRACE")
LINGER = os.environ.get("LAMINA_TEST_PASSTHROUGH_LINGER")


def refuse(number):
    def backing_open(fd):
        raise OSError(number, os.strerror(number))
    return backing_open


if FAULT:
    import pyfuse3

    from vfs import passthrough

    if FAULT in ("eperm", "eloop"):
        pyfuse3.backing_open = refuse(errno.EPERM if FAULT == "eperm" else errno.ELOOP)
    elif FAULT == "stock":
        del pyfuse3.backing_open
    elif FAULT == "old-kernel":
        pyfuse3.passthrough_enabled = lambda: False
    elif FAULT == "non-root":
        passthrough.has_cap_sys_admin = lambda: False
    else:
        raise SystemExit(f"unknown LAMINA_TEST_PASSTHROUGH_FAULT {FAULT!r}")


def note(line):
    with open(TRACE, "a") as trace:
        trace.write(f"{os.getpid()} {line}\n")


if TRACE:
    import pyfuse3

    registered, closed = pyfuse3.backing_open, pyfuse3.backing_close

    def traced_open(fd):
        backing_id = registered(fd)
        note(f"open {backing_id}")
        return backing_id

    def traced_close(backing_id):
        note(f"close {backing_id}")
        return closed(backing_id)

    pyfuse3.backing_open, pyfuse3.backing_close = traced_open, traced_close

if LINGER:
    from vfs import passthrough

    passthrough.LINGER_SECONDS = float(LINGER)
