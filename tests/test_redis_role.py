"""RedisRole (SPEC §6.1, §6.6) with scripted channels and a Clock: commands, placement, health, timeouts."""
from __future__ import annotations

from typing import Tuple

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from rmilter.backends import redis
from rmilter.backends.redis import LuaScript, RedisErrorReply, RedisRole, RedisSettings, RedisUnavailable, encode_arg
from rmilter.config.schema import Config, RedisConfig, RedisServer
from tests.redis_support import ChannelMaker

SERVERS = tuple(RedisServer("r%d" % i, "10.0.0.%d" % i) for i in range(4))
SCRIPT = LuaScript("test", "return 1")


def make_role(n: int = 1, **settings: object) -> Tuple[RedisRole, ChannelMaker, Clock]:
    clock = Clock()
    clock.advance(1000)
    maker = ChannelMaker()
    role = RedisRole("grey", SERVERS[:n], RedisSettings(**settings), clock, maker)  # type: ignore[arg-type]
    return role, maker, clock


class FromConfigTests(SynchronousTestCase):
    """Which roles exist, and that nothing connects before the first command."""

    def test_no_servers_no_roles(self) -> None:
        """No Redis server list: None; a memcached backend (B13): None."""
        self.assertIsNone(redis.from_config(Config(), Clock()))
        config = Config(redis=RedisConfig(servers_grey=SERVERS[:1]), cache_backend="memcached")
        self.assertIsNone(redis.from_config(config, Clock()))

    def test_roles_and_white_fallback(self) -> None:
        """Empty lists give None; white is the grey role when servers_white is empty."""
        maker = ChannelMaker()
        roles = redis.from_config(Config(redis=RedisConfig(servers_grey=SERVERS[:2], servers_limits=SERVERS[2:3])),
                                  Clock(), maker)
        assert roles is not None
        self.assertIs(roles.white, roles.grey)
        self.assertEqual([roles.id, roles.spam, roles.copy], [None, None, None])
        assert roles.limits is not None
        self.assertEqual(roles.limits.name, "limits")
        self.assertEqual(len(roles.roles()), 2)
        # lazy: channels exist but none has sent anything
        self.assertTrue(maker.channels)
        self.assertFalse(any(c.started for c in maker.channels.values()))
        roles2 = redis.from_config(Config(redis=RedisConfig(servers_grey=SERVERS[:1], servers_white=SERVERS[1:2])),
                                   Clock(), ChannelMaker())
        assert roles2 is not None
        self.assertIsNot(roles2.white, roles2.grey)
        assert roles2.white is not None
        self.assertEqual(roles2.white.name, "white")

    def test_settings(self) -> None:
        """password, dbname (a number) and the timeouts come from the redis section."""
        config = Config(redis=RedisConfig(servers_grey=SERVERS[:1], password="secret", dbname="3", connect_timeout=0.5))
        settings = RedisSettings.from_config(config)
        self.assertEqual((settings.password, settings.dbid, settings.connect_timeout), ("secret", 3, 0.5))
        self.assertIsNone(RedisSettings.from_config(Config(redis=RedisConfig(dbname="x"))).dbid)

    def test_stop_closes_channels(self) -> None:
        """stop() closes every server's channel once."""
        maker = ChannelMaker()
        roles = redis.from_config(Config(redis=RedisConfig(servers_grey=SERVERS[:2])), Clock(), maker)
        assert roles is not None
        self.successResultOf(roles.stop())
        self.assertTrue(all(c.closed for c in maker.channels.values()))


class CommandTests(SynchronousTestCase):
    """What is sent and what callers get back."""

    def setUp(self) -> None:
        self.role, self.maker, self.clock = make_role()
        self.channel = self.maker.channels["r0"]

    def test_get(self) -> None:
        """GET returns the bytes; nil and the empty string are misses (SPEC §6.1)."""
        self.channel.replies[b"GET"] = b"\x00\xff16 bytes value."
        self.assertEqual(self.successResultOf(self.role.get(b"k")), b"\x00\xff16 bytes value.")
        self.channel.replies[b"GET"] = None
        self.assertIsNone(self.successResultOf(self.role.get(b"k")))
        self.channel.replies[b"GET"] = b""
        self.assertIsNone(self.successResultOf(self.role.get(b"k")))
        self.assertEqual(self.channel.sent[0], (b"GET", b"k"))

    def test_setex_and_set(self) -> None:
        """SETEX key ttl value; SET without TTL when ttl is 0; True on +OK."""
        self.assertTrue(self.successResultOf(self.role.setex(b"k", 3600, b"v")))
        self.assertTrue(self.successResultOf(self.role.setex(b"k", 0, b"v")))
        self.assertEqual(self.channel.sent, [(b"SETEX", b"k", b"3600", b"v"), (b"SET", b"k", b"v")])

    def test_delete_is_del(self) -> None:
        """Deletes are DEL (B11)."""
        self.channel.replies[b"DEL"] = 1
        self.assertTrue(self.successResultOf(self.role.delete(b"k")))
        self.assertEqual(self.channel.sent, [(b"DEL", b"k")])

    def test_publish(self) -> None:
        """PUBLISH goes to the first server and returns the subscriber count."""
        role, maker, _ = make_role(3)
        for channel in maker.channels.values():
            channel.replies[b"PUBLISH"] = 2
        self.assertEqual(self.successResultOf(role.publish("copies", b"msg")), 2)
        self.assertEqual(maker.channels["r0"].sent, [(b"PUBLISH", b"copies", b"msg")])
        self.assertEqual(maker.channels["r1"].sent, [])

    def test_error_reply(self) -> None:
        """An error reply is a miss / False, and does not count against the server."""
        self.channel.replies[b"GET"] = RedisErrorReply("WRONGTYPE Operation against a key")
        self.channel.replies[b"SETEX"] = RedisErrorReply("NOAUTH Authentication required.")
        self.assertIsNone(self.successResultOf(self.role.get(b"k")))
        self.assertFalse(self.successResultOf(self.role.setex(b"k", 1, b"v")))
        self.assertEqual(self.role.upstreams.upstreams[0].errors, 0)

    def test_evalsha_then_eval_on_noscript(self) -> None:
        """EVALSHA first; NOSCRIPT makes it send EVAL with the source, on the same server."""
        self.channel.replies[b"EVALSHA"] = RedisErrorReply("NOSCRIPT No matching script. Please use EVAL.")
        self.channel.replies[b"EVAL"] = 7
        self.assertEqual(self.successResultOf(self.role.eval_script(SCRIPT, [b"k1", b"k2"], [1.5, 2, b"x"])), 7)
        tail = (b"2", b"k1", b"k2", b"1.5", b"2", b"x")
        self.assertEqual(
            self.channel.sent,
            [(b"EVALSHA", SCRIPT.sha1.encode()) + tail, (b"EVAL", b"return 1") + tail],
        )

    def test_script_error(self) -> None:
        """A script error is None."""
        self.channel.replies[b"EVALSHA"] = RedisErrorReply("ERR user_script:1: oops")
        self.assertIsNone(self.successResultOf(self.role.eval_script(SCRIPT, [b"k"], [])))

    def test_float_arguments_keep_precision(self) -> None:
        """Times and rates reach scripts as exact doubles (txredisapi would print six decimals)."""
        self.assertEqual(float(encode_arg(1700000000.123456789)), 1700000000.123456789)
        self.assertEqual(float(encode_arg(0.016666667)), 0.016666667)
        self.assertEqual(encode_arg(86400), b"86400")


class PlacementTests(SynchronousTestCase):
    """Keys land on the server of SPEC §6.6's consistent hash (vectors of SPEC §9)."""

    def server_of(self, n: int, key: bytes) -> str:
        role, maker, _ = make_role(n)
        self.successResultOf(role.get(key))
        return [name for name, c in maker.channels.items() if c.sent][0]

    def test_vectors(self) -> None:
        """`<rcpt@example.org>` -> 1/1/1, `b` -> 1/1/3, `c` -> 0/0/0 for N = 2/3/4."""
        for key, expected in ((b"<rcpt@example.org>", "111"), (b"b", "113"), (b"c", "000"),
                              (b"<rcpt@example.org>:192.0.2.10", "000")):
            got = "".join(self.server_of(n, key)[1:] for n in (2, 3, 4))
            self.assertEqual(got, expected, key)

    def test_dead_server_skipped(self) -> None:
        """After maxerrors failures within error_time a server is dead: its keys go to the live ones."""
        role, maker, clock = make_role(4, maxerrors=3, error_time=10.0, dead_time=300.0)
        maker.channels["r3"].replies[b"GET"] = RedisUnavailable("refused")
        maker.channels["r3"].ready = 0
        for _ in range(3):
            self.assertIsNone(self.successResultOf(role.get(b"b")))
        self.assertEqual(len(maker.channels["r3"].sent), 1)  # then failed at once: no connection
        self.successResultOf(role.get(b"b"))
        self.assertEqual(len(maker.channels["r3"].sent), 1)
        self.assertEqual(sum(len(c.sent) for name, c in maker.channels.items() if name != "r3"), 1)
        clock.advance(301)
        self.assertIs(role.shard_of(b"b"), SERVERS[3])


class TimeoutTests(SynchronousTestCase):
    """Every command is bounded by connect_timeout; a failed server is not waited for by every message."""

    def setUp(self) -> None:
        self.role, self.maker, self.clock = make_role(connect_timeout=1.0)
        self.channel = self.maker.channels["r0"]

    def test_timeout_then_fast_failures_then_probe(self) -> None:
        """A silent server: the first command waits 1 s; the next ones fail at once until the pause is over."""
        self.channel.hang = True
        d = self.role.get(b"k")
        self.clock.advance(0.999)
        self.assertNoResult(d)
        self.clock.advance(0.001)
        self.assertIsNone(self.successResultOf(d))
        # right after: no waiting
        self.assertFalse(self.successResultOf(self.role.setex(b"k", 1, b"v")))
        self.assertIsNone(self.successResultOf(self.role.eval_script(SCRIPT, [b"k"], [])))
        self.assertEqual(len(self.channel.sent), 1)
        self.assertEqual(self.role.upstreams.upstreams[0].errors, 3)
        # after retry_interval one command tries again; it succeeds and the server is back
        self.clock.advance(1.0)
        self.channel.hang = False
        self.channel.replies[b"GET"] = b"v"
        self.assertEqual(self.successResultOf(self.role.get(b"k")), b"v")
        self.assertEqual(self.successResultOf(self.role.get(b"k")), b"v")
        self.assertEqual(self.role.upstreams.upstreams[0].errors, 0)

    def test_no_connection_fails_at_once(self) -> None:
        """While the pool has no connection after a failure, commands fail at once, even after the pause."""
        self.channel.replies[b"GET"] = RedisUnavailable("Connection refused")
        self.assertIsNone(self.successResultOf(self.role.get(b"k")))
        self.channel.ready = 0
        self.clock.advance(10)
        self.assertIsNone(self.successResultOf(self.role.get(b"k")))
        self.assertEqual(len(self.channel.sent), 1)
        # txredisapi reconnected: the next command is sent
        self.channel.ready = 1
        self.channel.replies[b"GET"] = b"back"
        self.assertEqual(self.successResultOf(self.role.get(b"k")), b"back")

    def test_command_waiting_on_another_deferred_is_cancelled(self) -> None:
        """A command whose Deferred waits on an inner one (txredisapi's handler path) still times out."""
        inner: Deferred = Deferred()
        outer: Deferred = Deferred()
        outer.callback(None)
        outer.addCallback(lambda _: inner)  # fired, but paused on ``inner``
        self.channel.execute = lambda args: outer  # type: ignore[method-assign]
        d = self.role.get(b"k")
        self.assertNoResult(d)
        self.clock.advance(1.0)
        self.assertIsNone(self.successResultOf(d))
        self.assertTrue(inner.called)  # the cancellation reached it (its failure went to the outer one)

    def test_commands_time_out_in_order(self) -> None:
        """Commands sent at different times each get their full timeout from one timer."""
        self.channel.hang = True
        first = self.role.get(b"a")
        self.clock.advance(0.5)
        self.channel.hang = True
        second = self.role._command(SERVERS[0], (b"GET", b"b"))  # sent while the first is pending
        self.clock.advance(0.5)
        self.assertIsNone(self.successResultOf(first))
        self.assertNoResult(second)
        self.clock.advance(0.5)
        self.assertIs(self.successResultOf(second), redis.UNAVAILABLE)

    def test_stop_ends_pending_commands(self) -> None:
        """stop() leaves no timer behind and ends unanswered commands."""
        self.channel.hang = True
        d = self.role.get(b"k")
        self.successResultOf(self.role.stop())
        self.assertIsNone(self.successResultOf(d))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_first_command_waits_for_the_connection(self) -> None:
        """Before the first command there is no pool yet: the command is sent (and may wait)."""
        self.assertIsNone(self.channel.ready_connections)
        self.channel.ready = 0  # connecting
        self.channel.hang = True
        d = self.role.get(b"k")
        self.assertEqual(len(self.channel.sent), 1)
        self.clock.advance(1.0)
        self.assertIsNone(self.successResultOf(d))
