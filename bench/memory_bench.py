#!/usr/bin/env python3
"""Memory against message size and concurrency (issue 19): idle floor, peak and after-burst RSS.

    python3 bench/memory_bench.py --milterload /tmp/milterload/milterload \
        [--sizes 4k,100k,1M,5M] [--conc 8,64] [--duration 10] [--rspamd] [--settle 5] \
        [--config FILE] [--ref NAME=SOCKET,PID] [--reps N] [--workers N] \
        [--c-rmilter BINARY --c-config FILE]

For every (size, concurrency) cell a fresh ``twistd -n rmilter`` is started (pass-through: no
backends; with ``--rspamd`` also a cell per size scanning on the test harness's Rspamd), its
idle RSS read after start-up (the floor), a burst of ``--duration`` seconds sent with milterload
(the C load generator of ../shared/tools/milterload; ``make -C <copy> O=/tmp/milterload``), the
peak RSS taken from milterload's own sampling, and the RSS read again ``--settle`` seconds after
the burst (memory given back?).  CPU per message is the milter's CPU seconds over the messages.
``--ref`` measures another milter on the same cells for comparison.  ``--c-rmilter`` adds a column
for the C rmilter (the yardstick of issue 19; optional, the project does not need it): a fresh
``BINARY -n -c FILE`` per cell, with ``bind_socket``/``pidfile`` of FILE replaced by a free port and a
scratch pid file, measured the same way (floor, peak, after).  ``--workers N`` adds a pass-through
cell with ``workers = N`` (CPU of the main process and its workers summed; RSS of the largest
process).  ``--reps`` repeats the whole matrix,
interleaved (every target once per cell per rep), and prints the medians at the end.

Printed: one markdown row per cell and, at the end, the targets of issue 19 with the figures
that meet or miss them.
"""
from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import string
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional, Tuple

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import Rmilter, free_port, milterload, rss_mb, wait_for_port, worker_pids  # noqa: E402

PASS_THROUGH = "# no backends: every message is accepted\n"
WITH_RSPAMD = """\
spamd {
  servers = %(server)s;
  connect_timeout = 1s;
  results_timeout = 30s;
}
"""

HEADER = ("| run | msg/s | CPU ms/msg | p99 ms | idle MB | peak MB | after MB | errors |\n"
          "|---|---|---|---|---|---|---|---|")


def watched(result: Dict[str, Any]) -> Dict[str, Any]:
    rows = result.get("watched") or [{}]
    return rows[0]


def cpu_s(w: Dict[str, Any]) -> float:
    """CPU seconds of one watched process in a milterload result."""
    cpu = w.get("cpu_s")
    if cpu is None:
        cpu = (w.get("utime_s", 0.0) or 0.0) + (w.get("stime_s", 0.0) or 0.0)
    return float(cpu)


def cpu_ms_per_message(result: Dict[str, Any]) -> float:
    cpu = cpu_s(watched(result))
    messages = result.get("messages") or 0
    return 1000.0 * cpu / messages if messages else 0.0


def run_cell(args: argparse.Namespace, config: str, size: str, conc: int,
             workers: int = 1) -> Tuple[Dict[str, Any], float, float]:
    """One fresh rmilter: (milterload result, idle RSS MB, after-burst RSS MB).

    With ``workers`` > 1 the main process and its workers are watched: CPU is their sum, the
    RSS figures (idle, peak, after) are those of the largest process."""
    milter = Rmilter(config)
    try:
        pids = [milter.pid] + (worker_pids(milter.pid, workers) if workers > 1 else [])
        time.sleep(2.0)  # start-up finished (imports, reactor running): the floor
        idle = max(rss_mb(pid) for pid in pids)
        result = milterload(args.milterload, milter.socket, concurrency=conc, duration=args.duration,
                            warmup=args.warmup, size=size, pids=pids)
        time.sleep(args.settle)
        after = max(rss_mb(pid) for pid in pids)
        if workers > 1:
            rows = result.get("watched") or []
            result["watched"] = [{
                "cpu_s": sum(cpu_s(w) for w in rows),
                "rss_max_kb": max((w.get("rss_max_kb", 0) for w in rows), default=0),
            }]
        return result, idle, after
    finally:
        milter.stop()


class CRmilter:
    """The C rmilter (``BINARY -n -c FILE``) on a free port, for the yardstick column."""

    def __init__(self, binary: str, config_path: str) -> None:
        self.port = free_port()
        # letters only: the C config lexer refuses some characters mkdtemp puts in names
        self.dir = os.path.join(tempfile.gettempdir(), "crmilterbench" + "".join(
            random.choice(string.ascii_lowercase) for _ in range(12)))
        os.mkdir(self.dir)
        lines = [line for line in open(config_path)
                 if not line.lstrip().startswith(("bind_socket", "pidfile", "tempdir"))]
        lines += ["\nbind_socket = inet:%d@127.0.0.1;\n" % self.port,
                  "pidfile = %s/rmilter.pid;\n" % self.dir, "tempdir = %s;\n" % self.dir]
        self.config = os.path.join(self.dir, "rmilter.conf")
        with open(self.config, "w") as f:
            f.writelines(lines)
        self.log = open(os.path.join(self.dir, "rmilter.log"), "w+")
        self.proc = subprocess.Popen([binary, "-n", "-c", self.config], cwd=self.dir, stdin=subprocess.DEVNULL,
                                     stdout=self.log, stderr=subprocess.STDOUT)
        try:
            wait_for_port(self.port)
        except RuntimeError:
            self.log.seek(0)
            log = self.log.read()[-2000:]
            self.stop()
            raise RuntimeError("C rmilter did not start; log:\n" + log)

    @property
    def socket(self) -> str:
        return "inet:%d@127.0.0.1" % self.port

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def run_c_cell(args: argparse.Namespace, size: str, conc: int) -> Tuple[Dict[str, Any], float, float]:
    """One fresh C rmilter: (milterload result, idle RSS MB, after-burst RSS MB)."""
    milter = CRmilter(args.c_rmilter, args.c_config)
    try:
        time.sleep(1.0)
        idle = rss_mb(milter.pid)
        result = milterload(args.milterload, milter.socket, concurrency=conc, duration=args.duration,
                            warmup=args.warmup, size=size, pids=[milter.pid])
        time.sleep(args.settle)
        return result, idle, rss_mb(milter.pid)
    finally:
        milter.stop()


def row(label: str, result: Dict[str, Any], idle: Optional[float], after: Optional[float]) -> str:
    peak = watched(result).get("rss_max_kb", 0) / 1024.0
    return "| %s | %.0f | %.2f | %.1f | %s | %.1f | %s | %d |" % (
        label, result["msgs_per_s"], cpu_ms_per_message(result), result["latency_ms"]["p99"],
        "%.1f" % idle if idle is not None else "-", peak, "%.1f" % after if after is not None else "-",
        result.get("errors", 0))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--milterload", required=True)
    parser.add_argument("--sizes", default="4k,100k,1M,5M")
    parser.add_argument("--conc", default="8,64")
    parser.add_argument("--duration", type=float, default=10)
    parser.add_argument("--warmup", type=float, default=1)
    parser.add_argument("--settle", type=float, default=5, help="seconds idle after a burst before RSS is read")
    parser.add_argument("--rspamd", action="store_true", help="also scan on the harness's Rspamd")
    parser.add_argument("--config", help="rmilter config text file instead of the pass-through one")
    parser.add_argument("--ref", help="NAME=SOCKET,PID: another milter measured on the same cells")
    parser.add_argument("--c-rmilter", help="the C rmilter binary: a yardstick column (optional)")
    parser.add_argument("--c-config", help="its config file (pass-through: no spamd, clamav, redis)")
    parser.add_argument("--reps", type=int, default=1, help="repeat the matrix, interleaved; medians at the end")
    parser.add_argument("--workers", type=int, default=1,
                        help="also a pass-through cell with workers = N (CPU summed, RSS per process)")
    args = parser.parse_args()
    if bool(args.c_rmilter) != bool(args.c_config):
        parser.error("--c-rmilter and --c-config go together")

    base = open(args.config).read() if args.config else PASS_THROUGH
    modes: List[Tuple[str, str, int]] = [("pass", base, 1)]
    if args.workers > 1:
        modes.append(("pass w%d" % args.workers, base + "workers = %d;\n" % args.workers, args.workers))
    rspamd = None
    if args.rspamd:
        from tests.harness.rspamd import Rspamd

        rspamd = Rspamd(log_level="error").start()
        modes.append(("rspamd", WITH_RSPAMD % {"server": rspamd.address}, 1))
    ref = None
    if args.ref:
        name, _, rest = args.ref.partition("=")
        socket_spec, _, pid = rest.rpartition(",")
        ref = (name, socket_spec, int(pid))

    print("rmilter memory benchmark, %s, %d cores, load %s" % (
        time.strftime("%Y-%m-%d %H:%M"), os.cpu_count() or 0, " ".join("%.2f" % x for x in os.getloadavg())))
    print(HEADER)
    peaks: List[Tuple[str, float]] = []
    afters: List[Tuple[str, float, float]] = []
    speeds: Dict[Tuple[str, int], Dict[str, List[float]]] = {}
    cells: Dict[str, List[Tuple[Dict[str, Any], float, float]]] = {}

    def record(label: str, result: Dict[str, Any], idle: Optional[float], after: Optional[float]) -> None:
        print(row(label, result, idle, after), flush=True)
        cells.setdefault(label, []).append((result, idle or 0.0, after or 0.0))

    try:
        for _rep in range(args.reps):
            for size in args.sizes.split(","):
                for conc in (int(c) for c in args.conc.split(",")):
                    for mode, config, workers in modes:
                        result, idle, after = run_cell(args, config, size, conc, workers)
                        label = "rmilter %s %s c=%d" % (mode, size, conc)
                        record(label, result, idle, after)
                        peaks.append((label, watched(result).get("rss_max_kb", 0) / 1024.0))
                        afters.append((label, idle, after))
                        if mode.startswith("pass"):
                            speeds.setdefault((size, conc), {}).setdefault("rmilter " + mode, []).append(
                                result["msgs_per_s"])
                    if args.c_rmilter:
                        result, idle, after = run_c_cell(args, size, conc)
                        record("C rmilter %s c=%d" % (size, conc), result, idle, after)
                        speeds.setdefault((size, conc), {}).setdefault("C rmilter", []).append(result["msgs_per_s"])
                    if ref is not None:
                        name, socket_spec, pid = ref
                        result = milterload(args.milterload, socket_spec, concurrency=conc, duration=args.duration,
                                            warmup=args.warmup, size=size, pids=[pid])
                        record("%s %s c=%d" % (name, size, conc), result, None, None)
                        speeds.setdefault((size, conc), {}).setdefault(name, []).append(result["msgs_per_s"])
    finally:
        if rspamd is not None:
            rspamd.stop()

    if args.reps > 1:
        print()
        print("medians over %d interleaved reps (min-max of msg/s):" % args.reps)
        print(HEADER)
        for label, runs in cells.items():
            rates = [r["msgs_per_s"] for r, _, _ in runs]
            mid = sorted(runs, key=lambda r: r[0]["msgs_per_s"])[len(runs) // 2]
            peak = max(watched(r).get("rss_max_kb", 0) for r, _, _ in runs) / 1024.0
            print("| %s (%.0f-%.0f) | %.0f | %.2f | %.1f | %.1f | %.1f | %.1f | %d |" % (
                label, min(rates), max(rates), statistics.median(rates),
                statistics.median(cpu_ms_per_message(r) for r, _, _ in runs), mid[0]["latency_ms"]["p99"],
                statistics.median(i for _, i, _ in runs), peak, statistics.median(a for _, _, a in runs),
                sum(r.get("errors", 0) for r, _, _ in runs)))
    print()
    print("targets (issue 19):")
    worst = max(peaks, key=lambda p: p[1])
    print("- peak RSS <= 64 MB at every cell: worst %.1f MB (%s)" % (worst[1], worst[0]))
    grown = max(afters, key=lambda a: a[2] / a[1] if a[1] else 0)
    print("- RSS after a burst within 10%% of the idle floor: worst %+.0f%% (%s: %.1f -> %.1f MB)" % (
        100.0 * (grown[2] / grown[1] - 1) if grown[1] else 0, grown[0], grown[1], grown[2]))
    floor = min(a[1] for a in afters if a[0].startswith("rmilter pass"))
    print("- idle floor <= 40 MB with no backends: %.1f MB" % floor)
    for (size, conc), by_name in speeds.items():
        ours = [name for name in by_name if name.startswith("rmilter ")]
        for name, rates in by_name.items():
            if name in ours or not rates or not statistics.median(rates):
                continue
            for mine in ours:
                print("- %s c=%d: %s / %s msg/s = %.2fx" % (
                    size, conc, mine, name, statistics.median(by_name[mine]) / statistics.median(rates)))

if __name__ == "__main__":
    main()
