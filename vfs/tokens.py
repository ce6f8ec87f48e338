"""The Hub token as it is now: a rotated token file is picked up without a remount, and the
Hub's refusals of a token are backed off so that many readers never become a retry storm.

Where the token comes from is huggingface_hub's order, decided once by settings.py:
`HF_TOKEN` (fixed for the life of the process: an environment cannot change under a
running program), else the file `HF_TOKEN_PATH` names, else `$HF_HOME/token`.

A token file is watched cheaply: `current()` stats it (one system call, no read) and
reads it again only when its inode, size, mtime or ctime changed, so `huggingface-cli
login`, an editor, or a secret manager replacing the file by rename are all seen by the
next request. A file found empty keeps the token read before it (a writer truncates, then
writes: the moment between must not turn a reader's request anonymous); a file that is
gone means no token, as huggingface_hub reads it.

`RefusalBackoff` remembers, per token and repository, that the Hub refused it (401/403):
the next request for that pair waits 1 s, then 2, 4, ... up to MAX_BACKOFF, and reads in
between fail at once with the very error of the last refusal (so it is logged once, not
once per reader). A new token is a new pair: it is tried at once.

Concurrency: each object has one lock, held only around its dictionary or fields, never
across a system call that can block for long (a stat or a read of a small local file is
done outside it; two threads may read a changed file at once and agree).
"""

import hashlib
import os
import threading
import time
from pathlib import Path

MAX_BACKOFF = 30.0


class TokenSource:
    """The token to send now: the fixed one, or the token file's current content."""

    def __init__(self, fixed: str | None = None, path: Path | None = None):
        self._fixed = fixed or None
        self._path = None if fixed is not None else path
        self._lock = threading.Lock()
        self._seen: tuple[int, int, int, int, int] | None = None    # stat key of the file the token was read from
        self._token: str | None = None

    def current(self) -> str | None:
        if self._path is None:
            return self._fixed
        key = _stat_key(self._path)
        with self._lock:
            if key == self._seen:
                return self._token
        token = _read_token(self._path) if key is not None else None
        with self._lock:
            if key is not None and token is None:
                return self._token      # empty: a writer is between truncate and write
            self._seen, self._token = key, token
            return token


def _stat_key(path: Path) -> tuple[int, int, int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _read_token(path: Path) -> str | None:
    try:
        return Path(path).read_text().strip() or None
    except (OSError, UnicodeDecodeError):
        return None


def fingerprint(token: str | None) -> str:
    """A short name for a token that is safe to keep in memory keys and to log: never the token."""
    if not token:
        return "anonymous"
    return hashlib.sha256(token.encode()).hexdigest()[:12]


class RefusalBackoff:
    """Per (token, repository): when the Hub may be asked again after refusing, and its refusal."""

    def __init__(self, first: float = 1.0, limit: float = MAX_BACKOFF):
        self.first, self.limit = first, limit
        self._lock = threading.Lock()
        # (fingerprint, repo) -> (ask again at, current wait, error)
        self._refused: dict[tuple[str, str], tuple[float, float, Exception]] = {}

    def refusal(self, token: str | None, repo: str) -> Exception | None:
        """The Hub's last refusal of this pair while it must not be asked again, else None."""
        key = (fingerprint(token), repo)
        with self._lock:
            entry = self._refused.get(key)
        if entry is None or time.monotonic() >= entry[0]:
            return None
        return entry[2]

    def refused(self, token: str | None, repo: str, error: Exception) -> None:
        """The Hub refused this pair just now: double the wait before it is asked again."""
        key = (fingerprint(token), repo)
        with self._lock:
            previous = self._refused.get(key)
            wait = self.first if previous is None else min(previous[1] * 2, self.limit)
            self._refused[key] = (time.monotonic() + wait, wait, error)

    def accepted(self, token: str | None, repo: str) -> None:
        key = (fingerprint(token), repo)
        with self._lock:
            self._refused.pop(key, None)
