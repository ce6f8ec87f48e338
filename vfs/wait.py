"""`wait`: until named models are listed, fully cached or verified, judged from the cache alone.

It reads what a mount or a pull leaves in the cache directory (stored snapshots, presence
logs, `.ok` markers) and never calls the Hub or the REST API, so it runs wherever the
cache directory is visible: as a consumer's ExecStartPre, or as an init container
beside a daemon in another container or pod.

- listed: the model is resolved to a commit in this cache (a mount has, or will show it);
- cached: every byte of its files is in the cache;
- verified: every file is also hashed against its content id.
"""

import sys
import time
from collections.abc import Sequence

from . import errors
from .settings import Settings

WANTS = ("listed", "cached", "verified")
POLL_SECONDS = 0.5


def wait(settings: Settings, manifest, names: Sequence[str], want: str = "listed",
         timeout: float | None = None) -> int:
    """0 once every named model is `want`; 1 at the timeout, saying what each still lacks."""
    from .resolving import lock_for
    specs = [manifest.get(name) for name in names]        # an unknown name: UsageError, exit 2
    lock = lock_for(settings, manifest)                     # --frozen: exit 2 on a disagreement
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        lacking = {spec.name: why for spec in specs if (why := what_lacks(settings, spec, want, lock))}
        if not lacking:
            for spec in specs:
                print(f"wait: {spec.name}: {want}")
            return 0
        left = None if deadline is None else deadline - time.monotonic()
        if left is not None and left <= 0:
            for name, why in lacking.items():
                print(f"wait: {name}: not {want} after {timeout:g}s: {why}", file=sys.stderr)
            return 1
        time.sleep(POLL_SECONDS if left is None else min(POLL_SECONDS, left))


def what_lacks(settings: Settings, spec, want: str, lock=None) -> str | None:
    """Why `spec` is not yet `want` (one line), or None when it is. A model `lock` names is
    judged at its locked commit."""
    if not (settings.cache_dir / "format").exists():
        return f"no cache at {settings.cache_dir} yet (no mount or pull has used it)"
    if spec.hf is None:
        return None             # nothing to fetch: the model is its (empty) directory
    report = _report(settings, spec, lock)
    if report is None:
        return f"not resolved: no mount or pull has resolved {spec.hf}@{spec.revision} in this cache yet"
    if want == "listed":
        return None
    missing = [f for f in report["files"] if f["cached_bytes"] < f["size"]]
    if missing:
        return (f"{report['cached_bytes']} of {report['size']} bytes cached "
                f"({report['cached_fraction']:.0%}); {len(missing)} of {len(report['files'])} files incomplete")
    unverified = [f["path"] for f in report["files"] if not f["verified"]]
    if want == "verified" and unverified:
        return f"cached, but {len(unverified)} files not yet verified (first: {unverified[0]})"
    return None


def _report(settings, spec, lock=None):
    """The model's report from the lock or stored snapshots and the cache, or None when it was
    never resolved."""
    from .blockcache import BlockCache
    from .cachedir import CacheDir
    from .hub import Hub
    from .report import model_report
    from .snapshots import SnapshotStore
    snapshot = lock.snapshot_for(spec) if lock is not None else None
    try:
        snapshot = snapshot or Hub(settings, SnapshotStore(settings.cache_dir)).resolve(spec, online=False)
    except errors.HubError:
        return None
    cache = BlockCache(CacheDir(settings.cache_dir, settings.block_size))
    return model_report(spec, snapshot, cache)
