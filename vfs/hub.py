"""Pin a model spec to a snapshot: commit sha, files, sizes, content ids.

The only importer of huggingface_hub. Every one of its exceptions becomes one of ours
here, with a message that names the model. Metadata calls are retried on 429/5xx and
network errors (huggingface_hub itself retries none of them for these calls). Names the
Hub returns are checked before anything else sees them: a hostile listing can never make
a path that escapes the mount or the cache.
"""

import logging
import re
import time
import urllib.parse

import huggingface_hub
from huggingface_hub import errors as hf_errors

from . import errors
from .retry import RETRY_STATUSES, backoff, server_hint
from .snapshots import RemoteFile, Snapshot, SnapshotStore

log = logging.getLogger(__name__)

COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")
HEX_RE = re.compile(r"^[0-9a-f]+$")
MAX_FILES = 100_000          # a bigger listing is treated as hostile


def is_safe_repo_path(path):
    """A relative '/'-separated path with no way out of the directory it lands in."""
    if not isinstance(path, str) or not path or path.startswith("/") or "\\" in path:
        return False
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in path):
        return False
    parts = path.split("/")
    return all(p not in ("", ".", "..") and len(p.encode()) <= 255 for p in parts)


class Hub:
    def __init__(self, settings, store: SnapshotStore):
        self.settings = settings
        self.store = store
        self.api = huggingface_hub.HfApi(endpoint=settings.endpoint, token=settings.token or False)
        self.reachable = True       # False once a call found the Hub unreachable

    def pin(self, spec, online=True):
        """The snapshot of `spec`: resolved online when possible, else from the store."""
        commit, tree = self._commit_and_tree(spec, online)
        return Snapshot(spec.hf, spec.revision, commit, self._select(spec, commit, tree))

    def _commit_and_tree(self, spec, online):
        known = spec.revision if COMMIT_RE.match(spec.revision) else None
        known = known or (None if online else self.store.commit_for(spec.hf, spec.revision))
        if known and (tree := self.store.load_tree(spec.hf, known)) is not None:
            return known, tree
        if not online:
            raise errors.HubUnreachable(
                f"model {spec.name!r}: {spec.hf}@{spec.revision} was never pinned and the Hub is offline")
        try:
            return self._resolve_online(spec)
        except errors.HubUnreachable as exc:
            return self._pinned_fallback(spec, exc)

    def _pinned_fallback(self, spec, exc):
        commit = self.store.commit_for(spec.hf, spec.revision)
        tree = commit and self.store.load_tree(spec.hf, commit)
        if not tree and tree != ():
            raise exc
        self.reachable = False
        log.warning("model %r: Hub unreachable (%s); serving pinned commit %s", spec.name, exc, commit)
        return commit, tree

    def _resolve_online(self, spec):
        info = self._call(spec, self.api.model_info, spec.hf, revision=spec.revision)
        commit = (info.sha or "").lower()
        if not COMMIT_RE.match(commit):
            raise errors.HubError(f"model {spec.name!r}: the Hub gave no commit sha for {spec.hf}@{spec.revision}")
        tree = self.store.load_tree(spec.hf, commit)
        if tree is None:
            tree = self._list_tree(spec, commit)
            self.store.save_tree(spec.hf, commit, tree)
        self.store.save_ref(spec.hf, spec.revision, commit)
        return commit, tree

    def _list_tree(self, spec, commit):
        def listing():
            return list(self.api.list_repo_tree(spec.hf, recursive=True, revision=commit))
        files = []
        for entry in self._call(spec, listing):
            if hasattr(entry, "size") and hasattr(entry, "blob_id"):
                remote = remote_file(spec, entry)
                if remote is not None:
                    files.append(remote)
            if len(files) > MAX_FILES:
                raise errors.HubError(f"model {spec.name!r}: {spec.hf} lists more than {MAX_FILES} files")
        return tuple(files)

    def _select(self, spec, commit, tree):
        if spec.is_dir:
            return tuple(f for f in tree if spec.wants(f.path))
        chosen = [f for f in tree if f.path == spec.file]
        if not chosen:
            raise errors.EntryNotFound(
                f"model {spec.name!r}: file {spec.file!r} is not in {spec.hf} at {spec.revision} ({commit[:12]})")
        return tuple(chosen)

    def _call(self, spec, function, *args, **kwargs):
        """Call huggingface_hub with retries; map its failures to our errors."""
        deadline = time.monotonic() + self.settings.read_deadline
        for attempt in range(self.settings.max_retries + 1):
            try:
                return function(*args, **kwargs)
            except Exception as exc:  # noqa: BLE001 - classified right below
                mapped, wait = classify(spec, exc, attempt)
                if wait is None or attempt == self.settings.max_retries or time.monotonic() + wait > deadline:
                    raise mapped from None
                log.info("%s; retrying in %.1fs", mapped, wait)
                time.sleep(wait)
        raise AssertionError("unreachable")


def remote_file(spec, entry):
    """A checked RemoteFile from a tree entry, or None (logged) when the entry is unsafe."""
    if not is_safe_repo_path(entry.path):
        log.warning("model %r: ignoring unsafe file name %r from %s", spec.name, entry.path, spec.hf)
        return None
    lfs_sha = (entry.lfs or {}).get("sha256") if entry.lfs else None
    content_id = f"sha256:{lfs_sha}" if lfs_sha else f"sha1:{entry.blob_id}"
    digest = content_id.split(":", 1)[1]
    expected_len = 64 if lfs_sha else 40
    if not isinstance(entry.size, int) or entry.size < 0 or len(digest) != expected_len or not HEX_RE.match(digest):
        log.warning("model %r: ignoring %r from %s: bad size or content id", spec.name, entry.path, spec.hf)
        return None
    return RemoteFile(entry.path, entry.size, content_id)


def classify(spec, exc, attempt):
    """(our exception, seconds to wait before a retry or None when not retryable)."""
    where = f"model {spec.name!r}: {spec.hf}@{spec.revision}"
    if isinstance(exc, hf_errors.GatedRepoError):
        return errors.AccessDenied(f"{where}: the repository is gated; accept its terms and set HF_TOKEN"), None
    if isinstance(exc, hf_errors.RevisionNotFoundError):
        return errors.RevisionNotFound(f"{where}: revision {spec.revision!r} not found"), None
    if isinstance(exc, hf_errors.RepositoryNotFoundError):
        hint = "" if spec_has_token(exc) else " (or it is private: set HF_TOKEN)"
        return errors.RepoNotFound(f"{where}: repository not found{hint}"), None
    if isinstance(exc, hf_errors.OfflineModeIsEnabled):
        return errors.HubUnreachable(f"{where}: HF_HUB_OFFLINE is set"), None
    if isinstance(exc, hf_errors.HfHubHTTPError):
        return _classify_status(where, exc, attempt)
    if isinstance(exc, hf_errors.HTTPError) or isinstance(exc, OSError):
        # Two quick retries ride out a blip; past that, a mount starts from its pinned snapshots.
        wait = backoff(attempt) if attempt < 2 else None
        return errors.HubUnreachable(f"{where}: Hub unreachable: {type(exc).__name__}"), wait
    return errors.HubError(f"{where}: unexpected answer from the Hub: {type(exc).__name__}: {exc}"), None


def spec_has_token(exc):
    """Whether the failed request carried a token (httpx raises when no request is attached)."""
    try:
        request = exc.response.request if exc.response is not None else exc.request
    except (AttributeError, RuntimeError):
        return False
    return bool(request.headers.get("authorization"))


def _classify_status(where, exc, attempt):
    response = exc.response
    status = response.status_code if response is not None else 0
    if status in (401, 403):
        return errors.AccessDenied(f"{where}: access denied (HTTP {status}); check HF_TOKEN"), None
    if status == 404:
        return errors.RepoNotFound(f"{where}: not found (HTTP 404)"), None
    wait = backoff(attempt, server_hint(response.headers)) if status in RETRY_STATUSES else None
    return errors.HubError(f"{where}: HTTP {status} from the Hub"), wait


def resolve_url(endpoint, repo, commit, path):
    """The Hub URL that serves `path` of `repo` at `commit` (redirecting LFS files to a CDN)."""
    return f"{endpoint}/{repo}/resolve/{commit}/{urllib.parse.quote(path)}"
