"""A private redis-server (no persistence) and a tiny blocking RESP client for assertions."""
from __future__ import annotations

import contextlib
import socket
import threading
from typing import Any, List, Optional, Sequence, Tuple, Union

from tests.harness.base import (
    ManagedProcess,
    ServiceUnavailable,
    find_program,
    free_port,
    scratch_dir,
    wait_until,
)

RespValue = Union[None, int, bytes, "RedisError", List[Any]]


class RedisError(Exception):
    """An error reply (``-ERR ...``) from Redis."""


class RespClient:
    """A blocking Redis client of a few dozen lines: enough for assertions in tests.

    ``command("SET", "k", "v")`` sends one command and returns the decoded reply: bytes for bulk
    and simple strings, int, None for nil, lists for arrays; an error reply raises RedisError.
    """

    def __init__(self, host: str, port: int, timeout: float = 5.0) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.buffer = b""

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> "RespClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def send(self, *args: Union[str, bytes, int, float]) -> None:
        parts = [b"*%d\r\n" % len(args)]
        for arg in args:
            raw = arg if isinstance(arg, bytes) else str(arg).encode("utf-8")
            parts.append(b"$%d\r\n%s\r\n" % (len(raw), raw))
        self.sock.sendall(b"".join(parts))

    def command(self, *args: Union[str, bytes, int, float]) -> Any:
        self.send(*args)
        reply = self.read_reply()
        if isinstance(reply, RedisError):
            raise reply
        return reply

    def _line(self) -> bytes:
        while b"\r\n" not in self.buffer:
            self._fill()
        line, _, self.buffer = self.buffer.partition(b"\r\n")
        return line

    def _fill(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise ConnectionError("redis closed the connection")
        self.buffer += chunk

    def read_reply(self) -> Any:
        line = self._line()
        kind, rest = line[:1], line[1:]
        if kind == b"+":
            return rest
        if kind == b"-":
            return RedisError(rest.decode("utf-8", "replace"))
        if kind == b":":
            return int(rest)
        if kind == b"$":
            length = int(rest)
            if length < 0:
                return None
            while len(self.buffer) < length + 2:
                self._fill()
            value, self.buffer = self.buffer[:length], self.buffer[length + 2 :]
            return value
        if kind == b"*":
            count = int(rest)
            if count < 0:
                return None
            return [self.read_reply() for _ in range(count)]
        raise ConnectionError("unexpected RESP line %r" % (line,))


class Subscription:
    """A SUBSCRIBE connection collecting published messages in a background thread.

    ``wait_messages(n, timeout)`` returns the first n payloads (bytes), failing the test when
    fewer arrive in time.
    """

    def __init__(self, host: str, port: int, channels: Sequence[str]) -> None:
        self.client = RespClient(host, port, timeout=None)  # type: ignore[arg-type]
        self.client.send("SUBSCRIBE", *channels)
        for _ in channels:
            self.client.read_reply()  # the subscribe confirmations
        self.messages: List[Tuple[bytes, bytes]] = []
        self.cond = threading.Condition()
        self.thread = threading.Thread(target=self._reader, daemon=True)
        self.thread.start()

    def _reader(self) -> None:
        while True:
            try:
                reply = self.client.read_reply()
            except OSError:
                return
            if isinstance(reply, list) and len(reply) == 3 and reply[0] == b"message":
                with self.cond:
                    self.messages.append((reply[1], reply[2]))
                    self.cond.notify_all()

    def wait_messages(self, count: int, timeout: float = 10.0) -> List[bytes]:
        with self.cond:
            self.cond.wait_for(lambda: len(self.messages) >= count, timeout)
            if len(self.messages) < count:
                raise AssertionError(
                    "expected %d published message(s), got %d" % (count, len(self.messages))
                )
            return [payload for _, payload in self.messages[:count]]

    def close(self) -> None:
        with contextlib.suppress(OSError):  # the server may have closed it already
            self.client.sock.shutdown(socket.SHUT_RDWR)
        self.client.close()
        self.thread.join(5.0)


class Redis:
    """A redis-server on 127.0.0.1:<free port>, no persistence, stoppable and restartable.

    ``stop()`` and ``start()`` again reuse the same port, so a running rmilter can see the
    server go away and come back.  ``address`` is ``127.0.0.1:PORT`` for rmilter's config.
    """

    host = "127.0.0.1"

    def __init__(self, port: Optional[int] = None, extra_args: Sequence[str] = ()) -> None:
        self.port = port or free_port()
        self.dir = scratch_dir("redis")
        self.extra_args = list(extra_args)
        self.process: Optional[ManagedProcess] = None

    @property
    def address(self) -> str:
        return "%s:%d" % (self.host, self.port)

    def start(self, timeout: float = 10.0) -> "Redis":
        if self.process is not None and self.process.running():
            return self
        argv = [
            find_program("redis-server"),
            "--port", str(self.port), "--bind", self.host,
            "--save", "", "--appendonly", "no", "--daemonize", "no",
            "--dir", self.dir, "--logfile", "",
        ] + self.extra_args
        self.process = ManagedProcess(argv, self.dir + "/redis.log")
        process = self.process
        wait_until(self._answers, timeout, "redis-server on port %d" % self.port,
                   lambda: process.diagnostics())
        return self

    def _answers(self) -> bool:
        if self.process is not None and not self.process.running():
            raise ServiceUnavailable("redis-server exited\n" + self.process.diagnostics())
        try:
            return self.ping()
        except OSError:
            return False

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()
            self.process = None

    def restart(self) -> "Redis":
        self.stop()
        return self.start()

    def client(self) -> RespClient:
        return RespClient(self.host, self.port)

    def command(self, *args: Union[str, bytes, int, float]) -> Any:
        """One command on a fresh connection; the decoded reply."""
        with self.client() as c:
            return c.command(*args)

    def ping(self) -> bool:
        return bool(self.command("PING") == b"PONG")

    def flushall(self) -> None:
        self.command("FLUSHALL")

    def keys(self, pattern: str = "*") -> List[bytes]:
        return sorted(self.command("KEYS", pattern))

    def get(self, key: Union[str, bytes]) -> Optional[bytes]:
        value: Optional[bytes] = self.command("GET", key)
        return value

    def ttl(self, key: Union[str, bytes]) -> int:
        value: int = self.command("TTL", key)
        return value

    def subscribe(self, *channels: str) -> Subscription:
        return Subscription(self.host, self.port, channels)


class SentinelGroup:
    """One master, one replica and three Sentinels on loopback (REAL-SERVICES §11.2).

    ``spec`` is the ``servers_*`` value rmilter takes (``sentinel:mymaster@127.0.0.1:P1,...``).
    ``start()`` returns once every Sentinel has seen the replica, so that a failover can happen;
    ``fail_over()`` kills the current master and waits until the Sentinels name the replica.
    """

    master_name = "mymaster"
    host = "127.0.0.1"

    def __init__(self) -> None:
        self.master = Redis()
        self.replica = Redis()
        self.sentinel_ports = [free_port() for _ in range(3)]
        self.dir = scratch_dir("sentinel")
        self.sentinels: List[ManagedProcess] = []

    @property
    def spec(self) -> str:
        return "sentinel:%s@%s" % (self.master_name, ",".join("%s:%d" % (self.host, p) for p in self.sentinel_ports))

    def start(self, timeout: float = 40.0) -> "SentinelGroup":
        self.master.start()
        self.replica.extra_args = ["--replicaof", self.host, str(self.master.port)]
        self.replica.start()
        for port in self.sentinel_ports:
            path = "%s/sentinel-%d.conf" % (self.dir, port)
            with open(path, "w") as f:
                f.write(
                    "port %d\nbind %s\ndir %s\nsentinel monitor %s %s %d 2\n"
                    "sentinel down-after-milliseconds %s 1000\nsentinel failover-timeout %s 3000\n"
                    % (port, self.host, self.dir, self.master_name, self.host, self.master.port,
                       self.master_name, self.master_name)
                )
            self.sentinels.append(ManagedProcess([find_program("redis-server"), path, "--sentinel"],
                                                 "%s/sentinel-%d.log" % (self.dir, port)))
        wait_until(self._replica_seen, timeout, "Sentinels to see the replica", self.diagnostics)
        return self

    def _sentinel(self, port: int, *args: str) -> Any:
        with RespClient(self.host, port) as c:
            return c.command("SENTINEL", *args)

    def _replica_seen(self) -> bool:
        for port in self.sentinel_ports:
            try:
                replicas = self._sentinel(port, "replicas", self.master_name)
            except (OSError, RedisError):
                return False
            if not replicas:
                return False
        return True

    def master_port(self) -> Optional[int]:
        """The master's port as the first answering Sentinel names it."""
        for port in self.sentinel_ports:
            try:
                reply = self._sentinel(port, "get-master-addr-by-name", self.master_name)
            except (OSError, RedisError):
                continue
            if reply:
                return int(reply[1])
        return None

    def fail_over(self, timeout: float = 30.0) -> None:
        """Kill the master; return once the Sentinels have promoted the replica."""
        self.master.stop()
        wait_until(lambda: self.master_port() == self.replica.port, timeout,
                   "the Sentinels to promote the replica", self.diagnostics)

    def diagnostics(self) -> str:
        out = []
        for process in self.sentinels:
            out.append(process.diagnostics())
        return "\n".join(out)

    def stop(self) -> None:
        for process in self.sentinels:
            process.stop()
        self.sentinels = []
        self.replica.stop()
        self.master.stop()
