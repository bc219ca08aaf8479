"""Client for Rspamd's HTTP protocol (SPEC §6.6, §6.8.1-§6.8.2, §7.1), on Twisted's HTTP/1.1 agent.

One ``Agent`` per configured server, built with ``Agent.usingEndpointFactory``
(TCP or unix socket) on a persistent ``HTTPConnectionPool`` sized for many
messages in flight.  Requests go to the agent directly rather than through
``treq.HTTPClient``: treq re-parses and IDNA-encodes the URL and runs its cookie
and redirect layers on every request, 0.3-0.7 ms of CPU per message, which is
more than the rest of a scan costs us.  treq's in-memory agent
(``treq.testing.RequestTraversalAgent``) is what the unit tests plug in
(``rmilter.testing.fake_rspamd``).  A scan is up to
``retry_count`` attempts, each on a freshly chosen live server (SPEC §6.6),
separated by a pause that never blocks the reactor.  Every attempt has one
deadline, ``connect_timeout + results_timeout``, that covers connecting,
sending, the response headers *and* the body read: treq's own ``timeout=``
ends with the headers, which would let a server that stalls mid-body hang the
message.

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
from twisted.internet.defer import CancelledError, Deferred, DeferredList, TimeoutError, succeed
from twisted.internet.endpoints import HostnameEndpoint, TCP4ClientEndpoint, TCP6ClientEndpoint, UNIXClientEndpoint
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.task import deferLater
from rmilter.log import Logger
from twisted.python.failure import Failure
from twisted.web.client import (
    Agent,
    HTTPConnectionPool,
    _HTTP11ClientFactory,
    PartialDownloadError,
    ResponseFailed,
    ResponseNeverReceived,
    readBody,
)
from twisted.web._newclient import RequestTransmissionFailed
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IAgentEndpointFactory, IBodyProducer, IResponse
from zope.interface import implementer  # type: ignore[import-untyped]


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
    if failure.check(ResponseNeverReceived, RequestTransmissionFailed, ResponseFailed):
        return "connection lost before the reply"
    if failure.check(PartialDownloadError):
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


def _symbol(name: str, value: Any) -> Optional[Symbol]:
    if not isinstance(value, dict):
        return None
    options = value.get("options")
    opts: Tuple[str, ...] = ()
    if isinstance(options, list):
        opts = tuple(o for o in options if isinstance(o, str))
    return Symbol(_string(value.get("name")) or name, _number(value.get("score")), opts)


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
        symbols = tuple(s for s in (_symbol(k, v) for k, v in _pairs(metric)) if s is not None)
        block_name = "rmilter"
    elif "action" in top or "score" in top or isinstance(top.get("symbols"), dict):
        fields = top
        symbols = tuple(s for s in (_symbol(k, v) for k, v in _pairs(top.get("symbols"))) if s is not None)
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


@implementer(IAgentEndpointFactory)
class ServerEndpointFactory:
    """Every request of an agent goes to one configured server, TCP or unix socket."""

    def __init__(self, reactor: Any, server: ServerSpec, connect_timeout: float) -> None:
        self.reactor = reactor
        self.server = server
        self.connect_timeout = connect_timeout

    def endpointForURI(self, uri: Any) -> IStreamClientEndpoint:
        server = self.server
        timeout = max(self.connect_timeout, 0.001)
        endpoint: Any
        if server.path is not None:
            endpoint = UNIXClientEndpoint(self.reactor, server.path, timeout=timeout)
            return cast(IStreamClientEndpoint, endpoint)
        host = server.host or "localhost"
        port = server.port or 11333
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            endpoint = HostnameEndpoint(self.reactor, host.encode("idna"), port, timeout=timeout)
        else:
            endpoint_class = TCP6ClientEndpoint if address.version == 6 else TCP4ClientEndpoint
            endpoint = endpoint_class(self.reactor, host, port, timeout=timeout)
        return cast(IStreamClientEndpoint, endpoint)


def _url(server: ServerSpec, path: str) -> bytes:
    """The request URL; only its path and Host header matter, the endpoint decides where it goes."""
    if server.path is not None:
        return b"http://localhost" + path.encode("ascii")
    host = server.host or "localhost"
    if ":" in host:
        host = "[%s]" % (host,)
    return ("http://%s:%d%s" % (host, server.port or 11333, path)).encode("idna")


class _QuietClientFactory(_HTTP11ClientFactory):
    """Rspamd closes its connection after every reply (3.4: ``Connection: close``), so a
    factory starts and stops per message; Twisted would log both events each time."""

    noisy = False


class _Pool(HTTPConnectionPool):
    _factory = _QuietClientFactory


class RspamdClient:
    """Scans messages on the configured servers with failover and retries (SPEC §6.6)."""

    def __init__(
        self,
        config: SpamdConfig,
        reactor: Any,
        *,
        agent_for: Optional[Callable[[ServerSpec], IAgent]] = None,
        rng: Optional[random.Random] = None,
    ) -> None:
        self.config = config
        self.reactor = reactor
        self._rng = rng or random.Random()
        self._pools: List[HTTPConnectionPool] = []
        self._agent_for = agent_for or self._real_agent
        self.upstreams: UpstreamList[ServerSpec] = self._upstream_list(config.servers)
        self.also_check: Optional[UpstreamList[ServerSpec]] = (
            self._upstream_list(config.also_check) if config.also_check else None
        )
        self._agents: Dict[ServerSpec, IAgent] = {}
        self._urls: Dict[ServerSpec, bytes] = {}
        self.path = "/symbols" if config.protocol == "legacy" else "/checkv2"
        self.deadline = config.connect_timeout + config.results_timeout
        self._stopped: Optional["Deferred[None]"] = None

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

    def _real_agent(self, server: ServerSpec) -> IAgent:
        pool = _Pool(self.reactor, persistent=True)
        pool.maxPersistentPerHost = POOL_SIZE
        pool.cachedConnectionTimeout = POOL_IDLE_TIMEOUT
        # POST is not idempotent, so the pool would not retry it anyway; our retries do
        pool.retryAutomatically = False
        self._pools.append(pool)
        return Agent.usingEndpointFactory(
            self.reactor, ServerEndpointFactory(self.reactor, server, self.config.connect_timeout), pool=pool
        )

    def agent(self, server: ServerSpec) -> IAgent:
        """The agent of one server (made on first use)."""
        agent = self._agents.get(server)
        if agent is None:
            agent = self._agents[server] = self._agent_for(server)
            self._urls[server] = _url(server, self.path)
        return agent

    # -- one attempt ---------------------------------------------------------------------
    def exchange(self, server: ServerSpec, request: ScanRequest, body: MessageBody) -> "Deferred[ScanReply]":
        """One POST to one server, bounded as a whole by ``connect_timeout + results_timeout``."""
        headers = Headers()
        for name, value in request.header_lines():
            headers.addRawHeader(name, value)
        if body.compressed:
            headers.addRawHeader(b"Compression", b"zstd")
            headers.addRawHeader(b"Content-Type", b"application/x-compressed")
        else:
            headers.addRawHeader(b"Content-Type", b"text/plain")
        agent: Any = self.agent(server)  # zope interface methods confuse mypy (no self)
        d: "Deferred[Any]" = agent.request(b"POST", self._urls[server], headers, body.producer())
        d.addCallback(self._read)
        d.addTimeout(self.deadline, self.reactor)
        return d

    def _read(self, response: IResponse) -> "Deferred[ScanReply]":
        status = response.code
        compressed = response.headers.getRawHeaders(b"compression") or []

        def got(body: bytes) -> ScanReply:
            if body.startswith(ZSTD_MAGIC) or any(v.strip().lower() == b"zstd" for v in compressed):
                body = decompress_reply(body)
            return parse_reply(body, status)

        def partial(failure: Failure) -> bytes:
            # an HTTP/1.0 reply ended by closing the connection: what arrived is the body
            failure.trap(PartialDownloadError)
            return failure.value.response or b""

        return readBody(response).addErrback(partial).addCallback(got)

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
        """Close the pooled connections (idempotent)."""
        if self._stopped is None:
            closing = [pool.closeCachedConnections() for pool in self._pools]
            self._stopped = DeferredList(closing, consumeErrors=True).addCallback(lambda _: None)
        return self._stopped


def from_config(config: Config, reactor: Any) -> Optional[RspamdClient]:
    """The rspamd client of a configuration, or None when no spamd servers are configured."""
    if not config.spamd.servers:
        return None
    return RspamdClient(config.spamd, reactor)
