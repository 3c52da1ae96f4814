#!/usr/bin/env python3
"""Side-by-side table of one bench.sh run: gateway-*.json against each peer's
(node-*.json, socketioxide-*.json), with the gateway's advantage over each."""
import json
import sys
from pathlib import Path

out = Path(sys.argv[1])
PEERS = [p for p in ("node", "socketioxide") if any(out.glob(f"{p}-*.json"))]


def load(side, name):
    path = out / f"{side}-{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def server_cpu(result, key="servers"):
    # The first entries are the gateway (or peer) processes; Redis is reported last.
    servers = result.get(key, [])
    if not servers:
        return 0.0, 0.0
    return sum((s.get("cpu_seconds") or 0.0) for s in servers[:-1]), (servers[-1].get("cpu_seconds") or 0.0)


rows = []


def fmt_value(value, fmt):
    return "n/a" if value is None else fmt.format(value)


def row(metric, values, better="higher", fmt="{:,.0f}"):
    """values: {side: number or None}; the ratios are the gateway's advantage over each peer."""
    ours = values.get("gateway")
    cells = [fmt_value(values.get(side), fmt) for side in ["gateway", *PEERS]]
    ratios = []
    for peer in PEERS:
        theirs = values.get(peer)
        if ours is None or theirs is None:
            ratios.append("")
        elif better == "higher":
            ratios.append(f"{ours / theirs:.2f}x" if theirs else "inf")
        else:
            ratios.append(f"{theirs / ours:.2f}x" if ours else "inf")
    rows.append([metric, *cells, *ratios])


def sides(name):
    return {side: load(side, name) for side in ["gateway", *PEERS]}


for name in ("fanout-typing", "fanout-message"):
    results = {s: r for s, r in sides(name).items() if r}
    if "gateway" not in results:
        continue
    for r in results.values():
        cpu, redis_cpu = server_cpu(r)
        r["_cpu"], r["_redis_cpu"] = cpu, redis_cpu
        r["_per_cpu"] = r["deliveries"] / cpu if cpu else None
        # From the first send to the end of the settling: the deliveries' own cost, without
        # connecting and joining the members (the connect scenario's work).
        phase_cpu, _ = server_cpu(r, "delivery_phase_servers")
        r["_phase_cpu"] = phase_cpu or None
        r["_phase_per_cpu"] = r["deliveries"] / phase_cpu if phase_cpu else None
    pick = lambda key: {s: r.get(key) for s, r in results.items()}
    row(f"{name}: deliveries/s", pick("deliveries_per_second"))
    row(f"{name}: deliveries per server CPU-second, delivery phase", pick("_phase_per_cpu"))
    row(f"{name}: deliveries per server CPU-second, whole run (with connecting)", pick("_per_cpu"))
    row(f"{name}: server CPU seconds (2 processes), delivery phase", pick("_phase_cpu"), "lower", "{:.2f}")
    row(f"{name}: server CPU seconds (2 processes), whole run", pick("_cpu"), "lower", "{:.2f}")
    row(f"{name}: Redis CPU seconds, whole run", pick("_redis_cpu"), "lower", "{:.2f}")
    row(f"{name}: lost", pick("lost"), "lower")
    row(f"{name}: duplicates", pick("duplicates"), "lower")

for name in ("latency-typing", "latency-message", "latency-message-embedded"):
    results = {s: r for s, r in sides(name).items() if r}
    if "gateway" not in results:
        continue
    for q in ("p50", "p99", "p99_9", "max"):
        row(f"{name}: {q} ms", {s: r["latency_ms"][q] for s, r in results.items()}, "lower", "{:.2f}")
    row(f"{name}: received of sent", {s: r["received"] / max(r["sent"], 1) * 100 for s, r in results.items()}, "higher", "{:.1f}%")

results = {s: r for s, r in sides("connect").items() if r}
if "gateway" in results:
    row("connect: seconds to all joined", {s: r["seconds_to_all_joined"] for s, r in results.items()}, "lower", "{:.2f}")
    row("connect: failed", {s: r["failed"] for s, r in results.items()}, "lower")

for name, label in (("idle", "idle (after the other scenarios)"), ("idle-fresh-5000", "idle, fresh process, 5,000"), ("idle-fresh-15000", "idle, fresh process, 15,000")):
    results = {s: r for s, r in sides(name).items() if r}
    if "gateway" in results:
        row(f"{label}: connections held", {s: r["connected"] for s, r in results.items()})
        row(f"{label}: server RSS bytes per connection", {s: r["rss_bytes_per_connection"] for s, r in results.items()}, "lower")

# The slope between the two fresh runs: what one more connection costs, without the fixed
# cost of the process (which the per-connection figure above spreads over the connections).
def rss_after(result):
    total = 0
    for entry in result.get("rss_after", []):
        proc = entry[1] if isinstance(entry, list) else entry
        total += proc.get("rss_bytes", 0)
    return total


small, large = sides("idle-fresh-5000"), sides("idle-fresh-15000")
slopes = {}
for s in ["gateway", *PEERS]:
    a, b = small.get(s), large.get(s)
    if a and b and b["connected"] > a["connected"]:
        slopes[s] = (rss_after(b) - rss_after(a)) / (b["connected"] - a["connected"])
if "gateway" in slopes:
    row("idle, fresh: RSS bytes per connection, slope 5,000 → 15,000", slopes, "lower")

p = load("gateway", "persist")
if p:
    rows.append(["persist: store alone, messages/s (batches of 500)", f"{p['store_alone_messages_per_second']:,.0f}", *["n/a"] * len(PEERS), *[""] * len(PEERS)])
    rows.append(["persist: through gateway, stream and persister, messages/s", f"{p['pipeline_messages_per_second']:,.0f}", *["n/a"] * len(PEERS), f"{p['ratio'] * 100:.0f}% of the store", *[""] * (len(PEERS) - 1)])

# The servers' own histograms: means, and p99 as the bound of the first bucket holding 99%.
for scenario in ("latency-message", "fanout-message", "latency-message-embedded"):
    g = load("gateway", scenario)
    if g and g.get("server_breakdown"):
        rows.append([f"{scenario}: server-side means and p99 bounds (ms)", ", ".join(f"{k} {v:.2f}" for k, v in sorted(g["server_breakdown"].items())), *[""] * (2 * len(PEERS))])

print((out / "machine.txt").read_text().strip() if (out / "machine.txt").exists() else "")
print()
header = ["metric", "gateway", *[f"{p} peer" for p in PEERS], *[f"vs {p}" for p in PEERS]]
print("| " + " | ".join(header) + " |")
print("|---|" + "---:|" * (len(header) - 1))
for r in rows:
    print("| " + " | ".join(str(c) for c in r) + " |")
print()
print("`message` on the gateway goes through the Redis ingest stream, the persister and MongoDB;")
print("the peers broadcast it without storing it.")
