#!/usr/bin/env bash
# Server-side cost of the two ways to report changes, measured with redis-benchmark at 32 clients:
# a write script alone; the same with 2 CLIENT TRACKING BCAST followers; the script plus a PUBLISH with 2 subscribers.
set -euo pipefail
N=${N:-200000}
PORT=${PORT:-6379}
follower() { # $1 = mode
python3 - "$1" "$PORT" <<'PY' &
import socket, sys
mode, port = sys.argv[1], int(sys.argv[2])
s = socket.create_connection(("127.0.0.1", port))
if mode == "track":
    s.sendall(b"HELLO 3\r\nCLIENT TRACKING ON BCAST PREFIX fc:{s:\r\n")
else:
    s.sendall(b"SUBSCRIBE fc:changes\r\n")
n = 0
while True:
    d = s.recv(1 << 20)
    if not d: break
    n += len(d)
PY
}
bench() { # $1 = script
  redis-benchmark -p $PORT -c 32 -n $N -r 100000 -q EVAL "$1" 1 'fc:{s:__rand_int__}:session' 2>/dev/null | tr '\r' '\n' | grep -o '[0-9.]* requests per second' | tail -1
}
PLAIN="redis.call('HSET',KEYS[1],'f','v') return 1"
PUB="redis.call('HSET',KEYS[1],'f','v') redis.call('PUBLISH','fc:changes',KEYS[1]) return 1"
for round in 1 2 3; do
  echo "round $round plain (no follower): $(bench "$PLAIN")"
  follower track; follower track; sleep 0.3
  echo "round $round tracking, 2 followers: $(bench "$PLAIN")"
  kill %1 %2 2>/dev/null; wait 2>/dev/null || true
  follower pub; follower pub; sleep 0.3
  echo "round $round publish, 2 subscribers: $(bench "$PUB")"
  kill %1 %2 2>/dev/null; wait 2>/dev/null || true
done
redis-cli -p $PORT --scan --pattern 'fc:*' | xargs -r -n 1000 redis-cli -p $PORT del >/dev/null
