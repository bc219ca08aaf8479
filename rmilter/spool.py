"""The message as scanners see it (SPEC §5.14), kept in memory up to a limit, then in tempdir.

Layout, byte for byte: the synthetic ``Received:`` line, every header as
``name: value\\n``, a synthetic ``Return-Path`` unless one was seen, one
``X-Rcpt-To`` per recipient, ``\\r\\n``, then the body.  The part before the
body (the "head") is small and always in memory.  Body bytes stay in memory
until ``memory_limit``; past it they go to ``tempdir/msg.XXXXXXXX`` through a
thread pool, so the reactor never waits on the disk and memory per message is
bounded.  The first 10 KiB of the body always stay in memory for the
greylisting data hash (SPEC §6.2).

Memory across messages is bounded too: every in-memory body draws on one
``SpoolBudget`` (``spool_memory_total``, 4 MiB); a message whose next chunk does not
fit moves to its file at once, so 64 concurrent 1 MB messages cost the budget,
not 64 MB.  Once on disk, body bytes are written in batches of ``WRITE_BATCH``
(the MTA sends BODY chunks of at most 64 KiB: one thread hop per chunk would
cost more than the write); the bytes gathered for a batch draw on the budget
too, so when it is spent every chunk goes to the file as it comes.
"""
from __future__ import annotations

import os
import tempfile
from typing import Callable, List, Optional, TypeVar, Union

from twisted.internet.defer import Deferred, succeed
from twisted.python.failure import Failure

T = TypeVar("T")
#: runs a blocking callable off the reactor thread and returns a Deferred of its result
BlockingRunner = Callable[..., "Deferred[T]"]

DATA_HASH_PREFIX = 10240
#: body bytes gathered before one write to the spool file
WRITE_BATCH = 256 * 1024
#: chunks per writev (Linux's IOV_MAX is 1024)
IOV_MAX = 512


class SpoolBudget:
    """Bytes of message bodies all in-memory spools may hold together (one per process).

    A plain counter: the reactor thread is the only one that reserves and releases.
    """

    def __init__(self, total: int) -> None:
        #: 0 means no budget across messages (only the per-message limit applies)
        self.total = total
        self.in_use = 0
        self.peak = 0
        #: spools sent to disk because the budget was spent
        self.refused = 0
        #: spools made since start, and spools not yet closed (messages in flight)
        self.opened = 0
        self.open = 0

    def reserve(self, size: int) -> bool:
        """Take ``size`` bytes if they fit; False sends the caller to disk."""
        if self.total and self.in_use + size > self.total:
            self.refused += 1
            return False
        self.in_use += size
        if self.in_use > self.peak:
            self.peak = self.in_use
        return True

    def release(self, size: int) -> None:
        self.in_use -= size


def run_inline(f: Callable[..., T], *args: object) -> "Deferred[T]":
    """A BlockingRunner for unit tests: runs the call at once."""
    from twisted.internet.defer import maybeDeferred

    return maybeDeferred(f, *args)


def spool_head(
    *,
    helo: str,
    hostname: str,
    client_address: Optional[str],
    tag: str,
    headers: List[tuple],
    has_return_path: bool,
    envelope_from: str,
    recipients: List[str],
) -> bytes:
    """Build the bytes before the body exactly as C does (SPEC §5.14, B30 mixed line ends)."""
    parts = [
        "Received: from %s (%s [%s]) by localhost (Postfix) with ESMTP id %s;\r\n"
        % (helo, hostname, client_address or "", tag)
    ]
    for name, value in headers:
        parts.append("%s: %s\n" % (name, value))
    if not has_return_path:
        parts.append("Return-Path: <%s>\r\n" % (envelope_from,))
    for rcpt in recipients:
        parts.append("X-Rcpt-To: %s\r\n" % (rcpt,))
    parts.append("\r\n")
    return "".join(parts).encode("utf-8", "surrogateescape")


class Spool:
    """Head bytes plus a body that moves to a file past ``memory_limit``."""

    def __init__(
        self,
        tempdir: str,
        mode: int,
        memory_limit: int,
        run_blocking: BlockingRunner,
        budget: Optional[SpoolBudget] = None,
    ) -> None:
        self.tempdir = tempdir
        self.mode = mode
        self.memory_limit = memory_limit
        self._run = run_blocking
        self._budget = budget
        self._reserved = 0  # bytes of _memory taken from the budget
        if budget is not None:
            budget.opened += 1
            budget.open += 1
        self.head = b""
        self.body_prefix = bytearray()  # first DATA_HASH_PREFIX body bytes
        #: body chunks not yet on disk (all of them while in memory): the BODY payloads as they
        #: came, never copied into one growing buffer (issue 19: a copy per byte less, and a
        #: file write is one writev of the gathered chunks)
        self._memory: List[Union[bytes, memoryview]] = []
        self._memory_size = 0
        self.body_size = 0
        self.path: Optional[str] = None  # set by the writer thread when the file exists
        self._on_disk = False  # set at once when the body starts moving to the file
        self._fd: Optional[int] = None
        self._tail: "Deferred[None]" = succeed(None)  # file operations run one after another
        self.failed: Optional[BaseException] = None
        self._joined: Optional[bytes] = None  # cache of memory_bytes()
        self.closed = False

    # -- writing ---------------------------------------------------------------------------
    @property
    def size(self) -> int:
        return len(self.head) + self.body_size

    @property
    def in_memory(self) -> bool:
        return not self._on_disk

    def set_head(self, head: bytes) -> None:
        self.head = head

    def append(self, data: bytes) -> Optional["Deferred[None]"]:
        """Add body bytes; returns a Deferred when a disk write was started (backpressure)."""
        if not data:
            return None
        if len(self.body_prefix) < DATA_HASH_PREFIX:
            self.body_prefix += data[: DATA_HASH_PREFIX - len(self.body_prefix)]
        if type(data) is not bytes:
            data = bytes(data)  # a view or bytearray could change under us
        if self._joined is not None and not self._on_disk:
            self._memory = [self._joined[len(self.head):]]  # appended after memory_bytes(): unview
            self._joined = None
        self.body_size += len(data)
        self._memory.append(data)
        self._memory_size += len(data)
        if not self._on_disk:
            # the head (headers) counts toward the limit too: it is in memory as well (issue 18)
            if len(self.head) + self._memory_size <= self.memory_limit and self._take(len(data)):
                return None
            self._on_disk = True
        elif self._memory_size < WRITE_BATCH and self._take(len(data)):
            return None  # gathered for a larger write, within the budget
        return self._flush()

    def _take(self, size: int) -> bool:
        if self._budget is None:
            return True
        if not self._budget.reserve(size):
            return False
        self._reserved += size
        return True

    def _give_back(self) -> None:
        if self._budget is not None and self._reserved:
            self._budget.release(self._reserved)
        self._reserved = 0

    def _flush(self) -> "Deferred[None]":
        """Queue the gathered body bytes for the file (one thread hop per batch)."""
        chunks, self._memory, self._memory_size = self._memory, [], 0
        self._joined = None
        held, self._reserved = self._reserved, 0
        written = self._chain(self._write_blocking, chunks)
        if held and self._budget is not None:
            budget = self._budget

            def written_out(result: object) -> object:
                budget.release(held)  # the bytes leave memory only once they are in the file
                return result

            written.addBoth(written_out)
        return written

    def finish(self) -> "Deferred[None]":
        """Fires when every byte is where ``read`` can find it; fails if a write failed."""
        if not self._on_disk:
            return succeed(None)  # nothing was ever written: no thread round trip
        if self._memory:
            self._flush()
        return self._settled()

    def _settled(self) -> "Deferred[None]":
        """Fires once every queued file operation has run (no thread hop of its own)."""
        done: "Deferred[None]" = Deferred()

        def settle(_: object) -> None:
            if self.failed is not None:
                done.errback(self.failed)
            else:
                done.callback(None)

        self._tail.addCallback(settle)
        return done

    def _chain(self, f: Callable[..., T], *args: object) -> "Deferred[T]":
        """Run ``f`` after every earlier file operation; the tail of the queue never fails."""
        done: "Deferred[T]" = Deferred()

        def start(_: object) -> Optional["Deferred[None]"]:
            if self.failed is not None:
                done.errback(self.failed)
                return None
            step = self._run(f, *args)

            def failed(failure: Failure) -> None:
                self.failed = failure.value
                done.errback(failure)

            step.addCallbacks(done.callback, failed)
            return step

        self._tail.addCallback(start)
        return done

    def _write_blocking(self, chunks: List[Union[bytes, memoryview]]) -> None:
        """Runs in the thread pool: open the spool file on first use and append (one writev)."""
        if self._fd is None:
            fd, path = tempfile.mkstemp(prefix="msg.", dir=self.tempdir)
            os.fchmod(fd, self.mode)
            # O_RDWR from mkstemp: the same descriptor serves pread for scanners
            self._fd, self.path = fd, path
        pending: List[Union[bytes, memoryview]] = list(chunks)
        while pending:
            written = os.writev(self._fd, pending[:IOV_MAX])
            while written:  # drop what went out; a short write leaves part of a chunk
                first = len(pending[0])
                if written >= first:
                    written -= first
                    pending.pop(0)
                else:
                    pending[0] = memoryview(pending[0])[written:]
                    written = 0

    # -- reading ---------------------------------------------------------------------------
    def read(self, offset: int, length: int) -> "Deferred[bytes]":
        """Up to ``length`` bytes of the whole spool (head + body) from ``offset``.

        Short only at the end of the spool.  Served from memory when possible, from
        the file through the thread pool (after pending writes) otherwise.
        """
        head = b""
        head_len = len(self.head)
        if offset < head_len:
            head = self.head[offset : offset + length]
            length -= len(head)
            offset = head_len
            if length <= 0:
                return succeed(head)
        body_offset = offset - head_len
        if self._on_disk and self._memory:
            self._flush()  # a read before finish(): the file must hold every byte
        if not self._on_disk:
            return succeed(head + self._memory_slice(body_offset, length))
        if body_offset + length <= len(self.body_prefix):
            return succeed(head + bytes(self.body_prefix[body_offset : body_offset + length]))
        return self._chain(self._read_blocking, body_offset, length).addCallback(lambda body: head + body)

    def _memory_slice(self, offset: int, length: int) -> bytes:
        """Body bytes from the in-memory chunks; a whole chunk is handed out as it is (no copy)."""
        parts: List[Union[bytes, memoryview]] = []
        start = 0
        for chunk in self._memory:
            end = start + len(chunk)
            if end > offset and length > 0:
                lo = offset - start if offset > start else 0
                piece = chunk if lo == 0 and len(chunk) <= length else chunk[lo : lo + length]
                parts.append(piece)
                length -= len(piece)
                offset += len(piece)
            start = end
            if length <= 0:
                break
        if len(parts) == 1:
            return bytes(parts[0]) if type(parts[0]) is memoryview else parts[0]
        return b"".join(parts)

    def _read_blocking(self, offset: int, length: int) -> bytes:
        assert self._fd is not None
        return os.pread(self._fd, length, offset)

    def read_all(self) -> "Deferred[bytes]":
        """The whole spool in one buffer: only for small consumers (tests, pub/sub)."""
        return self.read(0, self.size)

    def memory_bytes(self) -> Optional[bytes]:
        """The whole spool when it lives in memory, else None."""
        if self._on_disk:
            return None
        if self._joined is None or len(self._joined) != self.size:
            joined = b"".join([self.head, *self._memory])  # one copy, reused by later callers
            # the chunks become a view of it: the body is held once, not twice (issue 19)
            self._memory = [memoryview(joined)[len(self.head):]]
            self._joined = joined
        return self._joined

    # -- cleanup ---------------------------------------------------------------------------
    def close(self) -> None:
        """Forget the body and delete the file (after pending writes)."""
        if self.closed:
            return
        self.closed = True
        self._memory, self._memory_size = [], 0
        self._joined = None
        self._give_back()
        if self._budget is not None:
            self._budget.open -= 1

        def remove(_: object) -> None:
            fd, path = self._fd, self.path
            self._fd = None
            if fd is not None:
                self._run(self._remove_blocking, fd, path).addErrback(lambda f: None)

        self._tail.addCallback(remove)

    @staticmethod
    def _remove_blocking(fd: int, path: Optional[str]) -> None:
        os.close(fd)
        if path:
            os.unlink(path)
