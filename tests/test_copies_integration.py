"""Pub/sub copies end to end (SPEC §6.5, B12): a Redis subscriber receives the spool bytes of
messages passing rmilter, spam copies of rejected mail, and half of the mail with p = 0.5."""
from __future__ import annotations

import math
import re
from typing import Any, List

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.trial.unittest import SynchronousTestCase, TestCase

from rmilter.testing.mta import MessageSpec, MilterClient
from tests import harness
from tests.harness.base import wait_until

MESSAGE = (
    b"From: Alice <alice@example.com>\r\nTo: Bob <bob@example.org>\r\nSubject: copy\r\n"
    b"Message-ID: <copy.1@example.com>\r\n\r\nfirst line\r\nsecond line\r\n"
)


def summary_lines(milter: harness.Rmilter) -> List[str]:
    return [line for line in milter.log_text().splitlines() if "msg done:" in line]


class PostfixCopiesTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.redis = harness.start_redis(self)
        self.rspamd = harness.shared_rspamd()

    def start(self, config: str) -> None:
        self.milter = harness.start_rmilter(self, config % {"redis": self.redis.address,
                                                           "rspamd": self.rspamd.address})
        self.postfix = harness.start_postfix(self, milters=self.milter.milter_inet)

    def test_subscriber_receives_the_spool_bytes(self) -> None:
        """The copy is rmilter's spool (SPEC §5.14): synthetic Received, the headers as Postfix passed
        them (LF), Return-Path and X-Rcpt-To (CRLF), empty line, the body; the count is logged."""
        self.start('redis { servers_copy = %(redis)s; copy_channel = "copies"; }\n')
        subscription = self.redis.subscribe("copies")
        self.addCleanup(subscription.close)
        sent = self.postfix.swaks(MESSAGE, sender="alice@example.com", xclient_addr="192.0.2.70",
                                  xclient_name="client.example.com")
        self.assertEqual(sent.status, 0, sent.transcript)
        (payload,) = subscription.wait_messages(1)
        self.assertRegex(
            payload,
            rb"^Received: from client\.example\.com \(client\.example\.com \[192\.0\.2\.70\]\) by localhost "
            rb"\(Postfix\) with ESMTP id [0-9a-f]{10};\r\n",
        )
        head, _, body = payload.partition(b"\r\n\r\n")
        self.assertIn(
            b"\nFrom: Alice <alice@example.com>\nTo: Bob <bob@example.org>\nSubject: copy\n"
            b"Message-ID: <copy.1@example.com>\n",
            head,
        )
        self.assertTrue(head.endswith(b"Return-Path: <alice@example.com>\r\nX-Rcpt-To: <bob@example.org>"), head)
        self.assertTrue(body.startswith(b"first line\r\nsecond line\r\n"), body)
        self.postfix.wait_delivered(1)
        (line,) = summary_lines(self.milter)
        self.assertIn("; published to copies (1 clients); verdict: accept", line)

    def test_spam_copy_of_rejected_message(self) -> None:
        """Rspamd's reject: the message is refused and its copy goes to spam_channel."""
        self.start("spamd { servers = r:%(rspamd)s; }\n"
                   'redis { servers_spam = %(redis)s; spam_channel = "spam"; }\n')
        subscription = self.redis.subscribe("spam")
        self.addCleanup(subscription.close)
        sent = self.postfix.swaks(MESSAGE + harness.GTUBE + b"\r\n", sender="eve@example.com",
                                  xclient_addr="192.0.2.71")
        self.assertNotEqual(sent.status, 0)
        (payload,) = subscription.wait_messages(1)
        self.assertIn(harness.GTUBE, payload)
        self.assertIn(b"X-Rcpt-To: <bob@example.org>\r\n", payload)
        line = self.milter.wait_for_log(r"msg done: .*").group(0)
        self.assertIn("published to spam (1 clients)", line)
        self.assertIn("verdict: reject", line)

    def test_redis_down_message_still_delivered(self) -> None:
        """PUBLISH failing never changes the verdict (SPEC §6.10)."""
        self.start('redis { servers_copy = %(redis)s; copy_channel = "copies"; connect_timeout = 1s; }\n')
        self.redis.stop()
        sent = self.postfix.swaks(MESSAGE, sender="alice@example.com", xclient_addr="192.0.2.72")
        self.assertEqual(sent.status, 0, sent.transcript)
        self.postfix.wait_delivered(1)
        (line,) = summary_lines(self.milter)
        self.assertNotIn("published", line)
        self.milter.wait_for_log(r"cannot publish message to channel copies")


class ProbabilityTests(TestCase):
    """copy_probability = 0.5 copies about half of 400 messages (B12: C copied 0.6 %)."""

    MESSAGES = 400

    def setUp(self) -> None:
        self.redis = harness.start_redis(self)
        self.milter = harness.start_rmilter(
            self, 'redis { servers_copy = %s; copy_channel = "copies"; copy_probability = 0.5; }\n'
            % self.redis.address)
        self.subscription = self.redis.subscribe("copies")
        self.addCleanup(self.subscription.close)

    @inlineCallbacks
    def test_binomial_bound(self) -> Any:
        client = yield MilterClient.connect(reactor, TCP4ClientEndpoint(reactor, "127.0.0.1", self.milter.port or 0))
        try:
            for i in range(self.MESSAGES):
                headers = MessageSpec().headers[:3] + (("Message-ID", "<p.%d@example.net>" % i),)
                result = yield client.send_message(MessageSpec(headers=headers, body=b"message %d\r\n" % i))
                self.assertEqual(result.action, "accept")
        finally:
            yield client.close()
        wait_until(lambda: len(summary_lines(self.milter)) >= self.MESSAGES, 30, "every summary line")
        published = [line for line in summary_lines(self.milter) if "published to copies (1 clients)" in line]
        n, p = self.MESSAGES, 0.5
        spread = 5 * math.sqrt(n * p * (1 - p))  # outside with probability < 1e-6
        self.assertTrue(n * p - spread <= len(published) <= n * p + spread, len(published))
        # the subscriber got exactly the logged copies, each one of our messages
        payloads = self.subscription.wait_messages(len(published), timeout=10)
        numbers = [int(re.search(rb"message (\d+)\r\n", payload).group(1)) for payload in payloads]  # type: ignore[union-attr]
        self.assertEqual(len(set(numbers)), len(published))
