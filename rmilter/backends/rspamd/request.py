"""What a scan sends to Rspamd (SPEC §6.8.1): the request header fields and the message body.

The message goes out from the spool: from the one in-memory copy when the
spool lives in memory, else streamed in chunks from the spool file; nothing is
copied again for a retry.  With ``compression`` the body is compressed once per
message (zstd level 1, as C rmilter).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Optional, Tuple, cast

from twisted.internet.defer import Deferred, succeed
from twisted.python.failure import Failure
from twisted.web.iweb import IBodyProducer
from zope.interface import implementer  # type: ignore[import-untyped]

from rmilter.spool import BlockingRunner, Spool

#: the spool file is streamed in pieces of this size
CHUNK_SIZE = 64 * 1024
#: compress in the thread pool from this size on (zstd level 1 is ~1 ms per MiB)
COMPRESS_INLINE_LIMIT = 256 * 1024
#: SPEC §6.8.1: the Settings header of a DKIM-only scan
DKIM_ONLY_SETTINGS = '{"groups_enabled":["dkim"]}'


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
        data, self._data = self._data, b""  # the request object may outlive the scan (issue 19)
        consumer.write(data)
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
            self._failed(Failure(EOFError("spool ended %d bytes early" % (self.length - self._offset,))))
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

