"""The clamd client, the virus check and the pipeline against a real clamd (tests/harness/clamd.py).

clamd runs with the harness's private signature database (EICAR and a harness string as ``.ndb``
body patterns; REAL-SERVICES §3) and StreamMaxLength 1M.  These tests use the real reactor and
real sockets, TCP and unix.  A missing clamd fails them (harness.ServiceUnavailable).
"""
from __future__ import annotations

import base64
import socket
from typing import Any, List, Sequence

from twisted.internet import reactor as global_reactor
from twisted.internet import threads
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.trial.unittest import TestCase

from rmilter.backends import clamd as clamd_backend
from rmilter.backends.clamd import ClamdClient, ClamdError, ReplyKind
from rmilter.config.schema import ClamavConfig, Config, GlobalConfig, ServerSpec, SpamdConfig
from rmilter.context import ConnectionContext, MessageContext
from rmilter.deps import Deps
from rmilter.pipeline import Pipeline, Transaction
from rmilter.runtime import Runtime
from rmilter.spool import Spool
from rmilter.summary import summary_event
from rmilter.testing.fake_clamd import FakeClamdFactory, Script
from rmilter.verdict import Action, SmtpReply
from tests import harness

REACTOR: Any = global_reactor


def run_in_thread(f: Any, *args: Any) -> "Deferred[Any]":
    return threads.deferToThreadPool(REACTOR, REACTOR.getThreadPool(), f, *args)


def mime_with_attachment(payload: bytes, filename: str = "eicar.com") -> bytes:
    """A multipart message carrying ``payload`` as a base64 attachment (what clamd's ScanMail decodes)."""
    encoded = base64.encodebytes(payload).replace(b"\n", b"\r\n")
    return (
        b"From: Alice <alice@example.net>\r\n"
        b"To: Bob <bob@example.org>\r\n"
        b"Subject: your file\r\n"
        b"MIME-Version: 1.0\r\n"
        b'Content-Type: multipart/mixed; boundary="b1"\r\n'
        b"\r\n"
        b"--b1\r\n"
        b"Content-Type: text/plain; charset=us-ascii\r\n"
        b"\r\n"
        b"See attachment.\r\n"
        b"--b1\r\n"
        b"Content-Type: application/octet-stream; name=\"" + filename.encode() + b"\"\r\n"
        b"Content-Transfer-Encoding: base64\r\n"
        b"Content-Disposition: attachment; filename=\"" + filename.encode() + b"\"\r\n"
        b"\r\n" + encoded + b"--b1--\r\n"
    )


def text_body(size: int) -> bytes:
    line = b"The quick brown fox jumps over the lazy dog, again and again and again.\r\n"
    return (line * (size // len(line) + 1))[:size]


def server_specs(clamd: harness.Clamd) -> List[ServerSpec]:
    return [
        ServerSpec(name=clamd.address, host=clamd.host, port=clamd.port),
        ServerSpec(name=clamd.socket_path, path=clamd.socket_path),
    ]


def make_config(servers: Sequence[ServerSpec], tempdir: str, *, tempfail_on_error: bool = False,
                retry_count: int = 2, results_timeout: float = 10.0) -> Config:
    return Config(
        main=GlobalConfig(tempdir=tempdir, spool_memory_limit=256 * 1024),
        clamav=ClamavConfig(servers=tuple(servers), connect_timeout=2.0, results_timeout=results_timeout),
        spamd=SpamdConfig(retry_count=retry_count, retry_timeout=0.05, tempfail_on_error=tempfail_on_error),
    )


class RealClamdCase(TestCase):
    timeout = 120

    def setUp(self) -> None:
        self.clamd = harness.start_clamd(self)
        self.tempdir = harness.scratch_dir("clamd-spool")

    def spool_of(self, config: Config, body: bytes, head: bytes = b"Received: from test\r\n") -> Spool:
        spool = Spool(config.main.tempdir, 0o600, config.main.spool_memory_limit, run_in_thread)
        spool.set_head(head)
        for i in range(0, len(body), 65535):  # as BODY chunks arrive from the MTA
            spool.append(body[i : i + 65535])
        self.addCleanup(spool.close)
        return spool

    def client(self, config: Config) -> ClamdClient:
        client = clamd_backend.from_config(config, REACTOR)
        assert client is not None
        self.addCleanup(client.stop)
        return client


class ClientTests(RealClamdCase):
    """ClamdClient over real TCP and unix sockets."""

    @inlineCallbacks
    def test_eicar_attachment_found_on_tcp_and_unix(self):  # type: ignore[no-untyped-def]
        """The EICAR file in a base64 attachment is reported with its signature name over TCP and unix."""
        body = mime_with_attachment(harness.EICAR)
        for server in server_specs(self.clamd):
            config = make_config([server], self.tempdir)
            spool = self.spool_of(config, body)
            yield spool.finish()
            result = yield self.client(config).scan(spool)
            self.assertEqual((result.reply.kind, result.reply.virus, result.server, result.attempts),
                             (ReplyKind.VIRUS, harness.EICAR_NAME, server, 1))

    @inlineCallbacks
    def test_clean_message_and_harness_string(self):  # type: ignore[no-untyped-def]
        """A clean message is clean; the harness test string in the body is found."""
        config = make_config(server_specs(self.clamd), self.tempdir)
        client = self.client(config)
        clean = self.spool_of(config, mime_with_attachment(b"just a harmless file\n"))
        yield clean.finish()
        result = yield client.scan(clean)
        self.assertEqual((result.reply.kind, result.reply.text), (ReplyKind.CLEAN, "stream: OK"))
        dirty = self.spool_of(config, b"Subject: x\r\n\r\n" + harness.HARNESS_VIRUS_STRING + b"\r\n")
        yield dirty.finish()
        result = yield client.scan(dirty)
        self.assertEqual((result.reply.kind, result.reply.virus), (ReplyKind.VIRUS, harness.HARNESS_VIRUS_NAME))

    @inlineCallbacks
    def test_virus_at_the_end_of_a_large_spool_file(self):  # type: ignore[no-untyped-def]
        """A 900 KB message spooled to a file, virus in its last bytes: every chunk reaches clamd."""
        config = make_config(server_specs(self.clamd)[:1], self.tempdir)
        spool = self.spool_of(config, text_body(900_000) + harness.HARNESS_VIRUS_STRING + b"\r\n")
        yield spool.finish()
        self.assertIsNotNone(spool.path)
        result = yield self.client(config).scan(spool)
        self.assertEqual((result.reply.kind, result.reply.virus), (ReplyKind.VIRUS, harness.HARNESS_VIRUS_NAME))

    @inlineCallbacks
    def test_above_stream_max_length_fails_after_retries(self):  # type: ignore[no-untyped-def]
        """A 3 MB message exceeds StreamMaxLength 1M: clamd's size-limit ERROR is read, each attempt fails."""
        config = make_config(server_specs(self.clamd), self.tempdir, retry_count=3)
        spool = self.spool_of(config, text_body(3_000_000))
        yield spool.finish()
        error = yield self.assertFailure(self.client(config).scan(spool), ClamdError)
        self.assertEqual(error.attempts, 3)
        self.assertIn("size limit exceeded", error.reason)

    @inlineCallbacks
    def test_stopped_clamd_fails_fast(self):  # type: ignore[no-untyped-def]
        """With clamd stopped every attempt is refused at once; the scan fails after retry_count attempts."""
        config = make_config(server_specs(self.clamd), self.tempdir, retry_count=4)
        client = self.client(config)
        spool = self.spool_of(config, b"Subject: x\r\n\r\nhello\r\n")
        yield spool.finish()
        yield run_in_thread(self.clamd.stop)
        started = REACTOR.seconds()
        error = yield self.assertFailure(client.scan(spool), ClamdError)
        self.assertEqual(error.attempts, 4)
        self.assertIn("connect failed", error.reason)
        self.assertLess(REACTOR.seconds() - started, 2.0)

    @inlineCallbacks
    def test_server_that_never_reads_times_out(self):  # type: ignore[no-untyped-def]
        """A listener that accepts nothing and reads nothing: the attempt ends after results_timeout."""
        silent = socket.socket()
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)
        self.addCleanup(silent.close)
        port = silent.getsockname()[1]
        config = make_config([ServerSpec(name="silent", host="127.0.0.1", port=port)], self.tempdir,
                             retry_count=1, results_timeout=0.5)
        spool = self.spool_of(config, text_body(5_000_000))
        yield spool.finish()
        started = REACTOR.seconds()
        error = yield self.assertFailure(self.client(config).scan(spool), ClamdError)
        elapsed = REACTOR.seconds() - started
        self.assertIn("no progress", error.reason)
        self.assertLess(elapsed, 5.0)


class FakeClamdOverSocketsTests(TestCase):
    """The client over real sockets against rmilter.testing.fake_clamd (behaviour clamd will not show on demand)."""

    timeout = 60

    @inlineCallbacks
    def test_close_mid_stream_over_tcp_is_retried(self):  # type: ignore[no-untyped-def]
        """A server closing the TCP connection mid-stream fails the attempt; the retry gets the same."""
        factory = FakeClamdFactory(Script.close_mid_stream(after=100_000))
        port = REACTOR.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        server = ServerSpec(name="fake", host="127.0.0.1", port=port.getHost().port)
        config = make_config([server], harness.scratch_dir("fake-clamd"), retry_count=2)
        client = clamd_backend.from_config(config, REACTOR)
        assert client is not None
        spool = Spool(config.main.tempdir, 0o600, config.main.spool_memory_limit, run_in_thread)
        spool.set_head(b"Received: x\r\n")
        spool.append(text_body(1_000_000))
        self.addCleanup(spool.close)
        yield spool.finish()
        error = yield self.assertFailure(client.scan(spool), ClamdError)
        self.assertEqual(error.attempts, 2)
        self.assertIn("closed while sending", error.reason)
        self.assertEqual(len(factory.connections), 2)
        for fake in factory.connections:
            self.assertLess(fake.data_bytes, 1_000_000)

    @inlineCallbacks
    def test_unix_socket_reply(self):  # type: ignore[no-untyped-def]
        """Over a unix socket the FOUND reply names the virus; every chunk is at most 64 KiB."""
        factory = FakeClamdFactory(Script.found("Fake.Virus"))
        path = harness.scratch_dir("fake-clamd-unix") + "/clamd.sock"
        port = REACTOR.listenUNIX(path, factory)
        self.addCleanup(port.stopListening)
        config = make_config([ServerSpec(name=path, path=path)], harness.scratch_dir("fake-clamd"))
        client = clamd_backend.from_config(config, REACTOR)
        assert client is not None
        spool = Spool(config.main.tempdir, 0o600, config.main.spool_memory_limit, run_in_thread)
        spool.set_head(b"Received: x\r\n")
        spool.append(text_body(300_000))
        self.addCleanup(spool.close)
        yield spool.finish()
        result = yield client.scan(spool)
        self.assertEqual((result.reply.kind, result.reply.virus), (ReplyKind.VIRUS, "Fake.Virus"))
        (fake,) = factory.connections
        self.assertEqual(fake.data_bytes, spool.size)
        self.assertTrue(fake.chunk_sizes and max(fake.chunk_sizes) <= 65536)


class VirusCheckAndPipelineTests(RealClamdCase):
    """The virus check and the pipeline with the real clamd (SPEC §5.9 step 8)."""

    def message(self, config: Config, body: bytes) -> "tuple[Pipeline, Transaction, Runtime]":
        runtime = Runtime(Deps(config=config, clock=REACTOR, run_blocking=run_in_thread,
                               clamd=clamd_backend.from_config(config, REACTOR)))
        self.addCleanup(runtime.stop)
        pipeline = Pipeline(lambda: runtime)
        conn = ConnectionContext(hostname="mail.example.net", family="4", client_address="198.51.100.7")
        pipeline.connect(conn)
        pipeline.helo(conn, "mail.example.net")
        conn.macros.define("M", {"{mail_addr}": "alice@example.net"})
        msg, _ = pipeline.mail(conn, ["<alice@example.net>"])
        return pipeline, msg, runtime

    @inlineCallbacks
    def run_message(self, config: Config, body: bytes):  # type: ignore[no-untyped-def]
        pipeline, msg, _ = self.message(config, body)
        yield pipeline.rcpt(msg, ["<bob@example.org>"])
        msg.message.connection.macros.define("T", {"i": "4ABC123"})
        yield pipeline.data(msg)
        head, _, rest = body.partition(b"\r\n\r\n")
        for line in head.split(b"\r\n"):
            name, _, value = line.decode().partition(": ")
            pipeline.header(msg, name, value)
        pipeline.eoh(msg)
        for i in range(0, len(rest), 65535):
            yield pipeline.body(msg, rest[i : i + 65535])
        verdict = yield pipeline.eom(msg)
        pipeline.finish(msg, verdict)
        self.fields = summary_event(msg.message, msg.results, verdict)
        return msg, verdict

    @inlineCallbacks
    def test_infected_message_rejected_clean_accepted(self):  # type: ignore[no-untyped-def]
        """EICAR attachment: REJECT 554 5.7.1 Infected: <name>; a clean message: ACCEPT, "clean"."""
        config = make_config(server_specs(self.clamd), self.tempdir)
        msg, verdict = yield self.run_message(config, mime_with_attachment(harness.EICAR))
        self.assertEqual((verdict.action, verdict.reply),
                         (Action.REJECT, SmtpReply("554", "5.7.1", "Infected: " + harness.EICAR_NAME)))
        self.assertEqual(self.fields["virus"], "rejected, virus found")
        msg, verdict = yield self.run_message(config, mime_with_attachment(b"harmless\n"))
        self.assertEqual(verdict.action, Action.ACCEPT)
        self.assertEqual(self.fields["virus"], "clean")

    @inlineCallbacks
    def test_oversized_for_clamd_gets_configured_failure_outcome(self):  # type: ignore[no-untyped-def]
        """Above StreamMaxLength: TEMPFAIL 451 4.7.1 with tempfail_on_error, else ACCEPT unscanned."""
        body = b"Subject: big\r\n\r\n" + text_body(2_000_000)
        config = make_config(server_specs(self.clamd), self.tempdir, tempfail_on_error=True)
        msg, verdict = yield self.run_message(config, body)
        self.assertEqual((verdict.action, verdict.reply),
                         (Action.TEMPFAIL, SmtpReply("451", "4.7.1", "Temporary service failure.")))
        self.assertEqual(self.fields["virus"], "delayed, temporary fail")
        config = make_config(server_specs(self.clamd), self.tempdir, tempfail_on_error=False)
        msg, verdict = yield self.run_message(config, body)
        self.assertEqual(verdict.action, Action.ACCEPT)
        self.assertEqual(self.fields["virus"], "ignored, temporary fail")

    @inlineCallbacks
    def test_clamd_stopped_outcomes(self):  # type: ignore[no-untyped-def]
        """clamd stopped: TEMPFAIL with tempfail_on_error, ACCEPT ("ignored, temporary fail") without."""
        yield run_in_thread(self.clamd.stop)
        body = mime_with_attachment(harness.EICAR)
        config = make_config(server_specs(self.clamd), self.tempdir, tempfail_on_error=True)
        msg, verdict = yield self.run_message(config, body)
        self.assertEqual((verdict.action, verdict.reply),
                         (Action.TEMPFAIL, SmtpReply("451", "4.7.1", "Temporary service failure.")))
        config = make_config(server_specs(self.clamd), self.tempdir, tempfail_on_error=False)
        msg, verdict = yield self.run_message(config, body)
        self.assertEqual(verdict.action, Action.ACCEPT)
        self.assertEqual(self.fields["virus"], "ignored, temporary fail")
