#!/usr/bin/env python3
"""A Redis Sentinel failover under load (issue 15): what the MTA sees, and how long until
rmilter writes to the new master.

    python3 bench/sentinel_failover_bench.py --milterload /tmp/milterload/milterload \
        [--workers 2] [--conc 8] [--duration 20] [--kill-at 6] [--vary-ip 65536]

One Redis master, its replica and three Sentinels on loopback (the test fixture's
``SentinelGroup``, Debian's redis-server), rmilter with ``workers = N``, greylisting (timeout
1 s) and rate limits (huge bursts: nothing trips, every message updates its buckets) on the
group.  milterload runs ``--duration`` seconds with rotating client addresses (each message a
new triplet: a grey record written, the message tempfailed at DATA); at ``--kill-at`` seconds
the master is SIGKILLed.

Printed: messages sent, answered (by final reply: ``tempfail`` = greylisted as it should be,
``accept`` = failed open while no master was known), lost (milterload errors: no final
reply), the seconds from the kill to the Sentinels' promotion and to rmilter's first write on
the promoted replica (its DBSIZE grows again), and milterload's per-second progress.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Any, Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))
from common import Rmilter, free_port, worker_pids  # noqa: E402
from tests.harness.redis import SentinelGroup  # noqa: E402  (the fixture the tests use)

CONFIG = """\
workers = %(workers)d;
metrics_socket = inet:%(metrics)d@127.0.0.1;
spamd { spamd_greylist = no; }
redis { servers_grey = "%(spec)s"; servers_limits = "%(spec)s"; connect_timeout = 1s; }
greylisting { timeout = 1s; }
limits {
  limit_to = 100000000:1;
  limit_to_ip = 100000000:0.025;
  limit_to_ip_from = 100000000:0.016666667;
}
"""



class Watch(threading.Thread):
    """From the kill on: when the replica becomes master, when its key count grows again."""

    def __init__(self, group: SentinelGroup) -> None:
        super().__init__(daemon=True)
        self.group = group
        self.killed_at: Optional[float] = None
        self.keys_at_kill = 0
        self.promoted: Optional[float] = None
        self.first_write: Optional[float] = None
        self.done = threading.Event()

    def kill_master(self) -> None:
        self.keys_at_kill = int(self.group.replica.command("DBSIZE"))
        self.killed_at = time.monotonic()
        assert self.group.master.process is not None
        self.group.master.process.signal(signal.SIGKILL)
        self.start()

    def run(self) -> None:
        assert self.killed_at is not None
        while not self.done.is_set() and time.monotonic() - self.killed_at < 60:
            try:
                if self.promoted is None and b"role:master" in _raw(self.group.replica.command("INFO", "replication")):
                    self.promoted = time.monotonic() - self.killed_at
                if self.promoted is not None and int(self.group.replica.command("DBSIZE")) > self.keys_at_kill:
                    self.first_write = time.monotonic() - self.killed_at
                    return
            except OSError:
                pass
            time.sleep(0.02)


def scrape(port: int) -> Dict[str, Dict[str, float]]:
    """metric -> {first label value: sum} from the main process's /metrics."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen("http://127.0.0.1:%d/metrics" % port, timeout=10) as reply:
        text = reply.read().decode("utf-8")
    out: Dict[str, Dict[str, float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.value:
                label = next(iter(sample.labels.values()), "")
                by = out.setdefault(sample.name, {})
                by[label] = by.get(label, 0) + sample.value
    return out


def _raw(value: Any) -> bytes:
    return value if isinstance(value, bytes) else str(value).encode()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--milterload", required=True)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--conc", type=int, default=8)
    parser.add_argument("--duration", type=float, default=20)
    parser.add_argument("--kill-at", type=float, default=6)
    parser.add_argument("--vary-ip", type=int, default=65536)
    args = parser.parse_args()
    print("rmilter Sentinel failover benchmark, %s, %d cores, load %s" % (
        time.strftime("%Y-%m-%d %H:%M"), os.cpu_count() or 0, " ".join("%.1f" % l for l in os.getloadavg())))
    group = SentinelGroup().start()
    service: Optional[Rmilter] = None
    try:
        metrics_port = free_port()
        service = Rmilter(CONFIG % {"workers": args.workers, "spec": group.spec, "metrics": metrics_port})
        pids = [service.pid] + (worker_pids(service.pid, args.workers) if args.workers > 1 else [])
        cmd = [args.milterload, "-s", service.socket, "-c", str(args.conc), "-d", str(args.duration), "-w", "0",
               "--json", "-i", "1", "--vary-ip", str(args.vary_ip), "-p", ",".join(map(str, pids))]
        load = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(args.kill_at)
        watch = Watch(group)
        watch.kill_master()
        out, err = load.communicate(timeout=args.duration + 120)
        watch.done.set()
        result: Dict[str, Any] = json.loads(out)
        finals = {k: v for k, v in result.get("final", {}).items() if v}
        answered = sum(finals.values())
        errors = result.get("errors", 0)
        lost = errors if isinstance(errors, int) else sum(errors.values())
        print("workers = %d, %d connections, %.0f s, master SIGKILLed at %.0f s" % (
            args.workers, args.conc, args.duration, args.kill_at))
        print("messages sent %d, answered %d (%s), lost (no final reply) %d" % (
            answered + lost, answered, ", ".join("%s %d" % kv for kv in finals.items()), lost))
        print("seconds from the kill: Sentinels promoted the replica %s, rmilter's first write there %s" % (
            "%.2f" % watch.promoted if watch.promoted is not None else "never",
            "%.2f" % watch.first_write if watch.first_write is not None else "never"))
        print("msg/s over the run %.0f; milterload errors %s" % (result.get("msgs_per_s", 0), json.dumps(errors)))
        counts = scrape(metrics_port)
        print("rmilter's metrics (summed over its workers): messages %s; greylisting %s; Redis failed open %s" % (
            counts.get("rmilter_messages_total", {}), counts.get("rmilter_greylist_total", {}),
            counts.get("rmilter_redis_fail_open_total", {})))
        print("milterload progress (one line a second):")
        for line in err.splitlines():
            if line.strip():
                print("  " + line.strip())
    finally:
        if service is not None:
            service.stop()
        group.stop()
        group.replica.stop()
        group.master.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
