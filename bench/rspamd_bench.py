#!/usr/bin/env python3
"""rmilter + Rspamd against Rspamd's own milter, in front of the same Rspamd normal worker (issue 4).

    python3 bench/rspamd_bench.py --milterload /tmp/milterload/milterload \
        [--conc 8,64] [--sizes 4k,100k] [--duration 10] [--warmup 2] [--reps 1] [--no-null]

One Rspamd (stock rules, network modules off, as tests/harness/rspamd.py) runs a ``normal``
worker (count 1) and an ``rspamd_proxy`` worker with ``milter = yes`` whose upstream is that
normal worker (no self_scan).  ``twistd rmilter`` scans on the same normal worker over HTTP
(/checkv2).  milterload (../shared/tools/milterload; build it with
``make -C ../shared/tools/milterload O=/tmp/milterload``) drives both milters, back to back for
every (size, concurrency) cell, so both see the same background load.  ``rmilter-null`` (no
spamd servers) shows the cost of the milter protocol alone.

Printed per run: messages/s, p50/p99 latency, rmilter's RSS (max during the run), CPU of the
milter and of the normal worker per message, and the final replies.  The summary gives, per
cell, rmilter's throughput relative to Rspamd's milter and the p99 rmilter adds to it.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from typing import Any, Dict, List, Optional, Tuple

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import Rmilter, milterload  # noqa: E402
from tests.harness.rspamd import Rspamd  # noqa: E402

RMILTER_CONF = """\
spamd {
  servers = %(server)s;
  connect_timeout = 1s;
  results_timeout = 20s;
}
"""


class BenchRspamd:
    """The test harness's Rspamd (tests/harness/rspamd.py), with its milter proxy forwarding to
    the normal worker instead of scanning itself, so both milters use the same worker."""

    def __init__(self, unix: bool = False) -> None:
        self.rspamd = Rspamd(proxy_self_scan=False, normal_unix=unix, log_level="error").start()
        #: how both milters reach the normal worker
        self.server = self.rspamd.normal_socket or self.rspamd.address
        self.proxy = self.rspamd.proxy_port

    def worker_pid(self, kind: str) -> Optional[int]:
        """The pid of the worker whose title names ``kind`` (``normal``, ``rspamd_proxy``)."""
        assert self.rspamd.process is not None
        out = subprocess.run(["pgrep", "-P", str(self.rspamd.process.pid)], capture_output=True,
                             text=True).stdout
        for pid in out.split():
            try:
                with open("/proc/%s/cmdline" % pid, "rb") as f:
                    title = f.read().replace(b"\0", b" ").decode("utf-8", "replace")
            except OSError:
                continue
            if kind in title:
                return int(pid)
        return None

    def stop(self) -> None:
        self.rspamd.stop()


def busy_jiffies() -> Tuple[int, int]:
    """(busy, total) jiffies of all CPUs, to see how much else ran during a measurement."""
    with open("/proc/stat") as f:
        values = [int(x) for x in f.readline().split()[1:9]]
    return sum(values) - values[3] - values[4], sum(values)


def other_cores(result: Dict[str, Any], before: Tuple[int, int], after: Tuple[int, int], wall: float) -> float:
    """Cores busy with something else than milterload and the watched processes (background noise)."""
    clock_ticks = os.sysconf("SC_CLK_TCK")
    busy = (after[0] - before[0]) / clock_ticks / wall
    generator = result["generator_cpu"]
    generator_cores = (generator["user_s"] + generator["sys_s"]) / wall
    watched = result.get("watched_cpu_s", 0.0) / result["wall_s"] if result.get("wall_s") else 0.0
    return busy - generator_cores - watched


def cpu_us_per_message(result: Dict[str, Any], index: int) -> Optional[float]:
    watched = result.get("watched") or []
    if len(watched) <= index or not result.get("messages"):
        return None
    return 1e6 * watched[index]["cpu_s"] / result["messages"]


def fmt(value: Optional[float], spec: str = "%.0f") -> str:
    return "-" if value is None else spec % value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--milterload", required=True, help="path of the milterload binary")
    parser.add_argument("--conc", default="8,64")
    parser.add_argument("--sizes", default="4k,100k")
    parser.add_argument("--duration", type=float, default=10)
    parser.add_argument("--warmup", type=float, default=2)
    parser.add_argument("--reps", type=int, default=1)
    parser.add_argument("--no-null", action="store_true", help="skip the rmilter run without spamd servers")
    parser.add_argument("--python", default=sys.executable, help="interpreter running twistd rmilter")
    parser.add_argument("--unix", action="store_true",
                        help="both milters reach the normal worker over a unix socket instead of TCP")
    args = parser.parse_args()

    rspamd = BenchRspamd(unix=args.unix)
    normal_pid = rspamd.worker_pid("normal")
    proxy_pid = rspamd.worker_pid("rspamd_proxy")
    milter = Rmilter(RMILTER_CONF % {"server": '"%s"' % rspamd.server}, python=args.python)
    null = None if args.no_null else Rmilter("", python=args.python)
    # (name, milter socket, pids watched: the milter process first, then the normal worker)
    targets: List[Tuple[str, str, List[int]]] = [
        ("rmilter+rspamd", milter.socket, [milter.pid] + ([normal_pid] if normal_pid else [])),
        ("rspamd milter", "inet:%d@127.0.0.1" % rspamd.proxy,
         ([proxy_pid] if proxy_pid else []) + ([normal_pid] if normal_pid else [])),
    ]
    if null is not None:
        targets.append(("rmilter-null", null.socket, [null.pid]))
    print("rmilter + Rspamd vs Rspamd's milter proxy, same normal worker (%s); %s, %d cores, %s"
          % ("unix socket" if args.unix else "TCP", time.strftime("%Y-%m-%d %H:%M"), os.cpu_count() or 0,
             subprocess.run(["rspamd", "--version"], capture_output=True, text=True).stdout.split("\n")[0]))
    print()
    print("| run | rep | msg/s | p50 ms | p99 ms | milter RSS max MB | milter CPU µs/msg "
          "| normal worker CPU µs/msg | other cores | errors | final replies |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    results: Dict[Tuple[str, str, int], List[Dict[str, Any]]] = {}
    try:
        for rep in range(args.reps):
            for size in args.sizes.split(","):
                for conc in (int(c) for c in args.conc.split(",")):
                    for name, target, pids in targets:
                        before, started = busy_jiffies(), time.monotonic()
                        result = milterload(args.milterload, target, concurrency=conc, duration=args.duration,
                                            warmup=args.warmup, size=size, pids=pids)
                        noise = other_cores(result, before, busy_jiffies(), time.monotonic() - started)
                        results.setdefault((name, size, conc), []).append(result)
                        watched = result.get("watched") or []
                        rss = watched[0]["rss_max_kb"] / 1024.0 if watched else None
                        finals = {k: v for k, v in result.get("final", {}).items() if v}
                        lat = result["latency_ms"]
                        print("| %s %s c=%d | %d | %.0f | %.2f | %.2f | %s | %s | %s | %.2f | %d | %s |" % (
                            name, size, conc, rep + 1, result["msgs_per_s"], lat["p50"], lat["p99"],
                            fmt(rss, "%.1f") if name.startswith("rmilter") else "-",
                            fmt(cpu_us_per_message(result, 0)),
                            fmt(cpu_us_per_message(result, 1)) if name != "rmilter-null" else "-",
                            noise, result.get("errors", 0), ",".join("%s=%d" % kv for kv in finals.items())),
                            flush=True)
    finally:
        milter.stop()
        if null is not None:
            null.stop()
        rspamd.stop()

    print()
    print("| cell | rmilter+rspamd msg/s | rspamd milter msg/s | ratio | rmilter p99 ms | rspamd milter p99 ms "
          "| p99 added by rmilter ms | rmilter-null p99 ms | target met |")
    print("|---|---|---|---|---|---|---|---|---|")
    for size in args.sizes.split(","):
        for conc in (int(c) for c in args.conc.split(",")):
            mine = results.get(("rmilter+rspamd", size, conc), [])
            theirs = results.get(("rspamd milter", size, conc), [])
            nulls = results.get(("rmilter-null", size, conc), [])
            if not mine or not theirs:
                continue
            rate = statistics.median(r["msgs_per_s"] for r in mine)
            ref = statistics.median(r["msgs_per_s"] for r in theirs)
            p99 = statistics.median(r["latency_ms"]["p99"] for r in mine)
            ref_p99 = statistics.median(r["latency_ms"]["p99"] for r in theirs)
            null_p99 = statistics.median(r["latency_ms"]["p99"] for r in nulls) if nulls else None
            added = p99 - ref_p99
            met = rate >= ref and added < 10.0
            print("| %s c=%d | %.0f | %.0f | %.2f | %.2f | %.2f | %.2f | %s | %s |" % (
                size, conc, rate, ref, rate / ref if ref else 0.0, p99, ref_p99, added,
                fmt(null_p99, "%.2f"), "yes" if met else "no"))


if __name__ == "__main__":
    main()
