"""Rate limits (SPEC §6.3) against the in-memory Redis: keys, values, bucket maths, whitelists, fail open."""
from __future__ import annotations

import ipaddress
import struct
from typing import Any, Dict, List, Sequence

from hypothesis import given, strategies as st
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from rmilter.checks import ratelimit
from rmilter.checks.ratelimit import BUCKETS, BucketState, bucket_keys, is_bounce, leak
from rmilter.config.schema import Bucket, GlobalConfig, LimitsConfig
from rmilter.netlist import NetList, RecipientList
from rmilter.testing.fake_redis import FakeRedisRole, FakeRedisRoles, FakeRedisServer
from rmilter.verdict import Action
from tests.redis_support import NOW, make_config, make_message, make_runtime

ALL = LimitsConfig(
    limit_to=Bucket(100, 1.0),
    limit_to_ip=Bucket(30, 0.025),
    limit_to_ip_from=Bucket(20, 0.016666667),
    limit_bounce_to=Bucket(5, 0.000277778),
    limit_bounce_to_ip=Bucket(5, 0.000277778),
    limit_bounce_addrs=("postmaster", "mailer-daemon", "<>"),
)


def value(last: float, count: float) -> bytes:
    return struct.pack("<dd", last, count)


class KeyTests(SynchronousTestCase):
    """Bucket keys and their order (SPEC §6.3, §9)."""

    def setUp(self) -> None:
        self.runtime = make_runtime(make_config(limits=ALL))

    def keys(self, sender: str, rcpt: str, ip: Any = "192.0.2.10") -> List[bytes]:
        msg = make_message(self.runtime, sender=sender, ip=ip, recipients=())
        return [k.key for k in bucket_keys(self.runtime.config, msg, rcpt)]

    def test_spec_vector(self) -> None:
        """Lowercased keys, to_ip_from, to_ip, to in that order."""
        self.assertEqual(
            self.keys("sender@example.net", "<Rcpt@Example.org>"),
            [b"<rcpt@example.org>:192.0.2.10:sender@example.net", b"<rcpt@example.org>:192.0.2.10", b"<rcpt@example.org>"],
        )

    def test_null_sender(self) -> None:
        """A null sender gives a trailing colon, and is a bounce when ``<>`` is listed."""
        self.assertEqual(
            self.keys("", "<b@example.org>"),
            [b"<b@example.org>:<>", b"<b@example.org>:192.0.2.10:<>",
             b"<b@example.org>:192.0.2.10:", b"<b@example.org>:192.0.2.10", b"<b@example.org>"],
        )

    def test_domainless_bounce_sender(self) -> None:
        """``postmaster`` in limit_bounce_addrs adds the two bounce buckets first (SPEC §9)."""
        self.assertEqual(
            self.keys("postmaster", "<b@example.org>")[:2],
            [b"<b@example.org>:<>", b"<b@example.org>:192.0.2.10:<>"],
        )

    def test_bounce_detection(self) -> None:
        """B10: the local part is compared whole and case-insensitively; the null sender is seen."""
        addrs = ("postmaster", "Mailer-Daemon", "<>")
        self.assertTrue(is_bounce("postmaster@example.org", addrs))
        self.assertTrue(is_bounce("mailer-daemon@example.org", addrs))
        self.assertTrue(is_bounce("", addrs))
        self.assertTrue(is_bounce("postmaster", addrs))
        self.assertFalse(is_bounce("postmaste@example.org", addrs))
        self.assertFalse(is_bounce("postmasterx@example.org", addrs))
        self.assertFalse(is_bounce("", ("postmaster",)))

    def test_disabled_buckets_skipped(self) -> None:
        """A bucket with burst 0 or rate 0 has no key."""
        self.runtime.config = make_config(limits=LimitsConfig(limit_to=Bucket(3, 0.0), limit_to_ip=Bucket(0, 1.0),
                                                              limit_to_ip_from=Bucket(3, 0.5)))
        self.assertEqual(self.keys("s@x", "<r@x>"), [b"<r@x>:192.0.2.10:s@x"])

    def test_unknown_client_address(self) -> None:
        """Without a client address the IP part of the keys is empty."""
        self.assertEqual(self.keys("s@x", "<r@x>", ip=None), [b"<r@x>::s@x", b"<r@x>:", b"<r@x>"])


class BucketMathsTests(SynchronousTestCase):
    """One bucket step, as C computes it."""

    def test_leak_and_increment(self) -> None:
        """count -= elapsed * rate (only when positive), += increment, floored at 0; last = now."""
        self.assertEqual(leak(BucketState(), 10.0, 1.0, 1), BucketState(10.0, 1.0))
        self.assertEqual(leak(BucketState(10.0, 3.0), 12.0, 0.5, 0), BucketState(12.0, 2.0))
        self.assertEqual(leak(BucketState(10.0, 1.0), 20.0, 1.0, 1), BucketState(20.0, 0.0))
        self.assertEqual(leak(BucketState(10.0, 0.0), 20.0, 1.0, 1), BucketState(20.0, 1.0))

    def test_decode(self) -> None:
        """Two little-endian doubles; anything else is an empty bucket."""
        self.assertEqual(BucketState.decode(value(5.5, 2.25)), BucketState(5.5, 2.25))
        self.assertEqual(BucketState.decode(None), BucketState())
        self.assertEqual(BucketState.decode(b"x" * 8), BucketState())

    @given(
        st.lists(
            st.tuples(st.floats(0, 1000, allow_nan=False), st.sampled_from([0, 1])), min_size=1, max_size=30
        ),
        st.floats(0.0001, 10, allow_nan=False),
    )
    def test_reference_script_never_negative(self, steps: Sequence[Any], rate: float) -> None:
        """The script's Python rendering keeps counts >= 0 and deletes a bucket that an update empties."""
        server = FakeRedisServer(Clock())
        now = 1000.0
        for delay, increment in steps:
            now += delay
            BUCKETS.reference(server, [b"k"], [repr(now).encode(), str(increment).encode(), b"86400", b"5", repr(rate).encode()])  # type: ignore[misc]
            stored = server.get(b"k")
            if stored is None:
                self.assertEqual(increment, 1)
            else:
                state = BucketState.decode(stored)
                self.assertGreaterEqual(state.count, 0)
                self.assertEqual(state.last, now)


class RateLimitTests(SynchronousTestCase):
    """check at RCPT and update at EOM with a Clock."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(NOW)
        self.roles = FakeRedisRoles(self.clock)
        self.server = self.roles.server
        self.runtime = make_runtime(make_config(limits=LimitsConfig(limit_to=Bucket(3, 0.01))), self.clock, self.roles)

    def deliver(self, rcpt: str = "<rcpt@example.org>", **kwargs: Any) -> Any:
        """RCPT check, then (if accepted) the EOM update; the RCPT verdict."""
        msg = make_message(self.runtime, recipients=(), **kwargs)
        verdict = self.successResultOf(ratelimit.check(msg, rcpt))
        if verdict is None:
            msg.recipients = make_message(self.runtime, recipients=(rcpt,)).recipients
            self.assertIsNone(self.successResultOf(ratelimit.update(msg)))
        return verdict

    def stored(self, key: bytes = b"<rcpt@example.org>") -> BucketState:
        return BucketState.decode(self.server.get(key))

    def test_burst_plus_one_pass(self) -> None:
        """burst 3, five messages milliseconds apart: 1-4 accepted, 5 refused with 451 4.7.1 (SPEC §9)."""
        verdicts = []
        for _ in range(5):
            verdicts.append(self.deliver())
            self.clock.advance(0.002)
        self.assertEqual(verdicts[:4], [None] * 4)
        self.assertEqual(verdicts[4].action, Action.TEMPFAIL)
        self.assertEqual((verdicts[4].reply.code, verdicts[4].reply.ecode, verdicts[4].reply.text),
                         ("451", "4.7.1", "Rate limit exceeded"))
        self.assertAlmostEqual(self.stored().count, 4, places=3)

    def test_value_and_ttl(self) -> None:
        """The stored value is (now, count) as two little-endian doubles, TTL one day."""
        self.deliver()
        key = b"<rcpt@example.org>"
        self.assertEqual(self.server.get(key), value(NOW, 1.0))
        self.assertEqual(self.server.ttl(key), 86400)

    def test_check_uses_current_time(self) -> None:
        """B7: the bucket time is the time of the RCPT, not of the connection."""
        msg = make_message(self.runtime, recipients=())
        self.clock.advance(42.5)
        self.successResultOf(ratelimit.check(msg, "<rcpt@example.org>"))
        self.assertEqual(self.stored(), BucketState(NOW + 42.5, 0.0))

    def test_accepted_again_after_leak(self) -> None:
        """Once refused, the recipient is accepted again after the bucket has leaked."""
        for _ in range(4):
            self.deliver()
        self.assertIsNotNone(self.deliver())
        self.clock.advance(101)  # 0.01/s: a little more than one message leaks
        self.assertIsNone(self.deliver())

    def test_update_deletes_empty_bucket(self) -> None:
        """An update that leaves the count at 0 deletes the key."""
        self.runtime.config = make_config(limits=LimitsConfig(limit_to=Bucket(3, 1.0)))
        self.server.setex(b"<rcpt@example.org>", 86400, value(NOW - 2, 0.5))
        msg = make_message(self.runtime)
        self.successResultOf(ratelimit.update(msg))
        self.assertNotIn(b"<rcpt@example.org>", self.server.keys())

    def test_stop_at_first_exceeded_bucket(self) -> None:
        """A full to_ip_from bucket refuses; to_ip and to are not touched."""
        self.runtime.config = make_config(
            limits=LimitsConfig(limit_to=Bucket(3, 0.01), limit_to_ip=Bucket(3, 0.01), limit_to_ip_from=Bucket(3, 0.01))
        )
        first = b"<rcpt@example.org>:192.0.2.10:sender@example.net"
        self.server.setex(first, 86400, value(NOW, 10.0))
        self.assertIsNotNone(self.deliver())
        self.assertEqual(self.server.keys(), [first])

    def test_one_script_call_per_recipient_and_per_message(self) -> None:
        """RCPT: one EVALSHA per recipient; EOM: one EVALSHA for all recipients and buckets."""
        self.runtime.config = make_config(limits=ALL)
        msg = make_message(self.runtime, recipients=())
        for rcpt in ("<a@x>", "<b@x>", "<c@x>"):
            self.assertIsNone(self.successResultOf(ratelimit.check(msg, rcpt)))
        self.assertEqual(self.server.command_names(), ["EVALSHA"] * 3)
        self.server.clear_log()
        msg.recipients = make_message(self.runtime, recipients=("<a@x>", "<b@x>", "<c@x>")).recipients
        self.successResultOf(ratelimit.update(msg))
        self.assertEqual(self.server.command_names(), ["EVALSHA"])
        self.assertEqual(self.server.commands[0].args[1], b"9")  # 3 recipients x 3 buckets
        self.assertEqual(len(self.server.keys()), 9)

    def test_whitelists(self) -> None:
        """limit_whitelist (IPv4 and IPv6, B8), limit_whitelist_rcpt and whitelist exempt; no command sent."""
        limits = LimitsConfig(
            limit_to=Bucket(1, 0.001),
            limit_whitelist=NetList([ipaddress.ip_network("192.0.2.0/24"), ipaddress.ip_network("2001:db8::/32")]),
            limit_whitelist_rcpt=RecipientList(["@free.example"]),
        )
        self.runtime.config = make_config(limits=limits, main=GlobalConfig(whitelist=RecipientList(["boss@example.org"])))
        for _ in range(5):
            self.assertIsNone(self.deliver(ip="192.0.2.10"))
            self.assertIsNone(self.deliver(ip="2001:db8::25"))
            self.assertIsNone(self.deliver(rcpt="<Anyone@Free.Example>", ip="198.51.100.1"))
            self.assertIsNone(self.deliver(rcpt="<BOSS@example.org>", ip="198.51.100.1"))
        self.assertEqual(self.server.commands, [])
        self.deliver(ip="198.51.100.1")
        self.deliver(ip="198.51.100.1")
        self.assertIsNotNone(self.deliver(ip="198.51.100.1"))

    def test_limits_inactive(self) -> None:
        """limits.enable = no: nothing is checked or stored."""
        self.runtime.config = make_config(limits=LimitsConfig(enable=False, limit_to=Bucket(1, 0.001)))
        for _ in range(3):
            self.assertIsNone(self.deliver())
        self.assertEqual(self.server.commands, [])


class RateLimitFailOpenTests(SynchronousTestCase):
    """Redis unreachable or silent: recipients pass (SPEC §6.10)."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(NOW)
        self.roles = FakeRedisRoles(self.clock, timeout=1.0)
        self.runtime = make_runtime(make_config(limits=LimitsConfig(limit_to=Bucket(1, 0.001))), self.clock, self.roles)

    def test_unreachable(self) -> None:
        """check and update succeed without Redis."""
        self.roles.set_reachable(False)
        msg = make_message(self.runtime)
        self.assertIsNone(self.successResultOf(ratelimit.check(msg, "<rcpt@example.org>")))
        self.assertIsNone(self.successResultOf(ratelimit.update(msg)))
        self.assertEqual(self.roles.server.command_names(), ["EVALSHA", "EVALSHA"])

    def test_silent_server(self) -> None:
        """A silent server: the RCPT answer comes after connect_timeout, accepting."""
        self.roles.server.hang = True
        msg = make_message(self.runtime)
        d = ratelimit.check(msg, "<rcpt@example.org>")
        self.clock.advance(0.99)
        self.assertNoResult(d)
        self.clock.advance(0.01)
        self.assertIsNone(self.successResultOf(d))
        u = ratelimit.update(msg)
        self.assertNoResult(u)
        self.clock.advance(1.0)
        self.assertIsNone(self.successResultOf(u))


class ShardedRole:
    """A limits role over two fake servers; keys placed by a fixed table (the real hashing has its own tests)."""

    def __init__(self, clock: Clock, placement: Dict[bytes, int]) -> None:
        self.servers = [FakeRedisServer(clock, "a"), FakeRedisServer(clock, "b")]
        self.roles = [FakeRedisRole("limits", s) for s in self.servers]
        self.placement = placement

    sharded = True

    def shard_of(self, key: bytes) -> FakeRedisServer:
        return self.servers[self.placement.get(key, 0)]

    def eval_script(self, script: Any, keys: Sequence[bytes], args: Sequence[Any]) -> Deferred:
        shards = {self.placement.get(k, 0) for k in keys}
        assert len(shards) == 1, "keys of one script call on several servers"
        return self.roles[shards.pop()].eval_script(script, keys, args)


class ShardingTests(SynchronousTestCase):
    """Buckets of one recipient on several servers: calls per server, order and early stop kept."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(NOW)
        limits = LimitsConfig(limit_to=Bucket(3, 0.01), limit_to_ip=Bucket(3, 0.01), limit_to_ip_from=Bucket(3, 0.01))
        self.from_key = b"<r@x>:192.0.2.10:sender@example.net"
        self.ip_key = b"<r@x>:192.0.2.10"
        self.to_key = b"<r@x>"
        self.role = ShardedRole(self.clock, {self.from_key: 0, self.ip_key: 1, self.to_key: 0})
        roles = FakeRedisRoles(self.clock, roles=())
        roles.limits = self.role
        self.runtime = make_runtime(make_config(limits=limits), self.clock, roles)

    def test_check_runs_in_order(self) -> None:
        """A-B-A placement: three calls in bucket order; an exceeded to_ip stops before to."""
        self.role.servers[1].setex(self.ip_key, 86400, value(NOW, 9.0))
        msg = make_message(self.runtime, recipients=())
        self.assertIsNotNone(self.successResultOf(ratelimit.check(msg, "<r@x>")))
        self.assertEqual(self.role.servers[0].keys(), [self.from_key])
        self.assertEqual(self.role.servers[1].command_names(), ["EVALSHA"])

    def test_update_one_call_per_server(self) -> None:
        """EOM: one call per server with all of its keys."""
        msg = make_message(self.runtime, recipients=("<r@x>",))
        self.successResultOf(ratelimit.update(msg))
        self.assertEqual(self.role.servers[0].command_names(), ["EVALSHA"])
        self.assertEqual(self.role.servers[1].command_names(), ["EVALSHA"])
        self.assertEqual(self.role.servers[0].keys(), sorted([self.from_key, self.to_key]))
        self.assertEqual(BucketState.decode(self.role.servers[1].get(self.ip_key)), BucketState(NOW, 1.0))
