"""Whether the real Rspamd normal worker keeps a connection open between scans (issue 12).

Rspamd 3.4 writes ``Connection: close`` into every reply of its HTTP server
(src/libserver/http/http_connection.c) and its normal worker ends the session
after the reply (src/worker.c), whatever the client asks; ``keepalive`` on an
``rspamd_proxy`` upstream only exists from Rspamd 3.12 and only pools the
proxy's own connections to servers that keep them.  So rmilter sends no
``Connection`` header (HTTP/1.1 is persistent by default), its pool keeps a
connection only where a server (a keeping proxy, a TLS terminator) allows it,
and against the worker every scan connects anew.  These tests fail the day the
worker starts keeping connections - then the pool reuses them without a change.
"""
from __future__ import annotations

from typing import Any, List

from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from rmilter.backends.rspamd import MessageBody, RspamdClient, ScanRequest
from rmilter.config import parse_text
from tests.harness import shared_rspamd

MESSAGE = (b"From: alice@example.net\r\nTo: bob@example.org\r\nSubject: keep-alive\r\n"
           b"Message-ID: <keepalive-test@example.net>\r\n\r\nTwo scans, one connection?\r\n")
REQUEST = ScanRequest(queue_id="4KA00001", recipients=("<bob@example.org>",), envelope_from="alice@example.net",
                      helo="client.example.net", ip="192.0.2.10", tag="katest")


class _RawExchange(Protocol):
    """Sends bytes as they are and records everything until the server closes."""

    def __init__(self, request: bytes) -> None:
        self.request = request
        self.received: List[bytes] = []
        self.reason: Any = None
        self.closed: "defer.Deferred[None]" = defer.Deferred()

    def connectionMade(self) -> None:
        transport: Any = self.transport
        transport.write(self.request)

    def dataReceived(self, data: bytes) -> None:
        self.received.append(data)

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:
        self.reason = reason
        self.closed.callback(None)


class WorkerKeepAliveTests(TestCase):
    timeout = 60

    def setUp(self) -> None:
        self.rspamd = shared_rspamd()

    @defer.inlineCallbacks
    def test_worker_closes_even_when_asked_to_keep(self) -> Any:
        """Two requests on one connection that asks ``Connection: keep-alive``: one reply, then close."""
        one = (b"POST /checkv2 HTTP/1.1\r\nHost: %s\r\nConnection: keep-alive\r\nQueue-Id: 4KA00002\r\n"
               b"Content-Type: text/plain\r\nContent-Length: %d\r\n\r\n%s"
               % (self.rspamd.address.encode(), len(MESSAGE), MESSAGE))
        exchange = _RawExchange(one + one)
        endpoint = TCP4ClientEndpoint(reactor, self.rspamd.host, self.rspamd.normal_port, timeout=5)
        yield connectProtocol(endpoint, exchange)
        yield exchange.closed
        self.assertTrue(exchange.reason.check(ConnectionDone), exchange.reason)  # the worker closed it, cleanly
        data = b"".join(exchange.received)
        self.assertEqual(data.count(b"HTTP/1.1 200"), 1, data[:300])
        head = data.split(b"\r\n\r\n", 1)[0].lower()
        self.assertIn(b"\r\nconnection: close", head)

    @defer.inlineCallbacks
    def test_every_scan_connects_anew(self) -> Any:
        """rmilter's pooled client against the worker: each scan its own connection, none left open."""
        config = parse_text('spamd { servers = "%s"; connect_timeout = 2s; results_timeout = 20s; };'
                            % (self.rspamd.address,))
        client = RspamdClient(config.spamd, reactor)
        self.addCleanup(client.stop)
        transport: Any = client.http
        for _ in range(3):
            scan = yield client.scan(REQUEST, MessageBody(data=MESSAGE))
            self.assertEqual(scan.reply.action, "no action")
        self.assertEqual(transport.connects, 3)
        self.assertEqual(transport.pool._connections, {})
