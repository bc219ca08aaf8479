"""Client for Rspamd's HTTP protocol (SPEC §6.6, §6.8.1-§6.8.2, §7.1): a small HTTP/1.1 client of its own.

Twisted's ``Agent`` (and treq on top of it) cost most of a scan's CPU: Headers
objects, URI parsing, endpoint and pool wrappers, the response Deferred chain and
``readBody`` (a scan against a canned local server: ~450 µs of CPU with the Agent,
~240 µs with this client, reply parsing included).  A scan needs none of it: the
request is one head (cached request line and Host, the SPEC §6.8.1 fields,
Content-Length) written with the body, and the reply is read by ``_HTTPConnection`` with a Content-Length, chunked
or up to the close of the connection, looking only at the status and the
Compression / Connection headers.  Rspamd 3.4's normal worker answers
``Connection: close``, so usually every scan connects anew (``reactor.connectTCP``
/ ``connectUNIX`` directly, no endpoint wrappers); a server that keeps the
connection open gets it reused (up to ``POOL_SIZE`` idle per server, none older
than ``POOL_IDLE_TIMEOUT``; a pooled connection that turns out closed before any
reply byte is replaced by a new one, once, without counting as a failure).

A scan is up to ``retry_count`` attempts, each on a freshly chosen live server
(SPEC §6.6), separated by a pause that never blocks the reactor.  Every attempt
has one deadline, ``connect_timeout + results_timeout``, that covers connecting,
sending, the reply head *and* its body; the connect itself is bounded by
``connect_timeout``.  The unit tests plug in an in-memory Rspamd through the
``connector_for`` hook (``rmilter.testing.fake_rspamd``): the same protocol code
talks to a twisted.web server over an in-memory transport.

The message goes out from the spool: from the one in-memory copy when the
spool lives in memory, else streamed in chunks from the spool file; nothing is
copied again for a retry.
"""
from __future__ import annotations

import ipaddress
import json
import random
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, cast

from twisted.internet import error as net_error
from twisted.internet.defer import CancelledError, Deferred, TimeoutError, succeed
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.protocol import ClientFactory, Protocol, connectionDone
from twisted.internet.task import deferLater
from twisted.python.failure import Failure
from twisted.web.iweb import IBodyProducer
from zope.interface import implementer  # type: ignore[import-untyped]

from rmilter.log import Logger

from rmilter.backends.upstream import UpstreamList
from rmilter.config.schema import Config, ServerSpec, SpamdConfig
from rmilter.spool import BlockingRunner, Spool

log = Logger(namespace="rmilter.rspamd")

#: idle connections kept per server: well above Twisted's default of 2, so that a
#: burst of messages in flight finds warm connections instead of new handshakes
POOL_SIZE = 128
#: idle pooled connections are closed before Rspamd's own keep-alive timer can
#: close them under a request we are about to send (whole seconds: Twisted's type)
POOL_IDLE_TIMEOUT = 30
#: the spool file is streamed in pieces of this size
CHUNK_SIZE = 64 * 1024
#: compress in the thread pool from this size on (zstd level 1 is ~1 ms per MiB)
COMPRESS_INLINE_LIMIT = 256 * 1024
#: SPEC §6.8.1: the Settings header of a DKIM-only scan
DKIM_ONLY_SETTINGS = '{"groups_enabled":["dkim"]}'
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"

ACTIONS = ("reject", "soft reject", "rewrite subject", "add header", "greylist", "no action")


# -- errors -----------------------------------------------------------------------------------
class RspamdError(Exception):
    """A scan attempt could not be completed."""


class BadReply(RspamdError):
    """Rspamd answered, but not with a usable scan result (SPEC §6.8.2)."""

    def __init__(self, reason: str, status: int = 0) -> None:
        super().__init__(reason if not status else "%s (HTTP %d)" % (reason, status))
        self.status = status


class ScanFailed(RspamdError):
    """Every attempt of a scan failed; ``errors`` says why, one line per attempt."""

    def __init__(self, errors: Sequence[str]) -> None:
        super().__init__("; ".join(errors) or "no attempt made")
        self.errors = tuple(errors)


def describe_failure(failure: Failure) -> str:
    """One short line per known way an attempt fails, for logs and ``ScanFailed``."""
    if failure.check(TimeoutError, CancelledError):
        return "timed out"
    if failure.check(net_error.ConnectionRefusedError):
        return "connection refused"
    if failure.check(net_error.TimeoutError):
        return "connect timed out"
    if failure.check(net_error.ConnectError, net_error.DNSLookupError):
        return "cannot connect: %s" % (failure.getErrorMessage(),)
    if failure.check(ConnectionLostEarly, net_error.ConnectionLost, net_error.ConnectionDone):
        return "connection lost before the reply"
    if failure.check(ReplyCutShort):
        return "reply cut short"
    if failure.check(BadReply):
        return "bad reply: %s" % (failure.getErrorMessage(),)
    return "unexpected error: %s" % (failure.getErrorMessage() or failure.type.__name__,)


# -- request --------------------------------------------------------------------------------
def _wire(value: str) -> bytes:
    """Header text as bytes; CR/LF cannot survive (Twisted also folds them), NUL is dropped."""
    value = value.replace("\r", " ").replace("\n", " ").replace("\0", "")
    return value.encode("utf-8", "surrogateescape")


@dataclass(frozen=True)
class ScanRequest:
    """The SMTP context sent with the message (SPEC §6.8.1), in protocol terms."""

    queue_id: str
    recipients: Tuple[str, ...] = ()
    envelope_from: str = ""
    helo: str = ""
    hostname: str = ""
    ip: Optional[str] = None
    user: Optional[str] = None
    settings_id: Optional[str] = None
    mta_tag: Optional[str] = None
    #: raw JSON for the ``Settings`` header (DKIM-only scans)
    settings: Optional[str] = None
    pass_all: bool = False
    #: the message tag, for log lines only (never sent)
    tag: str = ""

    def header_lines(self) -> List[Tuple[bytes, bytes]]:
        """Header fields in SPEC §6.8.1 order, each only when it has a value."""
        lines: List[Tuple[bytes, bytes]] = [(b"Rcpt", _wire(r)) for r in self.recipients if r]
        if self.envelope_from:
            lines.append((b"From", _wire(self.envelope_from)))
        if self.helo:
            lines.append((b"Helo", _wire(self.helo)))
        if self.hostname and self.hostname != "unknown":
            lines.append((b"Hostname", _wire(self.hostname)))
        if self.ip:
            lines.append((b"IP", _wire(self.ip)))
        if self.user:
            lines.append((b"User", _wire(self.user)))
        lines.append((b"Queue-Id", _wire(self.queue_id)))
        if self.settings_id:
            lines.append((b"Settings-ID", _wire(self.settings_id)))
        if self.mta_tag:
            lines.append((b"MTA-Tag", _wire(self.mta_tag)))
        if self.settings:
            lines.append((b"Settings", _wire(self.settings)))
        if self.pass_all:
            lines.append((b"Pass", b"all"))
        return lines

    def wire_headers(self) -> bytes:
        """``header_lines`` as they go on the wire."""
        return b"".join([b"%s: %s\r\n" % line for line in self.header_lines()])


# -- the message body -----------------------------------------------------------------------
@implementer(IBodyProducer)
class BytesProducer:
    """The whole message from one buffer that every attempt shares (no copy per attempt)."""

    def __init__(self, data: bytes) -> None:
        self._data = data
        self.length = len(data)

    def startProducing(self, consumer: Any) -> "Deferred[None]":
        consumer.write(self._data)
        return succeed(None)

    def pauseProducing(self) -> None:
        """Everything was written at once; the transport buffers it."""

    def resumeProducing(self) -> None:
        """Nothing left to produce."""

    def stopProducing(self) -> None:
        """Nothing left to stop."""


@implementer(IBodyProducer)
class SpoolProducer:
    """Streams a spool that lives in a file, ``CHUNK_SIZE`` bytes per read.

    Reads go through the spool (a thread pool for the file part), one at a time,
    and stop while the transport asks us to pause, so memory stays bounded by one
    chunk however large the message is.
    """

    def __init__(self, spool: Spool, chunk_size: Optional[int] = None) -> None:
        self._spool = spool
        self._chunk_size = chunk_size or CHUNK_SIZE
        self.length = spool.size
        self._offset = 0
        self._paused = False
        self._stopped = False
        self._reading = False
        self._consumer: Any = None
        self._done: Optional["Deferred[None]"] = None

    def startProducing(self, consumer: Any) -> "Deferred[None]":
        self._consumer = consumer
        self._done = Deferred()
        self._next()
        return self._done

    def _next(self) -> None:
        if self._stopped or self._paused or self._reading or self._done is None or self._done.called:
            return
        if self._offset >= self.length:
            self._done.callback(None)
            return
        self._reading = True
        want = min(self._chunk_size, self.length - self._offset)
        self._spool.read(self._offset, want).addCallbacks(self._got, self._failed)

    def _got(self, data: bytes) -> None:
        self._reading = False
        if self._stopped:
            return
        if not data:
            self._failed(Failure(RspamdError("spool ended %d bytes early" % (self.length - self._offset,))))
            return
        self._offset += len(data)
        assert self._consumer is not None
        self._consumer.write(data)
        self._next()

    def _failed(self, failure: Failure) -> None:
        self._reading = False
        if self._done is not None and not self._done.called and not self._stopped:
            self._done.errback(failure)

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        self._next()

    def stopProducing(self) -> None:
        """The request was given up (deadline, lost connection): read nothing more."""
        self._stopped = True


@dataclass(frozen=True)
class MessageBody:
    """What one scan sends: shared bytes, or a spool file streamed per attempt."""

    data: Optional[bytes] = None
    spool: Optional[Spool] = None
    compressed: bool = False

    @property
    def length(self) -> int:
        if self.data is not None:
            return len(self.data)
        assert self.spool is not None
        return self.spool.size

    def producer(self) -> IBodyProducer:
        if self.data is not None:
            return cast(IBodyProducer, BytesProducer(self.data))
        assert self.spool is not None
        return cast(IBodyProducer, SpoolProducer(self.spool))

    def read_all(self) -> "Deferred[bytes]":
        """The bytes as sent (for diff files)."""
        if self.data is not None:
            return succeed(self.data)
        assert self.spool is not None
        return self.spool.read_all()


def _zstd_compress(data: bytes) -> bytes:
    import zstandard

    # level 1 as C rmilter (SPEC §6.8.1); a compressor per call: they are not thread-safe
    return zstandard.ZstdCompressor(level=1).compress(data)


def prepare_body(spool: Spool, compression: bool, run_blocking: BlockingRunner) -> "Deferred[MessageBody]":
    """The body of every attempt of one message, made once (SPEC §6.8.1).

    In memory: one ``bytes`` copy shared by all attempts.  In a file: streamed.
    With ``compression``: the whole spool compressed once (zstd level 1), big
    messages in the thread pool.
    """
    data = spool.memory_bytes()
    if not compression:
        if data is not None:
            return succeed(MessageBody(data=data))
        return succeed(MessageBody(spool=spool))

    def compress(raw: bytes) -> "Deferred[MessageBody]":
        if len(raw) < COMPRESS_INLINE_LIMIT:
            return succeed(MessageBody(data=_zstd_compress(raw), compressed=True))
        return run_blocking(_zstd_compress, raw).addCallback(lambda c: MessageBody(data=c, compressed=True))

    if data is not None:
        return compress(data)
    return spool.read_all().addCallback(compress)


# -- the reply ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Symbol:
    name: str
    score: float
    options: Tuple[str, ...] = ()


@dataclass(frozen=True)
class HeaderAddition:
    """A header Rspamd wants added: appended, or inserted at ``order`` (SPEC §6.8.5)."""

    name: str
    value: str
    order: Optional[int] = None


@dataclass(frozen=True)
class ScanReply:
    """A parsed reply, the same for the legacy and the /checkv2 shape (SPEC §6.8.2)."""

    action: str = "no action"
    score: float = 0.0
    required_score: float = 0.0
    subject: Optional[str] = None
    symbols: Tuple[Symbol, ...] = ()
    message_id: Optional[str] = None
    smtp_message: Optional[str] = None
    dkim_signatures: Tuple[str, ...] = ()
    #: "milter" (checkv2), "rmilter" (legacy) or None: which header block was given
    header_block: Optional[str] = None
    remove_headers: Tuple[Tuple[str, int], ...] = ()
    add_headers: Tuple[HeaderAddition, ...] = ()
    change_from: Optional[str] = None
    add_rcpt: Tuple[str, ...] = ()
    del_rcpt: Tuple[str, ...] = ()
    #: milter.reject: "discard" or "quarantine" instead of rejecting
    reject_mode: Optional[str] = None
    #: milter.no_action: do not apply the action
    no_action: bool = False
    #: milter.spam_header for "add header": (name or None for the configured one, value)
    spam_headers: Tuple[Tuple[Optional[str], str], ...] = ()
    #: the action as Rspamd wrote it when it is not one of ACTIONS (logged)
    unknown_action: Optional[str] = None

    def has_symbol(self, name: str) -> bool:
        """SPEC §6.8.7: symbol names compared up to a ``(``."""
        return any(s.name.split("(", 1)[0] == name for s in self.symbols)


class _JsonObject(dict):  # type: ignore[type-arg]
    """A JSON object that also remembers repeated keys (UCL allows them, SPEC §6.8.5)."""

    __slots__ = ("pairs",)

    def __init__(self, pairs: List[Tuple[str, Any]]) -> None:
        super().__init__(pairs)
        self.pairs = pairs


def _json_object(pairs: List[Tuple[str, Any]]) -> Dict[str, Any]:
    """A plain dict, unless a key repeats: then the pairs are kept too."""
    obj = dict(pairs)
    if len(obj) != len(pairs):
        return _JsonObject(pairs)
    return obj


def _number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return 0.0
    try:
        return float(value)
    except OverflowError:  # an integer beyond any double
        return 0.0


def _string(value: Any) -> Optional[str]:
    return value if isinstance(value, str) else None


def _integer(value: Any) -> Optional[int]:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return None


def _symbols(obj: Any) -> Tuple[Symbol, ...]:
    """Every ``{name: {"score":.., "options": [..]}}`` entry of ``obj`` (others are skipped)."""
    out: List[Symbol] = []
    append = out.append
    for name, value in _pairs(obj):
        if not isinstance(value, dict):
            continue
        options = value.get("options")
        opts: Tuple[str, ...] = ()
        if options and isinstance(options, list):
            opts = tuple([o for o in options if isinstance(o, str)])
        given = value.get("name")
        score = value.get("score")
        append(Symbol(given if given and isinstance(given, str) else name,
                      score if type(score) is float else _number(score), opts))
    return tuple(out)


def _strings(value: Any) -> Tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list):
        return tuple(v for v in value if isinstance(v, str))
    return ()


def _pairs(obj: Any) -> List[Tuple[str, Any]]:
    if isinstance(obj, _JsonObject):
        return obj.pairs
    if isinstance(obj, dict):
        return list(obj.items())
    return []


def _header_additions(block: Any) -> Tuple[HeaderAddition, ...]:
    """add_headers: ``{name: "v"}``, ``{name: ["v", ...]}``, ``{name: {"value":.., "order":..}}``."""
    out: List[HeaderAddition] = []

    def one(name: str, item: Any) -> None:
        if isinstance(item, str):
            out.append(HeaderAddition(name, item))
        elif isinstance(item, dict):
            value = item.get("value")
            if isinstance(value, str):
                order = item.get("order", item.get("index"))
                out.append(HeaderAddition(name, value, _integer(order)))

    for name, item in _pairs(block):
        if isinstance(item, list):
            for element in item:
                one(name, element)
        else:
            one(name, item)
    return tuple(out)


def parse_reply(body: bytes, status: int = 200) -> ScanReply:
    """Both reply shapes (SPEC §6.8.2); raises ``BadReply`` when there is no scan result.

    The HTTP status only matters when the body is not a scan result.
    """
    try:
        top = json.loads(body.decode("utf-8", "replace"), object_pairs_hook=_json_object)
    except ValueError as e:
        raise BadReply("unparsable reply: %s" % (e,), status if status != 200 else 0)
    if not isinstance(top, dict):
        raise BadReply("reply is not an object", status if status != 200 else 0)
    metric = top.get("default")
    if isinstance(metric, dict):
        # legacy /symbols shape: everything about the scan inside "default"
        fields: Dict[str, Any] = metric
        symbols = _symbols(metric)
        block_name = "rmilter"
    elif "action" in top or "score" in top or isinstance(top.get("symbols"), dict):
        fields = top
        symbols = _symbols(top.get("symbols"))
        block_name = "milter"
    else:
        error = _string(top.get("error"))
        raise BadReply("no scan result" + (": %s" % error if error else ""), status if status != 200 else 0)

    action_text = _string(fields.get("action"))
    unknown = None
    if action_text is None or action_text not in ACTIONS:
        unknown = action_text if action_text is not None else ""
        action_text = "no action"
    messages = top.get("messages")
    smtp_message = _string(messages.get("smtp_message")) if isinstance(messages, dict) else None

    block = top.get("milter")
    if isinstance(block, dict):
        block_name = "milter"
    else:
        block = top.get("rmilter")
        if isinstance(block, dict):
            block_name = "rmilter"
        else:
            block, block_name = None, None  # type: ignore[assignment]

    remove: List[Tuple[str, int]] = []
    additions: Tuple[HeaderAddition, ...] = ()
    change_from = None
    add_rcpt: Tuple[str, ...] = ()
    del_rcpt: Tuple[str, ...] = ()
    reject_mode = None
    no_action = False
    spam_headers: List[Tuple[Optional[str], str]] = []
    if block is not None:
        for name, index in _pairs(block.get("remove_headers")):
            n = _integer(index)
            if n is not None:
                remove.append((name, n))
        additions = _header_additions(block.get("add_headers"))
        change_from = _string(block.get("change_from"))
        add_rcpt = _strings(block.get("add_rcpt"))
        del_rcpt = _strings(block.get("del_rcpt"))
        reject = _string(block.get("reject"))
        if reject in ("discard", "quarantine"):
            reject_mode = reject
        no_action = block.get("no_action") is True
        spam_header = block.get("spam_header")
        if isinstance(spam_header, str):
            spam_headers.append((None, spam_header))
        else:
            spam_headers.extend((k, v) for k, v in _pairs(spam_header) if isinstance(v, str))

    return ScanReply(
        action=action_text,
        score=_number(fields.get("score")),
        required_score=_number(fields.get("required_score")),
        subject=_string(fields.get("subject")),
        symbols=symbols,
        message_id=_string(top.get("message-id")),
        smtp_message=smtp_message,
        dkim_signatures=_strings(top.get("dkim-signature")),
        header_block=block_name,
        remove_headers=tuple(remove),
        add_headers=additions,
        change_from=change_from,
        add_rcpt=add_rcpt,
        del_rcpt=del_rcpt,
        reject_mode=reject_mode,
        no_action=no_action,
        spam_headers=tuple(spam_headers),
        unknown_action=unknown,
    )


def decompress_reply(body: bytes) -> bytes:
    """A zstd reply (``Compression: zstd`` requests, SPEC §6.8.2) as plain bytes."""
    import zstandard

    try:
        return zstandard.ZstdDecompressor().decompressobj().decompress(body)
    except zstandard.ZstdError as e:
        raise BadReply("cannot decompress reply: %s" % (e,))


# -- the client -----------------------------------------------------------------------------
@dataclass(frozen=True)
class ScanResult:
    """A successful scan: the reply, the server that gave it, the time spent (retries included)."""

    reply: ScanReply
    server: ServerSpec
    elapsed: float
    attempts: int = 1


#: starts one connection to a server; the factory hears how it went (``buildProtocol`` or
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

    __slots__ = ("client", "server", "head", "body", "result", "connection", "stop_connect", "done")

    def __init__(self, client: "RspamdClient", server: ServerSpec, head: bytes, body: MessageBody) -> None:
        self.client = client
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
        return _HTTPConnection(exchange.client, exchange.server, exchange)

    def clientConnectionFailed(self, connector: Any, reason: Failure) -> None:
        self.exchange.fail(reason)


class ConnectionLostEarly(RspamdError):
    """The connection closed before a whole reply head arrived."""


class ReplyCutShort(RspamdError):
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

    def __init__(self, client: "RspamdClient", server: ServerSpec, exchange: Optional[_Exchange]) -> None:
        self.client = client
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
        except RspamdError:
            self._finish_failed(Failure())

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
            self.client._idle(self)
        else:
            self.transport.loseConnection()
        try:
            if compressed or body.startswith(ZSTD_MAGIC):
                body = decompress_reply(body)
            reply = parse_reply(body, status)
        except BadReply:
            exchange.fail(Failure())
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
        self.client._forget(self)
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
            self.client._connect(exchange)
        else:
            exchange.fail(Failure(ConnectionLostEarly(reason.getErrorMessage())))


class RspamdClient:
    """Scans messages on the configured servers with failover and retries (SPEC §6.6)."""

    def __init__(
        self,
        config: SpamdConfig,
        reactor: Any,
        *,
        connector_for: Optional[Callable[[ServerSpec], Connector]] = None,
        rng: Optional[random.Random] = None,
    ) -> None:
        self.config = config
        self.reactor = reactor
        self._rng = rng or random.Random()
        self._connector_for = connector_for or (
            lambda server: server_connector(reactor, server, config.connect_timeout))
        self.upstreams: UpstreamList[ServerSpec] = self._upstream_list(config.servers)
        self.also_check: Optional[UpstreamList[ServerSpec]] = (
            self._upstream_list(config.also_check) if config.also_check else None
        )
        self._connectors: Dict[ServerSpec, Connector] = {}
        self._request_lines: Dict[ServerSpec, bytes] = {}
        #: idle connections by server, the most recently used last
        self.idle: Dict[ServerSpec, List[_HTTPConnection]] = {}
        self.path = "/symbols" if config.protocol == "legacy" else "/checkv2"
        self.deadline = config.connect_timeout + config.results_timeout
        self._stopped = False

    def _upstream_list(self, servers: Sequence[ServerSpec]) -> UpstreamList[ServerSpec]:
        c = self.config
        return UpstreamList(
            list(servers),
            error_time=c.error_time,
            dead_time=c.dead_time,
            maxerrors=max(1, c.maxerrors),
            clock=self.reactor,
            priorities=[s.priority for s in servers],
            rng=self._rng,
        )

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

    # -- one attempt ---------------------------------------------------------------------
    def exchange(self, server: ServerSpec, request: ScanRequest, body: MessageBody) -> "Deferred[ScanReply]":
        """One POST to one server, bounded as a whole by ``connect_timeout + results_timeout``."""
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

    # -- a scan with retries -------------------------------------------------------------
    def scan(self, request: ScanRequest, body: MessageBody) -> "Deferred[ScanResult]":
        """Up to ``retry_count`` attempts; fails with ``ScanFailed`` when none worked."""
        return self._scan(self.upstreams, request, body, max(1, self.config.retry_count), "rspamd")

    def scan_also(self, request: ScanRequest, body: MessageBody) -> Optional["Deferred[ScanResult]"]:
        """The ``also_check`` comparison scan: one attempt, or None without such servers."""
        if self.also_check is None:
            return None
        return self._scan(self.also_check, request, body, 1, "rspamd also_check")

    def _scan(
        self,
        upstreams: UpstreamList[ServerSpec],
        request: ScanRequest,
        body: MessageBody,
        attempts: int,
        what: str,
    ) -> "Deferred[ScanResult]":
        clock = self.reactor
        started = clock.seconds()
        tried: List[ServerSpec] = []
        errors: List[str] = []

        def attempt(n: int) -> "Deferred[ScanResult]":
            server = upstreams.choose_random(exclude=tried)
            tried.append(server)
            d = self.exchange(server, request, body)

            def succeeded(reply: ScanReply) -> ScanResult:
                upstreams.succeeded(server)
                return ScanResult(reply, server, clock.seconds() - started, n)

            def failed(failure: Failure) -> "Deferred[ScanResult]":
                upstreams.failed(server)
                reason = describe_failure(failure)
                if reason.startswith("unexpected"):
                    log.failure("{tag}; {what}: unexpected error on {server}", failure,
                                tag=request.tag, what=what, server=server.name)
                errors.append("%s: %s" % (server.name, reason))
                if n >= attempts:
                    log.warn("{tag}; {what}: scan failed on {server} ({reason}), retry limit exceeded",
                             tag=request.tag, what=what, server=server.name, reason=reason)
                    raise ScanFailed(errors)
                log.warn("{tag}; {what}: scan failed on {server} ({reason}), retry {n}/{total}",
                         tag=request.tag, what=what, server=server.name, reason=reason, n=n, total=attempts - 1)
                retry: "Deferred[ScanResult]" = deferLater(clock, self.config.retry_timeout, cast(Any, attempt), n + 1)
                return retry

            return d.addCallbacks(succeeded, failed)

        return attempt(1)

    def stop(self) -> "Deferred[None]":
        """Close the idle pooled connections (idempotent); requests in flight end on their own."""
        self._stopped = True
        idle, self.idle = self.idle, {}
        for connections in idle.values():
            for connection in connections:
                connection.transport.loseConnection()
        return succeed(None)


def from_config(config: Config, reactor: Any) -> Optional[RspamdClient]:
    """The rspamd client of a configuration, or None when no spamd servers are configured."""
    if not config.spamd.servers:
        return None
    return RspamdClient(config.spamd, reactor)
