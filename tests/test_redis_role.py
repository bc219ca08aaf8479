"""RedisRole (SPEC §6.1, §6.6) with scripted channels and a Clock: commands, placement, health, timeouts."""
from __future__ import annotations

import importlib.metadata
import inspect
import re
from typing import Any, List, Tuple

from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.trial.unittest import SynchronousTestCase

from rmilter.backends import redis
from rmilter.backends.redis import (
    LuaScript,
    RedisErrorReply,
    RedisRole,
    RedisUnavailable,
    TxRedisChannel,
    database_number,
    encode_arg,
    retry_interval,
)
from rmilter.config.schema import Config, RedisConfig, RedisServer
from tests.redis_support import SHARDS as SERVERS
from tests.redis_support import ChannelMaker

SCRIPT = LuaScript("test", "return 1")


def make_role(n: int = 1, **settings: Any) -> Tuple[RedisRole, ChannelMaker, Clock]:
    """A role over the first ``n`` SERVERS (ScriptedChannels); ``settings`` are ``redis { }`` directives."""
    clock = Clock()
    clock.advance(1000)
    maker = ChannelMaker()
    role = RedisRole("grey", SERVERS[:n], RedisConfig(**settings), clock, maker)
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
        self.assertEqual(database_number(config.redis), 3)
        self.assertIsNone(database_number(RedisConfig(dbname="x")))
        self.assertIsNone(database_number(RedisConfig()))
        self.assertEqual(retry_interval(config.redis), 1.0)  # never less than a second
        self.assertEqual(retry_interval(RedisConfig(connect_timeout=2.5)), 2.5)
        roles = redis.from_config(config, Clock())
        assert roles is not None and roles.grey is not None
        self.assertEqual(roles.grey.timeout, 0.5)
        # what each server's txredisapi pool will be opened with
        (link,) = roles.grey._links.values()
        channel = link.channel
        assert isinstance(channel, TxRedisChannel)
        self.assertEqual((channel.config.password, channel.dbid, channel.config.connect_timeout), ("secret", 3, 0.5))
        self.assertEqual(channel.poolsize, redis.POOL_SIZE)

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


class DeadlinesTests(SynchronousTestCase):
    """``Deadlines``: absolute deadlines in any order, one timer for the earliest (SPEC §6.1, §6.10)."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1000)
        self.deadlines = redis.Deadlines(1.0, self.clock)

    def timers(self) -> List[float]:
        """When the pending timers fire."""
        calls: List[Any] = list(self.clock.getDelayedCalls())
        return [call.getTime() for call in calls]

    def test_out_of_order_deadlines_cancelled_at_their_own_time(self) -> None:
        """Deadlines added as 1003, 1001, 1002 end their commands at 1001, 1002, 1003; one timer at a time."""
        late, early, middle = Deferred(), Deferred(), Deferred()  # type: ignore[var-annotated]
        self.deadlines.add(late, 1003.0)
        self.assertEqual(self.timers(), [1003.0])
        self.deadlines.add(early, 1001.0)
        self.assertEqual(self.timers(), [1001.0])  # re-armed to the earliest, not a second timer
        self.deadlines.add(middle, 1002.0)
        self.assertEqual(self.timers(), [1001.0])
        self.clock.advance(0.5)
        for d in (late, early, middle):
            self.assertNoResult(d)
        self.clock.advance(0.5)
        self.failureResultOf(early, CancelledError)
        self.assertNoResult(middle)
        self.assertNoResult(late)
        self.assertEqual(self.timers(), [1002.0])
        self.clock.advance(1.0)
        self.failureResultOf(middle, CancelledError)
        self.assertNoResult(late)
        self.assertEqual(self.timers(), [1003.0])
        self.clock.advance(1.0)
        self.failureResultOf(late, CancelledError)
        self.assertEqual(self.timers(), [])

    def test_default_deadline_is_timeout_from_now(self) -> None:
        """Without a deadline a command gets ``timeout`` from when it was added."""
        self.assertEqual(self.deadlines.deadline(), 1001.0)
        first = Deferred()  # type: Deferred[Any]
        self.deadlines.add(first)
        self.clock.advance(0.5)
        second = Deferred()  # type: Deferred[Any]
        self.deadlines.add(second)
        self.clock.advance(0.5)
        self.failureResultOf(first, CancelledError)
        self.assertNoResult(second)
        self.clock.advance(0.5)
        self.failureResultOf(second, CancelledError)

    def test_answered_commands_are_not_cancelled(self) -> None:
        """A command answered before its deadline keeps its answer; one answered already is not tracked."""
        answered = Deferred()  # type: Deferred[Any]
        waiting = Deferred()  # type: Deferred[Any]
        self.deadlines.add(answered, 1001.0)
        self.deadlines.add(waiting, 1002.0)
        answered.callback(b"reply")
        self.deadlines.add(succeed(b"at once"), 1000.5)
        self.assertEqual(self.timers(), [1001.0])  # the answered one does not arm a timer
        self.clock.advance(1.0)
        self.assertEqual(self.successResultOf(answered), b"reply")
        self.assertNoResult(waiting)
        waiting.callback(b"late but in time")
        self.assertEqual(self.timers(), [1002.0])
        self.clock.advance(1.0)
        self.assertEqual(self.successResultOf(waiting), b"late but in time")
        self.assertEqual(self.timers(), [])

    def test_stop_cancels_the_rest(self) -> None:
        """stop() ends every unanswered command at once and leaves no timer."""
        pending = [Deferred() for _ in range(3)]  # type: List[Deferred[Any]]
        for i, d in enumerate(pending):
            self.deadlines.add(d, 1005.0 - i)
        pending[1].callback(None)
        self.deadlines.stop()
        self.failureResultOf(pending[0], CancelledError)
        self.assertIsNone(self.successResultOf(pending[1]))
        self.failureResultOf(pending[2], CancelledError)
        self.assertEqual(self.timers(), [])

    def test_role_command_past_its_deadline_is_not_sent(self) -> None:
        """A role command whose deadline has passed answers at once as a failure, sends nothing and
        does not count against the server."""
        role, maker, clock = make_role(connect_timeout=1.0)
        channel = maker.channels["r0"]
        now = clock.seconds()
        for deadline in (now, now - 0.5):
            self.assertIsNone(self.successResultOf(role.get(b"k", deadline=deadline)))
            self.assertFalse(self.successResultOf(role.setex(b"k", 10, b"v", deadline=deadline)))
            self.assertIsNone(self.successResultOf(role.eval_script(SCRIPT, [b"k"], [], deadline=deadline)))
            self.assertIsNone(self.successResultOf(role.publish("copies", b"msg", deadline=deadline)))
            self.assertIs(self.successResultOf(role._command(SERVERS[0], (b"GET", b"k"), deadline=deadline)),
                          redis.UNAVAILABLE)
        self.assertEqual(channel.sent, [])
        self.assertEqual(role.commands_sent, 0)
        self.assertEqual(role.upstreams.upstreams[0].errors, 0)
        self.assertEqual(clock.getDelayedCalls(), [])
        # a deadline still ahead: sent, and bounded by it rather than by connect_timeout
        channel.hang = True
        d = role.get(b"k", deadline=now + 0.25)
        self.assertEqual(channel.sent, [(b"GET", b"k")])
        clock.advance(0.25)
        self.assertIsNone(self.successResultOf(d))

    def test_commands_of_a_check_share_its_deadline(self) -> None:
        """Commands sent one after another with one deadline all end at it: a second command sent
        0.75 s into a 1 s check waits 0.25 s, not connect_timeout."""
        role, maker, clock = make_role(connect_timeout=1.0)
        maker.channels["r0"].hang = True
        deadline = role.deadline()
        self.assertEqual(deadline, clock.seconds() + 1.0)
        first = role.get(b"a", deadline=deadline)
        clock.advance(0.75)
        maker.channels["r0"].pending[0].callback(None)
        self.assertIsNone(self.successResultOf(first))
        second = role.eval_script(SCRIPT, [b"a"], [], deadline=deadline)
        clock.advance(0.25)
        self.assertIsNone(self.successResultOf(second))


#: the txredisapi versions rmilter is written against (setup.py: ``txredisapi>=1.6,<1.7``)
TXREDISAPI_RANGE = ">=1.6,<1.7"
TXREDISAPI_LOWEST, TXREDISAPI_ABOVE = (1, 6), (1, 7)


class TxredisapiContractTests(SynchronousTestCase):
    """What rmilter needs from txredisapi: fails when an upgrade changes it under us.

    rmilter uses one private piece, ``RedisProtocol._build_command`` (overridden by
    ``rmilter.backends.redis._protocol_class``, which calls ``_encode_value`` for anything
    that is not bytes), and the public ``RedisFactory(...)``, ``startConnecting(endpoint)``,
    ``factory.pool / handler / deferred / size``, ``disconnect()``, ``execute_command`` and
    ``ResponseError``.
    """

    def setUp(self) -> None:
        import txredisapi  # type: ignore[import-untyped]

        self.txredisapi: Any = txredisapi

    def test_installed_version_in_the_declared_range(self) -> None:
        """The installed txredisapi is one rmilter declares (TXREDISAPI_RANGE)."""
        installed = importlib.metadata.version("txredisapi")
        match = re.match(r"(\d+)\.(\d+)", installed)
        assert match is not None, installed
        release = (int(match.group(1)), int(match.group(2)))
        self.assertTrue(TXREDISAPI_LOWEST <= release < TXREDISAPI_ABOVE,
                        "txredisapi %s is not %s" % (installed, TXREDISAPI_RANGE))

    def test_factory_signature_and_attributes(self) -> None:
        """RedisFactory takes uuid, dbid, poolsize positionally and the keywords rmilter passes, and has
        the attributes and methods rmilter reads or sets."""
        tx = self.txredisapi
        parameters = list(inspect.signature(tx.RedisFactory.__init__).parameters)
        self.assertEqual(parameters[:4], ["self", "uuid", "dbid", "poolsize"])
        for keyword in ("isLazy", "handler", "charset", "password", "replyTimeout", "convertNumbers"):
            self.assertIn(keyword, parameters)
        self.assertEqual(list(inspect.signature(tx.RedisFactory.startConnecting).parameters), ["self", "endpoint"])
        self.assertEqual(list(inspect.signature(tx.RedisFactory.disconnect).parameters), ["self"])
        factory = tx.RedisFactory("127.0.0.1:6379", 3, 1, isLazy=True, handler=tx.ConnectionHandler, charset=None,
                                  password="pw", replyTimeout=None, convertNumbers=False)
        self.assertEqual((factory.pool, factory.size), ([], 0))
        self.assertIsInstance(factory.deferred, Deferred)
        self.assertIsInstance(factory.handler, tx.ConnectionHandler)
        self.assertTrue(callable(factory.handler.execute_command))
        for attribute in ("reconnect", "initialDelay", "maxDelay", "protocol"):
            self.assertTrue(hasattr(factory, attribute), attribute)
        self.assertTrue(issubclass(factory.protocol, tx.BaseRedisProtocol))
        self.assertTrue(issubclass(tx.ResponseError, Exception))

    def test_protocol_methods(self) -> None:
        """The protocol methods rmilter overrides or calls exist with the signatures it uses."""
        protocol = self.txredisapi.RedisProtocol
        signatures = {name: str(inspect.signature(getattr(protocol, name)))
                      for name in ("_build_command", "_encode_value", "execute_command", "connectionMade")}
        self.assertEqual(signatures, {
            "_build_command": "(self, *args, **kwargs)",
            "_encode_value": "(self, arg)",
            "execute_command": "(self, *args, **kwargs)",
            "connectionMade": "(self)",
        })

    def protocols(self) -> List[Any]:
        """txredisapi's protocol and rmilter's, made as RedisFactory.buildProtocol makes them."""
        base = self.txredisapi.RedisProtocol
        ours = redis._protocol_class(base)
        self.assertTrue(issubclass(ours, base))
        return [cls(None, replyTimeout=None, password=None, dbid=None, convertNumbers=False) for cls in (base, ours)]

    def test_build_command_byte_identical(self) -> None:
        """rmilter's _build_command gives exactly txredisapi's bytes for bytes, str and int arguments."""
        base, ours = self.protocols()
        commands = [
            (b"GET", b"grey\xff\x00key"),
            (b"SETEX", b"k", b"86400", b"\x00\x01\r\n16 bytes value"),
            (b"SET", b"k", b""),
            ("PUBLISH", "copies", "caf\u00e9 \u2603"),
            (b"EVALSHA", "0123abcd", 2, b"k1", b"k2", 0, -1, 86400, 1700000000),
            (b"EVAL", b"return 1", 0, 1.5, bytearray(b"ba")),
            (b"PING",),
        ]
        for command in commands:
            self.assertEqual(ours._build_command(*command), base._build_command(*command), command)
            self.assertIsInstance(ours._build_command(*command), bytes)
        self.assertEqual(ours._build_command(b"GET", b"k"), b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n")
        self.assertEqual(ours._build_command("SET", "\u00e9", 7), b"*3\r\n$3\r\nSET\r\n$2\r\n\xc3\xa9\r\n$1\r\n7\r\n")

    def test_execute_command_writes_our_encoding_and_returns_bytes(self) -> None:
        """execute_command goes through the overridden _build_command; with charset=None and
        convertNumbers=False replies come back as the stored bytes, error replies as ResponseError."""
        _, protocol = self.protocols()
        protocol.transport = StringTransport()
        protocol.connected = 1
        got = protocol.execute_command(b"GET", b"k\xff")
        self.assertEqual(protocol.transport.value(), b"*2\r\n$3\r\nGET\r\n$2\r\nk\xff\r\n")
        protocol.dataReceived(b"$4\r\n\x00\xff12\r\n")
        self.assertEqual(self.successResultOf(got), b"\x00\xff12")
        replies = [b"$2\r\n12\r\n", b"$-1\r\n", b"+OK\r\n", b":3\r\n", b"-NOSCRIPT No matching script\r\n"]
        answers = [protocol.execute_command(b"CMD") for _ in replies]
        protocol.dataReceived(b"".join(replies))
        self.assertEqual([self.successResultOf(d) for d in answers[:4]], [b"12", None, b"OK", 3])
        self.failureResultOf(answers[4], self.txredisapi.ResponseError)

    def test_channel_opens_a_factory_as_rmilter_configures_it(self) -> None:
        """TxRedisChannel's first command makes a lazy pool of POOL_SIZE connections to the server, with
        dbid, password, charset=None, convertNumbers=False, no reply timeout and rmilter's protocol,
        connecting within connect_timeout; close() stops it."""
        reactor = MemoryReactorClock()  # its resolver makes every name 127.0.0.1
        server = RedisServer("127.0.0.1:6390", "127.0.0.1", 6390)
        channel = TxRedisChannel(server, RedisConfig(password="pw", connect_timeout=0.5), reactor, dbid=3)
        self.assertIsNone(channel.ready_connections)
        channel.execute((b"GET", b"k"))
        factory = channel._factory
        self.assertEqual(
            (factory.dbid, factory.password, factory.poolsize, factory.charset, factory.convertNumbers,
             factory.replyTimeout, factory.isLazy, factory.reconnect),
            (3, "pw", redis.POOL_SIZE, None, False, None, True, True),
        )
        self.assertEqual(factory.protocol.__name__, "RmilterRedisProtocol")
        self.assertEqual(channel.ready_connections, 0)
        [(host, port, _, timeout, _)] = reactor.tcpClients
        self.assertEqual((host, port, timeout), (server.host, server.port, 0.5))
        self.assertIsNone(self.successResultOf(channel.close()))
        self.assertIsNone(channel.ready_connections)
