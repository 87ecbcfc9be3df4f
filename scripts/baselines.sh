#!/usr/bin/env bash
# Raw-server baselines for the README's Performance section: the rate of each
# operation's main command from redis-benchmark, and pgbench -S, at 32 clients, on this
# machine. Run it just before examples/loadgen so both see the same machine.
#
#   scripts/baselines.sh [redis-host:port] [postgres-url-without-database]
#   REDIS_CLUSTER=127.0.0.1:7101 scripts/baselines.sh   # also a cluster's, as cluster_<name>
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

# A list like a session's history: 200 entries of 215 bytes, the size of a message
# loadgen stores (110 bytes of content, its id, role, timestamp and metadata).
msg=$(printf '{"message_id":"0193a1b2-c3d4-7e5f-a7b8-c9d0e1f2a3b4","role":"user","content":"%s","timestamp":"2026-11-26T11:22:33.123456Z","metadata":{"turn":1}}' "$(head -c 70 /dev/zero | tr '\0' x)")
entries=()
for _ in $(seq 1 200); do entries+=("$msg"); done
kilo=$(head -c 1024 /dev/zero | tr '\0' x)
session=(user_id u status active created_at 1 updated_at 1 request_count 0
    total_processing_time 0 error_count 0)

# Each operation's main command on one Redis server, or on every master of a cluster
# (redis-benchmark --cluster spreads the clients over the masters and puts each one's
# keys in that master's slots through the {tag} in their names). Keys are under bench:
# so nothing of the library's is touched.
#   redis_baselines HOST PORT NAME-PREFIX [--cluster]
redis_baselines() {
    local host=$1 port=$2 prefix=$3 mode=${4:-}
    local cli=(redis-cli -h "$host" -p "$port") bench=(redis-benchmark -h "$host" -p "$port")
    local k=bench:baseline tags=(baseline) tag
    if [ "$mode" = --cluster ]; then
        cli+=(-c)
        bench+=(--cluster)
        k='bench:{tag}'
        # One hash per master, through redis-benchmark, tells the tags it uses.
        local masters
        masters=$("${cli[@]}" cluster nodes | grep -c master)
        "${bench[@]}" -q -c "$masters" -n "$masters" hset "$k:hash" "${session[@]}" >/dev/null 2>&1
        mapfile -t tags < <(redis-cli --cluster call "$host:$port" KEYS 'bench:*:hash' 2>/dev/null |
            sed -nE 's/^[^ ]+: bench:(.*):hash$/\1/p')
        [ "${#tags[@]}" = "$masters" ] || {
            echo "could not find one tag per master (${#tags[@]} of $masters)" >&2
            exit 1
        }
    fi
    rb() { # name, then redis-benchmark arguments
        local name=$1
        shift
        local rps
        rps=$("${bench[@]}" -q -c "$c" -n "$n" "$@" 2>&1 | tr '\r' '\n' |
            grep "requests per second" | tail -1 | sed -E 's/.*: ([0-9.]+) requests per second.*/\1/')
        echo "baseline=$prefix$name rps=${rps%.*}"
    }
    local cps=()
    for i in $(seq 0 9); do cps+=("$k:cp$i"); done
    for tag in "${tags[@]}"; do
        local b="bench:$tag"
        "${cli[@]}" del "$b:list" >/dev/null
        "${cli[@]}" hset "$b:hash" "${session[@]}" >/dev/null
        "${cli[@]}" rpush "$b:list" "${entries[@]}" >/dev/null
        [ "$("${cli[@]}" llen "$b:list")" = 200 ] || {
            echo "could not fill $b:list" >&2
            exit 1
        }
        for i in $(seq 0 9); do "${cli[@]}" set "$b:cp$i" "$kilo" >/dev/null; done
    done

    rb hgetall hgetall "$k:hash"
    rb hincrby hincrby "$k:hash" request_count 1
    rb hset_7_fields hset "$k:hash" "${session[@]}"
    rb rpush -t rpush
    rb lrange_100 -t lrange_100
    rb lrange_50_of_messages lrange "$k:list" -50 -1
    rb set_1k -t set -d 1024
    rb get_1k -t get -d 1024
    rb mget_10_of_1k mget "${cps[@]}"

    for tag in "${tags[@]}"; do
        local b="bench:$tag"
        "${cli[@]}" del "$b:hash" "$b:list" >/dev/null
        for i in $(seq 0 9); do "${cli[@]}" del "$b:cp$i" >/dev/null; done
        # redis-benchmark's own keys: plain names on a node, tagged on a cluster.
        if [ "$mode" = --cluster ]; then
            for key in "key:$tag:__rand_int__" "mylist:$tag" "counter:$tag:__rand_int__" "myhash:$tag"; do
                "${cli[@]}" del "$key" >/dev/null
            done
        else
            "${cli[@]}" del key:__rand_int__ mylist counter:__rand_int__ myhash >/dev/null
        fi
    done
}

redis_baselines "$host" "$port" ""
# The same commands on a Redis Cluster, given as REDIS_CLUSTER=host:port of one master.
if [ -n "${REDIS_CLUSTER:-}" ]; then
    redis_baselines "${REDIS_CLUSTER%:*}" "${REDIS_CLUSTER#*:}" cluster_ --cluster
fi

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
# append must. One message per transaction from 32 clients, against batches (rows per
# second = tps x rows per transaction): 32 from one connection and 16 from each of two
# (32 rows in flight, as many as 32 callers can have), and 32 from each of two (64 in
# flight): the most any group commit of these rows can gain on this machine.
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
    # Two connections touching overlapping sessions in no set order can deadlock (a
    # pgbench client then stops and the figure halves): each client keeps to its half.
    printf '%s\n' "\\set s (:client_id % 2) * 500 + random(0, $((500 - $2)))" \
        "WITH t AS ($sessions) INSERT INTO floor_messages (session_id, message_id, role, content, timestamp, metadata) SELECT session_id, gen_random_uuid()::text, 'user', repeat('x', 110), now(), '{}' FROM t;" \
        >"$scripts/$1.sql"
}
for kind in bare touch; do
    floor "$kind-1" 1 "$kind"
    floor "$kind-16" 16 "$kind"
    floor "$kind-32" 32 "$kind"
    pgb "floor_${kind}_1_message_32_clients" -n -f "$scripts/$kind-1.sql"
    pgb "floor_${kind}_32_messages_1_conn" -n -c 1 -j 1 -f "$scripts/$kind-32.sql"
    pgb "floor_${kind}_16_messages_2_conns" -n -c 2 -j 2 -f "$scripts/$kind-16.sql"
    pgb "floor_${kind}_32_messages_2_conns" -n -c 2 -j 2 -f "$scripts/$kind-32.sql"
done
psql -h "$pg_host" -U "$pg_user" -d aiecs_pgbench -qc "DROP TABLE floor_messages, floor_sessions"
