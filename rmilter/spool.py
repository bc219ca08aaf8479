"""The message as scanners see it (SPEC §5.14), kept in memory up to a limit, then in tempdir.

Layout, byte for byte: the synthetic ``Received:`` line, every header as
``name: value\\n``, a synthetic ``Return-Path`` unless one was seen, one
``X-Rcpt-To`` per recipient, ``\\r\\n``, then the body.  The part before the
body (the "head") is small and always in memory.  Body bytes stay in memory
until ``memory_limit``; past it they go to ``tempdir/msg.XXXXXXXX`` through a
thread pool, so the reactor never waits on the disk and memory per message is
bounded.  The first 10 KiB of the body always stay in memory for the
greylisting data hash (SPEC §6.2).
"""
from __future__ import annotations

import os
import tempfile
from typing import Callable, List, Optional, TypeVar

from twisted.internet.defer import Deferred, succeed
from twisted.python.failure import Failure

T = TypeVar("T")
#: runs a blocking callable off the reactor thread and returns a Deferred of its result
BlockingRunner = Callable[..., "Deferred[T]"]

DATA_HASH_PREFIX = 10240


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
    ) -> None:
        self.tempdir = tempdir
        self.mode = mode
        self.memory_limit = memory_limit
        self._run = run_blocking
        self.head = b""
        self.body_prefix = bytearray()  # first DATA_HASH_PREFIX body bytes
        self._memory = bytearray()  # body bytes not yet on disk (all of it while in memory)
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
        self.body_size += len(data)
        self._memory += data
        # the head (headers) counts toward the limit too: it is in memory as well (issue 18)
        if not self._on_disk and len(self.head) + len(self._memory) <= self.memory_limit:
            return None
        self._on_disk = True
        chunk = bytes(self._memory)
        self._memory.clear()
        return self._chain(self._write_blocking, chunk)

    def finish(self) -> "Deferred[None]":
        """Fires when every byte is where ``read`` can find it; fails if a write failed."""
        if not self._on_disk:
            return succeed(None)  # nothing was ever written: no thread round trip
        return self._chain(lambda: None)

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

    def _write_blocking(self, chunk: bytes) -> None:
        """Runs in the thread pool: open the spool file on first use and append."""
        if self._fd is None:
            fd, path = tempfile.mkstemp(prefix="msg.", dir=self.tempdir)
            os.fchmod(fd, self.mode)
            # O_RDWR from mkstemp: the same descriptor serves pread for scanners
            self._fd, self.path = fd, path
        view = memoryview(chunk)
        while view:
            written = os.write(self._fd, view)
            view = view[written:]

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
        if not self._on_disk:
            return succeed(head + bytes(self._memory[body_offset : body_offset + length]))
        if body_offset + length <= len(self.body_prefix):
            return succeed(head + bytes(self.body_prefix[body_offset : body_offset + length]))
        return self._chain(self._read_blocking, body_offset, length).addCallback(lambda body: head + body)

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
            self._joined = b"".join((self.head, self._memory))  # one copy, reused by later callers
        return self._joined

    # -- cleanup ---------------------------------------------------------------------------
    def close(self) -> None:
        """Forget the body and delete the file (after pending writes)."""
        if self.closed:
            return
        self.closed = True
        self._memory = bytearray()
        self._joined = None

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
