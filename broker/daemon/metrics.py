"""The broker's Prometheus metrics: a registry of our own, what records into it, and the
task that copies the domain's figures into it.

Theory of operation: :class:`PrometheusMetrics` is the :class:`~..metrics.Recorder`
the server, the store and the fleet follower call on the event loop when the
broker serves metrics. What every request costs (its count by request and
outcome, a fetch's latency) is kept in plain ints and lists, without the locks
prometheus_client's metrics take on each change: a few of those per fetch cost
more than the rest of the recording. The rarer events (a denial, a commit, a
connection) go to prometheus_client's metrics at once. Once a second, on the
event loop, :meth:`PrometheusMetrics.sample` publishes a copy of the per-request
figures (one tuple, replaced whole) and sets the gauges from what lives in the
broker's objects (live contexts, the audit buffer, the fleet store's heartbeat,
the key's backup); :meth:`PrometheusMetrics.sample_forever` runs it. The
scrape thread (:mod:`.scrape`) reads the registry and that published tuple
only, so it never touches a dict the event loop is changing; requests show in a
scrape up to a second after they were answered.

No label holds a name, an execution id, a uid or a value: only the request's
class, the wire error code, and the fixed enumerations of :mod:`..metrics`.
"""

from __future__ import annotations

import bisect
import itertools
import math
import time
from collections.abc import Callable, Iterator

import anyio
import anyio.abc
import anyio.to_thread
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.metrics_core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from ..audit import Audit
from ..contexts import Contexts
from ..local.peer import Peer
from ..metrics import CONNECTION_KINDS, DENIALS, Recorder
from ..protocol import Error, FetchContext, ReleaseContext, Request, Response
from ..protocol.errors import ErrorCode
from ..store.backend import Store

__all__ = ["PrometheusMetrics"]

_PREFIX = "stigmer_broker_"
#: a fetch from memory takes tens of microseconds, one that waits for the store or a
#: binary's hash milliseconds to seconds
_FETCH_BUCKETS = (25e-6, 50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 0.01, 0.025,
                  0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)
#: a durable commit is an fsync (SQLite) or a round trip (PostgreSQL): about a millisecond
_STORE_BUCKETS = (250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                  1.0, 2.5, 10.0)
_GROUP_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
_FETCH_BOUNDS = (*_FETCH_BUCKETS, math.inf)
_FETCH_LE = (*(repr(float(bound)) for bound in _FETCH_BUCKETS), "+Inf")  # as "le" says them
_REQUESTS_HELP = "Requests answered, by request and outcome (ok, or the error code sent)"
_FETCH_HELP = ("Fetch latency from the request read to the reply written: path=fast answered "
               "from memory at once, path=task answered by a task (a store read, a process "
               "attested, a bounded use committed)")

#: what a scrape reads of the per-request figures: ((op, outcome, count)...), and for the
#: fast and the task path (per-bucket counts, sum)
_Published = tuple[tuple[tuple[str, str, int], ...], tuple[tuple[tuple[int, ...], float], ...]]


class _Latency:
    """A histogram kept by the event loop alone: counts per bucket (not cumulative)."""

    __slots__ = ("counts", "total")

    def __init__(self) -> None:
        self.counts = [0] * len(_FETCH_BOUNDS)
        self.total = 0.0


class _PerRequest(Collector):
    """The requests counter and the fetch histogram, from what the loop last published."""

    def __init__(self, metrics: PrometheusMetrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        requests, fetch = self._metrics.published  # one read of a tuple the loop replaces
        counter = CounterMetricFamily(_PREFIX + "requests", _REQUESTS_HELP,
                                      labels=("op", "outcome"))
        for op, outcome, count in requests:
            counter.add_metric((op, outcome), count)
        yield counter
        histogram = HistogramMetricFamily(_PREFIX + "fetch_seconds", _FETCH_HELP,
                                          labels=("path",))
        for path, (counts, total) in zip(("fast", "task"), fetch, strict=True):
            histogram.add_metric((path,), list(zip(_FETCH_LE, itertools.accumulate(counts),
                                                   strict=True)), total)
        yield histogram


class PrometheusMetrics(Recorder):
    """The recorder of a broker that serves metrics, and the registry it fills."""

    __slots__ = ("_backup_at", "_commit_s", "_connections", "_denials", "_evictions",
                 "_failed", "_fetch_s", "_group", "_key_made_at", "_notice_at", "_ok",
                 "_refused", "_write_s", "audit_age", "audit_buffered", "backup_age",
                 "fleet_age", "key_age", "live_contexts", "live_grants", "live_tokens",
                 "notice_age", "published", "registry")

    def __init__(self) -> None:
        self.registry = registry = CollectorRegistry()
        ProcessCollector(registry=registry)  # memory, open files, CPU: of this process

        def gauge(name: str, help_: str) -> Gauge:
            return Gauge(_PREFIX + name, help_, registry=registry)

        # kept by the loop alone (see the module's docstring), published by sample()
        self._ok: dict[type, int] = {}
        self._failed: dict[tuple[type, str], int] = {}
        self._fetch_s = (_Latency(), _Latency())
        self.published: _Published
        self._publish()
        registry.register(_PerRequest(self))
        connections = Gauge(
            _PREFIX + "connections", "Open connections, by who they are from: the broker's "
            "owner, a runner-group member, or another admitted uid (root)", ("kind",),
            registry=registry)
        self._connections = {kind: connections.labels(kind=kind) for kind in CONNECTION_KINDS}
        self._evictions = Counter(_PREFIX + "evictions", "Idle or unfinished connections "
                                  "cut to make room for new ones", registry=registry)
        self._refused = Counter(_PREFIX + "connections_refused", "Connections turned away "
                                "for want of room (none could be evicted)", registry=registry)
        denials = Counter(
            _PREFIX + "denials", "Peers refused, by cause: token (not valid), grant (not "
            "granted to the process), admin_only (an owner's request from a runner), uid (may "
            "not connect), auth_failures (connection cut after repeated refusals)",
            ("cause",), registry=registry)
        self._denials = {cause: denials.labels(cause=cause) for cause in DENIALS}
        self._write_s = Histogram(
            _PREFIX + "store_write_seconds", "Store writes, from asking for one to its "
            "commit: the wait for its turn, its statements and the commit",
            buckets=_STORE_BUCKETS, registry=registry)
        self._commit_s = Histogram(_PREFIX + "store_commit_seconds", "Store COMMITs",
                                   buckets=_STORE_BUCKETS, registry=registry)
        self._group = Histogram(
            _PREFIX + "store_commit_writes", "Writes per COMMIT (SQLite's group commit: "
            "writes that queued while another committed share the next one)",
            buckets=_GROUP_BUCKETS, registry=registry)
        self.live_contexts = gauge("live_contexts", "Live contexts in this broker's memory "
                                   "(a fleet broker's: those it has cached)")
        self.live_tokens = gauge("live_tokens", "Usable tokens of the live contexts in "
                                 "memory")
        self.live_grants = gauge("live_grants", "Usable runner grants of the live contexts "
                                 "in memory")
        self.audit_buffered = gauge("audit_buffered_records", "Audit records "
                                    "buffered, not yet written to the store")
        self.audit_age = gauge("audit_oldest_buffered_age_seconds", "Age of the oldest "
                               "audit record not yet written to the store (0: none)")
        self.fleet_age = gauge("fleet_store_age_seconds", "Seconds since the shared store "
                               "last answered the heartbeat (0 for a store of one broker); "
                               "past --stale-after, no context is served")
        self.notice_age = gauge("fleet_last_notice_age_seconds", "Seconds since another "
                                "broker's last notice was heard through the shared store "
                                "(+Inf: none since start)")
        self.backup_age = gauge("key_backup_age_seconds", "Seconds since the current master "
                                "key was exported with `key export` (+Inf: never, or not "
                                "since the last rotation)")
        self.key_age = gauge("key_age_seconds", "Seconds since the current master key was "
                             "made or rotated in (+Inf: the store does not say)")
        self._notice_at: float | None = None
        self._backup_at: float | None = None
        self._key_made_at: float | None = None

    # ------------------------------------------------------------- the recorder

    def answered(self, request: Request, reply: Response, peer: Peer, started: float, *,
                 waited: bool) -> None:
        kind = type(request)
        if kind is FetchContext:
            seconds = time.perf_counter() - started
            latency = self._fetch_s[waited]
            latency.counts[bisect.bisect_left(_FETCH_BOUNDS, seconds)] += 1
            latency.total += seconds
        if type(reply) is not Error:
            self._ok[kind] = self._ok.get(kind, 0) + 1
            return
        outcome = reply.code
        self._failed[kind, outcome] = self._failed.get((kind, outcome), 0) + 1
        if outcome == ErrorCode.PERMISSION_DENIED:
            if request.admin and not peer.admin:
                self._denials["admin_only"].inc()
            elif kind is FetchContext or kind is ReleaseContext:
                self._denials["grant"].inc()
        elif outcome == ErrorCode.UNAUTHENTICATED:
            self._denials["token"].inc()

    def connection_opened(self, kind: str) -> None:
        self._connections[kind].inc()

    def connection_closed(self, kind: str) -> None:
        self._connections[kind].dec()

    def evicted(self) -> None:
        self._evictions.inc()

    def refused(self) -> None:
        self._refused.inc()

    def denied(self, cause: str) -> None:
        self._denials[cause].inc()

    def store_written(self, seconds: float) -> None:
        self._write_s.observe(seconds)

    def store_committed(self, seconds: float, writes: int) -> None:
        self._commit_s.observe(seconds)
        self._group.observe(writes)

    def notice_heard(self) -> None:
        self._notice_at = time.monotonic()

    # ------------------------------------------------------------- the gauges

    def sample(self, contexts: Contexts, audit: Audit, store: Store, *,
               stale_after: float) -> None:
        """Publish the per-request figures and set the gauges from the broker's objects
        (on the event loop, which owns them)."""
        self._publish()
        index = contexts.index
        live, tokens = index.counts()
        now = index.clock()
        self.live_contexts.set(live)
        self.live_tokens.set(tokens)
        self.live_grants.set(sum(1 for c in index.by_execution.values()
                                 if c.grant is not None and c.grant.usable(now)))
        self.audit_buffered.set(audit.pending)
        oldest = audit.oldest_pending_at
        self.audit_age.set(0.0 if oldest is None else max(time.time() - oldest, 0.0))
        monotonic = time.monotonic()
        self.fleet_age.set(max(monotonic - (store.fresh_until() - stale_after), 0.0)
                           if store.shared else 0.0)
        self.notice_age.set(math.inf if self._notice_at is None
                            else monotonic - self._notice_at)
        self.backup_age.set(math.inf if self._backup_at is None
                            else max(time.time() - self._backup_at, 0.0))
        self.key_age.set(math.inf if self._key_made_at is None
                         else max(time.time() - self._key_made_at, 0.0))

    def _publish(self) -> None:
        requests = [(kind.__name__, "ok", n) for kind, n in self._ok.items()]
        requests += [(kind.__name__, outcome, n)
                     for (kind, outcome), n in self._failed.items()]
        self.published = (tuple(requests), tuple((tuple(latency.counts), latency.total)
                                                 for latency in self._fetch_s))

    def backed_up(self, at: float | None) -> None:
        """When the current master key was last exported (None: not since it was made)."""
        self._backup_at = at

    async def sample_forever(self, contexts: Contexts, audit: Audit, store: Store, *,
                             stale_after: float, backed_up_at: Callable[[], float | None],
                             key_made_at: Callable[[], float | None] = lambda: None,
                             every: float = 1.0, backup_every: float = 30.0,
                             task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
                             ) -> None:
        """Run until cancelled: :meth:`sample` every ``every`` seconds; read the key's
        backup record (a file: in a worker thread) every ``backup_every``. Started once
        the first sample is in (a scrape never sees the gauges unset)."""
        next_backup = time.monotonic()
        while True:
            if time.monotonic() >= next_backup:
                next_backup = time.monotonic() + backup_every
                self.backed_up(await anyio.to_thread.run_sync(backed_up_at))
            self._key_made_at = key_made_at()
            self.sample(contexts, audit, store, stale_after=stale_after)
            task_status.started()
            task_status = anyio.TASK_STATUS_IGNORED
            await anyio.sleep(every)
