"""An in-memory Rspamd for unit tests: a twisted.web resource behind an in-memory connection.

``FakeRspamd`` records every request it gets (method, path, header lines in
arrival order, body - decompressed when the client used ``Compression: zstd``)
and answers with configured replies: a JSON document, any bytes with any HTTP
status, "never answer" (to exercise deadlines) or "connection refused".  Its
``endpoint()`` is what ``RspamdClient(endpoint_for=...)`` connects through: the
client's real treq/Agent HTTP protocol gets an in-memory transport whose other end is a
twisted.web ``Site`` serving the fake, so the client code runs unchanged; no
socket and no reactor are involved.  Like Rspamd 3.4's normal worker, the fake
closes the connection after every reply unless ``keep_alive`` is set.

Typical use::

    fakes = FakeRspamdCluster({"r1": FakeRspamd(), "r2": FakeRspamd()})
    fakes["r1"].answer(checkv2_reply(action="reject", smtp_message="Gtube pattern"))
    fakes["r2"].refuse()
    client = RspamdClient(config.spamd, clock, endpoint_for=fakes.endpoint_for)
"""
from __future__ import annotations

import json
from collections import deque
from dataclasses import dataclass
from typing import Any, Deque, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union, cast

from twisted.internet import error as net_error
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.protocol import ClientFactory
from twisted.internet.testing import MemoryReactorClock
from twisted.test import iosim
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from rmilter.config.schema import ServerSpec


@dataclass(frozen=True)
class RecordedRequest:
    """One request as the fake Rspamd received it."""

    method: str
    path: str
    #: (lower-case name, value) in arrival order, repeated names kept
    headers: Tuple[Tuple[str, str], ...]
    body: bytes
    #: the body as sent on the wire (differs from ``body`` when compressed)
    raw_body: bytes = b""

    def header(self, name: str) -> Optional[str]:
        values = self.header_values(name)
        return values[0] if values else None

    def header_values(self, name: str) -> List[str]:
        lname = name.lower()
        return [v for n, v in self.headers if n == lname]

    @property
    def header_names(self) -> List[str]:
        """Names in arrival order, each once."""
        return list(dict.fromkeys(n for n, _ in self.headers))


@dataclass(frozen=True)
class FakeReply:
    """What the fake does with one request."""

    body: bytes = b""
    code: int = 200
    headers: Tuple[Tuple[str, str], ...] = (("Content-Type", "application/json"),)
    #: never answer (until ``FakeRspamd.release``)
    hang: bool = False
    #: refuse the connection: the request never reaches the resource
    refuse: bool = False
    #: send the headers and this much of the body, then stall
    partial: Optional[int] = None
    #: send the body chunked (no Content-Length)
    chunked: bool = False


REFUSE = FakeReply(refuse=True)
HANG = FakeReply(hang=True)


def json_reply(document: Any, code: int = 200) -> FakeReply:
    return FakeReply(json.dumps(document).encode("utf-8"), code)


def _symbol_map(symbols: Union[None, Mapping[str, Any], Sequence[Tuple[str, float, Sequence[str]]]]) -> Dict[str, Any]:
    """Symbols given as ``{name: score}``, ``{name: (score, [options])}`` or triples."""
    out: Dict[str, Any] = {}
    if symbols is None:
        return out
    items: Iterable[Tuple[str, Any]]
    if isinstance(symbols, Mapping):
        items = symbols.items()
    else:
        items = ((name, (score, options)) for name, score, options in symbols)
    for name, spec in items:
        if isinstance(spec, (int, float)):
            score, options = float(spec), []
        else:
            score, options = float(spec[0]), list(spec[1])
        entry: Dict[str, Any] = {"name": name, "score": score, "metric_score": score}
        if options:
            entry["options"] = options
        out[name] = entry
    return out


def checkv2_reply(
    action: str = "no action",
    score: float = 0.0,
    required_score: float = 15.0,
    symbols: Any = None,
    subject: Optional[str] = None,
    smtp_message: Optional[str] = None,
    message_id: Optional[str] = None,
    dkim_signature: Union[None, str, List[str]] = None,
    milter: Optional[Mapping[str, Any]] = None,
    **extra: Any,
) -> Dict[str, Any]:
    """A /checkv2 reply document as Rspamd 3.x writes it (SPEC §6.8.2)."""
    doc: Dict[str, Any] = {
        "is_skipped": False,
        "score": score,
        "required_score": required_score,
        "action": action,
        "symbols": _symbol_map(symbols),
        "messages": {},
        "time_real": 0.01,
    }
    if subject is not None:
        doc["subject"] = subject
    if smtp_message is not None:
        doc["messages"]["smtp_message"] = smtp_message
    if message_id is not None:
        doc["message-id"] = message_id
    if dkim_signature is not None:
        doc["dkim-signature"] = dkim_signature
    if milter is not None:
        doc["milter"] = dict(milter)
    doc.update(extra)
    return doc


def legacy_reply(
    action: str = "no action",
    score: float = 0.0,
    required_score: float = 15.0,
    symbols: Any = None,
    subject: Optional[str] = None,
    smtp_message: Optional[str] = None,
    message_id: Optional[str] = None,
    dkim_signature: Optional[str] = None,
    rmilter: Optional[Mapping[str, Any]] = None,
) -> Dict[str, Any]:
    """A /symbols (v1) reply: the scan inside ``default``, changes in ``rmilter``."""
    metric: Dict[str, Any] = {
        "is_spam": score > required_score,
        "is_skipped": False,
        "score": score,
        "required_score": required_score,
        "action": action,
    }
    if subject is not None:
        metric["subject"] = subject
    metric.update(_symbol_map(symbols))
    doc: Dict[str, Any] = {"default": metric}
    if smtp_message is not None:
        doc["messages"] = {"smtp_message": smtp_message}
    if message_id is not None:
        doc["message-id"] = message_id
    if dkim_signature is not None:
        doc["dkim-signature"] = dkim_signature
    if rmilter is not None:
        doc["rmilter"] = dict(rmilter)
    return doc


def _zstd(data: bytes, compress: bool) -> bytes:
    import zstandard

    if compress:
        return zstandard.ZstdCompressor(level=1).compress(data)
    return zstandard.ZstdDecompressor().decompressobj().decompress(data)


class FakeRspamd(Resource):
    """An Rspamd normal worker in memory; every path answers like /checkv2 or /symbols."""

    isLeaf = True

    def __init__(self, reply: Union[None, FakeReply, Mapping[str, Any]] = None, clock: Any = None) -> None:
        super().__init__()
        #: the client's clock: what the client writes is delivered from a call on it (never inside
        #: the client's own write, which a real socket never does either); None: at once
        self.clock = clock
        self._flush_call: Any = None
        self.requests: List[RecordedRequest] = []
        self._default: FakeReply = self._as_reply(reply if reply is not None else checkv2_reply())
        self._queue: Deque[FakeReply] = deque()
        self._down = False
        #: requests left waiting by a ``hang`` or ``partial`` reply
        self.pending: List[Request] = []
        #: compress replies to requests that came compressed (what Rspamd does)
        self.compress_replies = True
        #: connections refused so far, and connections made
        self.refused = 0
        self.connections = 0
        #: keep the connection open after a reply (Rspamd 3.4 closes it)
        self.keep_alive = False
        self._reactor = MemoryReactorClock()
        self._site = Site(self, reactor=self._reactor)
        self._pumps: List[iosim.IOPump] = []
        self._pumping = False

    @staticmethod
    def _as_reply(reply: Union[FakeReply, Mapping[str, Any]]) -> FakeReply:
        return reply if isinstance(reply, FakeReply) else json_reply(reply)

    # -- configuring ---------------------------------------------------------------------------
    def answer(self, reply: Union[FakeReply, Mapping[str, Any]]) -> None:
        """The reply for every request from now on (after any queued ones)."""
        self._default = self._as_reply(reply)

    def answer_next(self, *replies: Union[FakeReply, Mapping[str, Any]]) -> None:
        """Replies for the next requests, in order; then the default again."""
        self._queue.extend(self._as_reply(r) for r in replies)

    def refuse(self, down: bool = True) -> None:
        """Refuse every connection (a stopped Rspamd) until ``refuse(False)``."""
        self._down = down

    @property
    def down(self) -> bool:
        return self._down

    def _next_reply(self) -> FakeReply:
        return self._queue.popleft() if self._queue else self._default

    def _refuses_next(self) -> bool:
        """Whether the next connection is refused (consuming a queued REFUSE)."""
        if self._down:
            return True
        if self._queue:
            if self._queue[0].refuse:
                self._queue.popleft()
                return True
            return False
        return self._default.refuse

    # -- the HTTP side -------------------------------------------------------------------------
    def render(self, request: Request) -> Union[bytes, int]:
        raw = request.content.read() if request.content is not None else b""
        headers = tuple(
            (name.decode("latin-1").lower(), value.decode("utf-8", "surrogateescape"))
            for name, values in request.requestHeaders.getAllRawHeaders()
            for value in values
        )
        compressed = any(n == "compression" and v.strip().lower() == "zstd" for n, v in headers)
        body = _zstd(raw, False) if compressed else raw
        self.requests.append(RecordedRequest(
            method=request.method.decode("ascii"),
            path=request.path.decode("utf-8", "replace"),
            headers=headers,
            body=body,
            raw_body=raw,
        ))
        reply = self._next_reply()
        if reply.refuse:
            raise AssertionError("a refused connection reached the resource")
        if reply.hang:
            self.pending.append(request)
            return NOT_DONE_YET
        request.setResponseCode(reply.code)
        for name, value in reply.headers:
            request.setHeader(name, value)
        payload = reply.body
        if compressed and self.compress_replies:
            payload = _zstd(payload, True)
            request.setHeader("Compression", "zstd")
        if reply.partial is not None:
            request.setHeader("Content-Length", str(len(payload)))
            request.write(payload[: reply.partial])
            self.pending.append(request)
            return NOT_DONE_YET
        self._finish(request, payload, reply.chunked)
        return NOT_DONE_YET

    def _finish(self, request: Request, payload: bytes, chunked: bool = False) -> None:
        """Write the whole reply; then close the connection unless ``keep_alive``."""
        if not chunked:
            request.setHeader("Content-Length", str(len(payload)))
        if not self.keep_alive:
            request.setHeader("Connection", "close")
        transport: Any = request.transport
        if chunked and payload:
            middle = len(payload) // 2
            request.write(payload[:middle])
            request.write(payload[middle:])
        elif payload:
            request.write(payload)
        if not request._disconnected:  # the client may have read the whole reply and closed already
            request.finish()
        if not self.keep_alive and transport is not None:
            transport.loseConnection()

    def release(self, reply: Union[None, FakeReply, Mapping[str, Any]] = None) -> None:
        """Answer every hung request with ``reply`` (default: the default reply)."""
        answer = self._as_reply(reply) if reply is not None else self._default
        pending, self.pending = self.pending, []
        for request in pending:
            if request.finished or request._disconnected:
                continue
            request.setResponseCode(answer.code)
            for name, value in answer.headers:
                request.setHeader(name, value)
            if request.responseHeaders.hasHeader(b"content-length"):  # a partial reply: the rest
                request.write(answer.body)
                if not request._disconnected:
                    request.finish()
            else:
                self._finish(request, answer.body, answer.chunked)
        self.flush()

    # -- the client side -----------------------------------------------------------------------
    def endpoint(self) -> "FakeEndpoint":
        """An endpoint whose connections reach this fake (refused when it is down)."""
        return FakeEndpoint(self)

    def _connect(self, factory: ClientFactory) -> "Deferred[Any]":
        if self._refuses_next():
            self.refused += 1
            return fail(net_error.ConnectionRefusedError("fake rspamd is down"))
        self.connections += 1
        client_address = IPv4Address("TCP", "127.0.0.1", 40000 + self.connections)
        server_address = IPv4Address("TCP", "127.0.0.1", 11333)
        server = self._site.buildProtocol(client_address)
        client = factory.buildProtocol(cast(Any, server_address))
        if client is None:
            return fail(net_error.ConnectError("no protocol"))
        server_io = _Transport(self, server, True, server_address, client_address)
        client_io = _Transport(self, client, False, client_address, server_address)
        self._pumps.append(iosim.IOPump(client, server, client_io, server_io, False, self._reactor))
        server.makeConnection(server_io)
        client.makeConnection(cast(Any, client_io))
        self.schedule_flush()
        return succeed(client)

    def schedule_flush(self) -> None:
        """Deliver soon (on the clock), not inside the caller's write."""
        if self.clock is None:
            self.flush()
        elif self._flush_call is None or not self._flush_call.active():
            self._flush_call = self.clock.callLater(0, self.flush)

    def flush(self) -> None:
        """Move bytes both ways until nothing moves (not re-entered from a write inside it)."""
        if self._pumping:
            return
        self._pumping = True
        try:
            moved = True
            while moved:
                moved = False
                for pump in list(self._pumps):
                    if pump.pump(advanceClock=False):
                        moved = True
                    elif pump.clientIO.disconnected and pump.serverIO.disconnected:
                        self._pumps.remove(pump)
        finally:
            self._pumping = False

    @property
    def open_connections(self) -> int:
        return sum(1 for p in self._pumps if not (p.clientIO.disconnected or p.serverIO.disconnected))


class FakeEndpoint:
    """``IStreamClientEndpoint`` of a fake: connects at once, in memory."""

    def __init__(self, fake: FakeRspamd) -> None:
        self.fake = fake

    def connect(self, factory: Any) -> "Deferred[Any]":
        return self.fake._connect(factory)


class _Transport(iosim.FakeTransport):
    """An in-memory transport that delivers what is written right away (via the fake's pump)."""

    def __init__(self, fake: FakeRspamd, protocol: Any, is_server: bool, host: Any, peer: Any) -> None:
        super().__init__(protocol, is_server, hostAddress=host, peerAddress=peer)
        self._fake = fake

    def _delivered(self) -> None:
        if self.isServer:
            self._fake.flush()
        else:
            self._fake.schedule_flush()

    def write(self, data: bytes) -> None:
        super().write(data)
        self._delivered()

    def writeSequence(self, data: Any) -> None:
        super().writeSequence(data)
        self._delivered()

    def loseConnection(self) -> None:
        super().loseConnection()
        self._delivered()

    def abortConnection(self) -> None:
        super().abortConnection()
        self._delivered()

    def setTcpNoDelay(self, enabled: bool) -> None:
        """Nothing to tune in memory."""


class FakeRspamdCluster(Dict[str, FakeRspamd]):
    """Fakes by server name, with the ``endpoint_for`` hook ``RspamdClient`` takes."""

    def __init__(self, fakes: Optional[Mapping[str, FakeRspamd]] = None, clock: Any = None) -> None:
        super().__init__(fakes or {})
        self.clock = clock
        for fake in self.values():
            if fake.clock is None:
                fake.clock = clock

    def endpoint_for(self, server: ServerSpec) -> FakeEndpoint:
        fake = self.get(server.name)
        if fake is None:
            fake = self[server.name] = FakeRspamd(clock=self.clock)
        elif self.clock is not None:
            fake.clock = self.clock
        return fake.endpoint()

    @property
    def requests(self) -> List[Tuple[str, RecordedRequest]]:
        """Every request of every fake, as (server name, request)."""
        return [(name, r) for name, fake in self.items() for r in fake.requests]
