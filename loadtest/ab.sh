#!/usr/bin/env bash
# One scenario against two builds of the gateway and persister, alternated (A, B, A, B, …),
# each run on fresh processes: what a change costs or saves, measured side by side on the
# same machine at the same time, rather than against figures taken on another day.
#
#   loadtest/ab.sh A_BIN_DIR B_BIN_DIR OUT_DIR RUNS <loadtest scenario and its arguments>
#   loadtest/ab.sh /tmp/old /tmp/new target/ab 3 connect --clients 10000 --rooms 100
#
# Each bin dir holds a `gateway` and a `persister`; the load comes from target/release/loadtest.
# Writes OUT_DIR/<a|b>-<n>.json (the loadtest result, with every server's CPU seconds: the
# two gateways and Redis) and prints one line per run.
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 5 ] || { sed -n 2,11p "$0" >&2; exit 2; }
a=$(cd "$1" && pwd) b=$(cd "$2" && pwd) out=$3 runs=$4
shift 4
mkdir -p "$out"
SECRET="ab-secret-$(python3 -c 'import secrets; print(secrets.token_hex(16))')"
# shellcheck source=loadtest/lib.sh
source loadtest/lib.sh

for n in $(seq 1 "$runs"); do
  for side in a b; do
    if [ "$side" = a ]; then BIN_DIR=$a; else BIN_DIR=$b; fi
    start_ours
    load "${urls[@]}" "${metrics[@]}" "${target[@]}" --pid "${gw_pids[0]}" --pid "${gw_pids[1]}" \
      --pid "$redis_pid" --json "$out/$side-$n.json" "$@" >/dev/null
    stop_all
    python3 - "$out/$side-$n.json" "$side" "$n" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
cpu = [s["cpu_seconds"] for s in r.get("servers", [])]
main = {k: v for k, v in r.items() if isinstance(v, (int, float)) and k != "wall_seconds"}
print(f"{sys.argv[2]} run {sys.argv[3]}: {main} server CPU s (gateways, Redis): {[round(c, 2) for c in cpu]}")
PY
  done
done
