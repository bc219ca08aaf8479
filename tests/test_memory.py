"""Returning freed memory after a burst (rmilter.memory): when the trim runs, and that it can."""
from __future__ import annotations

import sys

from twisted.trial.unittest import SynchronousTestCase

from rmilter.memory import BurstTrimmer, release_free_memory


class BurstTrimmerTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.in_flight = 0
        self.seen = 0
        self.calls = 0

        def trim() -> bool:
            self.calls += 1
            return True

        self.trimmer = BurstTrimmer(lambda: self.in_flight, lambda: self.seen, trim)

    def test_no_messages_no_trim(self) -> None:
        self.trimmer.tick()
        self.assertEqual(self.calls, 0)

    def test_trims_once_when_a_burst_has_ended(self) -> None:
        self.seen, self.in_flight = 10, 3
        self.trimmer.tick()
        self.assertEqual(self.calls, 0, "not while messages are in flight")
        self.in_flight = 0
        self.trimmer.tick()
        self.trimmer.tick()
        self.assertEqual(self.calls, 1, "once per burst")
        self.seen = 11
        self.trimmer.tick()
        self.assertEqual((self.calls, self.trimmer.trims), (2, 2))


class ReleaseTests(SynchronousTestCase):
    def test_glibc_trim_is_available_on_linux(self) -> None:
        """On glibc (Debian) the trim is real; elsewhere it reports that it did nothing."""
        result = release_free_memory()
        if sys.platform.startswith("linux"):
            self.assertTrue(result)
        else:
            self.assertIn(result, (True, False))
