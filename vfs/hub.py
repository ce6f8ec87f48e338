"""Resolve a model spec to a snapshot: commit sha, files, sizes, content ids.

The Hub's metadata API (a revision's commit, a commit's tree) asked over the same HTTP
stack as the bytes (connections.Pool): one proxy policy, one TLS trust, one pool's
timeouts for both. Every failure becomes one of our errors here, with a message that
names the model; the Hub's answers are read as huggingface_hub reads them (X-Error-Code,
and a 401 without "Invalid credentials" is a repository not found: private, gated or
missing). Calls are retried on 429/5xx and network errors (retry.py), and every request
has a timeout. The tree listing is paged here, each page retried on its own. Names the
Hub returns are checked before anything else sees them: a hostile listing can never make
a path that escapes the mount or the cache, nor grow without bound.
"""

import json
import logging
import re
import time
import urllib.parse
from collections.abc import Callable
from email.message import Message
from typing import TYPE_CHECKING, Any, TypeVar

from . import connections, errors, tls
from .connections import TRANSPORT_ERRORS, origin
from .paths import is_commit, is_safe_repo_path
from .ratelimit import RateGate
from .retry import RETRY_STATUSES, Attempts, Retryable, server_hint
from .settings import Settings, token_source
from .snapshots import RemoteFile, Snapshot, SnapshotStore, select_files

if TYPE_CHECKING:
    from .manifest import ModelSpec

log = logging.getLogger(__name__)

HEX_RE = re.compile(r"^[0-9a-f]+$")
# The memory bound on a listing: files only (folders cost nothing once listed). Measured
# ~0.9 KiB of daemon memory per file (docs/BENCHMARKS.md, Scale), so the largest repo
# accepted costs under 1 GiB; a listing past it is treated as hostile.
MAX_FILES = 1_000_000
MAX_ENTRIES_SEEN = 10 * MAX_FILES    # folders and junk included: a hostile listing must still end
MAX_FILE_SIZE = 1 << 40      # the Hub caps files at 50 GB; a listing past 1 TiB is lying
MAX_REDIRECTS = 5            # a renamed repository redirects its API calls (same origin only)
REDIRECTS = (301, 302, 303, 307, 308)
BAD_CREDENTIALS = "Invalid credentials in Authorization header"     # the Hub's X-Error-Message
_NEXT_PAGE = re.compile(r'<([^>]*)>\s*;[^,]*\brel="?next"?')     # RFC 8288, as the Hub pages a listing

Tree = tuple[RemoteFile, ...]       # a commit's files, as listed (and stored)
Headers = Message                   # an http.client answer's headers (case-insensitive)
Answer = TypeVar("Answer")


class HubAnswered(Exception):
    """The Hub answered with an error status (classified by `classify`)."""

    def __init__(self, status: int, headers: Headers, token_sent: bool):
        super().__init__(f"HTTP {status}")
        self.status, self.headers, self.token_sent = status, headers, token_sent


class Hub:
    def __init__(self, settings: Settings, store: SnapshotStore):
        self.settings = settings
        self.store = store
        self.tokens = token_source(settings)     # each call sends the token of the moment (rotation)
        self.pool = connections.Pool(settings.connect_timeout, settings.read_timeout, dict(settings.proxies),
                                     ca_bundle=settings.ca_bundle)
        self.reachable = True       # False once a call found the Hub unreachable
        self.gate = RateGate()      # shared by every thread resolving through this Hub

    def resolve(self, spec: "ModelSpec", online: bool = True) -> Snapshot:
        """The snapshot of `spec`: resolved online when possible, else from the store."""
        commit, tree = self.commit_and_tree(spec, online)
        return self.snapshot(spec, commit, tree)

    def snapshot(self, spec: "ModelSpec", commit: str, tree: Tree,
                 index: dict[str, RemoteFile] | None = None) -> Snapshot:
        """`spec`'s files of `tree` at `commit`; `index` (path -> file) spares a scan per model."""
        assert spec.hf is not None, "only a Hub model has a snapshot"
        return Snapshot(spec.hf, spec.revision, commit, select_files(spec, commit, tree, index))

    def commit_and_tree(self, spec: "ModelSpec", online: bool) -> tuple[str, Tree]:
        """(commit, files) of `spec.hf` at `spec.revision`: stored when known, else online."""
        known = spec.revision if is_commit(spec.revision) else None
        known = known or (None if online else self.store.commit_for(spec.hf, spec.revision))
        if known and (tree := self.store.load_tree(spec.hf, known)) is not None:
            return known, tree
        if not online:
            raise errors.HubUnreachable(
                f"model {spec.name!r}: {spec.hf}@{spec.revision} was never resolved and the Hub is offline")
        try:
            return self._resolve_online(spec)
        except errors.HubUnreachable as exc:
            return self._stored_fallback(spec, exc)

    def _stored_fallback(self, spec: "ModelSpec", exc: errors.HubUnreachable) -> tuple[str, Tree]:
        commit = self.store.commit_for(spec.hf, spec.revision)
        tree = self.store.load_tree(spec.hf, commit) if commit else None
        if commit is None or tree is None:
            raise exc
        self.reachable = False
        log.warning("model %r: Hub unreachable (%s); serving stored commit %s", spec.name, exc, commit,
                    extra={"model": spec.name})
        return commit, tree

    def _resolve_online(self, spec: "ModelSpec") -> tuple[str, Tree]:
        # A commit needs no resolve: listing its tree is the one call (and says if it exists).
        commit = spec.revision if is_commit(spec.revision) else self.resolve_commit(spec)
        tree = self.store.load_tree(spec.hf, commit)
        if tree is None:
            tree = self._list_tree(spec, commit)
            self.store.save_tree(spec.hf, commit, tree)
        self.store.save_ref(spec.hf, spec.revision, commit)
        return commit, tree

    def resolve_commit(self, spec: "ModelSpec") -> str:
        """The commit `spec.revision` names on the Hub now (one request, retried)."""
        revision = urllib.parse.quote(spec.revision, safe="")
        url = f"{self.settings.endpoint}/api/models/{spec.hf}/revision/{revision}?expand=sha"
        info = self._call(spec, self._get_json, url)
        commit = str(info.get("sha") or "").lower() if isinstance(info, dict) else ""
        if not is_commit(commit):
            raise errors.HubError(f"model {spec.name!r}: the Hub gave no commit sha for {spec.hf}@{spec.revision}")
        return commit

    def _list_tree(self, spec: "ModelSpec", commit: str) -> Tree:
        """The files of `spec.hf` at `commit`, page by page; each page is retried on its own."""
        url: str | None = f"{self.settings.endpoint}/api/models/{spec.hf}/tree/{commit}?recursive=true&expand=false"
        files: list[RemoteFile] = []
        seen, ignored, first_ignored = 0, 0, None
        while url:
            page, url = self._call(spec, self._tree_page, url)
            seen += len(page)
            for entry in page:
                remote = remote_file(entry)
                if remote is not None:
                    files.append(remote)
                elif not _is_directory(entry):
                    ignored += 1
                    first_ignored = first_ignored or (entry.get("path") if isinstance(entry, dict) else entry)
            if len(files) > MAX_FILES:
                raise errors.HubError(f"model {spec.name!r}: {spec.hf} lists more than {MAX_FILES} files; refused")
            if seen > MAX_ENTRIES_SEEN:     # folders are free, but a listing must end
                raise errors.HubError(
                    f"model {spec.name!r}: {spec.hf} lists more than {MAX_ENTRIES_SEEN} entries; refused")
        if ignored:
            log.warning("model %r: ignored %d unsafe or malformed entries of %s's listing, e.g. %.200r",
                        spec.name, ignored, spec.hf, first_ignored)
        return tuple(files)

    def close(self) -> None:
        """Close the idle connections to the Hub."""
        self.pool.close()

    def _get(self, url: str) -> tuple[Any, Headers]:
        """(JSON body, headers) of one GET at the Hub, its status checked and its RateLimit
        budget noted; the Hub's own redirects (a renamed repository) are followed."""
        if self.settings.offline:
            raise errors.HubUnreachable("HF_HUB_OFFLINE is set")
        token = self.tokens.current()
        headers = {"Accept": "application/json", **({"Authorization": f"Bearer {token}"} if token else {})}
        for _ in range(MAX_REDIRECTS + 1):
            with self.pool.request("GET", url, headers) as response:
                body = response.read()
            location = response.headers.get("location")
            if response.status in REDIRECTS and location:
                url = urllib.parse.urljoin(url, location)
                if origin(url) != origin(self.settings.endpoint):
                    raise ValueError("the Hub redirected to another origin")    # the token would follow
                continue
            if not 200 <= response.status < 300:
                raise HubAnswered(response.status, response.headers, token_sent=bool(token))
            self.gate.observe(response.headers)
            return json.loads(body), response.headers
        raise ValueError(f"more than {MAX_REDIRECTS} redirects")

    def _get_json(self, url: str) -> Any:
        return self._get(url)[0]

    def _tree_page(self, url: str) -> tuple[list, str | None]:
        """One page of a tree listing and the URL of the next one (None at the end)."""
        page, headers = self._get(url)
        if not isinstance(page, list):
            raise ValueError("a tree listing page is not a JSON list")
        found = _NEXT_PAGE.search(headers.get("link") or "")
        next_url = urllib.parse.urljoin(url, found.group(1)) if found else None
        if next_url and origin(next_url) != origin(self.settings.endpoint):
            raise ValueError("the listing's next page is on another origin")  # the token would follow it
        return page, next_url

    def _call(self, spec: "ModelSpec", function: Callable[[str], Answer], url: str) -> Answer:
        """Call the Hub with retries (retry.py's policy); map its failures to our errors."""
        attempts = Attempts.within(self.settings.max_retries, self.settings.read_deadline)
        while True:
            self.gate.wait()
            try:
                return function(url)
            except Exception as exc:  # noqa: BLE001 - classified right below
                mapped, retryable = classify(spec, exc, self.settings.endpoint)
                wait = attempts.wait_after(retryable) if retryable is not None else None
                if wait is None:
                    raise mapped from None
                log.info("%s; retrying in %.1fs", mapped, wait)
                if _is_rate_limited(exc):
                    self.gate.hold(wait)      # every thread waits, not only this one
                else:
                    time.sleep(wait)


def _is_rate_limited(exc: Exception) -> bool:
    return isinstance(exc, HubAnswered) and exc.status == 429


def remote_file(entry: object) -> RemoteFile | None:
    """A checked RemoteFile from one raw tree entry, or None (a directory, or unsafe/malformed)."""
    if not isinstance(entry, dict) or entry.get("type") != "file" or not is_safe_repo_path(entry.get("path")):
        return None
    size, oid, lfs = entry.get("size"), entry.get("oid"), entry.get("lfs")
    if lfs is not None:
        oid = lfs.get("oid") if isinstance(lfs, dict) else None
    expected_len = 40 if lfs is None else 64
    if not (isinstance(size, int) and _is_size(size) and isinstance(oid, str) and len(oid) == expected_len
            and HEX_RE.match(oid)):
        return None
    return RemoteFile(entry["path"], size, f"sha1:{oid}" if lfs is None else f"sha256:{oid}")


def _is_size(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_FILE_SIZE


def _is_directory(entry: object) -> bool:
    return isinstance(entry, dict) and entry.get("type") == "directory" and is_safe_repo_path(entry.get("path"))


def classify(spec: "ModelSpec", exc: Exception, endpoint: str) -> tuple[errors.LaminaError, Retryable | None]:
    """(our exception, a retry.Retryable when another try is worth it, else None)."""
    where = f"model {spec.name!r}: {spec.hf}@{spec.revision}"
    if isinstance(exc, HubAnswered):
        return _classify_answer(spec, where, exc)
    if isinstance(exc, errors.LaminaError):         # offline, or a proxy setting we cannot use
        return type(exc)(f"{where}: {exc}"), None
    if (refusal := tls.refused_certificate(exc)) is not None:
        return errors.HubError(f"{where}: {tls.describe(refusal, urllib.parse.urlsplit(endpoint).netloc)}"), None
    if isinstance(exc, TRANSPORT_ERRORS):
        # Two quick retries ride out a blip; past that, a mount starts from its stored snapshots.
        return errors.HubUnreachable(f"{where}: Hub unreachable: {type(exc).__name__}"), Retryable(at_most=2)
    return errors.HubError(f"{where}: unexpected answer from the Hub: {type(exc).__name__}: {exc}"), None


def _classify_answer(spec: "ModelSpec", where: str, answer: HubAnswered) -> tuple[errors.LaminaError, Retryable | None]:
    """An error status, read as huggingface_hub reads it (X-Error-Code, X-Error-Message)."""
    status, code, message = answer.status, answer.headers.get("x-error-code"), answer.headers.get("x-error-message")
    if code == "GatedRepo":
        return errors.AccessDenied(f"{where}: the repository is gated; accept its terms and set HF_TOKEN"), None
    if code == "RevisionNotFound":
        return errors.RevisionNotFound(f"{where}: revision {spec.revision!r} not found"), None
    # A 401 is what the Hub answers for a private, gated or missing repository alike.
    if code == "RepoNotFound" or (status == 401 and message not in (BAD_CREDENTIALS, "Access to this resource is disabled.")):
        hint = "" if answer.token_sent else " (or it is private: set HF_TOKEN)"
        return errors.RepoNotFound(f"{where}: repository not found{hint}"), None
    if status in (401, 403):
        return errors.AccessDenied(f"{where}: access denied (HTTP {status}); check HF_TOKEN"), None
    if status == 404:
        return errors.RepoNotFound(f"{where}: not found (HTTP 404)"), None
    retryable = Retryable(hint=server_hint(answer.headers)) if status in RETRY_STATUSES else None
    return errors.HubError(f"{where}: HTTP {status} from the Hub"), retryable


def resolve_url(endpoint: str, repo: str, commit: str, path: str) -> str:
    """The Hub URL that serves `path` of `repo` at `commit` (redirecting LFS files to a CDN)."""
    return f"{endpoint}/{repo}/resolve/{commit}/{urllib.parse.quote(path)}"
