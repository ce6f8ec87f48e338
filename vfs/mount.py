"""The lifecycle of a mount: pyfuse3.init/main/close, signals, readiness, the mountpoint.

What a mount serves is built by assembly.build_filesystem; `run` makes its kernel side
(Operations, passthrough) and serves it. Order matters here. Everything that can fail for a user-visible reason (manifest, Hub,
cache, mountpoint) fails before pyfuse3.init, with a clear message and nothing mounted.
After init, the daemon must not stat its own mountpoint until pyfuse3.main is running
(the kernel would wait on a reply nobody sends). The kernel resets the mount's
read_ahead_kb when the FUSE handshake completes, so it is raised from inside the loop,
after a first request has gone through.
"""

import ctypes
import errno
import logging
import os
import signal
import subprocess
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pyfuse3
import trio

from . import daemons, errors
from .api import Api
from .assembly import Filesystem
from .fetch import RangeFetcher
from .handover import ControlServer, Session, serve_api_when_free
from .notify import Notifier, keep_informed, status_of
from .ops import Operations
from .passthrough import Passthrough
from .offline import PROBE_SECONDS, hub_answers
from .settings import Settings
from .tasks import guard

log = logging.getLogger(__name__)


def mount_options(settings: Settings) -> set[str]:
    options = set(pyfuse3.default_options) | {"fsname=lamina-llm-cache", "subtype=lamina", "ro"}
    if settings.allow_other:
        options.add("allow_other")
    return options


def prepare_mountpoint(mountpoint: Path) -> None:
    """Create the mountpoint, or clear a dead mount left by a killed daemon."""
    try:
        # statvfs always reaches the filesystem; a stat may be answered from the kernel's
        # cached attributes even when the daemon behind them is dead.
        os.statvfs(mountpoint)
    except FileNotFoundError:
        mountpoint.mkdir(parents=True)
        return
    except OSError as exc:
        if exc.errno != errno.ENOTCONN:
            raise errors.LaminaError(f"{mountpoint}: {exc.strerror}") from None
        log.warning("%s: a previous daemon died and left a dead mount; clearing it", mountpoint)
        unmount(mountpoint, lazy=True)
        return
    refuse_mount_point(mountpoint)


# Why a mount point (a bind mount, a container volume) is refused rather than mounted over:
# a daemon restarted in a new container gets a fresh copy of that bind, whose source is the
# dead FUSE mount. Its lazy unmount removes only its own copy; the host and every consumer
# keep ENOTCONN. Mounting at a plain directory *inside* a shared bind mount heals instead:
# the unmount and the new mount both propagate. docs/DEPLOY.md shows both layouts.
PARENT_LAYOUT = ("mount at a directory inside a shared mount instead, e.g. "
                 "`-v /var/lib/lamina-llm-cache:/host:rshared` and mount /host/models "
                 "(docs/DEPLOY.md, \"the layout that heals\")")


def refuse_mount_point(mountpoint: Path) -> None:
    """LaminaError if `mountpoint` already is a mount point, saying what to do instead."""
    fstype = mounted_type(mountpoint)
    if fstype is None:
        return
    if fstype == "fuse.lamina":
        raise errors.LaminaError(f"{mountpoint} is already mounted by lamina-llm-cache; unmount it first")
    raise errors.LaminaError(
        f"{mountpoint} is itself a mount point ({fstype}: a bind mount or a volume?); a restarted "
        f"daemon could not heal what the host and consumers see there: {PARENT_LAYOUT}")


def mounted_type(mountpoint: str | Path) -> str | None:
    """The filesystem type of the top mount at `mountpoint`, or None if it is not a mount point."""
    target = daemons.real_mountpoint(mountpoint)
    found = None
    for fields in _mountinfo():
        if fields[4] == target:
            found = fields[fields.index("-") + 1]      # later lines are mounted on top
    return found


def _mountinfo() -> Iterator[list[str]]:
    with open("/proc/self/mountinfo") as table:
        for line in table:
            fields = line.split()
            fields[4] = fields[4].replace("\\040", " ")
            yield fields


def unmount(mountpoint: str | Path, lazy: bool = False) -> None:
    command = ["fusermount3", "-u"] + (["-z"] if lazy else []) + [str(mountpoint)]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise errors.LaminaError(f"unmount {mountpoint}: {result.stderr.strip() or 'failed'}")


def set_read_ahead(mountpoint: Path, kilobytes: int) -> bool:
    """Raise the mount's read_ahead_kb so the kernel asks for big reads; False if not allowed."""
    target = daemons.real_mountpoint(mountpoint)
    for fields in _mountinfo():
        if fields[4] == target:
            try:
                Path(f"/sys/class/bdi/{fields[2]}/read_ahead_kb").write_text(str(kilobytes))
                return True
            except OSError as exc:
                log.info("read_ahead_kb stays at the kernel default (%s)", exc.strerror)
                return False
    return False


M_ARENA_MAX = -8        # glibc's mallopt parameter number
MALLOC_ARENAS = 2


def limit_malloc_arenas(arenas: int = MALLOC_ARENAS) -> None:
    """Cap glibc's malloc arenas before worker threads start. Each thread that frees a big
    buffer (a first touch's bytes, up to reader.DIRECT_READ_MAX) otherwise keeps it cached
    in an arena of its own. When block buffers were malloc'd (8 MiB), peak RSS of a cold
    1 GiB read went from 140-190 MiB to 190-390 MiB without the cap. They are mmap'd now
    (blockmemory.py), and measured again (`python -m bench.arenas`, docs/BENCHMARKS.md) the
    cap changes peak RSS by a few MiB at most, at no CPU cost seen: a guard, kept cheap."""
    try:
        ctypes.CDLL(None).mallopt(M_ARENA_MAX, arenas)
    except (OSError, AttributeError):
        pass                                        # not glibc: its allocator, its habits


def run(fs: Filesystem, mountpoint: str | Path, on_ready: Callable[[], None] = lambda: None,
        api_address: tuple[str, int] | None = None, session: Session | None = None,
        argv: Sequence[str] = ()) -> None:
    """Mount `fs` at `mountpoint`, or adopt a live connection (`session`: handover.Session),
    and serve until unmounted, signalled or handed over (blocking). `argv`: the daemon's
    command line, for a successor it starts (`upgrade` without a keeper)."""
    mountpoint = fs.mountpoint = Path(mountpoint)
    session = session or Session(mountpoint)
    limit_malloc_arenas()
    # The kernel side, made here: nothing that is not mounting ever loads pyfuse3.
    passthrough = Passthrough(fs.cache, fs.settings.passthrough, local=fs.settings.local_passthrough)
    fs.ops = Operations(fs.tree, fs.reader, fs.cache, fs.open_file, passthrough)
    session.open(fs.ops, mount_options(fs.settings))
    control = ControlServer(fs, session, list(argv))
    notifier = Notifier(fs.settings.notify_socket, fs.settings.watchdog_usec, fs.settings.watchdog_pid)
    try:
        trio.run(_serve, fs, passthrough, mountpoint, on_ready, api_address, notifier, control)
    finally:
        control.close()
        if not session.handed_over:     # else the successor's now
            notifier.stopping()
            passthrough.clear_status()
        session.close()
        notifier.close()
        fs.sources.close()
        daemons.forget(mountpoint)
    log.info("handed %s over" if session.handed_over else "unmounted %s", mountpoint)


async def _serve(fs: Filesystem, passthrough: Passthrough, mountpoint: Path, on_ready: Callable[[], None],
                 api_address: tuple[str, int] | None, notifier: Notifier, control: ControlServer) -> None:
    async with trio.open_nursery() as nursery:
        fs.cache.start(nursery)
        fs.reader.start(nursery)
        fs.nursery = nursery
        api = Api(fs, mountpoint)
        taking_over = control.session.takeover is not None
        if api_address is not None and not taking_over:
            await nursery.start(api.serve, *api_address)
        nursery.start_soon(_main_loop, nursery.cancel_scope, control)
        nursery.start_soon(_terminate_on_signal, notifier)
        # A first request through the mount proves the handshake is done.
        await trio.to_thread.run_sync(os.stat, mountpoint)
        set_read_ahead(mountpoint, fs.settings.read_ahead_kb)
        passthrough.after_init()
        passthrough.start(nursery)
        await trio.to_thread.run_sync(passthrough.write_status)
        api.serving = True
        if not fs.settings.offline and any(spec.hf for spec in fs.manifest.models):
            nursery.start_soon(_hub_work, fs, HUB_WORK_AFTER_HANDOVER if control.session.adopts else 0.0)
        await nursery.start(control.serve)
        assert fs.ops is not None       # made by run()
        fs.ops.opens_changed()          # in the trio thread, which changes them: writes stay in order
        await trio.to_thread.run_sync(control.session.serving, fs)     # a predecessor exits now
        fs.ops.opens_changed()          # a first daemon's state directory exists only now
        if api_address is not None and taking_over:     # its port is free once the predecessor exits
            await nursery.start(serve_api_when_free, api, api_address)
        log.info("%s %s (%d models)", "serving" if control.session.adopts else "mounted", mountpoint,
                 len(fs.tree.listing(1)))
        daemons.record(mountpoint)          # `unmount` waits for this pid to exit
        on_ready()
        notifier.ready(status_of(fs.reports()))
        nursery.start_soon(keep_informed, notifier, fs.reports, api.probe)


# A successor's first moments belong to the requests its predecessor left waiting: its
# Hub work (a connection, a probe, the branches' re-check: threads that take the GIL from
# the trio thread) starts this much later. The predecessor did the same work at its start.
HUB_WORK_AFTER_HANDOVER = 2.0


async def _hub_work(fs: Filesystem, after: float) -> None:
    await trio.sleep(after)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_connect_to_hub, fs.fetcher)
        nursery.start_soon(_recheck_quietly, fs)
        nursery.start_soon(_watch_hub, fs)


async def _connect_to_hub(fetcher: RangeFetcher) -> None:
    # The first open resolves its file at the Hub: on a connection made now, that costs one
    # round trip, not a connect (and a TLS handshake) as well. Abandoned at unmount: a Hub
    # that does not answer must not hold the unmount up for the connect timeout.
    await trio.to_thread.run_sync(fetcher.connect_to_hub, abandon_on_cancel=True)


async def _watch_hub(fs: Filesystem) -> None:
    """Probe the Hub once at start and, while it is found unreachable, every PROBE_SECONDS;
    once it answers, reads fetch again and the branches not yet re-checked are."""
    status, settings = fs.hub_status, fs.settings
    first = True
    while True:
        if first or status.offline:
            answers = await trio.to_thread.run_sync(
                hub_answers, settings.endpoint, settings.proxies, abandon_on_cancel=True)
            if not answers:
                status.found_unreachable()
            elif status.offline:
                status.found_reachable()
                await _recheck_quietly(fs)
            first = False
        await trio.sleep(PROBE_SECONDS)


async def _recheck_quietly(fs: Filesystem) -> None:
    with guard("re-checking branches", expected=(Exception,)):
        await fs.recheck_branches()


async def _main_loop(cancel_scope: trio.CancelScope, control: ControlServer) -> None:
    if control.session.adopts:
        log.info("hand-over: reading requests")
    await pyfuse3.main()
    while await control.after_main():       # a takeover that failed: serve on
        await pyfuse3.main()
    cancel_scope.cancel()


async def _terminate_on_signal(notifier: Notifier) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
        async for signum in signals:
            log.info("%s: unmounting", signal.Signals(signum).name)
            notifier.stopping()
            pyfuse3.terminate()
