#!/usr/bin/env bash
# Raw-server baselines for the README's Performance section: the rate of each
# operation's main command from redis-benchmark, and pgbench -S, at 32 clients, on this
# machine. Run it just before examples/loadgen so both see the same machine.
#
#   scripts/baselines.sh [redis-host:port] [postgres-url-without-database]
#
# Prints one line per command: `baseline=<name> rps=<requests per second>`.
set -euo pipefail

redis=${1:-127.0.0.1:6379}
pg_host=${PGHOST:-127.0.0.1}
pg_user=${PGUSER:-postgres}
host=${redis%:*}
port=${redis#*:}
n=${N:-200000}
c=${C:-32}

rb() { # name, then redis-benchmark arguments
    local name=$1
    shift
    local rps
    rps=$(redis-benchmark -h "$host" -p "$port" -q -c "$c" -n "$n" "$@" 2>&1 | tr '\r' '\n' |
        grep "requests per second" | tail -1 | sed -E 's/.*: ([0-9.]+) requests per second.*/\1/')
    echo "baseline=$name rps=${rps%.*}"
}

r() { redis-cli -h "$host" -p "$port" "$@" >/dev/null; }

# Keys under bench:baseline: so nothing of the library's is touched.
r del bench:baseline:hash bench:baseline:list
r hset bench:baseline:hash user_id u status active created_at 1 updated_at 1 \
    request_count 0 total_processing_time 0 error_count 0
# A list like a session's history: 200 entries of 215 bytes, the size of a message
# loadgen stores (110 bytes of content, its id, role, timestamp and metadata).
msg=$(printf '{"message_id":"0193a1b2-c3d4-7e5f-a7b8-c9d0e1f2a3b4","role":"user","content":"%s","timestamp":"2026-11-26T11:22:33.123456Z","metadata":{"turn":1}}' "$(head -c 70 /dev/zero | tr '\0' x)")
entries=()
for _ in $(seq 1 200); do entries+=("$msg"); done
r rpush bench:baseline:list "${entries[@]}"
[ "$(redis-cli -h "$host" -p "$port" llen bench:baseline:list)" = 200 ] || {
    echo "could not fill bench:baseline:list" >&2
    exit 1
}
kilo=$(head -c 1024 /dev/zero | tr '\0' x)
for i in $(seq 0 9); do r set "bench:baseline:cp$i" "$kilo"; done

rb hgetall hgetall bench:baseline:hash
rb hincrby hincrby bench:baseline:hash request_count 1
rb hset_7_fields hset bench:baseline:hash user_id u status active created_at 1 updated_at 1 \
    request_count 0 total_processing_time 0 error_count 0
rb rpush -t rpush
rb lrange_100 -t lrange_100
rb lrange_50_of_messages lrange bench:baseline:list -50 -1
rb set_1k -t set -d 1024
rb get_1k -t get -d 1024
rb mget_10_of_1k mget bench:baseline:cp0 bench:baseline:cp1 bench:baseline:cp2 \
    bench:baseline:cp3 bench:baseline:cp4 bench:baseline:cp5 bench:baseline:cp6 \
    bench:baseline:cp7 bench:baseline:cp8 bench:baseline:cp9
r del bench:baseline:hash bench:baseline:list
for i in $(seq 0 9); do r del "bench:baseline:cp$i"; done
r del key:__rand_int__ mylist counter:__rand_int__ myhash

# pgbench -S (select-only, prepared) on its own scale-1 database.
if ! psql -h "$pg_host" -U "$pg_user" -d postgres -Atc \
    "SELECT 1 FROM pg_database WHERE datname = 'aiecs_pgbench'" | grep -q 1; then
    psql -h "$pg_host" -U "$pg_user" -d postgres -qc "CREATE DATABASE aiecs_pgbench"
    pgbench -h "$pg_host" -U "$pg_user" -i -s 1 -q aiecs_pgbench >/dev/null 2>&1
fi
pgb() { # name, then pgbench arguments (they may override -c and -j)
    local name=$1
    shift
    local tps
    tps=$(pgbench -h "$pg_host" -U "$pg_user" -c "$c" -j 2 -M prepared -T "${T:-20}" "$@" \
        aiecs_pgbench 2>&1 | grep -E "^tps" | sed -E 's/tps = ([0-9.]+).*/\1/')
    echo "baseline=$name rps=${tps%.*}"
}
scripts=$(mktemp -d)
trap 'rm -rf "$scripts"' EXIT
# One statement per transaction, like each loadgen call: a keyed update of one row, and
# an insert of one row.
printf '%s\n' '\set aid random(1, 100000)' \
    'UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid = :aid;' >"$scripts/update.sql"
printf '%s\n' '\set aid random(1, 100000)' \
    'INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) VALUES (1, 1, :aid, 1, CURRENT_TIMESTAMP);' \
    >"$scripts/insert.sql"
pgb pgbench_select -S
pgb pgbench_update_one_row -n -f "$scripts/update.sql"
pgb pgbench_insert_one_row -n -f "$scripts/insert.sql"

# The floor under batched appends, in tables leaner than the library's: sessions with
# no index but the key (so touching updated_at is a HOT update), messages with only
# the two indexes the contract needs (the id that makes a retried add idempotent, and
# the order history reads), no foreign key. "bare" inserts messages only; "touch" also
# moves each session's updated_at and inserts only for sessions that exist, as an
# append must. One message per transaction from 32 clients, against 32 per transaction
# (rows per second = tps x 32) from one and from two connections: the most any group
# commit of these rows can gain on this machine.
psql -h "$pg_host" -U "$pg_user" -d aiecs_pgbench -q \
    -c "DROP TABLE IF EXISTS floor_messages, floor_sessions" \
    -c "CREATE TABLE floor_sessions (session_id text COLLATE \"C\" PRIMARY KEY,
        updated_at timestamptz NOT NULL) WITH (fillfactor = 80)" \
    -c "INSERT INTO floor_sessions SELECT 's-' || g, now() FROM generate_series(0, 999) g" \
    -c "CREATE TABLE floor_messages (seq bigint GENERATED ALWAYS AS IDENTITY,
        session_id text COLLATE \"C\" NOT NULL, message_id text COLLATE \"C\" NOT NULL,
        role text NOT NULL, content text NOT NULL, timestamp timestamptz NOT NULL,
        metadata jsonb NOT NULL, PRIMARY KEY (session_id, message_id))" \
    -c "CREATE INDEX ON floor_messages (session_id, seq)"
floor() { # name, number of sessions per transaction, whether to touch them
    local sessions="SELECT 's-' || (:s + g) AS session_id FROM generate_series(0, $(($2 - 1))) g"
    if [ "$3" = touch ]; then
        sessions="UPDATE floor_sessions SET updated_at = now() WHERE session_id IN ($sessions) RETURNING session_id"
    fi
    printf '%s\n' "\\set s random(0, $((1000 - $2)))" \
        "WITH t AS ($sessions) INSERT INTO floor_messages (session_id, message_id, role, content, timestamp, metadata) SELECT session_id, gen_random_uuid()::text, 'user', repeat('x', 110), now(), '{}' FROM t;" \
        >"$scripts/$1.sql"
}
for kind in bare touch; do
    floor "$kind-1" 1 "$kind"
    floor "$kind-32" 32 "$kind"
    pgb "floor_${kind}_1_message_32_clients" -n -f "$scripts/$kind-1.sql"
    pgb "floor_${kind}_32_messages_1_conn" -n -c 1 -j 1 -f "$scripts/$kind-32.sql"
    pgb "floor_${kind}_32_messages_2_conns" -n -c 2 -j 2 -f "$scripts/$kind-32.sql"
done
psql -h "$pg_host" -U "$pg_user" -d aiecs_pgbench -qc "DROP TABLE floor_messages, floor_sessions"
