"""Redis access for greylisting, rate limits, replies and pub/sub (SPEC §6.1, §6.6).

Every role (``grey``, ``white``, ``limits``, ``id``, ``spam``, ``copy``) is a
``RedisRole``: a server list with SPEC §6.6 health, keys placed on servers by
the consistent hash of ``UpstreamList.choose_hashed`` (so shards written by the
C rmilter are found), one lazy txredisapi connection pool per server, opened by
the first command.  Commands are pipelined: the pool holds one persistent
connection by default, so the commands of all messages handled in one reactor
turn go out in one write and their replies come back in one read.

Every call returns a Deferred that never fails and fires within
``redis.connect_timeout``: Redis being unreachable means fail open (SPEC
§6.10), so callers only ever see "miss", ``False`` or ``None``.

A server that has just failed is not waited for again by every message: while
it has no connection at all, or for ``retry_interval`` seconds after a timeout,
its commands fail at once (and still count against it, SPEC §6.6); txredisapi
keeps reconnecting in the background and the first command after that finds
the server again.  So at most one message at a time pays the timeout.
"""
from __future__ import annotations

import hashlib
import heapq
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Protocol, Sequence, Tuple, Union

from twisted.internet.defer import Deferred, DeferredList, fail, succeed
from twisted.python.failure import Failure

from rmilter.backends.upstream import UpstreamList
from rmilter.config.schema import Config, RedisConfig, RedisServer
from rmilter.log import Logger

log = Logger(namespace="rmilter.redis")

#: what a Lua script may be given as an argument (encoded as Redis bulk strings)
ScriptArg = Union[bytes, str, int, float]


# -- scripts ----------------------------------------------------------------------------------
class ScriptStore(Protocol):
    """The keyspace as a script sees it: what a Python rendering of a Lua script may use."""

    def get(self, key: bytes) -> Optional[bytes]: ...

    def setex(self, key: bytes, ttl: int, value: bytes) -> None: ...

    def delete(self, key: bytes) -> None: ...


@dataclass(frozen=True)
class LuaScript:
    """A server-side script run with EVALSHA (EVAL on NOSCRIPT).

    ``reference`` is the same algorithm in Python, run by the in-memory fake
    (rmilter.testing.fake_redis) and compared with the Lua by the integration
    tests; it receives the store, the keys and the arguments as bytes.
    """

    name: str
    source: str
    reference: Optional[Callable[[ScriptStore, Sequence[bytes], Sequence[bytes]], Any]] = field(
        default=None, compare=False
    )
    #: the script's SHA1 as EVALSHA takes it (computed once)
    sha1: str = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "sha1", hashlib.sha1(self.source.encode("utf-8")).hexdigest())


def encode_arg(value: ScriptArg) -> bytes:
    """Arguments as Redis sees them: floats with full precision (repr), text as UTF-8.

    txredisapi would format floats with six decimals; times and rates must reach
    the script as the exact doubles rmilter computed with.
    """
    if isinstance(value, bytes):
        return value
    if isinstance(value, bool):
        return b"1" if value else b"0"
    if isinstance(value, float):
        return repr(value).encode("ascii")
    if isinstance(value, int):
        return str(value).encode("ascii")
    return value.encode("utf-8")


# -- errors a channel reports -----------------------------------------------------------------
class RedisErrorReply(Exception):
    """The server answered with an error reply (``-ERR ...``, ``-NOSCRIPT ...``): it is alive."""


class RedisUnavailable(Exception):
    """No usable connection to the server (refused, lost, authentication failed)."""


# -- one server's connections -----------------------------------------------------------------
class CommandChannel(Protocol):
    """Send commands to one server; ``execute`` fires with the raw reply.

    Errors: ``RedisErrorReply`` for an error reply, anything else for a
    connection problem.  ``ready_connections`` is None until the first command
    created the connections, then the number of usable connections.
    """

    @property
    def ready_connections(self) -> Optional[int]: ...

    def execute(self, args: Sequence[bytes]) -> "Deferred[Any]": ...

    def close(self) -> "Deferred[None]": ...


#: connections per server and role.  Commands are pipelined; with one connection the commands of
#: one reactor turn share a write (measured: ~200 µs less CPU per message than two connections at
#: 8 concurrent messages, bench/redis_bench.py)
POOL_SIZE = 1


def retry_interval(config: RedisConfig) -> float:
    """How long a server that timed out is not waited for again."""
    return max(1.0, config.connect_timeout)


def database_number(config: RedisConfig) -> Optional[int]:
    """``dbname`` as the number SELECT takes; None for the default database (and for junk, logged)."""
    if config.dbname in (None, ""):
        return None
    try:
        return int(config.dbname)  # type: ignore[arg-type]
    except ValueError:
        log.error("redis dbname {dbname!r} is not a number; using the default database", dbname=config.dbname)
        return None


class TxRedisChannel:
    """A txredisapi connection pool to one server, opened by the first command.

    Connections are made with ``charset=None`` and ``convertNumbers=False`` so
    that 16-byte binary records come back as the bytes that were stored
    (txredisapi would otherwise decode them as text or turn digits into ints).
    AUTH and SELECT are sent by txredisapi on every new connection.
    """

    def __init__(self, server: RedisServer, config: RedisConfig, reactor: Any, dbid: Optional[int] = None,
                 poolsize: int = POOL_SIZE) -> None:
        self.server = server
        self.config = config
        self.dbid = dbid
        self.poolsize = poolsize
        self.reactor = reactor
        self._factory: Any = None
        self._handler: Any = None
        self._response_error: Any = Exception
        self._turn = 0

    @property
    def ready_connections(self) -> Optional[int]:
        if self._factory is None:
            return None
        return int(self._factory.size)

    def _connect(self) -> None:
        # txredisapi imports the global reactor: import it only when a command is sent
        import txredisapi  # type: ignore[import-untyped]
        from twisted.internet.endpoints import HostnameEndpoint

        factory = txredisapi.RedisFactory(
            "%s:%d" % (self.server.host, self.server.port),
            self.dbid,
            self.poolsize,
            isLazy=True,
            handler=txredisapi.ConnectionHandler,
            charset=None,
            password=self.config.password or None,
            replyTimeout=None,  # rmilter bounds every command itself, on its own clock
            convertNumbers=False,
        )
        factory.reconnect = True
        factory.protocol = _protocol_class(txredisapi.RedisProtocol)
        # fires once the pool is complete, or fails for good (wrong password or dbname)
        factory.deferred.addCallbacks(lambda _: None, self._pool_failed)
        # come back quickly once the server returns; the default backs off to 10 s
        factory.initialDelay = 0.2
        factory.maxDelay = max(2.0, self.config.connect_timeout)
        endpoint = HostnameEndpoint(self.reactor, self.server.host, self.server.port,
                                    timeout=self.config.connect_timeout)
        factory.startConnecting(endpoint)
        self._factory = factory
        self._handler = factory.handler
        self._response_error = txredisapi.ResponseError

    def execute(self, args: Sequence[bytes]) -> "Deferred[Any]":
        if self._handler is None:
            self._connect()
        try:
            pool = self._factory.pool  # connections that passed AUTH and SELECT
            if pool:
                # pipelined on a ready connection, in turn (what the handler does, minus a
                # generator and two Deferreds per command)
                self._turn += 1
                connection = pool[self._turn % len(pool)]
                if connection.connected:
                    d: Deferred = connection.execute_command(*args)
                    return d.addErrback(self._map_error)
            # no ready connection (yet): the handler waits for one
            d = self._handler.execute_command(*args)
        except Exception:
            return fail()
        return d.addErrback(self._map_error)

    def _pool_failed(self, failure: Failure) -> None:
        log.error(
            "Redis server {server}: connections refused for good: {error}",
            server=self.server.name, error=failure.getErrorMessage(),
        )

    def _map_error(self, failure: Failure) -> Failure:
        if failure.check(self._response_error):
            return Failure(RedisErrorReply(str(failure.value)))
        return failure

    def close(self) -> "Deferred[None]":
        factory, self._factory, self._handler = self._factory, None, None
        if factory is None:
            return succeed(None)
        return factory.disconnect().addBoth(lambda _: None)


class SentinelChannel(TxRedisChannel):
    """The master of a Redis Sentinel group, through txredisapi's Sentinel support (SPEC §11).

    Before every connection txredisapi asks the Sentinels for the master's address and drops
    the connections to an old master when it changed, so writes follow a failover within the
    Sentinels' own detection time.  While no master is known, commands wait for a connection
    and fail at their deadline: the feature fails open as with a dead server (SPEC §6.1).
    """

    def _connect(self) -> None:
        import txredisapi  # type: ignore[import-untyped]

        channel = self
        protocol = _sentinel_protocol_class(txredisapi)

        class Factory(txredisapi.SentinelConnectionFactory):  # type: ignore[misc]
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                super().__init__(*args, **kwargs)
                self.protocol = protocol
                # after a failover the promoted replica is known to the Sentinels within about
                # a second or two: ask again soon, then every second (not txredisapi's 1 s
                # first delay growing by e), so writes reach the new master quickly
                self.initialDelay = 0.2
                self.maxDelay = max(1.0, channel.config.connect_timeout)
                self.deferred.addCallbacks(lambda _: None, channel._pool_failed)
                channel._factory = self

        sentinel = txredisapi.Sentinel(list(self.server.sentinels))
        # a failover takes seconds; a discovery that hears nothing gives up after this long and
        # the next connection attempt asks again
        sentinel.discovery_timeout = max(1.0, self.config.connect_timeout)
        self._sentinel = sentinel
        assert self.server.master is not None
        self._handler = sentinel.master_for(
            self.server.master,
            factory_class=Factory,
            dbid=self.dbid,
            poolsize=self.poolsize,
            isLazy=True,
            charset=None,
            password=self.config.password or None,
            replyTimeout=None,
            convertNumbers=False,
        )
        self._response_error = txredisapi.ResponseError

    def close(self) -> "Deferred[None]":
        sentinel = getattr(self, "_sentinel", None)
        closed = super().close()
        if sentinel is None:
            return closed
        self._sentinel = None
        return DeferredList([closed, sentinel.disconnect()], consumeErrors=True).addCallback(lambda _: None)


def _sentinel_protocol_class(txredisapi: Any) -> Any:
    """txredisapi's Sentinel protocol with rmilter's changes, and its ROLE check made to work.

    txredisapi 1.6 compares the ROLE reply with the text ``"master"``; with ``charset=None``
    (binary records must come back as bytes) the reply is ``b"master"`` and every connection
    to the master was dropped as if it were a replica.
    """
    base = _protocol_class(txredisapi.SentinelRedisProtocol)

    class RmilterSentinelProtocol(base):  # type: ignore[misc, valid-type]
        def connectionMade(self) -> Any:
            set_no_delay = getattr(self.transport, "setTcpNoDelay", None)
            if set_no_delay is not None:
                set_no_delay(True)
            if self.password is not None:
                self.auth(self.password, self.username)

            def check_role(role: Any) -> Any:
                name = role[0].decode("ascii", "replace") if isinstance(role[0], bytes) else role[0]
                if self.factory.is_master and name != "master":
                    self.transport.loseConnection()
                    return succeed(None)
                return txredisapi.RedisProtocol.connectionMade(self)

            return self.role().addCallback(check_role)

    return RmilterSentinelProtocol


def _protocol_class(base: Any) -> Any:
    """txredisapi's protocol with TCP_NODELAY and a faster encoder for bytes arguments.

    Commands of several messages follow each other on a pooled connection; with Nagle
    the second would wait for the acknowledgement of the first.  rmilter passes every
    argument as bytes already, so the RESP encoding needs no per-value conversion.
    """

    class RmilterRedisProtocol(base):  # type: ignore[misc, valid-type]
        def connectionMade(self) -> Any:
            set_no_delay = getattr(self.transport, "setTcpNoDelay", None)
            if set_no_delay is not None:
                set_no_delay(True)
            return base.connectionMade(self)

        def _build_command(self, *args: Any, **kwargs: Any) -> bytes:
            parts = [b"*%d\r\n" % len(args)]
            for arg in args:
                if not isinstance(arg, bytes):
                    arg = self._encode_value(arg)
                parts.append(b"$%d\r\n%s\r\n" % (len(arg), arg))
            return b"".join(parts)

    return RmilterRedisProtocol


ChannelMaker = Callable[[RedisServer], CommandChannel]


@dataclass
class _Link:
    """One server of a role: its channel and whether it recently failed."""

    server: RedisServer
    channel: CommandChannel
    trouble: bool = False
    wait_until: float = 0.0  # while in trouble and connected: no waiting before this time


class Deadlines:
    """Cancels the commands still unanswered at their deadline: the one deadline mechanism for Redis.

    A command's deadline is ``connect_timeout`` after it was sent, or the deadline of the
    check it belongs to: a check made of several commands (greylisting, rate limits on
    several shards) gives them all the same absolute deadline, so the whole check waits at
    most one ``connect_timeout``.  One timer for the earliest deadline (a heap), instead of a
    DelayedCall per command (``Deferred.addTimeout``), which costs more than the command itself.
    """

    def __init__(self, timeout: float, clock: Any) -> None:
        self.timeout = timeout
        self.clock = clock
        # (deadline, sequence, [the Deferred, or None once it has its result])
        self._pending: List[Tuple[float, int, List[Any]]] = []
        self._sequence = 0
        self._timer: Any = None
        self._timer_at = 0.0

    def deadline(self) -> float:
        """The deadline of a command or check that starts now."""
        return self.clock.seconds() + self.timeout

    def add(self, d: Deferred, deadline: Optional[float] = None) -> None:
        box: List[Any] = [d]

        def answered(result: Any) -> Any:
            box[0] = None
            return result

        d.addBoth(answered)
        if box[0] is None:
            return
        at = self.deadline() if deadline is None else deadline
        self._sequence += 1
        heapq.heappush(self._pending, (at, self._sequence, box))
        if self._timer is None or at < self._timer_at:
            self._arm(at)

    def _arm(self, at: float) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer_at = at
        self._timer = self.clock.callLater(max(0.0, at - self.clock.seconds()), self._expire)

    def _expire(self) -> None:
        self._timer = None
        now = self.clock.seconds()
        pending = self._pending
        while pending and (pending[0][2][0] is None or pending[0][0] <= now):
            _, _, box = heapq.heappop(pending)
            if box[0] is not None:
                box[0].cancel()  # errbacks with CancelledError (forwarded to a Deferred it waits on)
        if pending:
            self._arm(pending[0][0])

    def stop(self) -> None:
        """No more timers (the role is stopping); unanswered commands fail now."""
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        while self._pending:
            _, _, box = heapq.heappop(self._pending)
            if box[0] is not None:
                box[0].cancel()


#: the value ``_command`` gives when the server could not be used
class _Unavailable:
    def __repr__(self) -> str:
        return "UNAVAILABLE"


UNAVAILABLE = _Unavailable()


# -- a role --------------------------------------------------------------------------------------
class RedisRole:
    """One role's server list (see the module docstring): GET/SETEX/DEL/PUBLISH/EVALSHA."""

    def __init__(
        self,
        name: str,
        servers: Sequence[RedisServer],
        config: RedisConfig,
        reactor: Any,
        channel_maker: Optional[ChannelMaker] = None,
        dbid: Optional[int] = None,
    ) -> None:
        if not servers:
            raise ValueError("a Redis role needs at least one server")
        self.name = name
        self.config = config
        self.clock = reactor
        self.timeout = config.connect_timeout
        make = channel_maker or (lambda server: TxRedisChannel(server, config, reactor, dbid))
        self.upstreams: UpstreamList[RedisServer] = UpstreamList(
            list(servers),
            error_time=config.error_time,
            dead_time=config.dead_time,
            maxerrors=config.maxerrors,
            clock=reactor,
        )
        # channels are cheap objects; each opens its connections on its first command
        self._links: Dict[int, _Link] = {}
        for upstream in self.upstreams.upstreams:
            self._links[id(upstream.server)] = _Link(upstream.server, make(upstream.server))
        #: commands sent to servers (not the ones failed at once), for tests and benchmarks
        self.commands_sent = 0
        # one server: every key is on it, dead or alive (all dead = all revived, SPEC §6.6)
        self._only: Optional[RedisServer] = servers[0] if len(servers) == 1 else None
        self._deadlines = Deadlines(self.timeout, reactor)

    @property
    def sharded(self) -> bool:
        """More than one server: keys may live on different servers (group them with ``shard_of``)."""
        return self._only is None

    def __repr__(self) -> str:
        return "<RedisRole %s %s>" % (self.name, ",".join(u.server.name for u in self.upstreams.upstreams))

    # -- the commands ------------------------------------------------------------------------
    def deadline(self) -> float:
        """The deadline (on this role's clock) of a check of several commands that starts now."""
        return self._deadlines.deadline()

    def get(self, key: bytes, deadline: Optional[float] = None) -> "Deferred[Optional[bytes]]":
        """GET; a miss, an error reply or a failure is None (an empty value is a miss, SPEC §6.1)."""

        def got(reply: Any) -> Optional[bytes]:
            if isinstance(reply, bytes) and reply:
                return reply
            return None

        return self._command(self.shard_of(key), (b"GET", key), deadline=deadline).addCallback(got)

    def setex(self, key: bytes, ttl: int, value: bytes, deadline: Optional[float] = None) -> "Deferred[bool]":
        """SETEX (SET when ttl == 0); False on failure or an error reply."""
        if ttl:
            args: Tuple[bytes, ...] = (b"SETEX", key, str(int(ttl)).encode("ascii"), value)
        else:
            args = (b"SET", key, value)
        return self._command(self.shard_of(key), args, deadline=deadline).addCallback(_is_ok)

    def delete(self, key: bytes) -> "Deferred[bool]":
        """DEL (the C version sent ``DELETE``, which Redis does not know, B11)."""
        return self._command(self.shard_of(key), (b"DEL", key)).addCallback(
            lambda reply: isinstance(reply, int)
        )

    def publish(self, channel: str, payload: bytes, deadline: Optional[float] = None) -> "Deferred[Optional[int]]":
        """PUBLISH on the first live server by priority; the subscriber count, None on failure."""
        return self._command(
            self.upstreams.choose_first(), (b"PUBLISH", channel.encode("utf-8"), payload), deadline=deadline
        ).addCallback(lambda reply: reply if isinstance(reply, int) else None)

    def eval_script(
        self, script: LuaScript, keys: Sequence[bytes], args: Sequence[ScriptArg], deadline: Optional[float] = None
    ) -> "Deferred[Optional[Any]]":
        """EVALSHA (EVAL on NOSCRIPT) on the server of ``keys[0]``; the reply, None on failure.

        All ``keys`` must live on that server: group them with ``shard_of`` first.
        """
        server = self.shard_of(keys[0]) if keys else self.upstreams.choose_first()
        tail = (b"%d" % len(keys), *keys, *[a if type(a) is bytes else encode_arg(a) for a in args])

        def evaluated(reply: Any) -> Any:
            if isinstance(reply, RedisErrorReply) and str(reply).startswith("NOSCRIPT"):
                # first use of the script on this server (or after SCRIPT FLUSH / restart)
                eval_args = (b"EVAL", script.source.encode("utf-8")) + tail
                return self._command(server, eval_args, deadline=deadline).addCallback(done)
            return done(reply)

        def done(reply: Any) -> Any:
            if reply is UNAVAILABLE:
                return None
            if isinstance(reply, RedisErrorReply):
                log.error(
                    "Redis {role} server {server}: script {script} failed: {error}",
                    role=self.name, server=server.name, script=script.name, error=str(reply),
                )
                return None
            return reply

        evalsha_args = (b"EVALSHA", script.sha1.encode("ascii")) + tail
        return self._command(server, evalsha_args, keep_errors=True, deadline=deadline).addCallback(evaluated)

    def shard_of(self, key: bytes) -> Any:
        """The server ``key`` hashes to right now (for grouping keys per script call)."""
        if self._only is not None:
            return self._only
        return self.upstreams.choose_hashed(key)

    def stop(self) -> "Deferred[None]":
        self._deadlines.stop()
        closes = [link.channel.close() for link in self._links.values()]
        return DeferredList(closes, consumeErrors=True).addCallback(lambda _: None)

    # -- one command on one server ----------------------------------------------------------------
    def _command(
        self, server: RedisServer, args: Sequence[bytes], keep_errors: bool = False, deadline: Optional[float] = None
    ) -> "Deferred[Any]":
        """Send one command, bounded by ``deadline`` (default: ``connect_timeout`` from now); never fails.

        Fires with the reply, with ``UNAVAILABLE`` when the server could not be
        used, and (``keep_errors``) with a ``RedisErrorReply`` for an error reply,
        which otherwise is logged and becomes ``UNAVAILABLE``.  A command whose
        check has run out of time is not sent at all (nobody would wait for it).
        """
        if deadline is not None and deadline <= self.clock.seconds():
            return succeed(UNAVAILABLE)
        link = self._links[id(server)]
        if link.trouble and not self._worth_waiting(link):
            # failed at once (the outage was logged when it began)
            self.upstreams.failed(server)
            return succeed(UNAVAILABLE)
        self.commands_sent += 1
        try:
            d = link.channel.execute(args)
        except Exception:
            d = fail()
        self._deadlines.add(d, deadline)
        return d.addCallbacks(
            self._succeeded, self._failed, callbackArgs=(link,), errbackArgs=(link, args[0], keep_errors)
        )

    def _worth_waiting(self, link: _Link) -> bool:
        """A server in trouble is tried again once it has a connection and its pause is over."""
        ready = link.channel.ready_connections
        if ready is not None and ready <= 0:
            return False
        return self.clock.seconds() >= link.wait_until

    def _succeeded(self, reply: Any, link: _Link) -> Any:
        if link.trouble:  # only a server in trouble has errors to forget
            self.upstreams.succeeded(link.server)
            link.trouble = False
            log.info("Redis {role} server {server} is reachable again", role=self.name, server=link.server.name)
        return reply

    def _failed(self, failure: Failure, link: _Link, command: bytes, keep_errors: bool) -> Any:
        if failure.check(RedisErrorReply):
            # the server is alive; the command or the configuration is wrong
            self._succeeded(None, link)
            if keep_errors:
                return failure.value
            log.error(
                "Redis {role} server {server}: {command} failed: {error}",
                role=self.name, server=link.server.name, command=command.decode("ascii"), error=failure.getErrorMessage(),
            )
            return UNAVAILABLE
        self.upstreams.failed(link.server)
        link.wait_until = self.clock.seconds() + retry_interval(self.config)
        if not link.trouble:
            link.trouble = True
            log.warn(
                "Redis {role} server {server}: {command} failed ({error}); failing open until it answers again",
                role=self.name, server=link.server.name, command=command.decode("ascii"),
                error=_describe(failure, self.timeout),
            )
        else:
            log.debug(
                "Redis {role} server {server}: {command} failed again ({error})",
                role=self.name, server=link.server.name, command=command.decode("ascii"),
                error=_describe(failure, self.timeout),
            )
        return UNAVAILABLE


def _is_ok(reply: Any) -> bool:
    return reply == b"OK" or reply == "OK"


def _describe(failure: Failure, timeout: float) -> str:
    from twisted.internet.defer import CancelledError, TimeoutError as DeferredTimeout

    if failure.check(DeferredTimeout, CancelledError):
        return "no reply within %gs" % (timeout,)
    return "%s: %s" % (getattr(failure.type, "__name__", "error"), failure.getErrorMessage())


# -- all roles ---------------------------------------------------------------------------------
class RedisRoles:
    """The Redis roles of one runtime; a role is None when its server list is empty."""

    def __init__(
        self,
        grey: Optional[Any] = None,
        white: Optional[Any] = None,
        limits: Optional[Any] = None,
        id: Optional[Any] = None,
        spam: Optional[Any] = None,
        copy: Optional[Any] = None,
    ) -> None:
        self.grey = grey
        self.white = white
        self.limits = limits
        self.id = id
        self.spam = spam
        self.copy = copy

    def roles(self) -> List[Any]:
        """Every distinct role object (``white`` may be the ``grey`` role itself)."""
        seen: List[Any] = []
        for role in (self.grey, self.white, self.limits, self.id, self.spam, self.copy):
            if role is not None and all(role is not r for r in seen):
                seen.append(role)
        return seen

    def stop(self) -> "Deferred[None]":
        stops = [role.stop() for role in self.roles()]
        return DeferredList(stops, consumeErrors=True).addCallback(lambda _: None)


def from_config(config: Config, reactor: Any, channel_maker: Optional[ChannelMaker] = None) -> Optional[RedisRoles]:
    """The roles the configuration asks for, or None when no Redis feature is configured.

    Nothing connects here: each server's pool opens on its first command.
    """
    if not config.redis_enabled:
        return None
    r = config.redis
    lists = {
        "grey": r.servers_grey,
        "limits": r.servers_limits,
        "id": r.servers_id,
        "spam": r.servers_spam,
        "copy": r.servers_copy,
    }
    if not any(lists.values()):
        return None
    dbid = database_number(r)

    def channel(server: RedisServer) -> CommandChannel:
        kind = SentinelChannel if server.is_sentinel else TxRedisChannel
        return kind(server, r, reactor, dbid)

    maker = channel_maker or channel

    def role(name: str, servers: Sequence[RedisServer]) -> Optional[RedisRole]:
        return RedisRole(name, servers, r, reactor, maker, dbid) if servers else None

    grey = role("grey", r.servers_grey)
    white = role("white", r.servers_white) if r.servers_white else grey
    return RedisRoles(
        grey=grey,
        white=white,
        limits=role("limits", r.servers_limits),
        id=role("id", r.servers_id),
        spam=role("spam", r.servers_spam),
        copy=role("copy", r.servers_copy),
    )
