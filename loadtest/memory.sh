#!/usr/bin/env bash
# Memory per idle connection on fresh processes, every side in one run, alternated round by
# round: this project's gateway (and, given OLD_BIN_DIR, an older build of it), the Node
# peer and the socketioxide peer. For each side and size a fresh server takes N idle
# authenticated connections, each joined to a room of 100, and the loadtest reads the
# server's RSS growth; the kernel's socket memory (/proc/net/sockstat) is read beside it.
#
#   loadtest/memory.sh OUT_DIR [ROUNDS]        (default 1 round)
#
# SIZES (default "5000 10000 15000"): the figure at 10,000 and the slope from the smallest
# to the largest size (what one more connection costs without the fixed cost) are printed
# per side and round, and written to OUT_DIR/memory.json. SIDES (default
# "gateway node socketioxide", plus "old" with OLD_BIN_DIR).
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 1 ] || { sed -n 2,13p "$0" >&2; exit 2; }
out=$1 rounds=${2:-1}
mkdir -p "$out"
out=$(cd "$out" && pwd)
SIZES=${SIZES:-5000 10000 15000}
SIDES=${SIDES:-gateway ${OLD_BIN_DIR:+old }node socketioxide}
SECRET="memory-secret-$(python3 -c 'import secrets; print(secrets.token_hex(16))')"
[ -x target/release/loadtest ] || cargo build --release --locked --bin loadtest
# shellcheck source=loadtest/lib.sh
source loadtest/lib.sh

start_side() {
  case $1 in
    gateway) BIN_DIR=target/release start_ours ;;
    old) BIN_DIR=$OLD_BIN_DIR start_ours ;;
    node)
      start_redis
      port=$(free_port)
      PORT=$port JWT_SECRET=$SECRET REDIS_URL="redis://127.0.0.1:$redis_port" \
        server node loadtest/peers/node/server.mjs
      gw_pids=("${pids[-1]}") urls=(--url "http://127.0.0.1:$port")
      wait_http "http://127.0.0.1:$port/healthz"
      target=(--jwt-secret "$SECRET" --mint-only)
      ;;
    socketioxide)
      start_redis
      port=$(free_port)
      PORT=$port JWT_SECRET=$SECRET REDIS_URL="redis://127.0.0.1:$redis_port" TOKIO_WORKER_THREADS=1 \
        server loadtest/peers/socketioxide/target/release/socketioxide-peer
      gw_pids=("${pids[-1]}") urls=(--url "http://127.0.0.1:$port")
      wait_http "http://127.0.0.1:$port/healthz"
      target=(--jwt-secret "$SECRET" --mint-only)
      ;;
  esac
}

sockstat() { awk '/^TCP:/ { print $NF * 4096 }' /proc/net/sockstat; }

for round in $(seq 1 "$rounds"); do
  for side in $SIDES; do
    for clients in $SIZES; do
      start_side "$side"
      kernel_before=$(sockstat)
      load "${urls[@]:0:2}" "${target[@]}" --pid "${gw_pids[0]}" \
        --source 127.0.0.2,127.0.0.3 --json "$out/$side-$clients-$round.json" \
        idle --clients "$clients" 2>/dev/null >/dev/null
      kernel_after=$(sockstat)
      stop_all
      python3 - "$out/$side-$clients-$round.json" "$kernel_before" "$kernel_after" <<'PY'
import json, sys
path, before, after = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
r = json.load(open(path))
r["kernel_tcp_mem_growth_bytes"] = after - before
json.dump(r, open(path, "w"))
PY
    done
  done
done

python3 - "$out" "$rounds" "$SIDES" "$SIZES" <<'PY'
import json, sys
out, rounds, sides, sizes = sys.argv[1], int(sys.argv[2]), sys.argv[3].split(), [int(s) for s in sys.argv[4].split()]
small, large = min(sizes), max(sizes)
mid = 10000 if 10000 in sizes else sizes[len(sizes) // 2]
table = {}
for side in sides:
    rows = []
    for n in range(1, rounds + 1):
        r = {c: json.load(open(f"{out}/{side}-{c}-{n}.json")) for c in sizes}
        failed = sum(x["failed"] for x in r.values())
        at_mid = r[mid]["rss_bytes_per_connection"]
        slope = (r[large]["rss_growth_bytes"] - r[small]["rss_growth_bytes"]) / (
            r[large]["connected"] - r[small]["connected"])
        kernel = r[mid]["kernel_tcp_mem_growth_bytes"] / r[mid]["connected"]
        rows.append({"round": n, "per_connection_at_%d" % mid: at_mid, "slope": slope,
                     "kernel_tcp_per_connection": kernel, "failed": failed})
        print(f"{side:13} round {n}: {at_mid:8.0f} B/conn at {mid}, slope {slope:8.0f} B/conn "
              f"({small}->{large}); kernel TCP {kernel:6.0f} B/conn (both ends); failed {failed}")
    table[side] = rows
json.dump(table, open(f"{out}/memory.json", "w"), indent=1)
PY
echo "results in $out"
