#!/usr/bin/env bash
# Measures what one Redis core sustains for the backplane's own commands, for capacity
# planning (docs/SCALING.md): the append script with the arguments a gateway passes (its own
# key checked and set, the backlog checked, the room's counter incremented, XADD), a plain
# XADD, and SPUBLISH of a one-message batch to two subscribed gateways. redis-benchmark counts
# error replies as requests, so the run fails unless every append call appended.
#
#   loadtest/redis-rates.sh [REQUESTS]      (default 200000 per command)
#
# redis-server runs on core $SERVER_CPU (0) with appendonly yes / everysec, redis-benchmark
# on core $LOAD_CPU (1), both on loopback; everything started here is stopped by PID.
set -euo pipefail
cd "$(dirname "$0")/.."
requests=${1:-200000}
SERVER_CPU=${SERVER_CPU:-0}
LOAD_CPU=${LOAD_CPU:-1}
dir=$(mktemp -d)
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$dir"
}
trap cleanup EXIT
taskset -c "$SERVER_CPU" redis-server --port "$port" --bind 127.0.0.1 --save "" \
  --appendonly yes --appendfsync everysec --dir "$dir" --loglevel warning \
  --client-output-buffer-limit 'pubsub 0 0 0' >/dev/null &
pids+=($!)
for _ in $(seq 1 100); do redis-cli -p "$port" ping >/dev/null 2>&1 && break; sleep 0.05; done

# A message as the gateway appends it (about 250 bytes of JSON).
message='{"id":"6560a0000000000000000004","roomId":"6560a0000000000000000002","sender":{"_id":"6560a0000000000000000003","email":"someone@example.com","displayName":"Someone"},"content":"a chat message of a typical length, some fifty characters","createdAt":"2026-11-27T10:00:00.123Z"}'
sha=$(redis-cli -p "$port" SCRIPT LOAD "$(cat shared/src/backplane/scripts/append.lua)")
batch="{\"type\":\"messages\",\"data\":{\"roomId\":\"6560a0000000000000000002\",\"messages\":[$message]}}"

# Two subscribers, as two gateways with members in the room.
for _ in 1 2; do
  redis-cli -p "$port" SSUBSCRIBE '{chat:ingest:3}:room:6560a0000000000000000002' >/dev/null &
  pids+=($!)
done
sleep 0.5

bench() {
  taskset -c "$LOAD_CPU" redis-benchmark -p "$port" -c 50 -P 16 -n "$requests" -q "$@" \
    | tr '\r' '\n' | grep -o '[0-9.]* requests per second' | tail -1
}
# KEYS: the partition's stream, its room counters, the message's own key (random per call:
# two __rand_int__ of 2·10^9 values each, so that no two calls are one message); ARGV: the message,
# the backlog bound, "<id> <millis>", the idempotency TTL, the room, the own key's TTL, the
# content's hash. The room's counter is seeded first, as a gateway does from the store.
room=6560a0000000000000000002
redis-cli -p "$port" HSET '{chat:ingest:3}:seq' "$room" 0 >/dev/null
rate=$(bench -r 2000000000 EVALSHA "$sha" 3 '{chat:ingest:3}:stream' '{chat:ingest:3}:seq' \
  '{chat:ingest:3}:msg:__rand_int__:__rand_int__' "$message" 1000000000 '6560a0000000000000000004 1764237600123' \
  86400 "$room" 120 0123456789abcdef)
appended=$(redis-cli -p "$port" XLEN '{chat:ingest:3}:stream')
numbered=$(redis-cli -p "$port" HGET '{chat:ingest:3}:seq' "$room")
if [ "$appended" != "$requests" ] || [ "$numbered" != "$requests" ]; then
  echo "append script: $requests calls, $appended entries, counter at $numbered: some calls did not append" >&2
  exit 1
fi
echo "append script (EVALSHA append.lua, $appended entries numbered 1..$numbered): $rate"
# The next runs start from an empty server: the entries, counters and own keys go.
redis-cli -p "$port" FLUSHALL >/dev/null
echo "plain XADD: $(bench XADD '{chat:ingest:4}:stream' '*' m "$message")"
rate=$(bench SPUBLISH '{chat:ingest:3}:room:6560a0000000000000000002' "$batch")
# Both subscribers must still be there (a subscriber that falls behind its output buffer is
# disconnected, and the publishes after it reach fewer: the limit is off above, and checked).
subscribers=$(redis-cli -p "$port" PUBSUB SHARDNUMSUB '{chat:ingest:3}:room:6560a0000000000000000002' | tail -1)
[ "$subscribers" = 2 ] || { echo "SPUBLISH: $subscribers subscribers left of 2" >&2; exit 1; }
echo "SPUBLISH to 2 subscribers: $rate"
echo "redis-server $(redis-server --version | awk '{print $3}'), $(nproc) cores: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
