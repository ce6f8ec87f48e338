"""Cache management without a mount: pull, verify, gc, keep. Shares the cache with mounts.

`pull` uses the same block cache code as a mount (same durability and verification
rules), so a pull interrupted at any point resumes where it stopped, and a running mount
picks up the blocks a pull stored. Each command opens an assembly.Catalog under its own
HubPolicy: only `pull` and `keep` may need the Hub (to fetch, or to resolve a model the
cache never saw); `gc` and `verify` work from the cache alone.
"""

import logging
import math
import sys
from dataclasses import replace

import trio

from . import errors
from .assembly import Catalog, HubPolicy, Sources, open_catalog
from .progress import PullProgress
from .resolving import lock_for
from .localsource import LocalFile, sha256_of
from .lockfile import LockedLocal, load_lock
from .tree import FileRef

log = logging.getLogger(__name__)

PULL_TRIES = 2          # a file whose bytes do not match is fetched once more from scratch


def selected_models(manifest, names, everything=False):
    """The specs of the named models (all of them when `everything` or no names)."""
    known = {spec.name for spec in manifest.models}
    unknown = [name for name in names if name not in known]
    if unknown:
        raise errors.UsageError(f"no model named {unknown[0]!r} in {manifest.source}")
    wanted = known if everything or not names else set(names)
    return [spec for spec in manifest.models if spec.name in wanted]


def selected_files(catalog: Catalog, names, everything=False) -> list[FileRef]:
    """Hub file refs of the named models (all models when `everything`), one per content id."""
    wanted = {spec.name for spec in selected_models(catalog.manifest, names, everything)}
    unique: dict[str, FileRef] = {}
    for node in catalog.tree.hub_files():
        if node.model in wanted and isinstance(node.file, FileRef):
            unique.setdefault(node.file.content_id, node.file)
    return list(unique.values())


def local_models(manifest, names, everything=False):
    return [spec for spec in selected_models(manifest, names, everything) if spec.local is not None]


def local_files(catalog: Catalog, specs) -> list[LocalFile]:
    wanted = {spec.name for spec in specs}
    return [node.file for node in catalog.tree.files() if isinstance(node.file, LocalFile) and node.model in wanted]


def pull(settings, manifest, names, everything=False):
    # Only the models pulled are resolved: another model the Hub cannot resolve now must not
    # fail a pull of these (nor be the one its error names).
    if settings.frozen:
        lock_for(settings, manifest)        # --frozen judges the whole manifest against its lock
    pulled = replace(manifest, models=tuple(selected_models(manifest, names, everything)))
    catalog = open_catalog(settings, pulled, HubPolicy.FRESH)
    local = local_models(manifest, names, everything)
    for spec in local:
        print(f"pull: {spec.name}: nothing to fetch; served from local files at {spec.local}")
    refs = selected_files(catalog, names, everything)
    if local and not refs:
        return 0
    cache = catalog.cache
    missing: dict[str, int] = {}
    for ref in refs:
        missing[ref.model] = missing.get(ref.model, 0) + ref.size - cache.peek(ref.content_id, ref.size).cached_bytes
    progress = PullProgress(missing, settings.progress_bars)
    sources = catalog.sources()
    try:
        failed = trio.run(_pull, catalog, sources, refs, progress)
    finally:
        sources.close()
    progress.finish()
    for ref in failed:
        print(f"pull: {ref.describe}: does not match {ref.content_id} after {PULL_TRIES} tries", file=sys.stderr)
    print(f"pull: {len(refs) - len(failed)} of {len(refs)} files complete and verified")
    return 1 if failed else 0


async def _pull(catalog: Catalog, sources: Sources, refs: list[FileRef], progress: PullProgress) -> list[FileRef]:
    failed = []
    for ref in refs:
        for _ in range(PULL_TRIES):     # a mismatch discards the blob; one more full try
            if await _pull_one(catalog, sources, ref, progress):
                break
        else:
            failed.append(ref)
    return failed


async def _pull_one(catalog: Catalog, sources: Sources, ref: FileRef, progress: PullProgress) -> bool:
    with catalog.cache.open(ref.content_id, ref.size) as blob:
        async with trio.open_nursery() as nursery:
            catalog.cache.start(nursery)
            try:
                await blob.fill(sources.source_for(ref, blob), progress.for_model(ref.model))
            except errors.IntegrityError as exc:
                log.error("%s", exc)
                return False
        state = blob.state()
        if state.complete and not state.verified:
            await blob.verify(ref.describe)
        return blob.state().verified


def verify(settings, manifest, names):
    """Re-hash cached blobs against their content ids; hash local files and report their sha256."""
    catalog = open_catalog(settings, manifest, HubPolicy.NEVER)
    local = local_files(catalog, local_models(manifest, names))
    local_bad = _hash_local(local, load_lock(manifest.source))
    _tell_unresolved(catalog, "verify", names)
    refs = selected_files(catalog, names)
    outcomes = trio.run(_verify_all, catalog, refs)
    counts = {outcome: outcomes.count(outcome) for outcome in ("ok", "discarded", "kept", "incomplete")}
    kept = f", {counts['kept']} mismatched but held by another process (not discarded)" if counts["kept"] else ""
    if local:
        print(f"verify: {len(local) - local_bad} local files hashed, {local_bad} unreadable, changed or unlike the lock")
    if refs or not local:
        print(f"verify: {counts['ok']} ok, {counts['discarded']} discarded{kept}, {counts['incomplete']} incomplete")
    return 1 if counts["discarded"] or counts["kept"] or local_bad else 0


def _hash_local(files, lock=None):
    """Print each local file's sha256, and whether it matches the lock's (read-only: nothing
    under `local` is touched); the number of files unreadable, changed or unlike the lock."""
    failed = 0
    for local in files:
        try:
            digest = sha256_of(local)
        except errors.LaminaError as exc:
            print(f"{local.describe}: cannot hash: {exc}")
            failed += 1
            continue
        verdict = _against_lock(lock, local, digest)
        print(f"{local.describe}: local {digest}  {local.size} bytes  {local.source}{verdict or ''}")
        failed += bool(verdict and "DIFFERS" in verdict)
    return failed


def _against_lock(lock, local, digest):
    """'  (matches models.lock)', '  DIFFERS from models.lock ...', or None without a locked entry."""
    entry = lock.models.get(local.model) if lock is not None else None
    if not isinstance(entry, LockedLocal):
        return None
    locked = {path: (size, sha) for path, size, sha in entry.files}.get(local.path)
    if locked == (local.size, digest):
        return f"  (matches {lock.path.name})"
    said = f"{locked[1]}, {locked[0]} bytes" if locked else "no such file"
    return f"  DIFFERS from {lock.path.name} ({said})"


async def _verify_all(catalog: Catalog, refs: list[FileRef]) -> list[str]:
    """Per file: "ok", "discarded" (a mismatch, dropped), "kept" (a mismatch another process
    holds: left to it) or "incomplete"."""
    outcomes = []
    for ref in refs:
        with catalog.cache.open(ref.content_id, ref.size) as blob:
            state = blob.state()
            if not state.complete:
                print(f"{ref.describe}: incomplete ({state.cached_bytes} of {ref.size} bytes cached)")
                outcomes.append("incomplete")
                continue
            discarded_before = blob.failed_verifications
            good = await blob.verify(ref.describe)
            outcome = "ok" if good else "discarded" if blob.failed_verifications > discarded_before else "kept"
        print(f"{ref.describe}: " + {"ok": "ok", "discarded": "MISMATCH: discarded, will be fetched again",
                                     "kept": "MISMATCH: another process has it open; left for it to discard"}[outcome])
        outcomes.append(outcome)
    return outcomes


def gc(settings, manifest, max_size):
    """Evict to `max_size` (LRU); without a size, drop blobs no manifest model names.

    Blobs a running mount (or a pull) has open or is filling are skipped, whatever the size.
    From the cache alone: a model never resolved in this cache has no blob here to keep."""
    catalog = open_catalog(settings, manifest, HubPolicy.NEVER)
    directory = catalog.directory
    if max_size is None:
        named = {node.file.content_id for node in catalog.tree.hub_files() if isinstance(node.file, FileRef)}
        eviction = directory.evict(math.inf, protected=named | catalog.kept)
    else:
        eviction = directory.evict(max(0, directory.usage() - max_size), protected=catalog.kept)
    kept = f"; {eviction.in_use} in use by another process, kept" if eviction.in_use else ""
    print(f"gc: evicted {len(eviction.evicted)} blobs{kept}; cache now {directory.usage()} bytes")
    return 0


def keep(settings, manifest, name, keep=True):
    if manifest.get(name).local is not None:
        print(f"{name} is served from local files: nothing of it is cached, nothing to keep")
        return 0
    # Keeping names content ids: a model never resolved here is resolved at the Hub first.
    catalog = open_catalog(settings, manifest, HubPolicy.STORED_FIRST if keep else HubPolicy.NEVER)
    if keep:
        refs = selected_files(catalog, [name])
        catalog.directory.keep(name, {ref.content_id for ref in refs})
        print(f"kept {name}: {len(refs)} files kept out of eviction")
    else:
        print(f"no longer keeping {name}" if catalog.directory.unkeep(name) else f"{name} was not kept")
    return 0


def _unresolved(catalog: Catalog, names=()) -> list[str]:
    """Hub models (of `names`, or all) that neither the lock nor the store could resolve."""
    return [spec.name for spec in selected_models(catalog.manifest, names)
            if spec.hf is not None and catalog.snapshots.get(spec.name) is None]


def _tell_unresolved(catalog: Catalog, command: str, names) -> None:
    for name in _unresolved(catalog, names):
        print(f"{command}: {name}: never resolved in this cache: nothing of it to check")
