"""In-memory Redis roles for unit tests (the ``treq.testing.StubTreq`` of rmilter's Redis).

``FakeRedisRole`` has the API of ``rmilter.backends.redis.RedisRole``: every
call returns a Deferred that never fails.  Values expire against a clock
(``twisted.internet.task.Clock``), every command issued is recorded in
``server.commands``, ``server.reachable = False`` makes it behave like a dead
server (misses, ``False``, ``None``), and ``server.hang = True`` makes calls
wait ``timeout`` seconds on the clock (or until their ``deadline``, when sooner) and
then fail like a real timed-out call.  A call whose deadline has passed is not sent.
``server.subscribers`` maps a channel to its subscriber count for PUBLISH.

Lua scripts run through their Python ``reference`` rendering.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock

from rmilter.backends.redis import LuaScript, RedisRoles, ScriptArg, encode_arg


@dataclass(frozen=True)
class FakeCommand:
    """One command as a real server would have received it: ``FakeCommand("GET", (b"key",))``."""

    name: str
    args: Tuple[bytes, ...] = ()


@dataclass
class PublishedMessage:
    channel: str
    payload: bytes
    subscribers: int


class FakeRedisServer:
    """One in-memory Redis server: a keyspace with TTLs measured on ``clock``."""

    def __init__(self, clock: Optional[Clock] = None, name: str = "fake") -> None:
        self.clock = clock if clock is not None else Clock()
        self.name = name
        self.data: Dict[bytes, bytes] = {}
        self.expires: Dict[bytes, float] = {}  # absolute clock time
        self.commands: List[FakeCommand] = []
        self.published: List[PublishedMessage] = []
        self.subscribers: Dict[str, int] = {}
        self.reachable = True
        self.hang = False
        self.scripts_loaded: Dict[str, LuaScript] = {}

    # -- keyspace -----------------------------------------------------------------------------
    def _expire_key(self, key: bytes) -> None:
        deadline = self.expires.get(key)
        if deadline is not None and self.clock.seconds() >= deadline:
            del self.expires[key]
            self.data.pop(key, None)

    def get(self, key: bytes) -> Optional[bytes]:
        self._expire_key(key)
        return self.data.get(key)

    def setex(self, key: bytes, ttl: int, value: bytes) -> None:
        self.data[key] = bytes(value)
        if ttl > 0:
            self.expires[key] = self.clock.seconds() + ttl
        else:
            self.expires.pop(key, None)

    def delete(self, key: bytes) -> None:
        self.data.pop(key, None)
        self.expires.pop(key, None)

    def ttl(self, key: bytes) -> Optional[float]:
        """Seconds left like ``TTL``: None for a missing key, -1 for a key without expiry."""
        self._expire_key(key)
        if key not in self.data:
            return None
        deadline = self.expires.get(key)
        return -1 if deadline is None else deadline - self.clock.seconds()

    def keys(self) -> List[bytes]:
        for key in list(self.data):
            self._expire_key(key)
        return sorted(self.data)

    def command_names(self) -> List[str]:
        return [c.name for c in self.commands]

    def clear_log(self) -> None:
        del self.commands[:]


class FakeRedisRole:
    """A role on one fake server, with the RedisRole API."""

    def __init__(self, name: str, server: FakeRedisServer, timeout: float = 1.0) -> None:
        self.name = name
        self.server = server
        self.timeout = timeout
        self.stopped = False

    def _answer(self, command: FakeCommand, run: Any, failed_value: Any, deadline: Optional[float] = None) -> Deferred:
        now = self.server.clock.seconds()
        if deadline is not None and deadline <= now:
            return succeed(failed_value)  # the check has run out of time: nothing is sent
        self.server.commands.append(command)
        if self.server.hang:
            d: Deferred = Deferred()
            wait = self.timeout if deadline is None else min(self.timeout, deadline - now)
            self.server.clock.callLater(wait, d.callback, failed_value)
            return d
        if not self.server.reachable:
            return succeed(failed_value)
        return succeed(run())

    def get(self, key: bytes, deadline: Optional[float] = None) -> "Deferred[Optional[bytes]]":
        def run() -> Optional[bytes]:
            value = self.server.get(key)
            return value or None  # an empty value is a miss (SPEC §6.1)

        return self._answer(FakeCommand("GET", (key,)), run, None, deadline)

    def setex(self, key: bytes, ttl: int, value: bytes, deadline: Optional[float] = None) -> "Deferred[bool]":
        def run() -> bool:
            self.server.setex(key, ttl, value)
            return True

        if ttl:
            command = FakeCommand("SETEX", (key, str(ttl).encode(), value))
        else:
            command = FakeCommand("SET", (key, value))
        return self._answer(command, run, False, deadline)

    def delete(self, key: bytes) -> "Deferred[bool]":
        def run() -> bool:
            self.server.delete(key)
            return True

        return self._answer(FakeCommand("DEL", (key,)), run, False)

    def publish(self, channel: str, payload: bytes, deadline: Optional[float] = None) -> "Deferred[Optional[int]]":
        def run() -> int:
            count = self.server.subscribers.get(channel, 0)
            self.server.published.append(PublishedMessage(channel, payload, count))
            return count

        return self._answer(FakeCommand("PUBLISH", (channel.encode(), payload)), run, None, deadline)

    def eval_script(
        self, script: LuaScript, keys: Sequence[bytes], args: Sequence[ScriptArg], deadline: Optional[float] = None
    ) -> "Deferred[Optional[Any]]":
        encoded = [encode_arg(a) for a in args]

        def run() -> Any:
            if script.reference is None:
                raise NotImplementedError("script %s has no Python reference" % script.name)
            self.server.scripts_loaded[script.sha1] = script
            return script.reference(self.server, list(keys), encoded)

        command = FakeCommand(
            "EVALSHA", (script.sha1.encode(), str(len(keys)).encode()) + tuple(keys) + tuple(encoded)
        )
        return self._answer(command, run, None, deadline)

    def shard_of(self, key: bytes) -> Any:
        return self.server

    @property
    def sharded(self) -> bool:
        return False

    def stop(self) -> "Deferred[None]":
        self.stopped = True
        return succeed(None)


ROLE_NAMES = ("grey", "white", "limits", "id", "spam", "copy")


class FakeRedisRoles(RedisRoles):
    """All six roles; by default they share one server (the usual single-Redis site).

    ``FakeRedisRoles(clock, roles=("grey", "limits"))`` leaves the other roles
    None, like empty server lists; ``white`` falls back to the grey server as
    ``servers_white`` does.  ``separate=True`` gives each role its own server.
    """

    def __init__(
        self,
        clock: Optional[Clock] = None,
        roles: Sequence[str] = ROLE_NAMES,
        separate: bool = False,
        timeout: float = 1.0,
    ) -> None:
        self.clock = clock if clock is not None else Clock()
        self.server = FakeRedisServer(self.clock)
        self.servers: Dict[str, FakeRedisServer] = {}
        made: Dict[str, Optional[FakeRedisRole]] = {}
        for name in ROLE_NAMES:
            if name in roles:
                server = FakeRedisServer(self.clock, name) if separate else self.server
                self.servers[name] = server
                made[name] = FakeRedisRole(name, server, timeout)
            else:
                made[name] = None
        if made["white"] is None and made["grey"] is not None:
            made["white"] = made["grey"]
        super().__init__(**made)  # type: ignore[arg-type]

    def set_reachable(self, reachable: bool) -> None:
        """Make every fake server (un)reachable."""
        for server in {id(s): s for s in [self.server, *self.servers.values()]}.values():
            server.reachable = reachable

    def all_commands(self) -> List[FakeCommand]:
        out: List[FakeCommand] = []
        for server in {id(s): s for s in [self.server, *self.servers.values()]}.values():
            out.extend(server.commands)
        return out
