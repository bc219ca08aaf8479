#!/usr/bin/env python3
"""rmilter's HTTP request to Rspamd against Rspamd's own milter's, byte for byte, and what each costs the worker.

    python3 bench/rspamd_request_bench.py --milterload /tmp/milterload/milterload [--out DIR]
        [--requests 1000] [--reps 3] [--size 4096]

One Rspamd (tests/harness/rspamd.py) with its ``rspamd_proxy`` in milter mode forwarding to
the normal worker, and ``twistd rmilter`` scanning on the same worker; both reach the worker
through a logging TCP relay in this process.  milterload sends the same message (one
connection, ``--keep-msgid``) through each milter; the exchanges are written to ``--out``
(``rmilter.request``, ``rmilter.reply``, ``proxy.request``, ``proxy.reply``) and the request
heads are printed side by side.  Then each captured request, and mixtures of the two (one's
header fields with the other's body), is replayed ``--requests`` times straight to the worker,
one connection per request as both milters do, interleaved over ``--reps`` rounds, and the
worker's CPU per request is read from /proc: the figure that says whether rmilter's request
makes Rspamd work harder than its own milter's.
"""
from __future__ import annotations

import argparse
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import Dict, List, Tuple

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import Rmilter  # noqa: E402
from rspamd_bench import RMILTER_CONF, BenchRspamd  # noqa: E402
from tests.harness.base import free_port  # noqa: E402
from tests.harness.rspamd import Rspamd  # noqa: E402

Head = List[Tuple[bytes, bytes]]


class Relay:
    """Listens on a free port, forwards every connection to ``target``, keeps both directions' bytes."""

    def __init__(self, target: int, port: int = 0) -> None:
        self.target = target
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", port))
        self.listener.listen(64)
        self.port = self.listener.getsockname()[1]
        #: per connection: [client to server bytes, server to client bytes]
        self.exchanges: List[List[bytearray]] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            client, _ = self.listener.accept()
            server = socket.create_connection(("127.0.0.1", self.target))
            exchange = [bytearray(), bytearray()]
            self.exchanges.append(exchange)
            for a, b, buf in ((client, server, exchange[0]), (server, client, exchange[1])):
                threading.Thread(target=self._pipe, args=(a, b, buf), daemon=True).start()

    @staticmethod
    def _pipe(a: socket.socket, b: socket.socket, buf: bytearray) -> None:
        try:
            while True:
                data = a.recv(65536)
                if not data:
                    break
                buf += data
                b.sendall(data)
        except OSError:
            pass
        finally:
            try:
                b.shutdown(socket.SHUT_WR)
            except OSError:
                pass

    def last_request(self) -> Tuple[bytes, bytes]:
        """The last exchange that carried a request (a probe connection carries none)."""
        for request, reply in reversed(self.exchanges):
            if request:
                return bytes(request), bytes(reply)
        raise RuntimeError("nothing was relayed")


def split(message: bytes) -> Tuple[bytes, Head, bytes]:
    end = message.find(b"\r\n\r\n")
    lines = message[:end].split(b"\r\n")
    head = [tuple(line.split(b": ", 1)) for line in lines[1:]]
    return lines[0], [(h[0], h[1] if len(h) > 1 else b"") for h in head], message[end + 4:]


def build(line: bytes, head: Head, body: bytes) -> bytes:
    fields = [(k, v) for k, v in head if k.lower() != b"content-length"] + [(b"Content-Length", b"%d" % len(body))]
    return line + b"\r\n" + b"".join(k + b": " + v + b"\r\n" for k, v in fields) + b"\r\n" + body


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--milterload", required=True)
    parser.add_argument("--out", default="")
    parser.add_argument("--requests", type=int, default=1000, help="replays per variant and round")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--size", default="4096")
    args = parser.parse_args()
    out = args.out or tempfile.mkdtemp(prefix="rspamd-request-bench-")
    os.makedirs(out, exist_ok=True)

    relay_port = free_port()
    rspamd = BenchRspamd.__new__(BenchRspamd)  # the bench's Rspamd, with the proxy's upstream behind a relay
    inner = Rspamd(proxy_self_scan=False, log_level="error")
    original = inner.write_config

    def write_config() -> None:
        original()
        path = os.path.join(inner.dir, "rspamd.conf")
        with open(path) as f:
            text = f.read()
        with open(path, "w") as f:
            f.write(text.replace('hosts = "%s"' % inner.address, 'hosts = "127.0.0.1:%d"' % relay_port))

    inner.write_config = write_config  # type: ignore[method-assign]
    rspamd.rspamd = inner.start()
    worker = rspamd.worker_pid("normal")
    assert worker is not None
    proxy_relay = Relay(inner.normal_port, relay_port)  # the port written into the proxy's upstream
    rmilter_relay = Relay(inner.normal_port)
    milter = Rmilter(RMILTER_CONF % {"server": '"127.0.0.1:%d"' % rmilter_relay.port})
    captured: Dict[str, Tuple[bytes, bytes]] = {}
    try:
        for name, relay, target in (("rmilter", rmilter_relay, milter.socket),
                                    ("proxy", proxy_relay, "inet:%d@127.0.0.1" % inner.proxy_port)):
            subprocess.run([args.milterload, "-s", target, "-n", "1", "-c", "1", "-b", args.size, "--keep-msgid"],
                           capture_output=True, check=True, timeout=60)
            time.sleep(0.5)  # the relay threads see the close
            captured[name] = relay.last_request()
            for kind, data in zip(("request", "reply"), captured[name]):
                with open(os.path.join(out, "%s.%s" % (name, kind)), "wb") as f:
                    f.write(data)
    finally:
        milter.stop()

    (rl, rh, rb), (pl, ph, pb) = split(captured["rmilter"][0]), split(captured["proxy"][0])
    print("# captured in %s" % (out,))
    print("| | rmilter | Rspamd's milter (rspamd_proxy) |\n|---|---|---|")
    print("| request line | `%s` | `%s` |" % (rl.decode(), pl.decode()))
    names: List[bytes] = []
    for k, _ in rh + ph:
        if k.lower() not in names:
            names.append(k.lower())
    for field in names:
        mine = ", ".join(v.decode("latin-1") for k, v in rh if k.lower() == field) or "-"
        theirs = ", ".join(v.decode("latin-1") for k, v in ph if k.lower() == field) or "-"
        print("| %s | `%s` | `%s` |" % (field.decode(), mine, theirs))
    print("| body | %d bytes, %d CRLF | %d bytes, %d CRLF |" % (len(rb), rb.count(b"\r\n"), len(pb), pb.count(b"\r\n")))
    for side in ("rmilter", "proxy"):
        reply = captured[side][1]
        took = re.search(rb'"time_real":([0-9.]+)', reply)
        print("# %s reply: %d bytes, %s" % (side, len(reply), reply.split(b"\r\n", 1)[0].decode()),
              "time_real %s" % (took.group(1).decode() if took else "?"))

    variants = {
        "rmilter's request": build(rl, rh, rb),
        "proxy's request": build(pl, ph, pb),
        "rmilter's head, proxy's body": build(rl, rh, pb),
        "proxy's head, rmilter's body": build(pl, ph, rb),
    }

    def cpu() -> float:
        with open("/proc/%d/stat" % worker) as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def one(request: bytes) -> None:
        s = socket.create_connection(("127.0.0.1", inner.normal_port))
        s.sendall(request)
        while s.recv(65536):
            pass
        s.close()

    figures: Dict[str, List[float]] = {k: [] for k in variants}
    try:
        for request in variants.values():
            for _ in range(50):
                one(request)
        for _ in range(args.reps):
            for name, request in variants.items():
                before = cpu()
                for _ in range(args.requests):
                    one(request)
                figures[name].append(1e6 * (cpu() - before) / args.requests)
    finally:
        inner.stop()
    print("\n| request replayed | worker CPU µs/request per round | median |\n|---|---|---|")
    for name, values in figures.items():
        print("| %s | %s | %.0f |" % (name, " ".join("%.0f" % v for v in values), statistics.median(values)))


if __name__ == "__main__":
    main()
