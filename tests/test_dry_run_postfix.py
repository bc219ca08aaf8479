"""Dry run seen from a real Postfix (issue 16): the message is delivered, the summary line says why not.

``spamd { dry_run = yes; }``: a GTUBE message from outside is delivered and the line says it would
have been rejected.  ``greylisting { dry_run = yes; }``: a first-time triplet is delivered and its
grey record is written to Redis as usual.
"""
from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from tests.harness import GTUBE, shared_rspamd, start_postfix, start_redis, start_rmilter
from tests.redis_support import c_grey_key

MESSAGE = (
    b"From: <alice@example.net>\r\nTo: <bob@example.org>\r\nSubject: dry run\r\n"
    b"Message-ID: <dry.1@example.net>\r\n\r\nHello\r\n%s"
)


class PostfixDryRunTests(SynchronousTestCase):
    def test_gtube_from_outside_is_delivered_in_spamd_dry_run(self) -> None:
        rspamd = shared_rspamd()
        milter = start_rmilter(self, "spamd { servers = r:%s; dry_run = yes; }\n" % rspamd.address)
        postfix = start_postfix(self, milters=milter.milter_inet)
        sent = postfix.swaks(MESSAGE % (GTUBE + b"\r\n"), sender="alice@example.net", xclient_addr="192.0.2.61")
        self.assertEqual(sent.status, 0, sent.transcript)
        [delivered] = postfix.wait_delivered(1)
        self.assertIn(b"GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL", delivered.raw)
        line = milter.wait_for_log(r"msg done: .*").group(0)
        self.assertIn("spam scan: would reject, action: reject", line)
        self.assertIn("verdict: accept", line)

    def test_gtube_without_dry_run_is_rejected(self) -> None:
        rspamd = shared_rspamd()
        milter = start_rmilter(self, "spamd { servers = r:%s; }\n" % rspamd.address)
        postfix = start_postfix(self, milters=milter.milter_inet)
        sent = postfix.swaks(MESSAGE % (GTUBE + b"\r\n"), sender="alice@example.net", xclient_addr="192.0.2.62")
        self.assertNotEqual(sent.status, 0)
        self.assertTrue(any(r.startswith("554 5.7.1") for r in sent.server_replies), sent.server_replies)

    def test_first_triplet_is_delivered_and_recorded_in_greylisting_dry_run(self) -> None:
        redis = start_redis(self)
        milter = start_rmilter(self, "spamd { spamd_greylist = no; }\nredis { servers_grey = %s; }\n"
                                     "greylisting { dry_run = yes; }\n" % redis.address)
        postfix = start_postfix(self, milters=milter.milter_inet)
        sent = postfix.swaks(MESSAGE % b"", sender="alice@example.net", xclient_addr="192.0.2.63")
        self.assertEqual(sent.status, 0, sent.transcript)
        self.assertEqual(len(postfix.wait_delivered(1)), 1)
        self.assertEqual(redis.keys(),
                         [c_grey_key("grey", "alice@example.net", "192.0.2.63", ["<bob@example.org>"])])
        line = milter.wait_for_log(r"msg done: .*").group(0)
        self.assertIn("; greylist: would defer; verdict: accept", line)
