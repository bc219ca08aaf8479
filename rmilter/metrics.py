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

Counts are plain numbers updated in the reactor thread (``prometheus_client``'s metric
objects take a lock per update, several per message: more than the 5% budget of issue 14)
and become Prometheus families at scrape time (``MessageCounts``).

Worker processes (issue 15): every count is a key in a plain dictionary, so a worker hands
its ``Metrics.snapshot()`` and its ``state_of()`` to the main process as plain data (pickled
over its channel, once a second and on each scrape), and the main process, which alone binds
``metrics_socket``, serves the sum (``Metrics.merge``, ``merge_states``): counters and
histogram buckets add up, gauges (connections, in flight, spool bytes) add up, the config
generation and reload counts are the main process's, a backend server is up while every
worker has it alive.  No label names a process, so one worker or many give the same series.
(``prometheus_client``'s multiprocess mode, with its mmap files, would do the same for library
metric objects at a lock and a file write per update; it cannot run custom collectors across
processes, which the scrape-time state here relies on.)
"""
from __future__ import annotations

import bisect
import collections
import math
from typing import Any, Deque, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple

from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.utils import floatToGoString
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
        self.metrics.marked_dead(self.backend, server)


class Histogram:
    """A histogram kept as plain numbers: one ``bisect`` and two additions per observation.

    ``prometheus_client``'s own metric objects take a lock per update, several per message;
    the pipeline runs in the reactor thread only, so plain numbers are exact and cost a
    fraction.  ``MessageCounts`` hands them to the registry at scrape time.
    """

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)  # the last one is +Inf
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value

    def add(self, counts: Sequence[int], total: float) -> None:
        """Another process's observations of the same buckets."""
        for i, count in enumerate(counts):
            self.counts[i] += count
        self.total += total

    def cumulative(self) -> List[Tuple[str, float]]:
        out, running = [], 0
        for bound, count in zip(self.bounds + (math.inf,), self.counts):
            running += count
            out.append((floatToGoString(bound), float(running)))
        return out


def _bump(counts: Dict[Any, int], key: Any, by: int = 1) -> None:
    counts[key] = counts.get(key, 0) + by


class Metrics:
    """Every metric of the process, and the short history the status page draws.

    Counts are plain dictionaries and ``Histogram``\\ s, updated in the reactor thread and read
    by ``MessageCounts`` when Prometheus scrapes; only the process collector and the reload
    counter are ``prometheus_client`` objects.
    """

    def __init__(self, clock: Any, registry: Optional[CollectorRegistry] = None, *,
                 process_collector: bool = True) -> None:
        #: IReactorTime: the minute buckets of the status page
        self.clock = clock
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        if process_collector:
            ProcessCollector(registry=self.registry)
        #: (action, deciding check) -> messages
        self.messages: Dict[Tuple[str, str], int] = {}
        #: (check, outcome) -> results
        self.check_results: Dict[Tuple[str, str], int] = {}
        #: (check, reason) -> skipped results (bounded per check by MAX_SKIP_REASONS)
        self.skips: Dict[Tuple[Check, str], int] = {}
        self.check_seconds: Dict[str, Histogram] = {}
        #: (backend, server) -> attempts' latency; (backend, server, kind) -> errors
        self.backend_seconds: Dict[Tuple[str, str], Histogram] = {}
        self.backend_errors: Dict[Tuple[str, str, str], int] = {}
        self.server_marked_dead: Dict[Tuple[str, str], int] = {}
        self.redis_fail_open: Dict[str, int] = {}
        self.rspamd_actions: Dict[str, int] = {}
        self.rspamd_score = Histogram(SCORE_BUCKETS)
        self.counts: Dict[str, int] = {"viruses": 0, "dkim": 0, "dkim_failures": 0, "ratelimit_refusals": 0}
        self.greylist: Dict[str, int] = {"deferred": 0, "passed": 0, "failed_open": 0}
        self.reloads: Dict[str, int] = {"ok": 0, "failed": 0}
        self.registry.register(MessageCounts(self))
        #: (minute, {action: count}) for the last hour, oldest first
        self.minutes: Deque[Tuple[int, Dict[str, int]]] = collections.deque()
        #: the last summary lines, oldest first
        self.recent: Deque[str] = collections.deque(maxlen=RECENT_SUMMARIES)
        #: when each of ``recent`` ended (workers' lines are merged in time order)
        self.recent_at: Deque[float] = collections.deque(maxlen=RECENT_SUMMARIES)

    # -- the pipeline's seams ----------------------------------------------------------------
    def observe_result(self, result: CheckResult, seconds: float) -> None:
        """A ``rmilter.pipeline.ResultObserver``: one check's result and the time it took."""
        check = result.check
        if result.skipped:  # most results of most messages: one dictionary update
            skips = self.skips
            key = (check, result.summary)
            count = skips.get(key)
            if count is None:
                key = self._new_skip_reason(key)
                count = skips.get(key, 0)
            skips[key] = count + 1
            return
        name = check.value
        result_key = (name, outcome(result))
        results = self.check_results
        results[result_key] = results.get(result_key, 0) + 1
        kind = result_key[1]
        histogram = self.check_seconds.get(name)
        if histogram is None:
            histogram = self.check_seconds[name] = Histogram(LATENCY_BUCKETS)
        histogram.observe(seconds)
        if kind == "failed_open" and check in REDIS_ROLES:
            _bump(self.redis_fail_open, REDIS_ROLES[check])
        if check is Check.SPAM:
            self._spam(result)
        elif check is Check.VIRUS:
            if result.demands_verdict and "virus_name" in result.details:
                self.counts["viruses"] += 1
        elif check is Check.DKIM:
            signatures = result.details.get("dkim_signatures")
            if signatures:
                self.counts["dkim"] += len(signatures)  # type: ignore[arg-type]
            elif result.summary.endswith("internal failure"):
                self.counts["dkim_failures"] += 1
        elif check is Check.GREYLIST:
            if result.failed:
                self.greylist["failed_open"] += 1
            elif result.demands_verdict:
                self.greylist["deferred"] += 1
            else:
                self.greylist["passed"] += 1
        elif check is Check.RATELIMIT and result.demands_verdict:
            self.counts["ratelimit_refusals"] += 1

    def _new_skip_reason(self, key: Tuple[Check, str]) -> Tuple[Check, str]:
        """A reason not seen before: itself, or "other" once the check has MAX_SKIP_REASONS."""
        check = key[0]
        if sum(1 for c, _ in self.skips if c is check) >= MAX_SKIP_REASONS:
            return (check, "other")
        return key

    def skipped_by_check(self) -> Dict[str, Dict[str, int]]:
        """check -> {reason: results} (for the scrape)."""
        out: Dict[str, Dict[str, int]] = {}
        for (check, reason), count in self.skips.items():
            out.setdefault(check.value, {})[reason] = count
        return out

    def _spam(self, result: CheckResult) -> None:
        action = result.details.get("spam_action")
        if result.failed or action is None:
            return
        if result.details.get("spam_dkim_only"):
            return  # a signing request, not a verdict on the message
        action = str(action)
        if action not in self.rspamd_actions and len(self.rspamd_actions) >= MAX_SKIP_REASONS:
            action = "other"
        _bump(self.rspamd_actions, action)
        score = result.details.get("spam_score")
        if isinstance(score, (int, float)):
            self.rspamd_score.observe(score)

    def message_done(self, message: Any, results: Sequence[CheckResult], verdict: Verdict,
                     summary: Optional[str]) -> None:
        """A ``rmilter.pipeline.MessageObserver``: the message ended with ``verdict``."""
        action = final_action(verdict)
        decider = deciding_result(results) if verdict.action is not Action.ACCEPT else None
        key = (action, decider.check.value if decider is not None else "none")
        messages = self.messages
        messages[key] = messages.get(key, 0) + 1
        now = self.clock.seconds()
        minute = int(now // 60)
        minutes = self.minutes
        if not minutes or minutes[-1][0] != minute:
            minutes.append((minute, {}))
            while minutes and minutes[0][0] <= minute - HISTORY_MINUTES:
                minutes.popleft()
        counts = minutes[-1][1]
        counts[action] = counts.get(action, 0) + 1
        if summary is not None:
            self.recent.append(summary)
            self.recent_at.append(now)

    # -- backends ------------------------------------------------------------------------------
    def attempt_ended(self, backend: str, server: str, seconds: float, error: Optional[str]) -> None:
        histogram = self.backend_seconds.get((backend, server))
        if histogram is None:
            histogram = self.backend_seconds[(backend, server)] = Histogram(LATENCY_BUCKETS)
        histogram.observe(seconds)
        if error is not None:
            _bump(self.backend_errors, (backend, server, "timeout" if is_timeout(error) else "error"))

    def marked_dead(self, backend: str, server: str) -> None:
        _bump(self.server_marked_dead, (backend, server))

    def watch_runtime(self, deps: Any) -> None:
        """Hook an observer onto every server list of a configuration generation's clients."""
        for backend, upstreams in server_lists(deps):
            upstreams.observer = UpstreamMetrics(self, backend)

    # -- the service ---------------------------------------------------------------------------
    def reload_done(self, ok: bool) -> None:
        self.reloads["ok" if ok else "failed"] += 1

    def per_minute(self, minutes: int = HISTORY_MINUTES) -> List[Tuple[int, Dict[str, int]]]:
        """Messages by action for each of the last ``minutes`` minutes, oldest first (gaps as zeros)."""
        now = int(self.clock.seconds() // 60)
        known = dict(self.minutes)
        return [(m, dict(known.get(m, {}))) for m in range(now - minutes + 1, now + 1)]


    # -- worker processes ----------------------------------------------------------------------
    def snapshot(self) -> Dict[str, Any]:
        """Every count as plain data (a worker sends it to the main process, see ``merge``)."""
        return {
            "ints": {name: dict(getattr(self, name)) for name in _INT_FIELDS},
            "histograms": {name: {k: (list(h.counts), h.total) for k, h in getattr(self, name).items()}
                           for name in _HISTOGRAM_FIELDS},
            "rspamd_score": (list(self.rspamd_score.counts), self.rspamd_score.total),
            "minutes": [(m, dict(c)) for m, c in self.minutes],
            "recent": list(zip(self.recent_at, self.recent)),
        }

    @classmethod
    def merge(cls, clock: Any, snapshots: Iterable[Mapping[str, Any]]) -> "Metrics":
        """The sum of several ``snapshot()``\ s: counters and histogram buckets add up, the
        per-minute history adds up minute by minute, the last summaries are merged by time."""
        out = cls(clock, process_collector=False)
        recent: List[Tuple[float, str]] = []
        minutes: Dict[int, Dict[str, int]] = {}
        for snap in snapshots:
            for name, values in snap["ints"].items():
                target = getattr(out, name)
                for key, value in values.items():
                    target[key] = target.get(key, 0) + value
            for name, values in snap["histograms"].items():
                target = getattr(out, name)
                for key, (counts, total) in values.items():
                    histogram = target.get(key)
                    if histogram is None:
                        histogram = target[key] = Histogram(LATENCY_BUCKETS)
                    histogram.add(counts, total)
            out.rspamd_score.add(*snap["rspamd_score"])
            for minute, counts in snap["minutes"]:
                into = minutes.setdefault(minute, {})
                for action, count in counts.items():
                    into[action] = into.get(action, 0) + count
            recent.extend(snap["recent"])
        out.minutes.extend(sorted(minutes.items()))
        recent.sort(key=lambda pair: pair[0])
        for at, line in recent[-RECENT_SUMMARIES:]:
            out.recent_at.append(at)
            out.recent.append(line)
        return out


#: the fields of ``Metrics`` that are {key: int} and {key: Histogram} (what a snapshot carries)
_INT_FIELDS = ("messages", "check_results", "skips", "backend_errors", "server_marked_dead", "redis_fail_open",
               "rspamd_actions", "counts", "greylist", "reloads")
_HISTOGRAM_FIELDS = ("check_seconds", "backend_seconds")


def _counter(name: str, documentation: str, labels: Sequence[str], values: Mapping[Any, int]) -> Any:
    family = CounterMetricFamily(name, documentation, labels=list(labels))
    for key, value in sorted(values.items()):
        family.add_metric(list(key) if isinstance(key, tuple) else ([key] if labels else []), value)
    return family


def _histogram(name: str, documentation: str, labels: Sequence[str], values: Mapping[Any, Histogram]) -> Any:
    family = HistogramMetricFamily(name, documentation, labels=list(labels))
    for key, histogram in sorted(values.items()):
        family.add_metric(list(key) if isinstance(key, tuple) else ([key] if labels else []),
                          histogram.cumulative(), histogram.total)
    return family


class MessageCounts(Collector):
    """``Metrics``' plain counts as Prometheus families, built when Prometheus scrapes."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def describe(self) -> Iterable[Any]:
        return []

    def collect(self) -> Iterator[Any]:
        m = self.metrics
        messages = {(a, "none"): 0 for a in ACTIONS}
        messages.update(m.messages)
        yield _counter("rmilter_messages", "Messages finished, by final action and deciding check",
                       ("action", "check"), messages)
        skipped = m.skipped_by_check()
        results = dict(m.check_results)
        for check, reasons in skipped.items():
            results[(check, "skipped")] = sum(reasons.values())
        yield _counter("rmilter_check_results", "Check results by outcome", ("check", "outcome"), results)
        yield _counter("rmilter_check_skipped", "Checks not run, by reason", ("check", "reason"),
                       {(c, r): n for c, reasons in skipped.items() for r, n in reasons.items()})
        yield _histogram("rmilter_check_duration_seconds", "Time a check took", ("check",), m.check_seconds)
        yield _histogram("rmilter_backend_request_duration_seconds", "Time of one attempt on one backend server",
                         ("backend", "server"), m.backend_seconds)
        yield _counter("rmilter_backend_errors", "Failed attempts on a backend server",
                       ("backend", "server", "kind"), m.backend_errors)
        yield _counter("rmilter_backend_marked_dead", "Times a server was marked dead for dead_time",
                       ("backend", "server"), m.server_marked_dead)
        yield _counter("rmilter_redis_fail_open", "Redis trouble answered by letting the message through",
                       ("role",), {role: m.redis_fail_open.get(role, 0) for role in REDIS_ROLES.values()})
        yield _counter("rmilter_rspamd_actions", "Rspamd's action per scan", ("action",), m.rspamd_actions)
        yield _histogram("rmilter_rspamd_score", "Rspamd's score per scan", (), {(): m.rspamd_score})
        yield _counter("rmilter_viruses_found", "Messages clamd found a virus in", (), {(): m.counts["viruses"]})
        yield _counter("rmilter_dkim_signatures", "DKIM signatures made", (), {(): m.counts["dkim"]})
        yield _counter("rmilter_dkim_failures", "DKIM signing that failed", (), {(): m.counts["dkim_failures"]})
        yield _counter("rmilter_greylist", "Greylisting decisions", ("result",), m.greylist)
        yield _counter("rmilter_ratelimit_refusals", "Recipients refused by a rate limit", (),
                       {(): m.counts["ratelimit_refusals"]})
        yield _counter("rmilter_config_reloads", "Configuration reloads", ("result",), m.reloads)


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
        return state_families(state_of(self.source))


def state_of(source: Any) -> Dict[str, Any]:
    """The scrape-time state of one process as plain data (also what a worker sends)."""
    factory = source.factory
    memory = disk = 0
    for protocol in list(factory.connections):
        spool = _spool_of(protocol)
        if spool is None or spool.closed:
            continue
        if spool.in_memory:
            memory += spool.size
        else:
            disk += spool.size
    counted: Dict[str, int] = {kind: 0 for kind in PROTOCOL_ERROR_KINDS.values()}
    for name, count in factory.protocol_errors.items():
        kind = PROTOCOL_ERROR_KINDS.get(name, "other")
        counted[kind] = counted.get(kind, 0) + count
    return {
        "generation": source.generation,
        "connections": len(factory.connections),
        "in_flight": factory.messages_in_flight,
        "spool": {"memory": memory, "disk": disk},
        "progress_sent": factory.progress_sent,
        "protocol_errors": counted,
        "backends": backend_states(source.runtime.deps, source.clock.seconds()),
    }


def merge_states(states: Sequence[Mapping[str, Any]], generation: int) -> Dict[str, Any]:
    """Several processes' ``state_of``: connections, in flight, spool bytes, PROGRESS and bad
    frames add up; a backend server is up only while every process has it alive (a dead mark in
    one worker already costs that worker's mail its answer); the generation is the main
    process's (a restarted worker counts its own reloads from 1)."""
    out: Dict[str, Any] = {"generation": generation, "connections": 0, "in_flight": 0,
                           "spool": {"memory": 0, "disk": 0}, "progress_sent": 0,
                           "protocol_errors": {kind: 0 for kind in PROTOCOL_ERROR_KINDS.values()}, "backends": []}
    alive: Dict[Tuple[str, str], bool] = {}
    for state in states:
        for name in ("connections", "in_flight", "progress_sent"):
            out[name] += state[name]
        for name in ("spool", "protocol_errors"):
            for key, value in state[name].items():
                out[name][key] = out[name].get(key, 0) + value
        for backend, server, up in state["backends"]:
            alive[(backend, server)] = alive.get((backend, server), True) and up
    out["backends"] = [(backend, server, up) for (backend, server), up in alive.items()]
    return out


def state_families(state: Mapping[str, Any]) -> Iterator[Any]:
    generation = GaugeMetricFamily("rmilter_config_generation", "Configuration generation (1 at start, +1 per reload)")
    generation.add_metric([], state["generation"])
    yield generation
    connections = GaugeMetricFamily("rmilter_mta_connections", "MTA connections open")
    connections.add_metric([], state["connections"])
    yield connections
    in_flight = GaugeMetricFamily("rmilter_messages_in_flight", "Messages between MAIL and their end")
    in_flight.add_metric([], state["in_flight"])
    yield in_flight
    spool_bytes = GaugeMetricFamily("rmilter_spool_bytes", "Bytes of messages in flight", labels=["where"])
    spool_bytes.add_metric(["memory"], state["spool"]["memory"])
    spool_bytes.add_metric(["disk"], state["spool"]["disk"])
    yield spool_bytes
    progress = CounterMetricFamily("rmilter_progress_sent", "PROGRESS keep-alives sent to the MTA")
    progress.add_metric([], state["progress_sent"])
    yield progress
    errors = CounterMetricFamily("rmilter_protocol_errors", "MTA connections closed for a bad frame",
                                 labels=["kind"])
    for kind, count in sorted(state["protocol_errors"].items()):
        errors.add_metric([kind], count)
    yield errors
    up = GaugeMetricFamily("rmilter_backend_up", "1 while a backend server is alive, 0 while dead",
                           labels=["backend", "server"])
    for backend, server, alive in state["backends"]:
        up.add_metric([backend, server], 1 if alive else 0)
    yield up


def _spool_of(protocol: Any) -> Any:
    session = getattr(protocol, "session", None)
    txn = getattr(session, "message", None) if session is not None else None
    message = getattr(txn, "message", None)
    return getattr(message, "spool", None)
