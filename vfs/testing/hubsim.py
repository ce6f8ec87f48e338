"""The Hub simulator: an in-process HTTP server that speaks the Hugging Face Hub's read protocol.

It serves repositories (several commits each, branches and tags) on two origins of
127.0.0.1, as docs/HUB-PROTOCOL.md describes: the API origin (`/api/models/...` metadata and
`/{repo}/resolve/{rev}/{path}`) and a "CDN" origin that LFS files redirect to, so that
huggingface_hub and the project's own Range reader can be tested offline, fast, and against
injected faults.

Design notes
- Content is immutable once added: a commit is a frozen mapping path -> file entry, and a
  file's bytes live either in memory or in a file on disk that is hashed once at add time
  and streamed with sendfile, never read whole. A branch moving is the only mutation.
- One request is handled in three steps: route (build a `_Response` from the request and
  the store), pick at most one transport fault for it, transmit. Content faults
  (`claim_size`, `raw_tree`) are taken while routing because they change what is listed.
- Thread rules: `ThreadingHTTPServer` runs one thread per connection. The store, the fault
  list and the log each have their own lock and nothing holds two of them at once. A
  `RequestRecord` is written only by the thread serving that request.
- A record's `bytes_sent` is raised *before* bytes are handed to the kernel (and lowered
  if the send fails), so a client that has received N bytes always sees at least N logged.
- A `Link` (vfs/testing/link.py) shapes every response: a rate per body, a delay per reply,
  a cap on requests served at once; each origin counts its requests in flight and the
  most it ever served at once (`most_in_flight`), which tests hold clients to.
- HTTPS: given server TLS contexts (`tls=`, and `cdn_tls=` for a CDN with another
  certificate), both origins speak TLS; each connection's handshake runs in its own
  thread, and bodies are written through the TLS layer (never sendfile, which would put
  plaintext on the wire).
- Errors look like the Hub's: JSON `{"error": msg}` and `X-Error-Message`, plus
  `X-Error-Code` where the Hub has a code for the condition. Nothing Xet is ever sent.
"""

import argparse
import base64
import calendar
import dataclasses
import hashlib
import hmac
import json
import os
import re
import signal
import socket
import ssl
import struct
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlencode, urlsplit

from . import link as _link
from .link import InFlight, Link, Pacer

LFS_MIN_SIZE = 10 * 1024 * 1024
LFS_SUFFIXES = (".gguf", ".safetensors", ".bin", ".pt")
HASH_CHUNK = 8 * 1024 * 1024
SENDFILE_CHUNK = 8 * 1024 * 1024
COPY_CHUNK = 256 * 1024
DEFAULT_PAGE_SIZE = 1000
EXPAND_PAGE_SIZE = 50  # the Hub pages expanded listings by 50
INVALID_CREDENTIALS = "Invalid credentials in Authorization header"
_REPO_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_COMMIT_SHA = re.compile(r"^[0-9a-f]{40}$")


# ---------------------------------------------------------------------------
# Content: blobs, file entries, commits, repositories


@dataclass(frozen=True)
class Blob:
    """The bytes of one file, in memory (`data`) or on disk (`path`), with their hashes."""

    size: int
    sha256: str
    git_sha1: str | None  # git blob id of the bytes; only computed for non-LFS files
    data: bytes | None = None
    path: Path | None = None

    def body(self):
        return _BytesBody(self.data) if self.path is None else _FileBody(self.path, self.size)


@dataclass(frozen=True)
class FileEntry:
    """One file of a commit: its repo path, its bytes, and how git stores it."""

    path: str
    blob: Blob
    lfs: bool

    @property
    def pointer(self):
        """The git-lfs pointer file that git stores in place of an LFS file's bytes."""
        return (
            "version https://git-lfs.github.com/spec/v1\n"
            f"oid sha256:{self.blob.sha256}\nsize {self.blob.size}\n"
        ).encode()

    @property
    def oid(self):
        """The git blob id the Hub reports: of the pointer for LFS files, else of the bytes."""
        return _git_blob_sha1(self.pointer) if self.lfs else self.blob.git_sha1


@dataclass(frozen=True)
class Commit:
    """An immutable snapshot of a repository: files by path, directory ids, and a date."""

    sha: str
    files: dict
    dirs: dict  # directory path -> tree oid (the root is not listed)
    date: str
    title: str


@dataclass
class _Repo:
    id: str
    private: bool
    gated: object  # False, "auto" or "manual", as the Hub reports it
    default_branch: str
    created: str = field(default_factory=lambda: _iso_now())
    branches: dict = field(default_factory=dict)
    tags: dict = field(default_factory=dict)
    commits: dict = field(default_factory=dict)

    def resolve(self, revision):
        """The commit a branch, tag or full commit sha names, or None."""
        sha = self.branches.get(revision) or self.tags.get(revision)
        if sha is None and _COMMIT_SHA.match(revision):
            sha = revision
        return self.commits.get(sha)


def _git_blob_sha1(data):
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _is_lfs(name, size):
    return size >= LFS_MIN_SIZE or name.lower().endswith(LFS_SUFFIXES)


def _blob_from_bytes(data):
    data = bytes(data)
    return Blob(len(data), hashlib.sha256(data).hexdigest(), _git_blob_sha1(data), data=data)


def _blob_from_path(path, want_git_sha1):
    """Hash a file in chunks (never whole in memory); the git sha1 only when it is needed."""
    size = path.stat().st_size
    sha256 = hashlib.sha256()
    sha1 = hashlib.sha1(b"blob %d\0" % size) if want_git_sha1 else None
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            sha256.update(chunk)
            if sha1 is not None:
                sha1.update(chunk)
    return Blob(size, sha256.hexdigest(), sha1.hexdigest() if sha1 is not None else None, path=path)


def _check_repo_path(name):
    parts = name.split("/")
    if name.startswith("/") or any(p in ("", ".", "..") for p in parts) or "\0" in name:
        raise ValueError(f"invalid file path in repo: {name!r}")


def _check_repo_id(repo_id):
    parts = repo_id.split("/")
    if len(parts) > 2 or not all(_REPO_PART.match(p) for p in parts) or parts[0] == "_sim":
        raise ValueError(f"invalid repo id: {repo_id!r}")


def _directory_oids(files):
    """Fake git tree ids for every directory, deepest first so parents include children."""
    lines: dict[str, list[str]] = {"": []}
    for path, entry in files.items():
        parent, _, name = path.rpartition("/")
        lines.setdefault(parent, []).append(f"file {name} {entry.oid}")
        while parent:
            parent = parent.rpartition("/")[0]
            lines.setdefault(parent, [])
    oids = {}
    for directory in sorted(lines, key=lambda d: d.count("/") + bool(d), reverse=True):
        oids[directory] = _git_blob_sha1("\n".join(sorted(lines[directory])).encode())
        if directory:
            parent, _, name = directory.rpartition("/")
            lines[parent].append(f"tree {name} {oids[directory]}")
    return oids


def _iso_now():
    return time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime())


def repo_files(directory):
    """Every file under `directory` (recursively, `.git` skipped) as {repo path: Path}."""
    root = Path(directory)
    files = {}
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root).as_posix()
        if path.is_file() and not relative.split("/")[0] == ".git":
            files[relative] = path
    return files


# ---------------------------------------------------------------------------
# Faults


_FAULT_PARAMS: dict[str, tuple[set[str], dict[str, Any]]] = {  # kind -> (required params, optional params with defaults)
    "status": ({"code"}, {"headers": {}}),
    "rate_limit": (set(), {"seconds": 1, "style": "retry-after"}),
    "delay": ({"seconds"}, {}),
    "stall": ({"seconds"}, {"after_bytes": 0, "then": "finish"}),
    "reset": (set(), {"after_bytes": 0}),
    "short": (set(), {"after_bytes": 0}),
    "ignore_range": (set(), {"reset_after": None}),
    "wrong_content_range": (set(), {}),
    "long_body": (set(), {"extra": 1024}),
    "wrong_bytes": (set(), {}),
    "redirect_loop": (set(), {}),
    "drop_header": ({"name"}, {}),
    "claim_size": ({"size"}, {"file": None}),
    "raw_tree": ({"entries"}, {}),
}
FAULT_KINDS = tuple(_FAULT_PARAMS)
_BODY_KINDS = {"stall", "reset", "short", "wrong_bytes"}
_RANGE_KINDS = {"ignore_range", "wrong_content_range", "long_body"}
_CONTENT_KINDS = {"claim_size", "raw_tree"}
_TRANSPORT_KINDS = set(FAULT_KINDS) - _CONTENT_KINDS


class Fault:
    """One injected misbehaviour: `Fault(kind, origin=None, method=None, path=None, times=None, **params)`.

    `origin` ("api"/"cdn"), `method` and `path` (a substring or regex of the URL path, raw
    or percent-decoded) narrow which requests it hits; `times` None means every such
    request, N the next N (it counts down; `hits` counts up). Faults are tried in the order
    added and the first active one that matches *and means something for the request* wins:

    kind                 params (default)              applies to          effect
    status               code, headers ({})            any request         that status, JSON error body, extra headers
    rate_limit           seconds (1), style            any request         429 + `Retry-After: N` ("retry-after") or
                         ("retry-after"|"ratelimit")                       `RateLimit: "api";r=0;t=N` ("ratelimit")
    delay                seconds                       any request         sleep, then answer normally
    drop_header          name (str or list)            any request         omit those response headers
    redirect_loop        -                             API resolve         302 to the very same URL, forever
    stall                seconds, after_bytes (0),     GET with a body     send after_bytes, sleep, then finish
                         then ("finish"|"close")                           the body or close the connection
    reset                after_bytes (0)               GET with a body     send after_bytes, then TCP RST
    short                after_bytes (0)               GET with a body     send after_bytes, then a clean close
    wrong_bytes          -                             GET with a body     every body byte XOR 0xFF, headers intact
    ignore_range         reset_after (None)            206 answers         200 and the whole body instead (reset
                                                                           after that many bytes, if given)
    wrong_content_range  -                             206 answers         the same length from another offset,
                                                                           Content-Range naming it (for a range of
                                                                           the whole body: a total one too big)
    long_body            extra (1024)                  206 answers         Content-Range as asked, `extra` more bytes
                                                                           in the body and Content-Length
    claim_size           size, file (None = all)       API info/tree/      listings, X-Linked-Size and HEAD's
                                                       paths-info/resolve  Content-Length say `size`; bytes unchanged
    raw_tree             entries (a list)              tree listings       these literal entries, paged as usual
    """

    def __init__(self, kind, origin=None, method=None, path=None, times=None, **params):
        if kind not in _FAULT_PARAMS:
            raise ValueError(f"unknown fault kind {kind!r}; known: {', '.join(FAULT_KINDS)}")
        if origin not in (None, "api", "cdn"):
            raise ValueError(f"fault origin must be 'api', 'cdn' or None, not {origin!r}")
        required, optional = _FAULT_PARAMS[kind]
        unknown = set(params) - required - set(optional)
        missing = required - set(params)
        if unknown or missing:
            raise ValueError(f"fault {kind!r}: unknown params {sorted(unknown)}, missing {sorted(missing)}")
        self.kind, self.origin, self.path, self.times = kind, origin, path, times
        self.method = method.upper() if method else None
        self.params = {**optional, **params}
        self.hits = 0
        _check_fault_choices(self)

    def __repr__(self):
        return f"Fault({self.to_dict()!r})"

    def to_dict(self):
        where = {"origin": self.origin, "method": self.method, "path": self.path}
        return {"kind": self.kind, **where, "times": self.times, "hits": self.hits, **self.params}

    @classmethod
    def from_dict(cls, data):
        data = {k: v for k, v in data.items() if k != "hits"}
        return cls(**data)

    def matches(self, request):
        if self.times == 0:
            return False
        if self.origin not in (None, request.origin) or self.method not in (None, request.method):
            return False
        return self.path is None or _path_matches(self.path, request.raw_path)


def _check_fault_choices(fault):
    choices = {"style": ("retry-after", "ratelimit"), "then": ("finish", "close")}
    for name, allowed in choices.items():
        if name in fault.params and fault.params[name] not in allowed:
            raise ValueError(f"fault {fault.kind!r}: {name} must be one of {allowed}, not {fault.params[name]!r}")


def _path_matches(pattern, raw_path):
    decoded = unquote(raw_path)
    if pattern in raw_path or pattern in decoded:
        return True
    try:
        return bool(re.search(pattern, raw_path) or re.search(pattern, decoded))
    except re.error:
        return False


def _fault_fits(kind, request, response):
    """Whether a transport fault means anything for this request/response pair."""
    if kind in _BODY_KINDS:
        return request.method == "GET" and response.length > 0
    if kind in _RANGE_KINDS:
        return response.status == 206
    if kind == "redirect_loop":
        return request.route == "resolve"
    return True


def _content_fault_fits(kind, request):
    if kind == "raw_tree":
        return request.route == "tree"
    return request.origin == "api" and request.route in ("info", "tree", "paths-info", "resolve")


class _FaultBook:
    """The ordered fault list; the first active match wins and is counted down."""

    def __init__(self):
        self._lock = threading.Lock()
        self._faults = []

    def add(self, fault):
        with self._lock:
            self._faults.append(fault)
        return fault

    def clear(self):
        with self._lock:
            self._faults.clear()

    def all(self):
        with self._lock:
            return list(self._faults)

    def take(self, request, fits):
        with self._lock:
            for fault in self._faults:
                if fault.matches(request) and fits(fault.kind):
                    if fault.times is not None:
                        fault.times -= 1
                    fault.hits += 1
                    return fault
        return None


# ---------------------------------------------------------------------------
# The request log


@dataclass
class RequestRecord:
    """One request as the simulator saw it; `authorization` is the raw header (or None)."""

    origin: str
    method: str
    path: str
    query: str
    range: str | None
    status: int | None = None
    bytes_sent: int = 0
    authorization: str | None = None
    headers: dict = field(default_factory=dict)
    fault: str | None = None
    started: float = field(default_factory=time.monotonic)   # when the request arrived
    peer: str | None = None     # the client's "host:port": which connection (a proxy's tunnel?) carried it

    @property
    def authorization_sent(self):
        return self.authorization is not None

    def to_dict(self):
        return {**dataclasses.asdict(self), "authorization_sent": self.authorization_sent}

    @classmethod
    def from_dict(cls, data):
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


class _RequestLog:
    def __init__(self):
        self._lock = threading.Lock()
        self._records = []

    def start(self, request):
        headers = {k: ("<redacted>" if k.lower() == "authorization" else v) for k, v in request.headers.items()}
        record = RequestRecord(
            request.origin, request.method, request.raw_path, request.query_string,
            request.headers.get("Range"), authorization=request.headers.get("Authorization"), headers=headers,
            peer=request.peer,
        )
        with self._lock:
            self._records.append(record)
        return record

    def records(self):
        with self._lock:
            return list(self._records)

    def clear(self):
        with self._lock:
            self._records.clear()

    def bytes_sent(self, origin=None, path_contains=None):
        return sum(
            r.bytes_sent for r in self.records()
            if origin in (None, r.origin) and (path_contains is None or path_contains in r.path
                                                or path_contains in unquote(r.path))
        )


# ---------------------------------------------------------------------------
# Requests, responses, bodies


@dataclass
class _Request:
    origin: str
    method: str
    raw_path: str
    query_string: str
    headers: Message  # case-insensitive
    body: bytes
    route: str = "unknown"  # set by the router: info, tree, paths-info, resolve, cdn
    content_fault: object = None
    scheme: str = "http"
    peer: str | None = None

    @property
    def segments(self):
        return [s for s in self.raw_path.split("/") if s]

    @property
    def query(self):
        return parse_qs(self.query_string, keep_blank_values=True)

    def flag(self, name):
        return self.query.get(name, ["false"])[-1].lower() in ("1", "true")

    @property
    def base_url(self):
        return f"{self.scheme}://{self.headers.get('Host', 'localhost')}"


class _BytesBody:
    def __init__(self, data):
        self.data, self.size = data, len(data)

    def chunks(self, start, end, size=COPY_CHUNK):
        view = memoryview(self.data)
        for offset in range(start, end, size):
            yield view[offset:min(end, offset + size)]


class _FileBody:
    def __init__(self, path, size):
        self.path, self.size = path, size

    def chunks(self, start, end, size=COPY_CHUNK):
        with open(self.path, "rb") as f:
            for offset in range(start, end, size):
                yield os.pread(f.fileno(), min(end, offset + size) - offset, offset)


@dataclass
class _Response:
    status: int
    headers: list
    body: object = None  # _BytesBody | _FileBody | None
    start: int = 0
    length: int = 0
    advertised_length: int | None = None  # Content-Length to claim when it is not `length`


class _HubError(Exception):
    """A Hub-style error answer raised while routing."""

    def __init__(self, status, message, code=None, headers=()):
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, list(headers)


def _json_response(status, payload, headers=()):
    data = json.dumps(payload).encode()
    return _Response(status, [("Content-Type", "application/json; charset=utf-8"), *headers],
                     _BytesBody(data), 0, len(data))


def _header_safe(text):
    """Header values must be one latin-1 line; names from URLs can hold anything."""
    return re.sub(r"[\r\n]", " ", text).encode("ascii", "backslashreplace").decode()


def _error_response(status, message, code=None, headers=()):
    extra = [("X-Error-Message", _header_safe(message)), *headers]
    if code is not None:
        extra.insert(0, ("X-Error-Code", code))
    return _json_response(status, {"error": message}, extra)


def _parse_range(header, size):
    """(start, end_exclusive) for a single `bytes=` range, "unsatisfiable", or None to ignore."""
    match = re.fullmatch(r"\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*", header or "")
    if not match or match.groups() == ("", ""):
        return None  # absent, malformed or multi-range: served whole, as RFC 9110 allows
    first, last = match.groups()
    if first == "":
        suffix = int(last)
        return (max(0, size - suffix), size) if suffix and size else "unsatisfiable"
    start = int(first)
    end = size if last == "" else int(last) + 1
    if end <= start and last != "":
        return None  # last < first: invalid, so ignored
    return (start, min(end, size)) if start < size else "unsatisfiable"


def _content_response(body, range_header, headers):
    """200, 206 or 416 for serving `body`, honouring one Range."""
    headers = [("Accept-Ranges", "bytes"), *headers]
    wanted = _parse_range(range_header, body.size)
    if wanted == "unsatisfiable":
        return _error_response(416, "Requested Range Not Satisfiable",
                               headers=[("Content-Range", f"bytes */{body.size}")])
    if wanted is None:
        return _Response(200, headers, body, 0, body.size)
    start, end = wanted
    headers.append(("Content-Range", f"bytes {start}-{end - 1}/{body.size}"))
    return _Response(206, headers, body, start, end - start)


# ---------------------------------------------------------------------------
# The store: repositories, tokens, blobs


class _Store:
    """Repositories and tokens; every mutation and lookup holds `_lock` briefly."""

    def __init__(self, tokens):
        self._lock = threading.Lock()
        self._repos = {}
        self._blobs_by_sha256 = {}
        self._path_blobs = {}  # (path, size, mtime_ns) -> Blob: a file is hashed once
        self._commit_counter = 0
        self.tokens = {t: set((spec or {}).get("granted", ())) for t, spec in (tokens or {}).items()}

    def add_repo(self, repo_id, files, private, gated, branch, tags):
        _check_repo_id(repo_id)
        gated = "manual" if gated is True else gated
        entries = self._entries(files)
        with self._lock:
            if repo_id in self._repos:
                raise ValueError(f"repo {repo_id!r} already exists")
            self._repos[repo_id] = _Repo(repo_id, bool(private), gated or False, branch)
            return self._commit(self._repos[repo_id], entries, branch, tags)

    def add_commit(self, repo_id, files, branch, tags):
        entries = self._entries(files)
        with self._lock:
            if repo_id not in self._repos:
                raise KeyError(f"no repo {repo_id!r}; add_repo first")
            return self._commit(self._repos[repo_id], entries, branch, tags)

    def _commit(self, repo, entries, branch, tags):
        parent = repo.branches.get(branch) or repo.branches.get(repo.default_branch) or ""
        self._commit_counter += 1
        seed = f"commit {repo.id} {parent} {self._commit_counter} " + " ".join(
            f"{p}:{e.oid}" for p, e in sorted(entries.items()))
        sha = hashlib.sha1(seed.encode()).hexdigest()
        dirs = {d: oid for d, oid in _directory_oids(entries).items() if d}
        title = f"Upload {len(entries)} files" if parent else "initial commit"
        repo.commits[sha] = Commit(sha, entries, dirs, _iso_now(), title)
        repo.branches[branch] = sha
        for tag in tags:
            repo.tags[tag] = sha
        for entry in entries.values():
            self._blobs_by_sha256[entry.blob.sha256] = entry.blob
        return sha

    def _entries(self, files):
        entries = {}
        for name, content in files.items():
            _check_repo_path(name)
            blob = self._blob(name, content)
            entries[name] = FileEntry(name, blob, _is_lfs(name, blob.size))
        return entries

    def _blob(self, name, content):
        if isinstance(content, str):
            content = content.encode()
        if isinstance(content, (bytes, bytearray, memoryview)):
            return _blob_from_bytes(content)
        path = Path(content).resolve()
        stat = path.stat()
        key = (path, stat.st_size, stat.st_mtime_ns)
        with self._lock:
            cached = self._path_blobs.get(key)
        needs_sha1 = not _is_lfs(name, stat.st_size)
        if cached is None or (needs_sha1 and cached.git_sha1 is None):
            cached = _blob_from_path(path, want_git_sha1=needs_sha1)
            with self._lock:
                self._path_blobs[key] = cached
        return cached

    def repo(self, repo_id):
        with self._lock:
            return self._repos.get(repo_id)

    def has_repo(self, repo_id):
        return self.repo(repo_id) is not None

    def commit(self, repo, revision):
        with self._lock:
            return repo.resolve(revision)

    def blob(self, sha256):
        with self._lock:
            return self._blobs_by_sha256.get(sha256)

    def add_token(self, token, granted):
        with self._lock:
            self.tokens[token] = set(granted)

    def remove_token(self, token):
        with self._lock:
            self.tokens.pop(token, None)

    def knows_token(self, token):
        with self._lock:
            return token in self.tokens

    def granted(self, token, repo_id):
        with self._lock:
            return repo_id in self.tokens.get(token, ())


# ---------------------------------------------------------------------------
# Signed CDN URLs: expiring, and optionally scoped to one range


class UrlSigner:
    """Signs the CDN URLs the resolve redirects to, as a presigned S3 URL looks.

    Off by default (`seconds` None: URLs are plain and never expire). With `seconds` set,
    a redirect carries `X-Amz-Date`, `X-Amz-Expires` and a signature, and the CDN refuses
    (403) a URL whose time is up or whose signature is wrong, as S3 and CloudFront do. With
    `scope_ranges`, a resolve asked with a Range header gets a URL signed for that range
    alone (as the Hub's Xet bridge has been reported to do); the CDN refuses any other
    range on it. A resolve without Range gets a URL good for every range.
    """

    def __init__(self, seconds=None, scope_ranges=False):
        self.seconds, self.scope_ranges = seconds, scope_ranges
        self._key = os.urandom(16)

    def sign(self, location, range_header):
        if self.seconds is None:
            return location
        params = {"X-Amz-Algorithm": "AWS4-HMAC-SHA256",
                  "X-Amz-Date": time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()),
                  "X-Amz-Expires": str(int(self.seconds))}
        if self.scope_ranges and range_header:
            params["X-Signed-Range"] = range_header
        params["X-Amz-Signature"] = self._signature(urlsplit(location).path, params)
        return f"{location}?{urlencode(params)}"

    def rotate_key(self):
        """A new signing key: every URL signed before is refused from now on."""
        self._key = os.urandom(16)

    def refusal(self, request):
        """None when `request` may have the bytes, else the 403 answer the CDN gives."""
        query = {k: v[-1] for k, v in request.query.items()}
        if "X-Amz-Signature" not in query:
            if self.seconds is None:
                return None
            return _error_response(403, "AccessDenied: the URL carries no signature")
        signature = query.pop("X-Amz-Signature")
        if not hmac.compare_digest(signature, self._signature(request.raw_path, query)):
            return _error_response(403, "SignatureDoesNotMatch")
        signed_at = calendar.timegm(time.strptime(query["X-Amz-Date"], "%Y%m%dT%H%M%SZ"))
        if time.time() > signed_at + int(query["X-Amz-Expires"]):
            return _error_response(403, "AccessDenied: Request has expired")
        scope = query.get("X-Signed-Range")
        if scope is not None and scope != request.headers.get("Range"):
            return _error_response(403, f"AccessDenied: invalid range (signed for {scope})")
        return None

    def _signature(self, path, params):
        text = unquote(path) + "\n" + "&".join(f"{k}={params[k]}" for k in sorted(params))
        return hmac.new(self._key, text.encode(), hashlib.sha256).hexdigest()



# ---------------------------------------------------------------------------
# Routing: the API origin


def _listed(path, prefix, recursive):
    if prefix:
        if not path.startswith(prefix + "/"):
            return False
        path = path[len(prefix) + 1:]
    return recursive or "/" not in path


def _claimed_size(entry, fault):
    if fault is not None and fault.kind == "claim_size" and fault.params["file"] in (None, entry.path):
        return fault.params["size"]
    return entry.blob.size


def _decode_cursor(cursor):
    if not cursor:
        return 0
    try:
        return int(base64.urlsafe_b64decode(cursor.encode()).decode())
    except ValueError:
        raise _HubError(400, f"Invalid cursor: {cursor}") from None


def _encode_cursor(offset):
    return base64.urlsafe_b64encode(str(offset).encode()).decode()


def _content_type(path):
    text = (".json", ".md", ".txt", ".yaml", ".yml", ".py", ".model", ".gitattributes")
    return "text/plain; charset=utf-8" if path.endswith(text) else "application/octet-stream"


class _ApiRouter:
    """Builds the API origin's answers: model info, tree, paths-info and resolve."""

    def __init__(self, store, faults, page_size, cdn_endpoint, signer):
        self.store, self.faults = store, faults
        self.page_size, self.cdn_endpoint = page_size, cdn_endpoint
        self.signer = signer

    def route(self, request):
        try:
            return self._dispatch(request)
        except _HubError as error:
            return _error_response(error.status, error.message, error.code, error.headers)

    def _dispatch(self, request):
        segments = request.segments
        if segments[:2] == ["api", "models"] and len(segments) >= 3:
            return self._models_api(request, segments[2:])
        if "resolve" in segments[1:3]:
            return self._resolve(request, segments)
        raise _HubError(404, "Sorry, we can't find the page you are looking for.")

    def _models_api(self, request, segments):
        repo_id, rest = self._split_repo(segments)
        action, args = (rest[0], rest[1:]) if rest else (None, [])
        if action is None:
            return self._info(request, repo_id, None)
        if action == "revision" and args:
            return self._info(request, repo_id, unquote("/".join(args)))
        if action == "tree" and args:
            return self._tree(request, repo_id, args)
        if action == "paths-info" and args:
            return self._paths_info(request, repo_id, unquote("/".join(args)))
        raise _HubError(404, "Sorry, we can't find the page you are looking for.")

    def _split_repo(self, segments):
        """Repo ids are `org/name` or a bare legacy `name`: prefer whichever exists."""
        if len(segments) >= 2 and self.store.has_repo(f"{segments[0]}/{segments[1]}"):
            return f"{segments[0]}/{segments[1]}", segments[2:]
        if self.store.has_repo(segments[0]):
            return segments[0], segments[1:]
        return "/".join(segments[:2]), segments[2:]

    def _split_revision(self, repo, segments):
        """A quoted revision is one segment; an unquoted `refs/pr/1` spans several."""
        for end in range(1, len(segments) + 1):
            candidate = unquote("/".join(segments[:end]))
            if self.store.commit(repo, candidate) is not None:
                return candidate, segments[end:]
        return unquote(segments[0]), segments[1:]

    # -- access control

    def _token(self, request):
        header = request.headers.get("Authorization")
        if header is None:
            return None
        scheme, _, token = header.strip().partition(" ")
        if scheme.lower() != "bearer" or not self.store.knows_token(token.strip()):
            raise _HubError(401, INVALID_CREDENTIALS)  # no X-Error-Code, like the Hub
        return token.strip()

    def _access(self, request, repo_id, reading_files=False):
        """The repo if this request may see it; the Hub's errors otherwise."""
        token = self._token(request)
        repo = self.store.repo(repo_id)
        granted = token is not None and self.store.granted(token, repo_id)
        if repo is None or (repo.private and not granted):
            # the Hub says 401 to anonymous callers and 404 to authenticated ones
            raise _HubError(401 if token is None else 404, "Repository not found", "RepoNotFound")
        if reading_files and repo.gated and not granted:
            raise _HubError(403, self._gated_message(repo_id, token), "GatedRepo")
        return repo

    @staticmethod
    def _gated_message(repo_id, token):
        if token is None:
            return f"Access to model {repo_id} is restricted. You must have access to it and be authenticated."
        return f"Access to model {repo_id} is restricted and you are not in the authorized list."

    def _commit(self, repo, revision):
        commit = self.store.commit(repo, revision)
        if commit is None:
            raise _HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return commit

    def _content_fault(self, request):
        fault = self.faults.take(request, lambda kind: kind in _CONTENT_KINDS and _content_fault_fits(kind, request))
        request.content_fault = fault
        return fault

    # -- model info

    def _info(self, request, repo_id, revision):
        request.route = "info"
        repo = self._access(request, repo_id)
        commit = self._commit(repo, revision or repo.default_branch)
        fault = self._content_fault(request)
        blobs = request.flag("blobs")
        siblings = [self._sibling(commit.files[p], blobs, fault) for p in sorted(commit.files)]
        return _json_response(200, self._info_payload(repo, commit, siblings))

    @staticmethod
    def _info_payload(repo, commit, siblings):
        return {
            "_id": hashlib.sha1(repo.id.encode()).hexdigest()[:24], "id": repo.id, "modelId": repo.id,
            "author": repo.id.split("/")[0] if "/" in repo.id else None, "sha": commit.sha,
            "lastModified": commit.date, "createdAt": repo.created, "private": repo.private,
            "gated": repo.gated, "disabled": False, "downloads": 0, "likes": 0, "tags": [],
            "siblings": siblings,
        }

    @staticmethod
    def _sibling(entry, blobs, fault):
        sibling = {"rfilename": entry.path}
        if blobs:
            size = _claimed_size(entry, fault)
            sibling.update(size=size, blobId=entry.oid)
            if entry.lfs:
                sibling["lfs"] = {"sha256": entry.blob.sha256, "size": size, "pointerSize": len(entry.pointer)}
        return sibling

    # -- tree and paths-info

    def _tree(self, request, repo_id, args):
        request.route = "tree"
        repo = self._access(request, repo_id)
        revision, path_segments = self._split_revision(repo, args)
        commit = self._commit(repo, revision)
        prefix = unquote("/".join(path_segments)).strip("/")
        if prefix and prefix not in commit.dirs:
            raise _HubError(404, f"{prefix} does not exist on \"{revision}\"", "EntryNotFound",
                            [("X-Repo-Commit", commit.sha)])
        fault = self._content_fault(request)
        expand = request.flag("expand")
        if fault is not None and fault.kind == "raw_tree":
            entries = list(fault.params["entries"])
        else:
            entries = self._tree_entries(commit, prefix, request.flag("recursive"), expand, fault)
        return self._page(request, entries, expand)

    def _tree_entries(self, commit, prefix, recursive, expand, fault):
        dirs = [d for d in sorted(commit.dirs) if _listed(d, prefix, recursive)]
        files = [p for p in sorted(commit.files) if _listed(p, prefix, recursive)]
        return ([self._dir_json(commit, d, expand) for d in dirs]
                + [self._file_json(commit, commit.files[p], expand, fault) for p in files])

    @staticmethod
    def _last_commit(commit):
        return {"id": commit.sha, "title": commit.title, "date": commit.date}

    def _dir_json(self, commit, path, expand):
        entry = {"type": "directory", "oid": commit.dirs[path], "size": 0, "path": path}
        if expand:
            entry["lastCommit"] = self._last_commit(commit)
        return entry

    def _file_json(self, commit, file, expand, fault):
        size = _claimed_size(file, fault)
        entry = {"type": "file", "oid": file.oid, "size": size, "path": file.path}
        if file.lfs:
            entry["lfs"] = {"oid": file.blob.sha256, "size": size, "pointerSize": len(file.pointer)}
        if expand:
            entry["lastCommit"] = self._last_commit(commit)
        return entry

    def _page(self, request, entries, expand):
        """One page of a listing; the next one is announced GitHub-style in `Link`."""
        size = min(self.page_size, EXPAND_PAGE_SIZE) if expand else self.page_size
        start = _decode_cursor(request.query.get("cursor", [""])[-1])
        headers = []
        if start + size < len(entries):
            pairs = [(k, v) for k, vs in request.query.items() if k != "cursor" for v in vs]
            pairs.append(("cursor", _encode_cursor(start + size)))
            next_url = f"{request.base_url}{request.raw_path}?{urlencode(pairs)}"
            headers.append(("Link", f'<{next_url}>; rel="next"'))
        return _json_response(200, entries[start:start + size], headers)

    def _paths_info(self, request, repo_id, revision):
        request.route = "paths-info"
        if request.method != "POST":
            raise _HubError(405, "Method not allowed")
        repo = self._access(request, repo_id)
        commit = self._commit(repo, revision)
        paths, expand = self._paths_form(request)
        fault = self._content_fault(request)
        found = []
        for path in dict.fromkeys(p.strip("/") for p in paths):
            if path in commit.files:
                found.append(self._file_json(commit, commit.files[path], expand, fault))
            elif path in commit.dirs:
                found.append(self._dir_json(commit, path, expand))
        return _json_response(200, found)

    @staticmethod
    def _paths_form(request):
        """`paths`/`expand` from a form body (what huggingface_hub sends) or a JSON body."""
        if "json" in request.headers.get("Content-Type", ""):
            data = json.loads(request.body or b"{}")
            return list(data.get("paths", [])), bool(data.get("expand", False))
        form = parse_qs(request.body.decode(), keep_blank_values=True)
        return form.get("paths", []), form.get("expand", ["false"])[-1].lower() == "true"

    # -- resolve

    def _resolve(self, request, segments):
        request.route = "resolve"
        at = segments.index("resolve")
        if request.method not in ("GET", "HEAD"):
            raise _HubError(405, "Method not allowed")
        if len(segments) < at + 3:
            raise _HubError(404, "Sorry, we can't find the page you are looking for.")
        repo = self._access(request, "/".join(segments[:at]), reading_files=True)
        revision, path_segments = self._split_revision(repo, segments[at + 1:])
        commit = self._commit(repo, revision)
        entry = commit.files.get(unquote("/".join(path_segments)))
        if entry is None:
            raise _HubError(404, "Entry not found", "EntryNotFound", [("X-Repo-Commit", commit.sha)])
        size = _claimed_size(entry, self._content_fault(request))
        if entry.lfs:
            return self._lfs_redirect(repo, commit, entry, size, request.headers.get("Range"))
        return self._small_file(request, commit, entry, size)

    def _lfs_redirect(self, repo, commit, entry, size, range_header):
        location = f"{self.cdn_endpoint}/lfs/{entry.blob.sha256}/{repo.id}/{quote(entry.path)}"
        location = self.signer.sign(location, range_header)
        return _Response(302, [
            ("Location", location), ("X-Repo-Commit", commit.sha),
            ("X-Linked-Etag", f'"{entry.blob.sha256}"'), ("X-Linked-Size", str(size)),
        ])

    @staticmethod
    def _small_file(request, commit, entry, size):
        headers = [("ETag", f'"{entry.blob.git_sha1}"'), ("X-Repo-Commit", commit.sha),
                   ("Content-Type", _content_type(entry.path))]
        response = _content_response(entry.blob.body(), request.headers.get("Range"), headers)
        if request.method == "HEAD" and response.status == 200 and size != entry.blob.size:
            response.advertised_length = size
        return response


# ---------------------------------------------------------------------------
# Routing: the CDN origin


class _CdnRouter:
    """Serves LFS bytes by sha256 at `/lfs/{sha256}/{repo}/{path}`; no auth but the URL's signature."""

    def __init__(self, store, signer):
        self.store, self.signer = store, signer

    def route(self, request):
        request.route = "cdn"
        segments = request.segments
        blob = self.store.blob(segments[1]) if len(segments) >= 3 and segments[0] == "lfs" else None
        if blob is None:
            return _error_response(404, "NoSuchKey")
        if request.method not in ("GET", "HEAD"):
            return _error_response(405, "Method not allowed")
        refusal = self.signer.refusal(request)
        if refusal is not None:
            return refusal
        name = quote(unquote(segments[-1]))
        headers = [("ETag", f'"{blob.sha256}"'), ("Content-Type", "application/octet-stream"),
                   ("Content-Disposition", f"inline; filename*=UTF-8''{name}; filename=\"{name}\";")]
        return _content_response(blob.body(), request.headers.get("Range"), headers)


# ---------------------------------------------------------------------------
# Transport faults that rewrite a response before it is sent


def _rewrite_status(fault, request, response):
    code = fault.params["code"]
    return _error_response(code, f"Simulated error {code}", headers=list(fault.params["headers"].items()))


def _rewrite_rate_limit(fault, request, response):
    seconds = fault.params["seconds"]
    if fault.params["style"] == "ratelimit":
        headers = [("RateLimit", f'"api";r=0;t={seconds}'),
                   ("RateLimit-Policy", '"fixed window";"api";q=500;w=300')]
    else:
        headers = [("Retry-After", str(seconds))]
    return _error_response(429, "Too Many Requests: you have been rate limited", headers=headers)


def _rewrite_redirect_loop(fault, request, response):
    query = f"?{request.query_string}" if request.query_string else ""
    return _Response(302, [("Location", f"{request.base_url}{request.raw_path}{query}")])


def _rewrite_ignore_range(fault, request, response):
    headers = [(k, v) for k, v in response.headers if k.lower() != "content-range"]
    return dataclasses.replace(response, status=200, headers=headers, start=0, length=response.body.size)


def _other_start(start, length, size):
    """Another offset for a range of the same length inside the body, or None if none exists."""
    for candidate in (start + length, start - length, start + 1, start - 1):
        if 0 <= candidate <= size - length and candidate != start:
            return candidate
    return None


def _rewrite_wrong_content_range(fault, request, response):
    """The served bytes match the (wrong) Content-Range, as a confused server's would."""
    size, length = response.body.size, response.length
    other = _other_start(response.start, length, size)
    if other is None:  # the range is the whole body: claim a different total instead
        claim, start = f"bytes {response.start}-{response.start + length - 1}/{size + 1}", response.start
    else:
        claim, start = f"bytes {other}-{other + length - 1}/{size}", other
    headers = [(k, claim if k.lower() == "content-range" else v) for k, v in response.headers]
    return dataclasses.replace(response, headers=headers, start=start)


def _rewrite_long_body(fault, request, response):
    # Content-Range still names the asked range; Content-Length and the body run longer
    return dataclasses.replace(response, length=response.length + fault.params["extra"])


_REWRITES = {
    "status": _rewrite_status,
    "rate_limit": _rewrite_rate_limit,
    "redirect_loop": _rewrite_redirect_loop,
    "ignore_range": _rewrite_ignore_range,
    "wrong_content_range": _rewrite_wrong_content_range,
    "long_body": _rewrite_long_body,
}
_XOR_TABLE = bytes(255 - i for i in range(256))


def _dropped_headers(fault):
    if fault is None or fault.kind != "drop_header":
        return set()
    names = fault.params["name"]
    return {n.lower() for n in ([names] if isinstance(names, str) else names)}


def _padded_chunks(body, start, end, size=COPY_CHUNK):
    """The body's bytes in [start, end), `size` at a time; past its end, zeros (for `long_body`)."""
    real_end = min(end, body.size)
    if start < real_end:
        yield from body.chunks(start, real_end, size)
    for offset in range(max(start, real_end), end, size):
        yield bytes(min(size, end - offset))


def _refusal(link):
    """The answer to a request beyond the link's `max_in_flight`."""
    if link.refuse_status == 429:
        return _error_response(429, "Too Many Requests: too many requests in flight",
                               headers=[("Retry-After", f"{link.retry_after:g}")])
    return _error_response(503, "Service Unavailable: too many requests in flight")


# ---------------------------------------------------------------------------
# HTTP: handler and servers


class _Handler(BaseHTTPRequestHandler):
    """One connection; HTTP/1.1 keep-alive, every answer framed by Content-Length."""

    server: "_Server"

    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body go out as separate writes
    server_version = "hubsim"
    sys_version = ""

    def setup(self):
        if isinstance(self.request, ssl.SSLSocket):
            # In this connection's thread, so a client that never completes it holds up no one.
            self.request.settimeout(10)
            self.request.do_handshake()
            self.request.settimeout(None)
        super().setup()
        self.server.track(self.connection)

    def finish(self):
        try:
            super().finish()
        finally:
            self.server.untrack(self.connection)

    def log_message(self, format, *args):
        pass  # quiet by default: the request log is `HubSimulator.log`

    def _handle(self):
        request = self._read_request()
        self._link = self.server.sim.link
        if self.server.origin == "api" and request.segments[:1] == ["_sim"]:
            self._link = Link()     # the control channel is never shaped
            return self._send(request, self.server.sim._control(request), None, RequestRecord("api", "", "", "", None))
        in_flight = self.server.sim._in_flight[self.server.origin]
        try:
            self._serve(request, in_flight.enter())
        finally:
            in_flight.leave()

    def _serve(self, request, in_flight):
        record = self.server.sim._log.start(request)
        if self._link.max_in_flight is not None and in_flight > self._link.max_in_flight:
            record.fault = "max_in_flight"
            return self._send(request, _refusal(self._link), None, record)
        response = self.server.router.route(request)
        fault = self.server.sim._faults.take(
            request, lambda kind: kind in _TRANSPORT_KINDS and _fault_fits(kind, request, response))
        chosen = fault or request.content_fault
        record.fault = chosen.kind if chosen else None
        self._send(request, response, fault, record)

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = _handle

    def _read_request(self):
        split = urlsplit(self.path)
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""  # read it all: keep-alive stays in step
        return _Request(self.server.origin, self.command, split.path or "/", split.query, self.headers, body,
                        scheme=self.server.scheme, peer="%s:%d" % self.client_address[:2])

    def _send(self, request, response, fault, record):
        if fault is not None and fault.kind in _REWRITES:
            response = _REWRITES[fault.kind](fault, request, response)
        if fault is not None and fault.kind == "delay":
            self.server.sim._sleep(fault.params["seconds"])
        if self._link.delay:
            self.server.sim._sleep(self._link.delay)
        self._write_head(response, _dropped_headers(fault), record)
        if request.method != "HEAD" and response.body is not None and response.length > 0:
            self._write_body(response, fault, record)

    def _write_head(self, response, dropped, record):
        length = response.length if response.advertised_length is None else response.advertised_length
        headers = [*response.headers, ("Content-Length", str(length))]
        record.status = response.status
        self.send_response(response.status)
        for name, value in headers:
            if name.lower() not in dropped:
                self.send_header(name, value)
        if "content-length" in dropped:
            self.close_connection = True  # without a length, only closing ends the body
        self.end_headers()

    def _write_body(self, response, fault, record):
        kind = fault.kind if fault is not None else None
        cut = fault.params["after_bytes"] if kind in ("stall", "reset", "short") else None
        if kind == "ignore_range":
            cut = fault.params["reset_after"]
        first = response.length if cut is None else min(cut, response.length)
        self._send_range(response.body, response.start, first, kind == "wrong_bytes", record)
        if cut is not None and cut < response.length:
            self._after_cut(fault, response, first, record)

    def _after_cut(self, fault, response, sent, record):
        if fault.kind == "stall":
            self.server.sim._sleep(fault.params["seconds"])
            if fault.params["then"] == "finish":
                return self._send_range(response.body, response.start + sent, response.length - sent, False, record)
        if fault.kind in ("reset", "ignore_range"):
            # linger 0 makes close() send RST instead of FIN
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()
        self.close_connection = True

    def _send_range(self, body, start, length, corrupt, record):
        # One pacer per response: the link's rate holds for each body on its own.
        chunk = self._link.pace_chunk()
        pacer = Pacer(self._link.rate, self.server.sim._sleep) if chunk else None
        plain = not isinstance(self.connection, ssl.SSLSocket)     # sendfile would bypass TLS
        if plain and not corrupt and isinstance(body, _FileBody) and start + length <= body.size:
            return self._sendfile(body.path, start, length, record, pacer, chunk or SENDFILE_CHUNK)
        for piece in _padded_chunks(body, start, start + length, chunk or COPY_CHUNK):
            if pacer is not None:
                pacer.before(len(piece))
            self._send_bytes(bytes(piece).translate(_XOR_TABLE) if corrupt else piece, record)

    def _sendfile(self, path, offset, count, record, pacer=None, chunk=SENDFILE_CHUNK):
        with open(path, "rb") as f:
            while count > 0:
                step = min(count, chunk)
                if pacer is not None:
                    pacer.before(step)
                record.bytes_sent += step  # counted before the client can see it
                try:
                    sent = os.sendfile(self.connection.fileno(), f.fileno(), offset, step)
                except BaseException:
                    record.bytes_sent -= step
                    raise
                record.bytes_sent -= step - sent
                if sent == 0:
                    raise ConnectionError(f"{path} is shorter than when it was added")
                offset, count = offset + sent, count - sent

    def _send_bytes(self, chunk, record):
        record.bytes_sent += len(chunk)
        try:
            self.connection.sendall(chunk)
        except BaseException:
            record.bytes_sent -= len(chunk)
            raise


class _Server(ThreadingHTTPServer):
    """One origin. Tracks its open connections so `stop()` can end keep-alive ones too."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, host, port, origin, sim, router, tls=None):
        self.origin, self.sim, self.router, self.tls = origin, sim, router, tls
        self._connections_lock = threading.Lock()
        self._connections = set()
        self.accepted = 0
        super().__init__((host, port), _Handler)

    @property
    def scheme(self):
        return "http" if self.tls is None else "https"

    @property
    def url(self):
        host, port = self.socket.getsockname()[:2]
        return f"{self.scheme}://{host}:{port}"

    def get_request(self):
        connection, address = super().get_request()
        if self.tls is None:
            return connection, address
        # The handshake waits for the handler's thread (_Handler.setup), not the accept loop.
        return self.tls.wrap_socket(connection, server_side=True, do_handshake_on_connect=False), address

    def track(self, connection):
        with self._connections_lock:
            self._connections.add(connection)
            self.accepted += 1

    def untrack(self, connection):
        with self._connections_lock:
            self._connections.discard(connection)

    def close_connections(self):
        with self._connections_lock:
            connections = list(self._connections)
        for connection in connections:
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # already gone

    def handle_error(self, request, client_address):
        error = sys.exc_info()[1]
        if isinstance(error, (ConnectionError, ssl.SSLError, TimeoutError)) or (
                isinstance(error, OSError) and self.sim._stopping.is_set()):
            return  # a client that went away or refused our certificate, a reset we made: not news
        super().handle_error(request, client_address)


# ---------------------------------------------------------------------------
# The public simulator


class HubSimulator:
    """A Hub on 127.0.0.1: repos added in process, faults injected, every request logged.

    `tokens` maps a token to `{"granted": {repo ids}}`: a granted token reads that repo if it
    is private or gated. An Authorization header with any other token is refused (401).
    """

    def __init__(self, tokens=None, page_size=DEFAULT_PAGE_SIZE, port=0, cdn_port=0, host="127.0.0.1",
                 sign_seconds=None, sign_ranges=False, link=None, tls=None, cdn_tls=None):
        self._store = _Store(tokens)
        self._tls = {"api": tls, "cdn": cdn_tls or tls}     # server-side ssl.SSLContext per origin, or None
        self.signer = UrlSigner(sign_seconds, sign_ranges)  # its fields may change while running
        self._faults = _FaultBook()
        self._log = _RequestLog()
        self.link = link or Link()      # read once per request: replace it, never mutate it
        self._in_flight = {"api": InFlight(), "cdn": InFlight()}
        self.page_size = page_size
        self._host, self._ports = host, (port, cdn_port)
        self._servers, self._urls = {}, {}
        self._threads = []
        self._cleanups = []
        self._stopping = threading.Event()

    # -- content

    def add_repo(self, repo_id, files, private=False, gated=False, branch="main", tags=()):
        """Create a repo whose `branch` points at one commit of `files`; returns the commit sha.

        `files` maps repo paths to bytes, str, or a path of a file on disk (hashed now,
        streamed later). `gated` may be True (reported as "manual"), "auto" or "manual".
        """
        return self._store.add_repo(repo_id, files, private, gated, branch, tuple(tags))

    def add_commit(self, repo_id, files, branch="main", tags=()):
        """A new commit whose tree is exactly `files`, moving (or creating) `branch`."""
        return self._store.add_commit(repo_id, files, branch, tuple(tags))

    def add_token(self, token, granted=()):
        self._store.add_token(token, granted)

    def remove_token(self, token):
        """Revoke `token`: from now on a request carrying it is refused (401)."""
        self._store.remove_token(token)

    # -- lifecycle

    def start(self):
        if self._servers:
            raise RuntimeError("simulator already started")
        self._stopping.clear()
        cdn = _Server(self._host, self._ports[1], "cdn", self, _CdnRouter(self._store, self.signer), self._tls["cdn"])
        router = _ApiRouter(self._store, self._faults, self.page_size, cdn.url, self.signer)
        api = _Server(self._host, self._ports[0], "api", self, router, self._tls["api"])
        self._servers = {"api": api, "cdn": cdn}
        self._urls = {"api": api.url, "cdn": cdn.url}  # kept after stop(), for messages
        for server in self._servers.values():
            thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02},
                                      name=f"hubsim-{server.origin}", daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def stop(self):
        self._stopping.set()  # wakes delayed and stalled requests
        for server in self._servers.values():
            server.shutdown()
            server.server_close()
            server.close_connections()
        for thread in self._threads:
            thread.join(timeout=5)
        self._servers, self._threads = {}, []
        while self._cleanups:
            self._cleanups.pop()()

    def add_cleanup(self, callback):
        """Run `callback()` at `stop()` (e.g. removing files the repos are served from)."""
        self._cleanups.append(callback)

    def __enter__(self):
        return self if self._servers else self.start()

    def __exit__(self, *exc_info):
        self.stop()

    @property
    def endpoint(self):
        """The API origin, e.g. `http://127.0.0.1:40123` (what HF_ENDPOINT should be)."""
        return self._urls["api"]

    @property
    def cdn_endpoint(self):
        return self._urls["cdn"]

    def connections(self, origin=None):
        """How many TCP connections an origin (or both) accepted: keep-alive shows as few."""
        return sum(s.accepted for o, s in self._servers.items() if origin in (None, o))

    def _sleep(self, seconds):
        self._stopping.wait(seconds)

    # -- faults and log

    def add_fault(self, fault, **params):
        """Add a Fault (or `add_fault("kind", **params)`); returns it, so `hits` can be read."""
        if isinstance(fault, str):
            fault = Fault(fault, **params)
        return self._faults.add(fault)

    def clear_faults(self):
        self._faults.clear()

    @property
    def faults(self):
        return self._faults.all()

    @property
    def log(self):
        return self._log.records()

    def clear_log(self):
        self._log.clear()

    def bytes_sent(self, origin=None, path_contains=None):
        return self._log.bytes_sent(origin, path_contains)

    # -- link shaping (vfs/testing/link.py)

    def set_link(self, link=None, **fields):
        """Shape every later response: `set_link(Link(...))` or `set_link(rate=40e6, delay=0.03)`."""
        self.link = link if link is not None else Link(**fields)
        return self.link

    def in_flight(self, origin="cdn"):
        """{"now": requests being served, "peak": the most at once since the last reset}."""
        return self._in_flight[origin].to_dict()

    def most_in_flight(self, origin="cdn"):
        return self._in_flight[origin].peak

    def reset_in_flight_peak(self):
        for gauge in self._in_flight.values():
            gauge.reset_peak()

    # -- HTTP control, for a simulator in another process

    def _control(self, request):
        action = (request.method, "/".join(request.segments[1:]))
        try:
            return self._control_action(action, request)
        except (ValueError, TypeError) as error:
            return _error_response(400, str(error))

    def _control_action(self, action, request):
        if action == ("POST", "faults"):
            return _json_response(200, {"fault": self.add_fault(Fault.from_dict(json.loads(request.body))).to_dict()})
        if action == ("GET", "faults"):
            return _json_response(200, [f.to_dict() for f in self.faults])
        if action == ("GET", "log"):
            return _json_response(200, [r.to_dict() for r in self.log])
        if action == ("GET", "bytes_sent"):
            query = {k: v[-1] for k, v in request.query.items()}
            return _json_response(200, {"bytes_sent": self.bytes_sent(query.get("origin"), query.get("path_contains"))})
        if action == ("POST", "link"):
            return _json_response(200, {"link": self.set_link(Link.from_dict(json.loads(request.body))).to_dict()})
        if action == ("GET", "link"):
            in_flight = {origin: self.in_flight(origin) for origin in self._in_flight}
            return _json_response(200, {"link": self.link.to_dict(), "in_flight": in_flight})
        if action == ("DELETE", "link/peak"):
            self.reset_in_flight_peak()
            return _json_response(200, {"ok": True})
        if action in (("DELETE", "faults"), ("DELETE", "log")):
            (self.clear_faults if action[1] == "faults" else self.clear_log)()
            return _json_response(200, {"ok": True})
        return _error_response(404, f"unknown control request {action[0]} /_sim/{action[1]}")


class SimulatorClient:
    """Drives a simulator in another process through its `/_sim/` control endpoints."""

    def __init__(self, endpoint):
        self.endpoint = endpoint.rstrip("/")
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via a proxy

    def _call(self, method, path, payload=None):
        data = None if payload is None else json.dumps(payload).encode()
        request = urllib.request.Request(f"{self.endpoint}/_sim/{path}", data=data, method=method,
                                         headers={"Content-Type": "application/json"})
        with self._opener.open(request, timeout=30) as response:
            return json.loads(response.read())

    def add_fault(self, fault, **params):
        fault = Fault(fault, **params) if isinstance(fault, str) else fault
        return self._call("POST", "faults", fault.to_dict())["fault"]

    def clear_faults(self):
        self._call("DELETE", "faults")

    @property
    def faults(self):
        return self._call("GET", "faults")

    @property
    def log(self):
        return [RequestRecord.from_dict(r) for r in self._call("GET", "log")]

    def clear_log(self):
        self._call("DELETE", "log")

    def bytes_sent(self, origin=None, path_contains=None):
        query = urlencode({k: v for k, v in (("origin", origin), ("path_contains", path_contains)) if v})
        return self._call("GET", f"bytes_sent?{query}" if query else "bytes_sent")["bytes_sent"]

    @property
    def link(self):
        return Link.from_dict(self._call("GET", "link")["link"])

    def set_link(self, link=None, **fields):
        link = link if link is not None else Link(**fields)
        return Link.from_dict(self._call("POST", "link", link.to_dict())["link"])

    def in_flight(self, origin="cdn"):
        return self._call("GET", "link")["in_flight"][origin]

    def most_in_flight(self, origin="cdn"):
        return self.in_flight(origin)["peak"]

    def reset_in_flight_peak(self):
        self._call("DELETE", "link/peak")


# ---------------------------------------------------------------------------
# Command line: python -m vfs.testing.hubsim --repo org/name=DIR


def run_until_signalled(sim):
    """Block until SIGINT or SIGTERM, then stop `sim`."""
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        while not stop.wait(0.5):
            pass
    finally:
        sim.stop()


def _parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m vfs.testing.hubsim", description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0, help="API port (0: any free port)")
    parser.add_argument("--cdn-port", type=int, default=0, help="CDN port (0: any free port)")
    parser.add_argument("--repo", action="append", default=[], metavar="ORG/NAME=DIR",
                        help="serve DIR's files (recursively) as a repo; repeatable")
    parser.add_argument("--page-size", type=int, default=DEFAULT_PAGE_SIZE, help="tree listing page size")
    parser.add_argument("--sign-seconds", type=int, default=None,
                        help="sign CDN URLs for this many seconds; the CDN refuses them after (403)")
    parser.add_argument("--sign-ranges", action="store_true",
                        help="a resolve asked with a Range header gets a URL good for that range only")
    add_shaping_arguments(parser)
    return parser.parse_args(argv)


def add_shaping_arguments(parser):
    """The link and origin-behaviour flags shared by every simulator command line."""
    _link.add_arguments(parser)
    parser.add_argument("--ignore-range", action="store_true",
                        help="the CDN answers every Range request with 200 and the whole body (as some mirrors do)")


def apply_shaping_arguments(sim, args):
    sim.set_link(_link.from_arguments(args))
    if args.ignore_range:
        sim.add_fault("ignore_range", origin="cdn")


def main(argv=None):
    args = _parse_args(argv)
    sim = HubSimulator(page_size=args.page_size, port=args.port, cdn_port=args.cdn_port,
                       sign_seconds=args.sign_seconds, sign_ranges=args.sign_ranges)
    for spec in args.repo:
        repo_id, sep, directory = spec.partition("=")
        if not sep or not Path(directory).is_dir():
            raise SystemExit(f"--repo wants ORG/NAME=DIR with an existing DIR, got {spec!r}")
        sim.add_repo(repo_id, files=repo_files(directory))
    apply_shaping_arguments(sim, args)
    sim.start()
    print(f"ready {sim.endpoint}", flush=True)
    run_until_signalled(sim)


if __name__ == "__main__":
    main()
