"""Returning freed memory after a burst (rmilter.memory): when the trim runs, and that it can."""
from __future__ import annotations

import sys

from twisted.trial.unittest import SynchronousTestCase

from rmilter.backends.rspamd.request import BytesProducer
from rmilter.memory import BurstTrimmer, release_free_memory
from rmilter.milter import codec


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

    def test_cycles_left_by_a_burst_are_collected_before_the_trim(self) -> None:
        """A buffer held only by a reference cycle (a closed connection's protocol and request)
        is freed when the burst ends, not whenever the collector's thresholds say."""
        import gc
        import weakref

        class Holder:
            pass

        order = []
        trimmer = BurstTrimmer(lambda: 0, lambda: 1, lambda: order.append("trim") or True,
                               lambda: order.append("collect") or gc.collect())
        enabled = gc.isenabled()
        gc.disable()  # only the trimmer's collection may free the cycle here
        try:
            cycle = Holder()
            cycle.self = cycle  # type: ignore[attr-defined]
            cycle.body = bytearray(1 << 20)  # type: ignore[attr-defined]
            alive = weakref.ref(cycle)
            del cycle
            self.assertIsNotNone(alive(), "the cycle outlives its last name")
            trimmer.tick()
            self.assertIsNone(alive(), "the burst's cycle was not collected")
            self.assertEqual(order, ["collect", "trim"])
        finally:
            if enabled:
                gc.enable()


class ReleaseTests(SynchronousTestCase):
    def test_glibc_trim_is_available_on_linux(self) -> None:
        """On glibc (Debian) the trim is real; elsewhere it reports that it did nothing."""
        result = release_free_memory()
        if sys.platform.startswith("linux"):
            self.assertTrue(result)
        else:
            self.assertIn(result, (True, False))


class HeldBuffersTests(SynchronousTestCase):
    """Buffers that outlived their use and held the Rspamd path's peak up (issue 19)."""

    def test_codec_lets_go_of_a_consumed_receive_buffer(self) -> None:
        """A connection waiting at EOM holds no stale bytes: the consumed buffer is let go at once."""
        reader = codec.FrameReader(codec.COMMAND_DECODERS)
        body = codec.encode(codec.Body(b"x" * 30000))
        eom = codec.encode(codec.EndOfMessage())
        reader.receive_data(body[:1000])
        reader.receive_data(body[1000:] + eom)  # a frame spanning reads: joined from both pieces
        self.assertIsNotNone(reader.next_event())
        self.assertIsNotNone(reader.next_event())
        self.assertIsNone(reader.next_event())
        self.assertEqual(reader.buffered, 0)
        self.assertEqual(len(reader._parts), 0, "a consumed piece is still referenced")

    def test_bytes_producer_lets_go_of_the_body_once_written(self) -> None:
        """The request object of a closed connection may wait for the cyclic collector; the body must not."""
        written = []

        class Consumer:
            def write(self, data: bytes) -> None:
                written.append(data)

        producer = BytesProducer(b"message" * 100)
        producer.startProducing(Consumer())
        self.assertEqual(written, [b"message" * 100])
        self.assertEqual(producer.length, 700)
        self.assertEqual(producer._data, b"")
