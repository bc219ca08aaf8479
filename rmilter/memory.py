"""Giving freed message buffers back to the system after a burst (issue 19).

CPython frees a message's buffers at once, but glibc keeps the freed heap pages in its arenas
(one per thread that allocated: the reactor and the spool/signing thread pool), so RSS after a
burst of large messages stays near its peak.  ``malloc_trim(0)`` returns those pages; it costs
a few milliseconds, so the service calls it only when a burst has ended: messages went through
since the last trim and none is in flight.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import gc
from typing import Callable, Optional

_trim: Optional[Callable[[int], int]] = None
try:
    _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    _trim = _libc.malloc_trim
    _trim.argtypes = [ctypes.c_size_t]
    _trim.restype = ctypes.c_int
except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to trim
    _trim = None


def release_free_memory() -> bool:
    """Give freed heap pages back to the system; False where the C library cannot."""
    if _trim is None:
        return False
    _trim(0)
    return True


def freeze_startup_objects() -> None:
    """Move what start-up made (modules, config, classes) out of the garbage collector's sight.

    Message garbage in reference cycles (Deferred chains, failures) that lived through a scan
    reaches the oldest generation, which is collected only when it has grown by a quarter;
    with the hundreds of thousands of start-up objects counted there, that takes long, and
    the messages' buffers (the spool's chunks, the body sent to Rspamd) wait with it.  Frozen
    objects are not counted (nor scanned), so full collections come as often as the message
    garbage calls for and cost little.  Nothing is freed that would otherwise stay alive.
    What the imports and the configuration left free goes back to the system (1.2 MB of the
    idle floor, issue 19).
    """
    gc.collect()
    gc.freeze()
    release_free_memory()


class BurstTrimmer:
    """Called every few seconds: trims once after each burst of messages (not while busy)."""

    def __init__(self, in_flight: Callable[[], int], messages_seen: Callable[[], int],
                 trim: Callable[[], bool] = release_free_memory,
                 collect: Callable[[], int] = gc.collect) -> None:
        self._in_flight = in_flight
        self._seen = messages_seen
        self._trim = trim
        self._collect = collect
        self._seen_at_trim = 0
        #: how many trims ran (for tests and the status page)
        self.trims = 0

    def tick(self) -> None:
        seen = self._seen()
        if seen == self._seen_at_trim or self._in_flight() > 0:
            return
        self._seen_at_trim = seen
        # what the burst left in reference cycles (closed backend connections hold their
        # protocol, parser and request in one) is freed first, so that its pages can go back too
        self._collect()
        if self._trim():
            self.trims += 1
