"""Greylisting through ``twistd rmilter`` with a real redis-server (and Rspamd for the EOM stage).

The records are read back with a small C-format reader (tests.redis_support.c_grey_key,
c_time): what a site switching from the C rmilter already has in Redis is found, and
what we write the C version would read.
"""
from __future__ import annotations

import signal
import time
from typing import Any, Generator, List

from twisted.internet import defer, task
from twisted.internet import reactor as _reactor
from twisted.trial.unittest import TestCase

from rmilter.testing.mta import ClientSpec, MessageSpec
from tests.harness import shared_rspamd, start_redis, start_rmilter
from tests.redis_support import c_data_key, c_grey_key, c_time, send_message

GREY_CONFIG = """
spamd { spamd_greylist = no; }
redis { servers_grey = %(redis)s; connect_timeout = 0.5s; }
greylisting { timeout = 2s; expire = 1h; whitelist = 198.51.100.0/24, 2001:db8:77::/48; }
"""

reactor: Any = _reactor  # the global reactor, typed loosely (IReactorTCP + IReactorTime)


def sleep(seconds: float) -> defer.Deferred:
    return task.deferLater(reactor, seconds, lambda: None)


def spec(ip: str = "192.0.2.10", sender: str = "sender@example.net", **kwargs: Any) -> MessageSpec:
    family = "6" if ":" in ip else "4"
    return MessageSpec(sender=sender, client=ClientSpec(address=ip, family=family), **kwargs)


class DataStageTests(TestCase):
    """spamd_greylist = no: the envelope is greylisted at DATA (SPEC §5.6)."""

    timeout = 120

    def setUp(self) -> None:
        self.redis = start_redis(self)
        self.milter = start_rmilter(self, GREY_CONFIG % {"redis": self.redis.address})

    def send(self, message: MessageSpec) -> defer.Deferred:
        return send_message(reactor, self.milter.port, message)

    @defer.inlineCallbacks
    def test_first_delivery_retry_and_pass(self) -> Generator[Any, Any, None]:
        """TEMPFAIL at DATA with a grey record; a retry before timeout is refused; after it, a white record."""
        before = time.time()
        first = yield self.send(spec())
        self.assertEqual((first.action, first.final_stage, first.reply_text),
                         ("tempfail", "data", "451 4.7.1 Try again later"))
        grey = c_grey_key("grey", "sender@example.net", "192.0.2.10", ["<rcpt@example.org>"])
        self.assertEqual(self.redis.keys(), [grey])
        stored = c_time(self.redis.get(grey))
        self.assertTrue(before - 1 <= stored <= time.time() + 1, stored)
        self.assertTrue(3590 <= self.redis.ttl(grey) <= 3600)

        retry = yield self.send(spec())
        self.assertEqual((retry.action, retry.final_stage), ("tempfail", "data"))
        self.assertEqual(c_time(self.redis.get(grey)), stored)  # grey records are never refreshed

        yield sleep(2.2)
        passed = yield self.send(spec())
        self.assertEqual(passed.action, "accept")
        white = b"white" + grey[4:]
        self.assertTrue(c_time(self.redis.get(white)) >= stored + 2)
        self.assertTrue(3 * 86400 - 10 <= self.redis.ttl(white) <= 3 * 86400)
        # the whitelisted triplet passes at once from now on
        again = yield self.send(spec())
        self.assertEqual(again.action, "accept")

    @defer.inlineCallbacks
    def test_same_network_shares_records(self) -> Generator[Any, Any, None]:
        """Another address of the same C "/19" block and the same IPv6 /64 hit the same record (B17)."""
        first = yield self.send(spec(ip="203.0.113.200"))
        self.assertEqual(first.action, "tempfail")
        first6 = yield self.send(spec(ip="2001:db8::25"))
        self.assertEqual(first6.action, "tempfail")
        yield sleep(2.2)
        self.assertEqual((yield self.send(spec(ip="203.0.9.7"))).action, "accept")
        self.assertEqual((yield self.send(spec(ip="2001:db8::1:2"))).action, "accept")
        self.assertEqual(len(self.redis.keys("white*")), 2)

    @defer.inlineCallbacks
    def test_whitelisted_ip_never_greylisted(self) -> Generator[Any, Any, None]:
        """Clients in greylisting.whitelist (IPv4 and IPv6) pass and leave no record."""
        for ip in ("198.51.100.7", "2001:db8:77::1"):
            result = yield self.send(spec(ip=ip))
            self.assertEqual(result.action, "accept", ip)
        self.assertEqual(self.redis.keys(), [])

    @defer.inlineCallbacks
    def test_authenticated_never_greylisted(self) -> Generator[Any, Any, None]:
        """A SASL-authenticated sender passes and leaves no record (SPEC §5.11)."""
        result = yield self.send(spec(auth_authen="alice"))
        self.assertEqual(result.action, "accept")
        self.assertEqual(self.redis.keys(), [])

    @defer.inlineCallbacks
    def test_redis_stopped_mid_run(self) -> Generator[Any, Any, None]:
        """Redis gone: messages flow (fail open); Redis back: greylisting resumes."""
        first = yield self.send(spec(ip="192.0.2.1"))
        self.assertEqual(first.action, "tempfail")
        self.redis.stop()
        for i in range(10):
            result = yield self.send(spec(ip="192.0.2.%d" % (20 + i)))
            self.assertEqual(result.action, "accept", i)
        self.redis.start()
        deadline = reactor.seconds() + 20
        results: List[str] = []
        while reactor.seconds() < deadline:
            result = yield self.send(spec(ip="10.1.%d.1" % len(results)))
            results.append(result.action)
            if result.action == "tempfail":
                break
            yield sleep(0.2)
        self.assertEqual(results[-1], "tempfail", results)
        self.assertTrue(self.redis.keys())
        self.milter.wait_for_log("Redis grey server .* failing open")
        self.milter.wait_for_log("Redis grey server .* is reachable again")


    @defer.inlineCallbacks
    def test_redis_hangs(self) -> Generator[Any, Any, None]:
        """Redis stopped with SIGSTOP (connections open, no answers): messages pass, none waits past the timeout."""
        self.assertEqual((yield self.send(spec(ip="192.0.2.1"))).action, "tempfail")
        assert self.redis.process is not None
        self.redis.process.signal(signal.SIGSTOP)
        try:
            for i in range(6):
                started = reactor.seconds()
                result = yield self.send(spec(ip="192.0.2.%d" % (30 + i)))
                self.assertEqual(result.action, "accept", i)
                # connect_timeout is 0.5 s; generous margin for a loaded machine, far below a hang
                self.assertLess(reactor.seconds() - started, 3.0)
        finally:
            self.redis.process.signal(signal.SIGCONT)
        deadline = reactor.seconds() + 20
        while reactor.seconds() < deadline:
            result = yield self.send(spec(ip="10.2.0.1"))
            if result.action == "tempfail":
                break
            yield sleep(0.2)
        self.assertEqual(result.action, "tempfail")


class EomStageTests(TestCase):
    """spamd_greylist = yes: greylisting after Rspamd's verdict, data and envelope hash (SPEC §5.9 4b)."""

    timeout = 180

    def setUp(self) -> None:
        self.rspamd = shared_rspamd()
        self.redis = start_redis(self)
        config = """
spamd { servers = r:%(rspamd)s; spamd_greylist = yes; }
redis { servers_grey = %(redis)s; }
greylisting { timeout = 2s; }
""" % {"rspamd": self.rspamd.address, "redis": self.redis.address}
        self.milter = start_rmilter(self, config)

    @defer.inlineCallbacks
    def test_two_records_then_pass_with_header(self) -> Generator[Any, Any, None]:
        """Rspamd says greylist: TEMPFAIL at EOM, two grey records; after timeout accepted with X-Rmilter-Greylist."""
        body = b"Hello\r\nRSPAMD-TEST-ACTION: greylist\r\n"
        message = spec(body=body)
        first = yield send_message(reactor, self.milter.port, message)
        self.assertEqual((first.action, first.final_stage, first.reply_text),
                         ("tempfail", "eom", "451 4.7.1 Try again later"))
        data_key = c_data_key("grey", body)
        envelope_key = c_grey_key("grey", "sender@example.net", "192.0.2.10", ["<rcpt@example.org>"])
        self.assertEqual(self.redis.keys(), sorted([data_key, envelope_key]))
        for key in (data_key, envelope_key):
            self.assertTrue(86390 <= self.redis.ttl(key) <= 86400)
        yield sleep(2.2)
        second = yield send_message(reactor, self.milter.port, message)
        self.assertEqual(second.action, "accept")
        headers = dict(second.added_headers)
        self.assertIn("X-Rmilter-Greylist", headers)
        self.assertIn("type: data hash", headers["X-Rmilter-Greylist"])
        self.assertIn(b"white" + data_key[4:], self.redis.keys())

    @defer.inlineCallbacks
    def test_no_greylisting_for_clean_mail(self) -> Generator[Any, Any, None]:
        """Rspamd says no action: no greylisting and no record."""
        result = yield send_message(reactor, self.milter.port, spec(body=b"Hello\r\nRSPAMD-TEST-ACTION: no action\r\n"))
        self.assertEqual(result.action, "accept")
        self.assertEqual(self.redis.keys(), [])
