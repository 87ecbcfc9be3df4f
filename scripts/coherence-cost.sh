#!/usr/bin/env bash
# What following the change feed costs writers (issue 16): the release loadgen over a
# cache, C = 32, with coherence off and on in alternating runs, ROUNDS times per
# backend. Prints per backend and operation the median writes/s of each mode, their
# ratio, and the machine's CPU per write (server and client together: on a machine that
# runs the server too, throughput only shows what the spare cores cannot absorb).
#
#   scripts/coherence-cost.sh ROUNDS [N] [FOLLOWERS]
#
# FOLLOWERS (default 0) more processes follow the feed in the `on` runs, as other
# replicas would. Needs AIECS_TEST_REDIS_URL and AIECS_TEST_POSTGRES_URL (either may be
# unset to leave that backend out). OPS=a,b,... measures other operations (default: the
# five writes, and `read_update_session`, a read and a write of one session per call).
#
# PINNED=1 gives the server CPU 1 and loadgen (with its followers) CPU 0, as if each had
# a host of its own, instead of sharing both cores (Linux, local servers; restored at
# the end). PostgreSQL is measured with its feed off in the `off` runs (a schema whose
# writes log nothing, `change_feed=off`), Redis with no client tracking.
set -euo pipefail
rounds=${1:?usage: scripts/coherence-cost.sh ROUNDS [N] [FOLLOWERS]}
n=${2:-20000}
followers=${3:-0}
bin=${LOADGEN:-target/release/examples/loadgen}
[ -x "$bin" ] || cargo build --release --example loadgen --all-features
ops=${OPS:-create_session,update_session,store_checkpoint,put_writes,store_task_context,read_update_session}
out=$(mktemp)
server_pids() {
    case $1 in
    redis) redis-cli -u "${AIECS_TEST_REDIS_URL}" info server | tr -d '\r' | sed -n 's/^process_id://p' ;;
    postgres) pgrep -u postgres ;;
    esac
}
restore() {
    rm -f "$out"
    if [ "${PINNED:-0}" = 1 ]; then
        for name in redis postgres; do
            for pid in $(server_pids $name 2>/dev/null); do taskset -acp 0-1 "$pid" >/dev/null 2>&1 || true; done
        done
    fi
}
trap restore EXIT
pin=()

urls=()
[ -n "${AIECS_TEST_REDIS_URL:-}" ] && urls+=("redis ${AIECS_TEST_REDIS_URL%/}/?prefix=lgcost:")
[ -n "${AIECS_TEST_POSTGRES_URL:-}" ] && urls+=("postgres ${AIECS_TEST_POSTGRES_URL}?schema=lgcost")
for entry in "${urls[@]}"; do
    name=${entry%% *}
    url=${entry#* }
    if [ "${PINNED:-0}" = 1 ]; then
        for pid in $(server_pids "$name"); do taskset -acp 1 "$pid" >/dev/null; done
        pin=(taskset -c 0)
    fi
    for round in $(seq 1 "$rounds"); do
        for mode in off on; do
            extra=()
            [ "$mode" = on ] && [ "$followers" -gt 0 ] && extra=(--followers "$followers")
            run_url=$url
            [ "$name" = postgres ] && [ "$mode" = off ] && run_url="${url}_off&change_feed=off"
            "${pin[@]}" "$bin" --url "$run_url" --layers cache --ops "$ops" --n "$n" --concurrency 32 \
                --coherence "$mode" "${extra[@]}" 2>/dev/null |
                grep '^op=' | grep -v -e ' errors=' | sed "s/^/backend=$name mode=$mode round=$round /" >>"$out"
        done
    done
done
python3 - "$out" <<'PY'
import re, statistics, sys
runs = {}
for line in open(sys.argv[1]):
    b = re.search(r"backend=(\S+) mode=(\S+) round=\d+ op=(\S+) .*ops_per_s=(\d+).* cpu_us=([\d.]+)", line)
    if b:
        name, mode, op, rate, cpu = b.groups()
        runs.setdefault((name, op), {}).setdefault(mode, []).append((int(rate), float(cpu)))
print("| backend | operation | off writes/s | on writes/s | on/off | off CPU us/write | on CPU us/write | CPU on/off |")
print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
for (name, op), modes in runs.items():
    off, on = modes.get("off", []), modes.get("on", [])
    if not off or not on:
        continue
    ro, rn = statistics.median(r for r, _ in off), statistics.median(r for r, _ in on)
    co, cn = statistics.median(c for _, c in off), statistics.median(c for _, c in on)
    print(f"| {name} | `{op}` | {ro:,.0f} | {rn:,.0f} | {rn / ro:.2f} | {co:.1f} | {cn:.1f} | {cn / co:.2f} |".replace(",", " "))
PY
