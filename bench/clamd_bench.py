#!/usr/bin/env python3
"""clamd in the loop (issue 5): messages/s and RSS for 100 KB and 5 MB messages at concurrency 8.

    python3 bench/clamd_bench.py [--mode client,milter] [--sizes 100k,5M] [--conc 8] [--duration 10]
        [--milterload /tmp/milterload/milterload]

Starts a private clamd (tests/harness/clamd.py: the harness's tiny signature database) with
StreamMaxLength raised to 64M so that 5 MB messages are scanned, not refused, then:

- ``client``: this process scans ready-made spools with ``rmilter.backends.clamd.ClamdClient``
  on the real reactor, C scans in flight at all times, each with a unique header line (clamd
  caches clean results by content hash; a repeated message would measure that cache).  Messages at or below the spool's memory
  limit (1 MiB) are in memory, bigger ones in a spool file read through the thread pool, as in
  the daemon.  Prints scans/s, latency, and this process's RSS before and at its peak: the RSS
  growth is what streaming costs (target: flat as the size grows, < 100 MB for 8 x 5 MB).
- ``milter``: ``twistd -n rmilter`` with ``clamav { servers = <clamd>; }`` driven by milterload
  (../shared/tools/milterload; build it with ``make -C ../shared/tools/milterload O=/tmp/milterload``
  and pass ``--milterload``): messages/s, p50/p99 and the daemon's peak RSS.

Each row also shows clamd's own CPU seconds and peak RSS for the run: clamd does the scanning,
so on this 2-core machine it bounds the throughput.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from typing import Any, Dict, Iterator, List, Optional, Tuple

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import Rmilter, milterload, rss_mb  # noqa: E402

from tests.harness.clamd import Clamd  # noqa: E402


def parse_size(text: str) -> int:
    units = {"k": 1024, "m": 1024 * 1024}
    text = text.strip().lower()
    if text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


def cpu_seconds(pid: int) -> float:
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class RssSampler:
    """Peak VmRSS of some processes, sampled every 50 ms in a thread."""

    def __init__(self, pids: List[int]) -> None:
        self.pids = pids
        self.peak = {pid: rss_mb(pid) for pid in pids}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            for pid in self.pids:
                try:
                    self.peak[pid] = max(self.peak[pid], rss_mb(pid))
                except OSError:
                    pass

    def __enter__(self) -> "RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


MESSAGE_HEAD = (b"From: Alice <alice@example.net>\r\nTo: Bob <bob@example.org>\r\nSubject: bench\r\n"
                b"Message-ID: <bench@example.net>\r\n\r\n")
_LINE = b"Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor 0123456789\r\n"


def body_chunks(size: int, chunk: int = 65535) -> Iterator[bytes]:
    """The body of a plain text message of about ``size`` bytes, as BODY chunks (never all at once)."""
    block = (_LINE * (chunk // len(_LINE) + 1))[:chunk]
    left = max(0, size - len(MESSAGE_HEAD))
    while left > 0:
        piece = block[: min(chunk, left)]
        left -= len(piece)
        yield piece


# -- client mode -------------------------------------------------------------------------------
SEQ_HEADER = b"X-Bench-Seq: %012d\r\n"
_seq = [0]


class UniqueMessage:
    """A spool whose head carries a new sequence number per scan.

    clamd remembers the hashes of clean files it scanned and answers a repeat from that cache
    (a repeated 5 MB message costs it ~0.02 s instead of ~0.25 s of CPU), so every scan must
    differ, as real messages do (the daemon's spool head has a fresh Received id each time).
    """

    def __init__(self, spool: Any) -> None:
        self.spool = spool
        _seq[0] += 1
        self.header = SEQ_HEADER % _seq[0]

    @property
    def size(self) -> int:
        return len(self.header) + self.spool.size

    def read(self, offset: int, length: int) -> Any:
        from twisted.internet.defer import succeed

        if offset < len(self.header):
            piece = self.header[offset : offset + length]
            if len(piece) == length:
                return succeed(piece)
            return self.spool.read(0, length - len(piece)).addCallback(lambda rest: piece + rest)
        return self.spool.read(offset - len(self.header), length)


def eml_chunks(path: str, chunk: int = 65535) -> Tuple[bytes, Iterator[bytes]]:
    """Head (up to the empty line) and body chunks of a message file, LF turned into CRLF as an MTA does."""
    with open(path, "rb") as f:
        data = f.read().replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    end = data.index(b"\r\n\r\n") + 4
    return data[:end], (data[i : i + chunk] for i in range(end, len(data), chunk))


def run_client(clamd: Clamd, size: int, concurrency: int, duration: float, warmup: float,
               unix: bool, eml: Optional[str] = None) -> Dict[str, Any]:
    """C scans in flight for ``warmup + duration`` seconds; figures over the last ``duration``."""
    from twisted.internet import reactor as _reactor
    from twisted.internet import threads
    from twisted.internet.defer import inlineCallbacks
    from twisted.python.failure import Failure

    reactor: Any = _reactor

    from rmilter.backends.clamd import ClamdClient, ClamdError, ReplyKind
    from rmilter.backends.upstream import UpstreamList
    from rmilter.config.schema import ServerSpec
    from rmilter.spool import Spool

    run_blocking = lambda f, *a: threads.deferToThread(f, *a)  # noqa: E731
    tempdir = tempfile.mkdtemp(prefix="clamd-bench-")
    server = (ServerSpec(name=clamd.socket_path, path=clamd.socket_path) if unix
              else ServerSpec(name=clamd.address, host=clamd.host, port=clamd.port))
    upstreams: UpstreamList[ServerSpec] = UpstreamList([server], error_time=10, dead_time=300, maxerrors=10,
                                                       clock=reactor)
    client = ClamdClient(upstreams, reactor=reactor, connect_timeout=1.0, results_timeout=20.0, retry_count=1,
                         retry_timeout=1.0)
    results: Dict[str, Any] = {"latencies": [], "failed": 0, "virus": 0}
    spools: List[Spool] = []
    state = {"measuring": False, "stop": False, "t0": 0.0, "t1": 0.0}

    @inlineCallbacks
    def build_spools():  # type: ignore[no-untyped-def]
        """Spool the messages as the pipeline does: waiting for each disk write (backpressure)."""
        for _ in range(concurrency):
            spool = Spool(tempdir, 0o600, 1024 * 1024, run_blocking)
            head, pieces = eml_chunks(eml) if eml else (MESSAGE_HEAD, body_chunks(size))
            spool.set_head(head)
            for piece in pieces:
                pending = spool.append(piece)
                if pending is not None:
                    yield pending
            yield spool.finish()
            spools.append(spool)

    def worker(spool: Spool) -> Any:
        started = time.monotonic()

        def done(result: Any) -> Any:
            if state["measuring"]:
                results["latencies"].append(time.monotonic() - started)
                if isinstance(result, Failure):
                    result.trap(ClamdError)
                    results["failed"] += 1
                    results["error"] = result.value.reason
                elif result.reply.kind is ReplyKind.VIRUS:
                    results["virus"] += 1
            if not state["stop"]:
                return worker(spool)
            return None

        return client.scan(UniqueMessage(spool)).addBoth(done)

    def start_measuring() -> None:
        results["rss_before"] = rss_mb(os.getpid())
        results["clamd_cpu0"] = cpu_seconds(clamd.process.pid)  # type: ignore[union-attr]
        state["measuring"], state["t0"] = True, time.monotonic()

    def stop() -> None:
        state["stop"], state["t1"] = True, time.monotonic()
        results["clamd_cpu1"] = cpu_seconds(clamd.process.pid)  # type: ignore[union-attr]

    def go(_: Any) -> Any:
        from twisted.internet.defer import gatherResults

        results["rss_idle"] = rss_mb(os.getpid())
        reactor.callLater(warmup, start_measuring)
        reactor.callLater(warmup + duration, stop)
        return gatherResults([worker(s) for s in spools])

    def finish(_: Any) -> None:
        for spool in spools:
            spool.close()
        reactor.callLater(0.2, reactor.stop)

    def failed(f: Any) -> None:
        print(f.getTraceback(), file=sys.stderr)
        reactor.stop()

    sampler = RssSampler([os.getpid(), clamd.process.pid])  # type: ignore[union-attr]
    with sampler:
        reactor.callWhenRunning(lambda: build_spools().addCallback(go).addCallbacks(finish, failed))
        reactor.run()
    lat = sorted(results["latencies"])
    n = len(lat)
    elapsed = state["t1"] - state["t0"]
    return {
        "scans": n,
        "per_s": n / elapsed if elapsed else 0.0,
        "p50_ms": 1000 * lat[n // 2] if n else 0.0,
        "p99_ms": 1000 * lat[min(n - 1, int(n * 0.99))] if n else 0.0,
        "failed": results["failed"],
        "error": results.get("error"),
        "rss_idle": results["rss_idle"],
        "rss_peak": sampler.peak[os.getpid()],
        "clamd_rss_peak": sampler.peak[clamd.process.pid],  # type: ignore[union-attr]
        "clamd_cpu": results["clamd_cpu1"] - results["clamd_cpu0"],
    }


# -- milter mode -------------------------------------------------------------------------------
def run_milter(binary: str, clamd: Clamd, eml: str, concurrency: int, duration: float,
               warmup: float) -> Tuple[Dict[str, Any], float]:
    config = (
        "bind_socket = inet:11339@127.0.0.1;\n"
        "clamav {\n  servers = %s;\n  results_timeout = 30s;\n}\n"
        "spamd {\n  servers = ;\n  retry_count = 1;\n  tempfail_on_error = yes;\n}\n" % (clamd.address,)
    )
    service = Rmilter(config)
    try:
        cpu0 = cpu_seconds(clamd.process.pid)  # type: ignore[union-attr]
        result = milterload(binary, service.socket, concurrency=concurrency, duration=duration, warmup=warmup,
                            eml=eml, pids=[service.pid, clamd.process.pid])  # type: ignore[union-attr]
        return result, cpu_seconds(clamd.process.pid) - cpu0  # type: ignore[union-attr]
    finally:
        service.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", default="client,milter", help="client, milter or both (comma separated)")
    parser.add_argument("--sizes", default="100k,5M")
    parser.add_argument("--conc", default="8")
    parser.add_argument("--duration", type=float, default=10)
    parser.add_argument("--warmup", type=float, default=2)
    parser.add_argument("--unix", action="store_true", help="client mode: talk to clamd's unix socket")
    parser.add_argument("--milterload", help="path of the milterload binary (milter mode)")
    parser.add_argument("--stream-max-length", default="64M")
    args = parser.parse_args()
    modes = args.mode.split(",")
    if "milter" in modes and not args.milterload:
        parser.error("milter mode needs --milterload (make -C ../shared/tools/milterload O=/tmp/milterload)")

    # with milterload at hand both modes scan the very message milterload sends (its generated text
    # costs clamd far more CPU than repeated lines do); without it the client uses repeated lines
    emls: Dict[str, str] = {}
    if args.milterload:
        import subprocess

        workdir = tempfile.mkdtemp(prefix="clamd-bench-eml-")
        for size_text in args.sizes.split(","):
            emls[size_text] = os.path.join(workdir, "%s.eml" % size_text)
            subprocess.run([args.milterload, "--dump-eml", emls[size_text], "-b", size_text], check=True,
                           stdout=subprocess.DEVNULL)
    clamd = Clamd(stream_max_length=args.stream_max_length).start()
    print("clamd benchmark, %s, %d cores, clamd StreamMaxLength %s, %s, messages: %s"
          % (time.strftime("%Y-%m-%d %H:%M"), os.cpu_count() or 0, args.stream_max_length,
             "unix socket" if args.unix else "TCP",
             "milterload --dump-eml" if emls else "repeated text lines"))
    try:
        if "client" in modes:
            # each client run needs its own reactor: run them in child interpreters
            print("\n| client (in-process ClamdClient) | scans/s | p50 ms | p99 ms | RSS idle MB | RSS peak MB "
                  "| growth MB | clamd RSS MB | clamd CPU s | failed |")
            print("|---|---|---|---|---|---|---|---|---|---|")
            for size_text in args.sizes.split(","):
                for conc in (int(c) for c in args.conc.split(",")):
                    r = _client_in_child(clamd, size_text, conc, args, emls.get(size_text))
                    print("| %s c=%d | %.1f | %.0f | %.0f | %.1f | %.1f | %.1f | %.1f | %.1f | %d%s |" % (
                        size_text, conc, r["per_s"], r["p50_ms"], r["p99_ms"], r["rss_idle"], r["rss_peak"],
                        r["rss_peak"] - r["rss_idle"], r["clamd_rss_peak"], r["clamd_cpu"], r["failed"],
                        (" (%s)" % r["error"]) if r.get("error") else ""))
                    sys.stdout.flush()
        if "milter" in modes:
            print("\n| milter (twistd rmilter + milterload) | msg/s | p50 ms | p99 ms | rmilter RSS max MB "
                  "| clamd RSS max MB | clamd CPU s | errors | final |")
            print("|---|---|---|---|---|---|---|---|---|")
            for size_text in args.sizes.split(","):
                for conc in (int(c) for c in args.conc.split(",")):
                    try:
                        result, clamd_cpu = run_milter(args.milterload, clamd, emls[size_text], conc,
                                                       args.duration, args.warmup)
                    except Exception as e:  # report and go on: the milter may not start yet
                        print("| %s c=%d | not measured: %s |" % (size_text, conc, str(e).splitlines()[0]))
                        continue
                    watched = result.get("watched") or [{}, {}]
                    lat = result["latency_ms"]
                    finals = ",".join("%s=%d" % kv for kv in result.get("final", {}).items() if kv[1])
                    print("| %s c=%d | %.1f | %.0f | %.0f | %.1f | %.1f | %.1f | %s | %s |" % (
                        size_text, conc, result["msgs_per_s"], lat["p50"], lat["p99"],
                        watched[0].get("rss_max_kb", 0) / 1024.0, watched[-1].get("rss_max_kb", 0) / 1024.0,
                        clamd_cpu, result.get("errors", 0), finals))
                    sys.stdout.flush()
    finally:
        clamd.stop()


def _client_in_child(clamd: Clamd, size_text: str, conc: int, args: argparse.Namespace,
                     eml: Optional[str]) -> Dict[str, Any]:
    """Run one client measurement in a fresh interpreter (a Twisted reactor runs only once)."""
    import json
    import subprocess

    code = (
        "import json, sys; sys.path.insert(0, %r); sys.path.insert(0, %r)\n"
        "import clamd_bench as b\n"
        "from tests.harness.clamd import Clamd\n"
        "c = Clamd.__new__(Clamd); c.__dict__.update(json.loads(sys.argv[1]))\n"
        "class P: pid = %d\n"
        "c.process = P()\n"
        "print(json.dumps(b.run_client(c, b.parse_size(%r), %d, %f, %f, %r, %r)))\n"
    ) % (REPO, os.path.dirname(os.path.abspath(__file__)), clamd.process.pid,  # type: ignore[union-attr]
         size_text, conc, args.duration, args.warmup, args.unix, eml)
    state = {k: clamd.__dict__[k] for k in ("port", "dir", "socket_path", "conf_path", "log_path")}
    out = subprocess.run([sys.executable, "-c", code, json.dumps(state)], check=True, capture_output=True,
                         text=True, timeout=args.duration + args.warmup + 300)
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


if __name__ == "__main__":
    main()
