"""Rspamd over treq (SPEC §6.8.1, §7.1): one ``treq.HTTPClient`` per runtime, endpoints built once.

The client is ``treq.HTTPClient`` over ``Agent.usingEndpointFactory`` with a
persistent ``HTTPConnectionPool``.  Everything a scan would otherwise parse or
build is made when the transport is made (at load or reload): per server the URL
(an ``EncodedURL``), the Host header and the ready endpoint - a unix socket
through ``UNIXClientEndpoint``, an IP literal through ``TCP4ClientEndpoint`` /
``TCP6ClientEndpoint`` (no resolver), a host name through ``HostnameEndpoint``.
The endpoint factory only looks the URL's (scheme, host, port) up in a dict.

The request body is the spool's ``IBodyProducer`` (``MessageBody.producer``); the
reply is delivered into ``_ReplyReader`` (``IResponse.deliverBody``, as
``treq.collect`` does, plus the abort a deadline needs) and parsed as before.

Rspamd's normal worker answers ``Connection: close`` and ends the session after
the reply whatever the request asks (3.4 and later: ``http_connection.c`` writes the
header for every server reply, ``worker.c`` destroys the session; the ``keepalive``
upstream option of ``rspamd_proxy``, 3.12 on, only pools the proxy's connections
to servers that keep them), so no ``Connection`` header is sent and against the
worker every scan connects anew (tests/test_rspamd_keepalive.py).  A server that
keeps connections (a proxy, a TLS terminator) gets them reused by the pool (a
reused connection that turns out closed before any reply byte is replaced by a
new one, once, without counting as a failure - Twisted retries only idempotent
requests itself).
"""
from __future__ import annotations

import ipaddress
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from hyperlink import EncodedURL
from treq.client import HTTPClient
from treq.cookies import IndexableCookieJar
from twisted.internet import error as net_error
from twisted.internet.defer import CancelledError, Deferred, TimeoutError, succeed
from twisted.internet.endpoints import (
    HostnameEndpoint,
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
    UNIXClientEndpoint,
    wrapClientTLS,
)
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web._newclient import ParseError, RequestTransmissionFailed, ResponseFailed, ResponseNeverReceived
from twisted.web.client import Agent, HTTPConnectionPool, ResponseDone, _HTTP11ClientFactory
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgentEndpointFactory
from zope.interface import implementer  # type: ignore[import-untyped]

from rmilter.backends.rspamd.reply import ZSTD_MAGIC, BadReply, ScanReply, decompress_reply, parse_scan_reply
from rmilter.backends.rspamd.request import MessageBody, ScanRequest
from rmilter.backends.upstream import AttemptFailed
from rmilter.config.schema import RSPAMD_DEFAULT_PORT, ServerSpec

#: idle connections kept per server: a burst of scans in flight finds warm connections
POOL_SIZE = 128
#: idle pooled connections are closed before Rspamd's own keep-alive timer can
#: close them under a request we are about to send
POOL_IDLE_TIMEOUT = 30

#: how one configured server is reached (the test hook: an in-memory endpoint)
EndpointFor = Callable[[ServerSpec], IStreamClientEndpoint]


class ConnectionLostEarly(Exception):
    """The connection closed before a whole reply head arrived."""


class ReplyCutShort(Exception):
    """The connection closed before the announced reply body was complete."""


def _tls_reason(reasons: Sequence[Failure]) -> Optional[str]:
    """The TLS failure among the reasons a connection ended, as one short line."""
    for reason in reasons:
        value = reason.value
        module = type(value).__module__ or ""
        mismatched = [getattr(getattr(e, "mismatched_id", None), "hostname", None)
                      for e in getattr(value, "errors", ())] if module.startswith("service_identity") else []
        if mismatched:
            names = ", ".join(n.decode("idna") if isinstance(n, bytes) else str(n) for n in mismatched if n)
            return "TLS: the certificate is not for %s (VerificationError)" % (names,)
        if module.startswith(("OpenSSL", "service_identity")):
            return "TLS: %s: %s" % (type(value).__name__, reason.getErrorMessage())
    return None


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
    if failure.check(ResponseNeverReceived, ResponseFailed, RequestTransmissionFailed):
        reasons: List[Failure] = list(getattr(failure.value, "reasons", ()))
        tls = _tls_reason(reasons)
        if tls is not None:
            return AttemptFailed(tls)
        if any(r.check(ParseError) for r in reasons):
            return AttemptFailed("bad reply: not an HTTP reply")
        if failure.check(RequestTransmissionFailed) and not any(
                r.check(net_error.ConnectionLost, net_error.ConnectionDone) for r in reasons):
            return None  # the body could not be read (a spool error): not the server's fault
        return AttemptFailed("connection lost before the reply")
    if failure.check(ConnectionLostEarly, net_error.ConnectionLost, net_error.ConnectionDone):
        return AttemptFailed("connection lost before the reply")
    if failure.check(ReplyCutShort):
        return AttemptFailed("reply cut short")
    if failure.check(BadReply):
        return AttemptFailed("bad reply: %s" % (failure.getErrorMessage(),))
    return None


def server_endpoint(reactor: Any, server: ServerSpec, connect_timeout: float,
                    tls: Optional[Any] = None) -> IStreamClientEndpoint:
    """The endpoint of one configured server: unix socket, IP literal (no resolver) or host name."""
    timeout = max(connect_timeout, 0.001)
    endpoint: Any  # each is an IStreamClientEndpoint (zope interfaces are invisible to mypy)
    if server.path is not None:
        return UNIXClientEndpoint(reactor, server.path, timeout=timeout)  # type: ignore[return-value]
    host = server.host or "localhost"
    port = server.port or RSPAMD_DEFAULT_PORT
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        endpoint = HostnameEndpoint(reactor, host.encode("idna"), port, timeout=timeout)
    else:
        kind = TCP6ClientEndpoint if address.version == 6 else TCP4ClientEndpoint
        endpoint = kind(reactor, host, port, timeout=timeout)
    if tls is not None:
        endpoint = wrapClientTLS(tls, endpoint)
    return endpoint


class _QuietHTTP11ClientFactory(_HTTP11ClientFactory):
    """The pool's connection factory without its "Starting factory" / "Stopping factory" info
    events: one pair per scan (Rspamd closes every connection), 4-5% of a scan's CPU, and log noise."""

    noisy = False


class _ScanPool(HTTPConnectionPool):
    """The persistent pool of the runtime, sized for a burst of scans in flight."""

    _factory = _QuietHTTP11ClientFactory
    maxPersistentPerHost = POOL_SIZE
    cachedConnectionTimeout = POOL_IDLE_TIMEOUT
    retryAutomatically = False  # a POST is never retried by Twisted; _Attempt does it for a stale connection


class _CountingEndpoint:
    """An endpoint that counts its connects: a scan that made none went on a pooled connection."""

    def __init__(self, endpoint: IStreamClientEndpoint, transport: "TreqTransport") -> None:
        self._endpoint: Any = endpoint
        self._transport = transport

    def connect(self, factory: Any) -> "Deferred[Any]":
        self._transport.connects += 1
        return self._endpoint.connect(factory)


@implementer(IAgentEndpointFactory)
class _ServerEndpoints:
    """The endpoint factory of the Agent: URL (scheme, host, port) to the endpoint built at load."""

    def __init__(self) -> None:
        self.by_key: Dict[Tuple[bytes, bytes, int], Any] = {}

    def endpointForURI(self, uri: Any) -> Any:
        return self.by_key[(uri.scheme, uri.host, uri.port)]


class _ReadyURL(EncodedURL):
    """A server's URL made once: ``to_uri``/``to_text`` answer from what was computed at load.

    treq turns every URL it is given into text through ``to_uri().to_text()``, which
    re-encodes the host through IDNA on every request (~20 µs a scan); the URL of a
    configured server never changes, so it is computed when the transport is made.
    """

    def __init__(self, **parts: Any) -> None:
        super().__init__(**parts)
        self._ready_text = EncodedURL(**parts).to_uri().to_text()  # a plain URL: replace() builds our class

    def to_uri(self) -> "_ReadyURL":
        return self

    def to_text(self, with_password: bool = False) -> str:
        return self._ready_text


class _NoCookies(IndexableCookieJar):
    """A cookie jar that keeps and sends nothing: Rspamd's scan replies never set cookies.

    treq's ``CookieAgent`` asks the jar for a Cookie header before every request
    and offers it every reply; the stdlib jar's bookkeeping for that is per scan
    work with no use here.  The same empty jar is also passed as each request's
    ``cookies``, so treq builds no jar per request either.
    """

    def add_cookie_header(self, request: Any) -> None:
        """No cookies are ever sent."""

    def extract_cookies(self, response: Any, request: Any) -> None:
        """Cookies a reply sets are not kept."""


class _Target:
    """What every scan to one server reuses: its URL, Host header and endpoint."""

    __slots__ = ("url", "host")

    def __init__(self, url: _ReadyURL, host: bytes) -> None:
        self.url = url
        self.host = host


def _host_header(server: ServerSpec) -> bytes:
    if server.path is not None:
        return b"localhost"
    host = server.host or "localhost"
    if ":" in host:
        host = "[%s]" % (host,)
    return ("%s:%d" % (host, server.port or RSPAMD_DEFAULT_PORT)).encode("idna")


class _ReplyReader(Protocol):
    """Collects one reply body (as ``treq.collect``), and can abort it when the deadline passes."""

    def __init__(self, attempt: "_Attempt", status: int, compressed: bool) -> None:
        self.attempt = attempt
        self.status = status
        self.compressed = compressed
        self.parts: List[bytes] = []

    def dataReceived(self, data: bytes) -> None:
        self.parts.append(data)

    def abort(self) -> None:
        transport: Any = self.transport
        if transport is not None:
            transport.stopProducing()

    def connectionLost(self, reason: Failure = Failure(ResponseDone())) -> None:
        attempt = self.attempt
        if attempt.done:
            return
        if not reason.check(ResponseDone, PotentialDataLoss):
            attempt.fail(Failure(ReplyCutShort("reply cut short")))
            return
        parts = self.parts
        body = parts[0] if len(parts) == 1 else b"".join(parts)
        try:
            if self.compressed or body.startswith(ZSTD_MAGIC):
                body = decompress_reply(body)
            reply = parse_scan_reply(body, self.status)
        except BadReply:
            attempt.fail(Failure())
            return
        attempt.succeed(reply)


class _Attempt:
    """One request in flight, bounded as a whole by the deadline (connect, send, head and body)."""

    __slots__ = ("transport", "server", "headers", "body", "result", "request", "reader", "timer", "done",
                 "retried")

    def __init__(self, transport: "TreqTransport", server: ServerSpec, headers: Headers, body: MessageBody) -> None:
        self.transport = transport
        self.server = server
        self.headers = headers
        #: dropped once the attempt is over: a closed connection's objects wait for the garbage
        #: collector (reference cycles), and the body must not wait with them (issue 19)
        self.body: Optional[MessageBody] = body
        self.result: "Deferred[ScanReply]" = Deferred(self._cancel)
        self.request: Optional["Deferred[Any]"] = None
        self.reader: Optional[_ReplyReader] = None
        self.done = False
        self.retried = False
        self.timer = transport.reactor.callLater(transport.deadline, self._time_out)

    def send(self) -> None:
        transport = self.transport
        connects = transport.connects
        assert self.body is not None  # sent only while not done
        d = transport.client.request(
            "POST", transport.targets[self.server].url, headers=self.headers, data=self.body.producer(),
            cookies=transport.cookies, allow_redirects=False, unbuffered=True)
        reused = transport.connects == connects
        self.request = d
        d.addCallbacks(self._response, self._request_failed, errbackArgs=(reused,))

    def _response(self, response: Any) -> None:
        self.request = None
        if self.done:
            return
        compression = response.headers.getRawHeaders(b"compression")
        compressed = bool(compression) and compression[0].strip().lower() == b"zstd"
        reader = self.reader = _ReplyReader(self, response.code, compressed)
        response.deliverBody(reader)

    def _request_failed(self, failure: Failure, reused: bool) -> None:
        self.request = None
        if self.done:
            return
        if reused and not self.retried and failure.check(ResponseNeverReceived, RequestTransmissionFailed) \
                and _tls_reason(failure.value.reasons) is None:
            self.retried = True  # the server closed the idle connection as we reused it: once more
            self.send()
            return
        self.fail(failure)

    def _abort(self) -> None:
        if self.reader is not None:
            self.reader.abort()
        elif self.request is not None:
            request, self.request = self.request, None
            request.cancel()

    def _time_out(self) -> None:
        if self.done:
            return
        self.done = True
        self.body = None
        self._abort()
        self.result.errback(Failure(TimeoutError("rspamd exchange timed out")))

    def _cancel(self, _: "Deferred[ScanReply]") -> None:
        """The caller gave up: drop the request or the connection (the result fails with CancelledError)."""
        if self.done:
            return
        self.done = True
        self.body = None
        if self.timer.active():
            self.timer.cancel()
        self._abort()

    def succeed(self, reply: ScanReply) -> None:
        if not self.done:
            self.done = True
            self.body = None
            self.timer.cancel()
            self.result.callback(reply)

    def fail(self, failure: Failure) -> None:
        if not self.done:
            self.done = True
            self.body = None
            self.timer.cancel()
            self.result.errback(failure)


class TreqTransport:
    """POSTs scans to Rspamd servers with one ``treq.HTTPClient`` (``ScanTransport`` of the client)."""

    def __init__(
        self,
        reactor: Any,
        servers: Sequence[ServerSpec],
        *,
        path: str,
        deadline: float,
        endpoint_for: EndpointFor,
    ) -> None:
        self.reactor = reactor
        self.path = path
        #: one bound for a whole exchange: connecting, sending, the reply head and its body
        self.deadline = deadline
        #: connections made so far (a scan that made none was sent on a pooled one)
        self.connects = 0
        self.pool = _ScanPool(reactor, persistent=True)
        self._endpoints = _ServerEndpoints()
        self.targets: Dict[ServerSpec, _Target] = {}
        for index, server in enumerate(servers):
            if server in self.targets:
                continue
            scheme = "https" if server.tls else "http"
            if server.path is not None:
                host, port = "unix%d.localhost" % (index,), 80  # a key only: Host is set below
            else:
                host = server.host or "localhost"
                port = server.port or RSPAMD_DEFAULT_PORT
            url = _ReadyURL(scheme=scheme, host=host, port=port, path=(path.lstrip("/"),))
            key = (scheme.encode("ascii"), host.encode("idna"), port)
            self._endpoints.by_key[key] = _CountingEndpoint(endpoint_for(server), self)
            self.targets[server] = _Target(url, _host_header(server))
        #: the one (always empty) cookie jar of the client and of every request
        self.cookies = _NoCookies()
        self.client = HTTPClient(Agent.usingEndpointFactory(reactor, self._endpoints, self.pool), cookiejar=self.cookies)

    def exchange(self, server: ServerSpec, request: ScanRequest, body: MessageBody) -> "Deferred[ScanReply]":
        """One POST to one server, bounded as a whole by ``deadline``; fires with the parsed reply."""
        raw: Dict[bytes, List[bytes]] = {b"host": [self.targets[server].host]}
        for name, value in request.header_lines():
            values = raw.get(name)
            if values is None:
                raw[name] = [value]
            else:
                values.append(value)
        if body.compressed:
            raw[b"compression"] = [b"zstd"]
            raw[b"content-type"] = [b"application/x-compressed"]
        else:
            raw[b"content-type"] = [b"text/plain"]
        attempt = _Attempt(self, server, Headers(raw), body)
        attempt.send()
        return attempt.result

    def describe_failure(self, failure: Failure) -> Optional[AttemptFailed]:
        """Why an exchange failed, for the retry loop (``describe_failure`` of this module)."""
        if failure.check(CancelledError):
            return None
        return describe_failure(failure)

    def stop(self) -> "Deferred[None]":
        """Close the idle pooled connections (idempotent); exchanges in flight end on their own."""
        d = self.pool.closeCachedConnections()
        return d if d is not None else succeed(None)
