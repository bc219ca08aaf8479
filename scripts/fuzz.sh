#!/usr/bin/env bash
# Run the fuzz targets (fuzz/targets.py) for N seconds each:
#   scripts/fuzz.sh [SECONDS] [TARGET ...]      hypothesis engine, all targets in turn
#   FUZZ_ENGINE=atheris scripts/fuzz.sh 600 codec   coverage-guided (pip install atheris), one target
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
seconds=${1:-60}
shift || true
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
if [ "${FUZZ_ENGINE:-hypothesis}" = atheris ]; then
    targets=("$@")
    [ ${#targets[@]} -eq 0 ] && targets=(codec config rspamd clamd)
    for t in "${targets[@]}"; do python3 -m fuzz --engine atheris --seconds "$seconds" "$t"; done
else
    exec python3 -m fuzz --seconds "$seconds" "$@"
fi
