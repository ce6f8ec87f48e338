"""Simulates one way passthrough fails, in a daemon started with this folder on PYTHONPATH.

LAMINA_TEST_PASSTHROUGH_FAULT names it: eperm / eloop (the kernel refuses the backing
file), stock (pyfuse3 without the patch), old-kernel (INIT grants no passthrough),
non-root (no CAP_SYS_ADMIN). Tests only: the daemon's own fallback code then runs.
"""

import errno
import os

FAULT = os.environ.get("LAMINA_TEST_PASSTHROUGH_FAULT")


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
