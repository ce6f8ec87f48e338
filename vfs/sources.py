"""Where a blob's missing bytes come from: the Hub, or a copy already in the HF cache.

A source is blocking (it runs in worker threads) and knows nothing of blocks or presence.
`fetch(start, length)` returns the bytes; `fetch_into(start, view)` fills a caller's
buffer with them exactly (no copy on the way), or raises. A source whose server ignores
Range says so (`ignores_range()`, non-blocking) and offers `open_whole_body(start, size)`,
its bytes from `start` to the end in one pass.
"""

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

from .fetch import received
from .snapshots import repo_slug

if TYPE_CHECKING:
    from .blockcache import BlobHandle, WholeBody
    from .fetch import RangeFetcher
    from .offline import HubStatus
    from .tree import FileRef

log = logging.getLogger(__name__)


class RemoteSource:
    """A Hub file's bytes, fetched by HTTP range reads."""

    def __init__(self, fetcher: "RangeFetcher", url: str, describe: str, hub_status: "HubStatus | None" = None):
        self.fetcher, self.url, self.describe = fetcher, url, describe
        self.hub_status = hub_status        # offline.HubStatus: refuse at once while offline

    def fetch(self, start: int, length: int) -> bytes | bytearray:
        self._refuse_if_offline()
        # A reader's first touch: from a server that ignores Range it waits for the one pass.
        return self.fetcher.read_range(self.url, start, length, self.describe, skip_whole=False)

    def fetch_into(self, start: int, view: memoryview) -> None:
        self._refuse_if_offline()
        self.fetcher.read_range_into(self.url, start, view, self.describe)

    def ignores_range(self) -> bool:
        return self.fetcher.ignores_range(self.url)

    def request_budget(self) -> tuple[int, int]:
        """(part size, requests) a read-ahead of this file should keep asked for (readahead.py)."""
        return self.fetcher.request_budget(self.url)

    def open_whole_body(self, start: int, size: int) -> "WholeBody":
        self._refuse_if_offline()
        return self.fetcher.open_whole_body(self.url, size, start, self.describe)

    def prepare(self) -> None:
        """Follow the Hub's redirect and connect to where it points now, so a first read
        costs one request on an open connection, not a resolve and a connect as well."""
        if self.hub_status is not None and self.hub_status.offline:
            return              # nothing to resolve; the first read is refused at once
        self.fetcher.prepare(self.url)

    def _refuse_if_offline(self) -> None:
        if self.hub_status is not None:
            self.hub_status.refuse_if_offline(self.describe)


class HfCacheSource:
    """Bytes from a blob huggingface_hub already downloaded, falling back to the Hub.

    The copy is not trusted blindly: blocks copied from it are hashed with the rest of
    the blob, and once a blob built from it fails verification, the Hub is used instead.
    """

    def __init__(self, path: str | os.PathLike[str], remote: RemoteSource, blob: "BlobHandle"):
        self.path, self.remote, self.blob = Path(path), remote, blob
        self.describe = remote.describe

    def prepare(self) -> None:
        pass            # local bytes: nothing to resolve

    def ignores_range(self) -> bool:
        return bool(self.blob.failed_verifications) and self.remote.ignores_range()

    def open_whole_body(self, start: int, size: int) -> "WholeBody":
        return self.remote.open_whole_body(start, size)

    def fetch(self, start: int, length: int) -> bytearray:
        return received(length, lambda view: self.fetch_into(start, view))

    def fetch_into(self, start: int, view: memoryview) -> None:
        if self.blob.failed_verifications:
            return self.remote.fetch_into(start, view)
        view = memoryview(view).cast("B")
        try:
            with open(self.path, "rb") as local:
                got = os.preadv(local.fileno(), [view], start)
        except OSError as exc:
            log.warning("%s: Hugging Face cache copy unreadable (%s); using the Hub", self.describe, exc.strerror)
            got = 0
        if got != len(view):
            self.remote.fetch_into(start, view)


def hf_cached_blob(hf_hub_cache: str | os.PathLike[str], ref: "FileRef") -> Path | None:
    """The path of `ref`'s bytes in the Hugging Face cache, if a copy of the right size is there."""
    algo, _, digest = ref.content_id.partition(":")
    if algo != "sha256":
        return None       # huggingface_hub names small files by git sha1 only inside refs, skip them
    candidate = Path(hf_hub_cache) / repo_slug(ref.repo) / "blobs" / digest
    try:
        return candidate if candidate.stat().st_size == ref.size else None
    except OSError:
        return None
