"""Virus scanning end to end: ``twistd rmilter`` with a real clamd, driven by the test MTA and by Postfix.

SPEC §5.9 step 8: an infected message is refused with ``554 5.7.1 Infected: <name>`` at end of
DATA; clamd failures (StreamMaxLength exceeded, clamd stopped) give ``451 4.7.1 Temporary service
failure.`` with ``tempfail_on_error`` and pass unscanned without it.  clamd runs with the harness's
private signature database (REAL-SERVICES §3; its names end in ``.UNOFFICIAL``) and StreamMaxLength 1M.
"""
from __future__ import annotations

import base64
import re
from typing import Any

from twisted.internet import reactor as global_reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.endpoints import TCP4ClientEndpoint, UNIXClientEndpoint
from twisted.trial.unittest import SynchronousTestCase, TestCase

from rmilter.testing.mta import MessageSpec, MilterClient
from tests import harness

REACTOR: Any = global_reactor
HEADERS = (
    ("From", "Alice <alice@example.net>"),
    ("To", "Bob <bob@example.org>"),
    ("Subject", "your file"),
    ("Message-ID", "<virus.1@example.net>"),
    ("MIME-Version", "1.0"),
    ("Content-Type", 'multipart/mixed; boundary="b1"'),
)


def attachment_body(payload: bytes, filename: str = "eicar.com") -> bytes:
    """A multipart body whose second part is ``payload`` as a base64 attachment."""
    encoded = base64.encodebytes(payload).replace(b"\n", b"\r\n")
    return (
        b"--b1\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\nSee attachment.\r\n"
        b"--b1\r\nContent-Type: application/octet-stream; name=\"%s\"\r\n"
        b"Content-Transfer-Encoding: base64\r\n"
        b"Content-Disposition: attachment; filename=\"%s\"\r\n\r\n" % (filename.encode(), filename.encode())
        + encoded + b"--b1--\r\n"
    )


def message(body: bytes, queue_id: str) -> MessageSpec:
    return MessageSpec(sender="alice@example.net", recipients=("<bob@example.org>",), headers=HEADERS,
                       body=body, queue_id=queue_id)


def config_text(clamd: harness.Clamd, *, tempfail_on_error: bool, unix: bool = False) -> str:
    server = '"%s"' % clamd.socket_path if unix else clamd.address
    return (
        "clamav {\n  servers = %s;\n  connect_timeout = 1s;\n  results_timeout = 10s;\n}\n"
        "spamd {\n  retry_count = 2;\n  retry_timeout = 1s;\n  tempfail_on_error = %s;\n}\n"
        % (server, "yes" if tempfail_on_error else "no")
    )


def summary_for(milter: harness.Rmilter, queue_id: str) -> str:
    match = milter.wait_for_log(r"msg done: queue_id: <%s>;[^\n]*" % re.escape(queue_id))
    return match.group(0)


class MilterTests(TestCase):
    """The daemon under the test MTA (rmilter.testing.mta)."""

    timeout = 120

    def setUp(self) -> None:
        self.clamd = harness.start_clamd(self)

    def start(self, **kwargs: Any) -> harness.Rmilter:
        return harness.start_rmilter(self, config_text(self.clamd, **kwargs))

    @inlineCallbacks
    def send(self, milter: harness.Rmilter, body: bytes, queue_id: str, unix: bool = False):  # type: ignore[no-untyped-def]
        endpoint = (UNIXClientEndpoint(REACTOR, milter.socket_path or "") if unix
                    else TCP4ClientEndpoint(REACTOR, "127.0.0.1", milter.port or 0))
        client = yield MilterClient.connect(REACTOR, endpoint)
        try:
            result = yield client.send_message(message(body, queue_id))
        finally:
            yield client.close()
        return result

    @inlineCallbacks
    def test_infected_refused_clean_accepted(self):  # type: ignore[no-untyped-def]
        """EICAR in a base64 attachment: 554 5.7.1 Infected: <name> at EOM; a clean message is accepted."""
        milter = self.start(tempfail_on_error=True)
        result = yield self.send(milter, attachment_body(harness.EICAR), "4VIRUS01")
        self.assertEqual((result.final_stage, result.action), ("eom", "reject"))
        self.assertEqual(result.reply_text, "554 5.7.1 Infected: %s" % harness.EICAR_NAME)
        self.assertIn("virus scan: rejected, virus found", summary_for(milter, "4VIRUS01"))
        self.assertRegex(milter.log_text(), r"clamscan: scan \d+\.\d+, %s, found %s"
                         % (re.escape(self.clamd.address), re.escape(harness.EICAR_NAME)))
        result = yield self.send(milter, attachment_body(b"a harmless file\n"), "4CLEAN01", unix=True)
        self.assertEqual((result.final_stage, result.action), ("eom", "accept"))
        self.assertIn("virus scan: clean", summary_for(milter, "4CLEAN01"))

    @inlineCallbacks
    def test_unix_socket_clamd(self):  # type: ignore[no-untyped-def]
        """clamd named by its unix socket path finds the harness test string."""
        milter = harness.start_rmilter(self, config_text(self.clamd, tempfail_on_error=False, unix=True))
        body = b"Hello\r\n" + harness.HARNESS_VIRUS_STRING + b"\r\n"
        result = yield self.send(milter, body, "4UNIX01")
        self.assertEqual(result.reply_text, "554 5.7.1 Infected: %s" % harness.HARNESS_VIRUS_NAME)

    @inlineCallbacks
    def test_above_stream_max_length_gets_failure_outcome(self):  # type: ignore[no-untyped-def]
        """A 2 MB message (> StreamMaxLength 1M): 451 4.7.1 with tempfail_on_error, accepted unscanned without."""
        big = b"".join(b"line %07d of a long message body that clamd will refuse\r\n" % i for i in range(33000))
        milter = self.start(tempfail_on_error=True)
        result = yield self.send(milter, big, "4BIG01")
        self.assertEqual(result.reply_text, "451 4.7.1 Temporary service failure.")
        self.assertIn("virus scan: delayed, temporary fail", summary_for(milter, "4BIG01"))
        self.assertIn("size limit exceeded", milter.log_text())
        milter.stop()  # blocking is fine here: the services are other processes
        milter = self.start(tempfail_on_error=False)
        result = yield self.send(milter, big, "4BIG02")
        self.assertEqual(result.action, "accept")
        self.assertIn("virus scan: ignored, temporary fail", summary_for(milter, "4BIG02"))

    @inlineCallbacks
    def test_clamd_stopped(self):  # type: ignore[no-untyped-def]
        """clamd stopped: even an infected message gets 451 4.7.1 with tempfail_on_error, passes without."""
        self.clamd.stop()
        milter = self.start(tempfail_on_error=True)
        result = yield self.send(milter, attachment_body(harness.EICAR), "4DOWN01")
        self.assertEqual(result.reply_text, "451 4.7.1 Temporary service failure.")
        milter.stop()  # blocking is fine here: the services are other processes
        milter = self.start(tempfail_on_error=False)
        result = yield self.send(milter, attachment_body(harness.EICAR), "4DOWN02")
        self.assertEqual(result.action, "accept")
        self.assertIn("virus scan: ignored, temporary fail", summary_for(milter, "4DOWN02"))


class PostfixTests(SynchronousTestCase):
    """Postfix with smtpd_milters = rmilter, mail sent with swaks."""

    def test_infected_refused_at_end_of_data(self) -> None:
        """The infected message is refused by Postfix at end of DATA with 554 5.7.1 Infected: <name>;
        a clean one is delivered."""
        clamd = harness.start_clamd(self)
        milter = harness.start_rmilter(self, config_text(clamd, tempfail_on_error=True))
        postfix = harness.start_postfix(self, milters=milter.milter_inet)
        head = "".join("%s: %s\r\n" % h for h in HEADERS).encode()
        infected = postfix.swaks(head + b"\r\n" + attachment_body(harness.EICAR), sender="alice@example.net")
        self.assertNotEqual(infected.status, 0)
        reply = "554 5.7.1 Infected: %s" % harness.EICAR_NAME
        self.assertIn(reply, infected.server_replies)
        self.assertEqual(command_answered(infected.transcript, reply), ".")
        clean = postfix.swaks(head + b"\r\n" + attachment_body(b"harmless\n"), sender="alice@example.net")
        self.assertEqual(clean.status, 0, clean.transcript)
        delivered = postfix.wait_delivered(1)
        self.assertEqual([m.header("Subject") for m in delivered], ["your file"])


def command_answered(transcript: str, reply: str) -> str:
    """The SMTP command swaks had sent last when the server gave ``reply``."""
    last = ""
    for line in transcript.splitlines():
        if line.startswith(" -> "):
            last = line[4:].strip()
        elif line.startswith("<** ") and line[4:].strip() == reply:
            return last
    raise AssertionError("no %r in\n%s" % (reply, transcript))

