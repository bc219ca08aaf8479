"""Unit tests of the clamd client (SPEC §6.6, §6.9, §7.2) against the in-memory clamd."""
from __future__ import annotations

import random
import struct
from typing import Any, List, Optional, Sequence

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint, UNIXClientEndpoint
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from rmilter.backends import clamd
from rmilter.backends.clamd import (
    CHUNK_SIZE,
    ClamdClient,
    ClamdError,
    ClamdScan,
    ReplyKind,
    classify_reply,
    server_endpoint,
)
from rmilter.backends.upstream import UpstreamList
from rmilter.config.schema import ClamavConfig, Config, ServerSpec, SpamdConfig
from rmilter.spool import Spool, run_inline
from rmilter.testing.fake_clamd import HANG, REFUSE, MemoryClamdNetwork, Script

TCP_A = ServerSpec(name="127.0.0.1:3310", host="127.0.0.1", port=3310)
TCP_B = ServerSpec(name="127.0.0.2:3310", host="127.0.0.2", port=3310)
UNIX_PATH = "/run/clamd.sock"
UNIX = ServerSpec(name=UNIX_PATH, path=UNIX_PATH)
ADDR_A = ("127.0.0.1", 3310)
ADDR_B = ("127.0.0.2", 3310)


class FirstChoice(random.Random):
    """Makes ``choose_random`` deterministic: always the first candidate."""

    def choice(self, seq: Any) -> Any:
        return seq[0]


class BytesSource:
    """A spool stand-in serving bytes; counts reads and the most reads outstanding at once."""

    def __init__(self, data: bytes, synchronous: bool = True) -> None:
        self.data = data
        self.synchronous = synchronous
        self.reads: List[tuple] = []
        self.pending: List[Deferred] = []
        self.max_outstanding = 0

    @property
    def size(self) -> int:
        return len(self.data)

    def read(self, offset: int, length: int) -> "Deferred[bytes]":
        self.reads.append((offset, length))
        piece = self.data[offset : offset + length]
        if self.synchronous:
            return succeed(piece)
        d: Deferred = Deferred()
        d.piece = piece  # type: ignore[attr-defined]
        self.pending.append(d)
        self.max_outstanding = max(self.max_outstanding, len(self.pending))
        return d

    def complete_reads(self) -> int:
        done = 0
        while self.pending:
            d = self.pending.pop(0)
            d.callback(d.piece)  # type: ignore[attr-defined]
            done += 1
        return done


def message(size: int) -> bytes:
    """``size`` bytes of mail-like text (distinct per position so corruption would show)."""
    line = b"Lorem ipsum dolor sit amet, consectetur adipiscing elit %08d\r\n"
    out = bytearray()
    n = 0
    while len(out) < size:
        out += line % n
        n += 1
    return bytes(out[:size])


class ClientMixin:
    reactor: MemoryReactorClock
    network: MemoryClamdNetwork

    def make(
        self,
        servers: Sequence[ServerSpec] = (TCP_A,),
        *,
        retry_count: int = 5,
        retry_timeout: float = 1.0,
        connect_timeout: float = 1.0,
        results_timeout: float = 20.0,
        maxerrors: int = 10,
        error_time: float = 10.0,
        dead_time: float = 300.0,
        rng: Optional[random.Random] = None,
    ) -> ClamdClient:
        self.reactor = MemoryReactorClock()
        self.network = MemoryClamdNetwork(self.reactor)
        upstreams: UpstreamList[ServerSpec] = UpstreamList(
            servers,
            error_time=error_time,
            dead_time=dead_time,
            maxerrors=maxerrors,
            clock=self.reactor,
            rng=rng or FirstChoice(),
        )
        return ClamdClient(
            upstreams,
            reactor=self.reactor,
            connect_timeout=connect_timeout,
            results_timeout=results_timeout,
            retry_count=retry_count,
            retry_timeout=retry_timeout,
        )

    def scan(self, client: ClamdClient, source: Any) -> "Deferred[ClamdScan]":
        d = client.scan(source, tag="0123456789")
        self.network.run()
        return d

    def advance(self, seconds: float) -> None:
        self.reactor.advance(seconds)
        self.network.run()

    def scan_error(self, d: "Deferred[ClamdScan]") -> ClamdError:
        """The ``ClamdError`` a finished scan failed with."""
        error = self.failureResultOf(d, ClamdError).value
        assert isinstance(error, ClamdError)
        return error


class ReplyParsingTests(SynchronousTestCase):
    """SPEC §6.9 reply classes."""

    def test_ok_is_clean_with_either_terminator(self) -> None:
        """``stream: OK`` is clean whether NUL- (z) or newline-terminated (n)."""
        self.assertIs(classify_reply(b"stream: OK\0").kind, ReplyKind.CLEAN)
        self.assertIs(classify_reply(b"stream: OK\n").kind, ReplyKind.CLEAN)
        self.assertIs(classify_reply(b"stream: OK").kind, ReplyKind.CLEAN)

    def test_found_names_the_virus_after_stream_prefix(self) -> None:
        """``stream: <name> FOUND``: the name is between ``stream: `` and `` FOUND``."""
        reply = classify_reply(b"stream: Harness.Eicar.Body.UNOFFICIAL FOUND\0")
        self.assertEqual((reply.kind, reply.virus), (ReplyKind.VIRUS, "Harness.Eicar.Body.UNOFFICIAL"))

    def test_found_without_stream_prefix_uses_whole_text(self) -> None:
        """Without the ``stream`` prefix the whole text before FOUND is the name."""
        reply = classify_reply(b"Eicar-Signature FOUND\n")
        self.assertEqual((reply.kind, reply.virus), (ReplyKind.VIRUS, "Eicar-Signature"))

    def test_archive_pseudo_viruses_count_clean(self) -> None:
        """``Suspected.Zip`` and ``Oversized.Zip`` are not viruses (SPEC §6.9)."""
        self.assertIs(classify_reply(b"stream: Suspected.Zip FOUND\0").kind, ReplyKind.CLEAN)
        self.assertIs(classify_reply(b"stream: Oversized.Zip FOUND\0").kind, ReplyKind.CLEAN)

    def test_error_reply_is_error(self) -> None:
        """``INSTREAM size limit exceeded. ERROR`` is an ERROR (retried)."""
        reply = classify_reply(b"INSTREAM size limit exceeded. ERROR\0")
        self.assertEqual((reply.kind, reply.text), (ReplyKind.ERROR, "INSTREAM size limit exceeded. ERROR"))

    def test_empty_and_unknown_replies_are_garbled(self) -> None:
        """Empty, terminator-only, unknown and nameless replies are garbled (not retried)."""
        for raw in (b"", b"\0", b"PONG\0", b"stream:  FOUND\0", b"\xff\xfe garbage"):
            self.assertIs(classify_reply(raw).kind, ReplyKind.GARBLED, raw)

    def test_only_the_first_line_counts(self) -> None:
        """Bytes after the terminator do not change the classification."""
        self.assertIs(classify_reply(b"stream: OK\0stream: X FOUND\0").kind, ReplyKind.CLEAN)

    @settings(max_examples=300)
    @given(st.binary(max_size=200))
    def test_any_bytes_classify_without_raising(self, raw: bytes) -> None:
        """Every byte string gets a class; a virus always has a non-empty name."""
        reply = classify_reply(raw)
        self.assertIsInstance(reply.kind, ReplyKind)
        if reply.kind is ReplyKind.VIRUS:
            self.assertTrue(reply.virus)


class StreamingTests(ClientMixin, SynchronousTestCase):
    """The INSTREAM wire format, chunking and backpressure."""

    def test_clean_scan_streams_whole_spool(self) -> None:
        """zINSTREAM, the spool bytes in chunks, the zero terminator; ``stream: OK`` is clean."""
        client = self.make()
        self.network.add(ADDR_A, Script.ok())
        data = message(5000)
        result = self.successResultOf(self.scan(client, BytesSource(data)))
        self.assertEqual((result.reply.kind, result.server, result.attempts), (ReplyKind.CLEAN, TCP_A, 1))
        (server,) = self.network.servers(ADDR_A)
        self.assertEqual(server.command, b"zINSTREAM")
        self.assertEqual(bytes(server.received), data)
        self.assertTrue(server.stream_ended)
        self.assertEqual(server.chunk_sizes, [5000])

    def test_body_larger_than_64k_goes_in_64k_chunks(self) -> None:
        """A 200 KiB + 1 spool is sent as three full 64 KiB chunks and the rest, nothing larger."""
        client = self.make()
        self.network.add(ADDR_A, Script.ok())
        data = message(3 * 65536 + 7000 + 1)
        self.successResultOf(self.scan(client, BytesSource(data)))
        (server,) = self.network.servers(ADDR_A)
        self.assertEqual(server.chunk_sizes, [65536, 65536, 65536, 7001])
        self.assertEqual(bytes(server.received), data)

    def test_chunk_framing_on_the_wire(self) -> None:
        """Each chunk is a u32 big-endian length then the bytes; the stream ends with four zero bytes."""
        client = self.make()
        self.network.add(ADDR_A, Script.silence())
        data = message(70000)
        d = client.scan(BytesSource(data))
        self.network.accept_pending()
        link = self.network.links[0]
        wire = link.client_transport.value()
        expected = (
            b"zINSTREAM\0"
            + struct.pack("!I", 65536) + data[:65536]
            + struct.pack("!I", 70000 - 65536) + data[65536:]
            + b"\0\0\0\0"
        )
        self.assertEqual(wire, expected)
        self.assertNoResult(d)

    def test_spool_file_is_streamed_with_bounded_buffering(self) -> None:
        """A 1 MiB body in a spool file is read chunk by chunk; the transport buffer stays bounded."""
        client = self.make()
        self.network.add(ADDR_A, Script.ok())
        spool = Spool(self.mktemp_dir(), 0o600, 4096, run_inline)
        spool.set_head(b"Received: from x\r\nSubject: big\n\r\n")
        body = message(1024 * 1024)
        for i in range(0, len(body), 60000):
            spool.append(body[i : i + 60000])
        self.successResultOf(spool.finish())
        self.assertIsNotNone(spool.path)
        result = self.successResultOf(self.scan(client, spool))
        self.assertIs(result.reply.kind, ReplyKind.CLEAN)
        (server,) = self.network.servers(ADDR_A)
        self.assertEqual(bytes(server.received), spool.head + body)
        self.assertTrue(all(size <= CHUNK_SIZE for size in server.chunk_sizes))
        link = self.network.links[0]
        self.assertGreater(link.client_transport.pauses, 0)
        # never more than the buffer limit plus one chunk and its length word
        self.assertLessEqual(link.client_transport.max_buffered, self.network.client_buffer_limit + CHUNK_SIZE + 4)
        spool.close()

    def mktemp_dir(self) -> str:
        import os

        path = self.mktemp()
        os.makedirs(path)
        return path

    def test_one_spool_read_outstanding_and_paused_producer_reads_nothing(self) -> None:
        """With slow (thread-pool) reads only one is outstanding; while paused no read starts."""
        client = self.make()
        self.network.add(ADDR_A, Script.ok())
        source = BytesSource(message(600 * 1024), synchronous=False)
        d = client.scan(source)
        self.network.run()
        for _ in range(100):
            if not source.complete_reads():
                break
            self.network.run()
        result = self.successResultOf(d)
        self.assertIs(result.reply.kind, ReplyKind.CLEAN)
        self.assertEqual(source.max_outstanding, 1)
        (server,) = self.network.servers(ADDR_A)
        self.assertEqual(bytes(server.received), source.data)

    def test_paused_transport_stops_reads(self) -> None:
        """When the transport pauses the producer, no further chunk is read until it resumes."""
        client = self.make()
        self.network.add(ADDR_A, Script.ok())
        source = BytesSource(message(1024 * 1024))
        d = client.scan(source)
        self.network.accept_pending()  # connect, but do not let clamd read anything
        link = self.network.links[0]
        self.assertEqual(link.client_transport.pauses, 1)
        reads_when_paused = len(source.reads)
        self.assertLess(reads_when_paused, 5)
        self.network.run()
        self.assertEqual(self.successResultOf(d).reply.kind, ReplyKind.CLEAN)
        self.assertEqual(len(source.reads), 16)

    def test_unterminated_reply_before_close_counts(self) -> None:
        """A reply without terminator followed by close is still read (C reads until close)."""
        client = self.make()
        self.network.add(ADDR_A, Script.exact(b"stream: Some.Virus FOUND"))
        result = self.successResultOf(self.scan(client, BytesSource(b"x" * 10)))
        self.assertEqual((result.reply.kind, result.reply.virus), (ReplyKind.VIRUS, "Some.Virus"))


class ReplyHandlingTests(ClientMixin, SynchronousTestCase):
    """What each reply class does to the scan, the retries and the server's health."""

    def test_found_is_a_virus(self) -> None:
        """``FOUND`` makes the scan a virus with its name; the server is healthy."""
        client = self.make()
        self.network.add(ADDR_A, Script.found("Harness.Eicar.Body.UNOFFICIAL"))
        result = self.successResultOf(self.scan(client, BytesSource(b"body")))
        self.assertEqual((result.reply.kind, result.reply.virus, result.attempts),
                         (ReplyKind.VIRUS, "Harness.Eicar.Body.UNOFFICIAL", 1))
        self.assertEqual(client.upstreams.upstreams[0].errors, 0)

    def test_suspected_zip_is_clean(self) -> None:
        """``Suspected.Zip FOUND`` is clean."""
        client = self.make()
        self.network.add(ADDR_A, Script.found("Suspected.Zip"))
        self.assertIs(self.successResultOf(self.scan(client, BytesSource(b"b"))).reply.kind, ReplyKind.CLEAN)

    def test_error_reply_is_retried_after_pause(self) -> None:
        """An ERROR reply is a failed attempt: the next one starts only after retry_timeout."""
        client = self.make(retry_timeout=1.0)
        self.network.add(ADDR_A, Script.error(b"Some error. ERROR"), Script.ok())
        d = self.scan(client, BytesSource(b"body"))
        self.assertNoResult(d)
        self.assertEqual(len(self.network.attempts), 1)
        self.advance(0.999)
        self.assertEqual(len(self.network.attempts), 1)
        self.advance(0.001)
        result = self.successResultOf(d)
        self.assertEqual((result.reply.kind, result.attempts), (ReplyKind.CLEAN, 2))
        self.assertEqual(client.upstreams.upstreams[0].errors, 0)  # the success reset it

    def test_size_limit_error_mid_stream_fails_after_all_attempts(self) -> None:
        """clamd's StreamMaxLength ERROR arrives mid-stream: sending stops, the reply is read, retried."""
        client = self.make(retry_count=3)
        self.network.add(ADDR_A, Script.ok(stream_max_length=100_000))
        d = self.scan(client, BytesSource(message(1024 * 1024)))
        self.advance(1.0)
        self.advance(1.0)
        error = self.scan_error(d)
        self.assertEqual((error.attempts, error.server), (3, TCP_A))
        self.assertIn("size limit exceeded", error.reason)
        for server in self.network.servers(ADDR_A):
            self.assertTrue(server.replied)
            self.assertLess(server.data_bytes, 100_000 + 2 * CHUNK_SIZE)
            self.assertFalse(server.stream_ended)
        self.assertEqual(client.upstreams.upstreams[0].errors, 3)

    def test_empty_reply_is_not_retried(self) -> None:
        """A server that closes without a word after the whole stream: failed, not retried (SPEC §6.9)."""
        client = self.make()
        self.network.add(ADDR_A, Script.exact(b""))
        error = self.scan_error(self.scan(client, BytesSource(b"body")))
        self.assertEqual(error.attempts, 1)
        self.assertIn("unexpected reply", error.reason)
        self.assertEqual(client.upstreams.upstreams[0].errors, 1)

    def test_garbled_reply_is_not_retried(self) -> None:
        """An unknown reply fails the scan at once."""
        client = self.make()
        self.network.add(ADDR_A, Script.exact(b"PONG\0"), Script.ok())
        error = self.scan_error(self.scan(client, BytesSource(b"body")))
        self.assertEqual((error.attempts, error.reason), (1, "unexpected reply: 'PONG'"))
        self.assertEqual(len(self.network.attempts), 1)

    def test_overlong_reply_is_garbled(self) -> None:
        """A reply longer than 4 KiB without terminator ends the attempt as garbled."""
        client = self.make()
        self.network.add(ADDR_A, Script(b"A" * 5000, raw=True, close_after_reply=False))
        error = self.scan_error(self.scan(client, BytesSource(b"body")))
        self.assertEqual(error.attempts, 1)
        self.assertIn("unexpected reply", error.reason)

    def test_close_mid_stream_is_retried_on_another_server(self) -> None:
        """A server closing while the message is sent: retried, and the retry avoids that server."""
        client = self.make([TCP_A, TCP_B])
        self.network.add(ADDR_A, Script.close_mid_stream(after=70_000))
        self.network.add(ADDR_B, Script.ok())
        d = self.scan(client, BytesSource(message(300_000)))
        self.assertNoResult(d)
        self.advance(1.0)
        result = self.successResultOf(d)
        self.assertEqual((result.reply.kind, result.server, result.attempts), (ReplyKind.CLEAN, TCP_B, 2))
        self.assertEqual(self.network.attempts, [ADDR_A, ADDR_B])
        self.assertEqual(client.upstreams.upstreams[0].errors, 1)

    def test_silent_server_times_out_per_attempt(self) -> None:
        """No reply within results_timeout: the attempt fails; every attempt gets the same deadline."""
        client = self.make(retry_count=2, retry_timeout=1.0, results_timeout=20.0)
        self.network.add(ADDR_A, Script.silence())
        d = self.scan(client, BytesSource(b"body"))
        self.advance(19.9)
        self.assertEqual(len(self.network.attempts), 1)
        self.advance(0.1)  # first attempt times out
        self.advance(1.0)  # pause, second attempt starts
        self.assertEqual(len(self.network.attempts), 2)
        self.advance(19.9)
        self.assertNoResult(d)
        self.advance(0.1)
        error = self.scan_error(d)
        self.assertEqual(error.attempts, 2)
        self.assertIn("no progress", error.reason)
        self.assertAlmostEqual(error.elapsed, 41.0)
        for link in self.network.links:
            self.assertFalse(link.open)

    def test_slow_reply_bytes_reset_read_deadline(self) -> None:
        """results_timeout applies to each read, not to the whole reply."""
        client = self.make(results_timeout=5.0)
        self.network.add(ADDR_A, Script.silence())
        d = self.scan(client, BytesSource(b"body"))
        link = self.network.links[0]
        self.advance(4.0)
        link.server_transport.write(b"stream: ")
        self.network.run()
        self.advance(4.0)
        self.assertNoResult(d)
        link.server_transport.write(b"OK\0")
        self.network.run()
        self.assertIs(self.successResultOf(d).reply.kind, ReplyKind.CLEAN)

    def test_clamd_not_taking_data_times_out(self) -> None:
        """A clamd that accepts the connection but never reads: the stream stalls, results_timeout ends it."""
        client = self.make(retry_count=1, results_timeout=20.0)
        self.network.add(ADDR_A, Script.ok())
        d = client.scan(BytesSource(message(1024 * 1024)))
        self.network.accept_pending()  # connected; bytes never move
        self.reactor.advance(19.0)
        self.assertNoResult(d)
        self.reactor.advance(1.0)
        self.assertIn("take data", self.scan_error(d).reason)
        self.assertTrue(self.network.links[0].client_transport.disconnected)

    def test_connect_timeout(self) -> None:
        """A connection that never completes fails after connect_timeout and the attempt is abandoned."""
        client = self.make(retry_count=1, connect_timeout=1.0)
        self.network.add(ADDR_A, HANG)
        d = self.scan(client, BytesSource(b"body"))
        self.advance(0.9)
        self.assertNoResult(d)
        self.advance(0.1)
        self.assertIn("connect timeout", self.scan_error(d).reason)
        self.assertTrue(self.reactor.connectors[0].stoppedConnecting)

    def test_refused_everywhere_fails_after_retry_count_attempts(self) -> None:
        """retry_count is the total number of attempts, each after a retry_timeout pause."""
        client = self.make([TCP_A, TCP_B], retry_count=4, retry_timeout=2.0)
        self.network.add(ADDR_A, REFUSE)
        self.network.add(ADDR_B, REFUSE)
        d = self.scan(client, BytesSource(b"body"))
        for _ in range(3):
            self.advance(2.0)
        error = self.scan_error(d)
        self.assertEqual(error.attempts, 4)
        self.assertIn("connect failed", error.reason)
        self.assertAlmostEqual(error.elapsed, 6.0)
        self.assertEqual(len(self.network.attempts), 4)

    def test_dead_server_is_skipped_until_dead_time_passes(self) -> None:
        """After maxerrors failures a server is dead for dead_time: scans do not try it (SPEC §6.6)."""
        client = self.make([TCP_A, TCP_B], maxerrors=2, dead_time=300.0, retry_count=2)
        self.network.add(ADDR_A, REFUSE)
        self.network.add(ADDR_B, Script.ok())
        for _ in range(2):  # each scan: A refused, B after the pause
            d = self.scan(client, BytesSource(b"body"))
            self.advance(1.0)
            self.assertIs(self.successResultOf(d).reply.kind, ReplyKind.CLEAN)
        self.assertEqual(self.network.attempts, [ADDR_A, ADDR_B, ADDR_A, ADDR_B])
        del self.network.attempts[:]
        for _ in range(3):  # A is dead now: straight to B
            self.assertIs(self.successResultOf(self.scan(client, BytesSource(b"body"))).reply.kind, ReplyKind.CLEAN)
        self.assertEqual(self.network.attempts, [ADDR_B] * 3)
        self.advance(300.0)
        d = self.scan(client, BytesSource(b"body"))
        self.assertEqual(self.network.attempts[-1], ADDR_A)  # revived
        self.advance(1.0)
        self.assertIs(self.successResultOf(d).reply.kind, ReplyKind.CLEAN)

    def test_unreadable_spool_fails_without_blaming_server(self) -> None:
        """A spool read error fails the scan at once; the server's health is untouched."""
        client = self.make()
        self.network.add(ADDR_A, Script.ok())

        class Broken:
            size = 100

            def read(self, offset: int, length: int) -> "Deferred[bytes]":
                return fail(OSError("disk on fire"))

        error = self.scan_error(self.scan(client, Broken()))
        self.assertEqual(error.attempts, 1)
        self.assertIn("disk on fire", error.reason)
        self.assertEqual(client.upstreams.upstreams[0].errors, 0)

    def test_spool_bug_is_logged_with_traceback(self) -> None:
        """A non-OS error reading the spool (a bug) fails the scan and is logged once with its traceback."""
        client = self.make()
        self.network.add(ADDR_A, Script.ok())

        class Buggy:
            size = 10

            def read(self, offset: int, length: int) -> "Deferred[bytes]":
                return fail(ZeroDivisionError("oops"))

        self.assertEqual(self.scan_error(self.scan(client, Buggy())).attempts, 1)
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)

    def test_unix_socket_server(self) -> None:
        """A path server spec connects to the unix socket."""
        client = self.make([UNIX])
        self.network.add(UNIX_PATH, Script.found("X.Y"))
        result = self.successResultOf(self.scan(client, BytesSource(b"body")))
        self.assertEqual((result.reply.kind, result.reply.virus, result.server), (ReplyKind.VIRUS, "X.Y", UNIX))
        self.assertEqual(self.reactor.unixClients[0][0], UNIX_PATH)

    def test_cancel_aborts_the_connection(self) -> None:
        """Cancelling a scan aborts its connection and fails it with ClamdError "scan cancelled"."""
        client = self.make()
        self.network.add(ADDR_A, Script.silence())
        d = self.scan(client, BytesSource(b"body"))
        d.cancel()
        error = self.scan_error(d)
        self.assertEqual((error.reason, error.attempts, error.server), ("scan cancelled", 1, TCP_A))
        self.assertEqual(client.upstreams.upstreams[0].errors, 0)  # not the server's fault
        self.assertTrue(self.network.links[0].client_transport.disconnected)
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_cancel_during_retry_pause(self) -> None:
        """Cancelling while waiting between attempts ends the scan without another attempt."""
        client = self.make()
        self.network.add(ADDR_A, REFUSE)
        d = self.scan(client, BytesSource(b"body"))
        d.cancel()
        self.assertEqual(self.scan_error(d).reason, "scan cancelled")
        self.advance(10)
        self.assertEqual(len(self.network.attempts), 1)

    def test_stop_aborts_scans_and_refuses_new_ones(self) -> None:
        """stop() fails scans in flight; later scans fail without connecting."""
        client = self.make()
        self.network.add(ADDR_A, Script.silence())
        d = self.scan(client, BytesSource(b"body"))
        self.successResultOf(client.stop())
        self.assertEqual(self.scan_error(d).reason, "client stopped")
        self.assertTrue(self.network.links[0].client_transport.disconnected)
        later = self.scan_error(self.scan(client, BytesSource(b"body")))
        self.assertEqual((later.reason, later.attempts, later.server), ("client stopped", 0, None))
        self.assertEqual(len(self.network.attempts), 1)


class EndpointTests(SynchronousTestCase):
    """Server specs become endpoints (B6 default port)."""

    def test_tcp_without_port_uses_3310(self) -> None:
        """``host`` alone means port 3310 (C used port 0, B6)."""
        reactor = MemoryReactorClock()
        endpoint = server_endpoint(reactor, ServerSpec(name="localhost", host="localhost"), 1.5)
        self.assertIsInstance(endpoint, TCP4ClientEndpoint)
        endpoint.connect(clamd.Factory.forProtocol(clamd.Protocol))
        host, port, _f, timeout, _b = reactor.tcpClients[0]
        self.assertEqual((host, port, timeout), ("localhost", 3310, 1.5))

    def test_ipv6_and_unix(self) -> None:
        """An IPv6 literal gets a TCP6 endpoint, a path a UNIX endpoint."""
        reactor = MemoryReactorClock()
        self.assertIsInstance(server_endpoint(reactor, ServerSpec(name="[::1]:3310", host="::1", port=3310), 1),
                              TCP6ClientEndpoint)
        self.assertIsInstance(server_endpoint(reactor, UNIX, 1), UNIXClientEndpoint)


class FromConfigTests(SynchronousTestCase):
    """from_config reads clamav timeouts and spamd retries (B18)."""

    def test_no_servers_no_client(self) -> None:
        """Without clamav servers there is no client."""
        self.assertIsNone(clamd.from_config(Config(), MemoryReactorClock()))

    def test_option_sources(self) -> None:
        """Timeouts and health from ``clamav``, retries from ``spamd``; priorities kept."""
        config = Config(
            clamav=ClamavConfig(
                servers=(TCP_A, ServerSpec(name="h:1:5", host="h", port=1, priority=5)),
                connect_timeout=2.0,
                results_timeout=7.0,
                maxerrors=3,
                dead_time=60.0,
                error_time=5.0,
            ),
            spamd=SpamdConfig(retry_count=7, retry_timeout=0.5, results_timeout=99.0),
        )
        client = clamd.from_config(config, MemoryReactorClock())
        assert client is not None
        self.assertEqual(
            (client.connect_timeout, client.results_timeout, client.failover.attempts, client.failover.retry_timeout),
            (2.0, 7.0, 7, 0.5),
        )
        ups = client.upstreams
        self.assertEqual((ups.maxerrors, ups.dead_time, ups.error_time), (3, 60.0, 5.0))
        self.assertEqual([u.priority for u in ups.upstreams], [0, 5])
