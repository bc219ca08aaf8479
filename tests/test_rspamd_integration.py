"""Spam scanning against a real Rspamd (tests/harness/rspamd.py), through ``twistd rmilter``.

The MTA side is ``rmilter.testing.mta`` (one milter connection per message) or a real Postfix
with SASL and swaks.  Rspamd runs the stock rules plus the harness hooks (GTUBE variants,
``RSPAMD-TEST-ACTION``, ``RSPAMD-TEST-SCORE``) and the rules of ``tests/rspamd_rules.py``
(request echo, slow scan).  A missing Rspamd, Postfix or swaks fails these tests.
"""
from __future__ import annotations

import re
import socket
from typing import Any, Dict, List, Optional, Tuple

from twisted.internet import defer, reactor
from twisted.trial.unittest import SynchronousTestCase, TestCase

from rmilter.testing.mta import ClientSpec, MessageResult, MessageSpec
from tests.dates import message_date
from tests.harness import (
    GTUBE,
    GTUBE_ADD_HEADER,
    GTUBE_REWRITE_SUBJECT,
    Rmilter,
    Rspamd,
    free_port,
    shared_rspamd,
    start_postfix,
    start_rmilter,
)
from tests.redis_support import send_message
from tests.rspamd_rules import ECHO_CONTEXT_LUA, SLOW_SCAN_LUA, register_spam_rules

register_spam_rules()

HEADERS = (
    ("From", "Alice <alice@example.net>"),
    ("To", "Bob <bob@example.org>"),
    ("Subject", "Lunch"),
    ("Date", message_date()),
    ("Message-ID", "<ham-1@example.net>"),
    ("MIME-Version", "1.0"),
    ("Content-Type", "text/plain; charset=us-ascii"),
)

CONFIG = """
spamd {
  servers = %(servers)s;
  connect_timeout = 1s;
  results_timeout = 10s;
  retry_count = 2;
  retry_timeout = 100ms;
  extended_spam_headers = yes;
  reject_message = "Spam message rejected by rmilter";
  %(extra)s
}
%(main)s
"""


def config(servers: str, extra: str = "", main: str = "") -> str:
    return CONFIG % {"servers": servers, "extra": extra, "main": main}


def spec(body: bytes, **kwargs: Any) -> MessageSpec:
    return MessageSpec(sender="alice@example.net", recipients=("bob@example.org",), headers=HEADERS,
                       body=b"Hi Bob, lunch tomorrow?\r\n" + body + b"\r\n", **kwargs)


def spamd_result(result: MessageResult) -> str:
    """rmilter's own X-Spamd-Result (SPEC §6.8.4 format), not the one Rspamd asks to add."""
    values = [v for n, v in result.added_headers if n == "X-Spamd-Result" and ";" not in v.split("\n")[0]]
    if len(values) != 1:
        raise AssertionError("expected one rmilter X-Spamd-Result, got %r" % (result.added_headers,))
    return values[0]


_SYMBOL = re.compile(r"^ ?([A-Z0-9_]+)\((-?[0-9.]+)\)\[(.*)\]$")


def symbols_of(header: str) -> Dict[str, List[str]]:
    """``NAME(score)[a, b]`` lines of an X-Spamd-Result value, as name -> options."""
    out: Dict[str, List[str]] = {}
    for line in header.split("\n")[1:]:
        match = _SYMBOL.match(line)
        if match:
            out[match.group(1)] = [o for o in match.group(3).split(", ") if o]
    return out


class RspamdVerdictTests(TestCase):
    """Rspamd's verdict becomes the SMTP answer and the header changes."""

    timeout = 120

    def setUp(self) -> None:
        self.rspamd = shared_rspamd()
        self.milter = start_rmilter(self, config(self.rspamd.address, main='progress_interval = 1s;'))

    def send(self, message: MessageSpec) -> "defer.Deferred[MessageResult]":
        return send_message(reactor, self.milter.port, message)

    @defer.inlineCallbacks
    def test_gtube_is_rejected_with_rspamd_message(self):  # type: ignore[no-untyped-def]
        """GTUBE: 554 5.7.1 with Rspamd's smtp_message; the summary says rejected."""
        result = yield self.send(spec(GTUBE, queue_id="4GTUBE1"))
        self.assertEqual((result.action, result.final_stage), ("reject", "eom"))
        self.assertEqual(result.reply_text, "554 5.7.1 Gtube pattern")
        self.milter.wait_for_log(r"msg done: queue_id: <4GTUBE1>;.*spam scan: rejected, action: reject")

    @defer.inlineCallbacks
    def test_add_header_pattern(self):  # type: ignore[no-untyped-def]
        """The add-header test pattern: accepted with X-Spam: yes (CHGHEADER index 1)."""
        result = yield self.send(spec(GTUBE_ADD_HEADER))
        self.assertEqual(result.action, "accept")
        self.assertIn((1, "X-Spam", "yes"), result.changed_headers)
        self.assertEqual(symbols_of(spamd_result(result)).keys() & {"GTUBE"}, {"GTUBE"})

    @defer.inlineCallbacks
    def test_rewrite_subject_pattern(self):  # type: ignore[no-untyped-def]
        """The rewrite-subject test pattern: the Subject Rspamd computed, and X-Spam."""
        result = yield self.send(spec(GTUBE_REWRITE_SUBJECT))
        self.assertEqual(result.action, "accept")
        self.assertIn((1, "Subject", "*** SPAM *** Lunch"), result.changed_headers)
        self.assertIn((1, "X-Spam", "yes"), result.changed_headers)

    @defer.inlineCallbacks
    def test_ordinary_message_is_accepted(self):  # type: ignore[no-untyped-def]
        """A ham message is accepted, unchanged but for the extended headers."""
        result = yield self.send(spec(b"", queue_id="4HAM01"))
        self.assertEqual(result.action, "accept")
        self.assertEqual([h for h in result.changed_headers if h[1] in ("Subject", "X-Spam") and h[2]], [])
        self.assertTrue(spamd_result(result).startswith("default: False ["))
        added = dict(result.added_headers)
        self.assertEqual(added["X-Rspamd-Server"], self.rspamd.address)
        self.assertEqual(added["X-Rspamd-Queue-ID"], "4HAM01")
        self.assertRegex(added["X-Rspamd-Scan-Time"], r"^[0-9]+\.[0-9]{2}$")
        self.milter.wait_for_log(r"msg done: queue_id: <4HAM01>;.*spam scan: no spam")
        self.milter.wait_for_log(r"spamdscan: scan, time: [0-9.]+, server: %s, metric: default: \["
                                 % re.escape(self.rspamd.address))

    @defer.inlineCallbacks
    def test_soft_reject(self):  # type: ignore[no-untyped-def]
        """Rspamd's soft reject (forced by the harness rule): 451 4.7.1 with Rspamd's message."""
        result = yield self.send(spec(b"RSPAMD-TEST-ACTION: soft reject"))
        self.assertEqual(result.action, "tempfail")
        self.assertEqual(result.reply_text, "451 4.7.1 harness forced soft reject")

    @defer.inlineCallbacks
    def test_reject_by_score_uses_reject_message(self):  # type: ignore[no-untyped-def]
        """A reject without an SMTP message from Rspamd gets rmilter's reject_message."""
        result = yield self.send(spec(b"RSPAMD-TEST-SCORE: 15.5"))
        self.assertEqual(result.reply_text, "554 5.7.1 Spam message rejected by rmilter")

    @defer.inlineCallbacks
    def test_request_context_arrives(self):  # type: ignore[no-untyped-def]
        """IP, HELO, hostname, sender, recipients and queue id reach Rspamd (read back from the echo rule)."""
        client = ClientSpec(hostname="relay.example.net", address="203.0.113.7", helo="helo.example.net")
        message = MessageSpec(sender="Carol@Example.NET", recipients=("dave@example.org", "erin@example.org"),
                              headers=HEADERS, body=b"RSPAMD-TEST-ECHO\r\n", queue_id="4ECHO01", client=client)
        result = yield self.send(message)
        self.assertEqual(result.action, "accept")
        echoed = symbols_of(spamd_result(result))
        self.assertEqual(echoed["ECHO_IP"], ["203.0.113.7"])
        self.assertEqual(echoed["ECHO_HELO"], ["helo.example.net"])
        self.assertEqual(echoed["ECHO_HOSTNAME"], ["relay.example.net"])
        self.assertEqual(echoed["ECHO_FROM"], ["carol@example.net"])  # normalised sender (SPEC §5.4)
        self.assertEqual(sorted(echoed["ECHO_RCPT"]), ["dave@example.org", "erin@example.org"])
        self.assertEqual(echoed["ECHO_QUEUE_ID"], ["4ECHO01"])
        self.assertNotIn("ECHO_USER", echoed)

    @defer.inlineCallbacks
    def test_slow_scan_keeps_mta_waiting_then_gives_verdict(self):  # type: ignore[no-untyped-def]
        """A scan taking ~3 s: the MTA gets PROGRESS keep-alives, then Rspamd's verdict."""
        silent = socket.socket()
        silent.bind(("127.0.0.1", 0))
        silent.listen(5)
        self.addCleanup(silent.close)
        port = silent.getsockname()[1]
        body = b"RSPAMD-TEST-SLOW: %d 3\r\nRSPAMD-TEST-SCORE: 6.5" % port
        started = reactor.seconds()
        result = yield self.send(spec(body))
        self.assertGreaterEqual(reactor.seconds() - started, 2.5)
        self.assertGreaterEqual(result.progress, 2)
        self.assertEqual(result.action, "accept")
        self.assertIn((1, "X-Spam", "yes"), result.changed_headers)
        self.assertIn("HARNESS_SLOW", symbols_of(spamd_result(result)))


class AuthenticatedContextTests(TestCase):
    """With strict_auth the authenticated login is sent as User."""

    timeout = 120

    @defer.inlineCallbacks
    def test_user_arrives_with_strict_auth(self):  # type: ignore[no-untyped-def]
        rspamd = shared_rspamd()
        milter = start_rmilter(self, config(rspamd.address, 'extended_headers_rcpt = "@example.org";',
                                            "strict_auth = yes;"))
        message = MessageSpec(sender="alice@example.net", recipients=("bob@example.org",), headers=HEADERS,
                              body=b"RSPAMD-TEST-ECHO\r\n", auth_authen="alice")
        result = yield send_message(reactor, milter.port, message)
        self.assertEqual(result.action, "accept")
        self.assertEqual(symbols_of(spamd_result(result))["ECHO_USER"], ["alice"])


class RspamdFailureTests(TestCase):
    """A slow or dead Rspamd never hangs the mail server."""

    timeout = 180

    @defer.inlineCallbacks
    def test_stopped_rspamd(self):  # type: ignore[no-untyped-def]
        """Rspamd stopped: TEMPFAIL with tempfail_on_error = yes; accepted unscanned without."""
        rspamd = Rspamd(extra_lua={"rmilter-spam-echo": ECHO_CONTEXT_LUA, "rmilter-spam-slow": SLOW_SCAN_LUA})
        self.addCleanup(rspamd.stop)
        rspamd.start()
        strict = start_rmilter(self, config(rspamd.address, "tempfail_on_error = yes;"))
        lenient = start_rmilter(self, config(rspamd.address))
        for milter in (strict, lenient):
            result = yield send_message(reactor, milter.port, spec(GTUBE))
            self.assertEqual(result.reply_text, "554 5.7.1 Gtube pattern")
        rspamd.stop()
        result = yield send_message(reactor, strict.port, spec(GTUBE, queue_id="4DOWN01"))
        self.assertEqual((result.action, result.reply_text), ("tempfail", "451 4.7.1 Temporary service failure."))
        strict.wait_for_log(r"msg done: queue_id: <4DOWN01>;.*spam scan: delayed, temporary fail")
        result = yield send_message(reactor, lenient.port, spec(GTUBE, queue_id="4DOWN02"))
        self.assertEqual(result.action, "accept")
        self.assertNotIn("X-Spamd-Result", [n for n, _ in result.added_headers])
        lenient.wait_for_log(r"msg done: queue_id: <4DOWN02>;.*spam scan: ignored, temporary fail")

    @defer.inlineCallbacks
    def test_one_of_two_servers_dead(self):  # type: ignore[no-untyped-def]
        """Two servers, one dead: every message is still scanned, by the live one."""
        rspamd = shared_rspamd()
        dead = "127.0.0.1:%d" % free_port()
        milter = start_rmilter(self, config("%s, %s" % (dead, rspamd.address), "maxerrors = 2;"))
        for i in range(12):
            result = yield send_message(reactor, milter.port, spec(GTUBE, queue_id="4TWO%02d" % i))
            self.assertEqual(result.reply_text, "554 5.7.1 Gtube pattern", i)
        log = milter.log_text()
        scans = re.findall(r"spamdscan: scan, time: [0-9.]+, server: (\S+),", log)
        self.assertEqual(scans, [rspamd.address] * 12)
        failures = re.findall(r"scan failed on (\S+) \(connection refused\)", log)
        self.assertTrue(1 <= len(failures) <= 2, failures)  # then dead, and skipped (SPEC §6.6, B5)
        self.assertEqual(set(failures), {dead})


class PostfixTests(SynchronousTestCase):
    """Through a real Postfix with SASL: the verdict at the end of DATA."""

    def message(self, body: bytes) -> bytes:
        head = b"".join(b"%s: %s\r\n" % (n.encode(), v.encode()) for n, v in HEADERS)
        return head + b"\r\nHi Bob, lunch tomorrow?\r\n" + body + b"\r\n"

    def start(self, main: str = "") -> None:
        self.rspamd = shared_rspamd()
        self.milter = start_rmilter(self, config(self.rspamd.address, main=main))
        self.postfix = start_postfix(self, milters=self.milter.milter_inet)

    def test_gtube_refused_at_end_of_data(self) -> None:
        self.start()
        sent = self.postfix.swaks(self.message(GTUBE), sender="alice@example.net",
                                  xclient_addr="198.51.100.7", xclient_name="mail.example.net")
        self.assertNotEqual(sent.status, 0)
        self.assertIn("554 5.7.1 Gtube pattern", sent.server_replies)
        self.assertRegex(sent.transcript, r"-> \.\r?\n<\*\* +554 5\.7\.1 Gtube pattern")
        ham = self.postfix.swaks(self.message(b""), sender="alice@example.net",
                                 xclient_addr="198.51.100.7", xclient_name="mail.example.net")
        self.assertEqual(ham.status, 0, ham.transcript)
        [delivered] = self.postfix.wait_delivered(1)
        self.assertIsNotNone(delivered.header("X-Spamd-Result"))

    def test_authenticated_sender_not_scanned(self) -> None:
        """SPEC §5.11: an authenticated sender's GTUBE is delivered (no scan) unless strict_auth."""
        self.start()
        sent = self.postfix.swaks(self.message(GTUBE), sender="alice@example.net", auth_user="alice")
        self.assertEqual(sent.status, 0, sent.transcript)
        self.milter.wait_for_log(r"msg done: .*user: alice; spam scan: ignored, authenticated user")
        [delivered] = self.postfix.wait_delivered(1)
        self.assertIsNone(delivered.header("X-Spamd-Result"))

    def test_strict_auth_scans_authenticated_sender(self) -> None:
        self.start(main="strict_auth = yes;")
        sent = self.postfix.swaks(self.message(GTUBE), sender="alice@example.net", auth_user="alice")
        self.assertNotEqual(sent.status, 0)
        self.assertIn("554 5.7.1 Gtube pattern", sent.server_replies)
