"""Real services on loopback for integration tests: Redis, clamd, Rspamd, Postfix, rmilter.

How to use it
-------------
Every fixture is a plain object with BLOCKING methods (``start()``, ``stop()``, helpers that
send mail or query a server).  The services are separate processes, so blocking the test's
thread never stalls them.  That makes two test styles possible, both with trial:

- ``SynchronousTestCase`` (or ``TestCase``) calling the blocking helpers directly: the
  simplest choice for tests that drive things with swaks, miltertest, redis commands;
- ``TestCase`` returning Deferreds (e.g. driving the milter with ``rmilter.testing.mta``):
  start the fixtures in ``setUp`` (blocking there is fine) and, while the reactor must keep
  running, wrap slow blocking helpers in ``twisted.internet.threads.deferToThread``.

Fixtures belonging to one test are started with the ``start_*`` functions below, which
register ``testcase.addCleanup(fixture.stop)``.  Rspamd takes seconds to start, so
``shared_rspamd()`` returns one instance per test process, stopped at interpreter exit (extra
Lua rules: ``register_lua(name, source)`` at import time of the test module).  Anything still running at exit is stopped by pid (tests/harness/base.py).

A service that is missing or does not answer in time raises ``ServiceUnavailable`` (trial's
``FailTest``, an ``AssertionError``): the test FAILS with the reason and the tail of the service's log.  Tests
never skip for a missing service.

Scratch files live in one per-run directory ``/tmp/rmt-XXXXXX`` (short: unix sockets live there),
removed at exit unless ``RMILTER_KEEP_SCRATCH=1``.  Ports are free ports picked by the kernel.

Quick reference::

    redis = start_redis(self)                    # redis.address, redis.command("GET", "k")
    milter = start_rmilter(self, config_text)    # milter.milter_inet / .milter_unix / .inet_port,
                                                 # .wait_for_log(regex), .reload(), .stop()
    clamd = start_clamd(self)                    # clamd.address, clamd.socket_path, clamd.scan(b"...")
    rspamd = shared_rspamd()                     # rspamd.address, rspamd.checkv2(msg, ...)
    rspamd, dns = dns_rspamd()                   # (tests.harness.dns) an Rspamd resolving through
                                                 # dns.publish(name, txt): SPF and DKIM keys
    sink = start_smtp_sink(self)                 # sink.messages()
    postfix = start_postfix(self, sink)          # postfix.set_milters(milter.milter_inet)
    sent = postfix.swaks(data, auth_user="alice")  # sent.status, .queue_id, .server_replies
    [msg] = postfix.wait_delivered(1)            # msg.header("X-..."), msg.raw (DKIM-verifiable)
    result = miltertest(milter.milter_inet, hdr="X-Rmilter-Trace")   # result.passed, .headers(...)

For Postfix to reach rmilter's unix socket (smtpd runs as user postfix, rmilter makes sockets
0660), start rmilter with ``unix_mode="666"``.
"""
from __future__ import annotations

from typing import Any, Optional, Protocol

from tests.harness.base import (
    ServiceUnavailable,
    free_port,
    scratch_dir,
    scratch_root,
    wait_until,
)
from tests.harness.clamd import EICAR, EICAR_NAME, HARNESS_VIRUS_NAME, HARNESS_VIRUS_STRING, Clamd
from tests.harness.miltertest import BASIC_LUA, MiltertestResult, miltertest
from tests.harness.prometheus import Prometheus
from tests.harness.postfix import (
    MYHOSTNAME,
    SASL_PASSWORD,
    SASL_USERS,
    DeliveredMessage,
    Postfix,
    SmtpSink,
    SwaksResult,
)
from tests.harness.redis import Redis, RedisError, RespClient, SentinelGroup, Subscription
from tests.harness.rspamd import (
    GTUBE,
    GTUBE_ADD_HEADER,
    GTUBE_NO_ACTION,
    GTUBE_REWRITE_SUBJECT,
    Rspamd,
    register_lua,
    shared_rspamd,
)
from tests.harness.rmilter import REPO_ROOT, Rmilter


class _HasCleanup(Protocol):
    def addCleanup(self, f: Any, *args: Any, **kwargs: Any) -> None: ...


def start_redis(testcase: _HasCleanup, **kwargs: Any) -> Redis:
    """A fresh redis-server for this test, stopped at its end."""
    redis = Redis(**kwargs)
    testcase.addCleanup(redis.stop)
    return redis.start()


def start_sentinel_group(testcase: _HasCleanup) -> SentinelGroup:
    """A Redis master, its replica and three Sentinels for this test, stopped at its end."""
    group = SentinelGroup()
    testcase.addCleanup(group.stop)
    return group.start()


def start_clamd(testcase: _HasCleanup, **kwargs: Any) -> Clamd:
    """A clamd with the harness signatures (EICAR, HARNESS_VIRUS_STRING), stopped at the end."""
    clamd = Clamd(**kwargs)
    testcase.addCleanup(clamd.stop)
    return clamd.start()


def start_smtp_sink(testcase: _HasCleanup) -> SmtpSink:
    """An smtp-sink keeping every message it receives, stopped at the end."""
    sink = SmtpSink()
    testcase.addCleanup(sink.stop)
    return sink.start()


def start_postfix(testcase: _HasCleanup, sink: Optional[SmtpSink] = None, **kwargs: Any) -> Postfix:
    """A private Postfix relaying to ``sink`` (a new one when not given); both stopped at the end.

    Keyword arguments go to ``Postfix`` (``milters``, ``milter_default_action``, ``extra_main_cf``).
    """
    if sink is None:
        sink = start_smtp_sink(testcase)
    postfix = Postfix(sink, **kwargs)
    testcase.addCleanup(postfix.stop)
    return postfix.start()


def start_prometheus(testcase: _HasCleanup, target: str) -> Prometheus:
    """A private Prometheus scraping ``target`` (``HOST:PORT``) every second, stopped at the end."""
    prometheus = Prometheus(target)
    testcase.addCleanup(prometheus.stop)
    return prometheus.start()


def start_rmilter(testcase: _HasCleanup, config_text: str = "", **kwargs: Any) -> Rmilter:
    """``twistd rmilter`` with this config text, listening on inet and unix; stopped at the end."""
    milter = Rmilter(config_text, **kwargs)
    testcase.addCleanup(milter.stop)
    return milter.start()


__all__ = [
    "BASIC_LUA",
    "Clamd",
    "DeliveredMessage",
    "EICAR",
    "EICAR_NAME",
    "GTUBE",
    "GTUBE_ADD_HEADER",
    "GTUBE_NO_ACTION",
    "GTUBE_REWRITE_SUBJECT",
    "HARNESS_VIRUS_NAME",
    "HARNESS_VIRUS_STRING",
    "MYHOSTNAME",
    "MiltertestResult",
    "Prometheus",
    "Postfix",
    "REPO_ROOT",
    "Redis",
    "SentinelGroup",
    "RedisError",
    "RespClient",
    "Rmilter",
    "Rspamd",
    "SASL_PASSWORD",
    "SASL_USERS",
    "ServiceUnavailable",
    "SmtpSink",
    "Subscription",
    "SwaksResult",
    "free_port",
    "miltertest",
    "register_lua",
    "scratch_dir",
    "scratch_root",
    "shared_rspamd",
    "start_clamd",
    "start_postfix",
    "start_prometheus",
    "start_redis",
    "start_sentinel_group",
    "start_rmilter",
    "start_smtp_sink",
    "wait_until",
]
