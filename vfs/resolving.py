"""Resolve a manifest's models to snapshots: each distinct (repo, revision) once, in parallel, lock first.

Start-up must not grow with the number of models or with the Hub's latency:

- Models are grouped by (repo, revision): a thousand models of one repo and branch cost
  one resolve and one tree listing, not a thousand.
- A model the lockfile names (and agrees with) is resolved from the lock alone: no Hub call.
- A 40-hex revision needs no resolve; its tree comes from the store when it was ever listed.
- Past that, the caller's HubPolicy decides. Unless it is FRESH, a branch whose last
  answer is stored is served from the store at once; it is reported in
  `Resolved.to_recheck`, and the mount re-checks it in the background and applies a move
  the way /refresh does.
- What is left goes to the Hub (never, under HubPolicy.NEVER), RESOLVE_PARALLEL groups at
  a time. The threads share one RateGate (ratelimit.py), so a 429 or a spent RateLimit
  budget pauses all of them.

Once one group finds the Hub unreachable, the groups not yet started go straight to the
store instead of each waiting out their own retries.
"""

import concurrent.futures
import contextlib
import enum
import gc
import logging
from dataclasses import dataclass, field

from .cachedir import CacheDir
from .errors import HubUnreachable, ManifestError, UsageError
from .localsource import LocalSnapshot, sha256_of
from .localsource import scan as scan_local
from .lockfile import Lock, LockedLocal, identity_of, load_lock, lock_path_for, write_lock
from .paths import is_commit
from .snapshots import Snapshot, SnapshotStore, path_index, select_files

log = logging.getLogger(__name__)

RESOLVE_PARALLEL = 8        # Hub requests in flight while resolving; the Hub's rate limits are per token


class HubPolicy(enum.Enum):
    """When a command asks the Hub where a model's revision points (metadata, not bytes).

    The lock and the store answer first under every policy but FRESH; what they cannot
    answer is left to the Hub, or left unresolved (the model is reported "not resolved")."""

    FRESH = "fresh"                 # every branch asked now; the store when unreachable (pull, /refresh, demo)
    STORED_FIRST = "stored-first"   # the Hub only for what was never resolved; it must answer (mount, keep)
    IF_REACHABLE = "if-reachable"   # as STORED_FIRST, but a Hub that cannot answer leaves it unresolved (list, info)
    NEVER = "never"                 # the lock and the store only: works with the Hub down (gc, verify, wait)

    @property
    def stored_first(self) -> bool:
        return self is not HubPolicy.FRESH

    @property
    def asks_hub(self) -> bool:
        return self is not HubPolicy.NEVER

    @property
    def unresolved_ok(self) -> bool:
        return self in (HubPolicy.IF_REACHABLE, HubPolicy.NEVER)


@dataclass
class Resolved:
    """What resolving found: a snapshot per model (None without a source), and what to re-check."""

    snapshots: dict
    to_recheck: list = field(default_factory=list)     # (repo, revision) served from the store
    hub_reachable: bool = True
    lock: Lock | None = None


def lock_for(settings, manifest) -> Lock | None:
    """The manifest's lock, if it has one; `settings.frozen` demands one that agrees (exit 2)."""
    lock = load_lock(manifest.source)
    if settings.frozen:
        if lock is None:
            raise ManifestError(lock_path_for(manifest.source),
                                "--frozen needs a lock file; write one with `lamina-llm-cache lock`")
        lock.refuse_disagreement(manifest)
    elif lock is not None:
        for name, why in lock.disagreements(manifest):
            log.warning("model %r: %s: %s; resolved without the lock", name, lock.path.name, why)
    return lock


@contextlib.contextmanager
def collector_paused():
    """Build a big tree without the cyclic garbage collector, then freeze what was built.

    A 100k-file repo makes some 400k objects (files, refs, nodes); the collector, run
    again and again as they are allocated, doubled the build (measured 0.49 against
    0.26 s). None of them form cycles, so reference counting still frees them. Frozen,
    they are skipped by every later collection too, which a running mount would
    otherwise pay for in its read latency."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()
        gc.freeze()


def resolve_manifest(settings, manifest, policy: HubPolicy = HubPolicy.FRESH) -> Resolved:
    """resolve_all with the manifest's lock, if it has one (see lock_for)."""
    lock = lock_for(settings, manifest)
    resolved = resolve_all(settings, manifest, SnapshotStore(settings.cache_dir), lock=lock, policy=policy)
    resolved.lock = lock
    return resolved


def update_lock(settings, manifest, upgrade=None) -> tuple:
    """Write the manifest's lock: (its path, names whose commit changed).

    `upgrade` None keeps every commit the lock already holds for an unchanged model and
    resolves only what is new or changed; a list re-resolves those models (all for [])."""
    CacheDir(settings.cache_dir, settings.block_size)     # the store lives in the cache: make it one
    old = load_lock(manifest.source)
    names = {spec.name for spec in manifest.models}
    unknown = [name for name in upgrade or () if name not in names]
    if unknown:
        raise UsageError(f"no model named {unknown[0]!r} in {manifest.source}")
    keep = old
    if old is not None and upgrade is not None:
        keep = old.without(upgrade or None)
    resolved = resolve_all(settings, manifest, SnapshotStore(settings.cache_dir), lock=keep)
    snapshots = {name: hashed_local(manifest.get(name), snapshot) if isinstance(snapshot, LocalSnapshot)
                 else snapshot for name, snapshot in resolved.snapshots.items()}
    before = {name: identity_of(entry) for name, entry in (old.models.items() if old else ())}
    changed = [name for name, snapshot in snapshots.items()
               if snapshot is not None and before.get(name) != identity_of(snapshot)]
    return write_lock(manifest, snapshots), changed


def hashed_local(spec, snapshot) -> LockedLocal:
    """A local model's lock entry: every file hashed now (read-only)."""
    return LockedLocal(spec.local, tuple((f.path, f.size, sha256_of(f)) for f in snapshot.files))


def resolve_all(settings, manifest, store: SnapshotStore, *, lock=None, policy: HubPolicy = HubPolicy.FRESH,
                hub=None) -> Resolved:
    """Snapshots for every model of `manifest` (see the module docstring for the order);
    a local model's is a LocalSnapshot, scanned now; None for one left unresolved."""
    snapshots: dict[str, Snapshot | LocalSnapshot | None] = {spec.name: None for spec in manifest.models}
    groups: dict = {}
    for spec in manifest.models:
        if spec.local is not None:
            snapshots[spec.name] = scan_local(spec)     # local disk: never the Hub, never the lock
            continue
        if spec.hf is None:
            continue
        locked = lock.snapshot_for(spec) if lock is not None else None
        if locked is not None:
            snapshots[spec.name] = locked
        else:
            groups.setdefault((spec.hf, spec.revision), []).append(spec)
    resolved = Resolved(snapshots)
    online = not settings.offline
    stored, remote = _split_stored(store, groups, policy.stored_first)
    for key, (commit, tree, is_branch) in stored.items():
        _select_all(groups[key], commit, tree, snapshots)
        if is_branch:           # a commit never moves: nothing to re-check
            resolved.to_recheck.append(key)
    if remote and policy.asks_hub:
        own_hub = hub is None
        if own_hub:
            from .hub import Hub    # a start the store answers alone never builds a Hub client
            hub = Hub(settings, store)
        try:
            answers = _resolve_remote(hub, groups, remote, online, policy.unresolved_ok)
        finally:
            if own_hub:
                hub.close()         # its idle connections to the Hub
        for key, (commit, tree) in answers.items():
            _select_all(groups[key], commit, tree, snapshots)
        resolved.hub_reachable = online and hub.reachable and len(answers) == len(remote)
    else:
        resolved.hub_reachable = online
    return resolved


def _split_stored(store, groups, stored_first):
    """(key -> (commit, tree, is_branch) the store answers alone, keys that need the Hub)."""
    stored, remote = {}, []
    for key in groups:
        repo, revision = key
        is_branch = not is_commit(revision)
        commit = store.commit_for(repo, revision) if is_branch and stored_first else None
        commit = revision if not is_branch else commit
        tree = store.load_tree(repo, commit) if commit else None
        if tree is None:
            remote.append(key)
        else:
            stored[key] = (commit, tree, is_branch)
    return stored, remote


def _resolve_remote(hub, groups, keys, online, unresolved_ok=False):
    """key -> (commit, tree) for the groups that need the Hub, RESOLVE_PARALLEL at a time.

    Every group is waited for; the first failure in manifest order is raised, so the
    message a user sees does not depend on thread timing. With `unresolved_ok`, a group
    the Hub could not be reached for is left out instead (and logged).
    """
    if not keys:
        return {}

    def resolve_group(key):
        return hub.commit_and_tree(groups[key][0], online and hub.reachable)

    with concurrent.futures.ThreadPoolExecutor(min(RESOLVE_PARALLEL, len(keys)), "lamina-resolve") as pool:
        futures = {key: pool.submit(resolve_group, key) for key in keys}
        concurrent.futures.wait(futures.values())
    answers = {}
    for key, future in futures.items():
        try:
            answers[key] = future.result()
        except HubUnreachable as exc:
            if not unresolved_ok:
                raise
            log.warning("%s; reported as not resolved", exc)
    return answers


def _select_all(specs, commit, tree, snapshots):
    index = path_index(tree) if sum(not spec.is_dir for spec in specs) > 1 else None
    for spec in specs:
        snapshots[spec.name] = Snapshot(spec.hf, spec.revision, commit, select_files(spec, commit, tree, index))


def moved(old: dict, new: dict) -> list:
    """Names of models whose commit differs between two snapshot maps."""
    return [name for name, snapshot in new.items()
            if _commit(snapshot) != _commit(old.get(name))]


def _commit(snapshot: Snapshot | None):
    return snapshot.commit if snapshot is not None else None
