#!/usr/bin/env python3
"""DKIM signing cost and its effect on other connections (issue 7).

    python3 bench/dkim_bench.py micro [--duration 5]
    python3 bench/dkim_bench.py algorithms [--reps 3]
    python3 bench/dkim_bench.py milter --milterload /tmp/milterload/milterload [--duration 10] [--warmup 2]
        [--algorithms]

``micro`` (in-process, no services):
  1. the RSA private-key operation alone: dkimpy's pure-Python RSASSA-PKCS1-v1_5 (what
     ``dkim.sign`` uses: dkimpy 1.1.8 never calls ``cryptography`` for RSA) against
     ``cryptography``/OpenSSL, 1024 and 2048 bits;
  2. one whole signature of a 4 KB message: ``rmilter.checks.signer.compute_signature``
     against ``dkim.sign`` (which also parses the PEM key every call);
  3. reactor stall: a real Twisted reactor runs a 1 ms timer and measures how late it fires
     while 8 signatures are always in flight: nothing, rmilter's way (thread pool + OpenSSL),
     dkimpy's pure-Python RSA in the thread pool, and rmilter's signer on the reactor thread.

``algorithms`` (in-process, issue 17): signatures per second of one thread for RSA-2048,
Ed25519 and both on one message (``compute_signatures``: one body hash shared), with the CPU
time per signed message, interleaved repetitions.

``milter`` (twistd rmilter + milterload, ../shared/tools/milterload): one rmilter with a
wildcard key directory holding a 1024- and a 2048-bit key; a probe connection sends
unauthenticated (unsigned) 4 KB messages while 8 other connections send authenticated
(signed) ones.  The probe's p99 is compared with the same background load unauthenticated
(same traffic, no signing).  Target: signing adds at most 5 ms to the probe's p99.
``--algorithms`` runs the background as RSA-2048, Ed25519 and both (two signatures per
message) instead of 1024/2048 (issue 17).
"""
from __future__ import annotations

import argparse
import email.utils
import hashlib
import importlib.metadata
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)
sys.path.insert(0, HERE)

import dkim as dkimpy  # type: ignore[import-untyped]  # noqa: E402
from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa, utils  # noqa: E402
from dkim.crypto import RSASSA_PKCS1_v1_5_sign, parse_pem_private_key  # type: ignore[import-untyped]  # noqa: E402

from rmilter.dkim import keys, signer  # noqa: E402

HEADERS = [
    ("From", "Alice <alice@example.com>"),
    ("To", "bob@example.org"),
    ("Subject", "benchmark message"),
    ("Date", email.utils.formatdate(usegmt=True)),
    ("Message-ID", "<bench@example.com>"),
    ("MIME-Version", "1.0"),
    ("Content-Type", "text/plain; charset=us-ascii"),
]
BODY = b"".join(b"Line %03d of the benchmark body, some words to canonicalise.\r\n" % i for i in range(64))
#: a big body with whitespace to compress (relaxed canonicalisation's worst regular-expression work)
BIG_BODY = b"".join(b"line %05d  with   some\twhitespace   \r\n" % i for i in range(28000))


def make_key(bits: int) -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=bits)


def pem(key: rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                             serialization.NoEncryption())


def per_op(f: Callable[[], Any], min_time: float = 1.0) -> float:
    """Seconds per call of ``f`` (best of 3 rounds of at least ``min_time``/3)."""
    best = float("inf")
    for _ in range(3):
        n, start = 0, time.perf_counter()
        while True:
            f()
            n += 1
            elapsed = time.perf_counter() - start
            if elapsed >= min_time / 3:
                break
        best = min(best, elapsed / n)
    return best


def request_for(key: keys.PrivateKey, selector: str = "dkim") -> signer.SignatureRequest:
    signing_key = keys.SigningKey("example.com", selector, "bench", key)
    options = signer.SigningOptions("relaxed", "relaxed", "sha256", False)
    return signer.SignatureRequest(signing_key, options, signer.signed_headers(HEADERS), int(time.time()))


def message_bytes() -> bytes:
    return b"".join(("%s: %s\r\n" % h).encode() for h in HEADERS) + b"\r\n" + BODY


# -- micro ------------------------------------------------------------------------------------
def micro_costs(keys: Dict[int, rsa.RSAPrivateKey]) -> None:
    print("## RSA and whole-signature cost (one thread, µs per operation)\n")
    print("| key | dkimpy RSA (pure Python) | OpenSSL RSA | rmilter compute_signature | dkim.sign (dkimpy) |")
    print("|---|---|---|---|---|")
    digest = hashlib.sha256(b"x")
    message = message_bytes()
    for bits, key in sorted(keys.items()):
        parsed = parse_pem_private_key(pem(key))
        data = pem(key)
        pure = per_op(lambda: RSASSA_PKCS1_v1_5_sign(digest, parsed))
        openssl = per_op(lambda: key.sign(digest.digest(), padding.PKCS1v15(), utils.Prehashed(hashes.SHA256())))
        request = request_for(key)
        ours = per_op(lambda: signer.compute_signature(request, BODY))
        theirs = per_op(lambda: pure_python_signature(data, message))
        print("| %d | %.0f | %.0f | %.0f | %.0f |" % (bits, pure * 1e6, openssl * 1e6, ours * 1e6, theirs * 1e6))
    print()


def pure_python_signature(key_pem: bytes, message: bytes) -> bytes:
    """dkimpy's signing path as it is: its own pure-Python RSA, the PEM key parsed on every call."""
    return dkimpy.sign(message, b"dkim", b"example.com", key_pem, canonicalize=(b"relaxed", b"relaxed"),
                       include_headers=[h[0].lower().encode() for h in HEADERS])


def micro_stall(keys: Dict[int, rsa.RSAPrivateKey], duration: float, concurrency: int) -> None:
    """Lateness of a 1 ms reactor timer while signatures run (real reactor, real thread pool).

    ``threads(2)``: at most 2 signatures in the pool at once, as rmilter does on 2 cores
    (Keyring.signing_slots); ``1 MB``: a 1 MB body with whitespace runs instead of 4 KB.
    """
    from twisted.internet import reactor as global_reactor
    from twisted.internet import threads
    from twisted.internet.defer import Deferred, DeferredSemaphore, inlineCallbacks

    reactor: Any = global_reactor
    reactor.suggestThreadPoolSize(max(10, concurrency + 2))
    message = message_bytes()
    rows: List[str] = []
    slots = DeferredSemaphore(2)

    def measure(mode: str, bits: int) -> Deferred:
        done: Deferred = Deferred()
        lateness: List[float] = []
        signatures = [0]
        running = [True]
        key = keys[bits]
        request = request_for(key)
        key_pem = pem(key)

        def job() -> Any:
            if mode == "threads+openssl":
                return threads.deferToThread(signer.compute_signature, request, BODY)
            if mode == "threads(2)+openssl":
                return slots.run(threads.deferToThread, signer.compute_signature, request, BODY)
            if mode == "threads(2)+openssl 1 MB":
                return slots.run(threads.deferToThread, signer.compute_signature, request, BIG_BODY)
            if mode == "threads+pure-python":
                return threads.deferToThread(pure_python_signature, key_pem, message)
            if mode == "reactor+openssl":
                d: Deferred = Deferred()
                reactor.callLater(0, lambda: d.callback(signer.compute_signature(request, BODY)))
                return d
            raise ValueError(mode)

        def worker() -> None:
            if not running[0] or mode == "idle":
                return

            def finished(_: object) -> None:
                signatures[0] += 1
                worker()

            job().addCallback(finished)

        def tick(expected: float) -> None:
            now = time.perf_counter()
            lateness.append(now - expected)
            if running[0]:
                reactor.callLater(0.001, tick, time.perf_counter() + 0.001)

        def stop() -> None:
            running[0] = False
            reactor.callLater(0.2, done.callback, None)  # let the workers drain

        start = time.perf_counter()
        for _ in range(concurrency):
            worker()
        reactor.callLater(0.001, tick, time.perf_counter() + 0.001)
        reactor.callLater(duration, stop)

        def report(_: object) -> None:
            elapsed = time.perf_counter() - start
            ms = sorted(x * 1000 for x in lateness)
            p99 = ms[int(len(ms) * 0.99)]
            rows.append("| %s | %s | %.0f | %.2f | %.2f | %.2f |" % (
                mode, bits if mode != "idle" else "-", signatures[0] / elapsed,
                statistics.median(ms), p99, ms[-1]))

        return done.addCallback(report)

    @inlineCallbacks
    def run() -> Any:
        try:
            yield measure("idle", sorted(keys)[0])
            for bits in sorted(keys):
                for mode in ("threads+openssl", "threads(2)+openssl", "threads(2)+openssl 1 MB",
                             "threads+pure-python", "reactor+openssl"):
                    yield measure(mode, bits)
        finally:
            reactor.stop()

    reactor.callWhenRunning(run)
    reactor.run()
    print("## Reactor stall: lateness of a 1 ms timer with %d signatures in flight (%.0f s each)\n"
          % (concurrency, duration))
    print("| mode | key | signatures/s | timer late p50 ms | p99 ms | max ms |")
    print("|---|---|---|---|---|---|")
    print("\n".join(rows))
    print()


def algorithms(reps: int) -> None:
    """Signatures/s of one thread for RSA-2048, Ed25519 and both, 4 KB message (issue 17)."""
    rsa_key, ed_key = make_key(2048), ed25519.Ed25519PrivateKey.generate()
    cases = {
        "RSA-2048": [request_for(rsa_key)],
        "Ed25519": [request_for(ed_key, "ed")],
        "RSA-2048 + Ed25519": [request_for(rsa_key), request_for(ed_key, "ed")],
    }
    runs: Dict[str, List[Tuple[float, float]]] = {name: [] for name in cases}
    for _ in range(reps):
        for name, requests in cases.items():  # interleaved: the machine's noise hits all alike
            n, wall, cpu = 0, time.perf_counter(), time.process_time()
            while time.perf_counter() - wall < 1.0:
                signer.compute_signatures(requests, BODY)
                n += 1
            runs[name].append(((time.perf_counter() - wall) / n, (time.process_time() - cpu) / n))
    print("## Signatures per second, one thread, 4 KB body, relaxed/relaxed (%d interleaved reps, median)\n" % reps)
    print("%d cores, load average %.1f, %s (the machine is shared: figures are noisy)\n"
          % (os.cpu_count() or 0, os.getloadavg()[0], time.strftime("%Y-%m-%d %H:%M")))
    print("| keys | messages/s | signatures/s | µs per message | CPU µs per message |")
    print("|---|---|---|---|---|")
    for name, requests in cases.items():
        seconds = statistics.median(r[0] for r in runs[name])
        cpu = statistics.median(r[1] for r in runs[name])
        print("| %s | %.0f | %.0f | %.0f | %.0f |" % (name, 1 / seconds, len(requests) / seconds, seconds * 1e6,
                                                    cpu * 1e6))
    print()


# -- milter -----------------------------------------------------------------------------------
CONFIG = """\
dkim {
  domain {
    key = "%(keydir)s";
    domain = "*";
    selector = "dkim";
  };
  domain {
    key = "%(eddir)s";
    domain = "*";
    selector = "ed";
  };
  header_canon = relaxed;
  body_canon = relaxed;
  sign_alg = sha256;
};
"""


def start_milterload(binary: str, target: str, concurrency: int, duration: float, warmup: float,
                     extra: Sequence[str]) -> "subprocess.Popen[str]":
    cmd = [binary, "-s", target, "-c", str(concurrency), "-d", str(duration), "-w", str(warmup), "-b", "4k",
           "--json"] + list(extra)
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: "subprocess.Popen[str]", timeout: float) -> Dict[str, Any]:
    out, err = proc.communicate(timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError("milterload failed: %s" % err[-2000:])
    return json.loads(out)


def milter(binary: str, duration: float, warmup: float, reps: int, by_algorithm: bool = False) -> None:
    from common import Rmilter

    keydir = tempfile.mkdtemp(prefix="dkim-bench-keys.")
    eddir = os.path.join(keydir, "ed")
    os.mkdir(eddir)
    ed_pem = ed25519.Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    try:
        rsa_2048 = pem(make_key(2048))
        for name, data in (("k1024.example.dkim.key", pem(make_key(1024))), ("k2048.example.dkim.key", rsa_2048),
                           ("both.example.dkim.key", rsa_2048), ("ed/ed.example.ed.key", ed_pem),
                           ("ed/both.example.ed.key", ed_pem)):
            with open(os.path.join(keydir, name), "wb") as f:
                f.write(data)
        service = Rmilter(CONFIG % {"keydir": keydir, "eddir": eddir})
        try:
            phases: List[Tuple[str, Optional[List[str]]]] = [
                ("probe alone", None),
                ("8 conns unsigned", ["--from", "sender@k2048.example"]),
            ]
            signing = [("1024", "k1024.example"), ("2048", "k2048.example")]
            if by_algorithm:
                signing = [("RSA-2048", "k2048.example"), ("Ed25519", "ed.example"),
                           ("RSA-2048 + Ed25519", "both.example")]
            phases += [("8 conns signing " + label, ["--from", "sender@" + domain, "--auth", "alice"])
                       for label, domain in signing]
            print("## Through the milter: unsigned probe (1 connection) while 8 connections run, 4 KB messages\n")
            print("%d cores, load average %.1f at start, %s, %.0f s per run (+%.0f s warm-up), median of %d "
                  "interleaved runs\n" % (os.cpu_count() or 0, os.getloadavg()[0], time.strftime("%Y-%m-%d %H:%M"),
                                          duration, warmup, reps))
            print("| background | background msg/s (signatures/s: x2 for both) | rmilter CPU µs/msg | probe msg/s "
                  "| probe p50 ms | probe p99 ms | probe max ms |")
            print("|---|---|---|---|---|---|---|")
            results: Dict[str, List[Tuple[float, ...]]] = {}
            for _ in range(reps):
                for name, extra in phases:
                    background = None
                    if extra is not None:
                        background = start_milterload(binary, service.socket, 8, duration + warmup + 1, warmup,
                                                      extra + ["-p", str(service.pid)])
                        time.sleep(0.5)
                    probe = start_milterload(binary, service.socket, 1, duration, warmup,
                                             ["--from", "probe@unsigned.example", "-p", str(service.pid)])
                    p = finish(probe, duration + warmup + 120)
                    b = finish(background, duration + warmup + 120) if background is not None else None
                    lat = p["latency_ms"]
                    errors = p.get("errors", 0) + (b.get("errors", 0) if b else 0)
                    if errors:
                        print("(run %s had %d errors)" % (name, errors))
                    # CPU of rmilter over the probe's window, shared by all messages in that window
                    cpu = p["watched"][0].get("cpu_s", 0.0)
                    messages = (p["msgs_per_s"] + (b["msgs_per_s"] if b else 0.0)) * duration
                    results.setdefault(name, []).append(
                        (b["msgs_per_s"] if b else 0.0, cpu / messages * 1e6 if messages else 0.0,
                         p["msgs_per_s"], lat["p50"], lat["p99"], lat["max"]))
            for name, _ in phases:
                runs = results[name]
                med = [statistics.median(r[i] for r in runs) for i in range(6)]
                print("| %s | %s | %.0f | %.0f | %.2f | %.2f | %.2f |" % (
                    name, "%.0f" % med[0] if med[0] else "-", med[1], med[2], med[3], med[4], med[5]))
            base = statistics.median(r[4] for r in results["8 conns unsigned"])
            print()
            for name in ["8 conns signing " + label for label, _ in signing]:
                p99 = statistics.median(r[4] for r in results[name])
                print("- %s: probe p99 %+.2f ms against the same load unsigned (runs: %s)" % (
                    name, p99 - base, ", ".join("%.1f" % r[4] for r in results[name])))
            print("- 8 conns unsigned, probe p99 of the runs: %s" % (
                ", ".join("%.1f" % r[4] for r in results["8 conns unsigned"])))
        finally:
            service.stop()
    finally:
        shutil.rmtree(keydir, True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="mode", required=True)
    m = sub.add_parser("micro")
    m.add_argument("--duration", type=float, default=5.0)
    m.add_argument("--concurrency", type=int, default=8)
    f = sub.add_parser("milter")
    f.add_argument("--milterload", required=True)
    f.add_argument("--duration", type=float, default=10.0)
    f.add_argument("--warmup", type=float, default=2.0)
    f.add_argument("--reps", type=int, default=1)
    f.add_argument("--algorithms", action="store_true", help="background: RSA-2048, Ed25519, both")
    a = sub.add_parser("algorithms")
    a.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    if args.mode == "micro":
        print("dkimpy %s, cryptography %s, Python %s, %d cores\n" % (
            importlib.metadata.version("dkimpy"), __import__("cryptography").__version__,
            sys.version.split()[0], os.cpu_count() or 0))
        keys = {bits: make_key(bits) for bits in (1024, 2048)}
        micro_costs(keys)
        micro_stall(keys, args.duration, args.concurrency)
    elif args.mode == "algorithms":
        algorithms(args.reps)
    else:
        milter(args.milterload, args.duration, args.warmup, args.reps, args.algorithms)


if __name__ == "__main__":
    main()
