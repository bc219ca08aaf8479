"""Cost of the milter engine per message, without sockets: codec + session + real pipeline.

Feeds the exact packet stream milterload sends for one 4 KB message on a fresh
connection (OPTNEG, D C/C, D H/H, D M/M, D R/R, D T/T, 10 x D L/L, D N/N, D B/B,
D E/E, A, Q) into a ``MilterProtocol`` over a StringTransport and prints
microseconds per message.  Usage:
``python3 bench/milter_engine.py [messages] [--no-nr] [--fake] [--metrics off|on|both] [--reps N]``
(``--fake``: rmilter.testing.fakepipeline instead of the real pipeline, to see the engine alone;
``--metrics on``: the pipeline feeds ``rmilter.metrics`` as the service does with a
``metrics_socket``; ``both``: off and on alternately, ``--reps`` times each).
"""
from __future__ import annotations

import os
import sys
import time

from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from rmilter.config.schema import Config
from rmilter.milter import codec
from rmilter.metrics import Metrics
from rmilter.milter.protocol import MilterFactory
from rmilter.pipeline import Pipeline
from rmilter.deps import Deps
from rmilter.runtime import Runtime
from rmilter.spool import run_inline
from rmilter.testing.fakepipeline import FakePipeline
from rmilter.testing.mta import MessageSpec


def message_stream(nr: bool) -> list:
    """The reads one message arrives in (with NR steps: the whole envelope and content at once)."""
    spec = MessageSpec(
        headers=tuple(("X-Header-%d" % i, "value number %d of a test header" % i) for i in range(9))
        + (("Message-ID", "<1.2@example.net>"),),
        body=b"Line of body text for the benchmark message.\r\n" * 75,
    )
    qid = (("i", spec.queue_id),)
    D = codec.Macro
    steps = [
        [codec.Negotiate(6, 0x1FF, 0x1FFFFF)],
        [D("C", (("j", "mx"), ("{daemon_name}", "smtpd"), ("{daemon_addr}", "127.0.0.1"), ("v", "Postfix"),
                 ("_", "client [192.0.2.10]"))), codec.Connect("client.example.net", "4", 40000, "192.0.2.10")],
        [D("H"), codec.Helo("client.example.net")],
        [D("M", (("{mail_addr}", "sender@example.com"), ("{mail_host}", "[127.0.0.1]:25"), ("{mail_mailer}", "smtp"))),
         codec.Mail(("<sender@example.com>",))],
        [D("R", (("{rcpt_addr}", "user1@example.net"), ("{rcpt_host}", "[127.0.0.1]:25"), ("{rcpt_mailer}", "smtp"))),
         codec.Rcpt(("<user1@example.net>",))],
        [D("T", qid), codec.Data()],
    ]
    steps += [[D("L", qid), codec.Header(n, v)] for n, v in spec.headers]
    steps += [[D("N", qid), codec.EndOfHeaders()], [D("B", qid), codec.Body(spec.body)], [D("E", qid), codec.EndOfMessage()],
              [codec.Abort(), codec.Quit()]]
    packets = [b"".join(codec.encode(x) for x in step) for step in steps]
    if not nr:
        return packets
    return [packets[0], b"".join(packets[1:-2]), packets[-2], packets[-1]]


def _option(name: str, default: str) -> str:
    if name in sys.argv[:-1]:
        return sys.argv[sys.argv.index(name) + 1]
    return default


def main() -> None:
    count = int(sys.argv[1]) if len(sys.argv) > 1 and sys.argv[1].isdigit() else 20000
    modes = {"off": [False], "on": [True], "both": [False, True]}[_option("--metrics", "off")]
    reps = int(_option("--reps", "1"))
    if len(modes) > 1 or reps > 1:
        print("load %s" % " ".join("%.2f" % x for x in os.getloadavg()))
    for rep in range(reps):
        for metrics in (modes if rep % 2 == 0 else modes[::-1]):  # alternate which goes first
            run(count, metrics)


def run(count: int, with_metrics: bool) -> None:
    nr = "--no-nr" not in sys.argv
    clock = Clock()
    runtime = Runtime(Deps(config=Config(), clock=clock, run_blocking=run_inline))
    pipeline = FakePipeline() if "--fake" in sys.argv else Pipeline(lambda: runtime)
    factory = MilterFactory(pipeline, clock, no_reply_steps=nr)
    if with_metrics and isinstance(pipeline, Pipeline):
        metrics = Metrics(clock)
        pipeline.observers.append(metrics.observe_result)
        pipeline.message_observers.append(metrics.message_done)
    reads = message_stream(nr)
    start = time.process_time()
    for _ in range(count):
        protocol = factory.buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        for data in reads:
            protocol.dataReceived(data)
        protocol.connectionLost(None)
    elapsed = time.process_time() - start
    assert transport.value().endswith(codec.ACCEPT_PACKET), transport.value()
    print("%s, %s pipeline%s: %.1f us per message (%d messages, %d reads each)" % (
        "no-reply steps" if nr else "every step answered", "fake" if "--fake" in sys.argv else "real",
        ", metrics on" if with_metrics else "", elapsed / count * 1e6, count, len(reads)), flush=True)


if __name__ == "__main__":
    main()
