"""The daemon's counters: plain numbers bumped where work happens, turned into Prometheus metrics on a scrape.

Why plain numbers: measured here, a prometheus_client `Counter.labels(...).inc()` costs
~1.9 us and a `Histogram.observe` ~0.9 us (each takes a lock), an integer `+=` in a
dict ~0.07 us. A FUSE read served from memory costs tens of microseconds in all, so
the hot path only bumps integers; `exposition` reads them when /metrics is asked and
builds the metric families with prometheus_client, which writes the text format.

Threads: counters of FUSE operations, bytes served, the read histogram, evictions and
verification failures are written only by the trio thread (no lock: one writer).
Fetch counters are written by worker threads and so take `_fetch_lock`, which costs
nothing next to an HTTP request. A scrape copies them under that lock.

One mount per process, so one `STATS` per process: the hot path reaches it as a module
global, without threading a handle through every constructor.
"""

import bisect
import threading
from collections import defaultdict
from collections.abc import Iterator, Sequence

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

READ_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
                0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
FIRST_BYTE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
SOURCES = ("block_buffers", "cache_disk", "network", "local_files")
# What generate_latest writes; every Prometheus version reads it.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Histogram:
    """Fixed buckets, plain counts: `observe` is a bisect and two additions."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: Sequence[float]):
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)      # the last one is +Inf
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value

    def copy(self) -> "Histogram":
        other = Histogram(self.bounds)
        other.counts, other.total = list(self.counts), self.total
        return other

    def family(self, name: str, documentation: str) -> HistogramMetricFamily:
        cumulative, buckets = 0, []
        for bound, count in zip((*map(str, self.bounds), "+Inf"), self.counts):
            cumulative += count
            buckets.append((bound, cumulative))
        return HistogramMetricFamily(name, documentation, buckets=buckets, sum_value=self.total)


class Stats:
    """Every counter of one daemon (see the module docstring for who writes what)."""

    def __init__(self) -> None:
        self.fuse_ops: defaultdict[str, int] = defaultdict(int)
        self.fuse_errors: defaultdict[tuple[str, str], int] = defaultdict(int)
        self.served: dict[str, int] = dict.fromkeys(SOURCES, 0)
        self.read_seconds = Histogram(READ_BUCKETS)
        self.evictions = 0
        self.verification_failures = 0
        self._fetch_lock = threading.Lock()
        self._requests: defaultdict[tuple[str, str], int] = defaultdict(int)
        self._received = 0
        self._retries = 0
        self._first_byte = Histogram(FIRST_BYTE_BUCKETS)

    # -- worker threads (fetch.py) ---------------------------------------------------------

    def fetch_answered(self, method: str, status: str, first_byte_seconds: float | None = None) -> None:
        """One HTTP request to the origin ended in `status` ("error" when no answer came)."""
        with self._fetch_lock:
            self._requests[method, status] += 1
            if first_byte_seconds is not None:
                self._first_byte.observe(first_byte_seconds)

    def fetch_received(self, length: int) -> None:
        with self._fetch_lock:
            self._received += length

    def fetch_retried(self) -> None:
        with self._fetch_lock:
            self._retries += 1

    def fetch_counters(self) -> tuple[dict, int, int, Histogram]:
        with self._fetch_lock:
            return dict(self._requests), self._received, self._retries, self._first_byte.copy()


STATS = Stats()


def exposition(stats: Stats, cache_used: int, cache_max: int | None, models: list[dict]) -> bytes:
    """The Prometheus text of `stats`, the cache's use and cap, and the models' reports."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector(stats, cache_used, cache_max, models))
    return generate_latest(registry)


class _Collector:
    def __init__(self, stats, cache_used, cache_max, models):
        self.stats, self.cache_used, self.cache_max, self.models = stats, cache_used, cache_max, models

    def collect(self) -> Iterator[Metric]:
        yield from self._fuse()
        yield from self._fetch()
        yield from self._cache()
        yield from self._models()

    def _fuse(self):
        stats = self.stats
        ops = CounterMetricFamily("lamina_fuse_operations", "FUSE requests handled, by operation", labels=["op"])
        for op, count in sorted(stats.fuse_ops.items()):
            ops.add_metric([op], count)
        failed = CounterMetricFamily("lamina_fuse_errors", "FUSE requests answered with an error, by operation "
                                     "and errno", labels=["op", "errno"])
        for (op, name), count in sorted(stats.fuse_errors.items()):
            failed.add_metric([op, name], count)
        served = CounterMetricFamily("lamina_read_bytes", "Bytes served to readers, by where they came from",
                                     labels=["source"])
        for source in SOURCES:
            served.add_metric([source], stats.served[source])
        yield from (ops, failed, served)
        yield stats.read_seconds.family("lamina_read_duration_seconds", "Time to answer one FUSE read")

    def _fetch(self):
        requests, received, retries, first_byte = self.stats.fetch_counters()
        family = CounterMetricFamily("lamina_fetch_requests", "HTTP requests to the origin, by method and "
                                     "status (\"error\": no answer)", labels=["method", "status"])
        for (method, status), count in sorted(requests.items()):
            family.add_metric([method, status], count)
        yield family
        yield CounterMetricFamily("lamina_fetch_received_bytes", "Body bytes received from the origin",
                                  value=received)
        yield CounterMetricFamily("lamina_fetch_retries", "Fetch attempts retried after a failure", value=retries)
        yield first_byte.family("lamina_fetch_first_byte_seconds",
                                "From sending a ranged GET to its answer's head")

    def _cache(self):
        yield GaugeMetricFamily("lamina_cache_used_bytes", "Bytes the block cache occupies on disk",
                                value=self.cache_used)
        if self.cache_max is not None:
            yield GaugeMetricFamily("lamina_cache_max_bytes", "The cache's cap (--max-size)", value=self.cache_max)
        yield CounterMetricFamily("lamina_cache_evictions", "Blobs evicted to stay under the cap or the "
                                  "free-space floor", value=self.stats.evictions)
        yield CounterMetricFamily("lamina_verification_failures", "Complete blobs whose hash did not match "
                                  "their content id (discarded, fetched again)",
                                  value=self.stats.verification_failures)

    def _models(self):
        cached = GaugeMetricFamily("lamina_model_cached_bytes", "Bytes of the model's files in the cache",
                                   labels=["model"])
        size = GaugeMetricFamily("lamina_model_size_bytes", "Bytes of the model's files", labels=["model"])
        verified = GaugeMetricFamily("lamina_model_verified", "1 when every file of the model is hashed "
                                     "against its content id", labels=["model"])
        for model in self.models:
            cached.add_metric([model["name"]], model["cached_bytes"])
            size.add_metric([model["name"]], model["size"])
            verified.add_metric([model["name"]], 1 if model["verified"] else 0)
        yield from (cached, size, verified)

