"""Cache management without a mount: pull, verify, gc, pin. Shares the cache with mounts.

`pull` uses the same block cache code as a mount (same durability and verification
rules), so a pull interrupted at any point resumes where it stopped, and a running mount
picks up the blocks a pull stored.
"""

import logging
import sys

import trio

from . import errors, mount
from .progress import PullProgress

log = logging.getLogger(__name__)


def selected_files(fs, manifest, names, everything=False):
    """File refs of the named models (all models when `everything`), one per content id."""
    known = {spec.name for spec in manifest.models}
    unknown = [name for name in names if name not in known]
    if unknown:
        raise errors.UsageError(f"no model named {unknown[0]!r} in {manifest.source}")
    wanted = known if everything or not names else set(names)
    unique = {}
    for node in fs.tree.files():
        if node.model in wanted:
            unique.setdefault(node.file.content_id, node.file)
    return list(unique.values())


def pull(settings, manifest, names, everything=False):
    fs = mount.build(settings, manifest)
    fs.cache.defer_discards = True          # a mount beside us may be serving these blobs
    refs = selected_files(fs, manifest, names, everything)
    missing = {}
    for ref in refs:
        missing[ref.model] = missing.get(ref.model, 0) + ref.size - fs.cache.peek(ref.content_id, ref.size).cached_bytes
    progress = PullProgress(missing, settings.progress_bars)
    failed = trio.run(_pull, fs, refs, progress)
    progress.finish()
    for ref in failed:
        print(f"pull: {ref.describe}: does not match {ref.content_id} after two tries", file=sys.stderr)
    print(f"pull: {len(refs) - len(failed)} of {len(refs)} files complete and verified")
    return 1 if failed else 0


async def _pull(fs, refs, progress):
    failed = []
    for ref in refs:
        for _ in range(2):     # a mismatch discards the blob; one more full try
            if await _pull_one(fs, ref, progress):
                break
        else:
            failed.append(ref)
    return failed


async def _pull_one(fs, ref, progress):
    with fs.cache.open(ref.content_id, ref.size) as blob:
        async with trio.open_nursery() as nursery:
            fs.cache.start(nursery)
            try:
                await blob.fill(fs.source_for(ref, blob), progress.for_model(ref.model))
            except errors.IntegrityError as exc:
                log.error("%s", exc)
                return False
        state = blob.state()
        if state.complete and not state.verified:
            await blob.verify(ref.describe)
        return blob.state().verified


def verify(settings, manifest, names):
    fs = mount.build(settings, manifest, stored_first=True)
    fs.cache.defer_discards = True          # a mount beside us may be serving these blobs
    refs = selected_files(fs, manifest, names)
    outcomes = trio.run(_verify_all, fs, refs)
    counts = {outcome: outcomes.count(outcome) for outcome in ("ok", "discarded", "kept", "incomplete")}
    kept = f", {counts['kept']} mismatched but held by another process (not discarded)" if counts["kept"] else ""
    print(f"verify: {counts['ok']} ok, {counts['discarded']} discarded{kept}, {counts['incomplete']} incomplete")
    return 1 if counts["discarded"] or counts["kept"] else 0


async def _verify_all(fs, refs):
    """Per file: "ok", "discarded" (a mismatch, dropped), "kept" (a mismatch another process
    holds: left to it) or "incomplete"."""
    outcomes = []
    for ref in refs:
        with fs.cache.open(ref.content_id, ref.size) as blob:
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

    Blobs a running mount (or a pull) has open or is filling are skipped, whatever the size."""
    fs = mount.build(settings, manifest, stored_first=True)
    directory = fs.cache.directory
    named = {node.file.content_id for node in fs.tree.files()}
    if max_size is None:
        eviction = directory.evict(float("inf"), protected=named | fs.cache.pinned)
    else:
        eviction = directory.evict(max(0, directory.usage() - max_size), protected=fs.cache.pinned)
    kept = f"; {eviction.in_use} in use by another process, kept" if eviction.in_use else ""
    print(f"gc: evicted {len(eviction.evicted)} blobs{kept}; cache now {directory.usage()} bytes")
    return 0


def pin(settings, manifest, name, pinned=True):
    fs = mount.build(settings, manifest, stored_first=True)
    refs = selected_files(fs, manifest, [name])
    if pinned:
        fs.cache.directory.pin(name, {ref.content_id for ref in refs})
        print(f"pinned {name}: {len(refs)} files kept out of eviction")
    else:
        print(f"unpinned {name}" if fs.cache.directory.unpin(name) else f"{name} was not pinned")
    return 0
