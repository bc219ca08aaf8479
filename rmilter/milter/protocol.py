"""The milter over Twisted: bytes from the transport to the session and back, nothing else.

``MilterProtocol`` feeds received bytes to a ``CommandReader``, hands each
command to the connection's ``MilterSession`` and writes what comes back, one
``transport.write`` per answered command.  While the session waits for the
pipeline, later commands stay in the reader's buffer (in order) and the
transport is paused once more than a couple of frames queue up.  Around that:
TCP_NODELAY, TCP_QUICKACK when the MTA streams no-reply steps, an idle timeout,
and PROGRESS keep-alives while the end-of-message checks run.

``MilterFactory`` builds the protocols, counts messages in flight and offers
the hooks a graceful stop needs (``wait_for_messages``, ``close_idle_connections``).
"""
from __future__ import annotations

import socket
from typing import Any, Callable, Dict, List, Optional, Set

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred, succeed
from twisted.internet.protocol import Factory, Protocol
from rmilter.log import Logger
from twisted.python.failure import Failure

from rmilter.milter import codec
from rmilter.milter.codec import CommandReader, Negotiate, ProtocolError
from rmilter.milter.constants import STAGE_EOM
from rmilter.milter.session import MilterSession

log = Logger(namespace="rmilter.milter")

#: bytes asked for per read of a milter connection while few messages are in flight: up to four
#: 64 KiB BODY frames a read instead of one (issue 19: 1 MB messages ~25% faster); with more
#: messages open than the spool budget holds such reads, Twisted's 64 KiB, so that 64
#: connections do not each buffer 256 KiB
RECV_BUFFER_SIZE = 256 * 1024
RECV_BUFFER_SIZE_TIGHT = 64 * 1024
#: pause reading when more frames than this wait behind a pending command
MAX_QUEUED_FRAMES = 2
_TCP_QUICKACK: Optional[int] = getattr(socket, "TCP_QUICKACK", None)  # Linux only


def describe_peer(address: Any) -> str:
    """``192.0.2.1:4711`` for TCP peers, ``unix`` for unix-socket peers."""
    if isinstance(address, (IPv4Address, IPv6Address)):
        return "%s:%d" % (address.host, address.port)
    return "unix"


class MilterProtocol(Protocol):
    """One MTA connection."""

    factory: "MilterFactory"
    #: a TCP or UNIX transport (typed loosely: Twisted's interfaces are zope, not mypy, types)
    transport: Any

    def __init__(self, factory: "MilterFactory") -> None:
        self.factory = factory
        self.clock = factory.clock
        self.session: Optional[MilterSession] = None
        self.reader: Optional[CommandReader] = None
        self.peer = "-"
        self.idle_timeout = 0.0
        self.progress_interval = 0.0
        self._pending: Optional[Deferred] = None
        self._paused = False
        self._closing = False
        self.close_reason: Optional[str] = None
        self._lost = False
        self._last_seen = 0.0
        self._idle_call: Optional[Any] = None  # IDelayedCall
        self._progress_call: Optional[Any] = None
        self._quickack_socket: Optional[socket.socket] = None
        self._tcp = False

    # -- connection lifetime -----------------------------------------------------------------
    def connectionMade(self) -> None:
        main = self.factory.settings().config.main
        self.idle_timeout = main.idle_timeout
        self.progress_interval = main.progress_interval
        # D L / D B come before every header and body chunk; libmilter ignores them (SPEC §3.2)
        self.reader = CommandReader(main.max_frame_size, ignored_macro_stages=b"LB")
        transport = self.transport
        self.peer = describe_peer(transport.getPeer())
        self._tcp = isinstance(transport.getHost(), (IPv4Address, IPv6Address))
        if self._tcp:
            try:
                transport.setTcpNoDelay(True)
            except (AttributeError, OSError) as e:
                log.debug("{peer}: cannot set TCP_NODELAY: {error}", peer=self.peer, error=e)
        self.session = MilterSession(
            self.factory.pipeline,
            no_reply_steps=self.factory.no_reply_steps,
            message_started=self.factory.message_started,
            message_finished=self.factory.message_finished,
            peer=self.peer,
        )
        self.factory.connections.add(self)
        self._last_seen = self.clock.seconds()
        if self.idle_timeout > 0:
            self._idle_call = self.clock.callLater(self.idle_timeout, self._check_idle)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self._lost = self._closing = True
        for call in (self._idle_call, self._progress_call):
            if call is not None and call.active():
                call.cancel()
        self._idle_call = self._progress_call = None
        self.factory.connections.discard(self)
        if self.session is not None:
            self.session.connection_lost()

    def close(self, why: str) -> None:
        """Close after writing what is queued (``why``: for debugging; callers log what matters)."""
        if self._closing:
            return
        self._closing = True
        self.close_reason = why
        self.transport.loseConnection()

    @property
    def busy(self) -> bool:
        """A message is in flight or a command is being answered."""
        return self._pending is not None or (self.session is not None and self.session.busy)

    # -- bytes in ----------------------------------------------------------------------------
    def dataReceived(self, data: bytes) -> None:
        if self._closing:
            return
        # _last_seen is NOT moved here: the idle clock runs per complete command, so a frame
        # trickled in a byte at a time (slowloris) still ends after idle_timeout (issue 18)
        if self._quickack_socket is not None:
            self._quickack()
        reader = self.reader
        assert reader is not None
        budget = self.factory.spool_budget
        self.transport.bufferSize = (
            RECV_BUFFER_SIZE if budget is None or not budget.total or budget.open * RECV_BUFFER_SIZE <= budget.total
            else RECV_BUFFER_SIZE_TIGHT)
        try:
            reader.receive_data(data)
        except ProtocolError as e:
            self._protocol_error(e)
            return
        if self._pending is None:
            self._drain()
        elif not self._paused and reader.queued_frames > MAX_QUEUED_FRAMES:
            self._paused = True
            self.transport.pauseProducing()

    def _drain(self) -> None:
        """Answer buffered commands in order until one has to wait for the pipeline."""
        reader, session, write = self.reader, self.session, self.transport.write
        assert reader is not None and session is not None
        while not self._closing:
            try:
                command = reader.next_event()
                if command is None:
                    break
                self._last_seen = self.clock.seconds()
                out = session.handle(command)
            except ProtocolError as e:
                self._protocol_error(e)
                return
            except Exception:
                log.failure("{peer}: internal error; closing the connection", peer=self.peer)
                self.close("internal error")
                return
            if out is not None:
                if type(out) is bytes:
                    write(out)
                else:
                    self._wait(out)  # type: ignore[arg-type]
                    return
            if session.close_requested:
                self.close("the session ended")
                return
            if type(command) is Negotiate:
                self._negotiated()
        if self._paused:
            self._paused = False
            self.transport.resumeProducing()

    def _protocol_error(self, error: ProtocolError) -> None:
        """A malformed frame ends this connection, with one log line (SPEC §3.8)."""
        log.error("{peer}: milter protocol error: {error}; closing the connection", peer=self.peer, error=str(error))
        errors = self.factory.protocol_errors
        kind = type(error).__name__
        errors[kind] = errors.get(kind, 0) + 1
        self.close("protocol error")

    # -- waiting for the pipeline ------------------------------------------------------------
    def _wait(self, pending: Deferred) -> None:
        self._pending = pending
        assert self.session is not None
        if self.session.waiting_stage == STAGE_EOM and self.progress_interval > 0:
            self._progress_call = self.clock.callLater(self.progress_interval, self._progress)
        pending.addCallbacks(self._replied, self._failed)

    def _replied(self, out: Optional[bytes]) -> None:
        self._pending = None
        if self._progress_call is not None:
            if self._progress_call.active():
                self._progress_call.cancel()
            self._progress_call = None
        if self._lost or self._closing:
            return
        if out:
            self.transport.write(out)
        self._last_seen = self.clock.seconds()
        assert self.session is not None
        if self.session.close_requested:
            self.close("the session ended")
            return
        self._drain()

    def _failed(self, failure: Failure) -> None:
        """The session never lets a pipeline failure through; if it did, drop the connection."""
        self._pending = None
        log.failure("{peer}: internal error while answering; closing the connection", failure, peer=self.peer)
        if not self._lost:
            self.close("internal error")

    def _progress(self) -> None:
        """PROGRESS keep-alive: Postfix's milter_content_timeout restarts (SPEC §3.3)."""
        self._progress_call = None
        if self._pending is None or self._closing:
            return
        self.transport.write(codec.PROGRESS_PACKET)
        self.factory.progress_sent += 1
        self._progress_call = self.clock.callLater(self.progress_interval, self._progress)

    # -- timers and socket options -----------------------------------------------------------
    def _check_idle(self) -> None:
        self._idle_call = None
        if self._closing:
            return
        remaining = self._last_seen + self.idle_timeout - self.clock.seconds()
        if self._pending is not None:
            remaining = self.idle_timeout  # the MTA is waiting for us, not idle
        if remaining > 0:
            self._idle_call = self.clock.callLater(remaining, self._check_idle)
            return
        if self.reader is not None and self.reader.buffered:
            log.info("{peer}: a command begun but not completed within {timeout} s ({count} bytes); "
                     "closing the connection", peer=self.peer, timeout=self.idle_timeout,
                     count=self.reader.buffered)
        else:
            log.info("{peer}: no command for {timeout} s; closing the idle connection", peer=self.peer,
                     timeout=self.idle_timeout)
        self.close("idle timeout")

    def _negotiated(self) -> None:
        """With no-reply steps the MTA streams small packets: ACK them at once (TCP_QUICKACK).

        Postfix does not set TCP_NODELAY, so without a quick ACK from us its Nagle
        algorithm holds each packet until our delayed ACK (~40 ms on Linux).
        """
        assert self.session is not None
        if not (self._tcp and self.session.silent_stages and _TCP_QUICKACK is not None):
            self._quickack_socket = None
            return
        try:
            self._quickack_socket = self.transport.getHandle()
        except AttributeError:
            self._quickack_socket = None
            return
        self._quickack()

    def _quickack(self) -> None:
        """Linux clears TCP_QUICKACK by itself, so it is set again after every read."""
        try:
            self._quickack_socket.setsockopt(socket.IPPROTO_TCP, _TCP_QUICKACK, 1)  # type: ignore[union-attr,arg-type]
        except (OSError, AttributeError) as e:
            log.debug("{peer}: TCP_QUICKACK not available: {error}", peer=self.peer, error=e)
            self._quickack_socket = None


class MilterFactory(Factory):
    """Builds a ``MilterProtocol`` per MTA connection; all of them share one pipeline.

    ``settings`` returns the current ``rmilter.runtime.Runtime`` (limits and timers
    are read from ``runtime.config.main`` when a connection opens); it defaults to
    ``pipeline.current_runtime``.  ``no_reply_steps=False`` makes the MTA wait for
    every step (for benchmarks comparing both).
    """

    protocol = MilterProtocol  # type: ignore[assignment]

    noisy = False  # no "Starting factory" lines: the service logs its listeners itself

    def __init__(
        self,
        pipeline: Any,
        clock: Any,
        settings: Optional[Callable[[], Any]] = None,
        *,
        no_reply_steps: bool = True,
    ) -> None:
        self.pipeline = pipeline
        self.clock = clock
        self.settings: Callable[[], Any] = settings if settings is not None else pipeline.current_runtime
        self.no_reply_steps = no_reply_steps
        #: the process's spool budget (set by the service): how much each read may take
        self.spool_budget: Optional[Any] = None  # rmilter.spool.SpoolBudget
        self.connections: Set[MilterProtocol] = set()
        self.messages_in_flight = 0
        self._waiters: List[Deferred] = []
        #: plain counts read by the metrics at scrape time (``rmilter.metrics.StateCollector``)
        self.progress_sent = 0
        self.protocol_errors: Dict[str, int] = {}

    def buildProtocol(self, addr: Any) -> MilterProtocol:  # type: ignore[override]
        return MilterProtocol(self)

    # -- messages in flight ------------------------------------------------------------------
    def message_started(self) -> None:
        self.messages_in_flight += 1

    def message_finished(self) -> None:
        self.messages_in_flight -= 1
        if self.messages_in_flight <= 0 and self._waiters:
            # on the next turn of the reactor: the verdict that ended the message is written
            # after this call returns, and a graceful stop must not close the connection first
            self.clock.callLater(0, self._wake_waiters)

    def _wake_waiters(self) -> None:
        if self.messages_in_flight > 0:
            return
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.callback(None)

    def wait_for_messages(self) -> "Deferred[None]":
        """Fires when no message is in flight (at once if none is): for a graceful stop."""
        if self.messages_in_flight <= 0:
            return succeed(None)
        waiter: "Deferred[None]" = Deferred(lambda d: self._waiters.remove(d))
        self._waiters.append(waiter)
        return waiter

    def close_idle_connections(self) -> int:
        """Close every connection without a message in flight; returns how many."""
        idle = [p for p in self.connections if not p.busy]
        for protocol in idle:
            protocol.close("shutting down")
        if idle:
            log.info("closed {count} idle milter connections", count=len(idle))
        return len(idle)
