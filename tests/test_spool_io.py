"""The spool files' one I/O thread (rmilter/spool_io.py): order, batching, failures, stop.

These run a real thread against the real reactor; every wait is on a Deferred or a
threading.Event, never on the wall clock.
"""
from __future__ import annotations

import os
import tempfile
import threading
from typing import Any, List

from twisted.internet import reactor, task
from twisted.internet.defer import DeferredList, inlineCallbacks
from twisted.trial import unittest

from rmilter.spool import Spool
from rmilter.spool_io import SpoolIO


class SpoolIOTests(unittest.TestCase):
    def setUp(self) -> None:
        self.io = SpoolIO(reactor)
        self.addCleanup(self.io.stop)

    @inlineCallbacks
    def test_runs_in_order_on_one_thread_and_answers_on_the_reactor(self) -> Any:
        seen: List[tuple] = []
        main = threading.get_ident()

        def op(n: int) -> int:
            seen.append((n, threading.get_ident()))
            return n * 10

        results = yield DeferredList([self.io(op, n) for n in range(50)], fireOnOneErrback=True)
        self.assertEqual([value for _ok, value in results], [n * 10 for n in range(50)])
        self.assertEqual([n for n, _t in seen], list(range(50)))
        threads = {t for _n, t in seen}
        self.assertEqual(len(threads), 1)
        self.assertNotIn(main, threads)
        self.assertEqual(self.io.operations, 50)

    @inlineCallbacks
    def test_operations_queued_while_busy_come_back_in_one_batch(self) -> Any:
        gate = threading.Event()
        first = self.io(gate.wait)
        rest = [self.io(int, str(n)) for n in range(20)]  # queued behind the blocked first one
        gate.set()
        yield first
        values = yield DeferredList(rest, fireOnOneErrback=True)
        self.assertEqual([v for _ok, v in values], list(range(20)))
        self.assertEqual(self.io.operations, 21)
        self.assertLessEqual(self.io.batches, 3, "20 queued operations should not cost 20 hand-backs")

    @inlineCallbacks
    def test_a_failure_reaches_its_caller_and_later_operations_still_run(self) -> Any:
        def broken() -> None:
            raise OSError(28, "No space left on device")

        failed = self.io(broken)
        later = self.io(len, b"abc")
        with self.assertRaises(OSError) as caught:
            yield failed
        self.assertEqual(caught.exception.errno, 28)
        self.assertEqual((yield later), 3)

    @inlineCallbacks
    def test_drain_waits_for_earlier_operations_and_stop_lets_a_later_call_restart(self) -> Any:
        gate = threading.Event()
        done: List[str] = []
        self.io(lambda: (gate.wait(), done.append("slow")))
        drained = self.io.drain()
        self.assertFalse(drained.called)
        gate.set()
        yield drained
        self.assertEqual(done, ["slow"])
        self.io.stop()
        self.assertEqual((yield self.io(len, b"xy")), 2)

    @inlineCallbacks
    def test_a_spool_on_disk_through_the_thread(self) -> Any:
        """Body past the limit goes to a file, reads back whole, and the file goes at close."""
        tempdir = tempfile.mkdtemp()
        self.addCleanup(os.rmdir, tempdir)
        spool = Spool(tempdir, 0o600, 1000, self.io)
        spool.set_head(b"H: v\r\n\r\n")
        body = [bytes([65 + n % 26]) * 700 for n in range(30)]
        for chunk in body:
            pending = spool.append(chunk)
            if pending is not None:
                yield pending
        yield spool.finish()
        self.assertIsNotNone(spool.path)
        data = yield spool.read(0, spool.size)
        self.assertEqual(data, b"H: v\r\n\r\n" + b"".join(body))
        spool.close()
        # the deletion is queued once the read's own callbacks are done, on this reactor turn
        yield task.deferLater(reactor, 0, lambda: None)
        yield self.io.drain()
        self.assertEqual(os.listdir(tempdir), [])
