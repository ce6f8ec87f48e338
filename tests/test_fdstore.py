"""systemd's descriptors handed back (fdstore.py) and the RESEND notification (resend.py), without a mount."""

import os
import socket
import stat
import struct
import subprocess
import sys

from conftest import needs_fuse
from vfs.fdstore import LISTEN_FDS_START, listened_fds
from vfs.notify import Notifier
from vfs.resend import FUSE_NOTIFY_RESEND, resend_message


def test_descriptors_are_ours_only_when_listen_pid_names_us():
    assert listened_fds("1", str(os.getpid() + 1), "lamina-fuse") == {}
    assert listened_fds(None, str(os.getpid()), "lamina-fuse") == {}
    assert listened_fds("1", "not-a-pid", "lamina-fuse") == {}


def test_descriptors_are_found_by_name_from_3_on(tmp_path):
    # In a process of its own, whose descriptors 3 and 4 are put where systemd would put them.
    code = ("import os, sys; from vfs.fdstore import listened_fds; "
            "os.dup2(int(sys.argv[1]), 3); os.dup2(int(sys.argv[2]), 4); "
            "found = listened_fds('2', str(os.getpid()), 'first:lamina-fuse'); "
            "print(found, os.get_inheritable(4), os.readlink('/proc/self/fd/4'))")
    with open(tmp_path / "a", "w") as first, open(tmp_path / "b", "w") as second:
        result = subprocess.run([sys.executable, "-c", code, str(first.fileno()), str(second.fileno())],
                                capture_output=True, text=True, check=True,
                                pass_fds=(first.fileno(), second.fileno()))
    assert result.stdout.split() == ["{'first':", "3,", "'lamina-fuse':", "4}", "False", str(tmp_path / "b")]


def test_store_fd_sends_fdstore_with_the_descriptor(tmp_path):
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(tmp_path / "notify"))
    notifier = Notifier(str(tmp_path / "notify"))
    read_end, write_end = os.pipe()
    try:
        notifier.store_fd(read_end, "lamina-fuse")
        message, fds, _, _ = socket.recv_fds(listener, 1024, 2)
        assert message.decode().splitlines() == ["FDSTORE=1", "FDNAME=lamina-fuse"]
        os.write(write_end, b"x")
        assert os.read(fds[0], 1) == b"x"       # the same pipe, duplicated
        os.close(fds[0])
    finally:
        notifier.close()
        listener.close()
        os.close(read_end)
        os.close(write_end)


def test_resend_is_a_bare_notify_header():
    length, code, unique = struct.unpack("=IiQ", resend_message())
    assert (length, code, unique) == (16, FUSE_NOTIFY_RESEND, 0)


@needs_fuse
def test_a_fuse_descriptor_is_known_by_its_device_not_its_path(tmp_path):
    """A connection handed back from a container that has ended names a path that is gone;
    the keeper must still know it for /dev/fuse (and nothing else for it)."""
    from vfs.keeper import FUSE_DEVICE, _is_fuse_device
    elsewhere = tmp_path / "not-dev-fuse"
    os.mknod(elsewhere, 0o600 | stat.S_IFCHR, FUSE_DEVICE)
    fuse_fd = os.open(elsewhere, os.O_RDWR)
    read_end, write_end = os.pipe()
    null = os.open(os.devnull, os.O_RDONLY)
    try:
        assert os.readlink(f"/proc/self/fd/{fuse_fd}") != "/dev/fuse"
        assert _is_fuse_device(fuse_fd)
        assert not _is_fuse_device(read_end) and not _is_fuse_device(null)
    finally:
        for fd in (fuse_fd, read_end, write_end, null):
            os.close(fd)
