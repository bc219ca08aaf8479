"""Helpers shared by the greylisting, rate-limit and Redis tests: configs, messages, channels."""
from __future__ import annotations

import dataclasses
import struct
import tempfile
from typing import Any, Dict, List, Optional, Sequence, Tuple

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock

from rmilter.backends.redis import RedisRole, RedisRoles
from rmilter.config.schema import (
    Config,
    GlobalConfig,
    GreylistingConfig,
    LimitsConfig,
    RedisConfig,
    RedisServer,
)
from rmilter.context import ConnectionContext, MessageContext, Recipient
from rmilter.deps import Deps
from rmilter.spool import Spool, run_inline
from rmilter.testing.fake_redis import FakeRedisRoles

REDIS = (RedisServer("127.0.0.1", "127.0.0.1"),)
#: servers for RedisRole unit tests on ScriptedChannels; SPEC §9's placement vectors use these names
SHARDS = tuple(RedisServer("r%d" % i, "10.0.0.%d" % i) for i in range(4))

#: a fixed "now" for notes and records: 2023-11-14 22:13:20 UTC
NOW = 1700000000.25


def make_config(
    greylisting: Optional[GreylistingConfig] = None,
    limits: Optional[LimitsConfig] = None,
    redis: Optional[RedisConfig] = None,
    main: Optional[GlobalConfig] = None,
) -> Config:
    return Config(
        main=dataclasses.replace(main or GlobalConfig(), tempdir=tempfile.gettempdir()),
        redis=redis or RedisConfig(servers_grey=REDIS, servers_limits=REDIS),
        greylisting=greylisting or GreylistingConfig(),
        limits=limits or LimitsConfig(),
    )


def make_deps(config: Config, clock: Optional[Clock] = None, roles: Optional[RedisRoles] = None) -> Deps:
    """The checks' dependencies: ``config``, a Clock at ``NOW`` and the in-memory Redis (or ``roles``)."""
    if clock is None:
        clock = Clock()
        clock.advance(NOW)
    return Deps(
        config=config,
        clock=clock,
        run_blocking=run_inline,
        redis=roles if roles is not None else FakeRedisRoles(clock),
    )


def make_message(
    sender: str = "sender@example.net",
    ip: Optional[str] = "192.0.2.10",
    recipients: Sequence[str] = ("<rcpt@example.org>",),
    body: Optional[bytes] = None,
) -> MessageContext:
    """A message from ``sender`` at client ``ip`` to ``recipients``; with ``body``, its spool."""
    family = "U" if ip is None else ("6" if ":" in ip else "4")
    conn = ConnectionContext(family=family, client_address=ip, client_port=25000)
    msg = MessageContext(connection=conn)
    msg.set_sender("<%s>" % sender if sender else "<>", None)
    msg.recipients = [Recipient(r) for r in recipients]
    if body is not None:
        spool = Spool(tempfile.gettempdir(), 0o600, 1 << 20, run_inline)
        spool.set_head(b"Subject: test\n\r\n")
        spool.append(body)
        msg.spool = spool
    return msg


class ScriptedChannel:
    """A CommandChannel for RedisRole unit tests: replies from a dict, or hangs, or fails.

    ``replies`` maps the command name (``b"GET"``) to a reply or an exception;
    ``hang`` leaves every Deferred unfired; ``ready`` is what
    ``ready_connections`` reports once the first command was sent.
    """

    def __init__(self, server: RedisServer) -> None:
        self.server = server
        self.sent: List[Tuple[bytes, ...]] = []
        self.replies: Dict[bytes, Any] = {}
        self.hang = False
        self.ready = 1
        self.started = False
        self.closed = False
        self.pending: List[Deferred] = []

    @property
    def ready_connections(self) -> Optional[int]:
        return self.ready if self.started else None

    def execute(self, args: Sequence[bytes]) -> "Deferred[Any]":
        self.started = True
        self.sent.append(tuple(args))
        if self.hang:
            d: Deferred = Deferred()
            self.pending.append(d)
            return d
        reply = self.replies.get(args[0], b"OK")
        if isinstance(reply, Exception):
            return fail(reply)
        return succeed(reply)

    def close(self) -> "Deferred[None]":
        self.closed = True
        return succeed(None)


class ChannelMaker:
    """Makes one ScriptedChannel per server and remembers them by server name."""

    def __init__(self) -> None:
        self.channels: Dict[str, ScriptedChannel] = {}

    def __call__(self, server: RedisServer) -> ScriptedChannel:
        channel = ScriptedChannel(server)
        self.channels[server.name] = channel
        return channel


def scripted_role(name: str, servers: int, config: RedisConfig, clock: Clock) -> Tuple[RedisRole, ChannelMaker]:
    """A real RedisRole over ``servers`` of ``SHARDS``, each a ScriptedChannel (found by name in the maker)."""
    maker = ChannelMaker()
    return RedisRole(name, SHARDS[:servers], config, clock, maker), maker


# -- driving a running ``twistd rmilter`` -----------------------------------------------------------
def c_grey_key(prefix: str, sender: str, client_ip: str, recipients: Sequence[str]) -> bytes:
    """The C rmilter's envelope key, computed here from scratch (SPEC §6.2, B17) to read its records."""
    import base64
    import hashlib
    import socket

    if ":" in client_ip:
        block = socket.inet_pton(socket.AF_INET6, client_ip)[:8] + bytes(8)
    else:
        octets = socket.inet_aton(client_ip)
        block = bytes((octets[0], octets[1], octets[2] & 7, 0)) + bytes(12)
    data = (sender or "<>").encode() + block + b"".join(sorted(r.encode() for r in recipients))
    return prefix.encode() + base64.b64encode(hashlib.blake2b(data).digest())


def c_data_key(prefix: str, body: bytes) -> bytes:
    import base64
    import hashlib

    return prefix.encode() + base64.b64encode(hashlib.blake2b(body[:10240]).digest())


def c_time(value: Optional[bytes]) -> float:
    """A C greylist record: struct timeval (int64 seconds, int64 microseconds) on x86-64."""
    assert value is not None and len(value) == 16, value
    seconds, micros = struct.unpack("<qq", value)
    return seconds + micros / 1e6


def c_bucket(value: Optional[bytes]) -> Tuple[float, float]:
    """A C rate bucket: two doubles, last update and count."""
    assert value is not None and len(value) == 16, value
    return struct.unpack("<dd", value)  # type: ignore[return-value]


def send_message(reactor: Any, port: Optional[int], spec: Any) -> "Deferred[Any]":
    """One message on a new milter connection (CONNECT with ``spec.client``); the MessageResult."""
    assert port is not None, "rmilter listens on TCP"
    from twisted.internet.defer import inlineCallbacks
    from twisted.internet.endpoints import TCP4ClientEndpoint

    from rmilter.testing.mta import MilterClient

    @inlineCallbacks
    def run():  # type: ignore[no-untyped-def]
        client = yield MilterClient.connect(reactor, TCP4ClientEndpoint(reactor, "127.0.0.1", port))
        try:
            result = yield client.send_message(spec)
        finally:
            yield client.close()
        return result

    return run()
