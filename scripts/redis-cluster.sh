#!/usr/bin/env bash
# Starts or stops a 3-master Redis Cluster on loopback for the test suites.
#
#   scripts/redis-cluster.sh start   # prints the cluster URL on its last line
#   scripts/redis-cluster.sh stop
#
# Ports default to 7101-7103 (bus ports +10000); override with AIECS_REDIS_CLUSTER_PORTS.
# Data lives in a temp directory that `stop` removes; nothing is persisted.
set -euo pipefail

ports=(${AIECS_REDIS_CLUSTER_PORTS:-7101 7102 7103})
dir=${AIECS_REDIS_CLUSTER_DIR:-${TMPDIR:-/tmp}/aiecs-redis-cluster}

stop() {
  for p in "${ports[@]}"; do
    redis-cli -h 127.0.0.1 -p "$p" shutdown nosave >/dev/null 2>&1 || true
  done
  rm -rf "$dir"
}

wait_for() {
  local what=$1; shift
  for _ in $(seq 1 100); do
    if "$@" >/dev/null 2>&1; then return 0; fi
    sleep 0.1
  done
  echo "redis-cluster.sh: timed out waiting for $what" >&2
  return 1
}

start() {
  stop
  mkdir -p "$dir"
  for p in "${ports[@]}"; do
    mkdir -p "$dir/$p"
    redis-server --port "$p" --bind 127.0.0.1 --cluster-enabled yes \
      --cluster-config-file "$dir/$p/nodes.conf" --cluster-node-timeout 5000 \
      --appendonly no --save "" --dir "$dir/$p" --daemonize yes \
      --logfile "$dir/$p/redis.log" --pidfile "$dir/$p/redis.pid"
  done
  for p in "${ports[@]}"; do
    wait_for "redis on port $p" redis-cli -h 127.0.0.1 -p "$p" ping
  done
  local nodes=()
  for p in "${ports[@]}"; do nodes+=("127.0.0.1:$p"); done
  redis-cli --cluster create "${nodes[@]}" --cluster-replicas 0 --cluster-yes >"$dir/create.log" 2>&1 || {
    cat "$dir/create.log" >&2
    return 1
  }
  for p in "${ports[@]}"; do
    wait_for "cluster state ok on port $p" \
      bash -c "redis-cli -h 127.0.0.1 -p $p cluster info | grep -q 'cluster_state:ok'"
  done
  local joined
  joined=$(IFS=,; echo "${nodes[*]}")
  echo "redis+cluster://$joined"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  *) echo "usage: $0 start|stop" >&2; exit 2 ;;
esac
