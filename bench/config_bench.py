"""Configuration benchmarks (issue 3, item 6): parse time and IP-list membership cost.

    python3 bench/config_bench.py [--testdata DIR] [--repeat N]

Prints, for each figure, the best and median of N runs and the target:
- parse time of the largest corpus file (target under 50 ms);
- parse time of a generated 5,000-entry IP list (target under 500 ms);
- membership test cost on a 5,000-entry IP list (target under 5 us per lookup),
  for hits, misses and IPv6 clients.
The corpus is read from $RMILTER_TESTDATA/configs (or --testdata); host names
are resolved by a stub so the figures do not include DNS.
"""
from __future__ import annotations

import argparse
import ipaddress
import os
import random
import statistics
import sys
import time
from typing import Callable, List, Sequence

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from rmilter.config import parse_text  # noqa: E402
from rmilter.netlist import NetList  # noqa: E402


def stub_resolver(name: str) -> Sequence[str]:
    if name.lower() == "localhost":
        return ["127.0.0.1", "::1"]
    raise OSError("not resolved in the benchmark")


def timed(fn: Callable[[], object], repeat: int) -> List[float]:
    runs = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - start)
    return runs


def report(label: str, runs: List[float], unit: float, unit_name: str, target: float) -> None:
    best, median = min(runs) / unit, statistics.median(runs) / unit
    verdict = "ok" if median < target else "OVER TARGET"
    print("%-48s best %9.2f %s  median %9.2f %s  target < %g %s  %s"
          % (label, best, unit_name, median, unit_name, target, unit_name, verdict))


def generated_networks(count: int, seed: int = 3) -> List[str]:
    rng = random.Random(seed)
    entries = []
    for _ in range(count):
        kind = rng.random()
        if kind < 0.6:
            entries.append(str(ipaddress.IPv4Address(rng.getrandbits(32))))
        elif kind < 0.9:
            prefix = rng.randint(8, 31)
            net = ipaddress.ip_network((rng.getrandbits(32), prefix), strict=False)
            entries.append(str(net))
        else:
            prefix = rng.choice((32, 48, 56, 64, 128))
            net = ipaddress.ip_network((rng.getrandbits(128), prefix), strict=False)
            entries.append("[%s]/%d" % (net.network_address, prefix))
    return entries


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--testdata", default=os.environ.get("RMILTER_TESTDATA"))
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args()

    if not args.testdata:
        print("RMILTER_TESTDATA is not set (nor --testdata): corpus figure not measured", file=sys.stderr)
    else:
        configs = os.path.join(args.testdata, "configs")
        files = [os.path.join(configs, f) for f in os.listdir(configs) if not f.endswith(".md")]
        largest = max(files, key=os.path.getsize)
        text = open(largest, encoding="utf-8").read()
        tmpdir_free = text.replace(".include", "# .include")

        def parse_largest() -> object:
            try:
                return parse_text(tmpdir_free, largest, resolver=stub_resolver)
            except Exception as e:  # the largest file may be a negative test; its parse time still counts
                return e

        report("parse %s (%d bytes)" % (os.path.basename(largest), os.path.getsize(largest)),
               timed(parse_largest, args.repeat), 1e-3, "ms", 50)

    entries = generated_networks(5000)
    ip_text = "spamd {\n\twhitelist = %s;\n};\n" % ",\n\t\t".join(entries)
    runs = timed(lambda: parse_text(ip_text, "generated.conf", resolver=stub_resolver), max(3, args.repeat // 4))
    report("parse a 5,000-entry IP list", runs, 1e-3, "ms", 500)

    netlist = parse_text(ip_text, "generated.conf", resolver=stub_resolver).spamd.whitelist
    assert isinstance(netlist, NetList) and len(netlist) > 4000
    rng = random.Random(5)
    hits = []
    for net in list(netlist.networks)[:1000]:
        if net.version == 4:
            hits.append(str(net.network_address + rng.randrange(net.num_addresses)))
    misses = [str(ipaddress.IPv4Address(rng.getrandbits(32))) for _ in range(1000)]
    misses = [a for a in misses if a not in netlist]
    v6 = [str(ipaddress.IPv6Address(rng.getrandbits(128))) for _ in range(1000)]
    for label, sample in (("hits (IPv4)", hits), ("misses (IPv4)", misses), ("IPv6 clients", v6)):
        rounds = 20

        def lookups(sample: List[str] = sample) -> None:
            for _ in range(rounds):
                for address in sample:
                    address in netlist  # noqa: B015

        runs = [r / (rounds * len(sample)) for r in timed(lookups, 5)]
        report("membership in 5,000-entry list, %s" % label, runs, 1e-6, "us", 5)
    return 0


if __name__ == "__main__":
    sys.exit(main())
