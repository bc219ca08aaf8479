"""An in-memory clamd for tests: the server side of ``INSTREAM`` with scripted replies.

``FakeClamd`` is a plain Twisted ``Protocol``: it parses ``zINSTREAM\\0`` /
``nINSTREAM\\n`` and the chunk stream, records every chunk's size, and answers
as its ``Script`` says (OK, FOUND, ERROR, raw bytes, close in the middle of the
stream, or silence), optionally enforcing a ``StreamMaxLength`` as clamd does.

``MemoryClamdNetwork`` serves the connections a client made on a
``MemoryReactorClock``: each address (``(host, port)`` or a unix path) is
mapped to a script, to ``REFUSE`` or to ``HANG``; ``run()`` accepts pending
connections and moves bytes both ways until nothing moves.  The client's
transport has a bounded buffer and pauses its producer when the buffer is
full, like a real TCP transport, so backpressure is exercised too.

It can also listen for real (``FakeClamdFactory``) when a test wants a socket.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple, Union

from twisted.internet import error as neterror
from twisted.internet.address import IPv4Address, UNIXAddress
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure

SIZE_LIMIT_REPLY = b"INSTREAM size limit exceeded. ERROR"


@dataclass(frozen=True)
class Script:
    """How a ``FakeClamd`` answers one connection.

    ``reply``: bytes sent (followed by the command's terminator unless ``raw``)
    once the zero-length chunk arrived; None = never answer.
    ``close_after``: close without a reply once this many data bytes arrived.
    ``stream_max_length``: like clamd's ``StreamMaxLength``: past it, answer the
    size-limit ERROR and close at once.
    ``raw``: send ``reply`` exactly as given (no terminator added).
    """

    reply: Optional[bytes] = b"stream: OK"
    close_after: Optional[int] = None
    stream_max_length: Optional[int] = None
    raw: bool = False
    close_after_reply: bool = True

    @classmethod
    def ok(cls, **kw: Any) -> "Script":
        return cls(b"stream: OK", **kw)

    @classmethod
    def found(cls, name: str, **kw: Any) -> "Script":
        return cls(b"stream: " + name.encode() + b" FOUND", **kw)

    @classmethod
    def error(cls, text: bytes = SIZE_LIMIT_REPLY, **kw: Any) -> "Script":
        return cls(text, **kw)

    @classmethod
    def exact(cls, data: bytes, **kw: Any) -> "Script":
        """Send these bytes as they are (an empty or garbled reply)."""
        return cls(data, raw=True, **kw)

    @classmethod
    def close_mid_stream(cls, after: int) -> "Script":
        return cls(None, close_after=after)

    @classmethod
    def silence(cls) -> "Script":
        return cls(None)


class FakeClamd(Protocol):
    """One clamd connection: parse INSTREAM, record chunk sizes, answer per the script."""

    def __init__(self, script: Script = Script()) -> None:
        self.script = script
        self.buffer = bytearray()
        self.command: Optional[bytes] = None
        self.terminator = b"\0"
        self.chunk_sizes: List[int] = []
        self.received = bytearray()  # the streamed message bytes
        self.stream_ended = False
        self.replied = False
        self.closed = False
        self._pending_chunk: Optional[int] = None

    @property
    def data_bytes(self) -> int:
        return len(self.received)

    def dataReceived(self, data: bytes) -> None:
        if self.closed or self.replied:
            return
        self.buffer += data
        if self.command is None:
            for term in (b"\0", b"\n"):
                at = self.buffer.find(term)
                if at != -1:
                    break
            else:
                return
            self.command = bytes(self.buffer[:at])
            self.terminator = b"\0" if self.command.startswith(b"z") else b"\n"
            del self.buffer[: at + 1]
            if self.command[1:] != b"INSTREAM":
                self._answer(b"UNKNOWN COMMAND")
                return
        self._parse_chunks()

    def _parse_chunks(self) -> None:
        while not self.closed and not self.replied:
            if self._pending_chunk is None:
                if len(self.buffer) < 4:
                    return
                (length,) = struct.unpack("!I", self.buffer[:4])
                del self.buffer[:4]
                if length == 0:
                    self.stream_ended = True
                    self._end_of_stream()
                    return
                self._pending_chunk = length
                self.chunk_sizes.append(length)
            take = min(self._pending_chunk, len(self.buffer))
            if take == 0:
                return
            self.received += self.buffer[:take]
            del self.buffer[:take]
            self._pending_chunk -= take
            if self._pending_chunk == 0:
                self._pending_chunk = None
            script = self.script
            if script.stream_max_length is not None and self.data_bytes > script.stream_max_length:
                self._answer(SIZE_LIMIT_REPLY)
                return
            if script.close_after is not None and self.data_bytes >= script.close_after:
                self.close()
                return

    def _end_of_stream(self) -> None:
        if self.script.reply is None:
            return  # silence
        self._answer(self.script.reply, raw=self.script.raw)

    def _answer(self, text: bytes, raw: bool = False) -> None:
        self.replied = True
        transport: Any = self.transport
        transport.write(text if raw else text + self.terminator)
        if self.script.close_after_reply:
            self.close()

    def close(self) -> None:
        self.closed = True
        transport: Any = self.transport
        transport.loseConnection()


class FakeClamdFactory(Factory):
    """Serves ``FakeClamd`` over a real listening port; remembers every connection."""

    def __init__(self, script: Script = Script()) -> None:
        self.script = script
        self.connections: List[FakeClamd] = []

    def buildProtocol(self, addr: Any) -> FakeClamd:
        proto = FakeClamd(self.script)
        proto.factory = self
        self.connections.append(proto)
        return proto


# -- in-memory connections ----------------------------------------------------------------------
class _PipeEnd(StringTransport):
    """One side of an in-memory connection; ``buffer_limit`` pauses a streaming producer."""

    def __init__(self, buffer_limit: Optional[int], peer_address: Any, host_address: Any) -> None:
        super().__init__(hostAddress=host_address, peerAddress=peer_address)
        self.buffer_limit = buffer_limit
        self.paused_producer = False
        self.pauses = 0
        self.max_buffered = 0

    def write(self, data: bytes) -> None:
        if self.disconnecting:
            return  # like a real transport: writes after close are dropped
        super().write(data)
        self._check_buffer()

    def writeSequence(self, data: Any) -> None:
        if self.disconnecting:
            return
        super().writeSequence(data)
        self._check_buffer()

    def _check_buffer(self) -> None:
        buffered = len(self.io.getvalue())
        self.max_buffered = max(self.max_buffered, buffered)
        if (
            self.buffer_limit is not None
            and self.producer is not None
            and self.streaming
            and not self.paused_producer
            and buffered > self.buffer_limit
        ):
            self.paused_producer = True
            self.pauses += 1
            self.producer.pauseProducing()

    def take(self) -> bytes:
        data = self.value()
        self.clear()
        return data

    def drained(self) -> None:
        """The peer read everything: resume a paused producer, as a TCP transport does."""
        if self.paused_producer and self.producer is not None:
            self.paused_producer = False
            self.producer.resumeProducing()


@dataclass
class ClamdLink:
    """A client protocol and a ``FakeClamd`` joined in memory."""

    client: Protocol
    server: FakeClamd
    client_transport: _PipeEnd
    server_transport: _PipeEnd
    open: bool = True
    #: bytes moved from the client to the server so far
    moved: int = 0

    def pump(self) -> bool:
        """Move bytes until nothing moves; True if anything happened."""
        progressed = False
        while self.open:
            step = False
            to_server = self.client_transport.take()
            if to_server:
                step = True
                self.moved += len(to_server)
                self.server.dataReceived(to_server)
            to_client = self.server_transport.take()
            if to_client:
                step = True
                self.client.dataReceived(to_client)
            if self.server_transport.disconnecting or self.client_transport.disconnecting:
                self._close()
                return True
            if to_server:
                self.client_transport.drained()
                step = step or bool(self.client_transport.value())
            if not step:
                break
            progressed = True
        return progressed

    def _close(self) -> None:
        """Deliver connectionLost to both sides (aborted = RST for the one that aborted)."""
        self.open = False
        client_aborted = self.client_transport.disconnected
        self.server.closed = True
        self.server.connectionLost(Failure(neterror.ConnectionDone() if not client_aborted
                                           else neterror.ConnectionLost()))
        if self.client_transport.producer is not None:
            self.client_transport.producer.stopProducing()
        self.client.connectionLost(Failure(neterror.ConnectionDone()))


#: address behaviours for ``MemoryClamdNetwork``
REFUSE = "refuse"
HANG = "hang"
Behaviour = Union[Script, str]
Address = Union[Tuple[str, int], str]


@dataclass
class MemoryClamdNetwork:
    """Answers the clamd connections a client opened on a ``MemoryReactorClock``."""

    reactor: MemoryReactorClock
    client_buffer_limit: int = 128 * 1024
    behaviours: Dict[Address, List[Behaviour]] = field(default_factory=dict)
    links: List[ClamdLink] = field(default_factory=list)
    attempts: List[Address] = field(default_factory=list)
    _tcp_seen: int = 0
    _unix_seen: int = 0
    _connectors_seen: int = 0
    _hanging: List[Tuple[Any, Any]] = field(default_factory=list)

    def add(self, address: Address, *behaviours: Behaviour) -> None:
        """Script the next connections to ``address``; the last behaviour repeats."""
        self.behaviours[address] = list(behaviours)

    def _next_behaviour(self, address: Address) -> Behaviour:
        queue = self.behaviours.get(address)
        if not queue:
            return REFUSE
        return queue.pop(0) if len(queue) > 1 else queue[0]

    def servers(self, address: Address) -> List[FakeClamd]:
        return [link.server for link in self.links if self._address_of(link) == address]

    @staticmethod
    def _address_of(link: ClamdLink) -> Address:
        peer = link.client_transport.getPeer()
        if isinstance(peer, UNIXAddress):
            name = peer.name
            return name.decode() if isinstance(name, bytes) else str(name)
        return (peer.host, peer.port)

    def accept_pending(self) -> bool:
        """Answer every connection attempt made since the last call."""
        progressed = False
        while self._connectors_seen < len(self.reactor.connectors):
            connector = self.reactor.connectors[self._connectors_seen]
            self._connectors_seen += 1
            destination = connector.getDestination()
            if isinstance(destination, UNIXAddress):
                path, factory, _timeout, _check = self.reactor.unixClients[self._unix_seen]
                self._unix_seen += 1
                address: Address = path
            else:
                host, port, factory, _timeout, _bind = self.reactor.tcpClients[self._tcp_seen]
                self._tcp_seen += 1
                address = (host, port)
            progressed = True
            self.attempts.append(address)
            if connector.stoppedConnecting:
                continue  # the client gave up (connect timeout) before we answered
            behaviour = self._next_behaviour(address)
            if behaviour == HANG:
                self._hanging.append((connector, factory))
                continue
            if not isinstance(behaviour, Script):
                factory.clientConnectionFailed(connector, Failure(neterror.ConnectionRefusedError()))
                continue
            server = FakeClamd(behaviour)
            host_addr = IPv4Address("TCP", "127.0.0.1", 40000 + len(self.links))
            client_t = _PipeEnd(self.client_buffer_limit, peer_address=destination, host_address=host_addr)
            server_t = _PipeEnd(None, peer_address=host_addr, host_address=destination)
            client = factory.buildProtocol(destination)
            link = ClamdLink(client, server, client_t, server_t)
            self.links.append(link)
            server.makeConnection(server_t)
            client.makeConnection(client_t)
        return progressed

    def run(self) -> None:
        """Accept connections and move bytes until the network is quiet."""
        while True:
            progressed = self.accept_pending()
            for link in list(self.links):
                if link.open and link.pump():
                    progressed = True
            if not progressed:
                return
