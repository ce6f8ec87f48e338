"""What a user is told about a model: one JSON-ready shape for list, info and the REST API."""


def file_report(remote, cached_bytes, verified):
    return {"path": remote.path, "size": remote.size, "content_id": remote.content_id,
            "cached_bytes": cached_bytes, "verified": verified}


def model_report(spec, snapshot, cache):
    """Name, backend, source, pinned commit, sizes and cache state of one manifest model."""
    files = [] if snapshot is None else [
        file_report(remote, *cache.peek(remote.content_id, remote.size)) for remote in snapshot.files]
    return {
        "name": spec.name, "backend": spec.backend, "path": spec.path, "hf": spec.hf,
        "revision": spec.revision if spec.hf else None, "commit": snapshot.commit if snapshot else None,
        "pinned": spec.pin, "size": sum(f["size"] for f in files),
        "cached_bytes": sum(f["cached_bytes"] for f in files), "files": files,
    }
