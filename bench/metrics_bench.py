"""The metrics' own work per message (issue 14), without the engine around it: a stable figure.

Feeds ``rmilter.metrics.Metrics`` what the pipeline observes for one message of
``bench/milter_engine.py`` (the embedded default configuration: eight results, seven of them
skipped, then the finished message) and prints microseconds per message; compare with the
engine's microseconds per message to get the share.  Usage:
``python3 bench/metrics_bench.py [messages]``.
"""
from __future__ import annotations

import os
import sys
import time

from twisted.internet.task import Clock

from rmilter.metrics import Metrics
from rmilter.verdict import ACCEPT, Check, CheckResult, skipped


def main() -> None:
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 200000
    metrics = Metrics(Clock(), process_collector=False)
    results = [
        skipped(Check.REPLIES, "replies check inactive"),
        skipped(Check.SPAM, "skipped, no spamd servers defined"),
        skipped(Check.VIRUS, "skipped, no av servers"),
        skipped(Check.RATELIMIT, "limits inactive"),
        CheckResult(Check.DKIM, "unsigned"),
        skipped(Check.REPLIES, "not one of our senders"),
        skipped(Check.TRACE, "no trace_header"),
        skipped(Check.COPIES, "no copy channel"),
    ]
    observe, done = metrics.observe_result, metrics.message_done
    start = time.process_time()
    for _ in range(count):
        for result in results:
            observe(result, 0.0)
        done(None, results, ACCEPT, "summary line")
    elapsed = time.process_time() - start
    print("load %s; metrics work: %.2f us per message (%d messages, %d results each)" % (
        " ".join("%.2f" % x for x in os.getloadavg()), elapsed / count * 1e6, count, len(results)))


if __name__ == "__main__":
    main()
