"""Whether the Hub is worth asking: a read of uncached bytes fails at once while it is not.

Offline means offline. With `HF_HUB_OFFLINE=1` (asked), or once the Hub was found
unreachable at start (found), a remote source refuses at once with `HubUnreachable`
(EIO to the reader) instead of spending its retries and the read deadline, and the log
says so once per file: "not cached, offline". Cached bytes never come here.

Found-unreachable is not for ever: the mount probes the Hub every PROBE_SECONDS and
lets reads through again once it answers. Asked-offline stays offline until remount.

Thread rules: `HubStatus` is read from worker threads (sources) and written from the
trio thread (the probe) and resolving threads; a lock guards its fields.
"""

import logging
import socket
import threading
import urllib.parse
from collections.abc import Iterable

from . import errors

log = logging.getLogger(__name__)

PROBE_SECONDS = 2.0         # how often an unreachable Hub is tried again
PROBE_TIMEOUT = 3.0         # a connect that takes longer counts as unreachable


class HubStatus:
    def __init__(self, asked: bool = False):
        self.asked = asked
        self._found = False
        self._told: set[str] = set()        # files whose refusal was logged already
        self._lock = threading.Lock()

    @property
    def offline(self) -> bool:
        return self.asked or self._found

    def found_unreachable(self) -> None:
        with self._lock:
            if self._found or self.asked:
                return
            self._found = True
        log.warning("the Hub is unreachable: reads of uncached bytes fail at once until it answers again")

    def found_reachable(self) -> None:
        with self._lock:
            if not self._found:
                return
            self._found = False
            self._told.clear()
        log.info("the Hub answers again: uncached bytes are fetched again")

    def refuse_if_offline(self, describe: str) -> None:
        """Raise HubUnreachable (EIO) for a fetch of `describe` while offline; log once per file."""
        if not self.offline:
            return
        why = "HF_HUB_OFFLINE is set" if self.asked else "the Hub is unreachable"
        with self._lock:
            first = describe not in self._told
            self._told.add(describe)
        if first:
            log.error("read: %s: not cached, offline (%s)", describe, why)
        error = errors.HubUnreachable(f"{describe}: not cached, offline ({why})")
        errors.REPORTED.add(error)      # the line above is the one line for this file
        raise error


def hub_answers(endpoint: str, proxies: Iterable[tuple[str, str]] = (), timeout: float = PROBE_TIMEOUT) -> bool:
    """Whether a TCP connection to the Hub (or the proxy in front of it) opens in time."""
    proxy = dict(proxies).get(urllib.parse.urlsplit(endpoint).scheme)
    if proxy and "://" not in proxy:
        proxy = "http://" + proxy
    parts = urllib.parse.urlsplit(proxy or endpoint)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        socket.create_connection((parts.hostname, port), timeout=timeout).close()
    except OSError:
        return False
    return True
