"""Greylisting that spares pools of senders, seen from a real Postfix (issue 17).

Real Redis, Postfix with XCLIENT for the client addresses, and (for the SPF mode) the real
Rspamd judging SPF against records the harness DNS responder publishes.  Instead of waiting
out ``timeout``, a test moves the grey records' stored time back (what the clock would have
done), keeping their TTL.
"""
from __future__ import annotations

import time

from twisted.trial.unittest import SynchronousTestCase

from rmilter.checks.greylist import TYPE_SPF_ENVELOPE, encode_time
from tests.harness import start_postfix, start_redis, start_rmilter
from tests.harness.dns import dns_rspamd
from tests.test_greylist_postfix import command_answered

MESSAGE = (
    "From: <%(sender)s>\r\nTo: <bob@example.org>\r\nSubject: greylisting pools\r\n"
    "Message-ID: <%(msgid)s>\r\nMIME-Version: 1.0\r\n"
    'Content-Type: multipart/alternative; boundary="%(boundary)s"\r\n\r\n'
    "--%(boundary)s\r\nContent-Type: text/plain\r\n\r\nHello\r\nRSPAMD-TEST-SCORE: 4.5\r\n"
    "--%(boundary)s--\r\n"
)
TEMPFAIL = "451 4.7.1 Try again later"


class PoolTests(SynchronousTestCase):
    def start(self, greylisting: str, spamd: str = "spamd { spamd_greylist = no; }\n") -> None:
        self.redis = start_redis(self)
        self.milter = start_rmilter(self, "%sredis { servers_grey = %s; }\ngreylisting {\n  timeout = 5m;\n%s};\n"
                                    % (spamd, self.redis.address, greylisting))
        self.postfix = start_postfix(self, milters=self.milter.milter_inet)

    def send(self, sender: str, ip: str, boundary: str = "b1") -> "tuple[bool, str]":
        """(delivered, the command the 451 answered or "") for one attempt from ``ip``."""
        data = (MESSAGE % {"sender": sender, "msgid": "%s.%s@example.net" % (boundary, ip),
                           "boundary": boundary}).encode("ascii")
        result = self.postfix.swaks(data, sender=sender, xclient_addr=ip)
        if result.status == 0:
            return True, ""
        self.assertIn(TEMPFAIL, result.server_replies, result.transcript)
        return False, command_answered(result.transcript, TEMPFAIL)

    def age_grey_records(self) -> None:
        """Every grey record as if written 10 minutes ago (past the 5 minute timeout)."""
        old = encode_time(time.time() - 600)
        grey = self.redis.keys("grey*")
        self.assertTrue(grey)
        for key in grey:
            self.redis.command("SET", key, old, "KEEPTTL")

    def test_ipv4_mask_24(self) -> None:
        """ipv4_mask = 24: the retry from a neighbour in the /24 is delivered; a host of another /24
        is greylisted (at DATA) as a new triplet."""
        self.start("  ipv4_mask = 24;\n")
        self.assertEqual(self.send("news@pool.example.net", "198.51.100.7"), (False, "DATA"))
        self.age_grey_records()
        self.assertEqual(self.send("news@pool.example.net", "198.51.100.200"), (True, ""))
        self.assertEqual(self.send("news@pool.example.net", "198.51.101.7"), (False, "DATA"))
        self.assertEqual(len(self.redis.keys("white*")), 1)
        self.assertEqual(len(self.postfix.wait_delivered(1)), 1)

    def test_spf_pass_keys_on_the_sender_domain(self) -> None:
        """key_on_spf_domain: Rspamd reports SPF pass for pool.example.net; the message, regenerated
        (another MIME boundary, so another data hash), retried from another authorised address far
        from the first, is delivered.  A sender without SPF pass retried the same way is not."""
        rspamd, dns = dns_rspamd()
        dns.publish("pool.example.net", b"v=spf1 ip4:192.0.2.0/24 ip4:198.51.100.0/24 -all")
        self.start("  key_on_spf_domain = yes;\n",
                   spamd="spamd { servers = r:%s; spamd_greylist = yes; }\n" % rspamd.address)
        self.assertEqual(self.send("bounce@pool.example.net", "192.0.2.10", "first"), (False, "."))
        self.assertEqual(self.send("x@nospf.example.org", "192.0.2.10", "first-x"), (False, "."))
        self.assertEqual(len(self.redis.keys("grey*")), 4)  # a data and an envelope record each
        self.age_grey_records()
        self.assertEqual(self.send("bounce@pool.example.net", "198.51.100.20", "again"), (True, ""))
        (delivered,) = self.postfix.wait_delivered(1)
        header = delivered.header("X-Rmilter-Greylist")
        assert header is not None
        self.assertIn("Greylisted for", header)
        self.assertIn("type: " + TYPE_SPF_ENVELOPE, header)
        self.assertEqual(self.send("x@nospf.example.org", "198.51.100.20", "again-x"), (False, "."))
