"""Rate limits through ``twistd rmilter`` with a real redis-server (SPEC §6.3).

Refused at RCPT after the burst, accepted again once the bucket leaked; concurrent
messages over several connections counted exactly once each (the C version's
GET-then-SETEX lost updates); buckets readable as the C format; Redis stopped:
messages pass.
"""
from __future__ import annotations

import time
from typing import Any, Generator, List

from twisted.internet import defer, task
from twisted.internet import reactor as _reactor
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.trial.unittest import TestCase

from rmilter.testing.mta import ClientSpec, MessageSpec, MilterClient
from tests.harness import start_redis, start_rmilter
from tests.redis_support import c_bucket, send_message

reactor: Any = _reactor  # the global reactor, typed loosely (IReactorTCP + IReactorTime)


def sleep(seconds: float) -> defer.Deferred:
    return task.deferLater(reactor, seconds, lambda: None)


class RateLimitDaemonTests(TestCase):
    """limit_to with a small burst."""

    timeout = 120

    def start(self, limits: str) -> None:
        self.redis = start_redis(self)
        self.milter = start_rmilter(
            self, "redis { servers_limits = %s; connect_timeout = 0.5s; }\nlimits { %s }\n" % (self.redis.address, limits)
        )

    def send(self, message: MessageSpec = MessageSpec()) -> defer.Deferred:
        return send_message(reactor, self.milter.port, message)

    @defer.inlineCallbacks
    def test_burst_then_refused_then_leaked(self) -> Generator[Any, Any, None]:
        """burst 2, rate 0.5/s: three accepted, the fourth refused at RCPT, accepted again after the leak."""
        self.start("limit_to = 2:0.5;")
        actions: List[str] = []
        for _ in range(4):
            result = yield self.send()
            actions.append(result.action)
        self.assertEqual(actions, ["accept", "accept", "accept", "tempfail"])
        self.assertEqual(result.final_stage, "rcpt")
        self.assertEqual(result.reply_text, "451 4.7.1 Rate limit exceeded")
        last, count = c_bucket(self.redis.get(b"<rcpt@example.org>"))
        self.assertTrue(abs(last - time.time()) < 5, last)
        self.assertTrue(2 < count <= 3, count)
        self.assertTrue(86390 <= self.redis.ttl(b"<rcpt@example.org>") <= 86400)
        yield sleep(2.5)
        self.assertEqual((yield self.send()).action, "accept")

    @defer.inlineCallbacks
    def test_keys_of_all_buckets(self) -> Generator[Any, Any, None]:
        """The three buckets of an ordinary sender, lowercased, as C names them (SPEC §9)."""
        self.start("limit_to = 100:1; limit_to_ip = 30:0.025; limit_to_ip_from = 20:0.016666667;")
        result = yield self.send(MessageSpec(sender="Sender@Example.NET", recipients=("Rcpt@Example.org",)))
        self.assertEqual(result.action, "accept")
        self.assertEqual(
            self.redis.keys(),
            sorted([b"<rcpt@example.org>:192.0.2.10:sender@example.net", b"<rcpt@example.org>:192.0.2.10",
                    b"<rcpt@example.org>"]),
        )
        for key in self.redis.keys():
            self.assertAlmostEqual(c_bucket(self.redis.get(key))[1], 1.0, places=3)

    @defer.inlineCallbacks
    def test_concurrent_messages_counted_once(self) -> Generator[Any, Any, None]:
        """50 messages over 10 concurrent connections to one recipient: the bucket holds 50 (leak ~0)."""
        self.start("limit_to = 1000:0.000001; limit_to_ip = 1000:0.000001;")

        @defer.inlineCallbacks
        def connection(n: int) -> Generator[Any, Any, Any]:
            assert self.milter.port is not None
            client = yield MilterClient.connect(reactor, TCP4ClientEndpoint(reactor, "127.0.0.1", self.milter.port))
            actions = []
            for _ in range(5):
                result = yield client.send_message(MessageSpec(client=ClientSpec(address="192.0.2.10")))
                actions.append(result.action)
            yield client.close()
            return actions

        results = yield defer.gatherResults([connection(n) for n in range(10)])
        self.assertEqual(sum(r.count("accept") for r in results), 50)
        for key in (b"<rcpt@example.org>", b"<rcpt@example.org>:192.0.2.10"):
            _, count = c_bucket(self.redis.get(key))
            # 50 increments; the leak over the run is below 1e-4 at this rate
            self.assertTrue(abs(count - 50.0) < 1e-3, (key, count))

    @defer.inlineCallbacks
    def test_redis_stopped(self) -> Generator[Any, Any, None]:
        """No Redis: recipients pass at RCPT and messages at EOM."""
        self.start("limit_to = 1:0.001;")
        self.redis.stop()
        for _ in range(4):
            result = yield self.send()
            self.assertEqual(result.action, "accept")
