#!/usr/bin/env bash
# The distributed topology on this machine, without containers: Redis, a MongoDB-protocol
# server, one persister, two gateways and HAProxy (cookie affinity) in front of them, all on
# loopback. Ctrl-C (or SIGTERM) stops everything it started.
#
#   scripts/run-local.sh          → http://localhost:3000 (HAProxy), gateways on 3001 and 3002
#
# Settings (environment): LB_PORT (3000), GATEWAY_PORTS ("3001 3002"), GATEWAY_ADMIN_PORTS
# ("9100 9102"), PERSISTER_ADMIN_PORT (9101), REDIS_PORT (6380), MONGO_PORT (27017), DATA_DIR
# (./data/local), BIN_DIR (binaries to run; default: build them with cargo --release).
# MONGODB_URI (a real MongoDB) replaces SecantusDB; REDIS_URL replaces the local Redis.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

lb_port=${LB_PORT:-3000}
read -r -a gateway_ports <<< "${GATEWAY_PORTS:-3001 3002}"
read -r -a admin_ports <<< "${GATEWAY_ADMIN_PORTS:-9100 9102}"
data=${DATA_DIR:-$root/data/local}

for tool in haproxy $([ -z "${REDIS_URL:-}" ] && echo redis-server); do
  if ! command -v "$tool" >/dev/null 2>&1; then
    echo "$tool is missing: apt-get install $tool" >&2
    exit 1
  fi
done
if [ -z "${MONGODB_URI:-}" ] && [ ! -x .venv/bin/secantusd-py ]; then
  python3 -m venv .venv
  .venv/bin/pip install -q --pre -r tests/python/requirements.txt
fi
if [ -z "${BIN_DIR:-}" ]; then
  # --bin, not -p: features resolved as for the workspace, so other release builds are reused.
  cargo build --release --locked --bin gateway --bin persister
  BIN_DIR=$root/target/release
fi

mkdir -p "$data"
pids=()
cleanup() {
  trap - EXIT INT TERM
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT
trap 'exit 0' INT TERM

wait_port() {
  for _ in $(seq 1 300); do
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    sleep 0.1
  done
  echo "nothing listens on port $1" >&2
  return 1
}

# A port another process holds would let wait_port succeed on that process's listener, and
# the one started here would fail to bind unseen: refuse to start instead.
port_free() {
  if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then
    echo "port $1 is taken by another process: stop it, or set $2 to a free port" >&2
    exit 1
  fi
}
port_free "$lb_port" LB_PORT
for port in "${gateway_ports[@]}"; do port_free "$port" GATEWAY_PORTS; done
for port in "${admin_ports[@]}"; do port_free "$port" GATEWAY_ADMIN_PORTS; done
port_free "${PERSISTER_ADMIN_PORT:-9101}" PERSISTER_ADMIN_PORT

if [ -z "${REDIS_URL:-}" ]; then
  port=${REDIS_PORT:-6380}
  port_free "$port" REDIS_PORT
  mkdir -p "$data/redis"
  redis-server --port "$port" --bind 127.0.0.1 --save "" --appendonly yes --dir "$data/redis" \
    --loglevel warning >/dev/null &
  pids+=($!)
  wait_port "$port"
  export REDIS_URL="redis://127.0.0.1:$port"
fi
if [ -z "${MONGODB_URI:-}" ]; then
  port=${MONGO_PORT:-27017}
  port_free "$port" MONGO_PORT
  mkdir -p "$data/mongo"
  .venv/bin/secantusd-py --host 127.0.0.1 --port "$port" --storage-path "$data/mongo" --log-level WARNING &
  pids+=($!)
  wait_port "$port"
  export MONGODB_URI="mongodb://127.0.0.1:$port"
fi
export JWT_SECRET="${JWT_SECRET:-local-development-secret-change-me}" HOST=127.0.0.1

METRICS_PORT=${PERSISTER_ADMIN_PORT:-9101} "$BIN_DIR/persister" &
pids+=($!)
servers=""
i=0
for port in "${gateway_ports[@]}"; do
  admin=${admin_ports[$i]}
  PORT=$port METRICS_PORT=$admin "$BIN_DIR/gateway" &
  pids+=($!)
  servers+="  server g$i 127.0.0.1:$port check port $admin cookie g$i"$'\n'
  i=$((i + 1))
done
for port in "${gateway_ports[@]}"; do wait_port "$port"; done

# Same balancing as deploy/haproxy.cfg: cookie affinity for HTTP long-polling.
cat > "$data/haproxy.cfg" <<EOF
defaults
  mode http
  option forwardfor
  timeout connect 5s
  timeout client 60s
  timeout server 60s
  timeout tunnel 1h
frontend chat
  bind 127.0.0.1:$lb_port
  default_backend gateways
backend gateways
  balance roundrobin
  cookie CHATSRV insert indirect nocache httponly
  option httpchk GET /readyz
$servers
EOF
haproxy -f "$data/haproxy.cfg" -db &
pids+=($!)
wait_port "$lb_port"
# Every child still running (one that failed at start has exited by now, its reason above).
for pid in "${pids[@]}"; do
  if ! kill -0 "$pid" 2>/dev/null; then
    echo "a process started here (pid $pid) exited; see its message above" >&2
    exit 1
  fi
done
echo "ready: chat on http://localhost:$lb_port (HAProxy, sticky) → gateways on ${gateway_ports[*]}; Ctrl-C stops everything"
wait
