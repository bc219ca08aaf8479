"""Replies check end to end (SPEC §6.4): a message an authenticated user sent through rmilter
stores its Message-ID in Redis; a reply to it passes although Rspamd would reject or greylist it."""
from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from rmilter.checks.replies import message_id_key
from tests import harness
from tests.harness.base import wait_until

ORIGINAL_ID = "<orig.7@example.com>"

OUTBOUND = (
    b"From: Alice <alice@example.com>\r\nTo: Bob <bob@example.org>\r\nSubject: question\r\n"
    b"Message-ID: " + ORIGINAL_ID.encode() + b"\r\n\r\nBob, can you check this?\r\n"
)


def inbound(body_line: bytes, msgid: str, reply_headers: bytes = b"") -> bytes:
    return (
        b"From: Bob <bob@example.org>\r\nTo: Alice <alice@example.net>\r\nSubject: Re: question\r\n"
        b"Message-ID: <" + msgid.encode() + b">\r\n" + reply_headers + b"\r\nSure.\r\n" + body_line + b"\r\n"
    )


class PostfixRepliesTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.redis = harness.start_redis(self)
        rspamd = harness.shared_rspamd()
        config = (
            "spamd { servers = r:%(rspamd)s; spamd_greylist = yes; }\n"
            'redis { servers_grey = %(redis)s; servers_id = %(redis)s; id_prefix = "message_id."; }\n'
            "greylisting { timeout = 300s; }\n" % {"rspamd": rspamd.address, "redis": self.redis.address}
        )
        self.milter = harness.start_rmilter(self, config)
        self.postfix = harness.start_postfix(self, milters=self.milter.milter_inet)

    def send_original(self) -> bytes:
        """alice (SASL) sends a message; rmilter stores its Message-ID with a one-day TTL."""
        sent = self.postfix.swaks(OUTBOUND, sender="alice@example.com", auth_user="alice")
        self.assertEqual(sent.status, 0, sent.transcript)
        key = message_id_key("message_id.", ORIGINAL_ID)
        wait_until(lambda: self.redis.get(key) is not None, 10, "the Message-ID stored in Redis")
        self.assertTrue(86000 < self.redis.ttl(key) <= 86400, self.redis.ttl(key))
        return key

    def test_reply_passes_rspamd_reject(self) -> None:
        """GTUBE from an outside client is rejected, unless the message replies to alice's."""
        self.send_original()
        stranger = self.postfix.swaks(inbound(harness.GTUBE, "spam.1@example.org"), sender="bob@example.org",
                                      recipients=("alice@example.net",), xclient_addr="192.0.2.61")
        self.assertNotEqual(stranger.status, 0)
        self.assertTrue(any(r.startswith("554 5.7.1") for r in stranger.server_replies), stranger.transcript)

        reply = self.postfix.swaks(
            inbound(harness.GTUBE, "reply.1@example.org", b"In-Reply-To: " + ORIGINAL_ID.encode() + b"\r\n"),
            sender="bob@example.org", recipients=("alice@example.net",), xclient_addr="192.0.2.61",
        )
        self.assertEqual(reply.status, 0, reply.transcript)
        delivered = self.postfix.wait_delivered(2)
        self.assertIn("<reply.1@example.org>", [m.header("Message-ID") for m in delivered])
        self.milter.wait_for_log(r"is reply to our message <orig\.7@example\.com>; skip dcc and spamd checks")
        self.milter.wait_for_log(r"msg done: .*from: <bob@example\.org>.*spam scan: skipped, reply to our message;")

    def test_reply_by_last_references_token_skips_eom_greylisting(self) -> None:
        """Rspamd's greylist action defers a new sender at EOM; a reply (its References' last token
        is alice's Message-ID, B14) from another new sender is delivered at once."""
        self.send_original()
        body = b"RSPAMD-TEST-ACTION: greylist"
        first = self.postfix.swaks(inbound(body, "grey.1@example.org"), sender="bob@example.org",
                                   recipients=("alice@example.net",), xclient_addr="192.0.2.62")
        self.assertNotEqual(first.status, 0)
        self.assertIn("451 4.7.1 Try again later", first.server_replies)

        references = b"References: <root@example.org>\r\n <other@example.org> " + ORIGINAL_ID.encode() + b"\r\n"
        reply = self.postfix.swaks(inbound(body, "grey.2@example.org", references), sender="bob@example.org",
                                   recipients=("alice@example.net",), xclient_addr="192.0.2.63")
        self.assertEqual(reply.status, 0, reply.transcript)
        delivered = self.postfix.wait_delivered(2)
        reply_copy = [m for m in delivered if m.header("Message-ID") == "<grey.2@example.org>"]
        self.assertEqual(len(reply_copy), 1)
        self.assertIsNone(reply_copy[0].header("X-Rmilter-Greylist"))

    def test_unauthenticated_message_not_remembered(self) -> None:
        """Only our senders' Message-IDs are stored: an outside sender's id gives replies no pass."""
        outside = self.postfix.swaks(inbound(b"", "outside.1@example.org"), sender="bob@example.org",
                                     recipients=("alice@example.net",), xclient_addr="192.0.2.64")
        self.assertEqual(outside.status, 0, outside.transcript)
        self.postfix.wait_delivered(1)
        self.milter.wait_for_log(r"msg done: .*from: <bob@example\.org>")
        key = self.send_original()  # stored after the outside message: only this key exists
        self.assertEqual([k for k in self.redis.keys() if k.startswith(b"message_id.")], [key])
