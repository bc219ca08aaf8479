#!/usr/bin/env python3
"""CPU of the Rspamd client per scan, against a canned local /checkv2 server (issue 11).

    python3 bench/rspamd_client_bench.py [--client treq] [--scans 20000] [--concurrency 1,8,64]
        [--size 4096] [--keep-alive] [--unix] [--tls] [--reps 3] [--warmup 500]

The server runs in a **subprocess** (this script with ``--serve``): a raw Twisted ``Protocol``
that reads each request (head and Content-Length body) and answers with one fixed /checkv2
JSON reply (a ham verdict with 14 symbols and a ``milter`` block, ~2 KB), with ``Connection:
close`` as Rspamd 3.4's normal worker does, or keeping the connection open with
``--keep-alive``.  This process runs only the client: the real reactor, ``RspamdClient.scan``
with the message in memory, ``--concurrency`` scans in flight until ``--scans`` are done, so
``time.process_time()`` of this process over the run is the client's CPU (connect, request,
reply parsing, the retry loop, the reactor's own work), the server's is read from
``/proc/<pid>/stat`` and printed beside it for scale.  Every cell is run ``--reps`` times (after
``--warmup`` scans); the last line of a cell is the median.

Columns: scans/s (wall clock; with one busy server process it is bounded by the server too),
client µs of CPU per scan (the figure to compare), server µs per scan.

``--tls``: the canned server speaks TLS (a CA and a certificate for ``localhost`` made at start
with ``cryptography``, as tests/harness/stunnel.py does) and the client reaches it as
``https://localhost:PORT`` with ``tls_ca`` - verified TLS as in production; compare with the
same run without ``--tls`` (with ``--keep-alive``, the handshake is paid once per connection).

``--client`` picks the implementation behind the same ``scan(request, body)`` call: ``treq``
is ``rmilter.backends.rspamd`` (treq since issue 12).  The project's former own HTTP/1.1
client (``--client own``, deleted in issue 12) can still be measured from commit faf304b;
its figures are in bench/README.md beside treq's.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, Dict, List, Tuple

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

# -- the canned server (runs in the subprocess) -----------------------------------------------


def checkv2_document() -> Dict[str, Any]:
    """A /checkv2 reply the size and shape of a real ham verdict (symbols with options, milter block)."""
    from rmilter.testing.fake_rspamd import checkv2_reply

    symbols = {
        "ARC_NA": (0.0, []), "ASN": (0.0, ["asn:64496, ipnet:192.0.2.0/24, country:ZZ"]),
        "DMARC_NA": (0.0, ["example.net"]), "FROM_EQ_ENVFROM": (0.0, []), "FROM_HAS_DN": (0.0, []),
        "MIME_GOOD": (-0.1, ["text/plain"]), "MIME_TRACE": (0.0, ["0:+"]), "MID_RHS_MATCH_FROM": (0.0, []),
        "RCPT_COUNT_ONE": (0.0, ["1"]), "RCVD_COUNT_ONE": (0.0, ["1"]), "R_DKIM_NA": (0.0, []),
        "R_SPF_NA": (0.0, ["no SPF record"]), "TO_DN_NONE": (0.0, []), "TO_MATCH_ENVRCPT_ALL": (0.0, []),
    }
    return checkv2_reply(
        action="no action", score=-0.1, required_score=15.0, symbols=symbols,
        message_id="<20240501120000.1234@example.net>",
        milter={"add_headers": {"X-Spamd-Bar": {"value": "/", "order": 0}, "X-Rspamd-Server": "bench"},
                "remove_headers": {"X-Spamd-Bar": 0, "X-Spam": 0}},
    )


def serve(address: str, keep_alive: bool, tls_dir: str = "") -> None:
    """Listen on ``address`` (``tcp`` or a unix path), print where, answer every request the same.

    With ``tls_dir``: TLS with the ``good`` certificate written there (``localhost``).
    """
    from twisted.internet import reactor as _reactor
    from twisted.internet.protocol import Factory, Protocol

    reactor: Any = _reactor
    body = json.dumps(checkv2_document()).encode()
    reply = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\nConnection: %s\r\n\r\n%s" % (
        len(body), b"keep-alive" if keep_alive else b"close", body)
    content_length = re.compile(rb"\r\ncontent-length:[ \t]*(\d+)", re.I)

    class CannedRspamd(Protocol):
        def __init__(self) -> None:
            self.buffer = bytearray()
            self.need = 0  # bytes of the request in progress (head and body); 0: head not seen yet

        def dataReceived(self, data: bytes) -> None:
            self.buffer += data
            while True:
                if not self.need:
                    end = self.buffer.find(b"\r\n\r\n")
                    if end < 0:
                        return
                    found = content_length.search(self.buffer, 0, end + 2)
                    self.need = end + 4 + (int(found.group(1)) if found else 0)
                if len(self.buffer) < self.need:
                    return
                del self.buffer[: self.need]
                self.need = 0
                transport: Any = self.transport
                transport.write(reply)
                if not keep_alive:
                    transport.loseConnection()
                    return

    factory = Factory.forProtocol(CannedRspamd)
    if tls_dir:
        from twisted.internet import ssl

        with open(os.path.join(tls_dir, "good.pem"), "rb") as f:
            pem = f.read()
        with open(os.path.join(tls_dir, "good.key"), "rb") as f:
            pem += f.read()
        options = ssl.PrivateCertificate.loadPEM(pem).options()
        port = reactor.listenSSL(0, factory, options, backlog=1024, interface="127.0.0.1")
        print("tls %d" % (port.getHost().port,), flush=True)
    elif address == "tcp":
        port = reactor.listenTCP(0, factory, backlog=1024, interface="127.0.0.1")
        print("tcp %d" % (port.getHost().port,), flush=True)
    else:
        reactor.listenUNIX(address, factory, backlog=1024)
        print("unix %s" % (address,), flush=True)
    reactor.run()


# -- the clients under test ------------------------------------------------------------------------
#: the scan call every client offers: (request, body) -> Deferred, and stop() -> Deferred
Client = Any


def treq_client(reactor: Any, server: Any, tls_ca: str = "") -> Client:
    """``rmilter.backends.rspamd.RspamdClient``: treq over the endpoint built for the server."""
    from rmilter.backends.rspamd import RspamdClient
    from rmilter.config.schema import SpamdConfig

    return RspamdClient(SpamdConfig(servers=(server,), retry_count=1, tls_ca=tls_ca or None), reactor)


CLIENTS: Dict[str, Callable[[Any, Any, str], Client]] = {"treq": treq_client}


# -- measuring -------------------------------------------------------------------------------------
def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads)."""
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def message(size: int) -> bytes:
    head = (b"Received: from client.example.net (client.example.net [192.0.2.10])\r\n"
            b"\tby mx.example.org (Postfix) with ESMTP id 4ABCDEF01\r\n"
            b"From: Alice <alice@example.net>\r\nTo: Bob <bob@example.org>\r\n"
            b"Subject: benchmark\r\nMessage-ID: <20240501120000.1234@example.net>\r\n\r\n")
    line = b"Line of body text for the benchmark message, long enough to look like mail.\r\n"
    return head + (line * (max(0, size - len(head)) // len(line) + 1))[: max(0, size - len(head))]


def run_cells(args: argparse.Namespace, server_spec: Any, server_pid: int) -> None:
    from twisted.internet import reactor as _reactor
    from twisted.internet.defer import Deferred, gatherResults

    from rmilter.backends.rspamd import MessageBody, ScanRequest

    reactor: Any = _reactor
    client = CLIENTS[args.client](reactor, server_spec, args.tls_ca)
    request = ScanRequest(queue_id="4ABCDEF01", recipients=("<bob@example.org>",), envelope_from="alice@example.net",
                          helo="client.example.net", hostname="client.example.net", ip="192.0.2.10",
                          mta_tag="mx.example.org", tag="bench")
    body = MessageBody(data=message(args.size))
    cells = [c for c in args.concurrency for _ in range(args.reps)]
    figures: Dict[int, List[Tuple[float, float, float]]] = {}
    failures: List[str] = []

    def batch(count: int, concurrency: int) -> "Deferred[Any]":
        """``count`` scans, ``concurrency`` in flight at a time."""
        left = [count]

        def worker(_: Any = None) -> Any:
            if left[0] <= 0:
                return None
            left[0] -= 1
            d = client.scan(request, body)
            d.addErrback(lambda f: failures.append(f.getErrorMessage()))
            return d.addCallback(worker)

        return gatherResults([worker() for _ in range(min(concurrency, count))])

    def cell(_: Any = None) -> Any:
        if not cells:
            return None
        concurrency = cells.pop(0)

        def measure(_: Any) -> Any:
            wall0, cpu0, server0 = time.perf_counter(), time.process_time(), cpu_seconds(server_pid)

            def done(_: Any) -> None:
                wall = time.perf_counter() - wall0
                cpu = time.process_time() - cpu0
                server_cpu = cpu_seconds(server_pid) - server0
                n = args.scans
                result = (n / wall, 1e6 * cpu / n, 1e6 * server_cpu / n)
                figures.setdefault(concurrency, []).append(result)
                print("%-5s %-4s %-10s %7d B  C=%-3d %7d scans %6.2f s  %7.0f scans/s  client %6.1f µs/scan"
                      "  server %6.1f µs/scan" % ((args.client, "unix" if args.unix else "tls" if args.tls else "tcp",
                                                     "keep-alive" if args.keep_alive else "close", args.size,
                                                     concurrency, n, wall) + result), flush=True)
                if len(figures[concurrency]) == args.reps and args.reps > 1:
                    rate, client_us, server_us = (statistics.median(r[i] for r in figures[concurrency])
                                                  for i in range(3))
                    print("%-5s median of %d runs, C=%-3d %31s  %7.0f scans/s  client %6.1f µs/scan"
                          "  server %6.1f µs/scan" % (args.client, args.reps, concurrency, "", rate, client_us,
                                                      server_us), flush=True)

            return batch(args.scans, concurrency).addCallback(done)

        return batch(args.warmup, concurrency).addCallback(measure).addCallback(cell)

    def finish(result: Any) -> None:
        if failures:
            print("%d scans failed, e.g.: %s" % (len(failures), failures[0]), file=sys.stderr)
        client.stop()
        reactor.stop()

    reactor.callWhenRunning(lambda: cell().addBoth(finish))
    reactor.run()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--client", choices=sorted(CLIENTS), default="treq")
    parser.add_argument("--scans", type=int, default=20000, help="scans measured per cell")
    parser.add_argument("--warmup", type=int, default=500, help="scans before each measurement")
    parser.add_argument("--concurrency", default="1,8,64", help="scans in flight, comma-separated cells")
    parser.add_argument("--size", type=int, default=4096, help="message size in bytes")
    parser.add_argument("--keep-alive", action="store_true", help="the server keeps connections open")
    parser.add_argument("--unix", action="store_true", help="a unix socket instead of TCP on 127.0.0.1")
    parser.add_argument("--tls", action="store_true", help="verified TLS (https://localhost) instead of plain HTTP")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--serve", metavar="ADDRESS", help=argparse.SUPPRESS)  # the server subprocess
    parser.add_argument("--tls-dir", default="", help=argparse.SUPPRESS)  # the server subprocess: certificates
    args = parser.parse_args()
    if args.serve:
        serve(args.serve, args.keep_alive, args.tls_dir)
        return
    if args.tls and args.unix:
        parser.error("--tls is over TCP only")
    args.concurrency = [int(c) for c in args.concurrency.split(",")]

    from rmilter.config.schema import ServerSpec

    tmp = tempfile.mkdtemp(prefix="rspamd-client-bench-")
    args.tls_ca = ""
    command = [sys.executable, os.path.abspath(__file__), "--serve", os.path.join(tmp, "rspamd.sock") if args.unix
               else "tcp"] + (["--keep-alive"] if args.keep_alive else [])
    if args.tls:
        from tests.harness.stunnel import _certificates

        _certificates(tmp)
        args.tls_ca = os.path.join(tmp, "ca.pem")
        command += ["--tls-dir", tmp]
    server = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=REPO))
    try:
        assert server.stdout is not None
        kind, where = server.stdout.readline().split()
        spec = (ServerSpec(name=where, path=where) if kind == "unix"
                else ServerSpec(name="https://localhost:" + where, host="localhost", port=int(where), tls=True)
                if kind == "tls" else ServerSpec(name="127.0.0.1:" + where, host="127.0.0.1", port=int(where)))
        print("# python %s, load average %s" % (sys.version.split()[0], " ".join(
            open("/proc/loadavg").read().split()[:3])), flush=True)
        run_cells(args, spec, server.pid)
    finally:
        server.terminate()
        server.wait(10)


if __name__ == "__main__":
    main()
