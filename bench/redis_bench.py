#!/usr/bin/env python3
"""Greylisting and rate limits with Redis on loopback vs the pass-through path (issue 6).

    python3 bench/redis_bench.py --milterload /tmp/milterload/milterload \
        [--conc 8] [--duration 10] [--warmup 2] [--vary-ip 65536] [--size 4k] [--reps 1]
        [--scenarios pass,steady,greylisted]

Scenarios (each a fresh ``twistd -n rmilter`` and a flushed redis-server):

- ``pass``: no Redis (the pass-through path);
- ``steady``: greylisting (timeout 1 s) and all five rate buckets (limits with huge bursts so
  nothing trips; sender ``postmaster@example.com`` is listed in ``limit_bounce_addrs`` so the
  two bounce buckets apply too).  A pre-run of 4096 messages lets every client block pass its
  greylisting once; then each message costs a white-record lookup at DATA, a bucket check at
  RCPT and a bucket update at EOM: the site's everyday traffic;
- ``greylisted``: greylisting with the default 300 s timeout: every message is tempfailed at
  DATA after its lookups (new or still-grey triplets), buckets checked at RCPT.

Client IPs rotate over ``--vary-ip`` consecutive IPv4 addresses (milterload ``--vary-ip``), so
rate keys differ per address and greylisting sees a new C "/19" block every 256 addresses.

For each Redis scenario it also reports Redis commands per message: ``round trips`` are the
commands rmilter sent (counted with MONITOR on a separate run of ``--count-messages``
messages), ``executed`` adds the commands run inside the Lua scripts (INFO commandstats).
The load generator is ../shared/tools/milterload; build it with
``make -C ../shared/tools/milterload O=/tmp/milterload``.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from typing import Any, Dict, List, Optional, Tuple

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import Rmilter, free_port, milterload, wait_for_port, worker_pids  # noqa: E402

SENDER = "postmaster@example.com"

REDIS_CONFIG = """\
bind_socket = inet:11339@127.0.0.1;
spamd { spamd_greylist = no; }
redis { servers_grey = 127.0.0.1:%(port)d; servers_limits = 127.0.0.1:%(port)d; }
greylisting { timeout = %(grey_timeout)s; }
limits {
  limit_to = 100000000:1;
  limit_to_ip = 100000000:0.025;
  limit_to_ip_from = 100000000:0.016666667;
  limit_bounce_to = 100000000:0.000277778;
  limit_bounce_to_ip = 100000000:0.000277778;
  limit_bounce_addrs = postmaster, mailer-daemon, "<>";
}
"""

PASS_CONFIG = "bind_socket = inet:11339@127.0.0.1;\n"


# -- a private redis-server and a tiny RESP client ---------------------------------------------------
class RedisServer:
    def __init__(self) -> None:
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="rmilter-bench-redis-")
        self.proc = subprocess.Popen(
            [shutil.which("redis-server") or "redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
             "--save", "", "--appendonly", "no", "--dir", self.dir, "--logfile", os.path.join(self.dir, "log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        wait_for_port(self.port)

    def command(self, *args: str) -> bytes:
        with socket.create_connection(("127.0.0.1", self.port), timeout=10) as s:
            s.sendall(b"".join([b"*%d\r\n" % len(args)] + [b"$%d\r\n%s\r\n" % (len(a), a.encode()) for a in args]))
            data = b""
            while True:
                chunk = s.recv(1 << 20)
                data += chunk
                if not chunk or _complete(data):
                    return data

    def commandstats(self) -> Dict[str, int]:
        text = self.command("INFO", "commandstats").decode()
        stats: Dict[str, int] = {}
        for line in text.splitlines():
            if line.startswith("cmdstat_"):
                name, _, rest = line[len("cmdstat_"):].partition(":")
                stats[name] = int(rest.split(",")[0].split("=")[1])
        return stats

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)
        shutil.rmtree(self.dir, ignore_errors=True)


def _complete(data: bytes) -> bool:
    if data.startswith((b"+", b"-", b":")):
        return data.endswith(b"\r\n")
    if data.startswith(b"$"):
        head, _, rest = data.partition(b"\r\n")
        return len(rest) >= int(head[1:]) + 2
    return True


class Monitor:
    """Counts the commands clients send (MONITOR marks those run by scripts with ``lua``)."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.sendall(b"*1\r\n$7\r\nMONITOR\r\n")
        self.client: Counter = Counter()
        self.scripted: Counter = Counter()
        self.running = True
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        buffer = b""
        while self.running:
            try:
                chunk = self.sock.recv(1 << 20)
            except OSError:
                return
            if not chunk:
                return
            buffer += chunk
            *lines, buffer = buffer.split(b"\r\n")
            for line in lines:
                # +1700000000.123456 [0 127.0.0.1:5555] "GET" "key"   /   [0 lua] "GET" ...
                if not line.startswith(b"+") or b"] \"" not in line:
                    continue
                where, _, rest = line.partition(b"] \"")
                command = rest.split(b"\"", 1)[0].decode().lower()
                (self.scripted if where.endswith(b"lua") else self.client)[command] += 1

    def stop(self) -> Tuple[Counter, Counter]:
        time.sleep(0.5)
        self.running = False
        self.sock.close()
        self.thread.join(2)
        return self.client, self.scripted


# -- the runs ----------------------------------------------------------------------------------------
TABLE_HEADER = (
    "| run                  |    msg/s |  p50 ms |  p99 ms | rmilter CPU | CPU µs/msg | main µs/msg | milterload µs/msg | redis CPU µs/msg | final replies |\n"
    "|----------------------|----------|---------|---------|-------------|------------|-------------|-------------------|------------------|---------------|"
)


def table_row(label: str, result: Dict[str, Any], milter_pids: int = 1, loadgen_cpu_s: float = 0.0) -> str:
    """rmilter CPU is main process + workers; ``main`` is the main process alone (with workers:
    its supervision and log relay); ``milterload``: the load generator's own CPU (same cores)."""
    lat = result["latency_ms"]
    watched = result.get("watched") or []
    # the milter's processes come first (the main process, then its workers), Redis last
    milter = watched[:milter_pids] if watched else []
    rmilter = {"pct_of_core": sum(w.get("pct_of_core", 0) for w in milter),
               "cpu_s": sum(w.get("cpu_s", 0) for w in milter)}
    redis_cpu = (watched[milter_pids]["cpu_s"] * 1e6 / max(1, result["messages"])
                 if len(watched) > milter_pids else 0.0)
    finals = ",".join("%s=%d" % kv for kv in result.get("final", {}).items() if kv[1])
    messages = max(1, result["messages"])
    main_cpu = milter[0].get("cpu_s", 0) * 1e6 / messages if milter else 0.0
    return "| %-20s | %8.0f | %7.2f | %7.2f | %10.0f%% | %10.0f | %11.0f | %17.0f | %16.0f | %s |" % (
        label, result["msgs_per_s"], lat["p50"], lat["p99"], rmilter.get("pct_of_core", 0),
        rmilter.get("cpu_s", 0) * 1e6 / messages, main_cpu, loadgen_cpu_s * 1e6 / messages,
        redis_cpu, finals,
    )


def children_cpu() -> float:
    """CPU seconds of this script's ended children (milterload, once it has exited)."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def config_for(name: str, redis: Optional[RedisServer], workers: int = 1, metrics: bool = False) -> str:
    """The scenario's configuration; ``metrics``: with a metrics_socket (issue 14) on a free port."""
    head = "workers = %d;\n" % workers if workers != 1 else ""
    extra = "metrics_socket = inet:%d@127.0.0.1;\n" % free_port() if metrics else ""
    if name == "pass" or redis is None:
        return head + PASS_CONFIG + extra
    return head + REDIS_CONFIG % {"port": redis.port, "grey_timeout": "1s" if name == "steady" else "300s"} + extra



def measure(args: argparse.Namespace, name: str, rep: int, redis: RedisServer, count: bool,
            workers: int = 1, metrics: bool = False) -> List[str]:
    """One fresh daemon (and a flushed Redis) for one measured run of scenario ``name``."""
    extra = ["--from", SENDER, "--vary-ip", str(args.vary_ip), "-k", str(args.per_conn)]
    redis.command("FLUSHALL")
    lines: List[str] = []
    service = Rmilter(config_for(name, redis, workers, metrics))
    try:
        milter = [service.pid] + (worker_pids(service.pid, workers) if workers > 1 else [])
        if name == "steady":
            # every client block meets greylisting once, and passes it on its next visit
            _count_run(args, service, extra, 4096)
            time.sleep(1.1)
            _count_run(args, service, extra, 4096)
        pids = milter + ([redis.proc.pid] if name != "pass" else [])
        before = children_cpu()
        result = milterload(args.milterload, service.socket, concurrency=args.conc, duration=args.duration,
                            warmup=args.warmup, size=args.size, pids=pids, extra=extra)
        # its CPU includes the warm-up: scaled to the measured seconds (at about the same rate)
        loadgen = (children_cpu() - before) * args.duration / (args.duration + args.warmup)
        label = "%s%s c=%d%s%s" % (name, " +metrics" if metrics else "", args.conc,
                                   " w=%d" % workers if args.workers != "1" else "",
                                   " #%d" % (rep + 1) if args.reps > 1 else "")
        lines.append(table_row(label, result, milter_pids=len(milter), loadgen_cpu_s=loadgen))
        if count and name != "pass":
            lines.append(commands_per_message(args, service, redis, extra))
    finally:
        service.stop()
    return lines


def _count_run(args: argparse.Namespace, service: Rmilter, extra: List[str], messages: int) -> Dict[str, Any]:
    """``messages`` messages, unmeasured (priming, counting commands)."""
    cmd = [args.milterload, "-s", service.socket, "-c", str(args.conc), "-n", str(messages), "-b", args.size,
           "--json"] + extra
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=600).stdout
    return json.loads(out)


def commands_per_message(args: argparse.Namespace, service: Rmilter, redis: RedisServer, extra: List[str]) -> str:
    n = args.count_messages
    redis.command("CONFIG", "RESETSTAT")
    result = _count_run(args, service, extra, n)
    stats = redis.commandstats()
    executed = sum(v for k, v in stats.items() if not k.startswith(("config", "info")))
    monitor = Monitor(redis.port)
    _count_run(args, service, extra, n)
    client, scripted = monitor.stop()
    trips = sum(client.values())
    finals = {k: v for k, v in result["final"].items() if v}
    return ("Redis commands per message (%d messages, %s): round trips %.2f (%s); executed %.2f (%s)" % (
        n, ",".join("%s=%d" % kv for kv in finals.items()),
        trips / n, " ".join("%s=%.2f" % (k, v / n) for k, v in sorted(client.items())),
        executed / n, " ".join("%s=%.2f" % (k, v / n) for k, v in sorted(stats.items())
                                if not k.startswith(("config", "info"))),
    ))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--milterload", required=True)
    parser.add_argument("--conc", type=int, default=8)
    parser.add_argument("--duration", type=float, default=10)
    parser.add_argument("--warmup", type=float, default=2)
    parser.add_argument("--vary-ip", type=int, default=65536)
    parser.add_argument("--size", default="4k")
    parser.add_argument("--per-conn", type=int, default=1,
                        help="messages per MTA connection (milterload -k; Postfix reuses a connection per SMTP session)")
    parser.add_argument("--reps", type=int, default=1)
    parser.add_argument("--count-messages", type=int, default=2000)
    parser.add_argument("--scenarios", default="pass,steady,greylisted")
    parser.add_argument("--workers", default="1", help="worker counts to compare, e.g. 1,2 (interleaved)")
    parser.add_argument("--metrics", choices=("off", "on", "both"), default="off",
                        help="run with metrics_socket set (issue 14); both: off and on, interleaved")
    args = parser.parse_args()
    modes = {"off": [False], "on": [True], "both": [False, True]}[args.metrics]

    redis = RedisServer()
    print("rmilter Redis benchmark, %s, %d cores, load %s, milterload -c %d -d %g -w %g -b %s -k %d --vary-ip %d --from %s" % (
        time.strftime("%Y-%m-%d %H:%M"), os.cpu_count() or 0, " ".join("%.1f" % l for l in os.getloadavg()),
        args.conc, args.duration, args.warmup, args.size, args.per_conn, args.vary_ip, SENDER))
    print(TABLE_HEADER)
    notes: List[str] = []
    try:
        # scenarios interleaved, so that background load hits them alike
        for rep in range(args.reps):
            for name in args.scenarios.split(","):
                runs = [(metrics, workers) for metrics in modes for workers in (int(w) for w in args.workers.split(","))]
                for metrics, workers in runs:
                    lines = measure(args, name, rep, redis, count=(rep == args.reps - 1 and not metrics),
                                    workers=workers, metrics=metrics)
                    print(lines[0], flush=True)
                    notes.extend("%s: %s" % (name, line.strip()) for line in lines[1:])
    finally:
        redis.stop()
    for note in notes:
        print(note)


if __name__ == "__main__":
    main()
