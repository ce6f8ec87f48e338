"""What a user is told about a model: one JSON-ready shape for list, info, wait and the REST API."""

from .localsource import LocalSnapshot


def file_report(remote, state):
    return {"path": remote.path, "size": remote.size, "content_id": remote.content_id,
            "cached_bytes": state.cached_bytes, "verified": state.verified}


def local_file_report(local):
    """A local file: nothing is cached, the bytes are read from `local` itself."""
    return {"path": local.path, "size": local.size, "local": local.source, "readable": local.readable}


def model_report(spec, snapshot, cache, with_files=True):
    """Name, backend, source, resolved commit, sizes and cache state of one manifest model.

    `ready`: resolved to a commit (or nothing to resolve); `verified`: every file hashed against
    its content id (true for a model with no files). Without `with_files` the per-file
    list is left out (totals only: `list` on a repo of 100k files). A local model has
    nothing cached: its files are read from `local` itself."""
    if isinstance(snapshot, LocalSnapshot):
        return _local_model_report(spec, snapshot, with_files)
    remotes = () if snapshot is None else snapshot.files
    states = cache.peek_many([(remote.content_id, remote.size) for remote in remotes])
    files = [file_report(remote, state) for remote, state in zip(remotes, states)] if with_files else []
    size, cached = sum(r.size for r in remotes), sum(state.cached_bytes for state in states)
    return {
        "name": spec.name, "backend": spec.backend, "path": spec.path, "source": spec.source_kind,
        "hf": spec.hf, "local": spec.local,
        "revision": spec.revision if spec.hf else None, "commit": snapshot.commit if snapshot else None,
        "kept": spec.keep, "ready": snapshot is not None or spec.hf is None,
        "size": size, "cached_bytes": cached, "cached_fraction": cached / size if size else 1.0,
        "verified": all(state.verified for state in states), "files": files,
    }


def not_ready(manifest, snapshots):
    """[{"name", "why"}] of the manifest's models a mount cannot serve yet."""
    return [{"name": spec.name, "why": "not resolved to a commit (the Hub was not reached and no resolution is stored)"}
            for spec in manifest.models if spec.hf is not None and snapshots.get(spec.name) is None]


def _local_model_report(spec, snapshot, with_files):
    files = [local_file_report(local) for local in snapshot.files]
    return {
        "name": spec.name, "backend": spec.backend, "path": spec.path, "source": "local",
        "hf": None, "local": spec.local, "revision": None, "commit": None,
        "kept": spec.keep, "ready": True, "size": sum(f["size"] for f in files), "cached_bytes": 0,
        # Nothing to fetch: every byte is as available as it will ever be. Never hashed
        # against a content id (there is none): `verify NAME` reports its sha256.
        "cached_fraction": 1.0, "verified": False, "files": files if with_files else [],
    }
