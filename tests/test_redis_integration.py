"""RedisRole and the check scripts against a real redis-server (started by tests.harness).

Bytes in, same bytes out; TTLs; AUTH and SELECT; the Lua scripts give exactly the
bytes of their Python renderings (and so of the C format); concurrent bucket
updates from two independent pools lose nothing; a stopped or silent server
makes calls fail open within connect_timeout, and the role finds the server
again when it comes back.
"""
from __future__ import annotations

import random
import struct
from typing import Any, Generator, List, Optional

from twisted.internet import defer, protocol, task
from twisted.internet import reactor as _reactor
from twisted.trial.unittest import TestCase

from rmilter.backends.redis import POOL_SIZE, RedisRole, RedisRoles, TxRedisChannel
from rmilter.checks import ratelimit
from rmilter.checks.greylist import GREY_STEP, encode_time
from rmilter.checks.ratelimit import BUCKETS, BucketState
from rmilter.config.schema import Bucket, Config, LimitsConfig, RedisConfig, RedisServer
from rmilter.context import ConnectionContext, MessageContext
from rmilter.deps import Deps
from rmilter.spool import run_inline
from rmilter.testing.fake_redis import FakeRedisServer
from tests.harness import start_redis

reactor: Any = _reactor  # the global reactor, typed loosely (IReactorTCP + IReactorTime)


def role_for(port: int, name: str = "grey", dbid: Optional[int] = None, poolsize: int = POOL_SIZE,
             **settings: Any) -> RedisRole:
    """A role on the local server at ``port``; ``settings`` are ``redis { }`` directives."""
    settings.setdefault("connect_timeout", 1.0)
    config = RedisConfig(**settings)

    def channel(server: RedisServer) -> TxRedisChannel:
        return TxRedisChannel(server, config, reactor, dbid, poolsize)

    return RedisRole(name, [RedisServer("127.0.0.1:%d" % port, "127.0.0.1", port)], config, reactor, channel, dbid)


def sleep(seconds: float) -> defer.Deferred:
    return task.deferLater(reactor, seconds, lambda: None)


class RoleTests(TestCase):
    """Commands through txredisapi, checked with an independent client."""

    timeout = 60

    def setUp(self) -> None:
        self.redis = start_redis(self)
        self.role = role_for(self.redis.port)
        self.addCleanup(self.role.stop)

    @defer.inlineCallbacks
    def test_binary_values_come_back_as_bytes(self) -> Generator[Any, Any, None]:
        """Values that are not text, or look like numbers, are returned as the stored bytes."""
        values = [struct.pack("<qq", 1700000000, 250000), b"\xff\xfe\x00\x01" * 4, b"1234567890123456", b"3.5"]
        for i, value in enumerate(values):
            key = b"k\xff%d" % i
            ok = yield self.role.setex(key, 100, value)
            self.assertTrue(ok)
            got = yield self.role.get(key)
            self.assertIsInstance(got, bytes)
            self.assertEqual(got, value)
            self.assertEqual(self.redis.get(key), value)
            self.assertEqual(self.redis.ttl(key), 100)

    @defer.inlineCallbacks
    def test_set_del_miss_publish(self) -> Generator[Any, Any, None]:
        """SET without TTL, DEL, a miss, PUBLISH counting subscribers."""
        self.assertTrue((yield self.role.setex(b"plain", 0, b"v")))
        self.assertEqual(self.redis.ttl(b"plain"), -1)
        self.assertTrue((yield self.role.delete(b"plain")))
        self.assertIsNone((yield self.role.get(b"plain")))
        self.assertEqual((yield self.role.publish("copies", b"x")), 0)
        subscription = self.redis.subscribe("copies")
        self.addCleanup(subscription.close)
        self.assertEqual((yield self.role.publish("copies", b"\x00payload\xff")), 1)
        self.assertEqual(subscription.wait_messages(1), [b"\x00payload\xff"])

    @defer.inlineCallbacks
    def test_script_loaded_again_after_flush(self) -> Generator[Any, Any, None]:
        """EVALSHA falls back to EVAL when the server does not know the script (restart, SCRIPT FLUSH)."""
        args = [1000.0, 1, 86400, 5, 0.5]
        self.assertEqual((yield self.role.eval_script(BUCKETS, [b"b1"], args)), 0)
        self.redis.command("SCRIPT", "FLUSH")
        self.assertEqual((yield self.role.eval_script(BUCKETS, [b"b1"], args)), 0)
        self.assertEqual(BucketState.decode(self.redis.get(b"b1")), BucketState(1000.0, 2.0))


class AuthTests(TestCase):
    """password and dbname: AUTH and SELECT on every connection."""

    timeout = 60

    @defer.inlineCallbacks
    def test_password_and_database(self) -> Generator[Any, Any, None]:
        """With requirepass and dbname 3 the record lands in database 3."""
        redis = start_redis(self)
        redis.command("CONFIG", "SET", "requirepass", "s3cret")
        role = role_for(redis.port, password="s3cret", dbid=3)
        self.addCleanup(role.stop)
        self.assertTrue((yield role.setex(b"k", 60, b"v")))
        self.assertEqual((yield role.get(b"k")), b"v")
        with redis.client() as c:
            c.command("AUTH", "s3cret")
            c.command("SELECT", 3)
            self.assertEqual(c.command("GET", "k"), b"v")

    @defer.inlineCallbacks
    def test_wrong_password_fails_open(self) -> Generator[Any, Any, None]:
        """A wrong password: commands fail (never hang), and the role says so."""
        redis = start_redis(self)
        redis.command("CONFIG", "SET", "requirepass", "s3cret")
        role = role_for(redis.port, password="wrong", connect_timeout=0.5)
        self.addCleanup(role.stop)
        self.assertIsNone((yield role.get(b"k")))
        self.assertFalse((yield role.setex(b"k", 60, b"v")))
        self.flushLoggedErrors()


class ScriptEquivalenceTests(TestCase):
    """The Lua scripts write exactly what their Python renderings (the C formats) write."""

    timeout = 120

    def setUp(self) -> None:
        self.redis = start_redis(self)
        self.role = role_for(self.redis.port, "limits")
        self.addCleanup(self.role.stop)

    @defer.inlineCallbacks
    def test_bucket_script_matches_reference(self) -> Generator[Any, Any, None]:
        """Random check/update sequences over several buckets: same replies, same stored bytes."""
        rng = random.Random(6)
        model = FakeRedisServer()
        keys = [b"<r@x>:192.0.2.10:s@x", b"<r@x>:192.0.2.10", b"<r@x>"]
        now = 1700000000.0
        for step in range(300):
            now += rng.choice([0.0, 0.001, 0.37, 3.3, 61.0, 1e-7])
            increment = rng.choice([0, 1, 1])
            args: List[Any] = [now, increment, 86400]
            for _ in keys:
                args += [rng.choice([1, 3, 20]), rng.choice([0.016666667, 0.5, 1.0, 0.000277778])]
            reply = yield self.role.eval_script(BUCKETS, keys, args)
            from rmilter.backends.redis import encode_arg

            expected = BUCKETS.reference(model, keys, [encode_arg(a) for a in args])  # type: ignore[misc]
            self.assertEqual(reply, expected, "step %d" % step)
            for key in keys:
                self.assertEqual(self.redis.get(key), model.get(key), "step %d key %r" % (step, key))
                if model.get(key) is not None:
                    self.assertEqual(self.redis.ttl(key), 86400)

    @defer.inlineCallbacks
    def test_grey_step_matches_reference(self) -> Generator[Any, Any, None]:
        """The grey step stores the 16-byte time with TTL on a miss and returns an existing record."""
        key = b"greyAAAA"
        first = yield self.role.eval_script(GREY_STEP, [key], [86400, encode_time(1700000000.25)])
        self.assertEqual(first, 0)
        self.assertEqual(self.redis.get(key), struct.pack("<qq", 1700000000, 250000))
        self.assertEqual(self.redis.ttl(key), 86400)
        again = yield self.role.eval_script(GREY_STEP, [key], [86400, encode_time(1700000999.0)])
        self.assertEqual(again, struct.pack("<qq", 1700000000, 250000))


class ConcurrencyTests(TestCase):
    """Many updates at once from two pools (two rmilter processes) count every message once."""

    timeout = 120

    @defer.inlineCallbacks
    def test_concurrent_updates_lose_nothing(self) -> Generator[Any, Any, None]:
        """400 updates of one bucket issued at once over two pools: the count is 400."""
        redis = start_redis(self)
        roles = [role_for(redis.port, "limits", poolsize=4) for _ in range(2)]
        for role in roles:
            self.addCleanup(role.stop)
        now = 1700000000.0
        calls = [
            roles[i % 2].eval_script(BUCKETS, [b"<rcpt@example.org>"], [now, 1, 86400, 1000, 1e-9])
            for i in range(400)
        ]
        replies = yield defer.gatherResults(calls)
        self.assertEqual(replies, [0] * 400)
        self.assertEqual(BucketState.decode(redis.get(b"<rcpt@example.org>")), BucketState(now, 400.0))


class SilentServer(protocol.Protocol):
    """Accepts a connection and never answers (a hung Redis); counts the bytes it was sent."""

    def dataReceived(self, data: bytes) -> None:
        self.factory.received += len(data)  # type: ignore[attr-defined]


def listen_silent(test: TestCase) -> Any:
    """A silent server on a free port; ``factory.received`` counts the bytes clients sent it."""
    factory = protocol.Factory.forProtocol(SilentServer)
    factory.received = 0  # type: ignore[attr-defined]
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    test.addCleanup(port.stopListening)
    return port


class FailOpenTests(TestCase):
    """Stopped and silent servers: calls end within connect_timeout; the server is found again."""

    timeout = 120

    @defer.inlineCallbacks
    def test_stopped_then_restarted(self) -> Generator[Any, Any, None]:
        """Redis stopped: misses and False, quickly; restarted: commands work again."""
        redis = start_redis(self)
        role = role_for(redis.port, connect_timeout=0.5)
        self.addCleanup(role.stop)
        self.assertTrue((yield role.setex(b"k", 60, b"v")))
        redis.stop()
        started = reactor.seconds()
        for _ in range(20):
            self.assertIsNone((yield role.get(b"k")))
            self.assertFalse((yield role.setex(b"k", 60, b"v")))
        # 40 calls against a dead server: at most one of them waited for the timeout
        self.assertLess(reactor.seconds() - started, 0.5 * 3)
        redis.start()
        for _ in range(100):
            if (yield role.setex(b"k", 60, b"w")):
                break
            yield sleep(0.1)
        self.assertEqual((yield role.get(b"k")), b"w")

    @defer.inlineCallbacks
    def test_silent_server(self) -> Generator[Any, Any, None]:
        """A server that accepts and never answers: each call ends (fails) after connect_timeout."""
        port = listen_silent(self)
        role = role_for(port.getHost().port, connect_timeout=0.3)
        self.addCleanup(role.stop)
        started = reactor.seconds()
        self.assertIsNone((yield role.get(b"k")))
        waited = reactor.seconds() - started
        self.assertGreaterEqual(waited, 0.29)
        self.assertLess(waited, 3.0)
        # the next call does not wait again
        self.assertFalse((yield role.setex(b"k", 1, b"v")))
        self.assertLess(reactor.seconds() - started, waited + 0.2)

    @defer.inlineCallbacks
    def test_rate_limit_check_over_two_silent_shards(self) -> Generator[Any, Any, None]:
        """Two silent shards: the RCPT check ends after one connect_timeout (not two), the second
        shard's script is never sent (its deadline had passed), and the recipient passes."""
        ports = [listen_silent(self) for _ in range(2)]
        servers = tuple(RedisServer("r%d" % i, "127.0.0.1", p.getHost().port) for i, p in enumerate(ports))
        redis_config = RedisConfig(servers_limits=servers, connect_timeout=0.5)
        role = RedisRole("limits", servers, redis_config, reactor)
        self.addCleanup(role.stop)
        to_ip, to = b"<rcpt@example.org>:192.0.2.10", b"<rcpt@example.org>"
        first, second = role.shard_of(to_ip), role.shard_of(to)
        self.assertEqual((first, second), servers)  # SPEC §9 placement: to_ip (checked first) on the first
        limits = LimitsConfig(limit_to=Bucket(3, 0.01), limit_to_ip=Bucket(3, 0.01))
        deps = Deps(config=Config(redis=redis_config, limits=limits), clock=reactor, run_blocking=run_inline,
                    redis=RedisRoles(limits=role))
        message = MessageContext(connection=ConnectionContext(family="4", client_address="192.0.2.10"))
        message.set_sender("<sender@example.net>", None)
        started = reactor.seconds()
        result = yield ratelimit.check(message, deps, recipient="<rcpt@example.org>")
        waited = reactor.seconds() - started
        self.assertEqual((result.verdict, result.failed), (None, True))
        self.assertGreaterEqual(waited, 0.49)
        self.assertLess(waited, 0.95)  # two timeouts would be 1 s
        self.assertGreater(ports[0].factory.received, 0)
        self.assertEqual(ports[1].factory.received, 0)
