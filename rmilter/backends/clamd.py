"""clamd client: stream a message with ``zINSTREAM`` and read the verdict (SPEC §6.9, §7.2).

One scan is up to ``spamd.retry_count`` attempts (B18: clamav retries come from
the spamd section) through the shared retry loop
(``rmilter.backends.upstream.Failover``), each on a fresh connection to a server
chosen at random among the live ones (SPEC §6.6), with a non-blocking pause of
``spamd.retry_timeout`` between attempts (B33).  An attempt sends
``zINSTREAM\\0``, then the spool in chunks of at most 64 KiB (each a u32
big-endian length and the bytes), then a zero length, and reads the
NUL-terminated reply.  The chunks are read from the spool one at a time and
only while the transport wants more (a push producer), so a 5 MB message never
sits in memory in one piece.

A scan that finds the message clean or infected fires with a ``ClamdScan``; one
that gets no verdict fails with ``ClamdError`` (the reason of the last attempt,
the attempts made, the last server).

Deadlines (SPEC §4.6, B18): ``clamav.connect_timeout`` for the connection;
``clamav.results_timeout`` for every wait after it: each read of the reply,
and, while streaming, each wait for the transport to take the next chunk.
A clamd that never answers therefore costs at most that long per attempt.

Failure classes (SPEC §6.9; C's libclamc returned -1 "retry" or -2 "give up"):

- retried: connect refused or timed out, the connection lost while the message
  was still being sent, a deadline passed, a ``... ERROR`` reply (e.g.
  ``INSTREAM size limit exceeded. ERROR`` past ``StreamMaxLength``);
- not retried: an empty or garbled reply after the whole message was sent
  (most likely clamd died on this very message), or the spool could not be
  read (our own failure; the server is not blamed).
"""
from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from typing import Any, Callable, Optional
from typing import Protocol as TypingProtocol

from twisted.internet import error as neterror
from twisted.internet.defer import Deferred, succeed
from twisted.internet.defer import TimeoutError as DeferredTimeoutError
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint, UNIXClientEndpoint
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Factory, Protocol
from rmilter.log import Logger
from twisted.python.failure import Failure
from zope.interface import implementer  # type: ignore[import-untyped]

from rmilter.backends.upstream import AttemptFailed, Attempted, Exhausted, Failover, UpstreamList
from rmilter.config.schema import CLAMD_DEFAULT_PORT, Config, ServerSpec

log = Logger(namespace="rmilter.backends.clamd")

#: SPEC §6.9: "SHOULD send chunks of at most 64 KiB"
CHUNK_SIZE = 64 * 1024
#: the command; ``z`` = NUL-terminated command and reply (SPEC §7.2)
INSTREAM_COMMAND = b"zINSTREAM\0"
END_OF_STREAM = struct.pack("!I", 0)
#: a clamd reply is one short line; anything longer is garbage and ends the attempt
MAX_REPLY = 4096
#: signature names clamd reports for archives it could not look into; C counts them clean (SPEC §6.9)
CLEAN_NAMES = frozenset({"Suspected.Zip", "Oversized.Zip"})


class SpoolSource(TypingProtocol):
    """What a scan reads: ``rmilter.spool.Spool`` (or anything with the same two members)."""

    @property
    def size(self) -> int: ...

    def read(self, offset: int, length: int) -> "Deferred[bytes]": ...


# -- replies ---------------------------------------------------------------------------------
class ReplyKind(enum.Enum):
    """The classes of SPEC §6.9: a verdict (clean, virus) or a failed attempt (error, garbled)."""

    CLEAN = "clean"
    VIRUS = "virus"
    ERROR = "error"  # "<text> ERROR": a failed attempt, retried
    GARBLED = "garbled"  # empty or unknown: failed, not retried


@dataclass(frozen=True)
class ClamdReply:
    """A clamd reply as SPEC §6.9 classifies it."""

    kind: ReplyKind
    text: str
    virus: Optional[str] = None


def classify_reply(raw: bytes) -> ClamdReply:
    """Classify the bytes clamd sent back for one ``INSTREAM`` (SPEC §6.9).

    The reply is cut at its terminator (NUL for ``z`` commands, newline for
    ``n``).  ``... OK``: clean.  ``stream: <name> FOUND``: a virus called
    ``<name>`` (without the ``stream`` prefix the whole text before ``FOUND``
    is the name); ``Suspected.Zip`` and ``Oversized.Zip`` count as clean.
    ``... ERROR``: a failed attempt.  Anything else, the empty reply included,
    is garbled.
    """
    end = len(raw)
    for terminator in (b"\0", b"\n"):
        at = raw.find(terminator)
        if at != -1:
            end = min(end, at)
    text = raw[:end].decode("utf-8", "replace").strip()
    if text == "OK" or text.endswith(" OK"):
        return ClamdReply(ReplyKind.CLEAN, text)
    if text.endswith(" FOUND"):
        name = text[: -len(" FOUND")]
        if text.startswith("stream"):
            colon = name.find(": ")
            name = name[colon + 2 :] if colon != -1 else name[len("stream") :]
        name = name.strip()
        if not name:
            return ClamdReply(ReplyKind.GARBLED, text)
        if name in CLEAN_NAMES:
            return ClamdReply(ReplyKind.CLEAN, text)
        return ClamdReply(ReplyKind.VIRUS, text, virus=name)
    if text == "ERROR" or text.endswith(" ERROR"):
        return ClamdReply(ReplyKind.ERROR, text)
    return ClamdReply(ReplyKind.GARBLED, text)


# -- attempt failures (retried and blamed on the server unless said otherwise) -------------------
class StreamInterrupted(AttemptFailed):
    """The connection ended while the message was still being sent, with no reply."""


class ResultsTimeout(AttemptFailed):
    """clamd took longer than ``results_timeout`` to take data or to answer."""


class SpoolUnreadable(AttemptFailed):
    """Our own spool could not be read: no server is to blame and no retry helps."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason, retry=False, blame=False)


# -- one INSTREAM exchange ---------------------------------------------------------------------
class _State(enum.Enum):
    CONNECTING = "connecting"
    SENDING = "sending"
    AWAITING_REPLY = "awaiting reply"
    DONE = "done"


@implementer(IPushProducer)
class InstreamProtocol(Protocol):
    """Streams one message to clamd on a fresh connection and reads the reply.

    ``done`` fires with the raw reply bytes, or fails with an ``AttemptFailed``.
    The protocol is its own push producer: the transport pauses it when its
    buffer is full, and only one chunk read from the spool is outstanding at a
    time, so memory per scan stays at a few chunks whatever the message size.
    """

    def __init__(self, source: SpoolSource, clock: Any, results_timeout: float, chunk_size: int = CHUNK_SIZE) -> None:
        self.source = source
        self.clock = clock
        self.results_timeout = results_timeout
        self.chunk_size = chunk_size
        self.done: "Deferred[bytes]" = Deferred(lambda d: self._cancel())
        self.state = _State.CONNECTING
        self.size = 0
        self.offset = 0  # spool bytes handed to the transport so far
        self.reply = bytearray()
        self._paused = False
        self._reading = False  # a spool read is outstanding
        self._in_pump = False
        self._watchdog: Any = None

    # -- connection events -------------------------------------------------------------------
    @property
    def _wire(self) -> Any:
        """The transport (ITCPTransport / IUNIXTransport: also a consumer and abortable)."""
        return self.transport

    def connectionMade(self) -> None:
        self.size = self.source.size
        self.state = _State.SENDING
        self._wire.write(INSTREAM_COMMAND)
        self._wire.registerProducer(self, True)
        self._arm_watchdog()
        self._pump()

    def dataReceived(self, data: bytes) -> None:
        if self.state is _State.DONE:
            return
        self.reply += data
        if b"\0" in data or b"\n" in data:
            # a complete reply; clamd may send it while we are still streaming (size limit)
            self._finish(bytes(self.reply))
            return
        if len(self.reply) > MAX_REPLY:
            self._finish(bytes(self.reply))
            return
        self._arm_watchdog()

    def connectionLost(self, reason: Failure = Failure(neterror.ConnectionDone())) -> None:
        if self.state is _State.DONE:
            self._disarm_watchdog()
            return
        if self.reply:
            # C reads until the server closes: an unterminated reply still counts
            self._finish(bytes(self.reply))
        elif self.state is _State.SENDING:
            self._fail(StreamInterrupted("connection closed while sending (%s)" % (reason.getErrorMessage(),)))
        else:
            self._finish(b"")  # all sent, nothing answered: an empty reply (SPEC §6.9, not retried)

    # -- IPushProducer -------------------------------------------------------------------------
    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        if self.state is _State.SENDING:
            self._arm_watchdog()  # the transport took data: progress
            self._pump()

    def stopProducing(self) -> None:
        self._paused = True

    # -- streaming -----------------------------------------------------------------------------
    def _pump(self) -> None:
        """Hand chunks to the transport until it pauses us or the spool is sent."""
        if self._in_pump:
            return
        self._in_pump = True
        try:
            while self.state is _State.SENDING and not self._paused and not self._reading:
                if self.offset >= self.size:
                    self._end_stream()
                    break
                self._reading = True
                length = min(self.chunk_size, self.size - self.offset)
                self.source.read(self.offset, length).addCallbacks(self._chunk_read, self._spool_failed)
        finally:
            self._in_pump = False

    def _chunk_read(self, data: bytes) -> None:
        self._reading = False
        if self.state is not _State.SENDING:
            return
        if not data:
            self._fail(SpoolUnreadable("spool ended at %d of %d bytes" % (self.offset, self.size)))
            return
        self._wire.writeSequence([struct.pack("!I", len(data)), data])
        self.offset += len(data)
        self._arm_watchdog()  # the transport was not paused, so it took the previous chunk: progress
        if not self._in_pump:  # the read finished later (thread pool): carry on
            self._pump()

    def _spool_failed(self, failure: Failure) -> None:
        self._reading = False
        if self.state is _State.DONE:
            return
        if not failure.check(OSError):
            # OSError: the disk, or the message ended and its spool file is gone (reported by the
            # client as the scan's error); anything else is a bug and gets its traceback
            log.failure("clamscan: cannot read the spool", failure)
        self._fail(SpoolUnreadable("cannot read spool: %s" % (failure.getErrorMessage(),)))

    def _end_stream(self) -> None:
        self._wire.write(END_OF_STREAM)
        self._wire.unregisterProducer()
        self.state = _State.AWAITING_REPLY
        self._arm_watchdog()

    # -- deadlines and outcomes ----------------------------------------------------------------
    def _arm_watchdog(self) -> None:
        if self._watchdog is not None and self._watchdog.active():
            self._watchdog.reset(self.results_timeout)
        else:
            self._watchdog = self.clock.callLater(self.results_timeout, self._timed_out)

    def _disarm_watchdog(self) -> None:
        if self._watchdog is not None and self._watchdog.active():
            self._watchdog.cancel()
        self._watchdog = None

    def _timed_out(self) -> None:
        self._watchdog = None
        what = "reply" if self.state is _State.AWAITING_REPLY else "clamd to take data"
        self._fail(ResultsTimeout("no progress waiting for %s within %.3gs" % (what, self.results_timeout)))

    def _finish(self, reply: bytes) -> None:
        # a reply after the whole stream: close politely; a reply in the middle of the stream
        # (size limit) leaves unsent chunks in our buffer, which only an abort drops
        self._close(abort=self.state is not _State.AWAITING_REPLY)
        self.done.callback(reply)

    def _fail(self, exc: AttemptFailed) -> None:
        self._close(abort=True)
        self.done.errback(Failure(exc))

    def _cancel(self) -> None:
        self._close(abort=True)

    def _close(self, abort: bool) -> None:
        if self.state is _State.DONE:
            return
        sending = self.state is _State.SENDING
        self.state = _State.DONE
        self._disarm_watchdog()
        if self.transport is not None:
            if sending:
                self._wire.unregisterProducer()
            if abort:
                self._wire.abortConnection()
            else:
                self._wire.loseConnection()


# -- the client ---------------------------------------------------------------------------------
#: a scan with a verdict: ``reply.kind`` is CLEAN or VIRUS; the server that gave it, the time spent
#: (retries included), the attempts made
ClamdScan = Attempted[ServerSpec, ClamdReply]


class ClamdError(Exception):
    """A scan that got no verdict: the reason of the last attempt, attempts made, last server tried."""

    def __init__(self, reason: str, *, attempts: int, server: Optional[ServerSpec], elapsed: float) -> None:
        super().__init__(reason)
        self.reason = reason
        self.attempts = attempts
        #: the last server tried (None when no attempt was made: the client was stopped)
        self.server = server
        #: seconds from the start of the first attempt
        self.elapsed = elapsed

    @classmethod
    def from_report(cls, report: Exhausted[ServerSpec]) -> "ClamdError":
        """The retry loop's account of the scan as the clamd failure."""
        last = report.servers[-1] if report.servers else None
        return cls(report.reason, attempts=report.attempts, server=last, elapsed=report.elapsed)


#: (reactor, server, connect timeout) -> an IStreamClientEndpoint
EndpointFactory = Callable[[Any, ServerSpec, float], Any]


def server_endpoint(reactor: Any, server: ServerSpec, timeout: float) -> Any:
    """A client endpoint for a clamd server spec; TCP without port uses 3310 (B6)."""
    if server.is_unix:
        assert server.path is not None
        return UNIXClientEndpoint(reactor, server.path, timeout=timeout)
    host = (server.host or "127.0.0.1").strip("[]")
    port = server.port if server.port else CLAMD_DEFAULT_PORT
    if ":" in host:
        return TCP6ClientEndpoint(reactor, host, port, timeout=timeout)
    return TCP4ClientEndpoint(reactor, host, port, timeout=timeout)


def _connect_timed_out(result: Any, timeout: float) -> Failure:
    return Failure(DeferredTimeoutError(timeout, "connect"))


def _verdict(raw: bytes) -> ClamdReply:
    """The reply of one attempt if it is a verdict; an ERROR or garbled reply fails the attempt."""
    try:
        reply = classify_reply(raw)
    except Exception as e:  # whatever the reply does to the parser is a failed attempt (issue 18)
        raise AttemptFailed("unreadable reply: %s" % (type(e).__name__,), retry=False) from None
    if reply.kind is ReplyKind.ERROR:
        raise AttemptFailed("error reply: %s" % (reply.text,))
    if reply.kind is ReplyKind.GARBLED:
        raise AttemptFailed("unexpected reply: %r" % (reply.text,), retry=False)
    return reply


def _describe(failure: Failure) -> Optional[AttemptFailed]:
    """Attempts fail with ``AttemptFailed``; anything else is a bug the retry loop logs."""
    return failure.value if isinstance(failure.value, AttemptFailed) else None


class ClamdClient:
    """Scans messages with a list of clamd servers, with failover and health (SPEC §6.6, §6.9)."""

    def __init__(
        self,
        upstreams: UpstreamList[ServerSpec],
        *,
        reactor: Any,
        connect_timeout: float,
        results_timeout: float,
        retry_count: int,
        retry_timeout: float,
        endpoint_factory: EndpointFactory = server_endpoint,
        chunk_size: int = CHUNK_SIZE,
    ) -> None:
        self.upstreams = upstreams
        self.reactor = reactor
        self.connect_timeout = connect_timeout
        self.results_timeout = results_timeout
        self.endpoint_factory = endpoint_factory
        self.chunk_size = chunk_size
        self.failover: Failover[ServerSpec] = Failover(
            upstreams,
            reactor,
            attempts=retry_count,
            retry_timeout=retry_timeout,
            what="clamscan",
            describe=_describe,
            give_up=ClamdError.from_report,
        )

    def __repr__(self) -> str:
        return "<ClamdClient %s>" % (", ".join(u.server.name for u in self.upstreams.upstreams),)

    def scan(self, source: SpoolSource, tag: str = "") -> "Deferred[ClamdScan]":
        """Scan the message: a verdict, or a ``ClamdError`` when no attempt gave one.

        Cancelling it aborts the attempt in progress (or the pause) and fails it with a ``ClamdError``.
        """
        return self.failover.run(lambda server: self._attempt(server, source).addCallback(_verdict), tag)

    def _attempt(self, server: ServerSpec, source: SpoolSource) -> "Deferred[bytes]":
        """Connect (within ``connect_timeout``) and run one INSTREAM exchange."""
        protocol = InstreamProtocol(source, self.reactor, self.results_timeout, self.chunk_size)
        endpoint = self.endpoint_factory(self.reactor, server, self.connect_timeout)
        factory = Factory.forProtocol(lambda: protocol)
        factory.noisy = False  # no "Starting/Stopping factory" lines twice per message
        connecting: "Deferred[Any]" = endpoint.connect(factory)
        # cancelling an endpoint's connect fails with ConnectingCancelledError, not CancelledError,
        # so addTimeout's default conversion would not recognise its own timeout
        connecting.addTimeout(self.connect_timeout, self.reactor, onTimeoutCancel=_connect_timed_out)
        cancelled = []

        def cancel(_: "Deferred[bytes]") -> None:
            cancelled.append(True)
            connecting.cancel()
            protocol.done.cancel()

        outcome: "Deferred[bytes]" = Deferred(cancel)

        def connect_failed(failure: Failure) -> None:
            if cancelled or outcome.called:
                return
            if failure.check(DeferredTimeoutError, neterror.TimeoutError):
                outcome.errback(Failure(AttemptFailed("connect timeout after %.3gs" % (self.connect_timeout,))))
            elif failure.check(neterror.ConnectError, OSError):
                outcome.errback(Failure(AttemptFailed("connect failed: %s" % (failure.getErrorMessage(),))))
            else:
                outcome.errback(failure)  # a bug: the retry loop logs it

        def exchange_over(result: Any) -> None:
            if cancelled or outcome.called:
                return
            if isinstance(result, Failure):
                outcome.errback(result)
            else:
                outcome.callback(result)

        connecting.addCallbacks(lambda _: None, connect_failed)
        protocol.done.addBoth(exchange_over)
        return outcome

    def stop(self) -> "Deferred[None]":
        """Abort scans in flight (they fail with ``ClamdError``) and make no new attempt."""
        self.failover.stop()
        return succeed(None)


def from_config(config: Config, reactor: Any) -> Optional[ClamdClient]:
    """The clamd client for ``config``, or None when no clamav servers are configured."""
    clamav = config.clamav
    if not clamav.servers:
        return None
    upstreams: UpstreamList[ServerSpec] = UpstreamList(
        clamav.servers,
        error_time=clamav.error_time,
        dead_time=clamav.dead_time,
        maxerrors=clamav.maxerrors,
        clock=reactor,
        priorities=[s.priority for s in clamav.servers],
    )
    return ClamdClient(
        upstreams,
        reactor=reactor,
        connect_timeout=clamav.connect_timeout,
        results_timeout=clamav.results_timeout,
        retry_count=config.spamd.retry_count,
        retry_timeout=config.spamd.retry_timeout,
    )
