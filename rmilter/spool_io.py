"""One thread for every spool file operation of the process (issue 19).

Twisted's thread pool costs a queue hand-off, a wake-up of one of ten threads and a
``callFromThread`` per call; with 64 big messages on disk that was a third of the process's
CPU (futex wake-ups and the ten threads fighting for the GIL).  Spool writes are small and
many, so they go to one thread of their own, which takes every operation queued since it
last looked, runs them in order, and hands all their results back to the reactor in one
``callFromThread``.  One thread also keeps each spool's operations in the order they were
queued, which is what a spool needs (write, write, read, delete).
"""
from __future__ import annotations

import threading
from collections import deque
from typing import Any, Callable, Deque, List, Optional, Tuple

from twisted.internet.defer import Deferred, succeed
from twisted.python.failure import Failure

def _nothing() -> None:
    return None


_Job = Tuple[Callable[..., Any], tuple, Deferred]


class SpoolIO:
    """A ``BlockingRunner`` backed by one daemon thread; started on first use."""

    def __init__(self, reactor: Any, name: str = "rmilter-spool") -> None:
        self._reactor = reactor
        self._name = name
        self._jobs: Deque[_Job] = deque()
        self._wake = threading.Condition(threading.Lock())
        self._idle = True  # the thread waits for work (guarded by _wake)
        self._thread: Optional[threading.Thread] = None
        self._stopping = False
        #: batches handed back and operations run (for the benchmark and tests)
        self.batches = 0
        self.operations = 0

    def __call__(self, f: Callable[..., Any], *args: Any) -> Deferred:
        d: Deferred = Deferred()
        with self._wake:
            self._jobs.append((f, args, d))
            if self._thread is None:
                self._thread = threading.Thread(target=self._work, name=self._name, daemon=True)
                self._thread.start()
            elif self._idle:
                self._wake.notify()
        return d

    def drain(self) -> Deferred:
        """Fires once every operation queued before this call has run (at once if none waits)."""
        with self._wake:
            if not self._jobs and (self._thread is None or self._idle):
                return succeed(None)
        return self(_nothing)

    def stop(self) -> None:
        """Let the thread end once the queue is empty (operations queued later start a new one)."""
        with self._wake:
            self._stopping = True
            self._wake.notify()

    def _work(self) -> None:
        while True:
            with self._wake:
                while not self._jobs:
                    if self._stopping:
                        self._thread = None
                        self._stopping = False
                        return
                    self._idle = True
                    self._wake.wait()
                self._idle = False
                jobs = list(self._jobs)
                self._jobs.clear()
            results: List[Tuple[Deferred, bool, Any]] = []
            for f, args, d in jobs:
                try:
                    results.append((d, True, f(*args)))
                except BaseException:
                    results.append((d, False, Failure()))
            self._reactor.callFromThread(self._deliver, results)

    def _deliver(self, results: List[Tuple[Deferred, bool, Any]]) -> None:
        self.batches += 1
        self.operations += len(results)
        for d, ok, value in results:
            if ok:
                d.callback(value)
            else:
                d.errback(value)
