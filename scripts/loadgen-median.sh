#!/usr/bin/env bash
# Runs the release loadgen RUNS times with the given arguments and prints, per
# operation, the run with the median ops/s (its whole line) and the spread over the
# runs, then one line on the correctness checks of all runs. On a small shared VM one
# run's figure can move 30% from the next; the README's tables are medians of this
# script.
#
#   scripts/loadgen-median.sh RUNS --url URL [other loadgen arguments]
#
# Last line: `checks runs=<RUNS> failed=<n>`; a failed check, an operation with errors
# or a failed cleanup (loadgen's exit status) counts, and its lines are printed above.
set -euo pipefail
runs=$1
shift
bin=${LOADGEN:-target/release/examples/loadgen}
[ -x "$bin" ] || cargo build --release --example loadgen --all-features
out=$(mktemp)
trap 'rm -f "$out"' EXIT
failed=0
for _ in $(seq 1 "$runs"); do
    status=0
    run=$("$bin" "$@" 2>/dev/null) || status=$?
    grep '^op=' <<<"$run" | grep -v -e ' batch calls=' -e ' errors=' >>"$out" || true
    if [ "$status" -ne 0 ]; then
        failed=$((failed + 1))
        echo "failed run (exit $status):"
        grep -e ' errors=' -e '^check=' -e '^cleanup' <<<"$run" || true
    fi
done
python3 - "$out" <<'PY'
import re, sys
by_op = {}
for line in open(sys.argv[1]):
    m = re.search(r"op=(\S+) .*ops_per_s=(\d+)", line)
    if m:
        by_op.setdefault(m.group(1), []).append((int(m.group(2)), line.strip()))
for op, runs in by_op.items():
    runs.sort()
    rate, line = runs[len(runs) // 2]
    print(f"{line} runs={len(runs)} min={runs[0][0]} max={runs[-1][0]}")
PY
echo "checks runs=$runs failed=$failed"
