#!/usr/bin/env python3
"""Messages/s through a real Postfix with smtp-source, for several ``smtpd_milters`` (issue 2).

    python3 bench/postfix_bench.py [--messages 2000] [--reps 2] [--sessions 20] [--size 4096]
        [--nullmilter /tmp/milterload/nullmilter] [--max-use 100] [--warmup 200] [--out FILE.jsonl]
    python3 bench/postfix_bench.py --summarize FILE.jsonl [FILE.jsonl ...]

Runs as root (Postfix).  Everything comes from the test harness (tests/harness): a counting
smtp-sink (no dump files, so the sink is not the bottleneck), one private Postfix 3.x per run
relaying to it, rmilter (``twistd -n rmilter``, empty config = pass-through, no backends) and
optionally libmilter's do-nothing filter (``nullmilter``, built from
../shared/tools/milterload with ``make O=/tmp/milterload``).

Settings of ``smtpd_milters``, measured in the same run, interleaved (the order rotates with the
repetition):

- ``none``          no milter: the Postfix baseline;
- ``rmilter-inet``  rmilter over TCP (inet:127.0.0.1:PORT);
- ``rmilter-unix``  rmilter over a unix socket (mode 0666 so that smtpd, user postfix, connects);
- ``nullmilter``    libmilter's null filter over TCP (only with ``--nullmilter``).

Each setting is run twice per repetition: ``1/conn`` (``smtp-source -s S -l L -m N``: one message
per SMTP session, so one milter connection per message) and ``-d`` (``smtp-source -d``: the S
sessions share the N messages, the milter connection is reused with ABORT in between).

Per run: a fresh Postfix with that ``smtpd_milters`` is started, smtp-source sends N messages,
then the script waits until the sink has counted all N and the queue is empty.  Reported:

- ``accept msg/s``: N / smtp-source wall clock (what a sending client sees; the milter works
  inside the SMTP session);
- ``e2e msg/s``: N / (start of smtp-source .. last message delivered to the sink, queue empty);
- the milter process's CPU seconds over that whole window (utime+stime of all its threads from
  /proc/PID/stat) and per message, and its RSS (VmRSS, sampled every 0.1 s: maximum);
- CPU per message of that run's Postfix (master, reaped and live children), smtp-source, the
  sink, and their total with the milter; ``Δ total vs none`` in the table is what the milter
  costs the machine per message, Postfix's side of the milter protocol included;
- ``busy cores``: whole-machine non-idle CPU over the window (/proc/stat), i.e. Postfix +
  smtp-source + sink + milter + anything else running on the shared machine.

The run saturates both cores, so msg/s moves with whatever else runs on the machine; the CPU
per message columns do much less and are the ones to compare.  A run fails (exit status 1, the
``failed`` column) when smtp-source fails, the sink counts fewer than N messages, or rmilter did
not log a ``msg done:`` line for each message.

Fairness: the harness sets ``max_use = 1`` (an smtpd serves one session and exits) so that an
idle smtpd cannot serve a test with settings from before a reload.  Here every run starts its own
Postfix, so that race cannot happen, and ``max_use`` is set back to Postfix's default (100,
``--max-use``): with 1, every SMTP session forks and execs a new smtpd, which is not how Postfix
runs in production and would add the same fixed cost to every setting, hiding the milters'
differences.  All other Postfix settings are the harness's (Postfix defaults otherwise, including
``in_flow_delay`` flow control and logging to a maillog file).
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from tests.harness import Postfix, Rmilter, ServiceUnavailable, SmtpSink  # noqa: E402
from tests.harness.base import (  # noqa: E402
    ManagedProcess,
    find_program,
    free_port,
    scratch_dir,
    tcp_accepts,
    wait_until,
)

SENDER = "a@example.com"
RECIPIENT = "b@example.org"  # example.org is a relay domain of the harness Postfix

_SINK_COUNT = re.compile(rb"mesg=(\d+)")


class CountingSink(SmtpSink):
    """smtp-sink that only counts messages (``-c``), writing no dump files.

    Its counter line (``sess=.. quit=.. mesg=N``, CR-terminated, flushed each time) goes to its
    log; ``delivered()`` reads the last one.
    """

    def start(self, timeout: float = 20.0) -> "CountingSink":
        if self.process is not None and self.process.running():
            return self
        self.process = ManagedProcess(
            [find_program("smtp-sink"), "-u", "postfix", "-c", self.address, "1000"],
            os.path.join(self.dir, "sink.log"),
            cwd=self.dir,
        )
        process = self.process
        wait_until(self._answers, timeout, "smtp-sink on %s" % self.address, process.diagnostics)
        return self

    def delivered(self) -> int:
        """Messages the sink has accepted since it started."""
        try:
            with open(os.path.join(self.dir, "sink.log"), "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - 256))
                counts = _SINK_COUNT.findall(f.read())
        except OSError:
            return 0
        return int(counts[-1]) if counts else 0


class BenchPostfix(Postfix):
    """The harness Postfix with some main.cf settings changed in place (``postconf -e``).

    The harness's ``extra_main_cf`` appends a second entry for a setting it already has
    (``max_use``), and every Postfix process then logs an "overriding earlier entry" warning at
    start-up; ``postconf -e`` edits the one entry instead.
    """

    def __init__(self, sink: SmtpSink, milters: str, main_cf: Dict[str, str]) -> None:
        super().__init__(sink, milters=milters)
        self.bench_main_cf = dict(main_cf)

    def _write_config(self) -> None:
        super()._write_config()
        if self.bench_main_cf:
            self._postfix_cmd([find_program("postconf"), "-c", self.etc, "-e"]
                              + ["%s = %s" % kv for kv in self.bench_main_cf.items()])


@dataclass
class MilterSetting:
    """One value of smtpd_milters and the pid of the process behind it (None: no milter)."""

    name: str
    spec: str
    pid: Optional[int]
    #: rmilter: its log, where every message it saw has a ``msg done:`` line
    log: Optional[Rmilter] = None

    def messages_done(self) -> Optional[int]:
        """``msg done:`` lines rmilter has logged so far (None: not rmilter).

        twistd rotates its log every MB (``rmilter.log.1``, ``.2`` ...): count in all of them.
        """
        if self.log is None:
            return None
        count = 0
        for path in glob.glob(self.log.log_path) + glob.glob(self.log.log_path + ".*"):
            with open(path, "rb") as f:
                count += f.read().count(b"msg done:")
        return count


@dataclass
class RunResult:
    rep: int
    setting: str
    mode: str
    messages: int
    sessions: int
    size: int
    rc: int
    delivered: int
    accept_s: float
    e2e_s: float
    accept_msgs_per_s: float
    e2e_msgs_per_s: float
    milter_cpu_s: Optional[float]
    milter_cpu_us_per_msg: Optional[float]
    milter_rss_start_mb: Optional[float]
    milter_rss_max_mb: Optional[float]
    busy_cores: float
    postfix_cpu_us_per_msg: float
    source_cpu_us_per_msg: float
    sink_cpu_us_per_msg: float
    total_cpu_us_per_msg: float
    milter_seen: Optional[int]
    postfix_warnings: int
    error: str


def _stat_fields(pid: int) -> List[bytes]:
    """/proc/PID/stat after the command name: [0] is field 3 (state), [1] the ppid ..."""
    with open("/proc/%d/stat" % pid, "rb") as f:
        return f.read().rsplit(b")", 1)[1].split()


def cpu_seconds(pid: int, reaped_children: bool = False) -> float:
    """utime + stime of every thread of ``pid`` (fields 14, 15), with ``reaped_children`` also
    the CPU of the children it has waited for (cutime, cstime: fields 16, 17)."""
    fields = _stat_fields(pid)
    ticks = int(fields[11]) + int(fields[12])
    if reaped_children:
        ticks += int(fields[13]) + int(fields[14])
    return ticks / os.sysconf("SC_CLK_TCK")


def postfix_cpu_seconds(master_pid: int) -> float:
    """CPU of a Postfix instance so far: its master, every child it reaped (smtpd processes that
    reached max_use, cleanup ...) and every child still running.  Each run has its own Postfix, so
    this is that run's Postfix cost; unlike msg/s it does not depend on what else runs on the
    machine."""
    total = cpu_seconds(master_pid, reaped_children=True)
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = _stat_fields(int(entry))
            if int(fields[1]) == master_pid:
                total += cpu_seconds(int(entry), reaped_children=True)
        except (OSError, IndexError, ValueError):  # exited meanwhile: its CPU is in cutime now
            continue
    return total


def children_cpu_seconds() -> float:
    """CPU of our children that we have waited for (smtp-source)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def rss_mb(pid: int) -> float:
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return 0.0


def busy_jiffies() -> int:
    """Non-idle jiffies of the whole machine since boot (idle and iowait excluded)."""
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    return sum(fields) - fields[3] - fields[4]


def smtp_source_argv(postfix: Postfix, messages: int, sessions: int, size: int, reuse: bool) -> List[str]:
    argv = [find_program("smtp-source"), "-s", str(sessions), "-l", str(size), "-m", str(messages),
            "-f", SENDER, "-t", RECIPIENT]
    if reuse:
        argv.append("-d")
    return argv + [postfix.address]


def run_once(
    sink: CountingSink,
    setting: MilterSetting,
    *,
    rep: int,
    reuse: bool,
    messages: int,
    sessions: int,
    size: int,
    main_cf: Dict[str, str],
    timeout: float,
) -> RunResult:
    """Start a Postfix for this setting, send ``messages``, wait for delivery; the figures."""
    postfix = BenchPostfix(sink, setting.spec, main_cf)
    postfix.start()
    try:
        assert postfix.process is not None and sink.process is not None
        master_pid, sink_pid = postfix.process.pid, sink.process.pid
        before = sink.delivered()
        done0 = setting.messages_done()
        pid = setting.pid
        postfix0 = postfix_cpu_seconds(master_pid)
        sink0 = cpu_seconds(sink_pid)
        source0 = children_cpu_seconds()
        cpu0 = cpu_seconds(pid) if pid else None
        rss0 = rss_mb(pid) if pid else None
        rss_max = rss0
        busy0 = busy_jiffies()
        t0 = time.monotonic()
        source = subprocess.Popen(
            smtp_source_argv(postfix, messages, sessions, size, reuse),
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )
        deadline = t0 + timeout
        while source.poll() is None:
            if pid:
                rss_max = max(rss_max or 0.0, rss_mb(pid))
            if time.monotonic() > deadline:
                source.kill()
            try:  # returns as soon as smtp-source exits: t1 is not rounded to the RSS interval
                source.wait(0.1)
            except subprocess.TimeoutExpired:
                pass
        t1 = time.monotonic()
        source_cpu = children_cpu_seconds() - source0  # only smtp-source was reaped meanwhile
        output = (source.stdout.read() if source.stdout else b"").decode("utf-8", "replace").strip()
        error = output[-300:]
        try:
            # a deferred message (a delivery problem) fails at once in wait_queue_empty; a
            # milter tempfail/reject shows as smtp-source's status and a short count
            wait_until(lambda: sink.delivered() - before >= messages or source.returncode != 0,
                       max(1.0, deadline - time.monotonic()), "sink to count %d messages" % messages,
                       postfix.diagnostics, interval=0.02)
            postfix.wait_queue_empty(max(1.0, deadline - time.monotonic()))
        except AssertionError as e:
            error = (error + "\n" + str(e))[-600:]
        t2 = time.monotonic()
        busy1 = busy_jiffies()
        postfix_cpu = postfix_cpu_seconds(master_pid) - postfix0
        sink_cpu = cpu_seconds(sink_pid) - sink0
        cpu1 = cpu_seconds(pid) if pid else None
        if pid:
            rss_max = max(rss_max or 0.0, rss_mb(pid))
        delivered = sink.delivered() - before
        seen = None
        if done0 is not None:  # its summary lines may trail the last EOM by a moment
            try:
                seen = wait_until(lambda: ((setting.messages_done() or 0) - done0 >= delivered
                                           and (setting.messages_done() or 0) - done0),
                                  5.0, "rmilter summary lines")
            except AssertionError:
                seen = (setting.messages_done() or 0) - done0
        warnings = postfix.maillog().count("warning:")
        cpu = None if cpu0 is None or cpu1 is None else cpu1 - cpu0
        per_msg = 1e6 / max(1, delivered)
        problems = []
        if source.returncode:
            problems.append("smtp-source status %d: %s" % (source.returncode, error))
        elif error:
            problems.append(error)
        if delivered != messages:
            problems.append("sink counted %d of %d" % (delivered, messages))
        if seen is not None and seen != messages:
            problems.append("rmilter logged %d of %d" % (seen, messages))
        return RunResult(
            rep=rep, setting=setting.name, mode="-d" if reuse else "1/conn", messages=messages,
            sessions=sessions, size=size, rc=source.returncode or 0, delivered=delivered,
            accept_s=round(t1 - t0, 3), e2e_s=round(t2 - t0, 3),
            accept_msgs_per_s=round(messages / (t1 - t0), 1),
            e2e_msgs_per_s=round(delivered / (t2 - t0), 1),
            milter_cpu_s=None if cpu is None else round(cpu, 2),
            milter_cpu_us_per_msg=None if cpu is None else round(1e6 * cpu / max(1, delivered)),
            milter_rss_start_mb=None if rss0 is None else round(rss0, 1),
            milter_rss_max_mb=None if rss_max is None else round(rss_max, 1),
            busy_cores=round((busy1 - busy0) / os.sysconf("SC_CLK_TCK") / (t2 - t0), 2),
            postfix_cpu_us_per_msg=round(postfix_cpu * per_msg),
            source_cpu_us_per_msg=round(source_cpu * per_msg),
            sink_cpu_us_per_msg=round(sink_cpu * per_msg),
            total_cpu_us_per_msg=round((postfix_cpu + source_cpu + sink_cpu + (cpu or 0.0)) * per_msg),
            milter_seen=seen, postfix_warnings=warnings,
            error="; ".join(problems)[-600:],
        )
    finally:
        postfix.stop()


def start_nullmilter(path: str) -> Tuple[ManagedProcess, str]:
    """libmilter's do-nothing filter on a free TCP port; the process and its smtpd_milters value."""
    port = free_port()
    process = ManagedProcess([path, "-p", "inet:%d@127.0.0.1" % port],
                             os.path.join(scratch_dir("nullmilter"), "nullmilter.log"))
    wait_until(lambda: tcp_accepts("127.0.0.1", port), 15.0, "nullmilter on port %d" % port,
               process.diagnostics)
    return process, "inet:%d@127.0.0.1" % port


def spread(values: Sequence[float], fmt: str) -> str:
    """median (min–max) of the repetitions."""
    if not values:
        return "-"
    if len(values) == 1:
        return fmt % values[0]
    return (fmt + " (" + fmt + "–" + fmt + ")") % (statistics.median(values), min(values), max(values))


def summary(results: Sequence[RunResult]) -> str:
    """One markdown row per (mode, setting): median (min–max) over the repetitions.

    ``Δ total`` is the setting's median total CPU per message minus that of ``none`` in the same
    mode: what the milter costs the machine per message, Postfix's milter client side included.
    """
    groups: Dict[Tuple[str, str], List[RunResult]] = {}
    for r in results:
        groups.setdefault((r.mode, r.setting), []).append(r)
    lines = [
        "| smtpd_milters | mode | n | e2e msg/s | accept msg/s | milter CPU s | milter µs/msg "
        "| Postfix µs/msg | total µs/msg | Δ total vs none | milter RSS max MB | busy cores | failed |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (mode, name), runs in sorted(groups.items(), key=lambda kv: kv[0][0] != "1/conn"):
        good = [r for r in runs if not r.error] or runs
        baseline = [r.total_cpu_us_per_msg for r in groups.get((mode, "none"), []) if not r.error]
        total = statistics.median([r.total_cpu_us_per_msg for r in good])
        delta = "%+.0f" % (total - statistics.median(baseline)) if baseline and name != "none" else "-"
        lines.append("| %s | %s | %d | %s | %s | %s | %s | %s | %s | %s | %s | %s | %d |" % (
            name, mode, len(good),
            spread([r.e2e_msgs_per_s for r in good], "%.0f"),
            spread([r.accept_msgs_per_s for r in good], "%.0f"),
            spread([r.milter_cpu_s for r in good if r.milter_cpu_s is not None], "%.2f"),
            spread([r.milter_cpu_us_per_msg for r in good if r.milter_cpu_us_per_msg is not None], "%.0f"),
            spread([r.postfix_cpu_us_per_msg for r in good], "%.0f"),
            spread([r.total_cpu_us_per_msg for r in good], "%.0f"),
            delta,
            spread([r.milter_rss_max_mb for r in good if r.milter_rss_max_mb is not None], "%.1f"),
            spread([r.busy_cores for r in good], "%.2f"),
            sum(1 for r in runs if r.error),
        ))
    return "\n".join(lines)


def postfix_version() -> str:
    out = subprocess.run([find_program("postconf"), "-d", "-h", "mail_version"],
                         capture_output=True, text=True)
    return out.stdout.strip()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=2000, help="messages per run (smtp-source -m)")
    parser.add_argument("--sessions", type=int, default=20, help="parallel SMTP sessions (smtp-source -s)")
    parser.add_argument("--size", type=int, default=4096, help="message length (smtp-source -l)")
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--modes", default="1/conn,-d", help="comma list of 1/conn and -d (write --modes=-d)")
    parser.add_argument("--nullmilter", help="path of libmilter's null filter (not copied anywhere)")
    parser.add_argument("--max-use", type=int, default=100, help="Postfix max_use (harness: 1; default 100)")
    parser.add_argument("--warmup", type=int, default=200,
                        help="messages sent once per setting before measuring (0: none)")
    parser.add_argument("--timeout", type=float, default=600.0, help="per run")
    parser.add_argument("--out", help="append one JSON line per run to this file")
    parser.add_argument("--summarize", nargs="+", metavar="JSONL",
                        help="only print the table for the runs in these --out files")
    args = parser.parse_args()
    if args.summarize:
        runs: List[RunResult] = []
        for path in args.summarize:
            with open(path) as f:
                runs.extend(RunResult(**json.loads(line)) for line in f if line.strip())
        print(summary(runs))
        return 0
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if any(m not in ("1/conn", "-d") for m in modes):
        parser.error("--modes takes 1/conn and -d")
    if os.geteuid() != 0:
        parser.error("Postfix needs root")

    main_cf = {"max_use": str(args.max_use)}
    stoppers: List[Callable[[], object]] = []
    try:
        sink = CountingSink().start()
        stoppers.append(sink.stop)
        settings = [MilterSetting("none", "", None)]
        inet = Rmilter("", unix=False)
        stoppers.append(inet.stop)
        inet.start()
        assert inet.process is not None
        settings.append(MilterSetting("rmilter-inet", inet.milter_inet, inet.process.pid, inet))
        unix = Rmilter("", inet=False, unix_mode="666")
        stoppers.append(unix.stop)
        unix.start()
        assert unix.process is not None
        settings.append(MilterSetting("rmilter-unix", unix.milter_unix, unix.process.pid, unix))
        if args.nullmilter:
            null, spec = start_nullmilter(args.nullmilter)
            stoppers.append(null.stop)
            settings.append(MilterSetting("nullmilter", spec, null.pid))

        print("postfix_bench: Postfix %s, %d cores, load %s, %s; smtp-source -s %d -l %d -m %d "
              "[-d]; main.cf %s; %d reps" % (
                  postfix_version(), os.cpu_count() or 0, "%.2f %.2f %.2f" % os.getloadavg(),
                  time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), args.sessions, args.size,
                  args.messages, " ".join("%s=%s" % kv for kv in main_cf.items()), args.reps), flush=True)
        for setting in settings:
            print("  %-13s smtpd_milters = %s%s" % (
                setting.name, setting.spec or "(empty)",
                "  pid %d" % setting.pid if setting.pid else ""), flush=True)
        if args.warmup:
            for setting in settings:
                r = run_once(sink, setting, rep=-1, reuse=False, messages=args.warmup,
                             sessions=args.sessions, size=args.size, main_cf=main_cf, timeout=args.timeout)
                print("warm-up %-13s %d/%d delivered%s" % (
                    setting.name, r.delivered, r.messages, ("  " + r.error) if r.error else ""), flush=True)

        results: List[RunResult] = []
        out = open(args.out, "a") if args.out else None
        for rep in range(args.reps):
            order = settings[rep % len(settings):] + settings[:rep % len(settings)]
            for mode in modes:
                for setting in order:
                    r = run_once(sink, setting, rep=rep, reuse=(mode == "-d"), messages=args.messages,
                                 sessions=args.sessions, size=args.size, main_cf=main_cf,
                                 timeout=args.timeout)
                    results.append(r)
                    if out is not None:
                        out.write(json.dumps(asdict(r)) + "\n")
                        out.flush()
                    print("rep%d %-6s %-13s e2e %4.0f msg/s  accept %4.0f msg/s  milter cpu %s s  "
                          "µs/msg: milter %s postfix %d source %d sink %d total %d  "
                          "rss %s MB  busy %.2f cores  delivered %d/%d%s%s%s" % (
                              rep, r.mode, r.setting, r.e2e_msgs_per_s, r.accept_msgs_per_s,
                              "-" if r.milter_cpu_s is None else "%.2f" % r.milter_cpu_s,
                              "-" if r.milter_cpu_us_per_msg is None else "%d" % r.milter_cpu_us_per_msg,
                              r.postfix_cpu_us_per_msg, r.source_cpu_us_per_msg, r.sink_cpu_us_per_msg,
                              r.total_cpu_us_per_msg,
                              "-" if r.milter_rss_max_mb is None else "%.1f" % r.milter_rss_max_mb,
                              r.busy_cores, r.delivered, r.messages,
                              "" if r.milter_seen is None else "  rmilter saw %d" % r.milter_seen,
                              "  postfix warnings %d" % r.postfix_warnings if r.postfix_warnings else "",
                              ("  ERROR " + r.error.replace("\n", " | ")) if r.error else ""), flush=True)
        if out is not None:
            out.close()
        print()
        print(summary(results))
        return 1 if any(r.error for r in results) else 0
    except ServiceUnavailable as e:
        print("postfix_bench: %s" % e, file=sys.stderr)
        return 2
    finally:
        for stop in reversed(stoppers):
            stop()


if __name__ == "__main__":
    sys.exit(main())
