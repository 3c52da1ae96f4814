# Helpers of loadtest/bench.sh, ab.sh, memory.sh and scale.sh: processes pinned to cores and
# stopped by PID, free ports, and this project's topology (Redis, SecantusDB, a persister,
# GATEWAYS gateways, default 2). Sourced from the repository's root; BIN_DIR (default
# target/release) holds the gateway and persister binaries to run, SERVER_CPU, STORE_CPU and
# LOAD_CPU the cores.
BIN_DIR=${BIN_DIR:-target/release}
SERVER_CPU=${SERVER_CPU:-0}
STORE_CPU=${STORE_CPU:-$SERVER_CPU}
LOAD_CPU=${LOAD_CPU:-1}

pids=()
stop_all() {
  # Newest first: gateways and persister before Redis and the database they drain into.
  local i
  for ((i = ${#pids[@]} - 1; i >= 0; i--)); do
    kill "${pids[$i]}" 2>/dev/null || true
    wait "${pids[$i]}" 2>/dev/null || true
  done
  pids=()
}
trap stop_all EXIT INT TERM

# A free port below the kernel's ephemeral range: a port the kernel hands out (bind to 0) may
# be taken meanwhile as the local port of an outgoing connection (seen: a persister's admin
# port, after the 15,000 connections of the idle scenario).
free_port() {
  python3 - <<'PY'
import random, socket
low = int(open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[0])
while True:
    port = random.randrange(10000, low)
    s = socket.socket()
    try:
        s.bind(("127.0.0.1", port))
    except OSError:
        continue
    finally:
        s.close()
    print(port)
    break
PY
}
wait_http() {
  for _ in $(seq 1 600); do
    curl -fsS -o /dev/null "$1" 2>/dev/null && return 0
    sleep 0.1
  done
  echo "no answer from $1" >&2
  return 1
}
on_cpu() { local cpu=$1; shift; taskset -c "$cpu" "$@" & pids+=($!); }
server() { on_cpu "$SERVER_CPU" "$@"; }
load() { taskset -c "$LOAD_CPU" target/release/loadtest "$@"; }

start_redis() {
  redis_port=$(free_port)
  server redis-server --port "$redis_port" --bind 127.0.0.1 --save "" --appendonly no \
    --loglevel warning
  redis_pid=${pids[-1]}
  until redis-cli -p "$redis_port" ping >/dev/null 2>&1; do sleep 0.05; done
}

start_ours() {
  start_redis
  mongo_port=$(free_port)
  on_cpu "$STORE_CPU" .venv/bin/secantusd-py --host 127.0.0.1 --port "$mongo_port" \
    --storage-path :memory: --log-level WARNING
  mongo_pid=${pids[-1]}
  export JWT_SECRET=$SECRET REDIS_URL="redis://127.0.0.1:$redis_port" \
    MONGODB_URI="mongodb://127.0.0.1:$mongo_port" MONGODB_DB=bench LOG_FORMAT=text RUST_LOG=warn
  p_admin=$(free_port)
  METRICS_PORT=$p_admin TOKIO_WORKER_THREADS=1 server "$BIN_DIR/persister"
  persister_pid=${pids[-1]}
  # Bound before the next free port is picked, or a gateway could be handed the same one.
  wait_http "http://127.0.0.1:$p_admin/healthz"
  urls=() metrics=() gw_pids=()
  for _ in $(seq "${GATEWAYS:-2}"); do
    port=$(free_port) admin=$(free_port)
    # Load runs send far above the per-connection rate limit meant for people. One tokio
    # worker per gateway: each has one core here, as each Node process has one thread.
    PORT=$port METRICS_PORT=$admin EVENTS_PER_SECOND=1000000 EVENT_BURST=1000000 MAX_CONNECTIONS_PER_ADDRESS=0 \
      TOKIO_WORKER_THREADS=1 HOST=127.0.0.1 server "$BIN_DIR/gateway"
    gw_pids+=("${pids[-1]}")
    urls+=(--url "http://127.0.0.1:$port")
    metrics+=(--metrics "http://127.0.0.1:$admin")
    wait_http "http://127.0.0.1:$admin/readyz"
  done
  wait_http "http://127.0.0.1:$p_admin/readyz"
  metrics+=(--metrics "http://127.0.0.1:$p_admin")
  persister_metrics=(--metrics "http://127.0.0.1:$p_admin")
  target=(--jwt-secret "$SECRET" --mongodb-uri "$MONGODB_URI" --mongodb-db bench)
  unset JWT_SECRET REDIS_URL MONGODB_URI MONGODB_DB
}

