"""`wait`: until named models are listed, fully cached or verified, judged from the cache alone.

It reads what a mount or a pull leaves in the cache directory (stored snapshots, presence
logs, `.ok` markers) and never calls the Hub or the REST API, so it runs wherever the
cache directory is visible: as a consumer's ExecStartPre, or as an init container
beside a daemon in another container or pod.

- listed: the model is resolved to a commit in this cache (a mount has, or will show it);
- cached: every byte of its files is in the cache;
- verified: every file is also hashed against its content id.
"""

import dataclasses
import sys
import time
from collections.abc import Sequence

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
        lacking = _lacking(settings, dataclasses.replace(manifest, models=tuple(specs)), want, lock)
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


def _lacking(settings: Settings, manifest, want: str, lock=None) -> dict[str, str]:
    """Model name -> why it is not yet `want` (one line), for the models of `manifest` that are
    not. Read afresh from the cache directory (the lock's models at their locked commits)."""
    if not (settings.cache_dir / "format").exists():
        no_cache = f"no cache at {settings.cache_dir} yet (no mount or pull has used it)"
        return {spec.name: no_cache for spec in manifest.models}
    from .assembly import HubPolicy, open_catalog
    catalog = open_catalog(settings, manifest, HubPolicy.NEVER, lock)
    reports = {report["name"]: report for report in catalog.reports()}
    return {spec.name: why for spec in manifest.models
            if spec.hf is not None and (why := what_lacks(spec, reports[spec.name], want))}


def what_lacks(spec, report: dict, want: str) -> str | None:
    """Why the Hub model `spec`, as `report` shows it, is not yet `want`; None when it is."""
    if not report["ready"]:
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
