"""The exception hierarchy, the one errno table, and which failures were logged; imports nothing from vfs.

Every failure the daemon can meet is one of these classes, and every errno the
filesystem answers is one of them too (a refusal such as EROFS or ENOTDIR included).
Handlers turn them into errnos through `errno_for`, the CLI turns them into exit codes
through `exit_code_for`, so there is exactly one place that decides what a user sees.
`REPORTED` remembers which failures have had their log line already.
"""

import errno
import threading
import weakref


class LaminaError(Exception):
    """Base of every error this project raises on purpose."""

    errno = errno.EIO
    exit_code = 1


class UsageError(LaminaError):
    """Bad command-line usage."""

    exit_code = 2


class ManifestError(LaminaError):
    """An invalid models.yaml: the message names the file, the model and the field."""

    exit_code = 2

    def __init__(self, source, message, model=None, field=None):
        self.source, self.model, self.field = str(source), model, field
        where = [self.source]
        if model is not None:
            where.append(f"model {model!r}")
        if field is not None:
            where.append(f"field {field!r}")
        super().__init__(f"{': '.join(where)}: {message}")


class HubError(LaminaError):
    """The Hub answered, but not with what we need (bad answer, retries exhausted)."""


class RepoNotFound(HubError):
    """The repository does not exist (or is private and we have no valid token)."""


class RevisionNotFound(HubError):
    """The repository exists but the branch, tag or commit does not."""


class EntryNotFound(HubError):
    """The file is not in the repository at that revision."""


class AccessDenied(HubError):
    """401/403/gated: the token is missing, rejected or not allowed."""

    errno = errno.EACCES


class HubUnreachable(HubError):
    """No answer from the Hub (connection refused, DNS, timeouts)."""


class FetchError(LaminaError):
    """A byte range could not be fetched correctly (bad status, bad headers, short body)."""


class RangeIgnored(FetchError):
    """The server answered a Range request with the whole body (200): its bytes are to be read
    in one pass from the start (the block cache does that), not one range at a time."""


class IntegrityError(LaminaError):
    """Bytes did not match their content id or block checksum."""


class CacheError(LaminaError):
    """The cache directory is unusable (unknown format version, unwritable)."""


class LocalFileChanged(LaminaError):
    """A local model's file is no longer what the mount scanned (until /refresh)."""


class LocalUnreadable(LaminaError):
    """A local model's file the daemon is not allowed to read."""

    errno = errno.EACCES


class Refusal(LaminaError):
    """An answer the filesystem gives by design, not a failure: counted, never logged."""


class NotFound(Refusal):
    """A name that is not in the tree."""

    errno = errno.ENOENT


class ReadOnly(Refusal):
    """Any attempt to change the filesystem."""

    errno = errno.EROFS


class NotADirectory(Refusal):
    """A directory operation on a file."""

    errno = errno.ENOTDIR


class IsADirectory(Refusal):
    """A file operation (open) on a directory."""

    errno = errno.EISDIR


class NoSuchAttribute(Refusal):
    """An extended attribute the node does not have (ENOATTR, which is ENODATA on Linux)."""

    errno = errno.ENODATA


def errno_for(exc):
    """The errno a FUSE reader sees for `exc`; EIO for anything unexpected."""
    if isinstance(exc, LaminaError):
        return exc.errno
    if isinstance(exc, OSError) and exc.errno:
        return exc.errno
    return errno.EIO


def exit_code_for(exc):
    """The process exit code for `exc`: 2 bad usage or manifest, 1 anything else."""
    return exc.exit_code if isinstance(exc, LaminaError) else 1


class ReportedFailures:
    """The failures whose log line has been written, so that each gets one.

    One failure object reaches many readers: every reader waiting on a block's flight,
    every read of that block while the fetcher remembers the failure (fetch.RECENT_FAILURE),
    every request while a token's refusal is backed off. Whoever logs it first says so
    here; the others stay quiet. Held weakly: a failure is forgotten with its last holder.
    """

    def __init__(self):
        self._seen: weakref.WeakSet[BaseException] = weakref.WeakSet()
        self._lock = threading.Lock()       # worker threads and the trio thread both report

    def first(self, exc: BaseException) -> bool:
        """True the first time it is asked about `exc` (then log it); False after."""
        with self._lock:
            if exc in self._seen:
                return False
            self._seen.add(exc)
            return True

    def add(self, exc: BaseException) -> None:
        """`exc` was logged where it was raised (a per-file line, say): nobody logs it again."""
        with self._lock:
            self._seen.add(exc)


REPORTED = ReportedFailures()
