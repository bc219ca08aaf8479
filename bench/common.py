"""Shared pieces of the benchmark scripts: start rmilter, drive it with milterload, read RSS.

The load generator is ../shared/tools/milterload (C); pass the path of its binary with
``--milterload`` (build it with ``make -C <tools>/milterload O=/tmp/milterload``).  Nothing
here is imported by the package or the tests.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional, Sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def wait_for_port(port: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("nothing listens on 127.0.0.1:%d after %.0f s" % (port, timeout))


#: run twistd from the interpreter given (``python -m twisted`` is ``twist``, not ``twistd``)
TWISTD = "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()"


class Rmilter:
    """``twistd -n rmilter`` in a subprocess with a config given as text."""

    def __init__(self, config_text: str, port: Optional[int] = None, python: str = sys.executable) -> None:
        self.port = port or free_port()
        self.dir = tempfile.mkdtemp(prefix="rmilter-bench-")
        self.config_path = os.path.join(self.dir, "rmilter.conf")
        with open(self.config_path, "w") as f:
            f.write(config_text)
        self.log_path = os.path.join(self.dir, "rmilter.log")
        env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
        self.proc = subprocess.Popen(
            [python, "-c", TWISTD, "-n", "--pidfile=", "--logfile", self.log_path, "rmilter",
             "--config", self.config_path, "--listen", "tcp:%d:interface=127.0.0.1" % self.port],
            cwd=self.dir, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
        )
        try:
            wait_for_port(self.port)
        except RuntimeError:
            self.stop()
            raise RuntimeError("rmilter did not start; log:\n" + open(self.log_path).read()[-3000:])

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
                # longer than shutdown_timeout (30 s): a SIGKILL leaves the spool files of
                # messages in flight behind in the tempdir
                self.proc.wait(45)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


def rss_mb(pid: int) -> float:
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return 0.0


def milterload(binary: str, target: str, *, concurrency: int, duration: float = 10, warmup: float = 2,
               size: Optional[str] = None, eml: Optional[str] = None, pids: Sequence[int] = (),
               extra: Sequence[str] = ()) -> Dict[str, Any]:
    """Run milterload once and return its JSON result."""
    cmd: List[str] = [binary, "-s", target, "-c", str(concurrency), "-d", str(duration), "-w", str(warmup), "--json"]
    if size:
        cmd += ["-b", size]
    if eml:
        cmd += ["-e", eml]
    if pids:
        cmd += ["-p", ",".join(str(p) for p in pids)]
    cmd += list(extra)
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=duration + warmup + 120).stdout
    return json.loads(out)


def row(label: str, result: Dict[str, Any], rss: Optional[float] = None) -> str:
    lat = result["latency_ms"]
    watched = result.get("watched") or []
    rss_max = max((w.get("rss_max_kb", 0) for w in watched), default=0) / 1024.0 if watched else rss
    errors = result.get("errors", 0)
    finals = {k: v for k, v in result.get("final", {}).items() if v}
    return "| %-34s | %8.0f | %7.2f | %7.2f | %7s | %6d | %s |" % (
        label, result["msgs_per_s"], lat["p50"], lat["p99"],
        "%.1f" % rss_max if rss_max else "-", errors, ",".join("%s=%d" % kv for kv in finals.items()),
    )


HEADER = ("| %-34s | %8s | %7s | %7s | %7s | %6s | %s |\n|%s|%s|%s|%s|%s|%s|%s|" % (
    "run", "msg/s", "p50 ms", "p99 ms", "RSS MB", "errors", "final replies",
    "-" * 36, "-" * 10, "-" * 9, "-" * 9, "-" * 9, "-" * 8, "-" * 15))


def worker_pids(main_pid: int, count: int) -> List[int]:
    """The worker processes of a main process started with ``workers = count`` (once all run)."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        out = subprocess.run(["pgrep", "-P", str(main_pid), "-f", "rmilter --worker"], capture_output=True,
                             text=True).stdout
        pids = [int(p) for p in out.split()]
        if len(pids) >= count:
            time.sleep(2.0)  # their imports and listeners
            return pids
        time.sleep(0.1)
    raise RuntimeError("the workers of %d did not start" % main_pid)
