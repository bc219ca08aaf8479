"""Redis access for greylisting, rate limits, replies and pub/sub (SPEC §6.1, §6.6).

API first (others code against it); the txredisapi pool behind it follows.

Every role (``grey``, ``white``, ``limits``, ``id``, ``spam``, ``copy``) is a
``RedisRole``: a server list with SPEC §6.6 health, keys placed by the
consistent hash of ``UpstreamList.choose_hashed``.  Every call returns a
Deferred that never fails and fires within ``redis.connect_timeout``: Redis
being unreachable means fail open (SPEC §6.10), so callers only see "miss",
``False`` or ``None``.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Protocol, Sequence, Union

from twisted.internet.defer import Deferred, succeed

from rmilter.config.schema import Config

#: what a Lua script may be given as an argument (encoded as Redis bulk strings)
ScriptArg = Union[bytes, str, int, float]


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

    @property
    def sha1(self) -> str:
        return hashlib.sha1(self.source.encode("utf-8")).hexdigest()


def encode_arg(value: ScriptArg) -> bytes:
    """Arguments as Redis sees them: floats with full precision (repr), text as UTF-8."""
    if isinstance(value, bytes):
        return value
    if isinstance(value, bool):
        return b"1" if value else b"0"
    if isinstance(value, float):
        return repr(value).encode("ascii")
    if isinstance(value, int):
        return str(value).encode("ascii")
    return value.encode("utf-8")


class IRedisRole(Protocol):
    """What checks use: one role's server list (see module docstring)."""

    name: str

    def get(self, key: bytes) -> "Deferred[Optional[bytes]]":
        """GET; a miss, an error reply or a failure is None (an empty value is a miss, SPEC §6.1)."""

    def setex(self, key: bytes, ttl: int, value: bytes) -> "Deferred[bool]":
        """SETEX (SET when ttl == 0); False on failure."""

    def delete(self, key: bytes) -> "Deferred[bool]":
        """DEL (B11); False on failure."""

    def publish(self, channel: str, payload: bytes) -> "Deferred[Optional[int]]":
        """PUBLISH on the first live server by priority; the subscriber count, None on failure."""

    def eval_script(
        self, script: LuaScript, keys: Sequence[bytes], args: Sequence[ScriptArg]
    ) -> "Deferred[Optional[Any]]":
        """EVALSHA (EVAL on NOSCRIPT) on the server of ``keys[0]``; the reply, None on failure.

        All ``keys`` must live on that server: group them with ``shard_of`` first.
        """

    def shard_of(self, key: bytes) -> Any:
        """The server ``key`` hashes to right now (for grouping keys per script call)."""

    def stop(self) -> "Deferred[None]":
        """Close every connection."""


class RedisRoles:
    """The Redis roles of one runtime; a role is None when its server list is empty."""

    def __init__(
        self,
        grey: Optional[IRedisRole] = None,
        white: Optional[IRedisRole] = None,
        limits: Optional[IRedisRole] = None,
        id: Optional[IRedisRole] = None,
        spam: Optional[IRedisRole] = None,
        copy: Optional[IRedisRole] = None,
    ) -> None:
        self.grey = grey
        self.white = white
        self.limits = limits
        self.id = id
        self.spam = spam
        self.copy = copy

    def roles(self) -> Sequence[IRedisRole]:
        seen: list = []
        for role in (self.grey, self.white, self.limits, self.id, self.spam, self.copy):
            if role is not None and all(role is not r for r in seen):
                seen.append(role)
        return seen

    def stop(self) -> "Deferred[None]":
        from twisted.internet.defer import DeferredList

        stops = [role.stop() for role in self.roles()]
        return DeferredList(stops, consumeErrors=True).addCallback(lambda _: None)


def from_config(config: Config, reactor: Any) -> Optional[RedisRoles]:
    """Placeholder: the txredisapi pool lands with issue 6."""
    return None
