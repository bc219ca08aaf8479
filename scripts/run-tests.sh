#!/usr/bin/env bash
# Install the dependencies, then run the whole test suite with trial against real services.
# As root: the packages are installed with apt-get and Postfix, Rspamd and smtp-sink need root.
#
#   sudo scripts/run-tests.sh                  # everything (what CI runs)
#   sudo scripts/run-tests.sh tests.test_harness
#
# Environment:
#   RMILTER_SKIP_INSTALL=1   do not run install-deps.sh (a machine already set up)
#   RMILTER_TESTDATA=DIR     the shared test data (default: <repo>/../shared/testdata, beside
#                            the checkout, if present; nowhere else is looked at)
#   TRIAL_JOBS=N             trial worker processes (default 2; 1 runs in-process)
#   PYTHON=python3           the interpreter
# Tests needing Redis, Rspamd, clamd or Postfix start private instances of them on loopback;
# RMILTER_REQUIRE_SERVICES=1 makes a missing service fail its test rather than skip.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
python=${PYTHON:-python3}
cd "$repo"

if [ "${RMILTER_SKIP_INSTALL:-0}" != 1 ]; then
  "$repo/scripts/install-deps.sh"
fi

# the shared configuration corpus: beside the checkout (../shared/testdata) unless RMILTER_TESTDATA
# names it; where it is not found the corpus tests fail and say they were not run
if [ -z "${RMILTER_TESTDATA:-}" ] && [ -d "$(dirname "$repo")/shared/testdata/configs" ]; then
  export RMILTER_TESTDATA="$(dirname "$repo")/shared/testdata"
fi
echo "run-tests.sh: RMILTER_TESTDATA=${RMILTER_TESTDATA:-<unset: the corpus tests will fail and say so>}"
export RMILTER_REQUIRE_SERVICES=1
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"

jobs=${TRIAL_JOBS:-2}
args=()
[ "$jobs" -gt 1 ] && args+=(--jobs="$jobs")
[ $# -gt 0 ] || set -- tests

log=$(mktemp /tmp/rmilter-trial.XXXXXX)
start=$(date +%s)
set +e
"$python" -m twisted.trial "${args[@]}" "$@" 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e

# a plain closing line for CI, "N passed, N failed", from trial's summary
# ("PASSED (successes=N)" / "FAILED (failures=N, errors=N, successes=N)"; errors count as failed)
summary=$(grep -E '^(PASSED|FAILED) \(' "$log" | tail -n 1 || true)
rm -f "$log"
count() { printf '%s' "$summary" | grep -oE "$1=[0-9]+" | cut -d= -f2 | head -n 1 || true; }
passed=$(count successes); failures=$(count failures); errors=$(count errors); skips=$(count skips)
echo "trial finished in $(( $(date +%s) - start )) s with status $status"
if [ -n "$summary" ]; then
  echo "Tests: ${passed:-0} passed, $(( ${failures:-0} + ${errors:-0} )) failed${skips:+, $skips skipped}"
else
  echo "trial printed no summary: the run did not complete" >&2
  [ "$status" -ne 0 ] || status=1
fi
exit "$status"
