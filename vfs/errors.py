"""The exception hierarchy and the one errno table; imports nothing from vfs.

Every failure the daemon can meet is one of these classes. Handlers turn them into
errnos through `errno_for`, the CLI turns them into exit codes through `exit_code_for`,
so there is exactly one place that decides what a user sees.
"""

import errno


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


class NotFound(LaminaError):
    """A name that is not in the tree."""

    errno = errno.ENOENT


class ReadOnly(LaminaError):
    """Any attempt to change the filesystem."""

    errno = errno.EROFS


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
