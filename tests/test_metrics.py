"""Metrics, /health and the status page in memory (issue 14): counters move as messages pass.

Messages go through the real ``Pipeline`` with stub checks (``tests.pipeline_support``);
the failover loop runs on a ``task.Clock``; bad frames reach a real ``MilterProtocol`` over
a ``StringTransport``; the pages are rendered by ``twisted.web`` from a ``DummyRequest``.
"""
from __future__ import annotations

import dataclasses
import json
import struct
import tempfile
from typing import Any, Dict, List, Optional

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.test.requesthelper import DummyRequest

from rmilter import config as rconfig
from rmilter import metrics as m
from rmilter import status
from rmilter.backends.upstream import AttemptFailed, Exhausted, Failover, UpstreamList
from rmilter.config.schema import Config, GlobalConfig, RedisServer, ServerSpec
from rmilter.deps import Deps
from rmilter.milter.protocol import MilterFactory
from rmilter.pipeline import Checks, Pipeline
from rmilter.runtime import Runtime
from rmilter.spool import run_inline
from rmilter.testing.fakepipeline import FakePipeline
from rmilter.verdict import (
    AddHeader,
    Check,
    CheckResult,
    Quarantine,
    Verdict,
    Action,
    reject,
    skipped,
    tempfail,
)
from tests.pipeline_support import send_until_eom


REDIS = RedisServer("127.0.0.1", host="127.0.0.1")


def spam(action: str, score: float, verdict: Optional[Verdict] = None) -> CheckResult:
    return CheckResult(Check.SPAM, "scanned: %s" % action, verdict=verdict,
                       details={"spam_action": action, "spam_score": score})


SIGNED = CheckResult(Check.DKIM, "signed", edits=(AddHeader(name="DKIM-Signature", value="v=1"),),
                     details={"dkim_signatures": ["d=example.net s=s1 a=rsa-sha256"]})


class Stubs:
    """Check stubs answering what the test sets; each result is what a real check returns."""

    def __init__(self) -> None:
        self.spam = spam("no action", 1.5)
        self.virus = CheckResult(Check.VIRUS, "clean")
        self.dkim = SIGNED
        self.greylist = CheckResult(Check.GREYLIST, "passed")
        self.ratelimit = skipped(Check.RATELIMIT, "limits inactive")

    def checks(self) -> Checks:
        return Checks(
            spam=lambda msg, deps, dkim_only=False: succeed(self.spam),
            virus=lambda msg, deps: succeed(self.virus),
            dkim=lambda msg, deps: succeed(self.dkim),
            greylist=lambda msg, deps, **kw: succeed(self.greylist),
            ratelimit=lambda msg, deps, *, recipient: succeed(self.ratelimit),
            ratelimit_record=lambda msg, deps: succeed(skipped(Check.RATELIMIT, "limits inactive")),
            replies=lambda msg, deps: succeed(skipped(Check.REPLIES, "replies check inactive")),
            replies_record=lambda msg, deps: succeed(skipped(Check.REPLIES, "replies check inactive")),
            copies=lambda msg, deps, *, kind: succeed(skipped(Check.COPIES, "no copy channel")),
        )


def a_config(**main: Any) -> Config:
    from rmilter.config.schema import ClamavConfig, SpamdConfig

    server = ServerSpec("r1", host="127.0.0.1", port=11333)
    return Config(main=GlobalConfig(tempdir=tempfile.gettempdir(), **main),
                  spamd=SpamdConfig(servers=(server,)),
                  clamav=ClamavConfig(servers=(ServerSpec("c1", host="127.0.0.1", port=3310),)))


class PipelineCountsTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_000_000 * 60)
        self.metrics = m.Metrics(self.clock, process_collector=False)
        self.stubs = Stubs()
        self.runtime = Runtime(Deps(config=a_config(), clock=self.clock, run_blocking=run_inline))
        self.pipeline = Pipeline(lambda: self.runtime, self.stubs.checks())
        self.pipeline.observers.append(self.metrics.observe_result)
        self.pipeline.message_observers.append(self.metrics.message_done)

    def value(self, name: str, **labels: str) -> float:
        found = self.metrics.registry.get_sample_value(name, labels)
        return 0.0 if found is None else found

    def message(self, **kwargs: Any) -> Verdict:
        txn, data, eom = send_until_eom(self, self.pipeline, **kwargs)
        verdict = data if eom is None else self.successResultOf(eom)
        self.pipeline.finish(txn, verdict)
        return verdict

    def test_accepted_message(self) -> None:
        """An accepted, scanned and signed message: one accept, Rspamd's action and score, one signature."""
        self.assertEqual(self.message().action, Action.ACCEPT)
        self.assertEqual(self.value("rmilter_messages_total", action="accept", check="none"), 1)
        self.assertEqual(self.value("rmilter_rspamd_actions_total", action="no action"), 1)
        self.assertEqual(self.value("rmilter_rspamd_score_bucket", le="+Inf"), 1)
        # (negative buckets: prometheus_client leaves out _sum, which could go down)
        self.assertEqual(self.value("rmilter_rspamd_score_bucket", le="1.0"), 0)
        self.assertEqual(self.value("rmilter_rspamd_score_bucket", le="2.0"), 1)
        self.assertEqual(self.value("rmilter_dkim_signatures_total"), 1)
        self.assertEqual(self.value("rmilter_check_results_total", check="spam", outcome="pass"), 1)
        self.assertEqual(self.value("rmilter_check_results_total", check="dkim", outcome="act"), 1)
        self.assertEqual(self.value("rmilter_check_duration_seconds_count", check="spam"), 1)
        self.assertEqual(self.value("rmilter_check_skipped_total", check="replies", reason="replies check inactive"),
                         2)  # the lookup at EOH and the record after the accept
        self.assertEqual(list(self.metrics.recent)[-1].count("msg done"), 1)

    def test_spam_reject_is_decided_by_spam(self) -> None:
        self.stubs.spam = spam("reject", 22.0, reject("Spam message rejected"))
        self.assertEqual(self.message().action, Action.REJECT)
        self.assertEqual(self.message().action, Action.REJECT)
        self.assertEqual(self.value("rmilter_messages_total", action="reject", check="spam"), 2)
        self.assertEqual(self.value("rmilter_rspamd_actions_total", action="reject"), 2)
        self.assertEqual(self.value("rmilter_rspamd_score_bucket", le="20.0"), 0)
        self.assertEqual(self.value("rmilter_rspamd_score_bucket", le="30.0"), 2)
        self.assertEqual(self.value("rmilter_dkim_signatures_total"), 0)
        self.assertEqual(self.value("rmilter_check_skipped_total", check="virus", reason="skipped, spam detected"), 2)

    def test_virus(self) -> None:
        self.stubs.virus = CheckResult(Check.VIRUS, "virus found", verdict=reject("Infected: Eicar"),
                                       details={"virus_name": "Eicar"})
        self.assertEqual(self.message().action, Action.REJECT)
        self.assertEqual(self.value("rmilter_viruses_found_total"), 1)
        self.assertEqual(self.value("rmilter_messages_total", action="reject", check="virus"), 1)

    def test_greylist_deferral_and_rate_limit_refusal(self) -> None:
        """Greylisting at DATA ends the message with tempfail; a refused recipient is counted once."""
        self.runtime = Runtime(Deps(config=dataclasses.replace(
            a_config(), greylisting=dataclasses.replace(a_config().greylisting, timeout=300.0),
            redis=dataclasses.replace(a_config().redis, servers_grey=(REDIS,),
                                      servers_limits=(REDIS,)),
            limits=dataclasses.replace(a_config().limits, enable=True),
            spamd=dataclasses.replace(a_config().spamd, spamd_greylist=False)),
            clock=self.clock, run_blocking=run_inline))
        if not self.runtime.config.greylisting_active or not self.runtime.config.limits_active:
            self.fail("the test configuration does not turn greylisting and limits on")
        self.stubs.greylist = CheckResult(Check.GREYLIST, "greylisted", verdict=tempfail("Try again later"))
        self.stubs.ratelimit = CheckResult(Check.RATELIMIT, "exceeded", verdict=tempfail("Rate limit exceeded"))
        self.assertEqual(self.message(rcpts=("<a@example.org>",)).action, Action.TEMPFAIL)
        self.assertEqual(self.value("rmilter_greylist_total", result="deferred"), 1)
        self.assertEqual(self.value("rmilter_ratelimit_refusals_total"), 1)
        self.assertEqual(self.value("rmilter_messages_total", action="tempfail", check="greylist"), 1)

    def test_redis_fail_open_by_role(self) -> None:
        self.stubs.ratelimit = CheckResult(Check.RATELIMIT, "Redis unavailable, accepted (fail open)", failed=True)
        self.runtime = Runtime(Deps(config=dataclasses.replace(
            a_config(), redis=dataclasses.replace(a_config().redis,
                                                  servers_limits=(REDIS,)),
            limits=dataclasses.replace(a_config().limits, enable=True)),
            clock=self.clock, run_blocking=run_inline))
        self.assertEqual(self.message(rcpts=("<a@example.org>", "<b@example.org>")).action, Action.ACCEPT)
        self.assertEqual(self.value("rmilter_redis_fail_open_total", role="limits"), 2)
        self.assertEqual(self.value("rmilter_check_results_total", check="ratelimit", outcome="failed_open"), 2)

    def test_minutes_and_recent_lines(self) -> None:
        """The status page's history: messages per minute by action, the last 50 lines."""
        for _ in range(3):
            self.message()
        self.clock.advance(60)
        self.stubs.spam = spam("reject", 22.0, reject("Spam message rejected"))
        self.message()
        minutes = self.metrics.per_minute()
        self.assertEqual(len(minutes), 60)
        self.assertEqual(minutes[-2][1], {"accept": 3})
        self.assertEqual(minutes[-1][1], {"reject": 1})
        self.clock.advance(3600)
        self.assertEqual(sum(sum(c.values()) for _, c in self.metrics.per_minute()), 0)
        for _ in range(60):
            self.message()
        self.assertEqual(len(self.metrics.recent), 50)


class LabelTests(SynchronousTestCase):
    def test_final_action(self) -> None:
        self.assertEqual(m.final_action(Verdict(Action.ACCEPT, edits=(Quarantine(reason="spam"),))), "quarantine")
        self.assertEqual(m.final_action(Verdict(Action.DISCARD)), "discard")
        self.assertEqual(m.final_action(tempfail("x")), "tempfail")

    def test_skip_reasons_are_bounded(self) -> None:
        metrics = m.Metrics(Clock(), process_collector=False)
        for i in range(m.MAX_SKIP_REASONS + 10):
            metrics.observe_result(skipped(Check.COPIES, "reason %d" % i), 0.0)
        labels = {s.labels["reason"] for f in metrics.registry.collect() if f.name == "rmilter_check_skipped"
                  for s in f.samples}
        self.assertEqual(len(labels), m.MAX_SKIP_REASONS + 1)
        self.assertEqual(metrics.registry.get_sample_value("rmilter_check_skipped_total",
                                                           {"check": "copies", "reason": "other"}), 10)


class Server:
    def __init__(self, name: str) -> None:
        self.name = name


class BackendTests(SynchronousTestCase):
    """The shared failover loop reports each attempt and each server marked dead."""

    def test_attempts_errors_timeouts_and_dead_servers(self) -> None:
        clock = Clock()
        metrics = m.Metrics(clock, process_collector=False)
        a, b = Server("a"), Server("b")
        upstreams: UpstreamList[Server] = UpstreamList([a, b], error_time=10, dead_time=60, maxerrors=1, clock=clock)
        upstreams.observer = m.UpstreamMetrics(metrics, "rspamd")
        failover = Failover(upstreams, clock, attempts=3, retry_timeout=1.0, what="rspamd",
                            describe=lambda f: f.value if isinstance(f.value, AttemptFailed) else None,
                            give_up=lambda e: RuntimeError(e.reason))
        answers: Dict[str, List[Any]] = {"a": [AttemptFailed("timed out")], "b": [AttemptFailed("connection refused")]}
        pending: List[Deferred] = []

        def attempt(server: Server) -> Deferred:
            d: Deferred = Deferred()
            pending.append(d)
            clock.callLater(0.25, lambda: d.errback(answers[server.name].pop()) if answers[server.name]
                            else d.callback("ok"))
            return d

        scan = failover.run(attempt)
        clock.advance(0.25)  # first attempt fails
        clock.advance(1.0)  # pause
        clock.advance(0.25)  # second attempt fails (the other server)
        clock.advance(1.0)
        clock.advance(0.25)  # third: every server dead, all revived, one of them answers
        self.assertEqual(self.successResultOf(scan).reply, "ok")

        def value(name: str, **labels: str) -> float:
            return metrics.registry.get_sample_value(name, labels) or 0.0

        self.assertEqual(value("rmilter_backend_errors_total", backend="rspamd", server="a", kind="timeout"), 1)
        self.assertEqual(value("rmilter_backend_errors_total", backend="rspamd", server="b", kind="error"), 1)
        self.assertEqual(value("rmilter_backend_marked_dead_total", backend="rspamd", server="a"), 1)
        self.assertEqual(value("rmilter_backend_marked_dead_total", backend="rspamd", server="b"), 1)
        attempts = (value("rmilter_backend_request_duration_seconds_count", backend="rspamd", server="a")
                    + value("rmilter_backend_request_duration_seconds_count", backend="rspamd", server="b"))
        self.assertEqual(attempts, 3)
        self.assertEqual(value("rmilter_backend_request_duration_seconds_sum", backend="rspamd", server="a")
                         + value("rmilter_backend_request_duration_seconds_sum", backend="rspamd", server="b"), 0.75)

    def test_unobserved_list_costs_nothing_and_works(self) -> None:
        clock = Clock()
        upstreams: UpstreamList[Server] = UpstreamList([Server("a")], error_time=10, dead_time=60, maxerrors=1,
                                                       clock=clock)
        failover = Failover(upstreams, clock, attempts=1, retry_timeout=0, what="x", describe=lambda f: None,
                            give_up=lambda e: RuntimeError(e.reason))
        self.assertEqual(self.successResultOf(failover.run(lambda s: succeed(1))).reply, 1)


class Source:
    """What the pages and the StateCollector read from the service."""

    def __init__(self, factory: MilterFactory, runtime: Runtime, clock: Clock) -> None:
        self.factory = factory
        self.runtime = runtime
        self.clock = clock
        self.generation = 3
        self.shutting_down = False
        self.listen_endpoints = ["tcp:11339:interface=127.0.0.1"]

    def health(self) -> Dict[str, Any]:
        return {"config_generation": self.generation, "listeners": list(self.listen_endpoints),
                "shutting_down": self.shutting_down}


class StateAndPagesTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.metrics = m.Metrics(self.clock)
        pipeline = FakePipeline(config=a_config())
        self.factory = MilterFactory(pipeline, self.clock)
        from rmilter.backends import rspamd

        self.runtime = Runtime(Deps(config=a_config(), clock=self.clock, run_blocking=run_inline,
                                    rspamd=rspamd.from_config(a_config(), self.clock)))
        self.source = Source(self.factory, self.runtime, self.clock)
        self.metrics.registry.register(m.StateCollector(self.source))
        self.metrics.watch_runtime(self.runtime.deps)

    def value(self, name: str, **labels: str) -> Optional[float]:
        return self.metrics.registry.get_sample_value(name, labels)

    def test_bad_frame_counted_by_kind(self) -> None:
        transport = StringTransport()
        protocol = self.factory.buildProtocol(None)
        protocol.makeConnection(transport)
        self.assertEqual(self.value("rmilter_mta_connections"), 1)
        self.assertEqual(self.value("rmilter_protocol_errors_total", kind="frame"), 0)
        protocol.dataReceived(struct.pack(">I", 0))  # a frame of length 0 (SPEC §3.8)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.value("rmilter_protocol_errors_total", kind="frame"), 1)

    def test_state_gauges(self) -> None:
        self.assertEqual(self.value("rmilter_config_generation"), 3)
        self.assertEqual(self.value("rmilter_backend_up", backend="rspamd", server="r1"), 1)
        upstreams = self.runtime.deps.rspamd.upstreams  # type: ignore[union-attr]
        for _ in range(upstreams.maxerrors):
            upstreams.failed(upstreams.upstreams[0].server)
        self.assertEqual(self.value("rmilter_backend_up", backend="rspamd", server="r1"), 0)
        self.assertEqual(self.value("rmilter_backend_marked_dead_total", backend="rspamd", server="r1"), 1)
        self.assertEqual(self.value("rmilter_spool_bytes", where="memory"), 0)
        self.assertEqual(self.value("rmilter_progress_sent_total"), 0)
        self.assertIsNotNone(self.value("process_cpu_seconds_total"))

    def get(self, path: bytes) -> DummyRequest:
        site = status.site(self.metrics, self.source)
        request = DummyRequest(path.lstrip(b"/").split(b"/"))
        resource = site.getResourceFor(request)
        body = resource.render(request)
        request.written.append(body)
        return request

    def test_metrics_page(self) -> None:
        request = self.get(b"/metrics")
        text = b"".join(request.written).decode()
        self.assertIn("rmilter_config_generation 3.0", text)
        self.assertIn('rmilter_backend_up{backend="rspamd",server="r1"} 1.0', text)
        self.assertTrue(request.responseHeaders.getRawHeaders(b"content-type")[0].startswith(b"text/plain"))

    def test_health(self) -> None:
        request = self.get(b"/health")
        self.assertEqual(request.responseCode or 200, 200)
        document = json.loads(b"".join(request.written))
        self.assertEqual((document["status"], document["config_generation"]), ("ok", 3))
        self.source.shutting_down = True
        self.assertEqual(self.get(b"/health").responseCode, 503)
        self.source.shutting_down = False
        self.source.listen_endpoints = []
        request = self.get(b"/health")
        self.assertEqual(request.responseCode, 503)
        self.assertEqual(json.loads(b"".join(request.written))["status"], "no listener")

    def test_status_page(self) -> None:
        self.metrics.message_done(None, [], Verdict(Action.ACCEPT), "tag1; msg done: <b>x</b>")
        self.metrics.message_done(None, [], reject("no"), "tag2; msg done: spam")
        page = b"".join(self.get(b"/").written).decode()
        self.assertIn('<svg id="chart"', page)
        self.assertEqual(page.count('class="bar"'), 2)
        self.assertIn("tag1; msg done: &lt;b&gt;x&lt;/b&gt;", page)
        self.assertIn('<tr class="backend alive"><td>rspamd</td><td>r1</td>', page)
        self.assertLess(page.index("tag2"), page.index("tag1"))  # newest first


class ConfigTests(SynchronousTestCase):
    def test_metrics_socket_is_never_the_milter_socket(self) -> None:
        """Same socket as bind_socket (or as the default milter socket): a FILE:LINE error."""
        self.assertEqual(rconfig.parse_text("metrics_socket = inet:11340@127.0.0.1;").main.metrics_socket,
                         "inet:11340@127.0.0.1")
        self.assertIsNone(rconfig.default().main.metrics_socket)
        with self.assertRaises(rconfig.ConfigError) as caught:
            rconfig.parse_text("bind_socket = unix:/run/r.sock;\nmetrics_socket = /run/r.sock;\n", "r.conf")
        self.assertEqual(len(caught.exception.errors), 1)
        self.assertTrue(caught.exception.errors[0].startswith("r.conf:2: metrics_socket: /run/r.sock is the milter socket"))
        with self.assertRaises(rconfig.ConfigError):
            rconfig.parse_text("metrics_socket = inet:11339@127.0.0.1;\n", "r.conf")


class ServiceTests(SynchronousTestCase):
    """The service binds the metrics listener beside the milter's, never on it (MemoryReactor)."""

    def service(self, text: str, listen: Any = ()) -> Any:
        from twisted.internet.testing import MemoryReactorClock

        from rmilter.service import RmilterService

        self.reactor = MemoryReactorClock()
        return RmilterService(rconfig.parse_text(text), config_path=None, listen=listen, reactor=self.reactor,
                              install_signals=False)

    def test_listener_health_and_shutdown(self) -> None:
        service = self.service("bind_socket = inet:11339@127.0.0.1;\nmetrics_socket = inet:11340@127.0.0.1;\n")
        service.startService()
        ports = sorted((port, type(factory).__name__) for port, factory, _, _ in self.reactor.tcpServers)
        self.assertEqual(ports, [(11339, "MilterFactory"), (11340, "Site")])
        code, document = status.health(service)
        self.assertEqual((code, document["config_generation"], document["listeners"]),
                         (200, 1, ["tcp:11339:interface=127.0.0.1"]))
        self.assertIn(service.pipeline.observers[0].__self__, [service.metrics])  # type: ignore[attr-defined]
        stopping = service.stopService()
        self.assertEqual(status.health(service)[0], 503)
        self.successResultOf(stopping)

    def test_off_by_default(self) -> None:
        service = self.service("bind_socket = inet:11339@127.0.0.1;\n")
        service.startService()
        self.assertEqual([port for port, _, _, _ in self.reactor.tcpServers], [11339])
        self.assertEqual((service.pipeline.observers, service.metrics), ([], None))
        self.successResultOf(service.stopService())

    def test_listen_option_on_the_metrics_socket_is_refused(self) -> None:
        """Refused at start: one line naming the clash, exit status 69 (SPEC §8.1)."""
        import io
        import sys

        stderr = io.StringIO()
        self.patch(sys, "__stderr__", stderr)
        service = self.service("metrics_socket = inet:11340@127.0.0.1;\n", listen=["inet:11340@127.0.0.1"])
        with self.assertRaises(SystemExit) as caught:
            service.startService()
        self.assertEqual(caught.exception.code, 69)
        self.assertIn("metrics_socket inet:11340@127.0.0.1 is a milter listener", stderr.getvalue())
        self.assertEqual(len(stderr.getvalue().splitlines()), 1)


class MergeTests(SynchronousTestCase):
    """What the main process of ``workers = N`` serves: the workers' snapshots summed."""

    def test_counts_histograms_and_history_add_up(self) -> None:
        from twisted.internet.task import Clock

        clock = Clock()
        clock.advance(600)
        first, second = m.Metrics(clock, process_collector=False), m.Metrics(clock, process_collector=False)
        first.messages[("accept", "none")] = 3
        second.messages[("accept", "none")] = 4
        second.messages[("reject", "spam")] = 1
        first.attempt_ended("rspamd", "a", 0.002, None)
        second.attempt_ended("rspamd", "a", 0.2, "timed out")
        first.recent.append("first line"); first.recent_at.append(10.0)
        second.recent.append("second line"); second.recent_at.append(5.0)
        first.minutes.append((10, {"accept": 3}))
        second.minutes.append((10, {"accept": 4, "reject": 1}))
        merged = m.Metrics.merge(clock, [first.snapshot(), second.snapshot()])
        self.assertEqual(merged.messages, {("accept", "none"): 7, ("reject", "spam"): 1})
        histogram = merged.backend_seconds[("rspamd", "a")]
        self.assertEqual(sum(histogram.counts), 2)
        self.assertAlmostEqual(histogram.total, 0.202)
        self.assertEqual(merged.backend_errors, {("rspamd", "a", "timeout"): 1})
        self.assertEqual(list(merged.recent), ["second line", "first line"], "merged in time order")
        self.assertEqual(merged.per_minute(1), [(10, {"accept": 7, "reject": 1})])
        self.assertEqual(first.messages[("accept", "none")], 3, "snapshots are copies")

    def test_states_add_up_and_a_backend_is_up_only_where_every_worker_has_it(self) -> None:
        def state(connections: int, alive: bool) -> dict:
            return {"generation": 5, "connections": connections, "in_flight": connections, "progress_sent": 1,
                    "spool": {"memory": 10, "disk": 0}, "protocol_errors": {"frame": 1},
                    "backends": [("rspamd", "a", alive), ("rspamd", "b", True)]}

        merged = m.merge_states([state(2, True), state(3, False)], generation=2)
        self.assertEqual((merged["connections"], merged["in_flight"], merged["progress_sent"]), (5, 5, 2))
        self.assertEqual(merged["spool"], {"memory": 20, "disk": 0})
        self.assertEqual(merged["protocol_errors"]["frame"], 2)
        self.assertEqual(merged["generation"], 2, "the main process's generation")
        self.assertEqual(sorted(merged["backends"]), [("rspamd", "a", False), ("rspamd", "b", True)])
