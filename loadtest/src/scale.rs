//! `scale`: more connections than one process may open, held by several child processes
//! (parts) over several gateways, then one `message` per room per round to every one of
//! them, counted per connection (lost, duplicated, out of order) and timed.
//!
//! One process is limited by its open-file limit (20,000 here), so the coordinator seeds the
//! users and rooms, writes them to a file, and starts `--parts` copies of this binary
//! (`scale-part`), each holding the connections `i` with `i % parts == part` from its own
//! source address. It speaks to them over their stdin and stdout, one line per step:
//!
//! | coordinator → part      | part → coordinator         |
//! |-------------------------|----------------------------|
//! |                         | `LOADED` (file read)       |
//! | `CONNECT`               | `READY {json}`             |
//! | `ROUND r` or `TYPING r` | `ARMED` (counting round r) |
//! | `SEND t0`               | `ROUND {json}`             |
//! | `SETTLE s`              | `SETTLED {json}`           |
//! | `QUIT` (or EOF)         |                            |
//!
//! Connection `i` (room `i / members`, member `i % members`) goes to gateway
//! `i % gateways`, so every room has members on every gateway and every delivery crosses
//! Redis. Member 0 of a room sends; every member, the sender too, must get each round's
//! message once. A message carries its round and its send time (the wall clock, shared by
//! every process of the machine), so a part knows the latency of each delivery. Then
//! `typing` rounds: the same fan-out without the persister and the store, each `user_typing`
//! timed from the round's start (the coordinator's clock), which every member but the
//! typing one must get once.

use crate::client::{Incoming, str_field};
use crate::setup::{self, Target, User};
use anyhow::Context;
use hdrhistogram::Histogram;
use serde_json::{Value, json};
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::sync::{Notify, mpsc};

#[derive(clap::Args, Debug)]
pub struct ScaleArgs {
    /// Connections in all, spread over the gateways (`--url`) and the parts.
    #[arg(long, default_value_t = 100_000)]
    connections: usize,
    /// Rooms; each holds `connections / rooms` members.
    #[arg(long, default_value_t = 1000)]
    rooms: usize,
    /// Child processes holding the connections (each below the open-file limit).
    #[arg(long, default_value_t = 8)]
    parts: usize,
    /// Rounds of one message per room (through the persister and the store).
    #[arg(long, default_value_t = 3)]
    rounds: u32,
    /// Then rounds of one `typing` per room: the gateways' fan-out without the store.
    #[arg(long, default_value_t = 3)]
    typing_rounds: u32,
    /// Connects in flight at once, per part.
    #[arg(long, default_value_t = 256)]
    concurrency: usize,
    /// The longest a round may take before what has not arrived counts as lost.
    #[arg(long, default_value_t = 60)]
    round_timeout: u64,
    /// Folder for the users file the parts read.
    #[arg(long, default_value = "target/scale")]
    dir: PathBuf,
}

#[derive(clap::Args, Debug)]
pub struct PartArgs {
    #[arg(long)]
    users: PathBuf,
    #[arg(long)]
    part: usize,
    #[arg(long)]
    parts: usize,
    #[arg(long)]
    concurrency: usize,
    #[arg(long)]
    round_timeout: u64,
}

/// How long the parts listen after the last round before the totals are read.
const SETTLE_SECONDS: u64 = 2;

fn now_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// The kernel's TCP sockets in use and the memory they hold (`/proc/net/sockstat`).
fn sockstat() -> Value {
    let text = std::fs::read_to_string("/proc/net/sockstat").unwrap_or_default();
    let tcp = text
        .lines()
        .find_map(|l| l.strip_prefix("TCP:"))
        .unwrap_or_default();
    let fields: Vec<&str> = tcp.split_whitespace().collect();
    let get = |key: &str| -> u64 {
        fields
            .iter()
            .position(|f| *f == key)
            .and_then(|i| fields.get(i + 1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    json!({ "inuse": get("inuse"), "mem_bytes": get("mem") * 4096 })
}

/// A running part: its stdin and its stdout's lines.
struct Part {
    child: tokio::process::Child,
    stdin: tokio::process::ChildStdin,
    lines: tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
}

impl Part {
    async fn send(&mut self, line: &str) -> anyhow::Result<()> {
        self.stdin.write_all(format!("{line}\n").as_bytes()).await?;
        self.stdin.flush().await?;
        Ok(())
    }

    /// The next line that starts with `tag`, its rest parsed as JSON (`null` if empty).
    async fn expect(&mut self, tag: &str) -> anyhow::Result<Value> {
        let line = self
            .lines
            .next_line()
            .await?
            .with_context(|| format!("a part exited before {tag}"))?;
        let rest = line
            .strip_prefix(tag)
            .with_context(|| format!("expected {tag}, got {line:?}"))?
            .trim();
        Ok(if rest.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(rest)?
        })
    }
}

pub async fn run(target: &Target, pids: &[u32], args: &ScaleArgs) -> anyhow::Result<Value> {
    anyhow::ensure!(
        args.parts > 0 && args.rooms > 0 && args.connections >= 2 * args.rooms,
        "scale needs at least one part and two members per room"
    );
    anyhow::ensure!(
        target.jwt_secret.is_some() && !target.mint_only,
        "scale seeds users and rooms in the gateways' MongoDB: --jwt-secret and --mongodb-uri"
    );
    let members = args.connections / args.rooms;
    let gateways_before = crate::report::procs(pids);
    let kernel_before = sockstat();

    let seeding = Instant::now();
    let groups = setup::rooms(target, args.rooms, members).await?;
    let seed_seconds = seeding.elapsed().as_secs_f64();
    eprintln!(
        "scale: {} rooms of {members} seeded in {seed_seconds:.1} s",
        groups.len()
    );
    std::fs::create_dir_all(&args.dir)?;
    let users = args.dir.join("users.jsonl");
    {
        let mut file = std::io::BufWriter::new(std::fs::File::create(&users)?);
        for (room, users) in &groups {
            let users: Vec<[String; 2]> = users
                .iter()
                .map(|u| [u.id.to_hex(), u.token.clone()])
                .collect();
            writeln!(file, "{}", json!({ "room": room.to_hex(), "users": users }))?;
        }
        file.flush()?;
    }
    drop(groups);

    // Each part from its own source address (127.0.0.2, .3, ... unless given).
    let sources: Vec<std::net::IpAddr> = if target.sources.is_empty() {
        (0..args.parts)
            .map(|k| std::net::IpAddr::from([127, 0, 0, 2 + k as u8]))
            .collect()
    } else {
        target.sources.clone()
    };
    let exe = std::env::current_exe()?;
    let mut parts = Vec::with_capacity(args.parts);
    for k in 0..args.parts {
        let mut command = tokio::process::Command::new(&exe);
        for url in &target.urls {
            command.args(["--url", url]);
        }
        command
            .args(["--source", &sources[k % sources.len()].to_string()])
            .arg("scale-part")
            .args(["--users", &users.display().to_string()])
            .args(["--part", &k.to_string(), "--parts", &args.parts.to_string()])
            .args(["--concurrency", &args.concurrency.to_string()])
            .args(["--round-timeout", &args.round_timeout.to_string()])
            .env_remove("JWT_SECRET")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true);
        let mut child = command.spawn().context("starting a part")?;
        let stdin = child.stdin.take().context("a part's stdin")?;
        let lines = BufReader::new(child.stdout.take().context("a part's stdout")?).lines();
        parts.push(Part {
            child,
            stdin,
            lines,
        });
    }
    for part in &mut parts {
        part.expect("LOADED").await?;
    }

    // Every part connects at once; the connect time ends with the last one's last join.
    let connecting = Instant::now();
    for part in &mut parts {
        part.send("CONNECT").await?;
    }
    let (mut connected, mut failed) = (0u64, 0u64);
    for part in &mut parts {
        let ready = part.expect("READY").await?;
        connected += ready["connected"].as_u64().unwrap_or(0);
        failed += ready["failed"].as_u64().unwrap_or(0);
    }
    let connect_seconds = connecting.elapsed().as_secs_f64();
    eprintln!(
        "scale: {connected} connected and joined, {failed} failed, in {connect_seconds:.1} s"
    );

    // Memory with every connection held.
    let gateways_after = crate::report::procs(pids);
    let kernel_after = sockstat();
    let gateways: Vec<Value> = gateways_after
        .iter()
        .map(|(pid, after)| {
            let before = crate::report::rss_of(&gateways_before, *pid);
            json!({ "pid": pid, "rss_before_bytes": before, "rss_bytes": after.rss_bytes,
                    "growth_bytes": after.rss_bytes as i64 - before as i64 })
        })
        .collect();
    let growth = crate::report::rss_growth(&gateways_before, &gateways_after);
    let per_connection = growth as f64 / connected.max(1) as f64;
    eprintln!(
        "scale: gateways' RSS grew {:.1} MB, {per_connection:.0} B per connection",
        growth as f64 / 1e6
    );

    let mut rounds = Vec::new();
    let (mut duplicates_so_far, mut out_of_order_so_far) = (0u64, 0u64);
    let mut all = Histogram::<u64>::new_with_bounds(1, 600_000_000, 3)?;
    let mut all_typing = Histogram::<u64>::new_with_bounds(1, 600_000_000, 3)?;
    let schedule = (1..=args.rounds)
        .map(|r| ("message", r))
        .chain((1..=args.typing_rounds).map(|r| ("typing", args.rounds + r)));
    for (event, round) in schedule {
        let cpu_before = crate::report::procs(pids);
        // Every part counts for the new round before any sender sends: a `user_typing`
        // carries no round, so one that reached a part still counting the last round would
        // be taken for a duplicate there.
        let command = match event {
            "message" => format!("ROUND {round}"),
            _ => format!("TYPING {round}"),
        };
        for part in &mut parts {
            part.send(&command).await?;
        }
        for part in &mut parts {
            part.expect("ARMED").await?;
        }
        let go = format!("SEND {}", now_micros());
        for part in &mut parts {
            part.send(&go).await?;
        }
        let mut histogram = Histogram::<u64>::new_with_bounds(1, 600_000_000, 3)?;
        let (mut delivered, mut duplicates, mut out_of_order, mut acked) = (0, 0, 0, 0);
        let (mut first_send, mut last_receive, mut expected) = (u64::MAX, 0u64, 0u64);
        for part in &mut parts {
            let r = part.expect("ROUND").await?;
            expected += r["expected"].as_u64().unwrap_or(0);
            delivered += r["delivered"].as_u64().unwrap_or(0);
            duplicates += r["duplicates"].as_u64().unwrap_or(0);
            out_of_order += r["out_of_order"].as_u64().unwrap_or(0);
            acked += r["acked"].as_u64().unwrap_or(0);
            if let Some(t) = r["first_send_us"].as_u64() {
                first_send = first_send.min(t);
            }
            last_receive = last_receive.max(r["last_receive_us"].as_u64().unwrap_or(0));
            for l in r["latencies_us"].as_array().into_iter().flatten() {
                histogram.record(l.as_u64().unwrap_or(0).max(1))?;
            }
        }
        if event == "message" {
            all.add(&histogram)?;
        } else {
            all_typing.add(&histogram)?;
        }
        // The parts report both as totals over the run.
        (duplicates, duplicates_so_far) = (duplicates - duplicates_so_far, duplicates);
        (out_of_order, out_of_order_so_far) = (out_of_order - out_of_order_so_far, out_of_order);
        let seconds = last_receive.saturating_sub(first_send) as f64 / 1e6;
        let cpu: f64 = crate::report::cpu_between(&cpu_before, &crate::report::procs(pids))
            .iter()
            .filter_map(|(_, c)| *c)
            .sum();
        let ms = |q: f64| histogram.value_at_quantile(q) as f64 / 1000.0;
        let lost = expected.saturating_sub(delivered);
        eprintln!(
            "scale: round {round} ({event}): {acked} sent, {delivered} of {expected} delivered ({lost} lost, \
             {duplicates} duplicates, {out_of_order} out of order) in {seconds:.2} s \
             ({:.0}/s); latency p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
            delivered as f64 / seconds.max(1e-6),
            ms(0.5),
            ms(0.99),
            histogram.max() as f64 / 1000.0
        );
        rounds.push(json!({
            "round": round, "event": event, "sent": acked, "expected": expected, "delivered": delivered,
            "lost": lost, "duplicates": duplicates, "out_of_order": out_of_order,
            "seconds": seconds, "deliveries_per_second": delivered as f64 / seconds.max(1e-6),
            "gateways_cpu_seconds": cpu,
            "latency_ms": { "p50": ms(0.5), "p99": ms(0.99), "max": histogram.max() as f64 / 1000.0 },
        }));
    }
    // Memory after the bursts: the sockets' queues and write buffers they grew.
    let gateways_busy = crate::report::procs(pids);
    let busy_growth = crate::report::rss_growth(&gateways_before, &gateways_busy);
    let busy_per_connection = busy_growth as f64 / connected.max(1) as f64;
    eprintln!(
        "scale: after the rounds the gateways' RSS had grown {:.1} MB, {busy_per_connection:.0} B per connection",
        busy_growth as f64 / 1e6
    );
    // Then a quiet while: a duplicate may come late.
    let (mut duplicates, mut out_of_order, mut unexpected) = (0u64, 0u64, 0u64);
    for part in &mut parts {
        part.send(&format!("SETTLE {SETTLE_SECONDS}")).await?;
    }
    for part in &mut parts {
        let settled = part.expect("SETTLED").await?;
        duplicates += settled["duplicates"].as_u64().unwrap_or(0);
        unexpected += settled["unexpected"].as_u64().unwrap_or(0);
        out_of_order += settled["out_of_order"].as_u64().unwrap_or(0);
    }
    for part in &mut parts {
        let _ = part.send("QUIT").await;
    }
    for part in &mut parts {
        let _ = part.child.wait().await;
    }
    let _ = std::fs::remove_file(&users);
    let ms = |q: f64| all.value_at_quantile(q) as f64 / 1000.0;
    let typing_ms = |q: f64| all_typing.value_at_quantile(q) as f64 / 1000.0;
    let lost: u64 = rounds.iter().map(|r| r["lost"].as_u64().unwrap_or(0)).sum();
    eprintln!(
        "scale: over {} rounds {lost} lost, {duplicates} duplicates, {out_of_order} out of order, \
         {unexpected} unexpected; \
         latency p50 {:.1} ms, p99 {:.1} ms",
        rounds.len(),
        ms(0.5),
        ms(0.99)
    );
    Ok(json!({
        "scenario": "scale", "connections": args.connections, "rooms": args.rooms,
        "members": members, "parts": args.parts, "gateways": target.urls.len(),
        "seed_seconds": seed_seconds, "connected": connected, "failed": failed,
        "connect_seconds": connect_seconds, "connects_per_second": connected as f64 / connect_seconds,
        "gateways_rss": gateways, "gateways_rss_growth_bytes": growth,
        "rss_bytes_per_connection": per_connection,
        "rss_after_rounds_bytes": gateways_busy.iter().map(|(pid, p)| json!({ "pid": pid, "rss_bytes": p.rss_bytes })).collect::<Vec<_>>(),
        "rss_bytes_per_connection_after_rounds": busy_per_connection,
        "kernel_tcp_before": kernel_before, "kernel_tcp_after": kernel_after,
        "rounds": rounds, "lost": lost, "duplicates": duplicates, "out_of_order": out_of_order,
        "unexpected": unexpected,
        // Anything here fails the run (exit status 1).
        "violations": lost + duplicates + out_of_order + unexpected + failed,
        "latency_ms": { "p50": ms(0.5), "p99": ms(0.99), "p99_9": ms(0.999), "max": all.max() as f64 / 1000.0 },
        "typing_latency_ms": { "p50": typing_ms(0.5), "p99": typing_ms(0.99), "p99_9": typing_ms(0.999), "max": all_typing.max() as f64 / 1000.0 },
    }))
}

/// What a part's connections saw of the current round.
#[derive(Default)]
struct Tally {
    delivered: AtomicU64,
    duplicates: AtomicU64,
    /// Events of another room, and `user_typing` on the typing user's own socket.
    unexpected: AtomicU64,
    out_of_order: AtomicU64,
    acked: AtomicU64,
    last_receive_us: AtomicU64,
    /// When this part began counting the current round. A `user_typing` carries no time of
    /// its own, and one may arrive before this part has read the round's start (`SEND t0`):
    /// its arrival is kept from this time, and timed from `t0` when the round ends.
    armed_us: AtomicU64,
    latencies_us: Mutex<Vec<u32>>,
    /// Woken on every delivery, so the round ends as soon as the last one arrives.
    changed: Notify,
}

pub async fn part(target: &Target, args: &PartArgs) -> anyhow::Result<()> {
    // Every room, with the members this part holds (global index `i`).
    let text = std::fs::read_to_string(&args.users)?;
    let mut mine: Vec<(usize, shared::ObjectId, User, bool)> = Vec::new();
    let mut index = 0usize;
    for line in text.lines() {
        let room: Value = serde_json::from_str(line)?;
        let id = shared::ObjectId::parse_str(room["room"].as_str().unwrap_or_default())?;
        for (m, user) in room["users"].as_array().into_iter().flatten().enumerate() {
            if index % args.parts == args.part {
                mine.push((
                    index,
                    id,
                    User {
                        id: shared::ObjectId::parse_str(user[0].as_str().unwrap_or_default())?,
                        token: user[1].as_str().unwrap_or_default().to_owned(),
                    },
                    m == 0,
                ));
            }
            index += 1;
        }
    }
    drop(text);
    let mut stdout = tokio::io::stdout();
    let mut commands = BufReader::new(tokio::io::stdin()).lines();
    stdout.write_all(b"LOADED\n").await?;
    stdout.flush().await?;
    anyhow::ensure!(
        commands.next_line().await?.as_deref() == Some("CONNECT"),
        "expected CONNECT"
    );

    let tally = Arc::new(Tally::default());
    let round = Arc::new(AtomicU64::new(0));
    let limit = Arc::new(tokio::sync::Semaphore::new(args.concurrency.max(1)));
    let failed = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(mine.len());
    for (i, room, user, sender) in mine {
        let (target, limit, failed) = (target.clone(), limit.clone(), failed.clone());
        let (tally, round) = (tally.clone(), round.clone());
        tasks.push(tokio::spawn(async move {
            let joined = {
                let _permit = limit.acquire().await.ok()?;
                let (tx, mut rx) = mpsc::unbounded_channel();
                setup::join(&target, i, &user, room, tx, &mut rx)
                    .await
                    .map(|client| (client, rx))
            };
            let (client, mut rx) = match joined {
                Ok(c) => c,
                Err(e) => {
                    if failed.fetch_add(1, Relaxed) < 5 {
                        eprintln!("part client {i}: {e:#}");
                    }
                    return None;
                }
            };
            // This connection's reader: one message per round, in order, and one
            // `user_typing` per typing round (the typing user's own socket gets none). An
            // event of another room, or a `user_typing` on the typing user's own socket, is
            // counted as unexpected, never as a delivery.
            let room_hex = room.to_hex();
            tokio::spawn(async move {
                let (mut last, mut last_typing) = (0u64, 0u64);
                while let Some(incoming) = rx.recv().await {
                    if let Incoming::Event { name, raw } = &incoming
                        && (name == "message" || name == "user_typing")
                        && (str_field(raw, "roomId") != Some(room_hex.as_str())
                            || (sender && name == "user_typing"))
                    {
                        tally.unexpected.fetch_add(1, Relaxed);
                        continue;
                    }
                    match incoming {
                        Incoming::Event { name, .. } if name == "user_typing" => {
                            let now = now_micros();
                            let r = round.load(Relaxed);
                            if r == last_typing {
                                tally.duplicates.fetch_add(1, Relaxed);
                                continue;
                            }
                            last_typing = r;
                            let armed = tally.armed_us.load(Relaxed);
                            if let Ok(mut l) = tally.latencies_us.lock() {
                                l.push(now.saturating_sub(armed).min(u32::MAX as u64) as u32);
                            }
                            tally.last_receive_us.fetch_max(now, Relaxed);
                            tally.delivered.fetch_add(1, Relaxed);
                            tally.changed.notify_one();
                        }
                        Incoming::Event { name, raw } if name == "message" => {
                            let now = now_micros();
                            let mut words = str_field(&raw, "content")
                                .unwrap_or_default()
                                .split(' ')
                                .skip(1)
                                .map(|w| w.parse::<u64>().unwrap_or(0));
                            let (r, sent) = (words.next().unwrap_or(0), words.next().unwrap_or(0));
                            if r <= last {
                                tally.duplicates.fetch_add(1, Relaxed);
                                continue;
                            }
                            if r != last + 1 || r != round.load(Relaxed) {
                                tally.out_of_order.fetch_add(1, Relaxed);
                            }
                            last = r;
                            if let Ok(mut l) = tally.latencies_us.lock() {
                                l.push(now.saturating_sub(sent).min(u32::MAX as u64) as u32);
                            }
                            tally.last_receive_us.fetch_max(now, Relaxed);
                            tally.delivered.fetch_add(1, Relaxed);
                            tally.changed.notify_one();
                        }
                        Incoming::Ack { payload, .. } if payload["ok"] == json!(true) => {
                            tally.acked.fetch_add(1, Relaxed);
                            tally.changed.notify_one();
                        }
                        Incoming::Closed => break,
                        _ => {}
                    }
                }
            });
            Some((client, room, sender))
        }));
    }
    let mut held = Vec::with_capacity(tasks.len());
    for t in tasks {
        if let Some(c) = t.await? {
            held.push(c);
        }
    }
    let ready = json!({
        "connected": held.len(), "failed": failed.load(Relaxed),
        "seconds": started.elapsed().as_secs_f64(),
    });
    stdout
        .write_all(format!("READY {ready}\n").as_bytes())
        .await?;
    stdout.flush().await?;

    while let Some(command) = commands.next_line().await? {
        if let Some(seconds) = command.strip_prefix("SETTLE ") {
            // Whatever comes late (a duplicate above all) still counts.
            tokio::time::sleep(Duration::from_secs(seconds.trim().parse()?)).await;
            let settled = json!({
                "duplicates": tally.duplicates.load(Relaxed),
                "unexpected": tally.unexpected.load(Relaxed),
                "out_of_order": tally.out_of_order.load(Relaxed),
            });
            stdout
                .write_all(format!("SETTLED {settled}\n").as_bytes())
                .await?;
            stdout.flush().await?;
            continue;
        }
        let (typing, r) = if let Some(rest) = command.strip_prefix("TYPING ") {
            (true, rest.trim().parse::<u64>()?)
        } else if let Some(rest) = command.strip_prefix("ROUND ") {
            (false, rest.trim().parse()?)
        } else {
            break;
        };
        // This round's counters start again; duplicates and disorder add up over the run.
        tally.delivered.store(0, Relaxed);
        tally.acked.store(0, Relaxed);
        tally.last_receive_us.store(0, Relaxed);
        if let Ok(mut l) = tally.latencies_us.lock() {
            l.clear();
        }
        tally.armed_us.store(now_micros(), Relaxed);
        round.store(r, Relaxed);
        stdout.write_all(b"ARMED\n").await?;
        stdout.flush().await?;
        let start: u64 = commands
            .next_line()
            .await?
            .as_deref()
            .and_then(|c| c.strip_prefix("SEND "))
            .context("expected SEND")?
            .trim()
            .parse()?;
        let first_send = if typing { start } else { now_micros() };
        for (client, room, sender) in &mut held {
            if !*sender {
                continue;
            }
            if typing {
                client.emit("typing", &json!({ "roomId": room.to_hex() }), false);
            } else {
                let content = format!("scale {r} {}", now_micros());
                client.emit(
                    "send_message",
                    &json!({ "roomId": room.to_hex(), "content": content }),
                    true,
                );
            }
        }
        let senders = held.iter().filter(|(_, _, sender)| *sender).count() as u64;
        // A `user_typing` reaches every member but the typing one; a message, every member.
        let (expected, senders) = if typing {
            (held.len() as u64 - senders, 0)
        } else {
            (held.len() as u64, senders)
        };
        let done =
            || tally.delivered.load(Relaxed) >= expected && tally.acked.load(Relaxed) >= senders;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(args.round_timeout);
        while !done() {
            let woken = tally.changed.notified();
            if done() {
                break;
            }
            if tokio::time::timeout_at(deadline, woken).await.is_err() {
                break;
            }
        }
        let latencies = tally
            .latencies_us
            .lock()
            .map(|l| l.clone())
            .unwrap_or_default();
        // A typing round's arrivals, kept from the arming, timed from the round's start.
        let latencies: Vec<u64> = if typing {
            let armed = tally.armed_us.load(Relaxed);
            latencies
                .into_iter()
                .map(|l| (armed + u64::from(l)).saturating_sub(start))
                .collect()
        } else {
            latencies.into_iter().map(u64::from).collect()
        };
        let report = json!({
            "round": r, "expected": expected, "delivered": tally.delivered.load(Relaxed),
            "duplicates": tally.duplicates.load(Relaxed),
            "out_of_order": tally.out_of_order.load(Relaxed),
            "acked": tally.acked.load(Relaxed),
            "first_send_us": first_send, "last_receive_us": tally.last_receive_us.load(Relaxed),
            "latencies_us": latencies,
        });
        stdout
            .write_all(format!("ROUND {report}\n").as_bytes())
            .await?;
        stdout.flush().await?;
    }
    Ok(())
}
