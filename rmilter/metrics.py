"""What the filter does, counted: the Prometheus metrics of one rmilter process (issue 14).

``Metrics`` owns a ``prometheus_client`` registry of its own (never the library's global
one, so tests and two services in one process do not mix) and is fed from three seams:

- the pipeline: ``observe_result`` sees every check result with its seconds,
  ``message_done`` every finished message with its verdict and summary line;
- the shared failover loop (``rmilter.backends.upstream``): ``watch_runtime`` hooks an
  observer onto every server list of a configuration generation, which reports each
  attempt's latency and error and each server marked dead;
- what is true *now* (connections, messages in flight, spool bytes, PROGRESS packets and
  bad frames counted by the milter factory as plain integers, servers alive, the config
  generation) is read when Prometheus scrapes, by ``StateCollector``: it costs nothing per
  message.

Worker processes (issue 13): counters and histograms are ordinary ``prometheus_client``
metrics, so under its multiprocess mode (``PROMETHEUS_MULTIPROC_DIR`` set before the
workers start, the registry replaced by a ``MultiProcessCollector`` in the process that
serves ``/metrics``) every worker writes them to its own file and the scrape sums them;
``StateCollector``'s values are per process and would be published the same way as
``livesum`` gauges refreshed once a second.  No label names a process, so one worker or
many give the same series.
"""
from __future__ import annotations

import collections
from typing import Any, Deque, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple

from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from rmilter.verdict import Action, Check, CheckResult, Quarantine, Verdict, deciding_result

#: final actions a message can end with (``quarantine``: accepted into the MTA's hold queue)
ACTIONS = ("accept", "reject", "tempfail", "discard", "quarantine")
#: seconds: from a cached answer to a slow scan
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
#: Rspamd scores: ham below 0, the usual action thresholds 4 to 15, obvious spam above
SCORE_BUCKETS = (-10.0, -5.0, -1.0, 0.0, 1.0, 2.0, 4.0, 6.0, 8.0, 10.0, 15.0, 20.0, 30.0, 50.0)
#: the checks whose backend is Redis, and the role their fail-open events are counted under
REDIS_ROLES: Mapping[Check, str] = {
    Check.GREYLIST: "greylist",
    Check.RATELIMIT: "limits",
    Check.REPLIES: "replies",
    Check.COPIES: "copies",
}
#: skip reasons are constants of the code; past this many per check the rest count as "other"
MAX_SKIP_REASONS = 32
#: the milter engine's ProtocolError subclasses by the kind label they are counted under
PROTOCOL_ERROR_KINDS: Mapping[str, str] = {
    "FrameError": "frame",
    "UnknownCodeError": "unknown_code",
    "MalformedPayloadError": "malformed_payload",
    "NegotiationError": "negotiation",
}
HISTORY_MINUTES = 60
RECENT_SUMMARIES = 50


def final_action(verdict: Verdict) -> str:
    """The action label of a finished message: quarantine is an accept with a Quarantine edit."""
    action = verdict.action
    if action is Action.ACCEPT or action is Action.CONTINUE:
        for edit in verdict.edits:
            if type(edit) is Quarantine:
                return "quarantine"
        return "accept"
    return action.value


def outcome(result: CheckResult) -> str:
    """``pass``, ``act`` (a verdict or edits), ``skipped``, ``failed_open`` or ``failed`` (a verdict)."""
    if result.skipped:
        return "skipped"
    if result.failed:
        return "failed" if result.demands_verdict else "failed_open"
    if result.demands_verdict or result.edits:
        return "act"
    return "pass"


def is_timeout(reason: str) -> bool:
    """The failover loop's reasons are text; the clients say "timeout" or "timed out" for deadlines."""
    lowered = reason.lower()
    return "timeout" in lowered or "timed out" in lowered


class UpstreamMetrics:
    """The observer ``rmilter.backends.upstream.UpstreamList`` reports to, for one backend."""

    __slots__ = ("metrics", "backend")

    def __init__(self, metrics: "Metrics", backend: str) -> None:
        self.metrics = metrics
        self.backend = backend

    def attempt_ended(self, server: str, seconds: float, error: Optional[str]) -> None:
        self.metrics.attempt_ended(self.backend, server, seconds, error)

    def marked_dead(self, server: str) -> None:
        self.metrics.server_marked_dead.labels(self.backend, server).inc()


class Metrics:
    """Every metric of the process, and the short history the status page draws."""

    def __init__(self, clock: Any, registry: Optional[CollectorRegistry] = None, *,
                 process_collector: bool = True) -> None:
        #: IReactorTime: the minute buckets of the status page
        self.clock = clock
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        r = self.registry
        if process_collector:
            ProcessCollector(registry=r)
        self.messages = Counter("rmilter_messages_total", "Messages finished, by final action and deciding check",
                                ["action", "check"], registry=r)
        self.check_results = Counter("rmilter_check_results_total", "Check results by outcome",
                                     ["check", "outcome"], registry=r)
        self.check_skips = Counter("rmilter_check_skipped_total", "Checks not run, by reason",
                                   ["check", "reason"], registry=r)
        self.check_seconds = Histogram("rmilter_check_duration_seconds", "Time a check took",
                                       ["check"], buckets=LATENCY_BUCKETS, registry=r)
        self.backend_seconds = Histogram("rmilter_backend_request_duration_seconds",
                                         "Time of one attempt on one backend server",
                                         ["backend", "server"], buckets=LATENCY_BUCKETS, registry=r)
        self.backend_errors = Counter("rmilter_backend_errors_total", "Failed attempts on a backend server",
                                      ["backend", "server", "kind"], registry=r)
        self.server_marked_dead = Counter("rmilter_backend_marked_dead_total",
                                          "Times a server was marked dead for dead_time",
                                          ["backend", "server"], registry=r)
        self.redis_fail_open = Counter("rmilter_redis_fail_open_total",
                                       "Redis trouble answered by letting the message through",
                                       ["role"], registry=r)
        self.rspamd_actions = Counter("rmilter_rspamd_actions_total", "Rspamd's action per scan",
                                      ["action"], registry=r)
        self.rspamd_score = Histogram("rmilter_rspamd_score", "Rspamd's score per scan",
                                      buckets=SCORE_BUCKETS, registry=r)
        self.viruses = Counter("rmilter_viruses_found_total", "Messages clamd found a virus in", registry=r)
        self.dkim = Counter("rmilter_dkim_signatures_total", "DKIM signatures made", registry=r)
        self.dkim_failures = Counter("rmilter_dkim_failures_total", "DKIM signing that failed", registry=r)
        self.greylist = Counter("rmilter_greylist_total", "Greylisting decisions", ["result"], registry=r)
        self.ratelimit_refusals = Counter("rmilter_ratelimit_refusals_total", "Recipients refused by a rate limit",
                                          registry=r)
        self.reloads = Counter("rmilter_config_reloads_total", "Configuration reloads", ["result"], registry=r)
        # label children made once: .labels() per message would cost a dict lookup under a lock
        self._skip_reasons: Dict[Check, Dict[str, Any]] = {}
        self._outcomes: Dict[Tuple[Check, str], Any] = {}
        self._durations: Dict[Check, Any] = {}
        self._message_series: Dict[Tuple[str, str], Any] = {}
        self._greylist = {name: self.greylist.labels(name) for name in ("deferred", "passed", "failed_open")}
        for result in ("ok", "failed"):
            self.reloads.labels(result)
        #: (minute, {action: count}) for the last hour, oldest first
        self.minutes: Deque[Tuple[int, Dict[str, int]]] = collections.deque()
        #: the last summary lines, oldest first
        self.recent: Deque[str] = collections.deque(maxlen=RECENT_SUMMARIES)

    # -- the pipeline's seams ----------------------------------------------------------------
    def observe_result(self, result: CheckResult, seconds: float) -> None:
        """A ``rmilter.pipeline.ResultObserver``: one check's result and the time it took."""
        check = result.check
        kind = outcome(result)
        counter = self._outcomes.get((check, kind))
        if counter is None:
            counter = self._outcomes[(check, kind)] = self.check_results.labels(check.value, kind)
        counter.inc()
        if kind == "skipped":
            self._skipped(check, result.summary)
            return
        duration = self._durations.get(check)
        if duration is None:
            duration = self._durations[check] = self.check_seconds.labels(check.value)
        duration.observe(seconds)
        if kind == "failed_open" and check in REDIS_ROLES:
            self.redis_fail_open.labels(REDIS_ROLES[check]).inc()
        if check is Check.SPAM:
            self._spam(result)
        elif check is Check.VIRUS:
            if result.demands_verdict and "virus_name" in result.details:
                self.viruses.inc()
        elif check is Check.DKIM:
            signatures = result.details.get("dkim_signatures")
            if signatures:
                self.dkim.inc(len(signatures))  # type: ignore[arg-type]
            elif result.summary.endswith("internal failure"):
                self.dkim_failures.inc()
        elif check is Check.GREYLIST:
            if result.failed:
                self._greylist["failed_open"].inc()
            elif result.demands_verdict:
                self._greylist["deferred"].inc()
            else:
                self._greylist["passed"].inc()
        elif check is Check.RATELIMIT and result.demands_verdict:
            self.ratelimit_refusals.inc()

    def _skipped(self, check: Check, reason: str) -> None:
        reasons = self._skip_reasons.setdefault(check, {})
        counter = reasons.get(reason)
        if counter is None:
            if len(reasons) >= MAX_SKIP_REASONS:
                reason = "other"
                counter = reasons.get(reason)
            if counter is None:
                counter = reasons[reason] = self.check_skips.labels(check.value, reason)
        counter.inc()

    def _spam(self, result: CheckResult) -> None:
        action = result.details.get("spam_action")
        if result.failed or action is None:
            return
        if result.details.get("spam_dkim_only"):
            return  # a signing request, not a verdict on the message
        self.rspamd_actions.labels(str(action)).inc()
        score = result.details.get("spam_score")
        if isinstance(score, (int, float)):
            self.rspamd_score.observe(score)

    def message_done(self, message: Any, results: Sequence[CheckResult], verdict: Verdict,
                     summary: Optional[str]) -> None:
        """A ``rmilter.pipeline.MessageObserver``: the message ended with ``verdict``."""
        action = final_action(verdict)
        decider = deciding_result(results) if verdict.action is not Action.ACCEPT else None
        check = decider.check.value if decider is not None else "none"
        series = self._message_series.get((action, check))
        if series is None:
            series = self._message_series[(action, check)] = self.messages.labels(action, check)
        series.inc()
        minute = int(self.clock.seconds() // 60)
        minutes = self.minutes
        if not minutes or minutes[-1][0] != minute:
            minutes.append((minute, {}))
            while minutes and minutes[0][0] <= minute - HISTORY_MINUTES:
                minutes.popleft()
        counts = minutes[-1][1]
        counts[action] = counts.get(action, 0) + 1
        if summary is not None:
            self.recent.append(summary)

    # -- backends ------------------------------------------------------------------------------
    def attempt_ended(self, backend: str, server: str, seconds: float, error: Optional[str]) -> None:
        self.backend_seconds.labels(backend, server).observe(seconds)
        if error is not None:
            self.backend_errors.labels(backend, server, "timeout" if is_timeout(error) else "error").inc()

    def watch_runtime(self, deps: Any) -> None:
        """Hook an observer onto every server list of a configuration generation's clients."""
        for backend, upstreams in server_lists(deps):
            upstreams.observer = UpstreamMetrics(self, backend)

    # -- the service ---------------------------------------------------------------------------
    def reload_done(self, ok: bool) -> None:
        self.reloads.labels("ok" if ok else "failed").inc()

    def per_minute(self, minutes: int = HISTORY_MINUTES) -> List[Tuple[int, Dict[str, int]]]:
        """Messages by action for each of the last ``minutes`` minutes, oldest first (gaps as zeros)."""
        now = int(self.clock.seconds() // 60)
        known = dict(self.minutes)
        return [(m, dict(known.get(m, {}))) for m in range(now - minutes + 1, now + 1)]


def server_lists(deps: Any) -> Iterator[Tuple[str, Any]]:
    """(backend label, ``UpstreamList``) for each server list of a generation's clients.

    Read by attribute, defensively: the clients own their lists, and a client that has
    none (a Sentinel role, a client rewritten without one) is simply not listed.
    """
    rspamd = getattr(deps, "rspamd", None)
    if rspamd is not None:
        for backend, name in (("rspamd", "upstreams"), ("rspamd_also_check", "also_check")):
            upstreams = getattr(rspamd, name, None)
            if upstreams is not None:
                yield backend, upstreams
    clamd = getattr(deps, "clamd", None)
    if clamd is not None and getattr(clamd, "upstreams", None) is not None:
        yield "clamd", clamd.upstreams
    redis = getattr(deps, "redis", None)
    if redis is not None:
        for role in redis.roles():
            upstreams = getattr(role, "upstreams", None)
            if upstreams is not None:
                yield "redis_%s" % (getattr(role, "name", "role"),), upstreams


def server_name(server: Any) -> str:
    return str(getattr(server, "name", server))


def backend_states(deps: Any, now: float) -> List[Tuple[str, str, bool]]:
    """(backend, server, alive) for every configured server, in configuration order."""
    states = []
    for backend, upstreams in server_lists(deps):
        for upstream in upstreams.upstreams:
            states.append((backend, server_name(upstream.server), upstream.alive(now)))
    return states


class StateCollector(Collector):
    """What is true at scrape time, read from the running service (nothing counted per message).

    ``source`` is the service (or a test double) with ``runtime``, ``factory``,
    ``generation`` and ``clock`` attributes.
    """

    def __init__(self, source: Any) -> None:
        self.source = source

    def describe(self) -> Iterable[Any]:
        return []  # values are read at scrape time; nothing to check at registration

    def collect(self) -> Iterator[Any]:
        source = self.source
        factory = source.factory
        generation = GaugeMetricFamily("rmilter_config_generation", "Configuration generation (1 at start, +1 per reload)")
        generation.add_metric([], source.generation)
        yield generation
        connections = GaugeMetricFamily("rmilter_mta_connections", "MTA connections open")
        connections.add_metric([], len(factory.connections))
        yield connections
        in_flight = GaugeMetricFamily("rmilter_messages_in_flight", "Messages between MAIL and their end")
        in_flight.add_metric([], factory.messages_in_flight)
        yield in_flight
        memory = disk = 0
        for protocol in list(factory.connections):
            spool = _spool_of(protocol)
            if spool is None or spool.closed:
                continue
            if spool.in_memory:
                memory += spool.size
            else:
                disk += spool.size
        spool_bytes = GaugeMetricFamily("rmilter_spool_bytes", "Bytes of messages in flight", labels=["where"])
        spool_bytes.add_metric(["memory"], memory)
        spool_bytes.add_metric(["disk"], disk)
        yield spool_bytes
        progress = CounterMetricFamily("rmilter_progress_sent", "PROGRESS keep-alives sent to the MTA")
        progress.add_metric([], factory.progress_sent)
        yield progress
        errors = CounterMetricFamily("rmilter_protocol_errors", "MTA connections closed for a bad frame",
                                     labels=["kind"])
        counted: Dict[str, int] = {kind: 0 for kind in PROTOCOL_ERROR_KINDS.values()}
        for name, count in factory.protocol_errors.items():
            kind = PROTOCOL_ERROR_KINDS.get(name, "other")
            counted[kind] = counted.get(kind, 0) + count
        for kind, count in sorted(counted.items()):
            errors.add_metric([kind], count)
        yield errors
        up = GaugeMetricFamily("rmilter_backend_up", "1 while a backend server is alive, 0 while dead",
                               labels=["backend", "server"])
        for backend, server, alive in backend_states(source.runtime.deps, source.clock.seconds()):
            up.add_metric([backend, server], 1 if alive else 0)
        yield up


def _spool_of(protocol: Any) -> Any:
    session = getattr(protocol, "session", None)
    txn = getattr(session, "message", None) if session is not None else None
    message = getattr(txn, "message", None)
    return getattr(message, "spool", None)
