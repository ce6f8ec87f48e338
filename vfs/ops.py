"""The pyfuse3 Operations: thin handlers over the tree and the reader, one errno decorator.

Every handler goes through `handler`, so no exception but FUSEError ever reaches pyfuse3
(one would end its main loop and leave every reader on the host with a dead mount).
Files are immutable, so attributes and entries are cached by the kernel for a long time
and files open with keep_cache: warm reads never reach Python.
"""

import errno
import functools
import logging
import os
import time
from collections.abc import Awaitable, Callable, Iterable
from time import perf_counter
from typing import TYPE_CHECKING, Any, TypeVar, cast

import pyfuse3
import trio

from . import errors, localsource
from .handover import HandleNumbers, inode_of
from .logs import where
from .metrics import STATS
from .localsource import LocalFile, LocalHandle
from .reader import OpenFile, Reader
from .tree import FileRef, Node, Tree

if TYPE_CHECKING:
    from .blockcache import BlockCache
    from .passthrough import Passthrough

log = logging.getLogger(__name__)

ATTR_TIMEOUT = 3600.0         # content is fixed by commits: attributes cannot change under a mount
NEGATIVE_TIMEOUT = 60.0       # loaders probe for missing files; let the kernel remember
XATTR_PREFIX = "user.lamina."
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND | os.O_CREAT

Handler = TypeVar("Handler", bound=Callable[..., Awaitable[Any]])
FileOpener = Callable[[Node], "OpenFile | LocalHandle"]     # assembly.Filesystem.open_file


def handler(function: Handler) -> Handler:
    """Turn every exception into a FUSEError with the one errno table, logging failures.

    The only place a FUSEError is made: every errno a reader sees comes from errors.py.
    Each call is counted by operation, each error by operation and errno (metrics.py)."""
    name, counts = function.__name__, STATS.fuse_ops

    @functools.wraps(function)
    async def wrapper(self: "Operations", *args: Any) -> Any:
        counts[name] += 1
        try:
            return await function(self, *args)
        except errors.LaminaError as exc:
            if not isinstance(exc, errors.Refusal) and errors.REPORTED.first(exc):
                log.error("%s: %s", name, exc)
            raise _fuse_error(name, errors.errno_for(exc)) from None
        except Exception:  # noqa: BLE001 - a bug must cost one read, not the mount
            log.exception("%s%r failed", name, args[:3])
            raise _fuse_error(name, errno.EIO) from None

    return cast(Handler, wrapper)


def _fuse_error(op: str, number: int) -> pyfuse3.FUSEError:
    STATS.fuse_errors[op, errno.errorcode.get(number, str(number))] += 1
    return pyfuse3.FUSEError(number)


def log_read_failure_once(describe: str, offset: int, exc: BaseException) -> None:
    """One log line per failure, however many readers and kernel requests it reaches
    (errors.REPORTED: a failed fetch hands the same error object to every reader waiting
    on it, and the fetcher repeats it for the kernel's immediate re-ask of the same page)."""
    if errors.REPORTED.first(exc):
        log.error("read: %s: read at offset %d: %s", describe, offset, exc, extra=where(describe, offset))


def read_only(function: Handler) -> Handler:
    @functools.wraps(function)
    async def refuse(self: "Operations", *args: Any) -> Any:
        raise errors.ReadOnly(f"{function.__name__}: the filesystem is read-only")

    return handler(cast(Handler, refuse))


class Operations(pyfuse3.Operations):
    supports_dot_lookup = False

    def __init__(self, tree: Tree, reader: Reader, cache: "BlockCache", open_file: FileOpener,
                 passthrough: "Passthrough | None" = None):
        """`open_file(node) -> OpenFile` builds a handle's read state (assembly.py);
        `passthrough` (a passthrough.Passthrough) decides which opens the kernel serves itself."""
        super().__init__()
        self.tree, self.reader, self.cache = tree, reader, cache
        self._open_file = open_file
        self.passthrough = passthrough
        if passthrough is not None:
            passthrough.configure(self)
        self._handles: dict[int, OpenFile | LocalHandle] = {}
        self.handles = HandleNumbers()      # each encodes its inode: a successor can serve it (handover.py)
        self.opens_changed: Callable[[], None] = lambda: None   # before an open or release is answered
        self._changing_opens = 0        # opens and releases being handled (a hand-over waits for them)
        self.mtime_ns = time.time_ns()      # every entry's times; a successor keeps its predecessor's
        self._uid, self._gid = os.getuid(), os.getgid()
        self._retired: dict[int, Node] = {}     # nodes of earlier trees: open files may still stat them

    def replace_tree(self, tree: Tree) -> None:
        """Serve `tree` from now on (after a refresh); inodes the kernel still holds keep answering."""
        self._retired.update((inode, node) for inode, node in self.tree.nodes.items()
                             if inode not in tree.nodes)
        self.tree = tree

    def forget_pages(self, inodes: Iterable[int]) -> None:
        """Make the kernel drop the pages it cached of `inodes` (blocking: run in a worker)."""
        for inode in inodes:
            try:
                pyfuse3.invalidate_inode(inode)
            except OSError as exc:
                log.warning("could not drop the kernel's cached pages of inode %d: %s", inode, exc.strerror)

    def forget_entries(self, entries: Iterable[tuple[int, str]]) -> None:
        """Make the kernel forget the (parent inode, name) entries a refresh changed (blocking)."""
        for parent, name in entries:
            try:
                pyfuse3.invalidate_entry(parent, os.fsencode(name))
            except FileNotFoundError:
                pass        # the kernel never looked it up

    def _node(self, inode: int) -> Node:
        node = self.tree.node(inode) or self._retired.get(inode)
        if node is None:
            raise errors.NotFound(f"inode {inode}")
        return node

    def _attributes(self, node: Node) -> pyfuse3.EntryAttributes:
        attrs = pyfuse3.EntryAttributes()
        attrs.st_ino, attrs.st_mode = node.inode, node.mode
        attrs.st_nlink = 2 if node.is_dir else 1
        attrs.st_size = node.size
        attrs.st_blksize = 1024 * 1024
        attrs.st_blocks = -(-node.size // 512)
        attrs.st_uid, attrs.st_gid = self._uid, self._gid
        attrs.st_atime_ns = attrs.st_mtime_ns = attrs.st_ctime_ns = self.mtime_ns
        attrs.attr_timeout = attrs.entry_timeout = ATTR_TIMEOUT
        return attrs

    @handler
    async def lookup(self, parent_inode: int, name: bytes,
                     ctx: pyfuse3.RequestContext | None = None) -> pyfuse3.EntryAttributes:
        node = self.tree.lookup(parent_inode, os.fsdecode(name))
        if node is None:
            missing = pyfuse3.EntryAttributes()
            missing.st_ino, missing.entry_timeout = 0, NEGATIVE_TIMEOUT
            return missing
        return self._attributes(node)

    @handler
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext | None = None) -> pyfuse3.EntryAttributes:
        return self._attributes(self._node(inode))

    @handler
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        if not self._node(inode).is_dir:
            raise errors.NotADirectory(f"inode {inode}")
        return inode

    @handler
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        entries = self.tree.listing(fh)
        for position in range(start_id, len(entries)):
            node = entries[position]
            if not pyfuse3.readdir_reply(token, os.fsencode(node.name), self._attributes(node), position + 1):
                break

    @handler
    async def releasedir(self, fh: int) -> None:
        return None

    @handler
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        if flags & WRITE_FLAGS:
            raise errors.ReadOnly("open for writing: the filesystem is read-only")
        node = self._node(inode)
        if node.is_dir:
            raise errors.IsADirectory(f"inode {inode}")
        handle = self.handles.new(inode)
        self._changing_opens += 1
        try:
            return self._open(handle, inode, node, flags)
        finally:
            self._changing_opens -= 1
            self.opens_changed()

    def _open(self, handle: int, inode: int, node: Node, flags: int) -> pyfuse3.FileInfo:
        if isinstance(node.file, LocalFile):
            return self._open_local(handle, inode, node)
        if self.passthrough is None:
            self._handles[handle] = self._open_file(node)
            return pyfuse3.FileInfo(fh=handle, keep_cache=True)
        if flags & os.O_DIRECT and not self.passthrough.passing(inode):
            # Passed through, O_DIRECT would meet the blob file's alignment rules. Served with
            # direct_io (no page cache, as asked) it stays out of the inode's io mode, so it
            # does not hold later opens off passthrough. (Once the inode has a backing id, the
            # kernel refuses any open that is not passthrough: then O_DIRECT passes through.)
            self._handles[handle] = self._open_file(node)
            return pyfuse3.FileInfo(fh=handle, keep_cache=False, direct_io=True)
        ref = node.file
        assert ref is not None          # a file node always has its FileRef or LocalFile
        backing_id = self.passthrough.open(handle, inode, ref.content_id, ref.size, ref.describe)
        if backing_id:      # the kernel reads the blob file itself: no read reaches us
            return pyfuse3.FileInfo(fh=handle, keep_cache=False, backing_id=backing_id)
        try:
            self._handles[handle] = self._open_file(node)
        except BaseException:
            self.passthrough.release(handle)
            raise
        return pyfuse3.FileInfo(fh=handle, keep_cache=True)

    def _open_local(self, handle: int, inode: int, node: Node) -> pyfuse3.FileInfo:
        """A local model's file: checked against the scan now (EIO if it changed), then passed
        through when safe (passthrough.py), else served by the daemon, which checks it around
        every read (a file changed under an open is EIO, never new bytes)."""
        local = self._open_file(node)
        assert isinstance(local, LocalHandle)       # what open_file makes of a LocalFile
        backing_id = 0 if self.passthrough is None else self.passthrough.open_local(handle, inode, local)
        if backing_id:
            return pyfuse3.FileInfo(fh=handle, keep_cache=False, backing_id=backing_id)
        self._handles[handle] = local
        return pyfuse3.FileInfo(fh=handle, keep_cache=True)

    @handler
    # pyfuse3 copies any buffer out at once: a memoryview saves a copy (its stub says bytes).
    async def read(self, fh: int, off: int, size: int) -> bytes | bytearray | memoryview:  # type: ignore[override]
        started = perf_counter()
        handle = self._handles.get(fh) or self._reopen(fh)
        try:
            if isinstance(handle, LocalHandle):
                return await localsource.read(handle, off, size)
            return await self.reader.read(handle, off, size)
        except errors.LaminaError as exc:
            log_read_failure_once(handle.describe, off, exc)    # the line names the file and offset
            raise
        finally:
            STATS.read_seconds.observe(perf_counter() - started)

    def _reopen(self, fh: int) -> OpenFile | LocalHandle:
        """A handle a predecessor issued (a hand-over): opened again from the inode it encodes."""
        handle = self._handles[fh] = self._open_file(self._node(inode_of(fh)))
        return handle

    @handler
    async def release(self, fh: int) -> None:
        handle = self._handles.pop(fh, None)
        if handle is not None:
            handle.close()
        if self.passthrough is not None:
            self.passthrough.release(fh)
            self.opens_changed()

    async def settled(self) -> None:
        """Once no open or release is being handled (a hand-over must see their outcome)."""
        while self._changing_opens:
            await trio.sleep(0.001)

    def export_opens(self) -> dict:
        """The open files a successor on this connection must know of (handover.py)."""
        return {} if self.passthrough is None else self.passthrough.export()

    def adopt_opens(self, exported: dict, generation: int) -> None:
        """Take over a predecessor's open files; number new handles in `generation`."""
        self.handles = HandleNumbers(generation)
        if self.passthrough is not None:
            self.passthrough.adopt(exported, self._content_of)

    def export_retired(self) -> list:
        """Entries of earlier trees (a /refresh removed or replaced them) whose files may
        still be open: a successor keeps serving them. Hub files only."""
        return [[node.inode, node.name, node.parent, node.model, list(node.file)]
                for node in self._retired.values() if isinstance(node.file, FileRef)]

    def adopt_retired(self, exported: list) -> None:
        for inode, name, parent, model, ref in exported:
            file = FileRef(*ref)
            self._retired[inode] = Node(inode, name, parent, False, file.size, None, file, model)

    def _content_of(self, inode: int) -> tuple[str, int] | None:
        node = self.tree.node(inode)
        ref = None if node is None else node.file
        return None if ref is None or isinstance(ref, LocalFile) else (ref.content_id, ref.size)

    @handler
    async def access(self, inode: int, mode: int, ctx: pyfuse3.RequestContext | None) -> bool:
        self._node(inode)
        if mode & os.W_OK:
            raise errors.ReadOnly("access for writing: the filesystem is read-only")
        return True     # pyfuse3 answers EACCES to anything false

    @handler
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        stats = pyfuse3.StatvfsData()
        total = sum(node.size for node in self.tree.files())
        stats.f_bsize = stats.f_frsize = 4096
        stats.f_blocks = -(-total // 4096)
        stats.f_bfree = stats.f_bavail = 0
        stats.f_files = len(self.tree.nodes)
        stats.f_namemax = 255
        return stats

    @handler
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        node = self._node(inode)
        return [os.fsencode(XATTR_PREFIX + key) for key in self._xattrs(node)]

    @handler
    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        values = self._xattrs(self._node(inode))
        key = os.fsdecode(name)
        if not key.startswith(XATTR_PREFIX) or key[len(XATTR_PREFIX):] not in values:
            raise errors.NoSuchAttribute(f"inode {inode}: no attribute {key!r}")
        return values[key[len(XATTR_PREFIX):]].encode()

    def _xattrs(self, node: Node) -> dict[str, str]:
        ref = node.file
        if ref is None:
            return {"model": node.model} if node.model else {}
        if isinstance(ref, LocalFile):
            passthrough = ("no: turned off" if self.passthrough is None
                           else self.passthrough.describe_local(node.inode))
            return {"model": ref.model, "source": "local", "path": ref.path, "local": ref.source,
                    "size": str(ref.size), "passthrough": passthrough}
        state = self.cache.peek(ref.content_id, ref.size)
        passthrough = ("no: turned off" if self.passthrough is None
                       else self.passthrough.describe(node.inode, ref.content_id, ref.size))
        return {"model": ref.model, "repo": ref.repo, "revision": ref.revision, "commit": ref.commit,
                "path": ref.repo_path, "content_id": ref.content_id, "size": str(ref.size),
                "cached_bytes": str(state.cached_bytes), "verified": "yes" if state.verified else "no",
                "passthrough": passthrough}

    # Everything that would change the filesystem: EROFS, always.
    setattr = read_only(pyfuse3.Operations.setattr)
    mknod = read_only(pyfuse3.Operations.mknod)
    mkdir = read_only(pyfuse3.Operations.mkdir)
    unlink = read_only(pyfuse3.Operations.unlink)
    rmdir = read_only(pyfuse3.Operations.rmdir)
    symlink = read_only(pyfuse3.Operations.symlink)
    rename = read_only(pyfuse3.Operations.rename)
    link = read_only(pyfuse3.Operations.link)
    create = read_only(pyfuse3.Operations.create)
    write = read_only(pyfuse3.Operations.write)
    setxattr = read_only(pyfuse3.Operations.setxattr)
    removexattr = read_only(pyfuse3.Operations.removexattr)
