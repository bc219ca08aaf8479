#!/usr/bin/env python3
"""Soak: a long run at fixed concurrency with greylisting and rate limits on a real Redis (issue 18).

    python3 bench/soak_bench.py [--duration 900] [--conc 16] [--sample 30] [--vary-ip 4096]

One ``twistd -n rmilter`` (redis greylisting, timeout 1 s, and the five rate buckets with bursts
nothing trips), a private redis-server, and ``--conc`` milter connections in this process
(rmilter.testing.mta.MilterClient) sending one message after another, the client IP rotating
over ``--vary-ip`` addresses (so greylisting and rate keys keep changing).  Every ``--sample``
seconds it prints messages/s, the verdicts so far, rmilter's RSS and open fds; at the end the
growth of RSS and fds from the first sample (after warm-up) to the last (target: under 5 %).
"""
from __future__ import annotations

import argparse
import ipaddress
import os
import sys
from collections import Counter
from typing import Any, Dict, List, Tuple

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import Rmilter, rss_mb  # noqa: E402
from redis_bench import REDIS_CONFIG, SENDER, RedisServer  # noqa: E402

from twisted.internet import defer, reactor, task  # noqa: E402
from twisted.internet.endpoints import TCP4ClientEndpoint  # noqa: E402

from rmilter.testing.mta import ClientSpec, MessageSpec, MilterClient  # noqa: E402


def open_fds(pid: int) -> int:
    return len(os.listdir("/proc/%d/fd" % pid))


def growth(first: float, last: float) -> str:
    return "%+.1f %%" % ((last - first) * 100.0 / first) if first else "n/a"


@defer.inlineCallbacks
def connection(port: int, index: int, args: argparse.Namespace, state: Dict[str, Any]):  # type: ignore[no-untyped-def]
    """One MTA connection per message, as Postfix opens one per SMTP session."""
    base = int(ipaddress.IPv4Address("10.0.0.0"))
    n = index
    while not state["stop"]:
        ip = str(ipaddress.IPv4Address(base + (n % args.vary_ip)))
        n += args.conc
        spec = MessageSpec(sender=SENDER, queue_id="SOAK%06d" % (n % 1000000),
                           client=ClientSpec(address=ip, hostname="h%d.example.net" % (n % 977)))
        try:
            client = yield MilterClient.connect(reactor, TCP4ClientEndpoint(reactor, "127.0.0.1", port))
            try:
                result = yield client.send_message(spec)
                state["verdicts"][result.action] += 1
            finally:
                yield client.close()
        except Exception as e:  # counted: a soak reports failures, it does not stop on them
            state["verdicts"]["error:" + type(e).__name__] += 1
        state["messages"] += 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=900.0, help="seconds (default 900)")
    parser.add_argument("--conc", type=int, default=16)
    parser.add_argument("--sample", type=float, default=30.0, help="seconds between samples (default 30)")
    parser.add_argument("--vary-ip", type=int, default=4096)
    args = parser.parse_args()

    redis = RedisServer()
    milter = Rmilter(REDIS_CONFIG % {"port": redis.port, "grey_timeout": "1s"})
    state: Dict[str, Any] = {"stop": False, "messages": 0, "verdicts": Counter()}
    samples: List[Tuple[float, int, float, int]] = []
    started = reactor.seconds()

    def sample() -> None:
        now = reactor.seconds() - started
        rss, fds = rss_mb(milter.pid), open_fds(milter.pid)
        previous = samples[-1] if samples else (0.0, 0, 0.0, 0)
        rate = (state["messages"] - previous[1]) / max(now - previous[0], 1e-9)
        samples.append((now, state["messages"], rss, fds))
        print("t=%5.0f s  messages=%7d  %6.1f msg/s  rss=%6.1f MB  fds=%4d  %s"
              % (now, state["messages"], rate, rss, fds, dict(state["verdicts"])), flush=True)

    def finish() -> None:
        state["stop"] = True
        sample()
        reactor.callLater(2, reactor.stop)

    print("soak: conc %d, %.0f s, sample every %.0f s, load %s" % (
        args.conc, args.duration, args.sample, open("/proc/loadavg").read().split()[:3]), flush=True)
    sample()
    loop = task.LoopingCall(sample)
    loop.start(args.sample, now=False)
    for i in range(args.conc):
        connection(milter.port, i, args, state)
    reactor.callLater(args.duration, lambda: (loop.stop(), finish()))
    try:
        reactor.run()
    finally:
        milter.stop()
        redis.stop()
    # growth from the first sample after warm-up (the second one) to the last
    base = samples[1] if len(samples) > 2 else samples[0]
    last = samples[-1]
    print("growth from t=%.0f s to t=%.0f s: rss %.1f -> %.1f MB (%s), fds %d -> %d (%s); %d messages, %s"
          % (base[0], last[0], base[2], last[2], growth(base[2], last[2]), base[3], last[3],
             growth(base[3], last[3]), last[1], dict(state["verdicts"])), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
