"""Pub/sub copies (SPEC §6.5, B12, B23): channels, payload, sampling, summary field, failures."""
from __future__ import annotations

import math
import random
import shutil
import tempfile
from typing import List, Optional, Tuple, cast

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.logger import ILogObserver, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from rmilter.checks import copies
from rmilter.config.schema import Config, RedisConfig, RedisServer
from rmilter.context import ConnectionContext, MessageContext, Recipient
from rmilter.deps import Deps
from rmilter.pipeline import Pipeline, Transaction
from rmilter.runtime import Runtime
from rmilter.spool import Spool, run_inline, spool_head
from rmilter.summary import summary_event
from rmilter.testing.fake_redis import FakeRedisRoles
from rmilter.verdict import ACCEPT, Action, Check, CheckResult, Verdict
from tests.pipeline_support import send_until_eom

SERVER = (RedisServer("127.0.0.1", "127.0.0.1"),)
BODY = b"Hello\r\nthis is the body\r\n"


def binomial_bounds(n: int, p: float, sigmas: float = 5.0) -> "tuple[float, float]":
    """A count of Binomial(n, p) lies outside these bounds with probability < 1e-6."""
    spread = sigmas * math.sqrt(n * p * (1 - p))
    return n * p - spread, n * p + spread


def make_deps(
    clock: Clock,
    redis: Optional[FakeRedisRoles],
    spam_channel: Optional[str] = "spam",
    copy_channel: Optional[str] = "copies",
    copy_probability: float = 1.0,
    servers_copy: Tuple[RedisServer, ...] = SERVER,
    cache_backend: str = "redis",
    seed: int = 7,
) -> Deps:
    """spam and copy channels on one server each; copy sampling seeded with ``seed``."""
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
    return Deps(config=config, clock=clock, run_blocking=run_inline, redis=redis, rng=random.Random(seed))


def make_message(testcase: SynchronousTestCase, body: bytes = BODY, memory_limit: int = 1 << 20) -> MessageContext:
    """A message whose spool is complete (as at EOM)."""
    conn = ConnectionContext(client_address="192.0.2.10", family="4", helo="client.example.org")
    msg = MessageContext(connection=conn)
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


def publish(test: SynchronousTestCase, msg: MessageContext, deps: Deps, kind: str) -> CheckResult:
    """The copies check of ``kind``, which must have ended; it never demands a verdict."""
    result = test.successResultOf(copies.check(msg, deps, kind=kind))
    test.assertIs(result.check, Check.COPIES)
    test.assertIsNone(result.verdict)
    test.assertEqual(result.edits, ())
    return result


def published_field(msg: MessageContext, *results: CheckResult) -> Optional[str]:
    """What the summary line (SPEC §8.4) shows for these results: ``published to ...`` or None."""
    return summary_event(msg, results, ACCEPT)["published"]


class PublishTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.redis = FakeRedisRoles(self.clock, roles=("spam", "copy"), separate=True)
        self.spam_server = self.redis.servers["spam"]
        self.copy_server = self.redis.servers["copy"]
        self.spam_server.subscribers["spam"] = 2
        self.copy_server.subscribers["copies"] = 1

    def assertNotPublished(self, result: CheckResult, msg: MessageContext, summary: str) -> None:
        self.assertEqual(result.summary, summary)
        self.assertFalse(copies.published(result))
        self.assertIsNone(published_field(msg, result))

    def test_spam_copy_is_the_whole_spool(self) -> None:
        """kind "spam": PUBLISH spam_channel on servers_spam with the SPEC §5.14 bytes; count logged."""
        msg = make_message(self)
        result = publish(self, msg, make_deps(self.clock, self.redis), copies.SPAM)
        (published,) = self.spam_server.published
        assert msg.spool is not None
        self.assertEqual(published.channel, "spam")
        self.assertEqual(published.payload, msg.spool.head + BODY)
        self.assertTrue(published.payload.startswith(b"Received: from client.example.org (client [192.0.2.10])"))
        self.assertIn(b"X-Rcpt-To: <rcpt@example.net>\r\n\r\n" + BODY, published.payload)
        self.assertEqual((result.summary, result.failed, result.skipped), ("published to spam (2 clients)", False,
                                                                           False))
        self.assertEqual(result.details, {"channel": "spam", "subscribers": 2})
        self.assertEqual(published_field(msg, result), "published to spam (2 clients)")
        self.assertEqual(self.copy_server.published, [])

    def test_message_copy_on_copy_servers(self) -> None:
        msg = make_message(self)
        result = publish(self, msg, make_deps(self.clock, self.redis), copies.COPY)
        (published,) = self.copy_server.published
        self.assertEqual(published.channel, "copies")
        self.assertEqual(published_field(msg, result), "published to copies (1 clients)")
        self.assertEqual(self.spam_server.published, [])

    def test_spooled_body_published_whole(self) -> None:
        """A body that went to the spool file is read back completely."""
        body = b"".join(b"line %05d\r\n" % i for i in range(3000))
        msg = make_message(self, body=body, memory_limit=1000)
        assert msg.spool is not None
        self.assertFalse(msg.spool.in_memory)
        publish(self, msg, make_deps(self.clock, self.redis), copies.COPY)
        self.assertEqual(self.copy_server.published[0].payload, msg.spool.head + body)

    def test_both_copies_named_in_the_summary(self) -> None:
        """A spam copy of a message that continues (spamd_never_reject) and its message copy both show."""
        msg = make_message(self)
        deps = make_deps(self.clock, self.redis)
        spam, copy = publish(self, msg, deps, copies.SPAM), publish(self, msg, deps, copies.COPY)
        self.assertEqual(published_field(msg, spam, copy),
                         "published to spam (2 clients); published to copies (1 clients)")

    def test_zero_subscribers_still_logged(self) -> None:
        self.copy_server.subscribers.clear()
        msg = make_message(self)
        result = publish(self, msg, make_deps(self.clock, self.redis), copies.COPY)
        self.assertEqual(published_field(msg, result), "published to copies (0 clients)")

    def test_channel_or_servers_missing(self) -> None:
        """No channel, no servers for the role (B23) or a memcached backend (B13): nothing published."""
        all_deps = [
            make_deps(self.clock, self.redis, spam_channel=None, copy_channel=None),
            make_deps(self.clock, FakeRedisRoles(self.clock, roles=("grey",))),
            make_deps(self.clock, self.redis, cache_backend="memcached"),
            make_deps(self.clock, None),
        ]
        for deps in all_deps:
            msg = make_message(self)
            for kind in (copies.SPAM, copies.COPY):
                result = publish(self, msg, deps, kind)
                self.assertTrue(result.skipped)
                self.assertNotPublished(result, msg, "no %s channel" % (kind,))
        self.assertEqual(self.redis.all_commands(), [])

    def test_no_spool_nothing_published(self) -> None:
        """A message without a spool (ended before DATA) has nothing to publish."""
        msg = make_message(self)
        msg.spool = None
        result = publish(self, msg, make_deps(self.clock, self.redis), copies.COPY)
        self.assertTrue(result.skipped)
        self.assertNotPublished(result, msg, "no spool")
        self.assertEqual(self.redis.all_commands(), [])

    def test_probability_zero_and_one(self) -> None:
        """copy_probability 0 never copies (C looped forever, B12); 1 always copies."""
        never = make_deps(self.clock, self.redis, copy_probability=0.0)
        always = make_deps(self.clock, self.redis, copy_probability=1.0)
        never_msg, always_msg = make_message(self), make_message(self)
        for _ in range(200):
            result = publish(self, never_msg, never, copies.COPY)
            self.assertEqual((result.skipped, result.summary), (True, "not sampled"))
        self.assertEqual(self.copy_server.published, [])
        for _ in range(200):
            publish(self, always_msg, always, copies.COPY)
        self.assertEqual(len(self.copy_server.published), 200)

    def test_plain_probability(self) -> None:
        """B12: p = 0.5 and p = 0.02 copy about that share (C: 0.6 % for 0.5), within a 5-sigma bound."""
        for p, n in ((0.5, 2000), (0.02, 2000)):
            del self.copy_server.published[:]
            msg = make_message(self)
            deps = make_deps(self.clock, self.redis, copy_probability=p)
            for _ in range(n):
                publish(self, msg, deps, copies.COPY)
            low, high = binomial_bounds(n, p)
            self.assertTrue(low <= len(self.copy_server.published) <= high, (p, len(self.copy_server.published)))

    def test_sampling_uses_the_deps_rng(self) -> None:
        """The sampling source is ``deps.rng``: the same seed samples the same messages."""
        def sampled(seed: int) -> List[bool]:
            deps = make_deps(self.clock, self.redis, copy_probability=0.5, seed=seed)
            msg = make_message(self)
            return [copies.published(publish(self, msg, deps, copies.COPY)) for _ in range(64)]

        self.assertEqual(sampled(11), sampled(11))
        self.assertNotEqual(sampled(11), sampled(12))

    def test_spam_copies_not_sampled(self) -> None:
        """copy_probability applies to message copies only."""
        deps = make_deps(self.clock, self.redis, copy_probability=0.0)
        publish(self, make_message(self), deps, copies.SPAM)
        self.assertEqual(len(self.spam_server.published), 1)

    def test_unreachable_redis_logged_not_noted(self) -> None:
        """A failed PUBLISH fires at once, logs a warning, is a failed result and leaves the summary line alone."""
        events: List[dict] = []
        observer = cast(ILogObserver, events.append)
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        self.redis.set_reachable(False)
        msg = make_message(self)
        result = publish(self, msg, make_deps(self.clock, self.redis), copies.COPY)
        self.assertTrue(result.failed)
        self.assertNotPublished(result, msg, "not published to copies")
        warnings = [e for e in events if e.get("log_namespace") == "rmilter.copies" and e["log_level"].name == "warn"]
        self.assertEqual([w["channel"] for w in warnings], ["copies"])

    def test_hanging_redis_bounded_by_connect_timeout(self) -> None:
        """A PUBLISH that never answers delays the message by connect_timeout at most."""
        redis = FakeRedisRoles(self.clock, roles=("copy",), timeout=60.0)
        redis.servers["copy"].hang = True
        msg = make_message(self)
        publishing = copies.check(msg, make_deps(self.clock, redis), kind=copies.COPY)
        self.clock.advance(0.99)
        self.assertNoResult(publishing)
        self.clock.advance(0.01)
        result = self.successResultOf(publishing)
        self.assertTrue(result.failed)
        self.assertNotPublished(result, msg, "not published to copies")
        self.clock.advance(60)

    def test_unknown_kind_is_a_programming_error_not_a_failure(self) -> None:
        """Even a wrong call never fails the message: logged, nothing published."""
        msg = make_message(self)
        result = publish(self, msg, make_deps(self.clock, self.redis), "ham")
        self.assertTrue(result.failed)
        self.assertNotPublished(result, msg, "not published, internal error")
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)
        self.assertEqual(self.redis.all_commands(), [])


class PipelineTests(SynchronousTestCase):
    """EOM with copies: the verdict never depends on publishing."""

    def setUp(self) -> None:
        self.clock = Clock()

    def eom(self, redis: FakeRedisRoles) -> "Tuple[Transaction, Deferred[Verdict]]":
        runtime = Runtime(make_deps(self.clock, redis))
        txn, data, eom = send_until_eom(self, Pipeline(lambda: runtime))
        self.assertIs(data.action, Action.CONTINUE)
        assert eom is not None
        return cast(Transaction, txn), eom  # what Pipeline.mail returned

    def copy_result(self, txn: Transaction) -> CheckResult:
        (result,) = [r for r in txn.results if r.check is Check.COPIES]
        return result

    def test_accepted_with_copy(self) -> None:
        redis = FakeRedisRoles(self.clock, roles=("copy",))
        txn, verdict = self.eom(redis)
        self.assertIs(self.successResultOf(verdict).action, Action.ACCEPT)
        (published,) = redis.servers["copy"].published
        assert txn.message.spool is not None
        self.assertEqual(published.payload, txn.message.spool.head + b"Hello\r\n")
        self.assertEqual(published_field(txn.message, *txn.results), "published to copies (0 clients)")

    def test_failing_or_hanging_publish_same_verdict(self) -> None:
        """Unreachable: ACCEPT at once; hanging: ACCEPT after connect_timeout."""
        down = FakeRedisRoles(self.clock, roles=("copy",))
        down.set_reachable(False)
        txn, verdict = self.eom(down)
        self.assertIs(self.successResultOf(verdict).action, Action.ACCEPT)
        self.assertTrue(self.copy_result(txn).failed)
        hanging = FakeRedisRoles(self.clock, roles=("copy",), timeout=60.0)
        hanging.servers["copy"].hang = True
        txn, verdict = self.eom(hanging)
        self.assertNoResult(verdict)
        self.clock.advance(1.0)
        self.assertIs(self.successResultOf(verdict).action, Action.ACCEPT)
        self.assertTrue(self.copy_result(txn).failed)
        self.assertIsNone(published_field(txn.message, *txn.results))
        self.clock.advance(60)
