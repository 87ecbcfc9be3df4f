#!/usr/bin/env bash
# Starts or stops a Redis Cluster on loopback for the test suites.
#
#   scripts/redis-cluster.sh start            # 3 masters; prints the URL on its last line
#   scripts/redis-cluster.sh start replicas   # 3 masters and 3 replicas, for failover tests
#   scripts/redis-cluster.sh stop [replicas]
#   scripts/redis-cluster.sh node-start PORT replicas   # a node a test killed rejoins
#   scripts/redis-cluster.sh wait [replicas]   # until the cluster is ok, replicas in sync
#
# Ports default to 7101-7103, or 7201-7206 with replicas (bus ports +10000); override
# with AIECS_REDIS_CLUSTER_PORTS. Data lives in a temp directory that `stop` removes.
# The replicas cluster fails a node over after 2 s (`cluster-node-timeout 2000`) and
# syncs its append-only file on every write (`appendfsync always`), so what a failover
# loses is only what replication had not carried yet.
set -euo pipefail

if [ "${1:-}" = node-start ]; then mode=${3:-plain}; else mode=${2:-plain}; fi
if [ "$mode" = replicas ]; then
  ports=(${AIECS_REDIS_CLUSTER_PORTS:-7201 7202 7203 7204 7205 7206})
  dir=${AIECS_REDIS_CLUSTER_DIR:-${TMPDIR:-/tmp}/aiecs-redis-cluster-replicas}
  replicas=1
  node_timeout=2000
  persistence=(--appendonly yes --appendfsync always)
else
  ports=(${AIECS_REDIS_CLUSTER_PORTS:-7101 7102 7103})
  dir=${AIECS_REDIS_CLUSTER_DIR:-${TMPDIR:-/tmp}/aiecs-redis-cluster}
  replicas=0
  node_timeout=5000
  persistence=(--appendonly no)
fi

stop() {
  for p in "${ports[@]}"; do
    # A node a fault test left stopped would ignore the shutdown.
    if [ -f "$dir/$p/redis.pid" ]; then kill -CONT "$(cat "$dir/$p/redis.pid")" 2>/dev/null || true; fi
    redis-cli -h 127.0.0.1 -p "$p" shutdown nosave >/dev/null 2>&1 || true
  done
  rm -rf "$dir"
}

wait_for() {
  local what=$1; shift
  for _ in $(seq 1 300); do
    if "$@" >/dev/null 2>&1; then return 0; fi
    sleep 0.1
  done
  echo "redis-cluster.sh: timed out waiting for $what" >&2
  return 1
}

# Starts the node on port $1 in its directory; a node that ran before rejoins the
# cluster it knew (its nodes.conf).
start_node() {
  mkdir -p "$dir/$1"
  redis-server --port "$1" --bind 127.0.0.1 --cluster-enabled yes \
    --cluster-config-file "$dir/$1/nodes.conf" --cluster-node-timeout "$node_timeout" \
    "${persistence[@]}" --save "" --dir "$dir/$1" --daemonize yes \
    --logfile "$dir/$1/redis.log" --pidfile "$dir/$1/redis.pid"
}

# Whether every replica's link to its master is up.
replicas_in_sync() {
  local up=0
  for p in "${ports[@]}"; do
    if redis-cli -h 127.0.0.1 -p "$p" info replication | grep -q 'master_link_status:up'; then
      up=$((up + 1))
    fi
  done
  [ "$up" -eq $(( ${#ports[@]} / 2 )) ]
}

start() {
  stop
  mkdir -p "$dir"
  for p in "${ports[@]}"; do
    start_node "$p"
  done
  for p in "${ports[@]}"; do
    wait_for "redis on port $p" redis-cli -h 127.0.0.1 -p "$p" ping
  done
  local nodes=()
  for p in "${ports[@]}"; do nodes+=("127.0.0.1:$p"); done
  redis-cli --cluster create "${nodes[@]}" --cluster-replicas "$replicas" --cluster-yes >"$dir/create.log" 2>&1 || {
    cat "$dir/create.log" >&2
    return 1
  }
  settle
  local joined
  joined=$(IFS=,; echo "${nodes[*]}")
  echo "redis+cluster://$joined"
}

# Waits until every node reports the cluster ok and every replica is in sync.
settle() {
  for p in "${ports[@]}"; do
    wait_for "cluster state ok on port $p" \
      bash -c "redis-cli -h 127.0.0.1 -p $p cluster info | grep -q 'cluster_state:ok'"
  done
  if [ "$replicas" -gt 0 ]; then
    # Every master has its replica in sync before a test fails one over.
    wait_for "replicas in sync" replicas_in_sync
  fi
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  node-start) start_node "${2:?port}" ;;
  wait) settle ;;
  *) echo "usage: $0 start|stop|wait [replicas] | node-start PORT [replicas]" >&2; exit 2 ;;
esac
