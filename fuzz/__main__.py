"""Run fuzz targets for N seconds each: ``python3 -m fuzz [--seconds N] [--engine E] [TARGET ...]``.

Engines: ``atheris`` (coverage-guided libFuzzer, when it is installed) or ``hypothesis``
(always; ``--derandomize`` makes the run reproducible: batch k uses seed k, as .ci/run does).
Seeds come from ``fuzz.targets`` (the project's own test inputs).  Prints one line per target
with the number of executions; exits 1 on the first input that breaks a target (shown in hex).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from typing import Callable, List

from fuzz.targets import TARGETS


def _mutations(seeds: List[bytes]):  # type: ignore[no-untyped-def]
    from hypothesis import strategies as st

    def mutate(args):  # type: ignore[no-untyped-def]
        seed, edits = args
        data = bytearray(seed)
        for kind, pos, blob in edits:
            at = pos % (len(data) + 1)
            if kind == 0:
                data[at:at] = blob  # insert
            elif kind == 1:
                del data[at:at + len(blob) + 1]  # delete
            else:
                data[at:at + len(blob)] = blob  # overwrite
        return bytes(data)

    edit = st.tuples(st.integers(0, 2), st.integers(0, 1 << 20), st.binary(max_size=8))
    return st.one_of(st.tuples(st.sampled_from(seeds), st.lists(edit, max_size=6)).map(mutate),
                     st.binary(max_size=512))


def run_hypothesis(name: str, target: Callable[[bytes], None], seeds: List[bytes], seconds: float,
                   derandomize: bool) -> int:
    from hypothesis import HealthCheck, given, seed, settings

    count = [0]
    stop = time.monotonic() + seconds
    strategy = _mutations(seeds)

    def body(data: bytes) -> None:
        if time.monotonic() > stop:
            return
        count[0] += 1
        target(data)

    for data in seeds:
        count[0] += 1
        target(data)
    batch = 0
    while time.monotonic() < stop:
        test = settings(max_examples=500, deadline=None, database=None, derandomize=False,
                        suppress_health_check=list(HealthCheck))(given(strategy)(body))
        if derandomize:
            test = seed(batch)(test)
        test()
        batch += 1
    return count[0]


def run_atheris(name: str, target: Callable[[bytes], None], seeds: List[bytes], seconds: float) -> int:
    import atheris

    corpus = tempfile.mkdtemp(prefix="fuzz-%s-" % name)
    for i, data in enumerate(seeds):
        with open(os.path.join(corpus, "seed%d" % i), "wb") as f:
            f.write(data)
    count = [0]

    def one(data: bytes) -> None:
        count[0] += 1
        target(data)

    # libFuzzer ends the process itself (no atexit): its "Done N runs in S second(s)" line and
    # -print_final_stats are the report; a failing input is written as crash-* in the cwd
    atheris.Setup([sys.argv[0], corpus, "-max_total_time=%d" % seconds, "-rss_limit_mb=2048",
                   "-print_final_stats=1"], one)
    atheris.Fuzz()
    return count[0]


def main(argv: List[str]) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m fuzz", description=__doc__.splitlines()[0])
    parser.add_argument("targets", nargs="*", default=sorted(TARGETS), help="of: " + ", ".join(sorted(TARGETS)))
    parser.add_argument("--seconds", type=float, default=60.0, help="per target (default 60)")
    parser.add_argument("--engine", choices=("hypothesis", "atheris"), default="hypothesis")
    parser.add_argument("--derandomize", action="store_true", help="reproducible (hypothesis engine)")
    args = parser.parse_args(argv)
    for name in args.targets:
        if name not in TARGETS:
            parser.error("unknown target %r" % name)
    if args.engine == "atheris":
        if len(args.targets) != 1:
            parser.error("atheris runs one target per process")
        import atheris
        with atheris.instrument_imports(include=["rmilter"]):
            import rmilter.backends.clamd, rmilter.backends.rspamd.reply, rmilter.config  # noqa: F401,E401
            import rmilter.milter.codec, rmilter.milter.session  # noqa: F401,E401
        target, seeds = TARGETS[args.targets[0]]
        run_atheris(args.targets[0], target, seeds(), args.seconds)
        return 0
    for name in args.targets:
        target, seeds = TARGETS[name]
        started = time.monotonic()
        try:
            count = run_hypothesis(name, target, seeds(), args.seconds, args.derandomize)
        except Exception:
            print("fuzz %s: FAILED" % name, flush=True)
            raise
        print("fuzz %s: %d executions in %.0f s (hypothesis%s), no failure"
              % (name, count, time.monotonic() - started, ", derandomized" if args.derandomize else ""), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
