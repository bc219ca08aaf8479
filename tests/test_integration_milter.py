"""The milter service end to end: ``twistd rmilter`` driven by miltertest, by a real Postfix
(SASL, XCLIENT, inet and unix sockets) and by hostile clients (garbage and oversized frames).

The pipeline's ``trace_header`` extension makes what rmilter received visible in the message:
``rmilter <version>; tag=<tag>; queue_id=<qid>; client=<address>; user=<login or unauthorized>``.
"""
from __future__ import annotations

import re
import socket
import struct
from typing import Dict, List

from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.trial.unittest import SynchronousTestCase, TestCase

from rmilter.testing.mta import ClientSpec, MessageSpec, MilterClient
from tests import harness
from tests.dates import message_date

TRACE = "X-Rmilter-Trace"
TRACE_CONFIG = 'trace_header = "%s";\n' % TRACE

HAM = (
    b"From: Alice <alice@example.com>\r\nTo: Bob <bob@example.org>\r\nSubject: Lunch\r\n"
    b"Date: %s\r\nMessage-ID: <ham-1@example.com>\r\n"
    b"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n"
    b"Hi Bob, lunch tomorrow?\r\n"
) % (message_date().encode("ascii"),)

_TRACE_FIELD = re.compile(r"(\w+)=([^;]*)")


def trace_fields(value: str) -> Dict[str, str]:
    """The ``name=value`` fields of a trace header value."""
    return {name: field.strip() for name, field in _TRACE_FIELD.findall(value)}


def summary_lines(milter: harness.Rmilter) -> List[str]:
    return [line for line in milter.log_text().splitlines() if "msg done:" in line]


class MiltertestTests(SynchronousTestCase):
    """miltertest (libmilter's view of the protocol) against the running service."""

    def setUp(self) -> None:
        self.milter = harness.start_rmilter(self, TRACE_CONFIG)

    def test_full_message_inet(self) -> None:
        """A whole message over TCP is accepted at EOM with the trace header naming the
        queue id, the client address and the authenticated user; the summary line agrees."""
        result = harness.miltertest(self.milter.milter_inet, hdr=TRACE, auth="alice", queue_id="4QIDA1")
        self.assertTrue(result.passed, result.output)
        self.assertEqual(result.eom_replies, ["a"])
        [value] = result.headers(TRACE)
        fields = trace_fields(value)
        self.assertEqual((fields["queue_id"], fields["client"], fields["user"]),
                         ("4QIDA1", "192.0.2.10", "alice"))
        self.assertRegex(fields["tag"], r"^[0-9a-f]{10}$")
        line = self.milter.wait_for_log(r"<%s>; msg done: queue_id: <4QIDA1>;.*" % fields["tag"]).group(0)
        self.assertIn("ip: 192.0.2.10;", line)
        self.assertIn("from: <alice@example.com>;", line)
        self.assertIn("user: alice;", line)

    def test_full_message_unix_unauthenticated(self) -> None:
        """Over the unix socket, an unauthenticated client's message carries user=unauthorized."""
        result = harness.miltertest(self.milter.milter_unix, hdr=TRACE, client_addr="198.51.100.7",
                                    queue_id="4QIDU1")
        self.assertTrue(result.passed, result.output)
        [value] = result.headers(TRACE)
        fields = trace_fields(value)
        self.assertEqual((fields["queue_id"], fields["client"], fields["user"]),
                         ("4QIDU1", "198.51.100.7", "unauthorized"))

    def test_two_messages_with_abort_between(self) -> None:
        """Two messages on one connection, ABORT between them (as Postfix does): each gets its
        own tag and queue id, and each has its own summary line."""
        result = harness.miltertest(self.milter.milter_inet, hdr=TRACE, messages=2, queue_id="4QIDB")
        self.assertTrue(result.passed, result.output)
        self.assertEqual(result.eom_replies, ["a", "a"])
        first, second = [trace_fields(v) for v in result.headers(TRACE)]
        self.assertEqual((first["queue_id"], second["queue_id"]), ("4QIDB", "4QIDB2"))
        self.assertNotEqual(first["tag"], second["tag"])
        self.milter.wait_for_log(r"<%s>; msg done: queue_id: <4QIDB2>;" % second["tag"])
        self.milter.wait_for_log(r"<%s>; msg done: queue_id: <4QIDB>;" % first["tag"])

    def test_aborted_message_leaves_nothing_behind(self) -> None:
        """A message aborted after its body (no EOM) does not leak into the next one: the next
        message's header names only its own queue id and user, and it is accepted."""
        result = harness.miltertest(self.milter.milter_inet, hdr=TRACE, messages=2, abort_first=1,
                                    queue_id="4QIDC", auth="bob")
        self.assertTrue(result.passed, result.output)
        self.assertIn("MSG 1 ABORTED", result.output)
        self.assertEqual(result.eom_replies, ["a"])
        [value] = result.headers(TRACE)
        self.assertEqual(trace_fields(value)["queue_id"], "4QIDC2")
        self.milter.wait_for_log(r"msg done: queue_id: <4QIDC2>;")
        self.assertEqual([line for line in summary_lines(self.milter) if "queue_id: <4QIDC>;" in line], [])

    def test_no_trace_header_unless_configured(self) -> None:
        """Without trace_header, an accepted message gets no such header."""
        plain = harness.start_rmilter(self, "")
        result = harness.miltertest(plain.milter_inet, hdr=TRACE, expect="any")
        self.assertTrue(result.passed, result.output)
        self.assertEqual(result.eom_replies, ["a"])
        self.assertEqual(result.headers(TRACE), [])


class PostfixTests(SynchronousTestCase):
    """A real Postfix 3.7 relaying to smtp-sink through rmilter."""

    def setUp(self) -> None:
        # smtpd runs as user postfix: the unix socket must be reachable for it
        self.milter = harness.start_rmilter(self, TRACE_CONFIG, unix_mode="666")
        self.postfix = harness.start_postfix(self)

    def assert_delivered_with_trace(self, queue_id: str, client: str, user: str) -> harness.DeliveredMessage:
        [delivered] = self.postfix.wait_delivered(1)
        values = delivered.headers(TRACE)
        self.assertEqual(len(values), 1, delivered.raw[:2000])
        fields = trace_fields(values[0])
        self.assertEqual((fields["queue_id"], fields["client"], fields["user"]), (queue_id, client, user))
        self.assertIn(b"Hi Bob, lunch tomorrow?", delivered.body)
        return delivered

    def test_inet_with_sasl_auth(self) -> None:
        """Over TCP, an authenticated message reaches the sink with {auth_authen} = alice in the
        trace header, and the queue id Postfix gave it."""
        self.postfix.set_milters(self.milter.milter_inet)
        sent = self.postfix.swaks(HAM, auth_user="alice")
        self.assertEqual(sent.status, 0, sent.transcript)
        self.assert_delivered_with_trace(sent.queue_id or "?", "127.0.0.1", "alice")
        self.milter.wait_for_log(r"msg done: queue_id: <%s>;.*user: alice;" % sent.queue_id)

    def test_unix_socket_with_sasl_auth_and_xclient(self) -> None:
        """Over the unix socket: an authenticated message carries user=bob; a client claimed
        with XCLIENT (a new milter session) is seen with its address, unauthenticated."""
        self.postfix.set_milters(self.milter.milter_unix)
        sent = self.postfix.swaks(HAM, auth_user="bob")
        self.assertEqual(sent.status, 0, sent.transcript)
        self.assert_delivered_with_trace(sent.queue_id or "?", "127.0.0.1", "bob")
        self.postfix.sink.clear()
        relayed = self.postfix.swaks(HAM, sender="carol@example.net",
                                     xclient_addr="198.51.100.7", xclient_name="mail.example.net")
        self.assertEqual(relayed.status, 0, relayed.transcript)
        self.assert_delivered_with_trace(relayed.queue_id or "?", "198.51.100.7", "unauthorized")

    def test_restart_on_same_socket(self) -> None:
        """While rmilter is stopped Postfix tempfails (milter_default_action); started again on
        the same unix socket path (stale file replaced), mail flows again."""
        self.postfix.set_milters(self.milter.milter_unix, default_action="tempfail")
        self.milter.stop()
        refused = self.postfix.swaks(HAM)
        self.assertIn("451 4.7.1 Service unavailable - try again later", refused.server_replies,
                      refused.transcript)
        self.milter.start()
        sent = self.postfix.swaks(HAM, auth_user="alice")
        self.assertEqual(sent.status, 0, sent.transcript)
        self.assert_delivered_with_trace(sent.queue_id or "?", "127.0.0.1", "alice")


def _read_until_closed(sock: socket.socket, timeout: float) -> bytes:
    """Everything the server sends until it closes the connection (fails on timeout)."""
    sock.settimeout(timeout)
    received = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return received
        except socket.timeout:
            raise AssertionError("the server kept the connection open for %.0f s" % timeout)
        if not chunk:
            return received
        received += chunk


class HostileClientTests(TestCase):
    """Garbage and oversized frames close that connection only (SPEC §3.8)."""

    timeout = 120

    def setUp(self) -> None:
        self.milter = harness.start_rmilter(self, TRACE_CONFIG + "max_frame_size = 2M;\n")

    def raw_connection(self) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", self.milter.inet_port), timeout=10)
        self.addCleanup(sock.close)
        return sock

    @defer.inlineCallbacks
    def check_bad_input_closes_only_that_connection(self, garbage: bytes, log_pattern: str):  # type: ignore[no-untyped-def]
        # a well-behaved connection, negotiated before the bad one arrives
        good = yield MilterClient.connect(reactor, TCP4ClientEndpoint(reactor, "127.0.0.1", self.milter.inet_port))
        offset = self.milter.log_size()
        bad = self.raw_connection()
        bad.sendall(garbage)
        self.assertEqual(_read_until_closed(bad, 10), b"")
        self.milter.wait_for_log(log_pattern, offset=offset)
        # the earlier connection still completes a message, and so does a new one
        result = yield good.send_message(MessageSpec(client=ClientSpec(address="203.0.113.5")))
        yield good.close()
        self.assertEqual(result.action, "accept")
        self.assertEqual(trace_fields(dict(result.added_headers)[TRACE])["client"], "203.0.113.5")
        after = harness.miltertest(self.milter.milter_inet, hdr=TRACE)
        self.assertTrue(after.passed, after.output)
        self.assertTrue(self.milter.running())

    def test_http_request_garbage(self) -> defer.Deferred:
        """An HTTP request (read as a 1.2 GB frame length) is refused at once, not buffered."""
        return self.check_bad_input_closes_only_that_connection(
            b"GET / HTTP/1.0\r\n\r\n", r"milter protocol error: .*closing the connection")

    def test_oversized_frame_refused_before_buffering(self) -> defer.Deferred:
        """A frame announcing 64 MiB (limit 2 MiB) is refused after its 4-byte length, without
        waiting for the payload."""
        return self.check_bad_input_closes_only_that_connection(
            struct.pack("!I", 64 * 1024 * 1024) + b"O" + b"\0" * 100,
            r"milter protocol error: .*closing the connection")

    def test_zero_length_frame(self) -> defer.Deferred:
        """L=0 is invalid: the connection is closed with a log line."""
        return self.check_bad_input_closes_only_that_connection(
            b"\0\0\0\0", r"milter protocol error: .*closing the connection")

    def test_unknown_command(self) -> defer.Deferred:
        """An unknown command code closes the connection (libmilter behaviour)."""
        return self.check_bad_input_closes_only_that_connection(
            struct.pack("!I", 1) + b"Z", r"milter protocol error: .*closing the connection")

    @defer.inlineCallbacks
    def test_large_header_below_limit_accepted(self):  # type: ignore[no-untyped-def]
        """A 1.5 MiB header (one frame, below max_frame_size) is accepted: rmilter must take
        frames of at least 1 MiB, which libmilter would refuse."""
        client = yield MilterClient.connect(reactor, TCP4ClientEndpoint(reactor, "127.0.0.1", self.milter.inet_port))
        big = "x" * (1536 * 1024)
        spec = MessageSpec(headers=MessageSpec().headers + (("X-Big", big),))
        result = yield client.send_message(spec)
        yield client.close()
        self.assertEqual(result.action, "accept")
        self.assertIn(TRACE, dict(result.added_headers))
