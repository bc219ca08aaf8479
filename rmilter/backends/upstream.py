"""Server lists with health tracking and the three selection rules of SPEC §6.6.

Shared by the rspamd, clamd and Redis clients.  A server that fails
``maxerrors`` times within ``error_time`` seconds of its first failure is dead
for ``dead_time`` seconds; dead servers are skipped; when all are dead all are
revived (the intended rule; C never skipped a dead server, B5).
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Generic, List, Optional, Sequence, TypeVar

import xxhash

S = TypeVar("S")

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


class UpstreamList(Generic[S]):
    """A feature's servers in configuration order, with health and selection."""

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

    def succeeded(self, server: S) -> None:
        u = self._find(server)
        if u is not None:
            u.errors = 0
            u.first_error = None
