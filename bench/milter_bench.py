#!/usr/bin/env python3
"""Pass-through benchmark of the milter engine (issue 2): messages/s, p50/p99 latency and RSS.

    python3 bench/milter_bench.py --milterload /tmp/milterload/milterload [--nullmilter /tmp/milterload/nullmilter]
        [--conc 1,8,64] [--sizes 4k,100k] [--duration 10] [--nagle both|on|off]

Starts ``twistd -n rmilter`` with a configuration that has no backends (every message accepted),
drives it with milterload (../shared/tools/milterload; build it with
``make -C ../shared/tools/milterload O=/tmp/milterload``) and prints one markdown row per run.
With ``--nullmilter`` the libmilter do-nothing filter is measured in the same run as a reference.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import HEADER, Rmilter, free_port, milterload, row, wait_for_port  # noqa: E402

CONFIG = "bind_socket = inet:11339@127.0.0.1;\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--milterload", required=True)
    parser.add_argument("--nullmilter")
    parser.add_argument("--conc", default="1,8,64")
    parser.add_argument("--sizes", default="4k,100k")
    parser.add_argument("--duration", type=float, default=10)
    parser.add_argument("--warmup", type=float, default=2)
    parser.add_argument("--nagle", choices=("both", "on", "off"), default="both")
    parser.add_argument("--config", help="rmilter config text file to use instead of the pass-through one")
    args = parser.parse_args()

    config = open(args.config).read() if args.config else CONFIG
    targets = []
    service = Rmilter(config)
    targets.append(("rmilter", service.socket, service.pid))
    null = None
    if args.nullmilter:
        port = free_port()
        null = subprocess.Popen([args.nullmilter, "-p", "inet:%d@127.0.0.1" % port], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        wait_for_port(port)
        targets.append(("libmilter null", "inet:%d@127.0.0.1" % port, null.pid))
    nagles = {"both": (False, True), "on": (True,), "off": (False,)}[args.nagle]
    print("rmilter pass-through benchmark, %s, %d cores" % (time.strftime("%Y-%m-%d %H:%M"), os.cpu_count() or 0))
    print(HEADER)
    try:
        for size in args.sizes.split(","):
            for conc in (int(c) for c in args.conc.split(",")):
                for nagle in nagles:
                    for name, target, pid in targets:
                        extra = ["--nagle"] if nagle else []
                        result = milterload(args.milterload, target, concurrency=conc, duration=args.duration,
                                            warmup=args.warmup, size=size, pids=[pid], extra=extra)
                        label = "%s %s c=%d%s" % (name, size, conc, " nagle" if nagle else "")
                        print(row(label, result), flush=True)
    finally:
        service.stop()
        if null is not None:
            null.terminate()
            null.wait()


if __name__ == "__main__":
    main()
