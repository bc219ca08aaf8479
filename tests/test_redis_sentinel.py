"""Redis roles on a real Sentinel group (SPEC §11: ``servers_* = "sentinel:MASTER@host:port,..."``).

One master, one replica and three Sentinels (tests.harness.SentinelGroup): writes go to the
master the Sentinels name; after the master is killed the role follows the promoted replica,
records written before the failover are still read, new ones land on the new master; while no
master answers, commands fail open within connect_timeout.
"""
from __future__ import annotations

import time
from typing import Any, Generator, List, Optional

from twisted.internet import defer, task
from twisted.internet import reactor as _reactor
from twisted.trial.unittest import SynchronousTestCase, TestCase

from rmilter.backends import redis as redis_backend
from rmilter.backends.redis import RedisRole, SentinelChannel, TxRedisChannel
from rmilter.config import ConfigError, parse_text
from rmilter.config.schema import Config, RedisConfig
from tests.harness import start_sentinel_group

reactor: Any = _reactor


def sleep(seconds: float) -> defer.Deferred:
    return task.deferLater(reactor, seconds, lambda: None)


class SentinelConfigTests(SynchronousTestCase):
    def test_sentinel_entry(self) -> None:
        """A quoted ``sentinel:`` entry is one server of the list: the master name and every
        Sentinel, 26379 when no port is given; plain entries beside it stay plain."""
        config = parse_text('redis { servers_grey = "sentinel:mymaster@10.0.0.1:26380,sentinel.example", '
                            'localhost; servers_limits = "sentinel:other@[::1]"; }\n', "s.conf")
        group, plain = config.redis.servers_grey
        self.assertEqual((group.master, group.sentinels), ("mymaster", (("10.0.0.1", 26380),
                                                                         ("sentinel.example", 26379))))
        self.assertTrue(group.is_sentinel)
        self.assertFalse(plain.is_sentinel)
        (v6,) = config.redis.servers_limits
        self.assertEqual(v6.sentinels, (("::1", 26379),))

    def test_bad_sentinel_entries_are_config_errors(self) -> None:
        for text in ('"sentinel:mymaster"', '"sentinel:@127.0.0.1"', '"sentinel:m@127.0.0.1:0"',
                     '"sentinel:m@127.0.0.1,,127.0.0.2"', '"sentinel:m a@127.0.0.1"'):
            with self.assertRaises(ConfigError) as caught:
                parse_text("redis { servers_grey = %s; }\n" % text, "s.conf")
            self.assertIn("s.conf:1:", caught.exception.errors[0])

    def test_roles_use_the_sentinel_channel_for_sentinel_entries(self) -> None:
        config = parse_text('redis { servers_grey = "sentinel:m@127.0.0.1:1", 127.0.0.1:2; }\n', "s.conf")
        roles = redis_backend.from_config(config, reactor)
        assert roles is not None and roles.grey is not None
        kinds = [type(link.channel) for link in roles.grey._links.values()]
        self.assertEqual(sorted(k.__name__ for k in kinds), [SentinelChannel.__name__, TxRedisChannel.__name__])


class SentinelRoleTests(TestCase):
    """A RedisRole whose one server is the Sentinel group's master."""

    timeout = 120

    def setUp(self) -> None:
        self.group = start_sentinel_group(self)
        config: Config = parse_text('redis { servers_grey = "%s"; connect_timeout = 1s; }\n' % self.group.spec,
                                    "s.conf")
        roles = redis_backend.from_config(config, reactor)
        assert roles is not None and roles.grey is not None
        self.role: RedisRole = roles.grey
        self.addCleanup(roles.stop)

    @defer.inlineCallbacks
    def until(self, call: Any, expected: Any, seconds: float) -> Generator[Any, Any, Any]:
        """Repeat ``call()`` until it gives ``expected`` (a failover is real time, not a clock)."""
        deadline = time.monotonic() + seconds
        got: Optional[Any] = None
        while time.monotonic() < deadline:
            got = yield call()
            if got == expected:
                return got
            yield sleep(0.2)
        self.fail("still %r after %.0f s, expected %r" % (got, seconds, expected))

    @defer.inlineCallbacks
    def test_writes_go_to_the_master(self) -> Generator[Any, Any, None]:
        self.assertTrue((yield self.role.setex(b"grey.k1", 100, b"\x00\x01binary")))
        self.assertEqual((yield self.role.get(b"grey.k1")), b"\x00\x01binary")
        self.assertEqual(self.group.master.get(b"grey.k1"), b"\x00\x01binary")

    @defer.inlineCallbacks
    def test_failover_keeps_old_records_and_writes_to_the_new_master(self) -> Generator[Any, Any, None]:
        self.assertTrue((yield self.role.setex(b"grey.before", 1000, b"written before")))
        yield self.until(lambda: defer.succeed(self.group.replica.get(b"grey.before")), b"written before", 10)
        self.group.fail_over()
        # the role follows the promoted replica within a few seconds; meanwhile calls fail open
        started = time.monotonic()
        yield self.until(lambda: self.role.setex(b"grey.after", 1000, b"written after"), True, 20)
        self.assertLess(time.monotonic() - started, 20)
        self.assertEqual(self.group.replica.get(b"grey.after"), b"written after")
        self.assertEqual((yield self.role.get(b"grey.before")), b"written before")

    @defer.inlineCallbacks
    def test_no_master_fails_open_within_connect_timeout(self) -> Generator[Any, Any, None]:
        """Master and replica gone: each command gives up at its deadline, it does not hang."""
        self.assertTrue((yield self.role.setex(b"grey.k", 10, b"v")))
        self.group.replica.stop()
        self.group.master.stop()
        for _ in range(3):
            started = time.monotonic()
            self.assertIsNone((yield self.role.get(b"grey.k")))
            self.assertLess(time.monotonic() - started, 2.5)


class FailoverUnderLoadTests(TestCase):
    """rmilter with ``workers = 2``, greylisting and rate limits on the Sentinel group; the master
    is killed while a steady stream of messages runs (the project's own milter client as the
    load generator, four connections at a time): every message gets a final reply; afterwards
    a triplet whitelisted before the failover still passes, and new records are written to
    the promoted replica."""

    timeout = 180

    @defer.inlineCallbacks
    def test_master_killed_during_a_load_run(self) -> Generator[Any, Any, None]:
        from twisted.internet import threads
        from twisted.internet.endpoints import TCP4ClientEndpoint

        from rmilter.testing.mta import MessageSpec, MilterClient
        from tests import harness

        group = start_sentinel_group(self)
        milter = harness.start_rmilter(self, (
            'workers = 2;\nspamd { spamd_greylist = no; }\nredis {\n  servers_grey = "%s";\n  servers_limits = "%s";\n  connect_timeout = 1s;\n}\n'
            'greylisting { timeout = 1s; }\nlimits { limit_to = 100000000:1; limit_to_ip = 100000000:1; }\n')
            % (group.spec, group.spec), unix=False)
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", milter.inet_port)

        def spec(sender: str, queue_id: str) -> MessageSpec:
            return MessageSpec(sender=sender, queue_id=queue_id, headers=(("From", "<%s>" % sender),
                                                                          ("Subject", "failover")))

        def send(sender: str, queue_id: str) -> defer.Deferred:
            return MilterClient.send_one(reactor, endpoint, spec(sender, queue_id))

        # a triplet greylisted, then whitelisted, before the failover (records on the old master)
        known = yield self.greylisted(send, "known")
        yield sleep(1.2)
        self.assertEqual((yield send(known, "4KNOWN2")).action, "accept")
        white = [k for k in group.master.keys("white*")]
        self.assertTrue(white, "the white record is on the master")
        yield self.until_replicated(group, white[0])

        answers: List[str] = []
        errors: List[str] = []
        running = [True]

        @defer.inlineCallbacks
        def stream(lane: int) -> Generator[Any, Any, None]:
            n = 0
            while running[0]:
                n += 1
                try:
                    result = yield send("load%d.%d@example.net" % (lane, n), "4L%d%05d" % (lane, n))
                    answers.append(result.action)
                except Exception as e:  # a broken reply: what the test must never see
                    errors.append(repr(e))

        lanes = [stream(i) for i in range(4)]
        yield sleep(1.0)
        before = len(answers)
        killed_at = time.monotonic()
        yield threads.deferToThread(group.fail_over)
        promoted = time.monotonic() - killed_at
        yield sleep(4.0)  # the roles follow the new master, under load
        running[0] = False
        yield defer.gatherResults(lanes)
        self.assertEqual(errors, [], "every message got a final reply")
        self.assertGreater(before, 0)
        self.assertGreater(len(answers) - before, 20, "messages kept being answered through the failover")
        self.assertLessEqual(set(answers), {"tempfail", "accept"})  # greylisted, or failed open
        self.assertLess(promoted, 30)

        # greylisting works on the new master: a new triplet is greylisted there ...
        new_master = group.replica
        grey_before = set(new_master.keys("grey*"))
        yield self.greylisted(send, "after")
        self.assertTrue(set(new_master.keys("grey*")) - grey_before, "new grey records land on the promoted replica")
        # ... and the triplet whitelisted on the old master still passes
        self.assertEqual((yield send(known, "4KNOWN3")).action, "accept")
        self.assertIsNotNone(new_master.get(white[0]))

    @defer.inlineCallbacks
    def greylisted(self, send: Any, name: str) -> Generator[Any, Any, Any]:
        """A new triplet greylisted (tempfail), once greylisting answers rather than failing
        open: each try is a fresh sender, so an accept is fail-open, never a passed triplet."""
        deadline = time.monotonic() + 20
        n = 0
        while time.monotonic() < deadline:
            n += 1
            sender = "%s%d@example.net" % (name, n)
            if (yield send(sender, "4U%05d" % n)).action == "tempfail":
                return sender
            yield sleep(0.3)
        self.fail("greylisting never answered for %s" % (name,))

    @defer.inlineCallbacks
    def until_replicated(self, group: Any, key: bytes) -> Generator[Any, Any, None]:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if group.replica.get(key) is not None:
                return
            yield sleep(0.1)
        self.fail("the replica never got %r" % (key,))
