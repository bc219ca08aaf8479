"""Issue 18 against the running service: a real ``twistd rmilter`` over real sockets, hostile
peers (milter frames, Rspamd/clamd replies from listeners in this process) and hostile configs."""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import struct
import subprocess
import time
from typing import Optional

from twisted.internet import defer, reactor, threads
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.trial.unittest import TestCase

from rmilter.milter import codec
from rmilter.testing.mta import MessageSpec, MilterClient
from tests import harness

OPTNEG = codec.encode(codec.Negotiate(6, 0x1FF, 0))


class CannedHttp(Protocol):
    """An 'Rspamd' that answers every request with ``self.factory.body`` once the request is in."""

    def dataReceived(self, data: bytes) -> None:
        if b"\r\n\r\n" not in data and not hasattr(self, "_answered"):
            pass
        if getattr(self, "_answered", False):
            return
        self._answered = True
        body = self.factory.body  # type: ignore[attr-defined]
        self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
                             b"Connection: close\r\n\r\n" % len(body) + body)
        self.transport.loseConnection()


class CannedClamd(Protocol):
    def dataReceived(self, data: bytes) -> None:
        if data.endswith(b"\0\0\0\0"):  # the zero-length chunk ends INSTREAM
            self.transport.write(b"stream: OK\0")
            self.transport.loseConnection()


class SilentHttp(Protocol):
    """An 'Rspamd' that reads the whole request and never answers (one far behind with work)."""

    def dataReceived(self, data: bytes) -> None:
        self.factory.received += len(data)  # type: ignore[attr-defined]
        if self.factory.received >= self.factory.expect and not self.factory.request_in.called:  # type: ignore[attr-defined]
            self.factory.request_in.callback(None)  # type: ignore[attr-defined]

    def connectionLost(self, reason: object = None) -> None:
        self.factory.closed.append(reactor.seconds())  # type: ignore[attr-defined]


def raw_connect(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    s.sendall(OPTNEG)
    reply = s.recv(4096)
    assert reply[4:5] == b"O", reply
    return s


def closed_within(s: socket.socket, trickle: Optional[bytes], seconds: float) -> float:
    """Send ``trickle`` a byte per 0.25 s (a slowloris) until the peer closes; seconds it took."""
    started = time.monotonic()
    s.settimeout(0.25)
    i = 0
    while time.monotonic() - started < seconds:
        try:
            if s.recv(4096) == b"":
                return time.monotonic() - started
        except socket.timeout:
            pass
        except OSError:
            return time.monotonic() - started
        if trickle is not None:
            try:
                s.send(trickle[i % len(trickle):i % len(trickle) + 1])
            except OSError:
                return time.monotonic() - started
            i += 1
    raise AssertionError("still open after %.0f s" % seconds)


class HostileMtaTests(TestCase):
    timeout = 120

    def test_slowloris_frame_is_closed_after_idle_timeout(self) -> None:
        """Item 4: one byte per 0.25 s of a frame that never ends: closed after idle_timeout (2 s)."""
        milter = harness.start_rmilter(self, "idle_timeout = 2s;\n", unix=False)
        s = raw_connect(milter.inet_port)
        self.addCleanup(s.close)
        frame = struct.pack(">I", 100000) + b"H" + b"X" * 99999
        took = closed_within(s, frame, 30)
        self.assertLess(took, 10)
        milter.wait_for_log(r"a command begun but not completed within 2(\.0)? s")

    def test_unknown_macro_stages_dropped_and_warnings_rate_limited(self) -> None:
        """Item 5 + 'also seen': 200 MACRO frames of unknown stages; a few lines, then a count."""
        milter = harness.start_rmilter(self, "", unix=False)
        s = raw_connect(milter.inet_port)
        payload = b"".join(codec.encode(codec.Macro(chr(ord("a") + i % 20), (("x", "y" * 1000),)))
                           for i in range(200))
        s.sendall(payload)
        s.close()
        milter.wait_for_log(r"190 further protocol warnings were not logged")
        self.assertEqual(len(re.findall(r"macros for unknown stage", milter.log_text())), 10)

    @defer.inlineCallbacks
    def test_header_section_beyond_the_bound_is_refused(self):  # type: ignore[no-untyped-def]
        """Item 5: headers count toward the in-memory bound (max(1M, 2M) here): 3 x 1 MiB is refused."""
        milter = harness.start_rmilter(self, "", unix=False)
        big = "x" * (1024 * 1024)
        client = yield MilterClient.connect(reactor, TCP4ClientEndpoint(reactor, "127.0.0.1", milter.inet_port))
        result = yield client.send_message(MessageSpec(headers=(("X-Big1", big), ("X-Big2", big), ("X-Big3", big))))
        yield client.close()
        self.assertEqual(result.action, "reject")
        self.assertTrue(result.reply_text.startswith("552 5.3.4 "), result.reply_text)
        milter.wait_for_log(r"header section is larger than 2097152 bytes")

    def test_listen_backlog(self) -> None:
        """'Also seen': the listener's backlog is listen_backlog (ss shows it as Send-Q)."""
        milter = harness.start_rmilter(self, "listen_backlog = 333;\n", unix=False)
        out = subprocess.run(["ss", "-ltnH", "sport = :%d" % milter.inet_port], capture_output=True,
                             text=True, check=True).stdout
        self.assertEqual(out.split()[2], "333", out)


class HostileBackendTests(TestCase):
    timeout = 120

    def canned(self, body: bytes) -> int:
        factory = Factory.forProtocol(CannedHttp)
        factory.body = body  # type: ignore[attr-defined]
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return port.getHost().port

    def start(self, body: bytes, extra: str = "") -> harness.Rmilter:
        return harness.start_rmilter(
            self, "spamd { servers = 127.0.0.1:%d; results_timeout = 60s; retry_count = 1; "
                  "tempfail_on_error = yes; };\n%s" % (self.canned(body), extra), unix=False)

    @defer.inlineCallbacks
    def send(self, milter: harness.Rmilter):  # type: ignore[no-untyped-def]
        client = yield MilterClient.connect(reactor, TCP4ClientEndpoint(reactor, "127.0.0.1", milter.inet_port))
        result = yield client.send_message(MessageSpec())
        yield client.close()
        return result

    @defer.inlineCallbacks
    def test_deeply_nested_reply_fails_the_attempt_at_once(self):  # type: ignore[no-untyped-def]
        """Item 6: JSON nested 100,000 deep: a failed attempt at once (not 60 s), no Unhandled Error."""
        milter = self.start(b"[" * 100000 + b"]" * 100000)
        started = reactor.seconds()
        result = yield self.send(milter)
        self.assertLess(reactor.seconds() - started, 20)
        self.assertEqual(result.action, "tempfail")
        log = milter.log_text()
        self.assertIn("unparsable reply: RecursionError", log)
        self.assertNotIn("Unhandled Error", log)

    @defer.inlineCallbacks
    def test_surrogate_and_crlf_in_smtp_message(self):  # type: ignore[no-untyped-def]
        """Item 7: a lone surrogate and CR/LF in smtp_message: still a 5xx reject, one summary line."""
        body = json.dumps({"action": "reject", "score": 20.0, "required_score": 15.0, "symbols": {},
                           "messages": {"smtp_message": "bad \ud800\r\nqueue_id: FORGED"}}).encode()
        milter = self.start(body)
        result = yield self.send(milter)
        self.assertEqual(result.action, "reject")
        self.assertRegex(result.reply_text, r"^554 5\.7\.1 bad \ufffd +queue_id: FORGED$")
        milter.wait_for_log(r"msg done: ")
        log = milter.log_text()
        self.assertNotRegex(log, r"\nqueue_id: FORGED")
        self.assertNotIn("internal error", log)

    @defer.inlineCallbacks
    def test_header_edits_capped(self):  # type: ignore[no-untyped-def]
        """Item 7: a reply asking for 20,000 headers gets 100 (MAX_HEADER_EDITS) and a log line;
        whitespace-only lines of a value are gone."""
        headers = {"X-H%d" % i: "v\n \n\tw" for i in range(20000)}
        body = json.dumps({"action": "no action", "score": 0.0, "required_score": 15.0, "symbols": {},
                           "milter": {"add_headers": headers}}).encode()
        milter = self.start(body)
        result = yield self.send(milter)
        added = [m for m in result.modifications if isinstance(m, codec.AddHeaderReply) and m.name.startswith("X-H")]
        self.assertEqual(len(added), 100)
        self.assertEqual(added[0].value, "v\n\tw")
        milter.wait_for_log(r"more than 100 edits of a kind; dropped: 19900 add_headers")

    @defer.inlineCallbacks
    def test_mta_gone_during_the_scan_cancels_it(self):  # type: ignore[no-untyped-def]
        """The MTA drops the connection while Rspamd has the message: the scan is cancelled at once
        (not after 60 s and 4 more attempts) and the spool file is deleted."""
        body = b"x" * 76 + b"\r\n"
        spec = MessageSpec(body=body * (2 * 1024 * 1024 // len(body)))  # on disk: over spool_memory_limit
        factory = Factory.forProtocol(SilentHttp)
        factory.received, factory.expect = 0, len(spec.body)  # type: ignore[attr-defined]
        factory.request_in, factory.closed = defer.Deferred(), []  # type: ignore[attr-defined]
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        tempdir = harness.scratch_dir("spool")
        milter = harness.start_rmilter(
            self, "tempdir = %s;\nspamd { servers = 127.0.0.1:%d; results_timeout = 60s; retry_count = 5; };\n"
            % (tempdir, port.getHost().port), unix=False)
        client = yield MilterClient.connect(reactor, TCP4ClientEndpoint(reactor, "127.0.0.1", milter.inet_port))
        sent = client.send_message(spec)
        sent.addErrback(lambda _: None)  # the connection is dropped under it
        yield factory.request_in.addTimeout(30, reactor)  # type: ignore[attr-defined]
        self.assertEqual(len([n for n in os.listdir(tempdir) if n.startswith("msg.")]), 1)
        dropped = reactor.seconds()
        client.protocol.transport.abortConnection()  # as Postfix after milter_content_timeout
        # waited for in a thread: the abort and the listener's close need this process's reactor
        yield threads.deferToThread(milter.wait_for_log, r"spamdscan: scan cancelled")
        yield threads.deferToThread(harness.wait_until, lambda: factory.closed or None, 10,  # type: ignore[attr-defined]
                                    "the Rspamd connection closed")
        self.assertLess(factory.closed[0] - dropped, 10)  # type: ignore[attr-defined]
        yield threads.deferToThread(
            harness.wait_until, lambda: not any(n.startswith("msg.") for n in os.listdir(tempdir)) or None, 10,
            "the spool file deleted")
        log = milter.log_text()
        self.assertIn("1 scan(s) in flight cancelled", log)
        self.assertNotIn("attempt 1 of 5", log)  # no retry, no timeout
        self.assertNotIn("internal error", log)
        self.assertNotIn("msg done", log)  # nothing recorded for a message nobody got an answer on

    @defer.inlineCallbacks
    def test_clamd_client_is_quiet(self):  # type: ignore[no-untyped-def]
        """'Also seen': no 'Starting/Stopping factory' lines per message."""
        port = reactor.listenTCP(0, Factory.forProtocol(CannedClamd), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        milter = harness.start_rmilter(self, "clamav { servers = 127.0.0.1:%d; };\n" % port.getHost().port,
                                       unix=False)
        result = yield self.send(milter)
        self.assertEqual(result.action, "accept")
        milter.wait_for_log(r"virus scan: clean|msg done")
        self.assertNotRegex(milter.log_text(), r"(Starting|Stopping) factory")


class HostileConfigTests(TestCase):
    timeout = 120

    def test_unicode_blank_and_nul_refused_on_reload(self) -> None:
        """Items 1-2: a reload of such a file logs FILE:LINE and keeps running (no traceback)."""
        milter = harness.start_rmilter(self, "max_size = 1M;\n", unix=False)
        milter.write_config('max_size\u00a0= 10M;\ntempdir = "/tmp/a\x00b";\n')
        milter.reload(r"keeping the running configuration: .*rmilter\.conf:2: tempdir: a NUL byte")
        log = milter.log_text()
        self.assertRegex(log, r"rmilter\.conf:1: character U\+00A0 \(NO-BREAK SPACE\)")
        self.assertNotIn("Traceback", log)
        self.assertTrue(milter.running())

    def test_include_bomb_refused_and_slow_reload_does_not_hold_up_sigterm(self) -> None:
        """Item 3: a self-including file is refused at once; a second SIGHUP during a long reload is
        logged; SIGTERM during the reload exits without waiting for it."""
        milter = harness.start_rmilter(self, "max_size = 1M;\n", unix=False)
        milter.write_config('.include "rmilter.conf"\n.include "rmilter.conf"\n')
        milter.reload(r"an include cycle", timeout=20)
        # a big but legal file: parsing takes seconds, long enough to signal during it
        milter.write_config("# big\n" + "max_size = 1M;\n" * 600000)
        offset = milter.log_size()
        milter.signal(signal.SIGHUP)
        milter.wait_for_log(r"reloading configuration", offset=offset)
        milter.signal(signal.SIGHUP)
        milter.wait_for_log(r"reload requested while the previous one .* is still running", offset=offset)
        started = time.monotonic()
        status = milter.stop(timeout=20)
        self.assertLess(time.monotonic() - started, 15)
        # twistd re-raises the SIGTERM it stopped on: -15 is a clean stop, -9 the harness's SIGKILL
        self.assertIn(status, (0, -signal.SIGTERM), milter.log_text(offset)[-3000:])
        self.assertIn("rmilter stopped", milter.log_text(offset))
        self.assertNotIn("configuration reloaded", milter.log_text(offset))
