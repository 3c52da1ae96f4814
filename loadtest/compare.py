#!/usr/bin/env python3
"""Side-by-side table of one bench.sh run: gateway-*.json against node-*.json."""
import json
import sys
from pathlib import Path

out = Path(sys.argv[1])


def load(side, name):
    path = out / f"{side}-{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def server_cpu(result):
    # The first entries are the gateway (or Node) processes; Redis is reported last.
    servers = result.get("servers", [])
    return sum((s.get("cpu_seconds") or 0.0) for s in servers[:-1]), (servers[-1].get("cpu_seconds") or 0.0) if servers else 0.0


rows = []


def row(metric, ours, peer, better="higher", fmt="{:,.0f}"):
    if ours is None or peer is None:
        rows.append((metric, "n/a" if ours is None else fmt.format(ours), "n/a" if peer is None else fmt.format(peer), ""))
        return
    if better == "higher":
        ratio = ours / peer if peer else float("inf")
    else:
        ratio = peer / ours if ours else float("inf")
    rows.append((metric, fmt.format(ours), fmt.format(peer), f"{ratio:.1f}x"))


for name in ("fanout-typing", "fanout-message"):
    g, n = load("gateway", name), load("node", name)
    if not g or not n:
        continue
    for label, r in (("gateway", g), ("node", n)):
        cpu, redis_cpu = server_cpu(r)
        r["_cpu"], r["_redis_cpu"] = cpu, redis_cpu
        r["_per_cpu"] = r["deliveries"] / cpu if cpu else None
    row(f"{name}: deliveries/s", g["deliveries_per_second"], n["deliveries_per_second"])
    row(f"{name}: deliveries per server CPU-second", g["_per_cpu"], n["_per_cpu"])
    row(f"{name}: server CPU seconds (2 processes)", g["_cpu"], n["_cpu"], "lower", "{:.2f}")
    row(f"{name}: Redis CPU seconds", g["_redis_cpu"], n["_redis_cpu"], "lower", "{:.2f}")
    row(f"{name}: lost", g["lost"], n["lost"], "lower")
    row(f"{name}: duplicates", g["duplicates"], n["duplicates"], "lower")

for name in ("latency-typing", "latency-message"):
    g, n = load("gateway", name), load("node", name)
    if not g or not n:
        continue
    for q in ("p50", "p99", "p99_9", "max"):
        row(f"{name}: {q} ms", g["latency_ms"][q], n["latency_ms"][q], "lower", "{:.2f}")
    row(f"{name}: received of sent", g["received"] / max(g["sent"], 1) * 100, n["received"] / max(n["sent"], 1) * 100, "higher", "{:.1f}%")

g, n = load("gateway", "connect"), load("node", "connect")
if g and n:
    row("connect: seconds to all joined", g["seconds_to_all_joined"], n["seconds_to_all_joined"], "lower", "{:.2f}")
    row("connect: failed", g["failed"], n["failed"], "lower")

g, n = load("gateway", "idle"), load("node", "idle")
if g and n:
    row("idle: connections held", g["connected"], n["connected"])
    row("idle: server RSS bytes per connection", g["rss_bytes_per_connection"], n["rss_bytes_per_connection"], "lower")

p = load("gateway", "persist")
if p:
    rows.append(("persist: store alone, messages/s (batches of 500)", f"{p['store_alone_messages_per_second']:,.0f}", "n/a", ""))
    rows.append(("persist: through gateway, stream and persister, messages/s", f"{p['pipeline_messages_per_second']:,.0f}", "n/a", f"{p['ratio'] * 100:.0f}% of the store"))

for name in ("latency-message",):
    g = load("gateway", name)
    if g and g.get("server_breakdown"):
        rows.append((f"{name}: gateway-side means (ms)", ", ".join(f"{k} {v:.2f}" for k, v in sorted(g["server_breakdown"].items())), "", ""))

print((out / "machine.txt").read_text().strip() if (out / "machine.txt").exists() else "")
print()
print("| metric | gateway | node peer | gateway advantage |")
print("|---|---:|---:|---:|")
for r in rows:
    print("| " + " | ".join(str(c) for c in r) + " |")
print()
print("`message` on the gateway goes through the Redis ingest stream, the persister and MongoDB;")
print("the Node peer broadcasts it without storing it.")
