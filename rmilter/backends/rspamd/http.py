"""The project's own HTTP/1.1 client for Rspamd (SPEC §6.8.1, §7.1): connections and a keep-alive pool.

Twisted's ``Agent`` (and treq on top of it) cost most of a scan's CPU: Headers
objects, URI parsing, endpoint and pool wrappers, the response Deferred chain and
``readBody`` (a scan against a canned local server, when this was written: ~450 µs of
CPU with the Agent, ~240 µs with this client, reply parsing included;
``bench/rspamd_client_bench.py`` measures it).  A scan needs none of it: the request is one head (cached request line and Host,
the SPEC §6.8.1 fields, Content-Length) written with the body, and the reply is
read by ``_HTTPConnection`` with a Content-Length, chunked or up to the close of
the connection, looking only at the status and the Compression / Connection
headers.  Rspamd 3.4's normal worker answers ``Connection: close``, so usually
every scan connects anew (``reactor.connectTCP`` / ``connectUNIX`` directly, no
endpoint wrappers); a server that keeps the connection open gets it reused (up to
``POOL_SIZE`` idle per server, none older than ``POOL_IDLE_TIMEOUT``; a pooled
connection that turns out closed before any reply byte is replaced by a new one,
once, without counting as a failure).

Everything the client sees is ``HTTPTransport``: ``exchange`` (one POST, one
reply), ``describe_failure`` and ``stop``; the retries live in the client.  The
unit tests plug in an in-memory Rspamd through the ``connector_for`` hook
(``rmilter.testing.fake_rspamd``): the same protocol code talks to a twisted.web
server over an in-memory transport.
"""
from __future__ import annotations

import ipaddress
from typing import Any, Callable, Dict, List, Optional, cast

from twisted.internet import error as net_error
from twisted.internet.defer import Deferred, TimeoutError, succeed
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.protocol import ClientFactory, Protocol, connectionDone
from twisted.python.failure import Failure

from rmilter.backends.rspamd.reply import ZSTD_MAGIC, BadReply, ScanReply, decompress_reply, parse_scan_reply
from rmilter.backends.rspamd.request import MessageBody, ScanRequest, SpoolProducer
from rmilter.backends.upstream import AttemptFailed
from rmilter.config.schema import ServerSpec

#: idle connections kept per server: well above Twisted's default of 2, so that a
#: burst of messages in flight finds warm connections instead of new handshakes
POOL_SIZE = 128
#: idle pooled connections are closed before Rspamd's own keep-alive timer can
#: close them under a request we are about to send (whole seconds: Twisted's type)
POOL_IDLE_TIMEOUT = 30


def describe_failure(failure: Failure) -> Optional[AttemptFailed]:
    """One short reason per known way an exchange fails; None for anything else (a bug)."""
    if failure.check(TimeoutError):
        return AttemptFailed("timed out")
    if failure.check(net_error.ConnectionRefusedError):
        return AttemptFailed("connection refused")
    if failure.check(net_error.TimeoutError):
        return AttemptFailed("connect timed out")
    if failure.check(net_error.ConnectError, net_error.DNSLookupError):
        return AttemptFailed("cannot connect: %s" % (failure.getErrorMessage(),))
    if failure.check(ConnectionLostEarly, net_error.ConnectionLost, net_error.ConnectionDone):
        return AttemptFailed("connection lost before the reply")
    if failure.check(ReplyCutShort):
        return AttemptFailed("reply cut short")
    if failure.check(BadReply):
        return AttemptFailed("bad reply: %s" % (failure.getErrorMessage(),))
    return None


#: ``clientConnectionFailed``); the returned callable, if any, gives up a pending connect
Connector = Callable[[ClientFactory], Optional[Callable[[], None]]]


def server_connector(reactor: Any, server: ServerSpec, connect_timeout: float) -> Connector:
    """How to reach one configured server: unix socket, IP literal (no resolver) or host name."""
    timeout = max(connect_timeout, 0.001)
    if server.path is not None:
        path = server.path

        def unix(factory: ClientFactory) -> Optional[Callable[[], None]]:
            return _stopper(reactor.connectUNIX(path, factory, timeout=timeout))

        return unix
    host = server.host or "localhost"
    port = server.port or 11333
    try:
        ipaddress.ip_address(host)
    except ValueError:
        endpoint = HostnameEndpoint(reactor, host.encode("idna"), port, timeout=timeout)

        def named(factory: ClientFactory) -> Optional[Callable[[], None]]:
            d: "Deferred[Any]" = endpoint.connect(cast(Any, factory))

            def failed(failure: Failure) -> None:
                factory.clientConnectionFailed(cast(Any, None), failure)

            d.addErrback(failed)
            return d.cancel

        return named

    def tcp(factory: ClientFactory) -> Optional[Callable[[], None]]:
        # connectTCP takes IPv6 literals too
        return _stopper(reactor.connectTCP(host, port, factory, timeout=timeout))

    return tcp


def _stopper(connector: Any) -> Callable[[], None]:
    def stop() -> None:
        try:
            connector.stopConnecting()
        except net_error.NotConnectingError:
            pass  # connected meanwhile: the factory drops the connection itself

    return stop


def _host_header(server: ServerSpec) -> bytes:
    if server.path is not None:
        return b"localhost"
    host = server.host or "localhost"
    if ":" in host:
        host = "[%s]" % (host,)
    return ("%s:%d" % (host, server.port or 11333)).encode("idna")


class _Exchange:
    """One request in flight: its bytes, where it goes, and the Deferred waiting for the reply."""

    __slots__ = ("pool", "server", "head", "body", "result", "connection", "stop_connect", "done")

    def __init__(self, pool: "HTTPTransport", server: ServerSpec, head: bytes, body: MessageBody) -> None:
        self.pool = pool
        self.server = server
        self.head = head
        self.body = body
        self.result: "Deferred[ScanReply]" = Deferred(self._cancel)
        self.connection: Optional[_HTTPConnection] = None
        self.stop_connect: Optional[Callable[[], None]] = None
        self.done = False

    def _cancel(self, _: "Deferred[ScanReply]") -> None:
        """The deadline (or the caller) gave up: drop the connection or the connect."""
        self.done = True
        connection, self.connection = self.connection, None
        if connection is not None:
            connection.abandon()
        elif self.stop_connect is not None:
            self.stop_connect()

    def succeed(self, reply: ScanReply) -> None:
        if not self.done:
            self.done = True
            self.result.callback(reply)

    def fail(self, failure: Failure) -> None:
        if not self.done:
            self.done = True
            self.result.errback(failure)


class _ConnectFactory(ClientFactory):
    """One connect attempt for one exchange (connections live on in the pool, factories do not)."""

    noisy = False

    def __init__(self, exchange: _Exchange) -> None:
        self.exchange = exchange

    def buildProtocol(self, addr: Any) -> Optional["_HTTPConnection"]:
        exchange = self.exchange
        if exchange.done:
            return None  # given up while connecting: Twisted closes the new connection
        exchange.stop_connect = None
        return _HTTPConnection(exchange.pool, exchange.server, exchange)

    def clientConnectionFailed(self, connector: Any, reason: Failure) -> None:
        self.exchange.fail(reason)


class ConnectionLostEarly(Exception):
    """The connection closed before a whole reply head arrived."""


class ReplyCutShort(Exception):
    """The connection closed before the announced reply body was complete."""


_HEAD, _LENGTH, _CHUNK_SIZE, _CHUNK_DATA, _TRAILER, _UNTIL_CLOSE = range(6)


class _HTTPConnection(Protocol):
    """HTTP/1.1 to one Rspamd server, one exchange at a time, kept for the next when allowed.

    The request goes out as the head bytes and the body (one shared buffer, or the
    spool file streamed under backpressure).  The reply is read with a Content-Length,
    chunked, or up to the close of the connection; only the status and the headers
    the scan needs (Compression, Connection) are looked at.
    """

    #: a TCP or unix transport (or an in-memory one in tests)
    transport: Any

    def __init__(self, pool: "HTTPTransport", server: ServerSpec, exchange: Optional[_Exchange]) -> None:
        self.pool = pool
        self.server = server
        self.exchange = exchange
        self.reused = False
        self.idle_since = 0.0
        self._reset()

    def _reset(self) -> None:
        self._state = _HEAD
        self._buffer = b""
        self._parts: List[bytes] = []
        self._remaining = 0
        self._status = 0
        self._compressed = False
        self._keep_alive = False
        self._received = False
        self._producer: Optional[SpoolProducer] = None

    # -- sending ---------------------------------------------------------------------------
    def connectionMade(self) -> None:
        transport: Any = self.transport
        if self.server.path is None and hasattr(transport, "setTcpNoDelay"):
            transport.setTcpNoDelay(True)  # the tail of a big body must not wait for an ACK
        exchange = self.exchange
        if exchange is not None:
            if exchange.done:
                transport.loseConnection()
                return
            self.send(exchange)

    def send(self, exchange: _Exchange) -> None:
        """Write one request; the reply may complete within this call (in-memory transports)."""
        self.exchange = exchange
        exchange.connection = self
        transport: Any = self.transport
        body = exchange.body
        if body.data is not None:
            transport.write(exchange.head)
            transport.write(body.data)
            return
        producer = self._producer = cast(SpoolProducer, body.producer())
        transport.write(exchange.head)
        transport.registerProducer(producer, True)
        producer.startProducing(transport).addCallbacks(self._sent, self._send_failed)

    def _sent(self, _: object) -> None:
        if self._producer is not None:
            self._producer = None
            self.transport.unregisterProducer()

    def _send_failed(self, failure: Failure) -> None:
        self._sent(None)
        exchange = self.exchange
        if exchange is not None:
            self.exchange = None
            exchange.connection = None
            exchange.fail(failure)
        self.transport.abortConnection()

    def abandon(self) -> None:
        """The exchange was given up: this connection is in an unknown state, close it."""
        self.exchange = None
        if self._producer is not None:
            self._producer.stopProducing()
        self.transport.abortConnection()

    # -- receiving -------------------------------------------------------------------------
    def dataReceived(self, data: bytes) -> None:
        if self.exchange is None:
            self.transport.loseConnection()  # nothing is expected now
            return
        self._received = True
        try:
            self._feed(data)
        except BadReply:
            self._finish_failed(Failure())
        except Exception as e:  # any surprise reading a reply is a failed attempt (issue 18)
            self._finish_failed(Failure(BadReply("cannot read reply: %s" % (type(e).__name__,))))

    def _feed(self, data: bytes) -> None:
        if self._state == _HEAD:
            buffer = self._buffer + data if self._buffer else data
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(buffer) > 65536:
                    raise BadReply("reply head too long")
                self._buffer = buffer
                return
            self._buffer = b""
            rest = buffer[end + 4:]
            if not self._head(buffer[:end]):
                if rest:
                    self._feed(rest)  # an interim 1xx reply: the real one follows
                return
            data = rest
            if not data and self._state != _LENGTH:
                return
        state = self._state
        if state == _LENGTH:
            remaining = self._remaining
            if len(data) < remaining:
                self._parts.append(data)
                self._remaining = remaining - len(data)
                return
            self._parts.append(data[:remaining] if len(data) > remaining else data)
            self._complete(len(data) == remaining)
        elif state == _UNTIL_CLOSE:
            self._parts.append(data)
        else:
            self._chunked(data)

    def _head(self, head: bytes) -> bool:
        """Status and the headers we use; False for an interim (1xx) reply."""
        lines = head.split(b"\r\n")
        status_line = lines[0].split(None, 2)
        if len(status_line) < 2 or not status_line[0].startswith(b"HTTP/"):
            raise BadReply("not an HTTP reply")
        try:
            status = int(status_line[1])
        except ValueError:
            raise BadReply("bad HTTP status line")
        if 100 <= status < 200:
            return False
        self._status = status
        length: Optional[int] = None
        chunked = False
        close = status_line[0] != b"HTTP/1.1"
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                try:
                    length = int(value)
                except ValueError:
                    raise BadReply("bad Content-Length")
                if length < 0:
                    raise BadReply("bad Content-Length")
            elif name == b"transfer-encoding":
                chunked = value.strip().lower().endswith(b"chunked")
            elif name == b"connection":
                token = value.strip().lower()
                if token == b"close":
                    close = True
                elif token == b"keep-alive":
                    close = False
            elif name == b"compression":
                self._compressed = value.strip().lower() == b"zstd"
        if chunked:
            self._state = _CHUNK_SIZE
        elif length is not None:
            self._state = _LENGTH
            self._remaining = length
        elif status in (204, 304):
            self._state = _LENGTH
            self._remaining = 0
        else:
            self._state = _UNTIL_CLOSE
            close = True
        self._keep_alive = not close
        return True

    def _chunked(self, data: bytes) -> None:
        buffer = self._buffer + data if self._buffer else data
        position = 0
        while True:
            state = self._state
            if state == _CHUNK_SIZE:
                end = buffer.find(b"\r\n", position)
                if end < 0:
                    break
                try:
                    size = int(buffer[position:end].split(b";", 1)[0], 16)
                except ValueError:
                    raise BadReply("bad chunk size")
                position = end + 2
                if size == 0:
                    self._state = _TRAILER
                else:
                    self._remaining = size
                    self._state = _CHUNK_DATA
            elif state == _CHUNK_DATA:
                if len(buffer) - position < self._remaining + 2:
                    break
                end = position + self._remaining
                self._parts.append(buffer[position:end])
                position = end + 2
                self._state = _CHUNK_SIZE
            else:  # trailer fields (none expected), up to an empty line
                end = buffer.find(b"\r\n", position)
                if end < 0:
                    break
                if end == position:
                    self._buffer = b""
                    self._complete(end + 2 == len(buffer))
                    return
                position = end + 2
        self._buffer = buffer[position:]

    def _complete(self, clean: bool) -> None:
        """The whole reply is here: parse it, then pool or close the connection."""
        exchange = self.exchange
        assert exchange is not None
        parts = self._parts
        body = parts[0] if len(parts) == 1 else b"".join(parts)
        status, compressed = self._status, self._compressed
        keep = self._keep_alive and clean
        producer = self._producer
        if producer is not None:  # answered before the whole body was read: stop sending it
            keep = False
            producer.stopProducing()
            self.transport.unregisterProducer()
        self.exchange = None
        exchange.connection = None
        self._reset()
        if keep:
            self.pool._idle(self)
        else:
            self.transport.loseConnection()
        try:
            if compressed or body.startswith(ZSTD_MAGIC):
                body = decompress_reply(body)
            reply = parse_scan_reply(body, status)
        except BadReply:
            exchange.fail(Failure())
            return
        except Exception as e:
            exchange.fail(Failure(BadReply("cannot read reply: %s" % (type(e).__name__,))))
            return
        exchange.succeed(reply)

    def _finish_failed(self, failure: Failure) -> None:
        exchange = self.exchange
        self.exchange = None
        if exchange is not None:
            exchange.connection = None
            exchange.fail(failure)
        self.transport.abortConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.pool._forget(self)
        if self._producer is not None:
            self._producer.stopProducing()
            self._producer = None
        exchange = self.exchange
        if exchange is None:
            return
        if self._state == _UNTIL_CLOSE:
            self._complete(False)
            return
        self.exchange = None
        exchange.connection = None
        if self._state != _HEAD:
            exchange.fail(Failure(ReplyCutShort("reply cut short")))
        elif self.reused and not self._received:
            # the server closed the idle connection as we reused it: once more, on a new one
            self.pool._connect(exchange)
        else:
            exchange.fail(Failure(ConnectionLostEarly(reason.getErrorMessage())))


class HTTPTransport:
    """POSTs scans to Rspamd servers over HTTP/1.1 and keeps the connections a server lets us keep."""

    def __init__(
        self,
        reactor: Any,
        *,
        path: str,
        deadline: float,
        connector_for: Callable[[ServerSpec], Connector],
    ) -> None:
        self.reactor = reactor
        self.path = path
        #: one bound for a whole exchange: connecting, sending, the reply head and its body
        self.deadline = deadline
        self._connector_for = connector_for
        self._connectors: Dict[ServerSpec, Connector] = {}
        self._request_lines: Dict[ServerSpec, bytes] = {}
        #: idle connections by server, the most recently used last
        self.idle: Dict[ServerSpec, List[_HTTPConnection]] = {}
        self._stopped = False

    def connector(self, server: ServerSpec) -> Connector:
        """How connections to one server are made (built on first use)."""
        connector = self._connectors.get(server)
        if connector is None:
            connector = self._connectors[server] = self._connector_for(server)
            self._request_lines[server] = b"POST %s HTTP/1.1\r\nHost: %s\r\n" % (
                self.path.encode("ascii"), _host_header(server))
        return connector

    # -- connections ------------------------------------------------------------------------
    def _connect(self, exchange: _Exchange) -> None:
        exchange.stop_connect = self.connector(exchange.server)(_ConnectFactory(exchange))

    def _idle(self, connection: _HTTPConnection) -> None:
        """A connection whose reply is complete and which the server keeps open."""
        idle = self.idle.setdefault(connection.server, [])
        if self._stopped or len(idle) >= POOL_SIZE:
            connection.transport.loseConnection()
            return
        connection.idle_since = self.reactor.seconds()
        connection.reused = True
        idle.append(connection)

    def _forget(self, connection: _HTTPConnection) -> None:
        idle = self.idle.get(connection.server)
        if idle and connection in idle:
            idle.remove(connection)

    def _pooled(self, server: ServerSpec) -> Optional[_HTTPConnection]:
        idle = self.idle.get(server)
        if not idle:
            return None
        oldest = self.reactor.seconds() - POOL_IDLE_TIMEOUT
        while idle:
            connection = idle.pop()
            if connection.idle_since >= oldest:
                return connection
            connection.transport.loseConnection()
        return None

    # -- the interface the client uses --------------------------------------------------------
    def exchange(self, server: ServerSpec, request: ScanRequest, body: MessageBody) -> "Deferred[ScanReply]":
        """One POST to one server, bounded as a whole by ``deadline``; fires with the parsed reply."""
        connector = self.connector(server)
        head = b"".join((
            self._request_lines[server],
            request.wire_headers(),
            b"Compression: zstd\r\nContent-Type: application/x-compressed\r\n" if body.compressed
            else b"Content-Type: text/plain\r\n",
            b"Content-Length: %d\r\n\r\n" % (body.length,),
        ))
        exchange = _Exchange(self, server, head, body)
        d = exchange.result
        connection = self._pooled(server)
        if connection is not None:
            connection.send(exchange)
        else:
            exchange.stop_connect = connector(_ConnectFactory(exchange))
        if not exchange.done:
            d.addTimeout(self.deadline, self.reactor)
        return d

    def describe_failure(self, failure: Failure) -> Optional[AttemptFailed]:
        """Why an exchange failed, for the retry loop (``describe_failure`` of this module)."""
        return describe_failure(failure)

    def stop(self) -> "Deferred[None]":
        """Close the idle pooled connections (idempotent); exchanges in flight end on their own."""
        self._stopped = True
        idle, self.idle = self.idle, {}
        for connections in idle.values():
            for connection in connections:
                connection.transport.loseConnection()
        return succeed(None)
