"""The one place parts are wired together: a mount's Filesystem, and the Catalog the cache-only commands use.

Every command states how it may use the Hub (a `HubPolicy`, resolving.py) and builds only
what it uses, on the one cache directory: docs/DESIGN.md, "Assembly", has the table of
which command builds what under which policy.

Nothing here imports pyfuse3: the kernel side (Operations, passthrough, invalidation) is
made by mount.py when it mounts, so a cache-only command never loads it.
"""

import functools
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from .blockcache import BlobHandle, BlockCache, BlockSource
from .cachedir import CacheDir
from .fetch import RangeFetcher
from .hub import resolve_url
from .localsource import LocalFile, LocalHandle, LocalSnapshot, open_local
from .lockfile import Lock
from .manifest import Manifest, load_manifest, refuse_overlap
from .offline import HubStatus
from .reader import OpenFile, Reader
from .report import model_report
from .resolving import HubPolicy, Resolved, collector_paused, moved, resolve_all, resolve_manifest
from .settings import Settings
from .snapshots import Snapshot, SnapshotStore
from .sources import HfCacheSource, RemoteSource, hf_cached_blob
from .tree import FileRef, Node, Tree

if TYPE_CHECKING:
    from .ops import Operations

log = logging.getLogger(__name__)
GLANCE_SECONDS = 5.0         # how long list and info wait on a Hub that does not answer

Snapshots = dict[str, Snapshot | LocalSnapshot | None]


def open_cache_dir(settings: Settings) -> CacheDir:
    """The cache directory, made if new; its block size is the one every part then uses."""
    return CacheDir(settings.cache_dir, settings.block_size)


def resolve(settings: Settings, manifest: Manifest, policy: HubPolicy, lock: Lock | None = None) -> Resolved:
    """The manifest's models resolved under `policy`; `lock`: the manifest's lock when the
    caller read it already (else it is read here, resolving.lock_for)."""
    with collector_paused():
        if lock is None:
            return resolve_manifest(settings, manifest, policy)
        resolved = resolve_all(settings, manifest, SnapshotStore(settings.cache_dir), lock=lock, policy=policy)
        resolved.lock = lock
        return resolved


def kept_content(manifest: Manifest, snapshots: Snapshots, directory: CacheDir) -> set[str]:
    """Content ids eviction must keep: `keep: true` models and models kept with `keep`."""
    kept: set[str] = set().union(*directory.kept().values())
    for spec in manifest.models:
        snapshot = snapshots.get(spec.name)
        if spec.keep and spec.hf and isinstance(snapshot, Snapshot):
            kept |= {f.content_id for f in snapshot.files}
    return kept


def open_block_cache(settings: Settings, directory: CacheDir, kept: Iterable[str] = frozenset()) -> BlockCache:
    return BlockCache(directory, settings.fetch_workers, settings.max_size, settings.min_free_fraction,
                      kept=kept, memory=settings.memory)


class Sources:
    """Where a Hub file's missing bytes come from: a copy in the Hugging Face cache, else the Hub."""

    def __init__(self, settings: Settings, block_size: int, hub_status: HubStatus | None = None):
        """`block_size`: the cache directory's, which the fetcher's failure memory is keyed on."""
        self.settings = settings
        self.fetcher = RangeFetcher(settings, block_size)
        self.hub_status = hub_status if hub_status is not None else HubStatus(asked=settings.offline)

    def source_for(self, ref: FileRef, blob: BlobHandle) -> BlockSource:
        url = resolve_url(self.settings.endpoint, ref.repo, ref.commit, ref.repo_path)
        remote = RemoteSource(self.fetcher, url, ref.describe, self.hub_status)
        local = hf_cached_blob(self.settings.hf_hub_cache, ref)
        return remote if local is None else HfCacheSource(local, remote, blob)

    def close(self) -> None:
        self.fetcher.close()


@dataclass
class Catalog:
    """A manifest's models resolved on one cache directory, for the commands without a mount.

    The tree and the block cache are built on first use: `gc` never opens a BlockCache,
    `list` never builds a tree."""

    settings: Settings
    manifest: Manifest
    resolved: Resolved
    directory: CacheDir

    @property
    def snapshots(self) -> Snapshots:
        return self.resolved.snapshots

    @functools.cached_property
    def tree(self) -> Tree:
        with collector_paused():
            return Tree.build(self.manifest, self.snapshots)

    @functools.cached_property
    def kept(self) -> set[str]:
        return kept_content(self.manifest, self.snapshots, self.directory)

    @functools.cached_property
    def cache(self) -> BlockCache:
        cache = open_block_cache(self.settings, self.directory, self.kept)
        cache.defer_discards = True     # a mount beside us may be serving these blobs
        return cache

    def sources(self) -> Sources:
        """What `pull` fetches through (the caller closes it)."""
        return Sources(self.settings, self.directory.block_size)

    def reports(self, names: Iterable[str] | None = None, with_files: bool = True) -> list[dict]:
        wanted = None if names is None else set(names)
        return [model_report(spec, self.snapshots.get(spec.name), self.cache, with_files)
                for spec in self.manifest.models if wanted is None or spec.name in wanted]


def open_catalog(settings: Settings, manifest: Manifest, policy: HubPolicy, lock: Lock | None = None) -> Catalog:
    """The catalog a cache-only command works on under its `policy` (docs/DESIGN.md, "Assembly")."""
    directory = open_cache_dir(settings)
    asking = glancing(settings) if policy is HubPolicy.IF_REACHABLE else settings
    return Catalog(settings, manifest, resolve(asking, manifest, policy, lock), directory)


def glancing(settings: Settings) -> Settings:
    """Settings for a Hub asked only in passing (list, info): a Hub that accepts and never
    answers costs GLANCE_SECONDS, not the retries a mount's start may spend on it."""
    return replace(settings, connect_timeout=min(settings.connect_timeout, GLANCE_SECONDS),
                   read_timeout=min(settings.read_timeout, GLANCE_SECONDS),
                   read_deadline=min(settings.read_deadline, GLANCE_SECONDS))


@dataclass
class Filesystem:
    """Everything one mount serves, built before anything is mounted, and its re-assembly on refresh."""

    settings: Settings
    manifest: Manifest
    snapshots: Snapshots
    tree: Tree
    cache: BlockCache
    sources: Sources
    reader: Reader
    ops: "Operations | None" = None                   # the kernel side, made by mount.run
    nursery: trio.Nursery | None = None
    to_recheck: list[tuple[str, str]] = field(default_factory=list)   # (repo, branch) served from the store at start
    lock: Lock | None = None                           # the models.lock resolved from, if any
    mountpoint: Path | None = None                     # set by mount.run: local paths must stay apart from it
    on_new_tree: Callable[[Tree], None] | None = None  # each tree a refresh makes (the hand-over state)

    @property
    def fetcher(self) -> RangeFetcher:
        return self.sources.fetcher

    @property
    def hub_status(self) -> HubStatus:
        """Offline: asked for, or found at start or since."""
        return self.sources.hub_status

    def open_file(self, node: Node) -> OpenFile | LocalHandle:
        ref = node.file
        if isinstance(ref, LocalFile):
            return open_local(ref)      # no block cache: the bytes already are on a local disk
        assert ref is not None, "a file node carries its FileRef"
        blob = self.cache.open(ref.content_id, ref.size)
        try:
            handle = OpenFile(blob, self.sources.source_for(ref, blob), ref.size)
        except BaseException:
            blob.close()
            raise
        self.reader.opened(handle)
        return handle

    def reports(self) -> list[dict]:
        return [model_report(spec, self.snapshots.get(spec.name), self.cache) for spec in self.manifest.models]

    async def fill(self, ref: FileRef, on_block: Callable[[int], None]) -> None:
        """Fetch all of `ref`'s bytes into the cache (the API's /download)."""
        with self.cache.open(ref.content_id, ref.size) as blob:     # never evicted while open
            await blob.fill(self.sources.source_for(ref, blob), on_block)

    async def forget_content(self, content_id: str) -> None:
        """Make the kernel drop pages it cached from bytes that failed verification."""
        inodes = [node.inode for node in self.tree.hub_files()
                  if isinstance(node.file, FileRef) and node.file.content_id == content_id]
        if self.ops is not None and inodes:
            await trio.to_thread.run_sync(self.ops.forget_pages, inodes)

    async def refresh(self) -> int:
        """Reload the manifest and re-resolve; the mount shows the new tree. Returns entries changed."""
        manifest = await trio.to_thread.run_sync(load_manifest, self.manifest.source)
        if self.mountpoint is not None:
            refuse_overlap(manifest, self.mountpoint)
        # The lock is read again too: a locked commit moves only when the lock file says so.
        resolved = await trio.to_thread.run_sync(lambda: resolve_manifest(self.settings, manifest, HubPolicy.FRESH))
        self.lock = resolved.lock
        return await self.apply(manifest, resolved.snapshots)

    async def recheck_branches(self) -> None:
        """Ask the Hub where the branches served from the store point now; apply any move.

        Started once the mount serves: a cached remount is ready without waiting on the Hub,
        and a moved branch reaches readers the way /refresh brings it."""
        if not self.to_recheck:
            return
        manifest, current, lock = self.manifest, self.snapshots, self.lock
        resolved = await trio.to_thread.run_sync(
            lambda: resolve_all(self.settings, manifest, SnapshotStore(self.settings.cache_dir), lock=lock))
        # Local models keep the scan they were served with: only /refresh scans them again.
        resolved.snapshots.update((name, snapshot) for name, snapshot in current.items()
                                  if isinstance(snapshot, LocalSnapshot) and name in resolved.snapshots)
        changed = moved(current, resolved.snapshots)
        if not resolved.hub_reachable:
            log.warning("branches not re-checked: the Hub is unreachable; serving the stored commits")
            self.hub_status.found_unreachable()
            return                                      # re-checked once the Hub answers again
        if changed and self.manifest is manifest:       # a /refresh meanwhile has the newer answer
            log.info("branches moved for %d models (%s); applying", len(changed), ", ".join(changed[:5]))
            await self.apply(manifest, resolved.snapshots)
        self.to_recheck = []

    async def apply(self, manifest: Manifest, snapshots: Snapshots) -> int:
        """Serve `manifest` resolved to `snapshots` from now on. Returns the entries changed."""
        with collector_paused():
            tree = Tree.build(manifest, snapshots, previous=self.tree)
        stale = tree.changed_entries(self.tree)
        self.manifest, self.snapshots, self.tree = manifest, snapshots, tree
        self.cache.kept = kept_content(manifest, snapshots, self.cache.directory)
        if self.ops is not None:
            self.ops.replace_tree(tree)
            # Synchronously, in a worker: when /refresh answers, the kernel has forgotten them.
            await trio.to_thread.run_sync(self.ops.forget_entries, stale)
        if self.on_new_tree is not None:
            await trio.to_thread.run_sync(self.on_new_tree, tree)
        log.info("refreshed %s: %d models, %d entries changed", manifest.source, len(manifest.models), len(stale))
        return len(stale)


def build_filesystem(settings: Settings, manifest: Manifest, policy: HubPolicy = HubPolicy.FRESH,
                     previous: Any = None) -> Filesystem:
    """Everything a mount serves. Under STORED_FIRST, branches are answered from the store
    when they can be (the mount re-checks them once serving); under FRESH, at the Hub now.
    `previous`: the inodes of the daemon this one takes over from (handover.InodeTable)."""
    directory = open_cache_dir(settings)
    resolved = resolve(settings, manifest, policy)
    with collector_paused():
        tree = Tree.build(manifest, resolved.snapshots, previous=previous)
    cache = open_block_cache(settings, directory, kept_content(manifest, resolved.snapshots, directory))
    directory.make_blob_directories(node.file.content_id for node in tree.hub_files()
                                    if isinstance(node.file, FileRef))
    sources = Sources(settings, directory.block_size)
    fs = Filesystem(settings, manifest, resolved.snapshots, tree, cache, sources, Reader(cache),
                    to_recheck=resolved.to_recheck, lock=resolved.lock)
    if not resolved.hub_reachable:
        fs.hub_status.found_unreachable()
    cache.on_discard = fs.forget_content
    return fs

