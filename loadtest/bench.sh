#!/usr/bin/env bash
# Runs the same load scenarios against this project and two peers in one run, and writes a
# side-by-side table with ratios: the Node.js peer (loadtest/peers/node: socket.io 4 +
# @socket.io/redis-adapter), what a Node team would deploy, and the socketioxide peer
# (loadtest/peers/socketioxide: socketioxide + socketioxide-redis), the floor of the
# library this project is built on. The idle scenario also runs on fresh processes at
# IDLE_FRESH_SMALL and IDLE_FRESH_LARGE connections for every side.
#
#   loadtest/bench.sh [OUT_DIR]        (default: target/bench/<timestamp>)
#
# Servers (Redis, SecantusDB, persister, gateways or Node processes) run on core
# $SERVER_CPU (0), the load generator on core $LOAD_CPU (1), with taskset. All traffic is
# on loopback and every process started here is stopped by PID at the end.
#
# ONLY=persist runs just the persist scenario (this project only). ONLY="fanout-typing …"
# (scenario names, as in the result files) runs just those, for every side.
# STORE_CPU (default: SERVER_CPU) moves SecantusDB to another core, to see the gateway's own
# part of a `message` without the test store taking the servers' core. The `message` latency
# also runs against one gateway in the embedded mode (SQLite, nothing else), scenario
# latency-message-embedded.
# Scale with env vars: FANOUT_SECONDS (10), MESSAGE_RATE (1000 messages/s in the `message`
# fan-out), LATENCY_RATE (1000), LATENCY_SECONDS (10),
# CONNECT_CLIENTS (10000), PERSIST_MESSAGES (20000), IDLE_CLIENTS (15000; one process may hold at most `ulimit -n`
# sockets, so keep it under that).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
out=${1:-target/bench/$(date -u +%Y%m%dT%H%M%SZ)}
mkdir -p "$out"
out=$(cd "$out" && pwd)

FANOUT_SECONDS=${FANOUT_SECONDS:-10}
LATENCY_RATE=${LATENCY_RATE:-1000}
LATENCY_SECONDS=${LATENCY_SECONDS:-10}
CONNECT_CLIENTS=${CONNECT_CLIENTS:-10000}
MESSAGE_RATE=${MESSAGE_RATE:-1000}
PERSIST_MESSAGES=${PERSIST_MESSAGES:-20000}
IDLE_CLIENTS=${IDLE_CLIENTS:-15000}
IDLE_FRESH_SMALL=${IDLE_FRESH_SMALL:-5000}
IDLE_FRESH_LARGE=${IDLE_FRESH_LARGE:-15000}
SECRET="bench-secret-$(python3 -c 'import secrets; print(secrets.token_hex(16))')"

echo "==> building (release)"
cargo build --release --locked --bin gateway --bin persister --bin loadtest
(cd loadtest/peers/socketioxide && cargo build --release --locked)
if [ ! -x .venv/bin/secantusd-py ]; then
  python3 -m venv .venv
  .venv/bin/pip install -q --disable-pip-version-check --pre -r tests/python/requirements.txt
fi
if ! cmp -s loadtest/peers/node/package-lock.json loadtest/peers/node/node_modules/.installed-lock 2>/dev/null; then
  (cd loadtest/peers/node && npm ci --no-audit --no-fund --loglevel=error && cp package-lock.json node_modules/.installed-lock)
fi

# shellcheck source=loadtest/lib.sh
source loadtest/lib.sh

start_peer() {
  start_redis
  urls=() metrics=() gw_pids=()
  for _ in 1 2; do
    port=$(free_port)
    PORT=$port JWT_SECRET=$SECRET REDIS_URL="redis://127.0.0.1:$redis_port" \
      server node loadtest/peers/node/server.mjs
    gw_pids+=("${pids[-1]}")
    urls+=(--url "http://127.0.0.1:$port")
    wait_http "http://127.0.0.1:$port/healthz"
  done
  target=(--jwt-secret "$SECRET" --mint-only)
}

start_socketioxide() {
  start_redis
  urls=() metrics=() gw_pids=()
  for _ in 1 2; do
    port=$(free_port)
    # One worker thread, as each gateway and each Node process has here.
    PORT=$port JWT_SECRET=$SECRET REDIS_URL="redis://127.0.0.1:$redis_port" TOKIO_WORKER_THREADS=1 \
      server loadtest/peers/socketioxide/target/release/socketioxide-peer
    gw_pids+=("${pids[-1]}")
    urls+=(--url "http://127.0.0.1:$port")
    wait_http "http://127.0.0.1:$port/healthz"
  done
  target=(--jwt-secret "$SECRET" --mint-only)
}

# Idle connections on fresh processes of one side, at two sizes: the slope between them is
# what one more connection costs, without the process's fixed cost.
fresh_idle() { # start function
  local clients
  for clients in "$IDLE_FRESH_SMALL" "$IDLE_FRESH_LARGE"; do
    done_already "idle-fresh-$clients" && continue
    "$1"
    echo "==> $side: idle on a fresh process, $clients"
    load "${urls[@]:0:2}" "${target[@]}" --pid "${gw_pids[0]}" --source 127.0.0.2,127.0.0.3 \
      --json "$out/$side-idle-fresh-$clients.json" idle --clients "$clients" >/dev/null
    stop_all
  done
}

# RESUME=1 skips the scenarios whose results are already in OUT_DIR (a run cut short), and
# ONLY skips those it does not name.
done_already() {
  if [ -n "${ONLY:-}" ] && [[ " $ONLY " != *" $1 "* ]]; then return 0; fi
  [ -n "${RESUME:-}" ] && [ -f "$out/$side-$1.json" ]
}

run() { # name, then loadtest arguments
  local name=$1
  shift
  done_already "$name" && return 0
  local pidargs=()
  for p in "${gw_pids[@]}"; do pidargs+=(--pid "$p"); done
  echo "==> $side: $name"
  load "${urls[@]}" "${metrics[@]}" "${target[@]}" "${pidargs[@]}" --pid "$redis_pid" \
    --json "$out/$side-$name.json" "$@" >/dev/null
}

scenarios() {
  run latency-typing latency --rooms 50 --rate "$LATENCY_RATE" --duration "$LATENCY_SECONDS" \
    --event typing --plot "$out/$side-latency-typing.svg"
  run latency-message latency --rooms 50 --rate "$LATENCY_RATE" --duration "$LATENCY_SECONDS" \
    --event message --plot "$out/$side-latency-message.svg"
  # typing: as fast as acks allow (no store on either side). message: at a fixed rate the
  # store keeps up with, so that every message is stored and delivered within the run.
  run fanout-typing fanout --rooms 20 --members 100 --duration "$FANOUT_SECONDS" --event typing
  run fanout-message fanout --rooms 20 --members 100 --duration "$FANOUT_SECONDS" --event message \
    --rate "$MESSAGE_RATE"
  # The gateways' own view after the fan-out bursts (the pub/sub backlog high-water mark is
  # what REDIS_PUBSUB_CAPACITY must hold).
  local i=0 m
  for m in "${metrics[@]}"; do
    [ "$m" = --metrics ] && continue
    i=$((i + 1))
    curl -fsS "$m/metrics" > "$out/$side-metrics-after-fanout-$i.txt" || true
  done
  run connect connect --clients "$CONNECT_CLIENTS" --rooms 100
  # Idle connections all on the first server, so its RSS growth is per connection.
  local first=("${urls[@]:0:2}")
  local pidargs=(--pid "${gw_pids[0]}")
  done_already idle && return 0
  echo "==> $side: idle"
  load "${first[@]}" "${target[@]}" "${pidargs[@]}" --source 127.0.0.2,127.0.0.3 \
    --json "$out/$side-idle.json" idle --clients "$IDLE_CLIENTS" >/dev/null
}

{
  echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
  echo "kernel: $(uname -r)"
  echo "date: $(date -u +%Y-%m-%dT%H:%MZ)"
  echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  echo "node: $(node --version)"
} > "$out/machine.txt"

side=gateway
start_ours
scenarios
# The persister against the store's own batched insert rate (the peer stores nothing), with
# the persister's metrics and pid only, so that the CPU and memory reported are its own.
if ! done_already persist; then
  echo "==> $side: persist"
  load "${urls[@]}" "${persister_metrics[@]}" "${target[@]}" --pid "$persister_pid" \
    --json "$out/$side-persist.json" persist --messages "$PERSIST_MESSAGES" >/dev/null
fi
stop_all

# The embedded mode: one gateway process with its SQLite store and in-process backplane, the
# clients registered through REST (no shared secret or database to prepare them with).
if ! done_already latency-message-embedded; then
  echo "==> $side: latency-message-embedded"
  data=$(mktemp -d)
  port=$(free_port) admin=$(free_port)
  PORT=$port METRICS_PORT=$admin EVENTS_PER_SECOND=1000000 EVENT_BURST=1000000 MAX_CONNECTIONS_PER_ADDRESS=0 \
    REGISTER_MAX_PER_IP=1000000 TOKIO_WORKER_THREADS=1 HOST=127.0.0.1 DATA_DIR=$data \
    LOG_FORMAT=text RUST_LOG=warn server target/release/gateway --embedded
  embedded_pid=${pids[-1]}
  wait_http "http://127.0.0.1:$admin/readyz"
  load --url "http://127.0.0.1:$port" --metrics "http://127.0.0.1:$admin" --pid "$embedded_pid" \
    --json "$out/$side-latency-message-embedded.json" latency --rooms 50 --rate "$LATENCY_RATE" \
    --duration "$LATENCY_SECONDS" --event message \
    --plot "$out/$side-latency-message-embedded.svg" >/dev/null
  stop_all
  rm -rf "$data"
fi
if [ "${ONLY:-}" = persist ]; then
  echo "results in $out"
  exit 0
fi

side=gateway
fresh_idle start_ours

side=node
start_peer
scenarios
stop_all
fresh_idle start_peer

side=socketioxide
start_socketioxide
scenarios
stop_all
fresh_idle start_socketioxide

python3 loadtest/compare.py "$out" | tee "$out/summary.md"
echo "results in $out"
