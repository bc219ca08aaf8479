"""Upstream health and selection (SPEC §6.6, B5) and the consistent hash vectors of SPEC §9."""
from __future__ import annotations

import random

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from rmilter.backends.upstream import UpstreamList, jump_index, key_hash

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
