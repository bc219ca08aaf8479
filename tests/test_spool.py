"""The message spool: SPEC §5.14 bytes, memory limit, file in tempdir, cleanup."""
from __future__ import annotations

import os
import stat
import tempfile

from twisted.trial.unittest import SynchronousTestCase

from rmilter.spool import DATA_HASH_PREFIX, WRITE_BATCH, Spool, SpoolBudget, run_inline, spool_head


class SpoolHeadTests(SynchronousTestCase):
    def test_head_bytes_match_c_layout(self) -> None:
        """Received line, headers with bare LF, synthetic Return-Path and X-Rcpt-To with CRLF (B30)."""
        head = spool_head(
            helo="mail.example.net",
            hostname="mail.example.net",
            client_address="192.0.2.10",
            tag="0123456789",
            headers=[("Subject", "hello"), ("X-Folded", "a\n\tb")],
            has_return_path=False,
            envelope_from="a@example.net",
            recipients=["<b@example.org>", "<C@example.org>"],
        )
        self.assertEqual(
            head,
            b"Received: from mail.example.net (mail.example.net [192.0.2.10]) by localhost (Postfix) "
            b"with ESMTP id 0123456789;\r\n"
            b"Subject: hello\n"
            b"X-Folded: a\n\tb\n"
            b"Return-Path: <a@example.net>\r\n"
            b"X-Rcpt-To: <b@example.org>\r\n"
            b"X-Rcpt-To: <C@example.org>\r\n"
            b"\r\n",
        )

    def test_existing_return_path_suppresses_synthetic_one(self) -> None:
        head = spool_head(
            helo="h", hostname="n", client_address=None, tag="t", headers=[("Return-Path", "<x@y>")],
            has_return_path=True, envelope_from="", recipients=[],
        )
        self.assertEqual(head.count(b"Return-Path"), 1)
        self.assertIn(b"(n [])", head)


class SpoolTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.tempdir = tempfile.mkdtemp()
        self.addCleanup(lambda: os.rmdir(self.tempdir))

    def make(self, limit: int = 100) -> Spool:
        spool = Spool(self.tempdir, 0o640, limit, run_inline)
        self.addCleanup(spool.close)
        spool.set_head(b"HEAD\r\n\r\n")
        return spool

    def test_small_body_stays_in_memory(self) -> None:
        """Below the limit no file is created and reads are served from memory."""
        spool = self.make()
        self.assertIsNone(spool.append(b"hello\r\n"))
        self.successResultOf(spool.finish())
        self.assertTrue(spool.in_memory)
        self.assertEqual(os.listdir(self.tempdir), [])
        self.assertEqual(self.successResultOf(spool.read_all()), b"HEAD\r\n\r\nhello\r\n")
        self.assertEqual(spool.size, 15)
        self.assertEqual(spool.memory_bytes(), b"HEAD\r\n\r\nhello\r\n")

    def test_chunks_read_across_boundaries_and_after_memory_bytes(self) -> None:
        """In-memory chunks kept as they came: any slice reads right, a whole chunk without a copy,
        and memory_bytes() (one joined copy that the chunks become a view of) changes no read."""
        spool = self.make(limit=1000)
        chunks = [b"a" * 10, b"b" * 20, b"c" * 30]
        for chunk in chunks:
            self.assertIsNone(spool.append(chunk))
        whole = b"HEAD\r\n\r\n" + b"".join(chunks)
        head = len(b"HEAD\r\n\r\n")
        self.assertIs(self.successResultOf(spool.read(head + 10, 20)), chunks[1])
        for offset, length in ((0, 5), (3, 20), (head + 5, 10), (head + 9, 40), (head + 55, 100), (0, 999)):
            self.assertEqual(self.successResultOf(spool.read(offset, length)), whole[offset:offset + length])
        self.assertEqual(spool.memory_bytes(), whole)
        for offset, length in ((head + 5, 10), (head + 9, 40), (0, 999)):
            got = self.successResultOf(spool.read(offset, length))
            self.assertIs(type(got), bytes)
            self.assertEqual(got, whole[offset:offset + length])
        self.assertIsNone(spool.append(b"d"))  # after memory_bytes(): the view is let go
        self.assertEqual(self.successResultOf(spool.read_all()), whole + b"d")
        self.assertEqual(spool.memory_bytes(), whole + b"d")

    def test_headers_count_toward_the_memory_limit(self) -> None:
        """A head at the limit sends the first body byte to the file (issue 18)."""
        spool = self.make(limit=8)
        self.assertIsNone(spool.append(b""))
        self.assertIsNotNone(spool.append(b"x"))

    def test_large_body_moves_to_file_with_mode(self) -> None:
        """Past the limit (head + body, issue 18) the body goes to tempdir/msg.* with tempfiles_mode;
        reads span head and file."""
        spool = self.make(limit=8 + 10)  # HEAD\r\n\r\n is 8 bytes
        self.assertIsNone(spool.append(b"0123456789"))
        pending = spool.append(b"abcdef")
        self.assertIsNotNone(pending)
        self.successResultOf(pending)
        self.assertIsNone(self.successResultOf(spool.append(b"XYZ") or spool.finish()))
        self.successResultOf(spool.finish())
        self.assertFalse(spool.in_memory)
        [name] = os.listdir(self.tempdir)
        self.assertTrue(name.startswith("msg."))
        self.assertEqual(stat.S_IMODE(os.stat(os.path.join(self.tempdir, name)).st_mode), 0o640)
        self.assertEqual(self.successResultOf(spool.read_all()), b"HEAD\r\n\r\n0123456789abcdefXYZ")
        self.assertEqual(self.successResultOf(spool.read(4, 8)), b"\r\n\r\n0123")
        self.assertEqual(self.successResultOf(spool.read(8, 5)), b"01234")
        self.assertEqual(self.successResultOf(spool.read(20, 100)), b"cdefXYZ")
        self.assertIsNone(spool.memory_bytes())
        spool.close()
        self.assertEqual(os.listdir(self.tempdir), [])

    def test_body_prefix_keeps_first_10k(self) -> None:
        """The greylisting data hash needs the first 10240 body bytes even when the body is on disk."""
        spool = self.make(limit=1000)
        data = bytes(range(256)) * 100
        self.successResultOf(spool.append(data))
        self.assertEqual(bytes(spool.body_prefix), data[:DATA_HASH_PREFIX])
        self.assertEqual(spool.body_size, len(data))
        spool.close()

    def test_empty_chunk_is_accepted(self) -> None:
        """B35: an empty BODY chunk is not an error."""
        spool = self.make()
        self.assertIsNone(spool.append(b""))
        self.assertEqual(spool.body_size, 0)

    def test_write_failure_is_reported_and_sticky(self) -> None:
        """A failed disk write fails the pending write and every later finish()."""
        spool = Spool("/nonexistent-dir-for-rmilter-tests", 0o600, 1, run_inline)
        failure = self.failureResultOf(spool.append(b"abc"))
        self.assertIsInstance(failure.value, OSError)
        self.failureResultOf(spool.finish(), OSError)
        spool.close()


class DeferredRunner:
    """A BlockingRunner whose calls run only when the test says so (like a busy thread pool)."""

    def __init__(self) -> None:
        from twisted.internet.defer import Deferred

        self.queue: list = []
        self._Deferred = Deferred

    def __call__(self, f, *args):  # type: ignore[no-untyped-def]
        d = self._Deferred()
        self.queue.append((f, args, d))
        return d

    def run_all(self) -> None:
        while self.queue:
            f, args, d = self.queue.pop(0)
            try:
                d.callback(f(*args))
            except Exception as e:  # the runner reports exceptions as failures, like deferToThread
                d.errback(e)


class SlowDiskTests(SynchronousTestCase):
    def test_appends_while_a_write_is_pending_keep_order(self) -> None:
        """Chunks arriving while the first disk write waits are written after it, in order, none lost."""
        tempdir = tempfile.mkdtemp()
        runner = DeferredRunner()
        spool = Spool(tempdir, 0o600, 4, runner)
        spool.set_head(b"H\r\n")
        first = spool.append(b"aaaaa")
        second = spool.append(b"bb")
        self.assertIsNone(second, "a small chunk on disk waits for a batch")
        finished = spool.finish()
        self.assertNoResult(first)
        self.assertNoResult(finished)
        runner.run_all()
        self.successResultOf(first)
        self.successResultOf(finished)
        read = spool.read_all()
        runner.run_all()
        self.assertEqual(self.successResultOf(read), b"H\r\naaaaabb")
        spool.close()
        runner.run_all()
        self.assertEqual(os.listdir(tempdir), [])
        os.rmdir(tempdir)


class MemoryBytesTests(SynchronousTestCase):
    def test_joined_once_and_refreshed_after_append(self) -> None:
        """memory_bytes() joins head and body once; more body bytes give a fresh buffer."""
        spool = Spool(tempfile.gettempdir(), 0o600, 1000, run_inline)
        spool.set_head(b"H\r\n\r\n")
        spool.append(b"one")
        first = spool.memory_bytes()
        self.assertIs(spool.memory_bytes(), first)
        spool.append(b"two")
        self.assertEqual(spool.memory_bytes(), b"H\r\n\r\nonetwo")
        spool.close()


class BatchedWriteTests(SynchronousTestCase):
    def test_body_on_disk_is_written_in_batches(self) -> None:
        """64 KiB BODY chunks past the limit cost one thread hop per WRITE_BATCH, not per chunk."""
        tempdir = tempfile.mkdtemp()
        calls: list = []

        def counting(f, *args):  # type: ignore[no-untyped-def]
            calls.append(f)
            return run_inline(f, *args)

        spool = Spool(tempdir, 0o600, 1024, counting)
        spool.set_head(b"H\r\n\r\n")
        chunk = b"x" * 65536
        for _ in range(32):  # 2 MiB
            spool.append(chunk)
        self.successResultOf(spool.finish())
        writes = [f for f in calls if getattr(f, "__name__", "") == "_write_blocking"]
        self.assertLessEqual(len(writes), 2 * 1024 * 1024 // WRITE_BATCH + 2)
        self.assertEqual(self.successResultOf(spool.read(len(b"H\r\n\r\n"), 3)), b"xxx")
        self.assertEqual(len(self.successResultOf(spool.read_all())), 2 * 1024 * 1024 + 5)
        spool.close()
        self.assertEqual(os.listdir(tempdir), [])
        os.rmdir(tempdir)

    def test_read_before_finish_sees_gathered_bytes(self) -> None:
        """Bytes gathered for the next batch are flushed before a read from the file."""
        tempdir = tempfile.mkdtemp()
        spool = Spool(tempdir, 0o600, 4, run_inline)
        spool.set_head(b"H")
        spool.append(b"abcdef")
        spool.append(b"gh")
        self.assertEqual(self.successResultOf(spool.read(0, 100)), b"Habcdefgh")
        spool.close()
        os.rmdir(tempdir)


class SpoolBudgetTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.tempdir = tempfile.mkdtemp()
        self.addCleanup(lambda: os.rmdir(self.tempdir))

    def test_message_that_does_not_fit_goes_to_disk_at_once(self) -> None:
        """Two messages share a 1000-byte budget: the second one's body does not fit and is spooled."""
        budget = SpoolBudget(1000)
        first = Spool(self.tempdir, 0o600, 10000, run_inline, budget)
        second = Spool(self.tempdir, 0o600, 10000, run_inline, budget)
        self.assertIsNone(first.append(b"a" * 800))
        self.assertTrue(first.in_memory)
        self.assertEqual(budget.in_use, 800)
        self.successResultOf(second.append(b"b" * 300))
        self.assertFalse(second.in_memory)
        self.assertEqual(budget.in_use, 800, "a spool on disk holds nothing of the budget")
        self.assertEqual(budget.refused, 1)
        self.successResultOf(second.finish())
        self.assertEqual(self.successResultOf(second.read_all()), b"b" * 300)
        first.close()
        second.close()
        self.assertEqual(budget.in_use, 0)
        self.assertEqual(budget.peak, 800)

    def test_budget_is_given_back_when_a_message_moves_to_disk(self) -> None:
        """Past its own limit a message frees what it held, so the next message fits in memory."""
        budget = SpoolBudget(1000)
        big = Spool(self.tempdir, 0o600, 500, run_inline, budget)
        big.append(b"a" * 400)
        self.assertEqual(budget.in_use, 400)
        self.successResultOf(big.append(b"a" * 200))
        self.assertFalse(big.in_memory)
        self.assertEqual(budget.in_use, 0)
        small = Spool(self.tempdir, 0o600, 500, run_inline, budget)
        self.assertIsNone(small.append(b"c" * 400))
        self.assertTrue(small.in_memory)
        big.close()
        small.close()
        self.assertEqual(budget.in_use, 0)

    def test_zero_total_means_no_budget(self) -> None:
        budget = SpoolBudget(0)
        spool = Spool(self.tempdir, 0o600, 10 ** 6, run_inline, budget)
        self.assertIsNone(spool.append(b"z" * 10 ** 5))
        self.assertTrue(spool.in_memory)
        spool.close()
        self.assertEqual(budget.in_use, 0)

    def test_close_twice_gives_back_once(self) -> None:
        budget = SpoolBudget(100)
        spool = Spool(self.tempdir, 0o600, 1000, run_inline, budget)
        spool.append(b"q" * 50)
        spool.close()
        spool.close()
        self.assertEqual(budget.in_use, 0)


class PipelineBudgetTests(SynchronousTestCase):
    def test_messages_in_flight_share_the_budget_through_deps(self) -> None:
        """Through the real pipeline: the second of two concurrent messages does not fit the
        budget and spools to tempdir; both are read back whole; finishing them frees the budget."""
        import dataclasses

        from twisted.internet.task import Clock

        from rmilter.config.schema import Config, GlobalConfig
        from rmilter.deps import Deps
        from rmilter.pipeline import Pipeline
        from rmilter.runtime import Runtime
        from tests.pipeline_support import send_until_eom

        tempdir = tempfile.mkdtemp()
        self.addCleanup(os.rmdir, tempdir)
        config = Config(main=dataclasses.replace(GlobalConfig(), tempdir=tempdir))
        budget = SpoolBudget(3000)
        runtime = Runtime(Deps(config=config, clock=Clock(), run_blocking=run_inline, spool_budget=budget))
        pipeline = Pipeline(lambda: runtime)
        first, _, d1 = send_until_eom(self, pipeline, body=b"a" * 2000, queue_id="QA")
        second, _, d2 = send_until_eom(self, pipeline, body=b"b" * 2000, queue_id="QB")
        v1, v2 = self.successResultOf(d1), self.successResultOf(d2)
        self.assertTrue(first.message.spool.in_memory)
        self.assertFalse(second.message.spool.in_memory)
        self.assertEqual(len(os.listdir(tempdir)), 1)
        whole = self.successResultOf(second.message.spool.read_all())
        self.assertTrue(whole.endswith(b"\r\n\r\n" + b"b" * 2000))
        pipeline.finish(first, v1)
        pipeline.finish(second, v2)
        self.assertEqual(budget.in_use, 0)
        self.assertEqual(os.listdir(tempdir), [])
