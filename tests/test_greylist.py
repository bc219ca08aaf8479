"""Greylisting (SPEC §6.2) against the in-memory Redis: keys, values, TTLs, notes, fail open."""
from __future__ import annotations

import dataclasses
import ipaddress
import struct
from typing import Any

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from rmilter.backends.redis import RedisRoles
from rmilter.checks import greylist
from rmilter.checks.greylist import (
    GREY_STEP,
    address_block,
    decode_time,
    digest,
    encode_time,
    envelope_data,
    local_time,
    record_key,
)
from rmilter.config.schema import GreylistingConfig, RedisConfig
from rmilter.netlist import NetList, normalise_sender
from rmilter.testing.fake_redis import FakeRedisRoles
from rmilter.verdict import Action, AddHeader, Check, CheckResult, SmtpReply
from tests.redis_support import NOW, REDIS, make_config, make_deps, make_message, scripted_role

BODY = b"Hello\r\nThis is a test\r\n"
#: SPEC §9 greylisting vectors
DATA_KEY = b"greyvf1bZigyqQzdJrzvZbnJSnYjCfGHdjpR+cNgUlf551fdtYQiDQPB/nFerwQM9DJzyYusXbkgI0ysNpLiUsGwwA=="
ENVELOPE_KEY = b"greyAnkuIjW7LtcZ2pRUrf4jDDB1We7dd5L/GVvESkOwTKfoNNGeBr/z7jkjO7UwYsWGui55oe+jc/FbVfeOlgGzdg=="


def envelope_key(prefix: str, sender: str, ip: str, rcpts: list) -> bytes:
    return record_key(prefix, digest(envelope_data(sender, ip, rcpts)))


class VectorTests(SynchronousTestCase):
    """The digests, keys and address blocks of SPEC §9."""

    def test_data_hash_keys(self) -> None:
        """Data hash keys of the two SPEC bodies."""
        self.assertEqual(record_key("grey", digest(BODY)), DATA_KEY)
        self.assertEqual(
            record_key("grey", digest(b"Line one\r\n")),
            b"grey1QE7fN85eJ9DDHlA3R+eMS03aD++Ab88EUvr2awCzzJJByr8e8kscPuWfp1Of77WtUkmoIPnNqdQBTIxAle5xw==",
        )

    def test_envelope_keys(self) -> None:
        """Envelope keys: plain, recipient twice, null sender over IPv6 (sorted bytewise), mixed-case MAIL."""
        self.assertEqual(envelope_key("grey", "sender@example.net", "192.0.2.10", ["<rcpt@example.org>"]), ENVELOPE_KEY)
        twice = envelope_key("grey", "sender@example.net", "192.0.2.10", ["<a@example.org>", "<a@example.org>"])
        self.assertTrue(twice.startswith(b"greyN3XiTMo2YZSqDainV5Ro"), twice)
        self.assertEqual(
            envelope_key("grey", "", "2001:db8::25", ["<b@example.org>", "<A@example.org>"]),
            b"greygdpxJj5BvyhzvjPofLHNjrSkm0OgJvv3YqY9NYFnkyVgRv04/sgJ1+c/SegJZsYiJztyFFHZudMUvEwlwzBZ1A==",
        )
        self.assertEqual(
            envelope_key("grey", normalise_sender("<User@Example.NET>"), "203.0.113.200", ["<z@example.org>"]),
            b"greyqdbACcN1QoXJgJUdJR65RCOtqpWIAONfawUvo2sdWtsjplzyMTiuv7im2zuaHL3mDd5jru+OhB5uhW252bjHsA==",
        )

    def test_address_blocks(self) -> None:
        """IPv4 keeps octets 1-2 and the low 3 bits of octet 3 (B17); IPv6 keeps the /64."""
        self.assertEqual(address_block("203.0.113.200").hex(), "cb000100" + "0" * 24)
        self.assertEqual(address_block("192.0.2.10").hex(), "c0000200" + "0" * 24)
        self.assertEqual(address_block("2001:db8::25").hex(), "20010db800000000" + "0" * 16)
        # the same /64 and the same C "/19" give the same block
        self.assertEqual(address_block("2001:db8::1:2:3:4"), address_block("2001:db8::ffff"))
        self.assertEqual(address_block("203.0.9.1"), address_block("203.0.113.200"))
        self.assertNotEqual(address_block("203.0.114.1"), address_block("203.0.113.200"))

    def test_recipient_order_and_case(self) -> None:
        """Recipients are sorted before hashing; their case is kept (SPEC §5.12)."""
        a = envelope_key("grey", "s@x", "192.0.2.1", ["<a@x>", "<b@x>"])
        self.assertEqual(a, envelope_key("grey", "s@x", "192.0.2.1", ["<b@x>", "<a@x>"]))
        self.assertNotEqual(a, envelope_key("grey", "s@x", "192.0.2.1", ["<A@x>", "<b@x>"]))

    def test_time_record(self) -> None:
        """Records are int64 seconds + int64 microseconds, little-endian."""
        value = encode_time(1700000000.25)
        self.assertEqual(value, struct.pack("<qq", 1700000000, 250000))
        self.assertEqual(decode_time(value), 1700000000.25)
        self.assertIsNone(decode_time(b"short"))


class GreylistCheckTests(SynchronousTestCase):
    """The check procedure with a Clock and the in-memory Redis."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(NOW)
        self.roles = FakeRedisRoles(self.clock)
        self.server = self.roles.server
        self.deps = make_deps(make_config(), self.clock, self.roles)

    def check(self, with_data_hash: bool = False, **kwargs: Any) -> CheckResult:
        if with_data_hash:
            kwargs.setdefault("body", BODY)
        msg = make_message(**kwargs)
        result = self.successResultOf(greylist.check(msg, self.deps, data_hash=with_data_hash))
        self.assertIs(result.check, Check.GREYLIST)
        return result

    def assertGreylisted(self, result: CheckResult) -> SmtpReply:
        """The result tempfails the message; its reply."""
        verdict = result.verdict
        assert verdict is not None and verdict.reply is not None, result
        self.assertEqual(verdict.action, Action.TEMPFAIL)
        return verdict.reply

    def configure(self, **sections: Any) -> None:
        """Replace the configuration the next checks see."""
        self.deps = dataclasses.replace(self.deps, config=make_config(**sections))

    def test_first_delivery_at_data(self) -> None:
        """A new triplet at DATA is tempfailed and one grey record (envelope) is stored with TTL expire."""
        result = self.check()
        self.assertIs(result.check, Check.GREYLIST)
        self.assertFalse(result.failed)
        self.assertFalse(result.skipped)
        reply = self.assertGreylisted(result)
        self.assertEqual((reply.code, reply.ecode, reply.text), ("451", "4.7.1", "Try again later"))
        self.assertEqual(result.edits, ())
        self.assertEqual(self.server.keys(), [ENVELOPE_KEY])
        self.assertEqual(self.server.get(ENVELOPE_KEY), encode_time(NOW))
        self.assertEqual(self.server.ttl(ENVELOPE_KEY), 86400)
        self.assertEqual(
            result.summary,
            "0 seconds passed (new record), greylisted till %s, expire at %s, type: sender, IP, recipients"
            % (local_time(NOW + 300), local_time(NOW + 86400)),
        )

    def test_round_trips_of_a_new_triplet(self) -> None:
        """A new triplet costs GET white and one script call (read and create the grey record)."""
        self.check()
        self.assertEqual(self.server.command_names(), ["GET", "EVALSHA"])
        self.assertEqual(self.server.commands[0].args, (b"white" + ENVELOPE_KEY[4:],))
        self.assertEqual(self.server.commands[1].args[0], GREY_STEP.sha1.encode())

    def test_first_delivery_at_eom_writes_two_records(self) -> None:
        """At EOM the data hash and the envelope hash each get a grey record; the note becomes a header."""
        result = self.check(with_data_hash=True)
        self.assertGreylisted(result)
        self.assertEqual(self.server.keys(), sorted([DATA_KEY, ENVELOPE_KEY]))
        self.assertEqual(self.server.ttl(DATA_KEY), 86400)
        self.assertEqual(result.edits, (AddHeader(name="X-Rmilter-Greylist", value=result.summary),))
        self.assertTrue(result.summary.endswith("type: sender, IP, recipients"), result.summary)

    def test_retry_before_timeout(self) -> None:
        """A retry before ``timeout`` is still greylisted; the grey record is not refreshed."""
        self.check()
        self.clock.advance(120)
        result = self.check()
        self.assertGreylisted(result)
        self.assertEqual(
            result.summary,
            "120 seconds passed, greylisted till %s, expire at %s, type: sender, IP, recipients"
            % (local_time(NOW + 300), local_time(NOW + 120 + 86400)),
        )
        self.assertEqual(self.server.get(ENVELOPE_KEY), encode_time(NOW))
        self.assertEqual(self.server.ttl(ENVELOPE_KEY), 86400 - 120)

    def test_retry_after_timeout_writes_white_record(self) -> None:
        """After ``timeout`` the message passes and a white record with TTL expire_white is written once."""
        self.check()
        self.clock.advance(301)
        self.server.clear_log()
        result = self.check()
        self.assertIsNone(result.verdict)
        white_key = b"white" + ENVELOPE_KEY[4:]
        self.assertEqual(self.server.get(white_key), encode_time(NOW + 301))
        self.assertEqual(self.server.ttl(white_key), 3 * 86400)
        self.assertEqual(self.server.command_names(), ["GET", "EVALSHA", "SETEX"])
        self.assertEqual(
            result.summary,
            "Greylisted for 301 seconds, whitelisted till %s, type: sender, IP, recipients"
            % (local_time(NOW + 3 * 86400),),
        )
        # next time the white record alone decides: one GET
        self.server.clear_log()
        result = self.check()
        self.assertIsNone(result.verdict)
        self.assertEqual(self.server.command_names(), ["GET"])
        self.assertEqual(
            result.summary,
            "Whitelisted till %s, type: sender, IP, recipients" % (local_time(NOW + 301 + 3 * 86400),),
        )

    def test_data_hash_decides_when_its_grey_record_existed(self) -> None:
        """A retry with the same body passes on the data hash even if the recipients changed."""
        self.check(with_data_hash=True)
        self.clock.advance(400)
        self.server.clear_log()
        result = self.check(with_data_hash=True, recipients=("<other@example.org>",))
        self.assertIsNone(result.verdict)
        self.assertTrue(result.summary.endswith("type: data hash"), result.summary)
        new_envelope = envelope_key("grey", "sender@example.net", "192.0.2.10", ["<other@example.org>"])
        self.assertNotIn(new_envelope, self.server.keys())
        self.assertIn(b"white" + DATA_KEY[4:], self.server.keys())
        self.assertEqual(result.edits, (AddHeader(name="X-Rmilter-Greylist", value=result.summary),))

    def test_data_white_record_does_not_end_the_check(self) -> None:
        """B21: a white data record is not final; the envelope hash decides."""
        self.server.setex(b"white" + DATA_KEY[4:], 3600, encode_time(NOW - 10))
        result = self.check(with_data_hash=True)
        self.assertGreylisted(result)
        self.assertIn(ENVELOPE_KEY, self.server.keys())
        self.assertNotIn(DATA_KEY, self.server.keys())

    def test_record_in_the_future_is_ignored(self) -> None:
        """A grey record dated in the future lets the message pass and stays as it is."""
        self.server.setex(ENVELOPE_KEY, 86400, encode_time(NOW + 1000))
        result = self.check()
        self.assertIsNone(result.verdict)
        self.assertEqual(self.server.get(ENVELOPE_KEY), encode_time(NOW + 1000))
        self.assertNotIn(b"white" + ENVELOPE_KEY[4:], self.server.keys())

    def test_value_that_is_not_a_record_is_replaced(self) -> None:
        """A grey key holding something else than 16 bytes counts as a miss and is rewritten."""
        self.server.setex(ENVELOPE_KEY, 86400, b"junk")
        result = self.check()
        self.assertGreylisted(result)
        self.assertEqual(self.server.get(ENVELOPE_KEY), encode_time(NOW))

    def test_ipv6_null_sender_key(self) -> None:
        """The check stores the SPEC §9 key for a null sender over IPv6."""
        self.check(sender="", ip="2001:db8::25", recipients=("<b@example.org>", "<A@example.org>"))
        self.assertEqual(
            self.server.keys(),
            [b"greygdpxJj5BvyhzvjPofLHNjrSkm0OgJvv3YqY9NYFnkyVgRv04/sgJ1+c/SegJZsYiJztyFFHZudMUvEwlwzBZ1A=="],
        )

    def test_prefixes_from_config(self) -> None:
        """grey_prefix and white_prefix are prepended verbatim."""
        self.configure(redis=RedisConfig(servers_grey=REDIS, grey_prefix="g:", white_prefix="w:"))
        self.check()
        self.clock.advance(400)
        self.check()
        self.assertEqual(sorted(self.server.keys()), [b"g:" + ENVELOPE_KEY[4:], b"w:" + ENVELOPE_KEY[4:]])

    def test_custom_message_and_times(self) -> None:
        """greylisted_message, timeout and expire come from the greylisting section."""
        self.configure(
            greylisting=GreylistingConfig(timeout=60.0, expire=600.0, expire_white=1200.0, greylisted_message="Later")
        )
        result = self.check()
        self.assertEqual(self.assertGreylisted(result).text, "Later")
        self.assertEqual(self.server.ttl(ENVELOPE_KEY), 600)
        self.clock.advance(61)
        self.assertIsNone(self.check().verdict)
        self.assertEqual(self.server.ttl(b"white" + ENVELOPE_KEY[4:]), 1200)

    def test_whitelisted_ip(self) -> None:
        """Clients in greylisting.whitelist (IPv4 and IPv6) are never greylisted and cost no Redis command."""
        self.configure(
            greylisting=GreylistingConfig(
                whitelist=NetList([ipaddress.ip_network("192.0.2.0/24"), ipaddress.ip_network("2001:db8::/32")])
            )
        )
        for ip in ("192.0.2.10", "2001:db8::25"):
            result = self.check(ip=ip, with_data_hash=True)
            self.assertIsNone(result.verdict)
            self.assertFalse(result.failed)
            self.assertEqual(result.summary, "Sender IP %s is whitelisted by configuration" % (ip,))
            self.assertEqual(result.edits, (AddHeader(name="X-Rmilter-Greylist", value=result.summary),))
        self.assertEqual(self.server.commands, [])
        self.assertGreylisted(self.check(ip="198.51.100.1"))

    def test_inactive_or_unknown_address(self) -> None:
        """Greylisting off, or no client address: skipped (saying why), no header, nothing sent."""
        self.configure(greylisting=GreylistingConfig(enable=False))
        result = self.check(with_data_hash=True)
        self.assertIsNone(result.verdict)
        self.assertEqual((result.skipped, result.summary), (True, "not checked, greylisting inactive"))
        self.assertEqual(result.edits, ())
        self.configure()
        result = self.check(ip=None, with_data_hash=True)
        self.assertIsNone(result.verdict)
        self.assertEqual((result.skipped, result.summary), (True, "not checked, unknown client address"))
        self.assertEqual(result.edits, ())
        self.assertEqual(self.server.commands, [])

    def test_no_grey_role(self) -> None:
        """Greylisting configured but no grey servers (or no Redis at all): skipped, nothing sent."""
        for roles in (FakeRedisRoles(self.clock, roles=("limits",)), None):
            self.deps = dataclasses.replace(self.deps, redis=roles)
            result = self.check()
            self.assertIsNone(result.verdict)
            self.assertEqual((result.skipped, result.summary), (True, "not checked, greylisting inactive"))
        self.assertEqual(self.server.commands, [])

    def test_separate_white_servers(self) -> None:
        """White records go to the white role, grey records to the grey role."""
        roles = FakeRedisRoles(self.clock, separate=True)
        self.deps = dataclasses.replace(self.deps, redis=roles)
        self.check()
        self.clock.advance(400)
        self.check()
        self.assertEqual(roles.servers["grey"].keys(), [ENVELOPE_KEY])
        self.assertEqual(roles.servers["white"].keys(), [b"white" + ENVELOPE_KEY[4:]])


class FailOpenTests(SynchronousTestCase):
    """Redis unreachable or silent: messages pass (SPEC §6.10), within connect_timeout."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(NOW)
        self.roles = FakeRedisRoles(self.clock, timeout=1.0)
        self.deps = make_deps(make_config(), self.clock, self.roles)

    def test_unreachable(self) -> None:
        """Every command fails: not greylisted, a failed result with a note saying so; the commands were tried."""
        self.roles.set_reachable(False)
        msg = make_message(body=BODY)
        result = self.successResultOf(greylist.check(msg, self.deps, data_hash=True))
        self.assertIsNone(result.verdict)
        self.assertTrue(result.failed)
        self.assertIn("fail open", result.summary)
        self.assertEqual(result.edits, (AddHeader(name="X-Rmilter-Greylist", value=result.summary),))
        self.assertIn("EVALSHA", self.roles.server.command_names())

    def test_silent_server(self) -> None:
        """A server that never answers: the check ends, passing, after connect_timeout and not before."""
        self.roles.server.hang = True
        d = greylist.check(make_message(), self.deps)
        self.clock.advance(0.9)
        self.assertNoResult(d)
        self.clock.advance(0.1)
        result = self.successResultOf(d)
        self.assertIsNone(result.verdict)
        self.assertTrue(result.failed)
        self.assertIn("fail open", result.summary)

    def test_whole_check_bounded(self) -> None:
        """Several slow answers add up to no more than connect_timeout: the check gives up at the deadline."""
        config = make_config(redis=RedisConfig(servers_grey=REDIS, connect_timeout=1.0))
        self.deps = dataclasses.replace(self.deps, config=config)
        self.roles.server.hang = True
        assert self.roles.grey is not None
        self.roles.grey.timeout = 0.6  # each command alone within its bound, two of them are not
        d = greylist.check(make_message(), self.deps)
        self.clock.advance(0.6)
        self.assertNoResult(d)
        self.clock.advance(0.4)
        result = self.successResultOf(d)
        self.assertIsNone(result.verdict)
        self.assertTrue(result.failed)
        self.assertIn("timeout", result.summary)

    def test_whole_check_bounded_on_a_redis_role(self) -> None:
        """The same with a real RedisRole: GET white answers (a miss) after 0.625 s, the grey step hangs;
        the check ends at 1 s (the grey step gets what is left), and a hanging GET leaves nothing to send."""
        redis = RedisConfig(servers_grey=REDIS, connect_timeout=1.0)
        role, maker = scripted_role("grey", 1, redis, self.clock)
        channel = maker.channels["r0"]
        channel.hang = True
        deps = make_deps(make_config(redis=redis), self.clock, RedisRoles(grey=role, white=role))
        d = greylist.check(make_message(), deps)
        # steps that are binary fractions: the Clock reaches the deadline exactly
        self.clock.advance(0.625)
        channel.pending[0].callback(None)  # GET white: a miss
        self.assertEqual([args[0] for args in channel.sent], [b"GET", b"EVALSHA"])
        self.clock.advance(0.375 - 2 ** -10)
        self.assertNoResult(d)
        self.clock.advance(2 ** -10)
        result = self.successResultOf(d)
        self.assertEqual((result.verdict, result.failed), (None, True))
        self.assertIn("timeout", result.summary)
        # a server that never answers the first command: the second is not sent (its deadline has passed)
        self.clock.advance(5)  # past retry_interval: the server is waited for again
        del channel.sent[:]
        d = greylist.check(make_message(), deps)
        self.clock.advance(1.0)
        result = self.successResultOf(d)
        self.assertEqual((result.verdict, result.failed), (None, True))
        self.assertEqual([args[0] for args in channel.sent], [b"GET"])
