#!/usr/bin/env bash
# Runs the soak test (tests/reliability_soak.rs): a mixed workload through the full layer
# stack over Redis and PostgreSQL, asserting zero errors and RSS growth after warm-up
# under 10%, and printing ops/s and RSS per backend. Release build: the figures of a
# debug build say little.
#
#   scripts/soak.sh                          # 60 s per backend at concurrency 64
#   AIECS_SOAK_SECS=20 scripts/soak.sh       # shorter
#   AIECS_SOAK_BACKENDS=redis scripts/soak.sh
#
# Settings: AIECS_SOAK_SECS (default 60), AIECS_SOAK_CONCURRENCY (64),
# AIECS_SOAK_WARMUP_SECS (10), AIECS_SOAK_BACKENDS (redis,postgres). The servers come
# from AIECS_TEST_REDIS_URL and AIECS_TEST_POSTGRES_URL, defaulting to the local ones
# below. Extra arguments go to cargo test. The soak removes everything it writes.
set -euo pipefail

cd "$(dirname "$0")/.."

export AIECS_TEST_REDIS_URL=${AIECS_TEST_REDIS_URL:-redis://127.0.0.1:6379}
export AIECS_TEST_POSTGRES_URL=${AIECS_TEST_POSTGRES_URL:-postgres://postgres@127.0.0.1:5432/test}
export AIECS_SOAK_SECS=${AIECS_SOAK_SECS:-60}
export AIECS_SOAK_CONCURRENCY=${AIECS_SOAK_CONCURRENCY:-64}

echo "soak: ${AIECS_SOAK_SECS} s per backend at concurrency ${AIECS_SOAK_CONCURRENCY}" \
  "(${AIECS_SOAK_BACKENDS:-redis,postgres}); redis=${AIECS_TEST_REDIS_URL}" \
  "postgres=${AIECS_TEST_POSTGRES_URL}"

# One test, run alone so the RSS it reads is its own.
exec cargo test --release --all-features --test reliability_soak "$@" -- \
  --ignored --nocapture --test-threads=1
