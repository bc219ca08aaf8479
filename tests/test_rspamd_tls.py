"""Rspamd over HTTPS through a real TLS terminator (stunnel4) in front of the real Rspamd (issue 12).

The CA and the certificates are made at test time (tests/harness/stunnel.py).  A valid
certificate scans; a certificate for another host name, or an expired one, is refused with
one log line naming why, counts as a failed attempt (the next server is tried), and with
no server left the scan fails with ``RspamdError`` (what ``tempfail_on_error`` acts on).
"""
from __future__ import annotations

from typing import Any, List, Tuple

from twisted.internet import defer, reactor
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import TestCase

from rmilter.backends.rspamd import MessageBody, RspamdClient, RspamdError, ScanRequest
from rmilter.config import parse_text
from tests.harness import shared_rspamd
from tests.harness.stunnel import Stunnel

MESSAGE = (b"From: alice@example.net\r\nTo: bob@example.org\r\nSubject: tls\r\n"
           b"Message-ID: <tls-test@example.net>\r\n\r\nHello over TLS.\r\n")
REQUEST = ScanRequest(queue_id="4TLS0001", recipients=("<bob@example.org>",), envelope_from="alice@example.net",
                      helo="client.example.net", ip="192.0.2.10", tag="tlstest")

_stunnel: List[Stunnel] = []


def stunnel() -> Stunnel:
    """One stunnel per test process in front of the shared Rspamd."""
    if not _stunnel:
        _stunnel.append(Stunnel(shared_rspamd().address).start())
    return _stunnel[0]


class TLSScanTests(TestCase):
    def client(self, *services: str, retry_count: int = 1) -> RspamdClient:
        tls = stunnel()
        servers = ", ".join('"%s"' % tls.server(s) for s in services)
        config = parse_text('spamd { servers = %s; tls_ca = "%s"; retry_count = %d; retry_timeout = 0s; '
                            'connect_timeout = 2s; results_timeout = 20s; };' % (servers, tls.ca_path, retry_count))
        client = RspamdClient(config.spamd, reactor)
        self.addCleanup(self.closed, set(tls.ports.values()))
        self.addCleanup(client.stop)
        return client

    @defer.inlineCallbacks
    def closed(self, ports: Any) -> Any:
        """Wait until the TLS shutdown of the connections Rspamd closed has ended (at most 5 s)."""
        from twisted.internet.task import deferLater

        for _ in range(500):
            if not any(getattr(s, "realAddress", (None, None))[1] in ports
                       for s in reactor.getReaders() + reactor.getWriters()):
                return
            yield deferLater(reactor, 0.01, lambda: None)

    def log_lines(self) -> List[str]:
        lines: List[str] = []

        def observe(event: Any) -> None:
            if event.get("log_namespace") == "rmilter.backends.upstream":
                from twisted.logger import formatEvent
                lines.append(formatEvent(event))

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)
        return lines

    @defer.inlineCallbacks
    def test_valid_certificate_scans(self) -> Any:
        result = yield self.client("good").scan(REQUEST, MessageBody(data=MESSAGE))
        self.assertEqual((result.server.tls, result.attempts), (True, 1))
        self.assertIn(result.reply.action, ("no action", "add header", "greylist", "rewrite subject"))
        self.assertTrue(result.reply.symbols)  # a real scan result came through the tunnel

    @defer.inlineCallbacks
    def refused(self, service: str, expected: str) -> Any:
        lines = self.log_lines()
        client = self.client(service)
        try:
            yield client.scan(REQUEST, MessageBody(data=MESSAGE))
        except RspamdError as e:
            errors: Tuple[str, ...] = e.errors
        else:
            self.fail("a scan through the %s certificate succeeded" % service)
        self.assertEqual(len(errors), 1)
        self.assertIn("TLS", errors[0])
        self.assertIn(expected, errors[0])
        tls_lines = [line for line in lines if "TLS" in line]
        self.assertEqual(len(tls_lines), 1, lines)
        self.assertIn(expected, tls_lines[0])
        self.assertEqual(client.upstreams.upstreams[0].errors, 1)  # blamed: a failed attempt

    def test_wrong_host_name_is_refused(self) -> Any:
        return self.refused("wrong", "localhost")

    def test_expired_certificate_is_refused(self) -> Any:
        return self.refused("expired", "certificate")

    @defer.inlineCallbacks
    def test_refused_certificate_fails_over(self) -> Any:
        client = self.client("wrong", "good", retry_count=2)
        order = list(client.config.servers)
        self.patch(client.upstreams, "choose_random",
                   lambda exclude=(): [s for s in order if s not in exclude][0])
        result = yield client.scan(REQUEST, MessageBody(data=MESSAGE))
        self.assertEqual((result.server, result.attempts), (order[1], 2))
