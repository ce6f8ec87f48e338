"""Hand-over: a successor daemon serves the live FUSE connection of its predecessor.

A mount's connection (its /dev/fuse file) can outlive the daemon that mounted it: the
keeper holds a duplicate, and a graceful stop hands it to a successor over the control
socket (control.py). What a successor needs besides the descriptor is in the hand-over
state, a directory beside the pid file that the serving daemon keeps current:

- `session.json`: the connection's INIT request verbatim (the kernel sends it once per
  connection; the successor replays it to its libfuse session with `pyfuse3.adopt`), the
  inode table (path, inode, content of every entry, so the successor's tree gives each
  the same number, after a /refresh too), the generation of handle numbers, and the
  times every entry shows (a new mtime would make the kernel drop the files' cached pages).
  Written when the daemon serves and after each /refresh.
- `opens.json` and `opens.log`: the open files the kernel knows of, by passthrough mode
  and backing id (passthrough backing ids belong to the connection: a successor reuses
  them, since the kernel refuses a second backing file, or a daemon-served open, for an
  inode that has passthrough opens). Recorded before each open or release is answered, so
  that it is current even when the daemon is SIGKILLed: a snapshot and a journal of
  changes (opensrecord.py).
- `checked.json`, for a takeover only: the blocks whose crc the old daemon checked
  (BlockCache.export_checked), so the successor does not check them again.

File handles encode their inode (`handle_number`): the successor serves a read of a
handle it never issued by opening that inode again (`Operations` does it on first use),
and numbers its own handles in a new generation, so they never meet an old one.

`Session` is the daemon's side: a fresh mount, an adopted descriptor (`--adopt-fd`, from
the keeper after its child died), or a takeover (`--takeover`, from the live daemon);
and at the end, a close that unmounts only a mount this daemon still owns.
"""

import base64
import errno
import json
import logging
import os
import shutil
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyfuse3
import trio

from . import control, errors
from .opensrecord import OpensRecord, read_record

log = logging.getLogger(__name__)

INODE_BITS = 32                 # fh = serial << 32 | inode
SERIALS_PER_GENERATION = 1 << 20
SESSION_FILE = control.SESSION_FILE
CHECKED_FILE = "checked.json"   # a takeover's: the blocks whose crc the old daemon checked


def state_dir(mountpoint) -> Path:
    """The hand-over state of the mount at `mountpoint` (beside its pid file, on tmpfs as root)."""
    return control.beside_pid_file(mountpoint, control.HANDOVER_SUFFIX)


def can_adopt() -> bool:
    """Whether this pyfuse3 can serve an adopted connection (the project's patched build)."""
    return hasattr(pyfuse3, "adopt")


# ---------------------------------------------------------------------------
# Handle numbers


def handle_number(serial: int, inode: int) -> int:
    return (serial % (1 << (64 - INODE_BITS))) << INODE_BITS | inode


def inode_of(fh: int) -> int:
    return fh & ((1 << INODE_BITS) - 1)


class HandleNumbers:
    """File handle numbers: each encodes its inode; each generation of daemon has its own range."""

    def __init__(self, generation: int = 0):
        self.generation = generation
        self._next = generation * SERIALS_PER_GENERATION

    def new(self, inode: int) -> int:
        self._next += 1
        return handle_number(self._next, inode)


# ---------------------------------------------------------------------------
# The inode table


class _Identity:
    """A stored content identity, equal to the live one it was written from."""

    def __init__(self, stored):
        self.stored = stored

    def __eq__(self, other) -> bool:
        return self.stored == _plain(other)

    __hash__ = None     # type: ignore[assignment]


@dataclass
class _Entry:
    """An entry of the predecessor's tree: its number, and what it was (tree._inode_for)."""

    inode: int
    is_dir: bool
    identity: Any               # the file's identity, JSON-shaped; None for a directory


class InodeTable:
    """The predecessor's inodes by path, standing in for its tree as `Tree.build(previous=)`."""

    def __init__(self, entries: dict[str, _Entry], next_inode: int):
        self.entries = entries
        self.nodes = {entry.inode: entry for entry in entries.values()}
        self.nodes.setdefault(next_inode - 1, _Entry(next_inode - 1, True, None))   # never reused

    def node_at(self, path: str) -> "_StoredNode | None":
        entry = self.entries.get("/" + path.strip("/") if path.strip("/") else "")
        return None if entry is None else _StoredNode(entry)

    @classmethod
    def of(cls, tree) -> dict:
        """`tree`'s table as session.json stores it."""
        rows = []
        for inode, path in tree.paths.items():
            node = tree.nodes[inode]
            rows.append([path, inode, node.is_dir, None if node.file is None else _plain(node.file.identity)])
        return {"inodes": rows, "next_inode": tree._next_inode}

    @classmethod
    def load(cls, stored: dict) -> "InodeTable":
        entries = {path: _Entry(inode, is_dir, identity) for path, inode, is_dir, identity in stored["inodes"]}
        return cls(entries, stored["next_inode"])


class _StoredNode:
    def __init__(self, entry: _Entry):
        self.inode, self.is_dir = entry.inode, entry.is_dir
        self.file = None if entry.identity is None else _StoredFile(entry.identity)


class _StoredFile:
    def __init__(self, identity):
        self.identity = _Identity(identity)


def _plain(value):
    """A JSON-shaped copy of an identity (tuples, named tuples and dataclasses as lists)."""
    if isinstance(value, _Identity):
        return value.stored
    if hasattr(value, "__dataclass_fields__"):
        return [_plain(getattr(value, name)) for name in value.__dataclass_fields__]
    if isinstance(value, (tuple, list)):
        return [_plain(item) for item in value]
    return value


# ---------------------------------------------------------------------------
# The state files


@dataclass
class HandedOver:
    """What a successor reads from the hand-over state."""

    init_request: bytes
    generation: int
    inodes: InodeTable
    opens: dict = field(default_factory=dict)       # Passthrough.export()
    retired: list = field(default_factory=list)     # Operations.export_retired()
    session_text: str = ""                           # session.json as read (a refresh rewrites it)
    mtime_ns: int | None = None                      # the times every entry shows (Operations.mtime_ns)


def load_state(directory: Path) -> HandedOver:
    try:
        text = (directory / SESSION_FILE).read_text()
        session = json.loads(text)
    except (OSError, ValueError) as exc:
        raise errors.LaminaError(f"no usable hand-over state in {directory}: {exc}") from None
    opens = read_record(directory)
    return HandedOver(base64.b64decode(session["init"]), session["generation"],
                      InodeTable.load(session), opens, retired=session.get("retired", []), session_text=text,
                      mtime_ns=session.get("mtime_ns"))


def take_checked(directory: Path) -> dict:
    """The old daemon's checked blocks (BlockCache.export_checked), read once: they are
    written for the one takeover under way, and no other successor may take them."""
    path = directory / CHECKED_FILE
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    finally:
        path.unlink(missing_ok=True)


def _write(path: Path, document: dict) -> None:
    fresh = path.with_name(f".{path.name}.{os.getpid()}")
    fresh.write_text(json.dumps(document))
    os.replace(fresh, path)         # tmpfs, read only by a successor on this boot: no fsync


class StateWriter:
    """Keeps the hand-over state of one serving daemon current."""

    def __init__(self, directory: Path, generation: int, cache: Path | None = None):
        self.directory, self.generation, self.cache = directory, generation, cache
        self.opens = OpensRecord(directory)

    def write_session(self, tree, retired: list | None = None, mtime_ns: int | None = None) -> None:
        """`retired`: `Operations.export_retired()`, entries of earlier trees still open;
        `mtime_ns`: the times every entry shows (a successor shows the same: the kernel drops a
        file's cached pages when its mtime changes)."""
        init = pyfuse3.init_request() if can_adopt() else None
        if init is None:
            return                  # a stock pyfuse3: nothing can adopt this connection
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        _write(self.directory / SESSION_FILE, {"init": base64.b64encode(init).decode(),
                                               "generation": self.generation, **InodeTable.of(tree),
                                               "retired": retired or [], "mtime_ns": mtime_ns,
                                               "cache": str(self.cache) if self.cache else None})

    def write_opens(self, opens: dict) -> None:
        try:
            self.opens.write(opens)
        except FileNotFoundError:
            pass                    # no session written (a stock pyfuse3): nothing adopts anyway

    def write_checked(self, checked: dict) -> None:
        _write(self.directory / CHECKED_FILE, checked)


# ---------------------------------------------------------------------------
# The daemon's connection


class Session:
    """How this daemon gets its connection, and how it lets go of it.

    `adopt_fd` + `state`: the keeper's descriptor after the previous daemon died.
    `takeover`: a control.Takeover that asks the live daemon for its descriptor."""

    def __init__(self, mountpoint, adopt_fd: int | None = None, state: Path | None = None, takeover=None):
        self.mountpoint = Path(mountpoint)
        self.state_dir = state_dir(mountpoint)      # now: once mounted, a stat of it waits on us
        self.adopt_fd, self.state_path, self.takeover = adopt_fd, state, takeover
        self.handed: HandedOver | None = None
        self.lock_fd: int | None = None         # the cache's mount.lock, handed over with the connection
        self.handed_over = False                 # this daemon gave its connection to a successor
        self.writer: StateWriter | None = None
        self.cache: Path | None = None           # the cache directory served (said in the state)

    @property
    def adopts(self) -> bool:
        return self.adopt_fd is not None or self.takeover is not None

    def claim_cache(self, directory) -> int | None:
        """The cache's mount.lock: claimed now, or (takeover) handed over with the connection."""
        self.cache = directory.root.resolve()
        if self.takeover is not None:
            return None
        return directory.claim_for_mount()

    def open(self, operations, options) -> None:
        """Mount, or adopt the connection (the state read, the INIT replayed)."""
        from .mount import prepare_mountpoint
        if not self.adopts:
            prepare_mountpoint(self.mountpoint)
            try:
                pyfuse3.init(operations, str(self.mountpoint), options)
            except RuntimeError as exc:
                # libfuse says only "fuse_session_mount failed"; its own reason went to stderr.
                raise errors.LaminaError(
                    f"could not mount {self.mountpoint}: {exc} (is /dev/fuse there, and may this process "
                    "mount? A sandbox without /dev/fuse or CAP_SYS_ADMIN cannot)") from None
            self._keep_state(operations, 0)
            return
        if not can_adopt():
            raise errors.LaminaError("this pyfuse3 cannot adopt a live connection (the stock build); "
                                     "`make install` builds one that can")
        assert self.handed is not None, "prepare() reads the state first"
        if self.takeover is not None:
            # Only now does the old daemon stop: everything else was built while it served.
            asked = control.monotonic()
            self.adopt_fd, self.lock_fd, _ = self.takeover.receive()
            log.info("hand-over: connection received %.0f ms after asking", (control.monotonic() - asked) * 1000)
            now = load_state(self.state_dir)          # its open files: exact, written as it stopped
            if now.session_text != self.handed.session_text:
                # A /refresh since this tree was built: its new entries may have numbers this
                # tree gives to others. Exit (the old daemon resends and serves on); ask again.
                raise errors.LaminaError("the mount was refreshed during the takeover; the old daemon "
                                         "serves on (upgrade again)")
            self.handed.opens = now.opens
            operations.cache.adopt_checked(take_checked(self.state_dir))
        assert self.adopt_fd is not None
        if self.handed.mtime_ns is not None:
            operations.mtime_ns = self.handed.mtime_ns
        pyfuse3.adopt(operations, self.adopt_fd, self.handed.init_request, options)
        operations.adopt_opens(self.handed.opens, self.handed.generation + 1)
        operations.adopt_retired(self.handed.retired)
        self._keep_state(operations, self.handed.generation + 1)
        log.info("hand-over: connection adopted")

    def _keep_state(self, operations, generation: int) -> None:
        writer = self.writer = StateWriter(self.state_dir, generation, self.cache)
        operations.opens_changed = lambda: writer.write_opens(operations.export_opens())

    def prepare(self) -> HandedOver | None:
        """Before the tree is built: the predecessor's state (its inodes, so that the tree
        keeps their numbers). A takeover reads it where the live daemon keeps it."""
        if self.takeover is not None:
            self.state_path = self.state_dir
        elif self.adopt_fd is None:
            return None
        if self.state_path is None:
            raise errors.LaminaError("--adopt-fd needs --handover-state (the INIT of that connection)")
        self.handed = load_state(Path(self.state_path))
        return self.handed

    def serving(self, fs) -> None:
        """Once the loop runs, in a worker thread: the session state written (the open files
        are written by the trio thread), the predecessor told (takeover)."""
        ops = fs.ops

        def tree_changed(tree) -> None:
            """After a /refresh: a successor must give the new entries the same numbers."""
            if self.writer is not None:
                self.writer.write_session(tree, ops.export_retired(), ops.mtime_ns)
        tree_changed(fs.tree)
        fs.on_new_tree = tree_changed
        if self.takeover is not None:
            self.takeover.serving()

    def close(self) -> None:
        """End the session: unmount only a mount this daemon still owns (not handed over)."""
        if self.handed_over:
            pyfuse3.close(unmount=False)
            return
        pyfuse3.close(unmount=not self.adopts)
        shutil.rmtree(self.state_dir, ignore_errors=True)      # nothing will adopt an unmounted connection
        if self.adopts:
            # An adopted connection was mounted by another process: libfuse will not unmount it.
            from .mount import unmount
            try:
                unmount(self.mountpoint, lazy=True)
            except errors.LaminaError as exc:
                log.debug("%s", exc)


# ---------------------------------------------------------------------------
# The control socket's server (control.py has the protocol and the clients)


class ControlServer:
    """Serves control.py's requests in the daemon's trio loop and hands the connection over.

    A takeover stops the FUSE loop (`pyfuse3.terminate`); `mount` runs `after_main` when
    `pyfuse3.main` has returned, which hands over or, if the successor fails, serves on."""

    def __init__(self, fs, session: Session, argv: list[str]):
        self.fs, self.session, self.argv = fs, session, argv
        self.path = control.socket_path(session.mountpoint)
        self._pending: tuple[socket.socket, int, trio.Event] | None = None    # the takeover under way
        self._upgrade: socket.socket | None = None     # the `upgrade` waiting for its outcome
        self._listening = False

    async def serve(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        try:
            self.path.unlink()          # a predecessor's: it listens no more once it handed over
        except FileNotFoundError:
            pass
        self.path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        with trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
            await listener.bind(str(self.path))
            os.chmod(self.path, 0o600)
            listener.listen(4)
            self._listening = True
            task_status.started()
            async with trio.open_nursery() as nursery:
                while True:
                    sock, _ = await listener.accept()
                    nursery.start_soon(self._answer, sock)

    async def _answer(self, trio_sock) -> None:
        # The exchange is a few lines and descriptors: a blocking socket, in worker threads.
        with socket.socket(fileno=trio_sock.detach()) as sock:
            sock.setblocking(True)
            try:
                pid = control.peer_pid(sock)
                request = await trio.to_thread.run_sync(control._line, sock, abandon_on_cancel=True)
            except (OSError, ValueError) as exc:
                log.warning("control socket: %s", exc)
                return
            if request.get("op") == "takeover":
                await self._takeover(sock, pid)
            elif request.get("op") == "upgrade":
                await self._start_upgrade(sock)
            else:
                await trio.to_thread.run_sync(control._say, sock, {"ok": False, "error": "unknown request"})

    async def _takeover(self, sock, pid: int) -> None:
        """Stop reading requests, hand the connection over, and note the outcome.

        The connection goes as soon as no request read so far can change what the successor
        must know (opens and releases answered: `Operations.settled`); reads still in flight
        are answered by this daemon meanwhile (the kernel takes a reply from any holder),
        so a read waiting on the disk or the Hub does not stall the others."""
        if self._pending is not None or self.session.handed_over:
            await trio.to_thread.run_sync(control._say, sock, {"ok": False, "error": "a hand-over is under way"})
            return
        outcome = trio.Event()
        self._pending = (sock, pid, outcome)
        log.info("hand-over: pid %d takes over %s; stopping at a request boundary", pid, self.session.mountpoint)
        pyfuse3.terminate()         # no request is read after this (the patched loop checks)
        try:
            await self.fs.ops.settled()
            checked = self.fs.cache.export_checked()        # trio thread: the cache's state lives here
            handed = await trio.to_thread.run_sync(self._hand_over, sock, checked)
            why = "it did not say it serves"
        except OSError as exc:
            handed, why = False, exc.strerror or str(exc)
        if handed:
            self.session.handed_over = True
            log.info("hand-over: pid %d serves %s; exiting without unmounting", pid, self.session.mountpoint)
            if self._upgrade is not None:
                await trio.to_thread.run_sync(control._say, self._upgrade, {"ok": True, "old": os.getpid(), "new": pid})
        else:
            log.warning("hand-over to pid %d failed (%s); serving on", pid, why)
            await trio.to_thread.run_sync(control.wait_dead, pid)
        outcome.set()

    async def after_main(self) -> bool:
        """After pyfuse3.main returned (every request read is answered). True: serve on, a
        takeover failed; then the successor is dead, and what it read is sent again."""
        if self._pending is None:
            return False
        _, _, outcome = self._pending
        log.info("hand-over: every request read is answered")
        await outcome.wait()
        self._pending = None
        if self.session.handed_over:
            return False
        _resend_quietly()
        pyfuse3.resume()
        return True

    def _hand_over(self, sock: socket.socket, checked: dict) -> bool:
        """In a worker thread: the state written, the descriptors sent, the successor's word."""
        opens = self.fs.ops.export_opens()
        assert self.session.writer is not None
        self.session.writer.write_opens(opens)
        self.session.writer.write_checked(checked)
        fds = [pyfuse3.connection_fd()] + ([self.session.lock_fd] if self.session.lock_fd is not None else [])
        control._say(sock, {"ok": True, "state": str(self.session.writer.directory)}, fds)
        log.info("hand-over: descriptors sent")
        sock.settimeout(control.ACK_SECONDS)
        try:
            return bool(control._line(sock).get("serving"))
        except (TimeoutError, ValueError):
            return False

    async def _start_upgrade(self, client: socket.socket) -> None:
        """Start a successor; `client` hears the outcome (from `after_main` once handed over)."""
        if self._upgrade is not None or self._pending is not None:
            await trio.to_thread.run_sync(control._say, client, {"ok": False, "error": "a hand-over is under way"})
            return
        self._upgrade = client
        try:
            successor = control.start_successor(self.argv)
            log.info("upgrade: started pid %d to take over %s", successor.pid, self.session.mountpoint)
            while successor.poll() is None or self._pending is not None:
                await trio.sleep(0.05)
            why = f"the successor exited with {successor.returncode} before it served; see the log"
            await trio.to_thread.run_sync(control._say, client, {"ok": False, "error": why})
        finally:
            self._upgrade = None

    def close(self) -> None:
        """Remove the socket, unless a successor listens there now."""
        if self._listening and not self.session.handed_over:
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass


def _resend_quietly() -> None:
    from .resend import send_resend
    try:
        send_resend(pyfuse3.connection_fd())
    except OSError as exc:
        log.warning("FUSE_NOTIFY_RESEND failed: %s", exc.strerror)


async def serve_api_when_free(api, address: tuple[str, int], task_status=trio.TASK_STATUS_IGNORED) -> None:
    """The REST API of a daemon that took over: its port is the predecessor's until that exits."""
    deadline = trio.current_time() + control.ACK_SECONDS
    while True:
        try:
            await api.serve(*address, task_status=task_status)
            return
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE or trio.current_time() > deadline:
                raise
        await trio.sleep(0.05)
