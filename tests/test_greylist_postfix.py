"""Greylisting seen from a real Postfix (smtpd_milters = rmilter) and swaks.

A new triplet is deferred with 451 4.7.1 at the stage SPEC §5.6 / §5.9 says, and a
second attempt after ``timeout`` is delivered.
"""
from __future__ import annotations

import time

from twisted.trial.unittest import SynchronousTestCase

from tests.harness import shared_rspamd, start_postfix, start_redis, start_rmilter
from tests.redis_support import c_data_key, c_grey_key

MESSAGE = (
    b"From: <alice@example.net>\r\nTo: <bob@example.org>\r\nSubject: greylisting\r\n"
    b"Message-ID: <grey.1@example.net>\r\n\r\nHello\r\n%s"
)


def command_answered(transcript: str, reply: str) -> str:
    """The SMTP command swaks had sent last when the server gave ``reply``."""
    last = ""
    for line in transcript.splitlines():
        if line.startswith(" -> "):
            last = line[4:].strip()
        elif line.startswith("<** ") and line[4:].strip() == reply:
            return last
    raise AssertionError("no %r in\n%s" % (reply, transcript))


class PostfixGreylistTests(SynchronousTestCase):
    """Deferred on the first attempt, delivered on the retry."""

    def start(self, config: str) -> None:
        self.redis = start_redis(self)
        self.milter = start_rmilter(self, config % {"redis": self.redis.address})
        self.postfix = start_postfix(self, milters=self.milter.milter_inet)

    def test_deferred_at_data_then_delivered(self) -> None:
        """spamd_greylist = no: Postfix answers DATA with 451 4.7.1; the retry after timeout is delivered."""
        self.start("spamd { spamd_greylist = no; }\nredis { servers_grey = %(redis)s; }\n"
                   "greylisting { timeout = 2s; }\n")
        data = MESSAGE % b""
        first = self.postfix.swaks(data, sender="alice@example.net", xclient_addr="192.0.2.44")
        self.assertNotEqual(first.status, 0)
        self.assertIn("451 4.7.1 Try again later", first.server_replies)
        self.assertEqual(command_answered(first.transcript, "451 4.7.1 Try again later"), "DATA")
        self.assertEqual(
            self.redis.keys(), [c_grey_key("grey", "alice@example.net", "192.0.2.44", ["<bob@example.org>"])]
        )
        time.sleep(2.2)
        second = self.postfix.swaks(data, sender="alice@example.net", xclient_addr="192.0.2.44")
        self.assertEqual(second.status, 0, second.transcript)
        delivered = self.postfix.wait_delivered(1)
        self.assertEqual(len(delivered), 1)
        self.assertIsNone(delivered[0].header("X-Rmilter-Greylist"))  # no header at DATA

    def test_deferred_after_rspamd_then_delivered_with_header(self) -> None:
        """spamd_greylist = yes and Rspamd's greylist action: 451 4.7.1 after the message; retry delivered with the header."""
        rspamd = shared_rspamd()
        self.start("spamd { servers = r:%s; spamd_greylist = yes; }\nredis { servers_grey = %%(redis)s; }\n"
                   "greylisting { timeout = 2s; }\n" % rspamd.address)
        data = MESSAGE % b"RSPAMD-TEST-ACTION: greylist\r\n"
        first = self.postfix.swaks(data, sender="alice@example.net", xclient_addr="192.0.2.45")
        self.assertNotEqual(first.status, 0)
        self.assertIn("451 4.7.1 Try again later", first.server_replies)
        # the end of data was answered: the whole message had been seen
        self.assertEqual(command_answered(first.transcript, "451 4.7.1 Try again later"), ".")
        # data hash and envelope hash records
        keys = self.redis.keys()
        self.assertIn(c_grey_key("grey", "alice@example.net", "192.0.2.45", ["<bob@example.org>"]), keys)
        # swaks ends the data with CRLF "." CRLF after our final CRLF: one more empty line in the body
        self.assertIn(c_data_key("grey", b"Hello\r\nRSPAMD-TEST-ACTION: greylist\r\n\r\n"), keys)
        self.assertEqual(len(keys), 2)
        time.sleep(2.2)
        second = self.postfix.swaks(data, sender="alice@example.net", xclient_addr="192.0.2.45")
        self.assertEqual(second.status, 0, second.transcript)
        delivered = self.postfix.wait_delivered(1)
        header = delivered[0].header("X-Rmilter-Greylist")
        self.assertIsNotNone(header)
        self.assertIn("Greylisted for", header)
