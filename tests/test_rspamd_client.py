"""The Rspamd HTTP client: request (SPEC §6.8.1), replies (§6.8.2), failures, retries and health (§6.6)."""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import random
import tempfile
from typing import Any, List, Tuple

import zstandard
from twisted.internet import error as net_error
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.protocol import ClientFactory
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from rmilter.backends import rspamd
from rmilter.backends.rspamd import (
    BadReply,
    MessageBody,
    RspamdClient,
    RspamdError,
    ScanRequest,
    from_config,
    parse_scan_reply,
    prepare_body,
    server_endpoint,
)
from rmilter.backends.rspamd.transport import POOL_IDLE_TIMEOUT
from rmilter.backends.rspamd.reply import ZSTD_MAGIC
from rmilter.backends.rspamd import request as rspamd_request
from rmilter.backends.rspamd.request import BytesProducer, SpoolProducer
from rmilter.config import parse_text
from rmilter.config.schema import Config, ServerSpec, SpamdConfig
from rmilter.spool import Spool, run_inline
from rmilter.testing.fake_rspamd import (
    HANG,
    REFUSE,
    FakeReply,
    FakeRspamd,
    FakeRspamdCluster,
    checkv2_reply,
    legacy_reply,
)

R1 = ServerSpec("r1", host="127.0.0.1", port=11333)
R2 = ServerSpec("r2", host="127.0.0.2", port=11333)
MESSAGE = b"Received: from x\r\nSubject: hi\n\r\nbody\r\n"

FULL_REQUEST = ScanRequest(
    queue_id="4ABCDEF",
    recipients=("<Bob@example.org>", "<carol@example.org>"),
    envelope_from="alice@example.net",
    helo="mail.example.net",
    hostname="mail.example.net",
    ip="192.0.2.10",
    user="alice",
    settings_id="inbound",
    mta_tag="mx.example.org",
    tag="0123456789",
)


class ClientTestCase(SynchronousTestCase):
    def make_client(self, servers=(R1,), **spamd: Any) -> RspamdClient:
        self.clock = Clock()
        self.fakes = FakeRspamdCluster({s.name: FakeRspamd() for s in servers}, clock=self.clock)
        config = SpamdConfig(servers=tuple(servers), **spamd)
        return RspamdClient(config, self.clock, endpoint_for=self.fakes.endpoint_for, rng=random.Random(1))

    def scan(self, client: RspamdClient, request: ScanRequest = FULL_REQUEST, body: bytes = MESSAGE):
        d = client.scan(request, MessageBody(data=body))
        self.clock.advance(0)  # the in-memory Rspamd answers from the clock, as a socket would
        return d


class RequestTests(ClientTestCase):
    def test_headers_in_spec_order_and_body(self) -> None:
        """SPEC §6.8.1: POST /checkv2, one Rcpt per recipient, then From .. MTA-Tag, the spool as body."""
        client = self.make_client()
        self.successResultOf(self.scan(client))
        [request] = self.fakes["r1"].requests
        self.assertEqual((request.method, request.path), ("POST", "/checkv2"))
        self.assertEqual(request.header_values("Rcpt"), ["<Bob@example.org>", "<carol@example.org>"])
        expected = ["rcpt", "from", "helo", "hostname", "ip", "user", "queue-id", "settings-id", "mta-tag"]
        names = [n for n in request.header_names if n in expected]
        self.assertEqual(names, expected)
        self.assertEqual(request.header("From"), "alice@example.net")
        self.assertEqual(request.header("Helo"), "mail.example.net")
        self.assertEqual(request.header("IP"), "192.0.2.10")
        self.assertEqual(request.header("User"), "alice")
        self.assertEqual(request.header("Queue-Id"), "4ABCDEF")
        self.assertEqual(request.header("Settings-ID"), "inbound")
        self.assertEqual(request.header("MTA-Tag"), "mx.example.org")
        self.assertEqual(request.header("Content-Type"), "text/plain")
        self.assertEqual(request.header("Content-Length"), str(len(MESSAGE)))
        self.assertIsNone(request.header("Settings"))
        self.assertIsNone(request.header("Pass"))
        self.assertEqual(request.body, MESSAGE)

    def test_empty_values_are_not_sent(self) -> None:
        """Only Queue-Id is always sent; a hostname of ``unknown`` is omitted too."""
        client = self.make_client()
        self.successResultOf(self.scan(client, ScanRequest(queue_id="NOQUEUE", hostname="unknown")))
        [request] = self.fakes["r1"].requests
        for name in ("rcpt", "from", "helo", "hostname", "ip", "user", "settings-id", "mta-tag"):
            self.assertIsNone(request.header(name), name)
        self.assertEqual(request.header("Queue-Id"), "NOQUEUE")

    def test_settings_header_for_dkim_only_scans(self) -> None:
        client = self.make_client()
        request = dataclasses.replace(FULL_REQUEST, settings=rspamd.DKIM_ONLY_SETTINGS)
        self.successResultOf(self.scan(client, request))
        self.assertEqual(self.fakes["r1"].requests[0].header("Settings"), '{"groups_enabled":["dkim"]}')

    def test_header_values_cannot_inject_lines(self) -> None:
        """A HELO with CR/LF cannot add a request header of its own."""
        client = self.make_client()
        request = dataclasses.replace(FULL_REQUEST, helo="evil\r\nUser: root")
        self.successResultOf(self.scan(client, request))
        [request_seen] = self.fakes["r1"].requests
        self.assertEqual(request_seen.header_values("User"), ["alice"])
        self.assertEqual(request_seen.header("Helo"), "evil  User: root")

    def test_legacy_protocol_posts_symbols(self) -> None:
        """``protocol = legacy`` sends the C request line ``POST /symbols`` and reads the v1 shape."""
        client = self.make_client(protocol="legacy")
        self.fakes["r1"].answer(legacy_reply(action="add header", score=7.5, required_score=15))
        result = self.successResultOf(self.scan(client))
        self.assertEqual(self.fakes["r1"].requests[0].path, "/symbols")
        self.assertEqual((result.reply.action, result.reply.score), ("add header", 7.5))

    def test_both_reply_shapes_whatever_the_endpoint(self) -> None:
        client = self.make_client()
        self.fakes["r1"].answer_next(legacy_reply(action="reject", score=20), checkv2_reply(action="greylist"))
        self.assertEqual(self.successResultOf(self.scan(client)).reply.action, "reject")
        self.assertEqual(self.successResultOf(self.scan(client)).reply.action, "greylist")

    def test_compression(self) -> None:
        """``compression = yes``: zstd body with ``Compression: zstd``; the zstd reply is read."""
        client = self.make_client(compression=True)
        self.fakes["r1"].answer(checkv2_reply(action="add header", score=6.5))
        spool = Spool(tempfile.gettempdir(), 0o600, 1 << 20, run_inline)
        self.addCleanup(spool.close)
        spool.set_head(b"Subject: x\n\r\n")
        spool.append(b"hello " * 1000)
        body = self.successResultOf(prepare_body(spool, True, run_inline))
        self.assertTrue(body.compressed)
        d = client.scan(FULL_REQUEST, body)
        self.clock.advance(0)
        result = self.successResultOf(d)
        [request] = self.fakes["r1"].requests
        self.assertEqual(request.header("Compression"), "zstd")
        self.assertEqual(request.header("Content-Type"), "application/x-compressed")
        self.assertEqual(request.raw_body[:4], ZSTD_MAGIC)
        self.assertLess(len(request.raw_body), 200)
        self.assertEqual(request.body, spool.memory_bytes())
        self.assertEqual(result.reply.action, "add header")

    def test_plain_reply_to_compressed_request_is_read(self) -> None:
        client = self.make_client(compression=True)
        self.fakes["r1"].compress_replies = False
        self.fakes["r1"].answer(checkv2_reply(action="reject"))
        body = MessageBody(data=zstandard.ZstdCompressor().compress(MESSAGE), compressed=True)
        d = client.scan(FULL_REQUEST, body)
        self.clock.advance(0)
        self.assertEqual(self.successResultOf(d).reply.action, "reject")


class BodyTests(SynchronousTestCase):
    def make_spool(self, body: bytes, memory_limit: int) -> Spool:
        tempdir = tempfile.mkdtemp()
        spool = Spool(tempdir, 0o600, memory_limit, run_inline)
        spool.set_head(b"Subject: big\n\r\n")
        spool.append(body)
        self.successResultOf(spool.finish())

        def cleanup() -> None:
            spool.close()
            os.rmdir(tempdir)

        self.addCleanup(cleanup)
        return spool

    def test_memory_spool_is_one_shared_buffer(self) -> None:
        """In memory: every attempt writes the very same bytes object (no copy per attempt)."""
        spool = self.make_spool(b"x" * 5000, 1 << 20)
        body = self.successResultOf(prepare_body(spool, False, run_inline))
        self.assertIsNotNone(body.data)
        written: List[bytes] = []

        class Consumer:
            def write(self, data: bytes) -> None:
                written.append(data)

        for _ in range(3):
            producer: Any = body.producer()
            self.assertEqual(producer.length, spool.size)
            self.successResultOf(producer.startProducing(Consumer()))
        self.assertEqual(len(written), 3)
        self.assertIs(written[0], body.data)
        self.assertIs(written[2], body.data)

    def test_file_spool_is_streamed_in_chunks(self) -> None:
        """A spool in a file goes out in CHUNK_SIZE reads, all of it, with the right length."""
        payload = bytes(range(256)) * 1000  # 256000 bytes
        spool = self.make_spool(payload, 1000)
        self.assertFalse(spool.in_memory)
        body = self.successResultOf(prepare_body(spool, False, run_inline))
        self.assertIsNone(body.data)
        self.patch(rspamd_request, "CHUNK_SIZE", 64 * 1024)
        reads: List[Tuple[int, int]] = []
        original = spool.read

        def counting(offset: int, length: int):  # type: ignore[no-untyped-def]
            reads.append((offset, length))
            return original(offset, length)

        self.patch(spool, "read", counting)
        clock = Clock()
        fakes = FakeRspamdCluster({"r1": FakeRspamd()}, clock=clock)
        client = RspamdClient(SpamdConfig(servers=(R1,)), clock, endpoint_for=fakes.endpoint_for)
        d = client.scan(FULL_REQUEST, body)
        clock.advance(0)
        self.successResultOf(d)
        self.assertEqual(fakes["r1"].requests[0].body, spool.head + payload)
        self.assertEqual(len(reads), 4)
        self.assertTrue(all(length <= 64 * 1024 for _, length in reads))

    def test_spool_producer_honours_pause_and_stop(self) -> None:
        """Backpressure: nothing is read while paused; nothing after stopProducing."""
        spool = self.make_spool(b"y" * 300, 10)
        written: List[bytes] = []

        class Consumer:
            def write(self, data: bytes) -> None:
                written.append(data)
                producer.pauseProducing()

        producer = SpoolProducer(spool, chunk_size=100)
        done = producer.startProducing(Consumer())
        self.assertEqual(len(written), 1)
        self.assertNoResult(done)
        producer.resumeProducing()
        self.assertEqual(len(written), 2)
        producer.stopProducing()
        producer.resumeProducing()
        self.assertEqual(len(written), 2)
        self.assertNoResult(done)

    def test_spool_producer_finishes_with_every_byte(self) -> None:
        spool = self.make_spool(b"z" * 250, 10)
        written: List[bytes] = []

        class Consumer:
            def write(self, data: bytes) -> None:
                written.append(data)

        producer = SpoolProducer(spool, chunk_size=100)
        self.successResultOf(producer.startProducing(Consumer()))
        self.assertEqual(b"".join(written), spool.head + b"z" * 250)

    def test_bytes_producer(self) -> None:
        producer = BytesProducer(b"abc")
        self.assertEqual(producer.length, 3)


class ReplyParsingTests(SynchronousTestCase):
    def test_legacy_shape(self) -> None:
        """v1 reply: fields and symbols in ``default``; only string options; ``rmilter`` block."""
        doc = legacy_reply(action="rewrite subject", score=9.5, required_score=15, subject="*** SPAM *** hi",
                           symbols={"A": (5.0, ["x", "y"]), "B": (-1.0, [])}, smtp_message="no thanks",
                           message_id="<m@x>", dkim_signature="v=1; a=rsa-sha256",
                           rmilter={"remove_headers": {"X-Spam": 1}, "add_headers": {"X-A": "1"}})
        doc["default"]["A"]["options"].append(42)
        reply = parse_scan_reply(json.dumps(doc).encode())
        self.assertEqual((reply.action, reply.score, reply.required_score), ("rewrite subject", 9.5, 15.0))
        self.assertEqual(reply.subject, "*** SPAM *** hi")
        self.assertEqual([(s.name, s.score, s.options) for s in reply.symbols],
                         [("A", 5.0, ("x", "y")), ("B", -1.0, ())])
        self.assertEqual(reply.smtp_message, "no thanks")
        self.assertEqual(reply.message_id, "<m@x>")
        self.assertEqual(reply.dkim_signatures, ("v=1; a=rsa-sha256",))
        self.assertEqual(reply.header_block, "rmilter")
        self.assertEqual(reply.remove_headers, (("X-Spam", 1),))
        self.assertEqual([(h.name, h.value, h.order) for h in reply.add_headers], [("X-A", "1", None)])

    def test_checkv2_shape_with_milter_block(self) -> None:
        doc = checkv2_reply(
            action="add header", score=6.0, symbols={"GTUBE": 6.0}, message_id="<id@x>",
            milter={
                "add_headers": {
                    "X-Spamd-Result": {"value": "default: True", "order": -1},
                    "X-Top": {"value": "top", "order": 0},
                    "X-List": ["one", "two"],
                    "X-Plain": "plain",
                    "X-Bad": 5,
                },
                "remove_headers": {"X-Spam": 0, "X-Old": -1, "X-Bool": True},
                "change_from": "<new@example.net>",
                "add_rcpt": ["<copy@example.org>"],
                "del_rcpt": ["<bob@example.org>"],
                "reject": "discard",
                "no_action": True,
                "spam_header": {"X-Spam-Flag": "YES"},
                "unknown_key": {"ignored": True},
            },
        )
        reply = parse_scan_reply(json.dumps(doc).encode())
        self.assertEqual(reply.header_block, "milter")
        self.assertEqual(
            [(h.name, h.value, h.order) for h in reply.add_headers],
            [("X-Spamd-Result", "default: True", -1), ("X-Top", "top", 0), ("X-List", "one", None),
             ("X-List", "two", None), ("X-Plain", "plain", None)],
        )
        self.assertEqual(reply.remove_headers, (("X-Spam", 0), ("X-Old", -1)))
        self.assertEqual(reply.change_from, "<new@example.net>")
        self.assertEqual((reply.add_rcpt, reply.del_rcpt), (("<copy@example.org>",), ("<bob@example.org>",)))
        self.assertEqual(reply.reject_mode, "discard")
        self.assertTrue(reply.no_action)
        self.assertEqual(reply.spam_headers, (("X-Spam-Flag", "YES"),))
        self.assertTrue(reply.has_symbol("GTUBE"))

    def test_repeated_keys_give_several_headers(self) -> None:
        """UCL allows a key twice; each occurrence is one header (SPEC §6.8.5 (3))."""
        body = b'{"default": {"action": "no action"}, "rmilter": {"add_headers": {"X-A": "1", "X-A": "2"}}}'
        reply = parse_scan_reply(body)
        self.assertEqual([h.value for h in reply.add_headers], ["1", "2"])

    def test_unknown_or_missing_action_is_no_action(self) -> None:
        reply = parse_scan_reply(json.dumps(checkv2_reply(action="quarantine")).encode())
        self.assertEqual((reply.action, reply.unknown_action), ("no action", "quarantine"))
        reply = parse_scan_reply(b'{"default": {"score": 1.0}}')
        self.assertEqual((reply.action, reply.unknown_action), ("no action", ""))

    def test_unparsable_reply(self) -> None:
        self.assertRaises(BadReply, parse_scan_reply, b"<html>oops</html>")
        self.assertRaises(BadReply, parse_scan_reply, b"[1, 2]")
        self.assertRaises(BadReply, parse_scan_reply, b'{"urls": []}')
        e = self.assertRaises(BadReply, parse_scan_reply, b'{"error": "bad request"}', 400)
        self.assertEqual(e.status, 400)
        self.assertIn("bad request", str(e))

    def test_huge_numbers(self) -> None:
        reply = parse_scan_reply(b'{"action": "reject", "score": 1' + b"0" * 400 + b'}')
        self.assertEqual((reply.action, reply.score), ("reject", 0.0))

    def test_status_not_checked_when_body_is_a_result(self) -> None:
        """SPEC §6.8.2: a scan result counts even with another HTTP status."""
        self.assertEqual(parse_scan_reply(json.dumps(checkv2_reply(action="reject")).encode(), 500).action, "reject")


class FailureTests(ClientTestCase):
    def test_connection_refused_then_other_server(self) -> None:
        """A refused connection is retried after retry_timeout, on the other server."""
        client = self.make_client(servers=(R1, R2), retry_timeout=1.0)
        order = [R1, R2]
        self.patch(client.upstreams, "choose_random", lambda exclude=(): [s for s in order if s not in exclude][0])
        self.fakes["r1"].refuse()
        d = self.scan(client)
        self.assertNoResult(d)  # waiting, without blocking, for the retry pause
        self.clock.advance(1.0)
        result = self.successResultOf(d)
        self.assertEqual((result.server, result.attempts), (R2, 2))
        self.assertEqual(result.elapsed, 1.0)
        self.assertEqual(len(self.fakes["r2"].requests), 1)

    def test_all_attempts_fail(self) -> None:
        """retry_count attempts in all, then RspamdError naming each failure."""
        client = self.make_client(retry_count=3, retry_timeout=0.5)
        self.fakes["r1"].refuse()
        d = self.scan(client)
        self.clock.advance(0.5)
        self.assertNoResult(d)
        self.clock.advance(0.5)
        failure = self.failureResultOf(d, RspamdError)
        self.assertEqual(len(failure.value.errors), 3)
        self.assertIn("r1: connection refused", failure.value.errors[0])

    def test_timeout_covers_the_whole_exchange(self) -> None:
        """No answer: the attempt ends after connect_timeout + results_timeout, then the retry works."""
        client = self.make_client(connect_timeout=1.0, results_timeout=4.0, retry_count=2, retry_timeout=1.0)
        self.fakes["r1"].answer_next(HANG)
        d = self.scan(client)
        self.clock.advance(4.9)
        self.assertNoResult(d)
        self.clock.advance(0.1)
        self.assertNoResult(d)  # attempt 1 timed out, pause before attempt 2
        self.clock.advance(1.0)
        result = self.successResultOf(d)
        self.assertEqual(result.attempts, 2)
        self.assertEqual(len(self.fakes["r1"].requests), 2)

    def test_stalled_body_read_times_out(self) -> None:
        """Headers arrive but the body stalls: the deadline still ends the attempt (it covers the body read)."""
        client = self.make_client(connect_timeout=1.0, results_timeout=2.0, retry_count=1)
        body = json.dumps(checkv2_reply(action="reject")).encode()
        self.fakes["r1"].answer_next(FakeReply(body, partial=10))
        d = self.scan(client)
        self.fakes["r1"].flush()
        self.assertNoResult(d)
        self.clock.advance(3.0)
        failure = self.failureResultOf(d, RspamdError)
        self.assertIn("timed out", failure.value.errors[0])

    def test_http_500_is_a_failed_attempt(self) -> None:
        client = self.make_client(retry_count=2, retry_timeout=1.0)
        self.fakes["r1"].answer_next(FakeReply(b"Internal Server Error", code=500))
        self.fakes["r1"].answer(checkv2_reply(action="greylist"))
        d = self.scan(client)
        self.clock.advance(1.0)
        result = self.successResultOf(d)
        self.assertEqual((result.reply.action, result.attempts), ("greylist", 2))

    def test_unparsable_json_is_a_failed_attempt(self) -> None:
        client = self.make_client(retry_count=1)
        self.fakes["r1"].answer(FakeReply(b'{"action": "reject", '))
        failure = self.failureResultOf(self.scan(client), RspamdError)
        self.assertIn("bad reply", failure.value.errors[0])

    def test_cancel_drops_the_exchange_and_fails_the_scan(self) -> None:
        """Cancelling a scan closes its connection and fails it with RspamdError: no retry, no one blamed."""
        client = self.make_client(retry_count=3, retry_timeout=1.0)
        self.fakes["r1"].answer_next(HANG)
        d = self.scan(client)
        self.assertEqual(self.fakes["r1"].open_connections, 1)
        d.cancel()
        failure = self.failureResultOf(d, RspamdError)
        self.assertEqual(failure.value.errors, ("scan cancelled",))
        self.clock.advance(0)
        self.assertEqual(self.fakes["r1"].open_connections, 0)
        self.clock.advance(100)
        self.assertEqual(len(self.fakes["r1"].requests), 1)
        self.assertEqual(client.upstreams.upstreams[0].errors, 0)

    def test_dead_server_is_skipped_then_revived(self) -> None:
        """SPEC §6.6/B5: maxerrors failures within error_time make a server dead for dead_time.

        Every message is still scanned (by the live server); a dead server gets no attempt
        until dead_time has passed.
        """
        client = self.make_client(servers=(R1, R2), maxerrors=2, error_time=10.0, dead_time=60.0,
                                  retry_count=2, retry_timeout=0.0)
        r1 = client.upstreams.upstreams[0]
        self.fakes["r1"].refuse()
        for _ in range(50):
            d = self.scan(client)
            self.clock.advance(0)
            self.assertEqual(self.successResultOf(d).server, R2)
            if r1.dead_until is not None:
                break
        self.assertEqual(self.fakes["r1"].refused, 2)  # one connect attempt per failed scan attempt
        self.assertEqual(r1.dead_until, self.clock.seconds() + 60.0)
        for _ in range(20):
            self.assertEqual(self.successResultOf(self.scan(client)).server, R2)
        self.assertEqual(self.fakes["r1"].refused, 2)
        # revived after dead_time
        self.fakes["r1"].refuse(False)
        self.clock.advance(60.0)
        servers = {self.successResultOf(self.scan(client)).server for _ in range(20)}
        self.assertEqual(servers, {R1, R2})

    def test_success_resets_error_count(self) -> None:
        client = self.make_client(maxerrors=3, retry_count=2, retry_timeout=0.0)
        self.fakes["r1"].answer_next(REFUSE)
        d = self.scan(client)
        self.clock.advance(0)
        self.successResultOf(d)
        self.assertEqual(client.upstreams.upstreams[0].errors, 0)


class HTTPTests(ClientTestCase):
    """treq over the in-memory Rspamd: reply framings, connection reuse, what a lost connection means."""

    def test_rspamd_closes_so_every_scan_connects(self) -> None:
        """Rspamd 3.4 answers ``Connection: close``: nothing is pooled, each scan connects anew."""
        client = self.make_client()
        for _ in range(3):
            self.assertEqual(self.successResultOf(self.scan(client)).reply.action, "no action")
        self.assertEqual(self.fakes["r1"].connections, 3)
        self.assertEqual(client.http.pool._connections, {})
        self.assertEqual(self.fakes["r1"].open_connections, 0)

    def test_cookies_a_reply_sets_are_never_sent(self) -> None:
        """Rspamd sets no cookies; one that a reply sets is neither kept nor sent with the next scan."""
        client = self.make_client()
        self.fakes["r1"].keep_alive = True
        with_cookie = FakeReply(json.dumps(checkv2_reply(action="reject")).encode(),
                                headers=(("Content-Type", "application/json"), ("Set-Cookie", "s=1; Path=/")))
        self.fakes["r1"].answer_next(with_cookie, checkv2_reply(action="greylist"))
        self.assertEqual(self.successResultOf(self.scan(client)).reply.action, "reject")
        self.assertEqual(self.successResultOf(self.scan(client)).reply.action, "greylist")
        self.assertEqual([r.header("cookie") for r in self.fakes["r1"].requests], [None, None])
        self.assertEqual(list(client.http.cookies), [])  # type: ignore[attr-defined]

    def test_server_url_text_is_made_once(self) -> None:
        """treq asks the URL for ``to_uri().to_text()`` on every request: answered from load time."""
        from rmilter.backends.rspamd import transport as rspamd_transport

        client = self.make_client(servers=(R1, ServerSpec("r3", host="bücher.example", port=443, tls=True)))
        url = client.http.targets[R1].url  # type: ignore[attr-defined]
        calls: List[Any] = []

        def to_uri(encoded: Any) -> Any:
            calls.append(encoded)
            return encoded

        self.patch(rspamd_transport.EncodedURL, "to_uri", to_uri)
        self.assertIs(url.to_uri(), url)
        self.assertEqual(url.to_uri().to_text(), "http://127.0.0.1:11333/checkv2")
        tls_url = client.http.targets[ServerSpec("r3", host="bücher.example", port=443, tls=True)].url  # type: ignore[attr-defined]
        self.assertEqual(tls_url.to_uri().to_text(), "https://xn--bcher-kva.example/checkv2")
        self.assertEqual(self.successResultOf(self.scan(client)).reply.action, "no action")
        self.assertEqual(calls, [])  # no scan encoded the URL again

    def test_keep_alive_connection_is_reused(self) -> None:
        """A server that keeps the connection open gets the next request on it."""
        client = self.make_client()
        self.fakes["r1"].keep_alive = True
        self.fakes["r1"].answer_next(checkv2_reply(action="reject"), checkv2_reply(action="greylist"))
        self.assertEqual(self.successResultOf(self.scan(client)).reply.action, "reject")
        self.assertEqual(self.successResultOf(self.scan(client)).reply.action, "greylist")
        self.assertEqual(self.fakes["r1"].connections, 1)
        self.assertEqual(len(self.fakes["r1"].requests), 2)
        self.assertEqual(self.fakes["r1"].requests[1].body, MESSAGE)
        stopped = client.stop()
        self.clock.advance(0)
        self.successResultOf(stopped)
        self.assertEqual(self.fakes["r1"].open_connections, 0)

    def test_pooled_connection_older_than_idle_timeout_is_not_used(self) -> None:
        client = self.make_client()
        self.fakes["r1"].keep_alive = True
        self.successResultOf(self.scan(client))
        self.clock.advance(POOL_IDLE_TIMEOUT + 1)
        self.successResultOf(self.scan(client))
        self.assertEqual(self.fakes["r1"].connections, 2)

    def test_pooled_connection_closed_by_server_is_replaced(self) -> None:
        """The server closed an idle connection as we reused it: a new one, not a failed attempt."""
        client = self.make_client(retry_count=1)
        self.fakes["r1"].keep_alive = True
        self.successResultOf(self.scan(client))
        [[connection]] = client.http.pool._connections.values()
        transport: Any = connection.transport
        self.patch(transport, "write", lambda data: transport.loseConnection())
        self.patch(transport, "writeSequence", lambda data: transport.loseConnection())
        result = self.successResultOf(self.scan(client))
        self.assertEqual((result.attempts, self.fakes["r1"].connections), (1, 2))
        self.assertEqual(client.upstreams.upstreams[0].errors, 0)

    def test_chunked_reply(self) -> None:
        client = self.make_client()
        self.fakes["r1"].answer(FakeReply(json.dumps(checkv2_reply(action="add header")).encode(), chunked=True))
        self.assertEqual(self.successResultOf(self.scan(client)).reply.action, "add header")

    def exchange_bytes(self, reply: bytes, close: bool = True, retry_count: int = 1) -> Any:
        """Run one scan on a StringTransport and feed ``reply`` to the client's protocol."""
        from twisted.internet.testing import StringTransport

        protocols: List[Any] = []

        class Endpoint:
            def connect(self, factory: Any) -> "Deferred[Any]":
                protocol = factory.buildProtocol(None)
                protocol.makeConnection(StringTransport())
                protocols.append(protocol)
                return succeed(protocol)

        self.clock = Clock()
        client = RspamdClient(SpamdConfig(servers=(R1,), retry_count=retry_count), self.clock,
                              endpoint_for=lambda server: Endpoint())
        d = client.scan(FULL_REQUEST, MessageBody(data=MESSAGE))
        [protocol] = protocols
        sent = protocol.transport.value()
        self.assertTrue(sent.startswith(b"POST /checkv2 HTTP/1.1\r\n"), sent[:60])
        self.assertIn(b"\r\nHost: 127.0.0.1:11333\r\n", sent)
        self.assertTrue(sent.endswith(b"\r\n\r\n" + MESSAGE))
        for i in range(len(reply)):  # byte by byte: every split point of the framing
            protocol.dataReceived(reply[i:i + 1])
        if close:
            protocol.transport.loseConnection()
            protocol.connectionLost(Failure(net_error.ConnectionDone()))
        return d

    def test_reply_framings_byte_by_byte(self) -> None:
        """Content-Length, chunked (with extensions and trailers), close-delimited HTTP/1.0, 100 Continue."""
        document = json.dumps(checkv2_reply(action="reject", score=20)).encode()
        half = len(document) // 2
        replies = [
            b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(document), document),
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n%x;x=y\r\n%s\r\n%x\r\n%s\r\n0\r\nX-T: 1\r\n\r\n"
            % (half, document[:half], len(document) - half, document[half:]),
            b"HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n\r\n" + document,
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(document), document),
        ]
        for reply in replies:
            result = self.successResultOf(self.exchange_bytes(reply))
            self.assertEqual((result.reply.action, result.reply.score), ("reject", 20.0), reply[:40])

    def test_compressed_reply_by_header(self) -> None:
        document = zstandard.ZstdCompressor().compress(json.dumps(checkv2_reply(action="greylist")).encode())
        reply = b"HTTP/1.1 200 OK\r\nCompression: zstd\r\nContent-Length: %d\r\n\r\n%s" % (len(document), document)
        self.assertEqual(self.successResultOf(self.exchange_bytes(reply)).reply.action, "greylist")

    def test_reply_cut_short(self) -> None:
        reply = b"HTTP/1.1 200 OK\r\nContent-Length: 500\r\n\r\n{\"action\": "
        failure = self.failureResultOf(self.exchange_bytes(reply), RspamdError)
        self.assertEqual(failure.value.errors, ("r1: reply cut short",))

    def test_connection_lost_before_the_reply(self) -> None:
        failure = self.failureResultOf(self.exchange_bytes(b"HTTP/1.1 200 OK\r\nContent-"), RspamdError)
        self.assertEqual(failure.value.errors, ("r1: connection lost before the reply",))

    def test_garbage_is_a_bad_reply(self) -> None:
        failure = self.failureResultOf(self.exchange_bytes(b"SSH-2.0-OpenSSH\r\n\r\n", close=False), RspamdError)
        self.assertIn("bad reply: not an HTTP reply", failure.value.errors[0])


class ConnectTests(SynchronousTestCase):
    def test_connect_kinds(self) -> None:
        """IP literals (v4 and v6) connect by TCP without a resolver, paths by unix socket, names by name."""
        reactor = MemoryReactorClock()
        for server in (R1, ServerSpec("v6", host="::1", port=11334)):
            server_endpoint(reactor, server, 1.5).connect(ClientFactory())
        server_endpoint(reactor, ServerSpec("/run/rspamd.sock", path="/run/rspamd.sock"), 1.5).connect(ClientFactory())
        self.assertEqual([c[:2] + (c[3],) for c in reactor.tcpClients],
                         [("127.0.0.1", 11333, 1.5), ("::1", 11334, 1.5)])
        self.assertEqual([c[0] for c in reactor.unixClients], ["/run/rspamd.sock"])
        endpoint = server_endpoint(reactor, ServerSpec("name", host="rspamd.example", port=11333), 1.5)
        self.assertIsInstance(endpoint, HostnameEndpoint)
        self.assertEqual((endpoint._hostBytes, endpoint._port), (b"rspamd.example", 11333))

    def test_endpoints_are_built_once(self) -> None:
        """Every configured server (also_check too) gets its endpoint when the client is made, not per scan."""
        built: List[ServerSpec] = []
        clock = Clock()
        fakes = FakeRspamdCluster({"r1": FakeRspamd(), "r2": FakeRspamd()}, clock=clock)

        def endpoint_for(server: ServerSpec) -> Any:
            built.append(server)
            return fakes.endpoint_for(server)

        client = RspamdClient(SpamdConfig(servers=(R1,), also_check=(R2,)), clock, endpoint_for=endpoint_for)
        self.assertEqual(built, [R1, R2])
        for _ in range(3):
            d = client.scan(FULL_REQUEST, MessageBody(data=MESSAGE))
            clock.advance(0)
            self.successResultOf(d)
        self.assertEqual(built, [R1, R2])

    def test_real_tcp_connect(self) -> None:
        """The default connector: connect with connect_timeout; a stop() leaves no pooled connection."""
        reactor = MemoryReactorClock()
        config = Config(spamd=SpamdConfig(servers=(R1,), connect_timeout=1.5))
        client = from_config(config, reactor)
        assert client is not None
        d = client.scan(FULL_REQUEST, MessageBody(data=MESSAGE))
        self.assertNoResult(d)
        host, port, _factory, timeout, _bind = reactor.tcpClients[0]
        self.assertEqual((host, port, timeout), ("127.0.0.1", 11333, 1.5))
        self.successResultOf(client.stop())

    def test_connect_timeout_fails_the_attempt(self) -> None:
        """A connect that times out is one failed attempt, described as such."""
        reactor = MemoryReactorClock()
        client = from_config(Config(spamd=SpamdConfig(servers=(R1,), retry_count=1)), reactor)
        assert client is not None
        d = client.scan(FULL_REQUEST, MessageBody(data=MESSAGE))
        connector = reactor.connectors[0]
        factory = reactor.tcpClients[0][2]
        factory.clientConnectionFailed(connector, Failure(net_error.TimeoutError()))
        failure = self.failureResultOf(d, RspamdError)
        self.assertIn("connect timed out", failure.value.errors[0])

    def test_deadline_stops_a_pending_connect(self) -> None:
        reactor = MemoryReactorClock()
        client = from_config(Config(spamd=SpamdConfig(servers=(R1,), retry_count=1, connect_timeout=1.0,
                                                      results_timeout=2.0)), reactor)
        assert client is not None
        d = client.scan(FULL_REQUEST, MessageBody(data=MESSAGE))
        connector = reactor.connectors[0]
        reactor.advance(3.0)
        self.assertIn("timed out", self.failureResultOf(d, RspamdError).value.errors[0])
        self.assertTrue(connector.stoppedConnecting)

    def test_real_unix_socket(self) -> None:
        reactor = MemoryReactorClock()
        sock = ServerSpec("/run/rspamd/normal.sock", path="/run/rspamd/normal.sock")
        client = from_config(Config(spamd=SpamdConfig(servers=(sock,), connect_timeout=2.0)), reactor)
        assert client is not None
        self.assertNoResult(client.scan(FULL_REQUEST, MessageBody(data=MESSAGE)))
        address, _factory, timeout, _check_pid = reactor.unixClients[0]
        self.assertEqual((address, timeout), ("/run/rspamd/normal.sock", 2.0))

    def test_no_servers_no_client(self) -> None:
        self.assertIsNone(from_config(Config(), MemoryReactorClock()))


class ReplyRobustnessTests(SynchronousTestCase):
    """Whatever a server sends, parsing gives a ScanReply or BadReply, nothing else."""

    def test_arbitrary_json(self) -> None:
        from hypothesis import given, settings, strategies as st

        scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=8)
        keys = st.sampled_from(["default", "action", "score", "required_score", "symbols", "milter", "rmilter",
                                "add_headers", "remove_headers", "options", "value", "order", "messages",
                                "smtp_message", "dkim-signature", "subject", "add_rcpt", "spam_header", "x"])
        documents = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                                 | st.dictionaries(keys, inner, max_size=6), max_leaves=30)

        @settings(max_examples=150, deadline=None)
        @given(documents)
        def check(document: Any) -> None:
            try:
                reply = parse_scan_reply(json.dumps(document).encode())
            except BadReply:
                return
            self.assertIn(reply.action, rspamd.ACTIONS)
            self.assertTrue(all(isinstance(h.value, str) for h in reply.add_headers))

        check()

    def test_arbitrary_bytes(self) -> None:
        from hypothesis import given, settings, strategies as st

        @settings(max_examples=150, deadline=None)
        @given(st.binary(max_size=64))
        def check(body: bytes) -> None:
            with contextlib.suppress(BadReply):
                parse_scan_reply(body)

        check()


class TLSConfigTests(SynchronousTestCase):
    """``https://`` servers: TLS endpoints built with the client; tls_verify = no is said at start."""

    def events(self) -> List[Any]:
        from twisted.logger import globalLogPublisher

        events: List[Any] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        return events

    def test_https_server_gets_a_tls_endpoint_plain_one_does_not(self) -> None:
        from twisted.internet.endpoints import TCP4ClientEndpoint

        reactor = MemoryReactorClock()
        config = parse_text('spamd { servers = "https://127.0.0.1:8443", "127.0.0.1:11333"; };')
        client = RspamdClient(config.spamd, reactor)
        self.assertEqual([s.tls for s in config.spamd.servers], [True, False])
        endpoints = client.http._endpoints.by_key
        tls_endpoint = endpoints[(b"https", b"127.0.0.1", 8443)]._endpoint
        plain_endpoint = endpoints[(b"http", b"127.0.0.1", 11333)]._endpoint
        self.assertIsInstance(plain_endpoint, TCP4ClientEndpoint)
        self.assertNotIsInstance(tls_endpoint, TCP4ClientEndpoint)  # wrapClientTLS around it
        self.assertIsInstance(tls_endpoint._wrappedEndpoint, TCP4ClientEndpoint)

    def test_tls_verify_off_is_warned_at_start(self) -> None:
        events = self.events()
        config = parse_text('spamd { servers = "https://rspamd.example:8443"; tls_verify = no; };')
        RspamdClient(config.spamd, MemoryReactorClock())
        warnings = [e for e in events if "tls_verify = no" in str(e.get("log_format", ""))]
        self.assertEqual(len(warnings), 1)

    def test_no_warning_without_https_servers(self) -> None:
        events = self.events()
        config = parse_text('spamd { servers = "127.0.0.1:11333"; tls_verify = no; };')
        RspamdClient(config.spamd, MemoryReactorClock())
        self.assertEqual([e for e in events if "tls_verify" in str(e.get("log_format", ""))], [])
