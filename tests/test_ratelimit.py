"""Rate limits (SPEC §6.3) against the in-memory Redis: keys, values, bucket maths, whitelists, fail open."""
from __future__ import annotations

import dataclasses
import ipaddress
import struct
from typing import Any, Dict, List, Optional, Sequence

from hypothesis import given, strategies as st
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from rmilter.backends.redis import RedisRoles
from rmilter.checks import ratelimit
from rmilter.checks.ratelimit import BUCKETS, COUNTED, EXCEEDED, PASSED, BucketState, bucket_keys, is_bounce, leak
from rmilter.config.schema import Bucket, Config, GlobalConfig, LimitsConfig, RedisConfig
from rmilter.context import MessageContext
from rmilter.netlist import NetList, RecipientList
from rmilter.testing.fake_redis import FakeRedisRole, FakeRedisRoles, FakeRedisServer
from rmilter.verdict import RATE_LIMIT_EXCEEDED, Action, Check, CheckResult, Verdict
from tests.redis_support import NOW, SHARDS, make_config, make_deps, make_message, scripted_role

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
        self.config = make_config(limits=ALL)

    def keys(self, sender: str, rcpt: str, ip: Any = "192.0.2.10") -> List[bytes]:
        msg = make_message(sender=sender, ip=ip, recipients=())
        return [k.key for k in bucket_keys(self.config, msg, rcpt)]

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
        self.config = make_config(limits=LimitsConfig(limit_to=Bucket(3, 0.0), limit_to_ip=Bucket(0, 1.0),
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


def rcpt_check(test: SynchronousTestCase, msg: MessageContext, deps: Any, rcpt: str) -> Optional[Verdict]:
    """The RCPT check, which never fails: its verdict (None: accepted), the result's shape checked."""
    result = test.successResultOf(ratelimit.check(msg, deps, recipient=rcpt))
    test.assertIs(result.check, Check.RATELIMIT)
    if result.verdict is not None:
        test.assertEqual((result.summary, result.failed, result.skipped), (EXCEEDED, False, False))
        test.assertEqual(result.verdict.reply.text, RATE_LIMIT_EXCEEDED)  # type: ignore[union-attr]
    return result.verdict


class RateLimitTests(SynchronousTestCase):
    """check at RCPT and record at EOM with a Clock."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(NOW)
        self.roles = FakeRedisRoles(self.clock)
        self.server = self.roles.server
        self.deps = make_deps(make_config(limits=LimitsConfig(limit_to=Bucket(3, 0.01))), self.clock, self.roles)
        #: the result of the last EOM record
        self.recorded: Optional[CheckResult] = None

    def configure(self, config: Config) -> None:
        self.deps = dataclasses.replace(self.deps, config=config)

    def deliver(self, rcpt: str = "<rcpt@example.org>", **kwargs: Any) -> Optional[Verdict]:
        """RCPT check, then (if accepted) the EOM record, which neither fails nor refuses; the RCPT verdict."""
        msg = make_message(recipients=(), **kwargs)
        verdict = rcpt_check(self, msg, self.deps, rcpt)
        self.recorded = None
        if verdict is None:
            msg.recipients = make_message(recipients=(rcpt,)).recipients
            self.recorded = self.successResultOf(ratelimit.record(msg, self.deps))
            self.assertIs(self.recorded.check, Check.RATELIMIT)
            self.assertIsNone(self.recorded.verdict)
            self.assertFalse(self.recorded.failed)
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
        refused = verdicts[4]
        assert refused is not None and refused.reply is not None
        self.assertEqual(refused.action, Action.TEMPFAIL)
        self.assertEqual((refused.reply.code, refused.reply.ecode, refused.reply.text),
                         ("451", "4.7.1", "Rate limit exceeded"))
        self.assertAlmostEqual(self.stored().count, 4, places=3)

    def test_value_and_ttl(self) -> None:
        """The stored value is (now, count) as two little-endian doubles, TTL one day."""
        self.deliver()
        assert self.recorded is not None
        self.assertEqual(self.recorded.summary, COUNTED)
        key = b"<rcpt@example.org>"
        self.assertEqual(self.server.get(key), value(NOW, 1.0))
        self.assertEqual(self.server.ttl(key), 86400)

    def test_check_uses_current_time(self) -> None:
        """B7: the bucket time is the time of the RCPT, not of the connection."""
        msg = make_message(recipients=())
        self.clock.advance(42.5)
        result = self.successResultOf(ratelimit.check(msg, self.deps, recipient="<rcpt@example.org>"))
        self.assertEqual((result.summary, result.verdict), (PASSED, None))
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
        self.configure(make_config(limits=LimitsConfig(limit_to=Bucket(3, 1.0))))
        self.server.setex(b"<rcpt@example.org>", 86400, value(NOW - 2, 0.5))
        msg = make_message()
        self.assertEqual(self.successResultOf(ratelimit.record(msg, self.deps)).summary, COUNTED)
        self.assertNotIn(b"<rcpt@example.org>", self.server.keys())

    def test_stop_at_first_exceeded_bucket(self) -> None:
        """A full to_ip_from bucket refuses; to_ip and to are not touched."""
        self.configure(make_config(
            limits=LimitsConfig(limit_to=Bucket(3, 0.01), limit_to_ip=Bucket(3, 0.01), limit_to_ip_from=Bucket(3, 0.01))
        ))
        first = b"<rcpt@example.org>:192.0.2.10:sender@example.net"
        self.server.setex(first, 86400, value(NOW, 10.0))
        self.assertIsNotNone(self.deliver())
        self.assertEqual(self.server.keys(), [first])
        # the refusal names the bucket that was full
        result = self.successResultOf(ratelimit.check(make_message(), self.deps, recipient="<rcpt@example.org>"))
        self.assertEqual(result.details, {"ratelimit_bucket": "limit_to_ip_from"})

    def test_one_script_call_per_recipient_and_per_message(self) -> None:
        """RCPT: one EVALSHA per recipient; EOM: one EVALSHA for all recipients and buckets."""
        self.configure(make_config(limits=ALL))
        msg = make_message(recipients=())
        for rcpt in ("<a@x>", "<b@x>", "<c@x>"):
            self.assertIsNone(rcpt_check(self, msg, self.deps, rcpt))
        self.assertEqual(self.server.command_names(), ["EVALSHA"] * 3)
        self.server.clear_log()
        msg.recipients = make_message(recipients=("<a@x>", "<b@x>", "<c@x>")).recipients
        self.assertEqual(self.successResultOf(ratelimit.record(msg, self.deps)).summary, COUNTED)
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
        self.configure(make_config(limits=limits, main=GlobalConfig(whitelist=RecipientList(["boss@example.org"]))))
        for _ in range(5):
            for rcpt, ip in (("<rcpt@example.org>", "192.0.2.10"), ("<rcpt@example.org>", "2001:db8::25"),
                             ("<Anyone@Free.Example>", "198.51.100.1"), ("<BOSS@example.org>", "198.51.100.1")):
                self.assertIsNone(self.deliver(rcpt=rcpt, ip=ip))
                assert self.recorded is not None
                self.assertEqual((self.recorded.skipped, self.recorded.summary), (True, "no bucket to count"))
                result = self.successResultOf(ratelimit.check(make_message(ip=ip), self.deps, recipient=rcpt))
                self.assertEqual((result.skipped, result.summary, result.verdict), (True, "whitelisted", None))
        self.assertEqual(self.server.commands, [])
        self.deliver(ip="198.51.100.1")
        self.deliver(ip="198.51.100.1")
        self.assertIsNotNone(self.deliver(ip="198.51.100.1"))

    def test_limits_inactive(self) -> None:
        """limits.enable = no: nothing is checked or stored."""
        self.configure(make_config(limits=LimitsConfig(enable=False, limit_to=Bucket(1, 0.001))))
        for _ in range(3):
            self.assertIsNone(self.deliver())
            assert self.recorded is not None
            self.assertEqual((self.recorded.skipped, self.recorded.summary), (True, "limits inactive"))
        result = self.successResultOf(ratelimit.check(make_message(), self.deps, recipient="<rcpt@example.org>"))
        self.assertEqual((result.skipped, result.summary), (True, "limits inactive"))
        self.assertEqual(self.server.commands, [])

    def test_no_limits_role_or_no_bucket(self) -> None:
        """No servers_limits: inactive; limits on but every bucket disabled: nothing to check or count."""
        self.deps = dataclasses.replace(self.deps, redis=FakeRedisRoles(self.clock, roles=("grey",)))
        result = self.successResultOf(ratelimit.check(make_message(), self.deps, recipient="<rcpt@example.org>"))
        self.assertEqual((result.skipped, result.summary), (True, "limits inactive"))
        self.assertEqual(self.successResultOf(ratelimit.record(make_message(), self.deps)).summary, "limits inactive")
        self.deps = dataclasses.replace(self.deps, redis=self.roles)
        self.configure(make_config(limits=LimitsConfig(limit_to=Bucket(0, 1.0))))
        result = self.successResultOf(ratelimit.check(make_message(), self.deps, recipient="<rcpt@example.org>"))
        self.assertEqual((result.skipped, result.summary), (True, "no bucket enabled"))
        self.assertEqual(self.successResultOf(ratelimit.record(make_message(), self.deps)).summary,
                         "no bucket to count")
        self.assertEqual(self.server.commands, [])


class RateLimitFailOpenTests(SynchronousTestCase):
    """Redis unreachable or silent: recipients pass (SPEC §6.10)."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(NOW)
        self.roles = FakeRedisRoles(self.clock, timeout=1.0)
        self.deps = make_deps(make_config(limits=LimitsConfig(limit_to=Bucket(1, 0.001))), self.clock, self.roles)

    def assertFailedOpen(self, result: CheckResult) -> None:
        """Redis did not answer: no verdict (the recipient or message passes), and the result says it failed."""
        self.assertIs(result.check, Check.RATELIMIT)
        self.assertIsNone(result.verdict)
        self.assertTrue(result.failed)

    def test_unreachable(self) -> None:
        """check and record end at once without Redis, failed and letting the message pass."""
        self.roles.set_reachable(False)
        msg = make_message()
        self.assertFailedOpen(self.successResultOf(ratelimit.check(msg, self.deps, recipient="<rcpt@example.org>")))
        self.assertFailedOpen(self.successResultOf(ratelimit.record(msg, self.deps)))
        self.assertEqual(self.roles.server.command_names(), ["EVALSHA", "EVALSHA"])

    def test_silent_server(self) -> None:
        """A silent server: the RCPT answer comes after connect_timeout, accepting; so does the EOM record."""
        self.roles.server.hang = True
        msg = make_message()
        d = ratelimit.check(msg, self.deps, recipient="<rcpt@example.org>")
        self.clock.advance(0.99)
        self.assertNoResult(d)
        self.clock.advance(0.01)
        self.assertFailedOpen(self.successResultOf(d))
        u = ratelimit.record(msg, self.deps)
        self.assertNoResult(u)
        self.clock.advance(1.0)
        self.assertFailedOpen(self.successResultOf(u))


class ShardedRole:
    """A limits role over two fake servers; keys placed by a fixed table (the real hashing has its own tests)."""

    def __init__(self, clock: Clock, placement: Dict[bytes, int]) -> None:
        self.servers = [FakeRedisServer(clock, "a"), FakeRedisServer(clock, "b")]
        self.roles = [FakeRedisRole("limits", s) for s in self.servers]
        self.placement = placement
        #: the deadline of every script call
        self.deadlines: List[Optional[float]] = []

    sharded = True

    def shard_of(self, key: bytes) -> FakeRedisServer:
        return self.servers[self.placement.get(key, 0)]

    def eval_script(self, script: Any, keys: Sequence[bytes], args: Sequence[Any],
                    deadline: Optional[float] = None) -> Deferred:
        shards = {self.placement.get(k, 0) for k in keys}
        assert len(shards) == 1, "keys of one script call on several servers"
        self.deadlines.append(deadline)
        return self.roles[shards.pop()].eval_script(script, keys, args, deadline=deadline)


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
        roles.limits = self.role  # type: ignore[assignment]
        self.deps = make_deps(make_config(limits=limits), self.clock, roles)

    def test_check_runs_in_order(self) -> None:
        """A-B-A placement: three calls in bucket order; an exceeded to_ip stops before to."""
        self.role.servers[1].setex(self.ip_key, 86400, value(NOW, 9.0))
        msg = make_message(recipients=())
        self.assertIsNotNone(rcpt_check(self, msg, self.deps, "<r@x>"))
        self.assertEqual(self.role.servers[0].keys(), [self.from_key])
        self.assertEqual(self.role.servers[1].command_names(), ["EVALSHA"])

    def test_unanswered_shard_makes_the_check_failed(self) -> None:
        """The first shard unreachable, the second answering: the recipient passes, the later buckets
        are still checked, and the result is failed (the check was not carried out in full), as the
        EOM record's is."""
        role = ShardedRole(self.clock, {self.from_key: 0, self.ip_key: 1, self.to_key: 1})
        roles = FakeRedisRoles(self.clock, roles=())
        roles.limits = role  # type: ignore[assignment]
        deps = dataclasses.replace(self.deps, redis=roles)
        role.servers[0].reachable = False
        result = self.successResultOf(ratelimit.check(make_message(), deps, recipient="<r@x>"))
        self.assertEqual((result.verdict, result.failed), (None, True))
        self.assertEqual(role.servers[1].keys(), sorted([self.ip_key, self.to_key]))
        self.assertTrue(self.successResultOf(ratelimit.record(make_message(recipients=("<r@x>",)), deps)).failed)

    def test_calls_of_one_check_share_a_deadline(self) -> None:
        """Every script call of one RCPT check, and of one EOM record, has the check's deadline:
        connect_timeout after the check began, however long the earlier calls took."""
        msg = make_message(recipients=("<r@x>",))
        self.assertIsNone(rcpt_check(self, msg, self.deps, "<r@x>"))
        self.assertEqual(self.role.deadlines, [NOW + 1.0] * 3)
        del self.role.deadlines[:]
        self.clock.advance(5)
        self.assertEqual(self.successResultOf(ratelimit.record(msg, self.deps)).summary, COUNTED)
        self.assertEqual(self.role.deadlines, [NOW + 5 + 1.0] * 2)

    def test_update_one_call_per_server(self) -> None:
        """EOM: one call per server with all of its keys."""
        msg = make_message(recipients=("<r@x>",))
        self.assertEqual(self.successResultOf(ratelimit.record(msg, self.deps)).summary, COUNTED)
        self.assertEqual(self.role.servers[0].command_names(), ["EVALSHA"])
        self.assertEqual(self.role.servers[1].command_names(), ["EVALSHA"])
        self.assertEqual(self.role.servers[0].keys(), sorted([self.from_key, self.to_key]))
        self.assertEqual(BucketState.decode(self.role.servers[1].get(self.ip_key)), BucketState(NOW, 1.0))


class SharedDeadlineTests(SynchronousTestCase):
    """A real RedisRole over two hanging servers (SPEC §6.10): each check waits one connect_timeout in all."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(NOW)
        redis = RedisConfig(servers_limits=SHARDS[:2], connect_timeout=1.0)
        limits = LimitsConfig(limit_to=Bucket(3, 0.01), limit_to_ip=Bucket(3, 0.01))
        self.role, maker = scripted_role("limits", 2, redis, self.clock)
        # to_ip (checked first) lives on r0, to on r1 (SPEC §9 placement)
        self.assertEqual([self.role.shard_of(k).name for k in (b"<rcpt@example.org>:192.0.2.10",
                                                                b"<rcpt@example.org>")], ["r0", "r1"])
        self.first, self.second = maker.channels["r0"], maker.channels["r1"]
        self.first.hang = self.second.hang = True
        self.deps = make_deps(make_config(limits=limits, redis=redis), self.clock, RedisRoles(limits=self.role))

    def assertFailedOpen(self, result: CheckResult) -> None:
        self.assertIs(result.check, Check.RATELIMIT)
        self.assertIsNone(result.verdict)
        self.assertTrue(result.failed)

    def test_rcpt_check_over_two_silent_shards(self) -> None:
        """The first shard never answers: the check ends after one connect_timeout, and the second
        shard's call, whose deadline has passed by then, is not sent at all."""
        d = ratelimit.check(make_message(), self.deps, recipient="<rcpt@example.org>")
        self.assertEqual(len(self.first.sent), 1)
        self.clock.advance(0.999)
        self.assertNoResult(d)
        self.clock.advance(0.001)
        self.assertFailedOpen(self.successResultOf(d))
        self.assertEqual(self.second.sent, [])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_rcpt_check_slow_shard_then_silent_shard(self) -> None:
        """The first shard answers after 0.75 s, the second never: the check still ends at 1 s, not 1.75 s."""
        d = ratelimit.check(make_message(), self.deps, recipient="<rcpt@example.org>")
        # steps that are binary fractions: the Clock reaches the deadline exactly
        self.clock.advance(0.75)
        (pending,) = self.first.pending
        pending.callback(0)  # to_ip not exceeded: the next shard is asked
        self.assertEqual(len(self.second.sent), 1)
        self.clock.advance(0.25 - 2 ** -10)
        self.assertNoResult(d)
        self.clock.advance(2 ** -10)
        self.assertFailedOpen(self.successResultOf(d))

    def test_eom_record_over_two_silent_shards(self) -> None:
        """EOM sends one call to each shard; neither answers: the record ends after one connect_timeout."""
        d = ratelimit.record(make_message(), self.deps)
        self.assertEqual((len(self.first.sent), len(self.second.sent)), (1, 1))
        self.clock.advance(0.999)
        self.assertNoResult(d)
        self.clock.advance(0.001)
        result = self.successResultOf(d)
        self.assertFailedOpen(result)
        self.assertEqual(result.summary, "not counted, Redis unavailable")
