"""When to try a remote call again, and how long to wait first: shared by hub and fetch."""

import re

RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
MAX_WAIT = 60.0
_RATELIMIT_T = re.compile(r"\bt=(\d+)")


def backoff(attempt, hinted=None):
    """Seconds before retry `attempt`: the server's hint when it gave one, else exponential."""
    if hinted is not None:
        return min(hinted, MAX_WAIT)
    return min(0.25 * (2 ** attempt), 8.0)


def server_hint(headers):
    """Seconds the server asked us to wait (`Retry-After: N` or `RateLimit: ...;t=N`), or None."""
    value = (headers.get("retry-after") or "").strip()
    if value.isdigit():
        return float(value)
    match = _RATELIMIT_T.search(headers.get("ratelimit") or "")
    return float(match.group(1)) if match else None
