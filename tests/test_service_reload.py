"""Reload and graceful stop of a running ``twistd rmilter`` (SPEC §4.13, §8.2, B24).

A message in flight is made slow on purpose: its rspamd server (a listener in this test
process) accepts the HTTP request and never answers, so the message waits for
``results_timeout`` and is then accepted unscanned (``tempfail_on_error = no``).  While it
waits, the configuration changes on disk and the daemon gets SIGHUP (or SIGTERM).
"""
from __future__ import annotations

import re
import signal
from typing import List

from twisted.internet import defer, reactor, threads
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.trial.unittest import TestCase

from rmilter.testing.mta import MessageSpec, MilterClient
from tests import harness


class SilentServer(Protocol):
    """Accepts a connection, reads everything, never answers."""

    def dataReceived(self, data: bytes) -> None:
        pass


def config(trace: str, spamd_port: int, results_timeout: str = "4s", extra: str = "") -> str:
    return (
        'trace_header = "%s";\n'
        "spamd { servers = 127.0.0.1:%d; results_timeout = %s; retry_count = 1; tempfail_on_error = no; };\n"
        "%s" % (trace, spamd_port, results_timeout, extra)
    )


class ReloadTests(TestCase):
    timeout = 120

    def setUp(self) -> None:
        port = reactor.listenTCP(0, Factory.forProtocol(SilentServer), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.spamd_port = port.getHost().port

    @defer.inlineCallbacks
    def send(self, milter: harness.Rmilter, queue_id: str, port: int = 0):  # type: ignore[no-untyped-def]
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port or milter.inet_port)
        return (yield MilterClient.send_one(reactor, endpoint, MessageSpec(queue_id=queue_id)))

    @staticmethod
    def trace_headers(result) -> List[str]:  # type: ignore[no-untyped-def]
        return [name for name, _ in result.added_headers if name.startswith("X-Trace-")]

    @defer.inlineCallbacks
    def test_sighup_new_config_for_new_messages_in_flight_message_kept(self):  # type: ignore[no-untyped-def]
        """After SIGHUP the next message uses the new file; the message in flight finishes with
        the configuration it started with and still gets its verdict."""
        milter = harness.start_rmilter(self, config("X-Trace-Old", self.spamd_port))
        in_flight = self.send(milter, "4SLOW1")  # waits ~4 s for the silent rspamd
        yield _sleep(1.0)  # the message is now waiting at its end of message
        milter.write_config(config("X-Trace-New", self.spamd_port, results_timeout="1s"))
        yield threads.deferToThread(milter.reload, re.compile(r"configuration reloaded"))
        fresh = yield self.send(milter, "4NEW01")
        self.assertEqual(fresh.action, "accept")
        self.assertEqual(self.trace_headers(fresh), ["X-Trace-New"])
        old = yield in_flight
        self.assertEqual(old.action, "accept")
        self.assertEqual(self.trace_headers(old), ["X-Trace-Old"])
        text = milter.log_text()
        self.assertRegex(text, r"msg done: queue_id: <4SLOW1>;.*spam scan: ignored, temporary fail")
        self.assertRegex(text, r"msg done: queue_id: <4NEW01>;")

    @defer.inlineCallbacks
    def test_sigusr1_reloads_too(self):  # type: ignore[no-untyped-def]
        """SIGUSR1, which the C rmilter's packages send, reloads like SIGHUP (B24)."""
        milter = harness.start_rmilter(self, 'trace_header = "X-Trace-One";\n')
        milter.write_config('trace_header = "X-Trace-Two";\n')
        offset = milter.log_size()
        milter.signal(signal.SIGUSR1)
        yield threads.deferToThread(milter.wait_for_log, "configuration reloaded", 10.0, offset)
        result = yield self.send(milter, "4USR01")
        self.assertEqual(self.trace_headers(result), ["X-Trace-Two"])
        self.assertTrue(milter.running())

    @defer.inlineCallbacks
    def test_broken_config_keeps_running_one(self):  # type: ignore[no-untyped-def]
        """A reload of a broken file logs FILE:LINE: reason and keeps the running configuration."""
        milter = harness.start_rmilter(self, 'trace_header = "X-Trace-Good";\n')
        milter.write_config('trace_header = "X-Trace-Bad";\nspamd {\n  servers = ;\n  bogus = 1;\n};\n')
        yield threads.deferToThread(milter.reload, re.compile(r"reload failed.*rmilter\.conf:4: .*bogus"))
        result = yield self.send(milter, "4KEEP1")
        self.assertEqual(self.trace_headers(result), ["X-Trace-Good"])

    @defer.inlineCallbacks
    def test_changed_bind_socket_is_rebound(self):  # type: ignore[no-untyped-def]
        """A new bind_socket takes effect on reload: the new port serves, the old one is closed."""
        first, second = harness.free_port(), harness.free_port()
        milter = harness.Rmilter("bind_socket = inet:%d@127.0.0.1;\n" % first, inet=False, unix=False)
        self.addCleanup(milter.stop)
        milter.start()
        yield threads.deferToThread(harness.wait_until, lambda: harness.base.tcp_accepts("127.0.0.1", first),
                                    10.0, "first port")
        milter.write_config("bind_socket = inet:%d@127.0.0.1;\n" % second)
        yield threads.deferToThread(milter.reload, re.compile(r"configuration reloaded"))
        result = yield self.send(milter, "4PORT2", port=second)
        self.assertEqual(result.action, "accept")
        self.assertFalse(harness.base.tcp_accepts("127.0.0.1", first))


class GracefulStopTests(TestCase):
    timeout = 120

    @defer.inlineCallbacks
    def test_sigterm_lets_message_in_flight_finish(self):  # type: ignore[no-untyped-def]
        """SIGTERM stops accepting connections but the message in flight still gets its verdict."""
        port = reactor.listenTCP(0, Factory.forProtocol(SilentServer), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        milter = harness.start_rmilter(self, config("X-Trace-Stop", port.getHost().port, results_timeout="3s"))
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", milter.inet_port)
        client = yield MilterClient.connect(reactor, endpoint)
        in_flight = client.send_message(MessageSpec(queue_id="4TERM1"))
        yield _sleep(1.0)  # the message is now waiting at its (slow) end of message
        milter.signal(signal.SIGTERM)
        result = yield in_flight
        self.assertEqual(result.action, "accept")
        status = yield threads.deferToThread(milter.wait_exit, 30.0)
        self.assertIsNotNone(status)
        self.assertRegex(milter.log_text(), r"msg done: queue_id: <4TERM1>;")
        self.assertFalse(harness.base.tcp_accepts("127.0.0.1", milter.inet_port))


def _sleep(seconds: float) -> defer.Deferred:
    from twisted.internet.task import deferLater

    return deferLater(reactor, seconds, lambda: None)
