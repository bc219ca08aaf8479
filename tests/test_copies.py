"""Pub/sub copies (SPEC §6.5, B12, B23): channels, payload, sampling, log field, failures."""
from __future__ import annotations

import math
import random
import shutil
import tempfile
from typing import List, Optional, cast

from twisted.internet.task import Clock
from twisted.logger import ILogObserver, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from rmilter.checks import copies
from rmilter.config.schema import Config, RedisConfig, RedisServer
from rmilter.context import ConnectionContext, MessageContext, Recipient
from rmilter.pipeline import Pipeline
from rmilter.runtime import Runtime
from rmilter.spool import Spool, run_inline, spool_head
from rmilter.testing.fake_redis import FakeRedisRoles
from rmilter.verdict import Action

SERVER = (RedisServer("127.0.0.1", "127.0.0.1"),)
BODY = b"Hello\r\nthis is the body\r\n"


def binomial_bounds(n: int, p: float, sigmas: float = 5.0) -> "tuple[float, float]":
    """A count of Binomial(n, p) lies outside these bounds with probability < 1e-6."""
    spread = sigmas * math.sqrt(n * p * (1 - p))
    return n * p - spread, n * p + spread


def make_runtime(
    clock: Clock,
    redis: Optional[FakeRedisRoles],
    spam_channel: Optional[str] = "spam",
    copy_channel: Optional[str] = "copies",
    copy_probability: float = 1.0,
    servers_copy: tuple = SERVER,
    cache_backend: str = "redis",
) -> Runtime:
    config = Config(
        redis=RedisConfig(
            servers_spam=SERVER,
            servers_copy=servers_copy,
            spam_channel=spam_channel,
            copy_channel=copy_channel,
            copy_probability=copy_probability,
            connect_timeout=1.0,
        ),
        cache_backend=cache_backend,
    )
    return Runtime(config=config, reactor=clock, run_blocking=run_inline, redis=redis)


def make_message(testcase: SynchronousTestCase, runtime: Runtime, body: bytes = BODY,
                 memory_limit: int = 1 << 20) -> MessageContext:
    conn = ConnectionContext(client_address="192.0.2.10", family="4", helo="client.example.org")
    msg = MessageContext(connection=conn, runtime=runtime)
    msg.envelope_from = "sender@example.org"
    msg.recipients.append(Recipient("<rcpt@example.net>"))
    msg.headers = [("From", "sender@example.org"), ("Subject", "copy me")]
    tempdir = tempfile.mkdtemp(prefix="copies.")
    testcase.addCleanup(shutil.rmtree, tempdir, True)
    spool = Spool(tempdir, 0o600, memory_limit, run_inline)
    testcase.addCleanup(spool.close)
    spool.set_head(spool_head(helo="client.example.org", hostname="client", client_address="192.0.2.10",
                              tag=msg.tag, headers=msg.headers, has_return_path=False,
                              envelope_from=msg.envelope_from, recipients=msg.recipient_addresses))
    for start in range(0, len(body), 700):
        spool.append(body[start : start + 700])
    testcase.successResultOf(spool.finish())
    msg.spool = spool
    return msg


class PublishTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.redis = FakeRedisRoles(self.clock, roles=("spam", "copy"), separate=True)
        self.spam_server = self.redis.servers["spam"]
        self.copy_server = self.redis.servers["copy"]
        self.spam_server.subscribers["spam"] = 2
        self.copy_server.subscribers["copies"] = 1
        self.patch(copies, "sampler", random.Random(7))

    def test_spam_copy_is_the_whole_spool(self) -> None:
        """kind "spam": PUBLISH spam_channel on servers_spam with the SPEC §5.14 bytes; count logged."""
        msg = make_message(self, make_runtime(self.clock, self.redis))
        self.assertIsNone(self.successResultOf(copies.publish(msg, "spam")))
        (published,) = self.spam_server.published
        assert msg.spool is not None
        self.assertEqual(published.channel, "spam")
        self.assertEqual(published.payload, msg.spool.head + BODY)
        self.assertTrue(published.payload.startswith(b"Received: from client.example.org (client [192.0.2.10])"))
        self.assertIn(b"X-Rcpt-To: <rcpt@example.net>\r\n\r\n" + BODY, published.payload)
        self.assertEqual(msg.log_fields["published"], "published to spam (2 clients)")
        self.assertEqual(self.copy_server.published, [])

    def test_message_copy_on_copy_servers(self) -> None:
        msg = make_message(self, make_runtime(self.clock, self.redis))
        self.successResultOf(copies.publish(msg, "copy"))
        (published,) = self.copy_server.published
        self.assertEqual(published.channel, "copies")
        self.assertEqual(msg.log_fields["published"], "published to copies (1 clients)")
        self.assertEqual(self.spam_server.published, [])

    def test_spooled_body_published_whole(self) -> None:
        """A body that went to the spool file is read back completely."""
        body = b"".join(b"line %05d\r\n" % i for i in range(3000))
        msg = make_message(self, make_runtime(self.clock, self.redis), body=body, memory_limit=1000)
        assert msg.spool is not None
        self.assertFalse(msg.spool.in_memory)
        self.successResultOf(copies.publish(msg, "copy"))
        self.assertEqual(self.copy_server.published[0].payload, msg.spool.head + body)

    def test_both_copies_named_in_the_summary(self) -> None:
        """A spam copy of a message that continues (spamd_never_reject) and its message copy both show."""
        msg = make_message(self, make_runtime(self.clock, self.redis))
        self.successResultOf(copies.publish(msg, "spam"))
        self.successResultOf(copies.publish(msg, "copy"))
        self.assertEqual(msg.log_fields["published"], "published to spam (2 clients); published to copies (1 clients)")

    def test_zero_subscribers_still_logged(self) -> None:
        self.copy_server.subscribers.clear()
        msg = make_message(self, make_runtime(self.clock, self.redis))
        self.successResultOf(copies.publish(msg, "copy"))
        self.assertEqual(msg.log_fields["published"], "published to copies (0 clients)")

    def test_channel_or_servers_missing(self) -> None:
        """No channel, no servers for the role (B23) or a memcached backend (B13): nothing published."""
        runtimes = [
            make_runtime(self.clock, self.redis, spam_channel=None, copy_channel=None),
            make_runtime(self.clock, FakeRedisRoles(self.clock, roles=("grey",))),
            make_runtime(self.clock, self.redis, cache_backend="memcached"),
            make_runtime(self.clock, None),
        ]
        for runtime in runtimes:
            msg = make_message(self, runtime)
            for kind in ("spam", "copy"):
                self.assertIsNone(self.successResultOf(copies.publish(msg, kind)))
            self.assertNotIn("published", msg.log_fields)
        self.assertEqual(self.redis.all_commands(), [])

    def test_probability_zero_and_one(self) -> None:
        """copy_probability 0 never copies (C looped forever, B12); 1 always copies."""
        never = make_runtime(self.clock, self.redis, copy_probability=0.0)
        always = make_runtime(self.clock, self.redis, copy_probability=1.0)
        never_msg, always_msg = make_message(self, never), make_message(self, always)
        for _ in range(200):
            self.successResultOf(copies.publish(never_msg, "copy"))
        self.assertEqual(self.copy_server.published, [])
        for _ in range(200):
            self.successResultOf(copies.publish(always_msg, "copy"))
        self.assertEqual(len(self.copy_server.published), 200)

    def test_plain_probability(self) -> None:
        """B12: p = 0.5 and p = 0.02 copy about that share (C: 0.6 % for 0.5), within a 5-sigma bound."""
        for p, n in ((0.5, 2000), (0.02, 2000)):
            del self.copy_server.published[:]
            msg = make_message(self, make_runtime(self.clock, self.redis, copy_probability=p))
            for _ in range(n):
                self.successResultOf(copies.publish(msg, "copy"))
            low, high = binomial_bounds(n, p)
            self.assertTrue(low <= len(self.copy_server.published) <= high, (p, len(self.copy_server.published)))

    def test_spam_copies_not_sampled(self) -> None:
        """copy_probability applies to message copies only."""
        runtime = make_runtime(self.clock, self.redis, copy_probability=0.0)
        self.successResultOf(copies.publish(make_message(self, runtime), "spam"))
        self.assertEqual(len(self.spam_server.published), 1)

    def test_unreachable_redis_logged_not_noted(self) -> None:
        """A failed PUBLISH fires at once, logs a warning and leaves the summary line alone."""
        events: List[dict] = []
        observer = cast(ILogObserver, events.append)
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        self.redis.set_reachable(False)
        msg = make_message(self, make_runtime(self.clock, self.redis))
        self.assertIsNone(self.successResultOf(copies.publish(msg, "copy")))
        self.assertNotIn("published", msg.log_fields)
        warnings = [e for e in events if e.get("log_namespace") == "rmilter.copies" and e["log_level"].name == "warn"]
        self.assertEqual([w["channel"] for w in warnings], ["copies"])

    def test_hanging_redis_bounded_by_connect_timeout(self) -> None:
        """A PUBLISH that never answers delays the message by connect_timeout at most."""
        redis = FakeRedisRoles(self.clock, roles=("copy",), timeout=60.0)
        redis.servers["copy"].hang = True
        msg = make_message(self, make_runtime(self.clock, redis))
        publishing = copies.publish(msg, "copy")
        self.clock.advance(0.99)
        self.assertNoResult(publishing)
        self.clock.advance(0.01)
        self.assertIsNone(self.successResultOf(publishing))
        self.assertNotIn("published", msg.log_fields)
        self.clock.advance(60)

    def test_unknown_kind_is_a_programming_error_not_a_failure(self) -> None:
        """Even a wrong call never fails the message: logged, nothing published."""
        msg = make_message(self, make_runtime(self.clock, self.redis))
        self.assertIsNone(self.successResultOf(copies.publish(msg, "ham")))
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)


class PipelineTests(SynchronousTestCase):
    """EOM with copies: the verdict never depends on publishing."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.patch(copies, "sampler", random.Random(3))

    def eom(self, redis: FakeRedisRoles) -> "tuple[MessageContext, object]":
        runtime = make_runtime(self.clock, redis)
        msg = make_message(self, runtime)
        return msg, Pipeline(lambda: runtime).eom(msg)

    def test_accepted_with_copy(self) -> None:
        redis = FakeRedisRoles(self.clock, roles=("copy",))
        msg, verdict = self.eom(redis)
        self.assertIs(self.successResultOf(verdict).action, Action.ACCEPT)  # type: ignore[arg-type]
        self.assertEqual(len(redis.servers["copy"].published), 1)
        self.assertEqual(msg.log_fields["published"], "published to copies (0 clients)")

    def test_failing_or_hanging_publish_same_verdict(self) -> None:
        """Unreachable: ACCEPT at once; hanging: ACCEPT after connect_timeout."""
        down = FakeRedisRoles(self.clock, roles=("copy",))
        down.set_reachable(False)
        _, verdict = self.eom(down)
        self.assertIs(self.successResultOf(verdict).action, Action.ACCEPT)  # type: ignore[arg-type]
        hanging = FakeRedisRoles(self.clock, roles=("copy",), timeout=60.0)
        hanging.servers["copy"].hang = True
        _, verdict = self.eom(hanging)
        self.assertNoResult(verdict)  # type: ignore[arg-type]
        self.clock.advance(1.0)
        self.assertIs(self.successResultOf(verdict).action, Action.ACCEPT)  # type: ignore[arg-type]
        self.clock.advance(60)
