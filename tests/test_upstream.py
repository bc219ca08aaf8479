"""Upstream health and selection (SPEC §6.6, B5), the consistent hash vectors of SPEC §9, and the
retry loop the rspamd and clamd clients share (SPEC §6.6 "Retries")."""
from __future__ import annotations

import random
from typing import Any, Dict, List, Optional

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.logger import formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from rmilter.backends.upstream import (
    CLIENT_STOPPED,
    SCAN_CANCELLED,
    AttemptFailed,
    Attempted,
    Exhausted,
    Failover,
    UpstreamList,
    jump_index,
    key_hash,
)
from rmilter.config.schema import ServerSpec

VECTORS = [
    (b"<rcpt@example.org>", 0x197598AFE5B61F07, (1, 1, 1)),
    (b"<rcpt@example.org>:192.0.2.10", 0x7244298031B9E408, (0, 0, 0)),
    (b"b", 0xF4230B1C400E1B81, (1, 1, 3)),
    (b"c", 0x906DA58174BA061E, (0, 0, 0)),
]


class HashTests(SynchronousTestCase):
    def test_spec_vectors(self) -> None:
        for key, digest, indexes in VECTORS:
            self.assertEqual(key_hash(key), digest, key)
            self.assertEqual(tuple(jump_index(digest, n) for n in (2, 3, 4)), indexes, key)

    def test_grey_key_vector(self) -> None:
        key = b"greyAnkuIjW7LtcZ2pRUrf4jDDB1We7dd5L/GVvESkOwTKfoNNGeBr/z7jkjO7UwYsWGui55oe+jc/FbVfeOlgGzdg=="
        self.assertEqual(key_hash(key), 0xC69471947E8E2FD2)
        self.assertEqual([jump_index(key_hash(key), n) for n in (2, 3, 4)], [1, 1, 1])

    def test_choose_hashed_uses_live_servers_in_order(self) -> None:
        clock = Clock()
        ups = UpstreamList(["r0", "r1", "r2", "r3"], error_time=10, dead_time=300, maxerrors=1, clock=clock)
        self.assertEqual(ups.choose_hashed(b"b"), "r3")
        ups.failed("r3")
        self.assertEqual(ups.choose_hashed(b"b"), "r1")  # N = 3 over r0, r1, r2


class HealthTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.ups = UpstreamList(
            ["a", "b"], error_time=10, dead_time=300, maxerrors=3, clock=self.clock, rng=random.Random(1)
        )

    def test_dead_after_maxerrors_within_error_time(self) -> None:
        for _ in range(3):
            self.ups.failed("a")
        self.assertEqual([u.server for u in self.ups.live()], ["b"])
        self.assertEqual({self.ups.choose_random() for _ in range(20)}, {"b"})
        self.clock.advance(300)
        self.assertEqual([u.server for u in self.ups.live()], ["a", "b"])

    def test_errors_spread_out_never_kill(self) -> None:
        """A failure after error_time restarts the count."""
        for _ in range(5):
            self.ups.failed("a")
            self.clock.advance(11)
        self.assertEqual(len(self.ups.live()), 2)

    def test_success_resets_count(self) -> None:
        self.ups.failed("a")
        self.ups.failed("a")
        self.ups.succeeded("a")
        self.ups.failed("a")
        self.assertEqual(len(self.ups.live()), 2)

    def test_all_dead_revives_all(self) -> None:
        for s in ("a", "b"):
            for _ in range(3):
                self.ups.failed(s)
        self.assertEqual([u.server for u in self.ups.live()], ["a", "b"])

    def test_choose_first_by_priority(self) -> None:
        ups = UpstreamList(["x", "y", "z"], error_time=10, dead_time=300, maxerrors=1, clock=self.clock,
                           priorities=[0, 5, 5])
        self.assertEqual(ups.choose_first(), "y")
        ups.failed("y")
        self.assertEqual(ups.choose_first(), "z")

    def test_choose_random_avoids_excluded(self) -> None:
        self.assertEqual({self.ups.choose_random(exclude=["a"]) for _ in range(20)}, {"b"})


A = ServerSpec("a", host="192.0.2.1", port=11333)
B = ServerSpec("b", host="192.0.2.2", port=11333)
C = ServerSpec("c", host="192.0.2.3", port=11333)


class GaveUp(Exception):
    """The failure type of the backend under test: it carries the loop's report."""

    def __init__(self, report: Exhausted[ServerSpec]) -> None:
        super().__init__(report.reason)
        self.report = report


class InOrder(random.Random):
    """``choose_random`` made deterministic: always the first candidate."""

    def choice(self, seq: Any) -> Any:
        return seq[0]


class Backend:
    """Attempts under the test's control: each one a Deferred the test fires, with a record of cancels."""

    def __init__(self) -> None:
        self.attempts: List[ServerSpec] = []
        self.pending: List["Deferred[str]"] = []
        self.cancelled: List[ServerSpec] = []

    def attempt(self, server: ServerSpec) -> "Deferred[str]":
        self.attempts.append(server)
        d: "Deferred[str]" = Deferred(lambda _: self.cancelled.append(server))
        self.pending.append(d)
        return d

    def answer(self, reply: str = "OK") -> None:
        self.pending.pop(0).callback(reply)

    def fail(self, reason: str = "refused", **kwargs: Any) -> None:
        self.pending.pop(0).errback(Failure(AttemptFailed(reason, **kwargs)))


def describe(failure: Failure) -> Optional[AttemptFailed]:
    return failure.value if isinstance(failure.value, AttemptFailed) else None


class FailoverTests(SynchronousTestCase):
    """The retry loop: attempts, exclusion, pauses, health, cancellation and stop."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.lines: List[str] = []
        observer: Any = lambda event: self.lines.append(formatEvent(event))  # noqa: E731
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        self.backend = Backend()

    def failover(self, servers: Any = (A, B, C), attempts: int = 3, retry_timeout: float = 1.0,
                 **health: Any) -> Failover[ServerSpec]:
        options: Dict[str, Any] = dict(error_time=10.0, dead_time=60.0, maxerrors=10)
        options.update(health)
        upstreams = UpstreamList(list(servers), clock=self.clock, rng=InOrder(), **options)
        return Failover(upstreams, self.clock, attempts=attempts, retry_timeout=retry_timeout, what="testscan",
                        describe=describe, give_up=GaveUp)

    def errors(self, failover: Failover[ServerSpec]) -> List[int]:
        return [u.errors for u in failover.upstreams.upstreams]

    def report(self, d: "Deferred[Any]") -> Exhausted[ServerSpec]:
        error = self.failureResultOf(d, GaveUp).value
        assert isinstance(error, GaveUp)
        return error.report

    def test_success_first_time(self) -> None:
        """One attempt that answers: the reply, its server, one attempt, no time spent."""
        failover = self.failover()
        d = failover.run(self.backend.attempt, "TAG")
        self.backend.answer("clean")
        self.assertEqual(self.successResultOf(d), Attempted("clean", A, 0.0, 1))
        self.assertEqual(self.lines, [])

    def test_attempts_exclude_servers_already_tried(self) -> None:
        """Every attempt goes to a server this scan has not tried yet; all fail: N attempts, then give up."""
        failover = self.failover(attempts=3, retry_timeout=0.5)
        d = failover.run(self.backend.attempt, "TAG")
        for _ in range(3):
            self.backend.fail("connection refused")
            self.clock.advance(0.5)
        self.assertEqual(self.backend.attempts, [A, B, C])
        report = self.report(d)
        self.assertEqual((report.reason, report.servers, report.attempts, report.elapsed),
                         ("connection refused", (A, B, C), 3, 1.0))
        self.assertEqual(report.errors, ("a: connection refused", "b: connection refused", "c: connection refused"))
        self.assertEqual(self.errors(failover), [1, 1, 1])
        self.assertEqual(self.lines, [
            "TAG; testscan: scan failed on a (connection refused), attempt 1 of 3",
            "TAG; testscan: scan failed on b (connection refused), attempt 2 of 3",
            "TAG; testscan: scan failed on c (connection refused), attempt 3 of 3, retry limit exceeded",
        ])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_more_attempts_than_servers_reuse_them(self) -> None:
        """With fewer servers than attempts, a tried server is chosen again rather than none."""
        failover = self.failover(servers=(A,), attempts=2, retry_timeout=0.0)
        d = failover.run(self.backend.attempt)
        self.backend.fail()
        self.clock.advance(0)
        self.backend.answer()
        self.assertEqual(self.backend.attempts, [A, A])
        self.assertEqual(self.successResultOf(d).attempts, 2)

    def test_pause_between_attempts_on_the_clock(self) -> None:
        """The next attempt starts retry_timeout after a failure, not before; elapsed counts the pause."""
        failover = self.failover(retry_timeout=2.0)
        d = failover.run(self.backend.attempt)
        self.backend.fail()
        self.clock.advance(1.999)
        self.assertEqual(self.backend.attempts, [A])
        self.assertNoResult(d)
        self.clock.advance(0.001)
        self.assertEqual(self.backend.attempts, [A, B])
        self.clock.advance(0.5)
        self.backend.answer("virus")
        self.assertEqual(self.successResultOf(d), Attempted("virus", B, 2.5, 2))
        self.assertEqual(self.errors(failover), [1, 0, 0])

    def test_success_resets_the_servers_errors(self) -> None:
        failover = self.failover(servers=(A,), attempts=2, retry_timeout=0.0)
        failover.upstreams.failed(A)
        d = failover.run(self.backend.attempt)
        self.backend.answer()
        self.successResultOf(d)
        self.assertEqual(self.errors(failover), [0])

    def test_failure_not_retried(self) -> None:
        """``retry=False`` ends the scan at once, whatever attempts are left; the server is blamed."""
        failover = self.failover(attempts=5)
        d = failover.run(self.backend.attempt, "TAG")
        self.backend.fail("unexpected reply: 'PONG'", retry=False)
        report = self.report(d)
        self.assertEqual((report.reason, report.attempts), ("unexpected reply: 'PONG'", 1))
        self.assertEqual(self.errors(failover), [1, 0, 0])
        self.assertEqual(self.lines, ["TAG; testscan: scan failed on a (unexpected reply: 'PONG'), attempt 1 of 5, "
                                      "not retried"])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_failure_not_blamed_on_the_server(self) -> None:
        """``blame=False`` leaves the server's health alone (a dead-after-one list keeps it alive)."""
        failover = self.failover(servers=(A,), attempts=2, retry_timeout=0.0, maxerrors=1)
        d = failover.run(self.backend.attempt)
        self.backend.fail("cannot read spool", blame=False)
        self.assertEqual(failover.upstreams.upstreams[0].dead_until, None)
        self.clock.advance(0)
        self.backend.fail("cannot read spool", retry=False, blame=False)
        self.assertEqual(self.report(d).attempts, 2)
        self.assertEqual(self.errors(failover), [0])
        self.assertEqual(failover.upstreams.upstreams[0].dead_until, None)

    def test_unexpected_error_is_logged_and_retried(self) -> None:
        """An error ``describe`` does not know (a bug) is logged with its traceback, blamed and retried."""
        failover = self.failover(attempts=2, retry_timeout=0.0)
        d = failover.run(self.backend.attempt, "TAG")
        self.backend.pending.pop(0).errback(Failure(ZeroDivisionError("oops")))
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)
        self.assertIn("TAG; testscan: unexpected error on a", self.lines)
        self.clock.advance(0)
        self.backend.answer()
        self.assertEqual(self.successResultOf(d).server, B)
        self.assertEqual(self.errors(failover), [1, 0, 0])

    def test_attempt_raising_is_a_failed_attempt(self) -> None:
        """An attempt function that raises instead of returning a Deferred fails that attempt only."""
        failover = self.failover(attempts=2, retry_timeout=0.0)
        calls: List[ServerSpec] = []

        def attempt(server: ServerSpec) -> "Deferred[str]":
            calls.append(server)
            if len(calls) == 1:
                raise ValueError("bug")
            return succeed("OK")

        d = failover.run(attempt)
        self.clock.advance(0)
        self.assertEqual(self.successResultOf(d).attempts, 2)
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)

    def test_cancel_during_an_attempt(self) -> None:
        """Cancelling aborts the attempt in flight; the scan fails with "scan cancelled", no one blamed."""
        failover = self.failover()
        d = failover.run(self.backend.attempt, "TAG")
        d.cancel()
        self.assertEqual(self.backend.cancelled, [A])
        report = self.report(d)
        self.assertEqual((report.reason, report.servers, report.errors), (SCAN_CANCELLED, (A,), (SCAN_CANCELLED,)))
        self.assertEqual(self.errors(failover), [0, 0, 0])
        self.clock.advance(10)
        self.assertEqual(self.backend.attempts, [A])
        self.assertEqual(self.lines, [])

    def test_cancel_during_the_pause(self) -> None:
        """Cancelling between attempts stops the pause: no further attempt, no timer left behind."""
        failover = self.failover()
        d = failover.run(self.backend.attempt, "TAG")
        self.backend.fail("connection refused")
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        d.cancel()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        report = self.report(d)
        self.assertEqual((report.reason, report.errors), (SCAN_CANCELLED, ("a: connection refused", SCAN_CANCELLED)))
        self.assertEqual(self.backend.attempts, [A])
        self.assertEqual(self.backend.cancelled, [])

    def test_cancelled_attempt_reporting_its_end_is_ignored(self) -> None:
        """The CancelledError of the aborted attempt is neither logged as unexpected nor blamed."""
        failover = self.failover()
        attempt: "Deferred[str]" = Deferred()  # no canceller: cancel() fires it with CancelledError
        d = failover.run(lambda server: attempt, "TAG")
        d.cancel()
        self.assertEqual(self.report(d).reason, SCAN_CANCELLED)
        self.assertTrue(attempt.called)
        self.assertEqual(self.errors(failover), [0, 0, 0])
        self.assertEqual((self.lines, self.flushLoggedErrors()), ([], []))

    def test_stop_ends_scans_and_makes_no_new_attempt(self) -> None:
        """stop() fails the scans in flight (attempting or pausing) with "client stopped"; a scan
        started afterwards makes no attempt at all."""
        failover = self.failover()
        pausing = failover.run(self.backend.attempt)
        attempting = failover.run(self.backend.attempt)
        self.backend.fail("connection refused")  # the first scan's attempt: it pauses now
        failover.stop()
        self.assertEqual(self.backend.cancelled, [A])  # the second scan's attempt
        self.assertEqual(self.report(pausing).errors, ("a: connection refused", CLIENT_STOPPED))
        self.assertEqual(self.report(attempting).errors, (CLIENT_STOPPED,))
        later = self.report(failover.run(self.backend.attempt))
        self.assertEqual((later.reason, later.servers, later.errors), (CLIENT_STOPPED, (), (CLIENT_STOPPED,)))
        self.clock.advance(10)
        self.assertEqual(self.backend.attempts, [A, A])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_synchronous_answers(self) -> None:
        """Attempts that fire before ``run`` returns (in-memory fakes) work the same way."""
        failover = self.failover(retry_timeout=0.0)
        replies = [fail(AttemptFailed("refused")), succeed("OK")]
        d = failover.run(lambda server: replies.pop(0))
        self.clock.advance(0)
        self.assertEqual(self.successResultOf(d), Attempted("OK", B, 0.0, 2))
