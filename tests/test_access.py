"""Read-only, always, and readable by other users only with --allow-other, tested with real system calls.

test_mount.py pins the thirteen common write paths (open for writing, create, mkdir,
unlink, rmdir, rename, symlink, link, truncate, chmod, chown, utime, setxattr). This file
adds the rest (removexattr, mknod, O_TRUNC, forging a `user.lamina.*` attribute, changes
to directories and the root), the daemon's own refusals without the kernel in the way,
and access by a real second user.
"""

import errno
import hashlib
import os
import pwd
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path

import pyfuse3
import pytest

from conftest import needs_fuse
from faultkit import BLOCK, MiB
from vfs.ops import Operations
from vfs.tree import Tree

MANIFEST = """
models:
  tiny:
    path: /models/tiny/weights/model.gguf
    backend: llama.cpp
    hf: org/tiny
    file: tiny.gguf
"""
OTHER_USER = "lamina-other"


@pytest.fixture
def tiny(hub, random_file):
    data = random_file("tiny.gguf", 2 * MiB + 3).read_bytes()
    hub.add_repo("org/tiny", files={"tiny.gguf": data})
    return data


@pytest.fixture
def mounted(hub, tiny, mount_factory):
    return mount_factory(MANIFEST, hub.endpoint, args=BLOCK)


def model_file(mount):
    return mount.mountpoint / "tiny" / "weights" / "model.gguf"


# ------------------------------------------------------------------ read-only, more write paths

MORE_WRITES = {
    "open-wronly": lambda p: os.open(p / "tiny/weights/model.gguf", os.O_WRONLY),
    "open-rdonly-trunc": lambda p: os.open(p / "tiny/weights/model.gguf", os.O_RDONLY | os.O_TRUNC),
    "create-exclusive": lambda p: os.open(p / "tiny/weights/new.gguf", os.O_WRONLY | os.O_CREAT | os.O_EXCL),
    "mknod-fifo": lambda p: os.mkfifo(p / "tiny/weights/fifo"),
    "mknod-file": lambda p: os.mknod(p / "tiny/weights/node", stat.S_IFREG | 0o644),
    "mkdir-in-a-model": lambda p: os.mkdir(p / "tiny/weights/sub"),
    "rmdir-a-model-folder": lambda p: os.rmdir(p / "tiny/weights"),
    "rename-a-model": lambda p: os.rename(p / "tiny", p / "renamed"),
    "rename-over-a-file": lambda p: os.rename(p / "tiny/weights/model.gguf", p / "tiny/weights/model.gguf"),
    "link-across-folders": lambda p: os.link(p / "tiny/weights/model.gguf", p / "tiny/model.gguf"),
    "symlink-at-the-root": lambda p: os.symlink("/etc/passwd", p / "passwd"),
    "removexattr": lambda p: os.removexattr(p / "tiny/weights/model.gguf", "user.lamina.repo"),
    "forge-verified": lambda p: os.setxattr(p / "tiny/weights/model.gguf", "user.lamina.verified", b"yes"),
    "setxattr-on-a-folder": lambda p: os.setxattr(p / "tiny", "user.note", b"x"),
    "chmod-a-folder": lambda p: os.chmod(p / "tiny", 0o777),
    "chmod-the-root": lambda p: os.chmod(p, 0o777),
    "chown-the-root": lambda p: os.chown(p, 1, 1),
    "lchown": lambda p: os.lchown(p / "tiny/weights/model.gguf", 1, 1),
    "utime-now": lambda p: os.utime(p / "tiny/weights/model.gguf", None),
    "utime-a-folder": lambda p: os.utime(p / "tiny", (0, 0)),
}


@needs_fuse
@pytest.mark.parametrize("attempt", MORE_WRITES.values(), ids=MORE_WRITES.keys())
def test_more_write_paths_fail_with_erofs(mounted, attempt):
    with pytest.raises(OSError) as failure:
        attempt(mounted.mountpoint)
    assert failure.value.errno == errno.EROFS


@needs_fuse
def test_the_mount_says_it_is_read_only(mounted, tiny):
    assert os.statvfs(mounted.mountpoint).f_flag & os.ST_RDONLY
    assert not os.access(model_file(mounted), os.W_OK) and not os.access(mounted.mountpoint, os.W_OK)
    assert "ro" in mount_options(mounted.mountpoint)
    assert model_file(mounted).read_bytes() == tiny          # nothing above changed a byte
    assert os.getxattr(model_file(mounted), "user.lamina.repo") == b"org/tiny"


DAEMON_REFUSALS = {
    "setattr": (1, pyfuse3.EntryAttributes(), pyfuse3.SetattrFields(), None, None),
    "mknod": (1, b"n", stat.S_IFREG | 0o644, 0, None),
    "mkdir": (1, b"d", 0o755, None),
    "unlink": (1, b"f", None),
    "rmdir": (1, b"d", None),
    "symlink": (1, b"s", b"/etc/passwd", None),
    "rename": (1, b"a", 1, b"b", 0, None),
    "link": (2, 1, b"l", None),
    "create": (1, b"c", 0o644, os.O_WRONLY | os.O_CREAT, None),
    "write": (1, 0, b"data"),
    "setxattr": (1, b"user.lamina.verified", b"yes", None),
    "removexattr": (1, b"user.lamina.repo", None),
}


@pytest.mark.parametrize("operation, args", DAEMON_REFUSALS.items(), ids=DAEMON_REFUSALS.keys())
async def test_the_daemon_itself_refuses_every_change(operation, args):
    # The kernel stops these first on an `ro` mount; the daemon must refuse them anyway.
    operations = Operations(Tree(), None, None, None)
    with pytest.raises(pyfuse3.FUSEError) as failure:
        await getattr(operations, operation)(*args)
    assert failure.value.errno == errno.EROFS


@pytest.mark.parametrize("flags", [os.O_WRONLY, os.O_RDWR, os.O_RDONLY | os.O_TRUNC, os.O_WRONLY | os.O_APPEND])
async def test_the_daemon_refuses_to_open_for_writing(flags):
    operations = Operations(Tree(), None, None, None)
    with pytest.raises(pyfuse3.FUSEError) as failure:
        await operations.open(1, flags, None)
    assert failure.value.errno == errno.EROFS


async def test_the_daemon_refuses_write_access_checks():
    operations = Operations(Tree(), None, None, None)
    with pytest.raises(pyfuse3.FUSEError) as failure:
        await operations.access(1, os.W_OK, None)
    assert failure.value.errno == errno.EROFS
    assert await operations.access(1, os.R_OK | os.X_OK, None) is True     # pyfuse3 answers EACCES to a false one


# ------------------------------------------------------------------ another user


@pytest.fixture(scope="session")
def other_user():
    """A real unprivileged account (created for the session if missing, removed after)."""
    if os.geteuid() != 0 or not shutil.which("useradd") or not shutil.which("setpriv"):
        pytest.skip("needs root, useradd and setpriv")
    created = False
    try:
        account = pwd.getpwnam(OTHER_USER)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", OTHER_USER],
                       check=True, capture_output=True)
        account, created = pwd.getpwnam(OTHER_USER), True
    yield account
    if created:
        subprocess.run(["userdel", OTHER_USER], capture_output=True)


@pytest.fixture
def public_dir():
    """A directory every user may traverse (pytest's tmp_path is private to root)."""
    path = Path(tempfile.mkdtemp(prefix="lamina-access-"))
    path.chmod(0o755)
    yield path
    subprocess.run(["fusermount3", "-u", "-z", str(path / "mnt")], capture_output=True)
    shutil.rmtree(path, ignore_errors=True)


def as_user(account, *command):
    """Run `command` as `account` (no groups, C locale): (exit code, stdout bytes, stderr text)."""
    result = subprocess.run(["setpriv", f"--reuid={account.pw_uid}", f"--regid={account.pw_gid}",
                             "--clear-groups", "--", *map(str, command)],
                            capture_output=True, timeout=60, env={"LC_ALL": "C", "PATH": "/usr/bin:/bin"})
    return result.returncode, result.stdout, result.stderr.decode(errors="replace").strip()


def mount_options(mountpoint):
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        if fields[4] == os.path.realpath(mountpoint):
            return set(fields[5].split(",")) | set(line.split(" - ")[1].split()[2].split(","))
    return set()


@needs_fuse
def test_without_allow_other_only_the_mounting_user_sees_the_files(hub, tiny, public_dir, mount_factory,
                                                                   other_user):
    mount = mount_factory(MANIFEST, hub.endpoint, mountpoint=public_dir / "mnt", args=BLOCK)
    assert model_file(mount).read_bytes() == tiny            # the mounting user (root) reads
    for command in (("ls", mount.mountpoint), ("stat", model_file(mount)), ("cat", model_file(mount))):
        status, out, err = as_user(other_user, *command)
        print(f"{OTHER_USER}: {' '.join(map(str, command))}: exit {status}: {err}")
        assert status != 0 and "Permission denied" in err and out == b""
    assert "allow_other" not in mount_options(mount.mountpoint)


@needs_fuse
def test_with_allow_other_other_users_read_but_never_write(hub, tiny, public_dir, mount_factory, other_user):
    mount = mount_factory(MANIFEST, hub.endpoint, mountpoint=public_dir / "mnt", args=BLOCK + ("--allow-other",))
    assert {"allow_other", "default_permissions", "ro"} <= mount_options(mount.mountpoint)
    status, out, err = as_user(other_user, "sha256sum", model_file(mount))
    assert status == 0, err
    assert out.split()[0].decode() == hashlib.sha256(tiny).hexdigest()
    status, out, _ = as_user(other_user, "stat", "-c", "%A %U", mount.mountpoint / "tiny", model_file(mount))
    print(f"{OTHER_USER} sees: {out.decode().split(chr(10))[:2]}")
    assert out.decode().split("\n")[:2] == ["dr-xr-xr-x root", "-r--r--r-- root"]
    writes = [("sh", "-c", f": > '{model_file(mount)}'"), ("touch", mount.mountpoint / "tiny" / "new"),
              ("mkdir", mount.mountpoint / "tiny" / "dir"), ("rm", "-f", model_file(mount)),
              ("chmod", "666", model_file(mount))]
    for command in writes:
        status, _, err = as_user(other_user, *command)
        print(f"{OTHER_USER}: {' '.join(map(str, command))}: exit {status}: {err}")
        assert status != 0 and "Read-only file system" in err
    assert model_file(mount).read_bytes() == tiny
