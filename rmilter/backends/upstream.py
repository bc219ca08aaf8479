"""Server lists with health tracking, the three selection rules and the retry loop of SPEC §6.6.

``UpstreamList`` is shared by the rspamd, clamd and Redis clients.  A server
that fails ``maxerrors`` times within ``error_time`` seconds of its first
failure is dead for ``dead_time`` seconds; dead servers are skipped; when all
are dead all are revived (the intended rule; C never skipped a dead server, B5).

``Failover`` is the retry loop of the rspamd and clamd clients: up to
``retry_count`` attempts per message, each on a freshly chosen live server,
with a pause of ``retry_timeout`` between them that never blocks the reactor
(C slept in its thread, B33).
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Callable, Generic, List, Optional, Sequence, Set, Tuple, TypeVar
from typing import Protocol as TypingProtocol

import xxhash
from twisted.internet.defer import CancelledError, Deferred, fail
from twisted.internet.task import deferLater
from twisted.python.failure import Failure

from rmilter.log import Logger

log = Logger(namespace="rmilter.backends.upstream")

S = TypeVar("S")
T = TypeVar("T")

HASH_SEED = 0xDEADBABE
_JUMP_MULTIPLIER = 2862933555777941758  # the usual jump-hash constant plus one (SPEC §6.6)
_MASK64 = (1 << 64) - 1


def key_hash(key: bytes) -> int:
    """XXH64 of the key with rmilter's seed."""
    return xxhash.xxh64_intdigest(key, seed=HASH_SEED)


def jump_index(state: int, buckets: int) -> int:
    """rmilter's modified jump consistent hash: no ``+ 1`` step, multiplier + 1 (SPEC §6.6)."""
    b, j = -1, 0
    while j < buckets:
        b = j
        state = (state * _JUMP_MULTIPLIER) & _MASK64
        j = int((b + 1) * float(1 << 31) / float((state >> 33) + 1))
    return b


@dataclass
class Upstream(Generic[S]):
    """One server and its health."""

    server: S
    priority: int = 0
    errors: int = 0
    first_error: Optional[float] = None
    dead_until: Optional[float] = None

    def alive(self, now: float) -> bool:
        return self.dead_until is None or now >= self.dead_until


class UpstreamObserver(TypingProtocol):
    """Told of every attempt and every server marked dead (``rmilter.metrics``); optional."""

    def attempt_ended(self, server: str, seconds: float, error: Optional[str]) -> None: ...

    def marked_dead(self, server: str) -> None: ...


class UpstreamList(Generic[S]):
    """A feature's servers in configuration order, with health and selection."""

    #: set by whoever watches this list's health (metrics); None costs one attribute test
    observer: Optional[UpstreamObserver] = None

    def __init__(
        self,
        servers: Sequence[S],
        *,
        error_time: float,
        dead_time: float,
        maxerrors: int,
        clock: Any,
        priorities: Optional[Sequence[int]] = None,
        rng: Optional[random.Random] = None,
    ) -> None:
        prios = list(priorities) if priorities is not None else [0] * len(servers)
        self.upstreams: List[Upstream[S]] = [Upstream(s, p) for s, p in zip(servers, prios)]
        self.error_time = error_time
        self.dead_time = dead_time
        self.maxerrors = maxerrors
        self.clock = clock
        self.rng = rng or random.Random()

    def __len__(self) -> int:
        return len(self.upstreams)

    def __bool__(self) -> bool:
        return bool(self.upstreams)

    def _find(self, server: S) -> Optional[Upstream[S]]:
        for u in self.upstreams:
            if u.server is server or u.server == server:
                return u
        return None

    def live(self) -> List[Upstream[S]]:
        """Live upstreams in configuration order; all of them (revived) when every one is dead."""
        now = self.clock.seconds()
        alive = [u for u in self.upstreams if u.alive(now)]
        if alive:
            return alive
        for u in self.upstreams:
            u.dead_until = None
            u.errors = 0
            u.first_error = None
        return list(self.upstreams)

    def choose_random(self, exclude: Sequence[S] = ()) -> S:
        """Rspamd and clamd: uniform random choice among live servers (avoiding ``exclude`` if possible)."""
        candidates = self.live()
        preferred = [u for u in candidates if u.server not in exclude]
        return self.rng.choice(preferred or candidates).server

    def choose_first(self) -> S:
        """Pub/sub: the live server with the highest priority, the first one on ties."""
        candidates = self.live()
        best = max(u.priority for u in candidates)
        return next(u.server for u in candidates if u.priority == best)

    def choose_hashed(self, key: bytes) -> S:
        """Redis key operations: consistent hash of the key over the live servers."""
        candidates = self.live()
        if len(candidates) == 1:
            return candidates[0].server
        return candidates[jump_index(key_hash(key), len(candidates))].server

    def failed(self, server: S) -> None:
        u = self._find(server)
        if u is None:
            return
        now = self.clock.seconds()
        if u.first_error is None or now - u.first_error > self.error_time:
            u.first_error = now
            u.errors = 0
        u.errors += 1
        if u.errors >= self.maxerrors:
            u.dead_until = now + self.dead_time
            u.errors = 0
            u.first_error = None
            if self.observer is not None:
                self.observer.marked_dead(str(getattr(server, "name", server)))

    def succeeded(self, server: S) -> None:
        u = self._find(server)
        if u is not None:
            u.errors = 0
            u.first_error = None


# -- the retry loop (SPEC §6.6 "Retries") -------------------------------------------------------
class NamedServer(TypingProtocol):
    """A server as the retry loop needs it: a name for log lines and error reports."""

    @property
    def name(self) -> str: ...


N = TypeVar("N", bound=NamedServer)

#: why a scan ended without a new attempt (the scan's Deferred was cancelled, the client stopped)
SCAN_CANCELLED = "scan cancelled"
CLIENT_STOPPED = "client stopped"


class AttemptFailed(Exception):
    """Why one attempt on one server failed, and what that means for the scan.

    ``retry=False``: another server would fail the same way (clamd choking on
    this very message), so the scan ends now.  ``blame=False``: the server did
    nothing wrong (our own spool could not be read), so its health is untouched.
    """

    def __init__(self, reason: str, *, retry: bool = True, blame: bool = True) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry = retry
        self.blame = blame


@dataclass(frozen=True)
class Attempted(Generic[S, T]):
    """A scan that succeeded: the server's reply, which server gave it, and what it took."""

    reply: T
    server: S
    #: seconds on the client's clock from the first attempt to the reply, pauses included
    elapsed: float
    #: attempts made, the successful one included
    attempts: int = 1


@dataclass(frozen=True)
class Exhausted(Generic[S]):
    """A scan that got no usable reply: what each client turns into its own failure type."""

    #: why the scan ended: the last attempt's reason, ``SCAN_CANCELLED`` or ``CLIENT_STOPPED``
    reason: str
    #: the servers tried, in order (the last one may have been cut short by a cancel)
    servers: Tuple[S, ...]
    #: one ``<server>: <reason>`` line per failed attempt, then the end reason if it was not one
    errors: Tuple[str, ...]
    elapsed: float

    @property
    def attempts(self) -> int:
        return len(self.servers)


#: turns an attempt's failure into its ``AttemptFailed``; None for an error nobody expected (a bug)
Describe = Callable[[Failure], Optional[AttemptFailed]]


class Failover(Generic[N]):
    """Runs scans on one server list: attempts, pauses, health, cancellation, stop.

    Each scan is up to ``attempts`` attempts, each on a server chosen with
    ``UpstreamList.choose_random`` avoiding the servers this scan already tried,
    with a ``retry_timeout`` pause between attempts.  A successful scan fires
    with an ``Attempted``; a failed one fails with what ``give_up`` makes of the
    ``Exhausted`` report, the one failure type of the backend.  Written with plain
    callbacks: it runs for every message.
    """

    def __init__(
        self,
        upstreams: UpstreamList[N],
        clock: Any,  # IReactorTime
        *,
        attempts: int,
        retry_timeout: float,
        what: str,
        describe: Describe,
        give_up: Callable[[Exhausted[N]], Exception],
    ) -> None:
        self.upstreams = upstreams
        self.clock = clock
        self.attempts = max(1, attempts)
        self.retry_timeout = retry_timeout
        #: the log lines' name for this kind of scan (``rspamd``, ``clamscan``)
        self.what = what
        self.describe = describe
        self.give_up = give_up
        self.stopped = False
        self._scans: Set["_Scan[N, Any]"] = set()

    def run(self, attempt: Callable[[N], "Deferred[T]"], tag: str = "") -> "Deferred[Attempted[N, T]]":
        """Scan with ``attempt(server)`` per try; ``tag`` names the message in log lines.

        Cancelling the result aborts the attempt in flight (by cancelling its
        Deferred) or the pause, and fails the scan with reason ``SCAN_CANCELLED``.
        """
        scan: _Scan[N, T] = _Scan(self, attempt, tag)
        self._scans.add(scan)
        scan.try_next()
        return scan.result

    def stop(self) -> None:
        """Make no new attempt; scans in flight are cancelled (idempotent)."""
        self.stopped = True
        for scan in list(self._scans):
            scan.result.cancel()


class _Scan(Generic[N, T]):
    """The state of one scan: the servers tried, the errors so far, what it is waiting for."""

    __slots__ = ("failover", "attempt", "tag", "started", "servers", "errors", "pending", "ended", "result",
                 "attempt_started")

    def __init__(self, failover: Failover[N], attempt: Callable[[N], "Deferred[T]"], tag: str) -> None:
        self.failover = failover
        self.attempt = attempt
        self.tag = tag
        self.started = failover.clock.seconds()
        self.servers: List[N] = []
        self.errors: List[str] = []
        #: the attempt in flight or the pause before the next one
        self.pending: Optional["Deferred[Any]"] = None
        self.ended = False
        self.result: "Deferred[Attempted[N, T]]" = Deferred(self._cancel)
        self.attempt_started = self.started

    def try_next(self, _: object = None) -> None:
        self.pending = None
        failover = self.failover
        if failover.stopped:
            self._end(CLIENT_STOPPED)
            return
        server = failover.upstreams.choose_random(exclude=self.servers)
        self.servers.append(server)
        if failover.upstreams.observer is not None:
            self.attempt_started = failover.clock.seconds()
        try:
            attempt = self.attempt(server)
        except Exception:
            attempt = fail()  # a bug in the attempt: handled as its failure would be
        self.pending = attempt
        attempt.addCallbacks(self._succeeded, self._failed, callbackArgs=(server,), errbackArgs=(server,))

    def _succeeded(self, reply: T, server: N) -> None:
        self.pending = None
        if self.ended:
            return  # an attempt that answered although it was cancelled
        self.ended = True
        failover = self.failover
        failover._scans.discard(self)
        failover.upstreams.succeeded(server)
        now = failover.clock.seconds()
        elapsed = now - self.started
        observer = failover.upstreams.observer
        if observer is not None:
            observer.attempt_ended(server.name, now - self.attempt_started, None)
        self.result.callback(Attempted(reply, server, elapsed, len(self.servers)))

    def _failed(self, failure: Failure, server: N) -> None:
        self.pending = None
        if self.ended:
            return  # the cancelled attempt reporting its end
        failover = self.failover
        failed = failover.describe(failure)
        if failed is None:
            failed = AttemptFailed("unexpected error: %s" % (failure.getErrorMessage() or failure.type.__name__,))
            log.failure("{tag}; {what}: unexpected error on {server}", failure,
                        tag=self.tag, what=failover.what, server=server.name)
        observer = failover.upstreams.observer
        if observer is not None:
            observer.attempt_ended(server.name, failover.clock.seconds() - self.attempt_started, failed.reason)
        if failed.blame:
            failover.upstreams.failed(server)
        self.errors.append("%s: %s" % (server.name, failed.reason))
        n, total = len(self.servers), failover.attempts
        if failed.retry and n < total:
            log.warn("{tag}; {what}: scan failed on {server} ({reason}), attempt {n} of {total}",
                     tag=self.tag, what=failover.what, server=server.name, reason=failed.reason, n=n, total=total)
            pause: "Deferred[None]" = deferLater(failover.clock, failover.retry_timeout, self.try_next)
            self.pending = pause
            pause.addErrback(_pause_cancelled)
            return
        outcome = "retry limit exceeded" if failed.retry else "not retried"
        log.warn("{tag}; {what}: scan failed on {server} ({reason}), attempt {n} of {total}, {outcome}",
                 tag=self.tag, what=failover.what, server=server.name, reason=failed.reason, n=n, total=total,
                 outcome=outcome)
        self._end(failed.reason, failed_attempt=True)

    def _cancel(self, _: "Deferred[Attempted[N, T]]") -> None:
        """The caller (or ``Failover.stop``) gave up: abort what is pending, fail the scan."""
        if self.ended:
            return
        reason = CLIENT_STOPPED if self.failover.stopped else SCAN_CANCELLED
        self.ended = True  # what the aborted attempt reports from now on is ignored
        pending, self.pending = self.pending, None
        if pending is not None:
            pending.cancel()
        self._end(reason)

    def _end(self, reason: str, failed_attempt: bool = False) -> None:
        self.ended = True
        failover = self.failover
        failover._scans.discard(self)
        errors = tuple(self.errors) if failed_attempt else tuple(self.errors) + (reason,)
        elapsed = failover.clock.seconds() - self.started
        report = Exhausted(reason, tuple(self.servers), errors, elapsed)
        self.result.errback(Failure(failover.give_up(report)))


def _pause_cancelled(failure: Failure) -> None:
    """The pause between attempts was cancelled with the scan: nothing left to do."""
    failure.trap(CancelledError)
