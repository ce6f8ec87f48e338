"""FUSE passthrough: which opens the kernel serves from the blob file itself, and their backing ids.

With passthrough (Linux >= 6.9, and pyfuse3 built with contrib/pyfuse3-passthrough.patch),
an open is answered with a backing id: the kernel then reads, splices and maps the blob's
data file directly, and the daemon's read handler is never called for that open.

Rules, the kernel's and ours:
- Only a complete, verified blob is a backing file (`BlobHandle.verified_data_fd`): its
  bytes no longer change while a handle on it is open. And only once every block's crc
  was checked in this process: the kernel reading the file itself would not notice a
  block that rotted on disk since the blob was verified. After a daemon start, the first
  opens of a verified file are served by the daemon while a background task checks its
  blocks (O_DIRECT, no page cache); later opens pass through.
- One backing id per inode, registered on its first passthrough open, shared by every
  concurrent passthrough open of it, closed when the last one is released. The kernel
  ties an inode to one backing file while it has passthrough opens; a second id for the
  same file would make the open fail (EIO).
- An inode is in one mode at a time. While it has opens the daemon serves (the kernel's
  "cached io" mode, with keep_cache), a passthrough open of it fails in the kernel with
  EIO, and the other way round. So a file that completes while open through the daemon
  switches to passthrough only for opens made after every daemon-served open of it has
  been released. The daemon counts an open when it answers it and forgets it when the
  kernel's RELEASE arrives; the kernel counts it when it receives that answer and drops
  it before sending RELEASE. So the daemon's count is never below the kernel's, and a
  count of zero here means zero there.
- The handle that owns the backing id keeps the blob open: eviction (`--max-size`, gc
  in another process through the blob's flock) never removes a blob with a live id.
- keep_cache is never sent with a backing id (the kernel refuses the pair with EIO).
- Stacking: a backing file on overlayfs (or another FUSE file system) is one layer deep;
  the mount asks the kernel for that depth at INIT, and for 0 otherwise, so the mount
  itself may still be stacked under overlayfs (a container's lower layer).

Local files (`local:` models) are backing files too, when safe: the open's own read-only
descriptor, whose fstat matched the scan (`localsource.open_local`), and nobody has the file
open for writing at that moment (a read lease can be taken). Once passed through, an open
reads the local file as a local reader would: a change made while it is open shows through,
instead of the daemon's EIO (`--no-local-passthrough` keeps the daemon's per-read check).

Whenever passthrough cannot be used the file is served by the daemon as before, and one
log line says why, once per reason.
"""

import errno
import fcntl
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import pyfuse3

from .blockcache import BlobHandle, BlockCache
from .localsource import LocalHandle
from .passthroughstatus import STATUS_FILE, write_status
from .tasks import spawn_guarded

log = logging.getLogger(__name__)

CAP_SYS_ADMIN = 21
STACKED_FILESYSTEMS = ("overlay", "fuse", "ecryptfs")   # a backing file there is one layer deep


def has_cap_sys_admin() -> bool:
    """CAP_SYS_ADMIN in this process's effective set (the kernel's condition for a backing id)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> CAP_SYS_ADMIN & 1)
    except OSError:
        pass
    return os.geteuid() == 0


def filesystem_type(path: Path) -> str:
    """The type of the file system holding `path` (the deepest mount containing it)."""
    target, best, kind = os.path.realpath(path), "", ""
    with open("/proc/self/mountinfo") as table:
        for line in table:
            fields = line.split()
            point = fields[4].replace("\\040", " ")
            inside = target == point or target.startswith(point.rstrip("/") + "/")
            if inside and len(point) >= len(best):
                best, kind = point, fields[fields.index("-") + 1]
    return kind


def backing_depth(cache_root: Path) -> int:
    """The stacking depth of the backing files (blob files under `cache_root`)."""
    kind = filesystem_type(cache_root)
    return 1 if kind.split(".")[0] in STACKED_FILESYSTEMS else 0


def unavailable_before_mount(wanted: bool, kernel=pyfuse3) -> str | None:
    """Why passthrough cannot be used, as far as can be told before INIT; None if it may."""
    if not wanted:
        return "turned off (--no-passthrough)"
    if not hasattr(kernel, "backing_open"):
        return ("pyfuse3 has no passthrough support (the stock pyfuse3, or libfuse < 3.17; "
                "`make install` builds one that has it)")
    if not has_cap_sys_admin():
        return "the daemon is not root (a backing file needs CAP_SYS_ADMIN)"
    return None


def open_for_writing(fd: int) -> bool:
    """Whether some process has the file of read-only `fd` open for writing now.

    A read lease is refused (EAGAIN) exactly then; it is taken and dropped at once. Where
    leases are not supported the answer is False: the open-time check against the scan
    still holds."""
    try:
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_RDLCK)
    except OSError as exc:
        return exc.errno == errno.EAGAIN
    fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)
    return False


class LocalBacking:
    """The registered descriptor of a local file: closing it closes its backing id first."""

    def __init__(self, handle: LocalHandle, close_id):
        self.handle, self._close_id = handle, close_id

    def close(self) -> None:
        self._close_id()
        self.handle.close()


class _IdCloser:
    """Closes an adopted backing id (a local file's: the predecessor held its descriptor)."""

    def __init__(self, close):
        self.close = close


@dataclass
class InodeIO:
    """One inode's open files by mode, and its backing id while it has passthrough opens."""

    served: int = 0                   # open through the daemon (keep_cache page cache)
    passed: int = 0                   # open through passthrough
    backing_id: int = 0
    owner: "BlobHandle | LocalBacking | _IdCloser | None" = None   # keeps the file, and closes the backing id on close


class Passthrough:
    """The mount's passthrough decisions: per open, per inode, and the reasons it is off."""

    def __init__(self, cache: BlockCache, wanted: bool, kernel=pyfuse3, local: bool = True):
        """`local`: pass local models' files through too (else the daemon checks each read)."""
        self.cache, self.kernel, self.local = cache, kernel, local
        self.off_reason = unavailable_before_mount(wanted, kernel)
        self.depth = backing_depth(cache.directory.root) if self.off_reason is None else 0
        self._inodes: dict[int, InodeIO] = {}
        self._opens: dict[int, tuple[int, bool]] = {}     # fh -> (inode, passthrough)
        self._said: set[str] = set()
        self._checked_init = False
        self._checking: set[str] = set()                  # content ids whose blocks are being checked
        self._nursery = None

    def start(self, nursery) -> None:
        """Checks of verified blobs' blocks run in `nursery` (one per mount)."""
        self._nursery = nursery

    def configure(self, operations: pyfuse3.Operations) -> None:
        """Ask for passthrough at INIT (the patched pyfuse3 reads these attributes)."""
        operations.enable_passthrough = self.off_reason is None
        operations.passthrough_backing_depth = self.depth

    def after_init(self) -> None:
        """Once the kernel answered INIT: note whether it granted passthrough; log the outcome."""
        if self._checked_init:
            return
        self._checked_init = True
        if self.off_reason is None and not self.kernel.passthrough_enabled():
            release = os.uname().release
            self.off_reason = (f"the kernel ({release}) offers no FUSE passthrough "
                               "(needs Linux >= 6.9 with CONFIG_FUSE_PASSTHROUGH)")
        if self.off_reason is not None:
            self._say("off", f"passthrough off: {self.off_reason}; files are served by the daemon")
        else:
            log.info("passthrough on: complete, verified files are served by the kernel from "
                     "the cache's files (backing stack depth %d)", self.depth)

    def open(self, fh: int, inode: int, content_id: str, size: int, describe: str) -> int:
        """Decide how open `fh` of `inode` is served: a backing id, or 0 (the daemon serves it)."""
        if not self._checked_init:
            self.after_init()
        io = self._inodes.setdefault(inode, InodeIO())
        backing_id = self._backing_for(io, content_id, size, describe)
        if backing_id:
            io.passed += 1
        else:
            io.served += 1
        self._opens[fh] = (inode, bool(backing_id))
        return backing_id

    def open_local(self, fh: int, inode: int, handle: LocalHandle) -> int:
        """Decide how open `fh` of a local file is served: a backing id, or 0 (the daemon
        serves it through `handle`). `handle` was checked against the scan just now; with a
        backing id it is kept (the first open of the inode) or closed (a later one)."""
        if not self._checked_init:
            self.after_init()
        io = self._inodes.setdefault(inode, InodeIO())
        if io.backing_id:       # every open of a passthrough inode is one; the first's fd is registered
            backing_id = io.backing_id
            handle.close()
        else:
            backing_id = self._local_backing_for(io, handle)
        if backing_id:
            io.passed += 1
        else:
            io.served += 1
        self._opens[fh] = (inode, bool(backing_id))
        return backing_id

    def _local_backing_for(self, io: InodeIO, handle: LocalHandle) -> int:
        if self.off_reason is not None or not self.local or io.served:
            return 0
        if open_for_writing(handle.fd):
            self._say("local-writer", f"{handle.describe}: served by the daemon while it is open for "
                      "writing elsewhere (each read checked against the scan; the first such file)")
            return 0
        try:
            backing_id = self.kernel.backing_open(handle.fd)
        except OSError as exc:
            if exc.errno == errno.ELOOP:        # this file's file system only, not the cache's
                self._say("local-eloop", f"{handle.describe}: served by the daemon: its file system is "
                          f"stacked deeper than the mount asked at start (depth {self.depth}; the first "
                          "such file)", level=logging.WARNING)
            else:
                self._refused(exc, handle.describe)
            return 0
        io.owner = LocalBacking(handle, lambda: self._close_quietly(backing_id))
        io.backing_id = backing_id
        return backing_id

    def passing(self, inode: int) -> bool:
        """True while `inode` has a backing id: every new open of it must pass through."""
        io = self._inodes.get(inode)
        return io is not None and io.backing_id != 0

    def release(self, fh: int) -> None:
        opened = self._opens.pop(fh, None)
        io = None if opened is None else self._inodes.get(opened[0])
        if opened is None or io is None:
            return
        inode, passed = opened
        if passed:
            io.passed -= 1
            if io.passed == 0 and io.owner is not None:
                owner, io.owner, io.backing_id = io.owner, None, 0
                owner.close()                       # closes the backing id first
        else:
            io.served -= 1
        if io.served == 0 and io.passed == 0:
            del self._inodes[inode]

    def export(self) -> dict:
        """The open files and backing ids, for a successor on the same connection (handover.py)."""
        return {"opens": {str(fh): [inode, passed] for fh, (inode, passed) in self._opens.items()},
                "inodes": {str(inode): [io.served, io.passed, io.backing_id] for inode, io in self._inodes.items()}}

    def adopt(self, exported: dict, content_of) -> None:
        """Take over a predecessor's `export()`: its backing ids belong to the connection, and
        the kernel holds their inodes in passthrough mode (a new id for one would fail with
        EIO), so they are reused and closed here on the last release. `content_of(inode)`:
        the inode's (content_id, size), or None for a local file."""
        for inode_text, (served, passed, backing_id) in exported.get("inodes", {}).items():
            io = self._inodes[int(inode_text)] = InodeIO(served, passed, backing_id)
            if backing_id:
                io.owner = self._adopted_owner(backing_id, content_of(int(inode_text)))
        self._opens.update((int(fh), (inode, bool(passed))) for fh, (inode, passed) in exported.get("opens", {}).items())

    def _adopted_owner(self, backing_id: int, content) -> "BlobHandle | _IdCloser":
        close = _IdCloser(lambda: self._close_quietly(backing_id))
        if content is None:
            return close        # a local file: the kernel holds it; nothing to keep open here
        owner = self.cache.open(*content)      # eviction keeps the blob while the id lives
        owner.on_close(close.close)
        return owner

    def _backing_for(self, io: InodeIO, content_id: str, size: int, describe: str) -> int:
        if io.backing_id:
            return io.backing_id                    # every open of a passthrough inode is one
        if self.off_reason is not None or io.served:
            return 0                                # off, or the inode is in the daemon's mode
        owner = self.cache.open(content_id, size)
        fd = owner.verified_data_fd()
        if fd is None:
            if owner.needs_check():
                self._check_in_background(owner, describe)
            else:
                owner.close()
                self._say("partial", f"{describe}: served by the daemon until its blob is complete and "
                          "verified (the first such file; others are not logged)")
            return 0
        try:
            backing_id = self.kernel.backing_open(fd)
        except OSError as exc:
            owner.close()
            self._refused(exc, describe)
            return 0
        owner.on_close(lambda: self._close_quietly(backing_id))
        io.owner, io.backing_id = owner, backing_id
        return backing_id

    def _check_in_background(self, owner: BlobHandle, describe: str) -> None:
        """Check the blob's block crcs once in this process; opens after that may pass through.

        Until then the daemon serves it (and checks each block it reads): bytes that rotted
        on disk since the blob was verified must never reach a reader."""
        if owner.content_id in self._checking or self._nursery is None:
            owner.close()
            return
        self._checking.add(owner.content_id)
        self._say("check", f"{describe}: served by the daemon while its blocks' crcs are checked once "
                  "in this process, then by passthrough (the first such file; others are not logged)")
        spawn_guarded(self._nursery, f"{describe}: checking its blocks", self._check, owner,
                      expected=(Exception,))

    async def _check(self, owner: BlobHandle) -> None:
        try:
            with owner:
                await owner.check_blocks()
        finally:
            self._checking.discard(owner.content_id)

    def _refused(self, exc: OSError, describe: str) -> None:
        """The kernel refused a backing file: EPERM and ELOOP hold for every file of the cache."""
        why = {errno.EPERM: "not permitted (no CAP_SYS_ADMIN, or passthrough not negotiated)",
               errno.ELOOP: f"the cache's file system is stacked too deep (depth {self.depth} asked)"}
        if exc.errno in why:
            self.off_reason = f"the kernel refused a backing file: {why[exc.errno]}"
            self._say(f"errno{exc.errno}", f"passthrough off: {self.off_reason} ({describe}); "
                      "files are served by the daemon", level=logging.WARNING)
        else:
            self._say(f"errno{exc.errno}", f"{describe}: passthrough refused ({exc.strerror}); "
                      "served by the daemon", level=logging.WARNING)

    def _close_quietly(self, backing_id: int) -> None:
        try:
            self.kernel.backing_close(backing_id)
        except OSError as exc:          # the connection is going away: ids die with it
            log.debug("closing backing id %d: %s", backing_id, exc.strerror)

    def _say(self, key: str, message: str, level: int = logging.INFO) -> None:
        if key not in self._said:
            self._said.add(key)
            log.log(level, "%s", message)

    def describe_local(self, inode: int) -> str:
        """What the xattr `user.lamina.passthrough` says of a local file."""
        io = self._inodes.get(inode)
        if io is not None and io.backing_id:
            return "yes"
        if self.off_reason is not None:
            return f"no: {self.off_reason}"
        if not self.local:
            return "no: local files are served by the daemon (--no-local-passthrough)"
        if io is not None and io.served:
            return "no: open through the daemon; opens after those close use passthrough"
        return "yes (on open)"

    def describe(self, inode: int, content_id: str, size: int) -> str:
        """What the xattr `user.lamina.passthrough` says of a file."""
        io = self._inodes.get(inode)
        if io is not None and io.backing_id:
            return "yes"
        if self.off_reason is not None:
            return f"no: {self.off_reason}"
        if io is not None and io.served:
            return "no: open through the daemon; opens after those close use passthrough"
        if not self.cache.peek(content_id, size).verified:
            return "no: not complete and verified yet"
        with self.cache.open(content_id, size) as blob:
            checked = blob.verified_data_fd() is not None
        return "yes (on open)" if checked else "no: its blocks' crcs are checked once per daemon first"

    def write_status(self) -> None:
        """Tell `info` (another process) whether this mount serves files by passthrough."""
        write_status(self.cache.directory.root, self.off_reason, self.local)

    def clear_status(self) -> None:
        try:
            (self.cache.directory.root / STATUS_FILE).unlink()
        except FileNotFoundError:
            pass
