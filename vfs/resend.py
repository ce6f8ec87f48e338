"""FUSE_NOTIFY_RESEND: ask the kernel to queue again the requests a dead server had read.

A server process that dies between reading a request from /dev/fuse and answering it
leaves that request in the kernel's "processing" list, where nobody will ever answer it:
its reader waits for ever, even after a successor serves the same connection. Linux 6.9
added FUSE_NOTIFY_RESEND, a notification written to the connection like any reply (a
`fuse_out_header` with `unique` 0 and the notify code in `error`): the kernel moves every
request in processing back to the pending queue, marking each with bit 63 of `unique`,
and the next read of the connection returns them.

Send it only once the predecessor is gone (reaped, or known dead): RESEND also takes back
requests a live server still holds, and that server's late reply then fails with ENOENT.
A read-only file system's requests can all be answered twice, so a request resent and
answered by the successor is safe.
"""

import errno
import os
import struct

FUSE_NOTIFY_RESEND = 7
# struct fuse_out_header { uint32_t len; int32_t error; uint64_t unique; }
_HEADER = struct.Struct("=IiQ")


class ResendUnsupported(OSError):
    """The kernel does not know FUSE_NOTIFY_RESEND (before Linux 6.9)."""


def resend_message() -> bytes:
    return _HEADER.pack(_HEADER.size, FUSE_NOTIFY_RESEND, 0)


def send_resend(connection_fd: int) -> None:
    """Write FUSE_NOTIFY_RESEND on `connection_fd`; ResendUnsupported on a kernel without it.

    ENOTCONN (the connection was aborted: nothing is left to resend to) is raised as is."""
    try:
        os.write(connection_fd, resend_message())
    except OSError as exc:
        if exc.errno == errno.EINVAL:       # an unknown notify code
            raise ResendUnsupported(exc.errno, "this kernel has no FUSE_NOTIFY_RESEND (Linux >= 6.9)") from None
        raise
