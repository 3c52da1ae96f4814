#!/usr/bin/env bash
# Many connections on one machine, as production holds them: GATEWAYS gateway processes
# (default 6) behind one address range, one Redis, SecantusDB and a persister, and the
# loadtest's `scale` scenario holding CONNECTIONS (default 100,000) authenticated
# connections in ROOMS rooms (default 1,000) from PARTS child processes (default 8, each
# from its own 127.0.0.x). Then ROUNDS rounds (default 3) of one `message` per room, which
# every member must get once, and TYPING_ROUNDS (default 3) of one `typing` per room (the
# fan-out without the store): lost, duplicates and disorder are counted per connection.
#
#   loadtest/scale.sh OUT_DIR
#
# Reports the connect time, each gateway's RSS growth per connection, the kernel's TCP
# sockets and memory (/proc/net/sockstat), and each round's delivery rate and latency
# (OUT_DIR/scale.json). Every process runs on both cores. One process may open at most
# `ulimit -Hn` files (20,000 here): CONNECTIONS / GATEWAYS and CONNECTIONS / PARTS must stay
# below it.
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 1 ] || { sed -n 2,16p "$0" >&2; exit 2; }
out=$1
mkdir -p "$out"
out=$(cd "$out" && pwd)
CONNECTIONS=${CONNECTIONS:-100000} ROOMS=${ROOMS:-1000} PARTS=${PARTS:-8} ROUNDS=${ROUNDS:-3}
TYPING_ROUNDS=${TYPING_ROUNDS:-3}
export GATEWAYS=${GATEWAYS:-6} SERVER_CPU=${SERVER_CPU:-0,1} LOAD_CPU=${LOAD_CPU:-0,1}
ulimit -n "$(ulimit -Hn)"
for per in $((CONNECTIONS / GATEWAYS)) $((CONNECTIONS / PARTS)); do
  if [ "$per" -ge "$(ulimit -n)" ]; then
    echo "$per connections in one process: more than its $(ulimit -n) open files" >&2
    exit 2
  fi
done
SECRET="scale-secret-$(python3 -c 'import secrets; print(secrets.token_hex(16))')"
for binary in gateway persister loadtest; do
  [ -x "target/release/$binary" ] || cargo build --release --locked --workspace --bins
done
# shellcheck source=loadtest/lib.sh
source loadtest/lib.sh

start_ours
pid_args=()
for pid in "${gw_pids[@]}"; do pid_args+=(--pid "$pid"); done
# Exit status 1 when anything was lost, duplicated, out of order or unexpected, or a connect
# failed: the summary is printed first.
status=0
load "${urls[@]}" "${target[@]}" "${pid_args[@]}" "${persister_metrics[@]}" \
  --json "$out/scale.json" scale --connections "$CONNECTIONS" --rooms "$ROOMS" \
  --parts "$PARTS" --rounds "$ROUNDS" --typing-rounds "$TYPING_ROUNDS" --dir "$out" >/dev/null \
  || status=$?
stop_all
[ -f "$out/scale.json" ] || exit "$status"
python3 - "$out/scale.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
print(f"{r['connected']} of {r['connections']} connected ({r['failed']} failed) over "
      f"{r['gateways']} gateways in {r['connect_seconds']:.1f} s ({r['connects_per_second']:.0f}/s)")
for g in r["gateways_rss"]:
    print(f"  gateway {g['pid']}: RSS {g['rss_before_bytes'] / 1e6:.1f} -> {g['rss_bytes'] / 1e6:.1f} MB")
print(f"gateways' RSS growth: {r['rss_bytes_per_connection']:.0f} B per connection when connected, "
      f"{r['rss_bytes_per_connection_after_rounds']:.0f} B after the rounds")
k0, k1 = r["kernel_tcp_before"], r["kernel_tcp_after"]
print(f"kernel TCP: {k1['inuse'] - k0['inuse']} more sockets in use, "
      f"{(k1['mem_bytes'] - k0['mem_bytes']) / 1e6:.1f} MB more socket memory")
for x in r["rounds"]:
    print(f"round {x['round']} ({x['event']}): {x['delivered']} of {x['expected']} delivered, {x['lost']} lost, "
          f"{x['duplicates']} duplicates in {x['seconds']:.2f} s ({x['deliveries_per_second']:.0f}/s), "
          f"p50 {x['latency_ms']['p50']:.1f} ms, p99 {x['latency_ms']['p99']:.1f} ms; "
          f"gateways' CPU {x['gateways_cpu_seconds']:.2f} s")
print(f"in all: {r['lost']} lost, {r['duplicates']} duplicates, {r['out_of_order']} out of order, "
      f"{r['unexpected']} unexpected; "
      f"message p99 {r['latency_ms']['p99']:.1f} ms, typing p99 {r['typing_latency_ms']['p99']:.1f} ms")
PY
echo "results in $out/scale.json"
exit "$status"
