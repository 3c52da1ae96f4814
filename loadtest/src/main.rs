//! `loadtest`: load scenarios against chat gateways, sent to loopback only.
//!
//! Each scenario prints a line per second on stderr, a summary on stdout, and one JSON
//! object of results (`--json FILE`).

mod chaos;
mod client;
mod plot;
mod report;
mod scale;
mod setup;

use clap::{Parser, Subcommand};
use client::{Client, Incoming, str_field};
use hdrhistogram::Histogram;
use report::Observe;
use serde_json::{Value, json};
use setup::Target;
use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};
use tokio::sync::{Mutex, mpsc};

#[derive(Parser)]
#[command(
    name = "loadtest",
    version,
    about = "Socket.IO load scenarios for the chat gateway"
)]
struct Cli {
    #[command(subcommand)]
    scenario: Scenario,
    #[command(flatten)]
    target: Target,
    #[command(flatten)]
    observe: Observe,
    /// Write the results as one JSON object to this file.
    #[arg(long, global = true)]
    json: Option<std::path::PathBuf>,
}

#[derive(Subcommand)]
enum Scenario {
    /// The whole deployment under faults drawn from a seed, then a check of every promise
    /// over the recorded history (exit status 1 on a violation).
    Chaos(chaos::ChaosArgs),
    /// A storm of connects: N clients connect and join at once.
    Connect {
        #[arg(long, default_value_t = 1000)]
        clients: usize,
        #[arg(long, default_value_t = 10)]
        rooms: usize,
        /// Seconds to keep the connections after the last join before the servers' CPU and
        /// counters are read: the work a join starts after its answer (presence) counts too.
        #[arg(long, default_value_t = 0)]
        hold: u64,
    },
    /// Fan-out: R rooms of S members; one member of each room sends.
    Fanout(FanoutArgs),
    /// Hold N idle authenticated connections: server memory per connection.
    Idle {
        #[arg(long, default_value_t = 10_000)]
        clients: usize,
        /// Connects in flight at once.
        #[arg(long, default_value_t = 256)]
        concurrency: usize,
        /// Seconds to hold the connections before measuring (lets allocators settle).
        #[arg(long, default_value_t = 5)]
        hold: u64,
    },
    /// Persister throughput against the store's own: N messages inserted straight into
    /// MongoDB in batches (the ceiling), then N sent through the gateways, timed until the
    /// persisters (their `--metrics`) have stored them all.
    Persist {
        #[arg(long, default_value_t = 20_000)]
        messages: usize,
        /// Messages per direct `insert_many` (the persister's BATCH_SIZE).
        #[arg(long, default_value_t = 500)]
        batch: usize,
        /// Sending connections (one room each).
        #[arg(long, default_value_t = 20)]
        senders: usize,
    },
    /// More connections than one process may hold: child processes (parts) hold them over
    /// several gateways, then every room's message must reach every member once.
    Scale(scale::ScaleArgs),
    /// One part of `scale` (the scenario starts these itself).
    #[command(hide = true)]
    ScalePart(scale::PartArgs),
    /// Steady fan-out with churn: members keep disconnecting and reconnecting.
    Soak {
        #[arg(long, default_value_t = 20)]
        rooms: usize,
        #[arg(long, default_value_t = 20)]
        members: usize,
        /// Messages per second over all rooms.
        #[arg(long, default_value_t = 200)]
        rate: u64,
        /// Reconnects per second (a random receiver drops and comes back).
        #[arg(long, default_value_t = 20)]
        churn: u64,
        #[arg(long, default_value_t = 60)]
        duration: u64,
        /// `message` or `typing`.
        #[arg(long, default_value = "message")]
        event: String,
    },
    /// Send-to-receive latency at a fixed rate, between two gateways when two URLs are given.
    Latency {
        #[arg(long, default_value_t = 50)]
        rooms: usize,
        /// Events per second over all rooms.
        #[arg(long, default_value_t = 1000)]
        rate: u64,
        #[arg(long, default_value_t = 10)]
        duration: u64,
        /// `message` or `typing`.
        #[arg(long, default_value = "message")]
        event: String,
        /// Draw the latency distribution to this SVG file.
        #[arg(long)]
        plot: Option<std::path::PathBuf>,
    },
}

#[derive(clap::Args)]
struct FanoutArgs {
    #[arg(long, default_value_t = 20)]
    rooms: usize,
    #[arg(long, default_value_t = 100)]
    members: usize,
    /// Messages per second over all rooms; 0 sends as fast as acks allow.
    #[arg(long, default_value_t = 0)]
    rate: u64,
    /// Unacknowledged messages per sender when sending as fast as acks allow.
    #[arg(long, default_value_t = 32)]
    inflight: usize,
    /// Seconds of sending.
    #[arg(long, default_value_t = 10)]
    duration: u64,
    /// Event to send: `message` (through the persister) or `typing`.
    #[arg(long, default_value = "message")]
    event: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if let Scenario::Chaos(args) = &cli.scenario {
        if !chaos::run(args).await? {
            std::process::exit(1);
        }
        return Ok(());
    }
    if let Scenario::ScalePart(args) = &cli.scenario {
        return scale::part(&cli.target, args).await;
    }
    let before = report::scrape(&cli.observe.metrics).await;
    let procs_before = report::procs(&cli.observe.pids);
    let started = Instant::now();
    let mut result = match &cli.scenario {
        Scenario::Connect {
            clients,
            rooms,
            hold,
        } => connect(&cli.target, *clients, *rooms, *hold).await?,
        Scenario::Fanout(args) => fanout(&cli.target, &cli.observe.pids, args).await?,
        Scenario::Idle {
            clients,
            concurrency,
            hold,
        } => {
            idle(
                &cli.target,
                &cli.observe.pids,
                *clients,
                *concurrency,
                *hold,
            )
            .await?
        }
        Scenario::Persist {
            messages,
            batch,
            senders,
        } => {
            persist(
                &cli.target,
                &cli.observe.metrics,
                *messages,
                *batch,
                *senders,
            )
            .await?
        }
        Scenario::Soak {
            rooms,
            members,
            rate,
            churn,
            duration,
            event,
        } => {
            soak(
                &cli.target,
                *rooms,
                *members,
                *rate,
                *churn,
                *duration,
                event,
            )
            .await?
        }
        Scenario::Scale(args) => scale::run(&cli.target, &cli.observe.pids, args).await?,
        Scenario::Chaos(_) | Scenario::ScalePart(_) => unreachable!("run above"),
        Scenario::Latency {
            rooms,
            rate,
            duration,
            event,
            plot,
        } => {
            latency(
                &cli.target,
                *rooms,
                *rate,
                *duration,
                event,
                plot.as_deref(),
            )
            .await?
        }
    };
    let after = report::scrape(&cli.observe.metrics).await;
    let procs_after = report::procs(&cli.observe.pids);
    let wall = started.elapsed().as_secs_f64();
    let servers: Vec<Value> = report::cpu_between(&procs_before, &procs_after)
        .into_iter()
        .zip(&procs_after)
        .map(|((pid, cpu), (_, now))| {
            json!({ "pid": pid, "cpu_seconds": cpu, "rss_bytes": now.rss_bytes })
        })
        .collect();
    result["servers"] = json!(servers);
    let counters = report::diff(&before, &after);
    let breakdown = report::breakdown(&counters);
    if !breakdown.is_empty() {
        eprintln!("server-side means: {breakdown:?}");
    }
    result["server_breakdown"] = json!(breakdown);
    result["server_counters"] = json!(counters);
    result["wall_seconds"] = json!(wall);
    println!("{}", serde_json::to_string_pretty(&result)?);
    if let Some(path) = &cli.json {
        std::fs::write(path, serde_json::to_vec_pretty(&result)?)?;
    }
    if result["violations"].as_u64().unwrap_or(0) > 0 {
        eprintln!(
            "{} violations: lost, duplicated, out of order or unexpected deliveries, or failed connects",
            result["violations"]
        );
        std::process::exit(1);
    }
    Ok(())
}

/// Counts a client's connect as done or failed (printing the first few failures).
fn tally<T>(
    index: usize,
    result: anyhow::Result<T>,
    done: &AtomicU64,
    failed: &AtomicU64,
) -> Option<T> {
    match result {
        Ok(value) => {
            done.fetch_add(1, Relaxed);
            Some(value)
        }
        Err(e) => {
            if failed.fetch_add(1, Relaxed) < 5 {
                eprintln!("client {index}: {e:#}");
            }
            None
        }
    }
}

/// Waits for acks until fewer than `limit` are outstanding (at least one is), counting the
/// `ok` ones in `acked`; `false` once the connection is closed. Other events are skipped.
async fn await_acks(
    rx: &mut mpsc::UnboundedReceiver<Incoming>,
    outstanding: &mut usize,
    limit: usize,
    acked: &AtomicU64,
) -> bool {
    while *outstanding >= limit.max(1) {
        match rx.recv().await {
            Some(Incoming::Ack { payload, .. }) => {
                *outstanding -= 1;
                if payload["ok"] == json!(true) {
                    acked.fetch_add(1, Relaxed);
                }
            }
            Some(Incoming::Closed) | None => return false,
            Some(_) => {}
        }
    }
    true
}

/// Prints a progress line per second until `done` is set.
fn progress(
    label: &'static str,
    counters: Vec<(&'static str, Arc<AtomicU64>)>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let started = Instant::now();
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let parts: Vec<String> = counters
                .iter()
                .map(|(n, c)| format!("{n}={}", c.load(Relaxed)))
                .collect();
            eprintln!(
                "[{label} {:>4.0}s] {}",
                started.elapsed().as_secs_f64(),
                parts.join(" ")
            );
        }
    })
}

async fn connect(
    target: &Target,
    clients: usize,
    rooms: usize,
    hold: u64,
) -> anyhow::Result<Value> {
    let per_room = clients.div_ceil(rooms.max(1));
    let groups = setup::rooms(target, rooms.max(1), per_room).await?;
    let users: Vec<(usize, setup::User, shared::ObjectId)> = groups
        .iter()
        .flat_map(|(room, users)| users.iter().map(move |u| (u.clone(), *room)))
        .take(clients)
        .enumerate()
        .map(|(i, (u, r))| (i, u, r))
        .collect();
    let joined = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let ticker = progress(
        "connect",
        vec![("joined", joined.clone()), ("failed", failed.clone())],
    );
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(users.len());
    for (i, user, room) in users {
        let (target, joined, failed) = (target.clone(), joined.clone(), failed.clone());
        tasks.push(tokio::spawn(async move {
            let (tx, mut rx) = mpsc::unbounded_channel();
            let joining = setup::join(&target, i, &user, room, tx, &mut rx).await;
            tally(i, joining, &joined, &failed).map(|client| (client, rx))
        }));
    }
    let mut held = Vec::new();
    for t in tasks {
        if let Some(c) = t.await? {
            held.push(c);
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    ticker.abort();
    let (ok, bad) = (joined.load(Relaxed), failed.load(Relaxed));
    eprintln!(
        "connect: {ok} joined, {bad} failed in {elapsed:.2} s ({:.0} connects/s)",
        ok as f64 / elapsed
    );
    tokio::time::sleep(Duration::from_secs(hold)).await;
    drop(held);
    Ok(json!({
        "scenario": "connect", "clients": clients, "rooms": rooms, "joined": ok, "failed": bad,
        "seconds_to_all_joined": elapsed, "connects_per_second": ok as f64 / elapsed,
    }))
}

/// Per-receiver bookkeeping: the last sequence number seen from each room's sender.
struct Receiver {
    last: i64,
}

async fn fanout(target: &Target, pids: &[u32], args: &FanoutArgs) -> anyhow::Result<Value> {
    let FanoutArgs {
        rooms,
        members,
        rate,
        inflight,
        duration,
        ref event,
    } = *args;
    let event = event.as_str();
    anyhow::ensure!(
        members >= 2,
        "a room needs a sender and at least one receiver"
    );
    let groups = setup::rooms(target, rooms, members).await?;
    let (deliveries, duplicates, gaps, sent, acked) = (
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
    );
    let typing = event == "typing";

    // Receivers: every member but the sender.
    let mut index = 0;
    let mut senders = Vec::new();
    for (room, users) in &groups {
        for (m, user) in users.iter().enumerate() {
            let (tx, mut rx) = mpsc::unbounded_channel();
            let client = setup::join(target, index, user, *room, tx, &mut rx).await?;
            index += 1;
            if m == 0 {
                senders.push((*room, client, rx));
                continue;
            }
            let (deliveries, duplicates, gaps) =
                (deliveries.clone(), duplicates.clone(), gaps.clone());
            tokio::spawn(async move {
                let _client = client;
                let mut me = Receiver { last: -1 };
                while let Some(incoming) = rx.recv().await {
                    let Incoming::Event { name, raw } = incoming else {
                        continue;
                    };
                    if typing {
                        if name == "user_typing" {
                            deliveries.fetch_add(1, Relaxed);
                        }
                        continue;
                    }
                    if name != "message" {
                        continue;
                    }
                    deliveries.fetch_add(1, Relaxed);
                    let seq: i64 = str_field(&raw, "content")
                        .and_then(|c| c.parse().ok())
                        .unwrap_or(-1);
                    if seq <= me.last {
                        duplicates.fetch_add(1, Relaxed);
                    } else {
                        if seq > me.last + 1 {
                            gaps.fetch_add(1, Relaxed);
                        }
                        me.last = seq;
                    }
                }
            });
        }
    }
    eprintln!(
        "fanout: {} rooms x {members} members connected",
        groups.len()
    );
    let ticker = progress(
        "fanout",
        vec![
            ("sent", sent.clone()),
            ("acked", acked.clone()),
            ("deliveries", deliveries.clone()),
        ],
    );

    // The servers' CPU from here to the end of the settling: the cost of the deliveries
    // alone. The whole run's figure (`servers`) also holds connecting and joining every
    // member, which the connect scenario measures on its own.
    let procs_sending = report::procs(pids);
    let deadline = Instant::now() + Duration::from_secs(duration);
    let started = Instant::now();
    let per_room_interval =
        (rate > 0).then(|| Duration::from_secs_f64(groups.len() as f64 / rate as f64));
    let mut tasks = Vec::new();
    for (room, mut client, mut rx) in senders {
        let (sent, acked) = (sent.clone(), acked.clone());
        // The client event that makes the server emit `event`.
        let event = if typing { "typing" } else { "send_message" };
        tasks.push(tokio::spawn(async move {
            let mut seq = 0u64;
            let mut outstanding = 0usize;
            let mut next = Instant::now();
            while Instant::now() < deadline {
                let data = if typing {
                    json!({ "roomId": room.to_hex() })
                } else {
                    json!({ "roomId": room.to_hex(), "content": seq.to_string() })
                };
                if let Some(interval) = per_room_interval {
                    tokio::time::sleep_until(next.into()).await;
                    next += interval;
                    client.emit(event, &data, false);
                    sent.fetch_add(1, Relaxed);
                    acked.fetch_add(1, Relaxed);
                } else {
                    client.emit(event, &data, true);
                    sent.fetch_add(1, Relaxed);
                    outstanding += 1;
                    if !await_acks(&mut rx, &mut outstanding, inflight, &acked).await {
                        return;
                    }
                }
                seq += 1;
            }
            // The rest of the acks; a closed connection has no more to give.
            await_acks(&mut rx, &mut outstanding, 1, &acked).await;
            drop(client);
        }));
    }
    for t in tasks {
        t.await?;
    }
    let send_seconds = started.elapsed().as_secs_f64();
    // Settle: wait until deliveries stop growing (bounded).
    let expected = acked.load(Relaxed) * (members as u64 - 1);
    let settle_deadline = Instant::now() + Duration::from_secs(15);
    let mut last = u64::MAX;
    while Instant::now() < settle_deadline {
        let now = deliveries.load(Relaxed);
        if now >= expected || now == last {
            break;
        }
        last = now;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let delivery_phase: Vec<Value> = report::cpu_between(&procs_sending, &report::procs(pids))
        .into_iter()
        .map(|(pid, cpu)| json!({ "pid": pid, "cpu_seconds": cpu }))
        .collect();
    ticker.abort();
    let delivered = deliveries.load(Relaxed);
    let result = json!({
        "scenario": "fanout", "event": event, "rooms": rooms, "members": members, "rate": rate,
        "sent": sent.load(Relaxed), "acked": acked.load(Relaxed),
        "deliveries": delivered, "expected_deliveries": expected,
        "lost": expected.saturating_sub(delivered), "duplicates": duplicates.load(Relaxed),
        "out_of_order_or_gaps": gaps.load(Relaxed),
        "send_seconds": send_seconds, "seconds": elapsed,
        "deliveries_per_second": delivered as f64 / elapsed,
        "delivery_phase_servers": delivery_phase,
    });
    eprintln!(
        "fanout: {delivered} deliveries in {elapsed:.2} s ({:.0}/s), expected {expected}, duplicates {}",
        delivered as f64 / elapsed,
        duplicates.load(Relaxed)
    );
    Ok(result)
}

async fn latency(
    target: &Target,
    rooms: usize,
    rate: u64,
    duration: u64,
    event: &str,
    plot: Option<&std::path::Path>,
) -> anyhow::Result<Value> {
    anyhow::ensure!(rate > 0, "latency needs a fixed --rate");
    let groups = setup::rooms(target, rooms, 2).await?;
    let histogram = Arc::new(Mutex::new(Histogram::<u64>::new_with_bounds(
        1, 60_000_000, 3,
    )?));
    let received = Arc::new(AtomicU64::new(0));
    let sent = Arc::new(AtomicU64::new(0));
    let mut senders = Vec::new();
    for (r, (room, users)) in groups.iter().enumerate() {
        // Sender on the first URL, receiver on the second (when given).
        let (tx, mut rx) = mpsc::unbounded_channel();
        let sender = setup::join(target, 0, &users[0], *room, tx, &mut rx).await?;
        let (tx, mut rx2) = mpsc::unbounded_channel();
        let receiver = setup::join(target, 1, &users[1], *room, tx, &mut rx2).await?;
        let times: Arc<Mutex<VecDeque<Instant>>> = Arc::default();
        let (histogram, received, times2) = (histogram.clone(), received.clone(), times.clone());
        let wanted = if event == "typing" {
            "user_typing"
        } else {
            "message"
        };
        tokio::spawn(async move {
            let _receiver = receiver;
            while let Some(incoming) = rx2.recv().await {
                if let Incoming::Event { name, .. } = incoming
                    && name == wanted
                    && let Some(at) = times2.lock().await.pop_front()
                {
                    let micros = at.elapsed().as_micros() as u64;
                    let _ = histogram.lock().await.record(micros.max(1));
                    received.fetch_add(1, Relaxed);
                }
            }
        });
        tokio::spawn(async move { while rx.recv().await.is_some() {} });
        senders.push((r, *room, sender, times));
    }
    eprintln!("latency: {} room pairs connected", groups.len());
    let ticker = progress(
        "latency",
        vec![("sent", sent.clone()), ("received", received.clone())],
    );
    let interval = Duration::from_secs_f64(1.0 / rate as f64);
    let deadline = Instant::now() + Duration::from_secs(duration);
    let mut next = Instant::now();
    let mut i = 0usize;
    while Instant::now() < deadline {
        tokio::time::sleep_until(next.into()).await;
        next += interval;
        let (_, room, client, times): &mut (
            usize,
            shared::ObjectId,
            Client,
            Arc<Mutex<VecDeque<Instant>>>,
        ) = &mut senders[i % groups.len()];
        let data = if event == "typing" {
            json!({ "roomId": room.to_hex() })
        } else {
            json!({ "roomId": room.to_hex(), "content": "latency probe" })
        };
        times.lock().await.push_back(Instant::now());
        client.emit(
            if event == "typing" {
                "typing"
            } else {
                "send_message"
            },
            &data,
            false,
        );
        sent.fetch_add(1, Relaxed);
        i += 1;
    }
    let settle = Instant::now() + Duration::from_secs(10);
    while received.load(Relaxed) < sent.load(Relaxed) && Instant::now() < settle {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    ticker.abort();
    let h = histogram.lock().await;
    let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    eprintln!(
        "latency ({event}): p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, p99.9 {:.2} ms, max {:.2} ms over {} samples",
        ms(0.5),
        ms(0.9),
        ms(0.99),
        ms(0.999),
        h.max() as f64 / 1000.0,
        h.len()
    );
    if let Some(path) = plot {
        plot::latency(
            &h,
            &format!("{event} latency at {rate}/s ({} samples)", h.len()),
            path,
        )?;
    }
    Ok(json!({
        "scenario": "latency", "event": event, "rate": rate, "rooms": rooms,
        "sent": sent.load(Relaxed), "received": received.load(Relaxed),
        "latency_ms": { "p50": ms(0.5), "p90": ms(0.9), "p99": ms(0.99), "p99_9": ms(0.999), "max": h.max() as f64 / 1000.0 },
    }))
}

async fn idle(
    target: &Target,
    pids: &[u32],
    clients: usize,
    concurrency: usize,
    hold: u64,
) -> anyhow::Result<Value> {
    // Every client authenticated and joined to a room (of 100), as a chat client sits.
    const ROOM_SIZE: usize = 100;
    let groups = setup::rooms(target, clients.div_ceil(ROOM_SIZE), ROOM_SIZE).await?;
    let users: Vec<(shared::ObjectId, setup::User)> = groups
        .into_iter()
        .flat_map(|(room, users)| users.into_iter().map(move |u| (room, u)))
        .take(clients)
        .collect();
    let before = report::procs(pids);
    let connected = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let ticker = progress(
        "idle",
        vec![("connected", connected.clone()), ("failed", failed.clone())],
    );
    let limit = Arc::new(tokio::sync::Semaphore::new(concurrency.max(1)));
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(users.len());
    for (i, (room, user)) in users.into_iter().enumerate() {
        let (target, connected, failed, limit) = (
            target.clone(),
            connected.clone(),
            failed.clone(),
            limit.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let _permit = limit.acquire().await.ok()?;
            let (tx, mut rx) = mpsc::unbounded_channel();
            let joining = setup::join(&target, i, &user, room, tx, &mut rx).await;
            tally(i, joining, &connected, &failed).map(|client| (client, rx))
        }));
    }
    let mut held = Vec::with_capacity(tasks.len());
    for t in tasks {
        if let Some(c) = t.await? {
            held.push(c);
        }
    }
    let connect_seconds = started.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(hold)).await;
    let after = report::procs(pids);
    ticker.abort();
    let n = held.len() as f64;
    let grown = report::rss_growth(&before, &after) as f64;
    let per_connection = (n > 0.0 && !after.is_empty()).then(|| grown / n);
    eprintln!(
        "idle: {} connected, {} failed in {connect_seconds:.2} s; server RSS grew {:.1} MB ({} bytes per connection)",
        held.len(),
        failed.load(Relaxed),
        grown / 1e6,
        per_connection.map_or("n/a".into(), |b| format!("{b:.0}")),
    );
    Ok(json!({
        "scenario": "idle", "clients": clients, "connected": held.len(),
        "failed": failed.load(Relaxed), "connect_seconds": connect_seconds,
        "rss_before": before, "rss_after": after,
        "rss_growth_bytes": grown, "rss_bytes_per_connection": per_connection,
    }))
}

async fn soak(
    target: &Target,
    rooms: usize,
    members: usize,
    rate: u64,
    churn: u64,
    duration: u64,
    event: &str,
) -> anyhow::Result<Value> {
    anyhow::ensure!(
        members >= 2 && rate > 0,
        "soak needs --members >= 2 and a --rate"
    );
    let groups = setup::rooms(target, rooms, members).await?;
    let typing = event == "typing";
    let wanted = if typing { "user_typing" } else { "message" };
    let (sent, deliveries, reconnects, errors) = (
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
    );
    // Every receiver slot runs until the deadline, reconnecting whenever it is told to.
    let deadline = Instant::now() + Duration::from_secs(duration);
    let mut kicks = Vec::new();
    let mut senders = Vec::new();
    let mut slots = Vec::new();
    let mut index = 0;
    for (room, users) in &groups {
        for (m, user) in users.iter().enumerate() {
            let (tx, mut rx) = mpsc::unbounded_channel();
            let client = setup::join(target, index, user, *room, tx, &mut rx).await?;
            index += 1;
            if m == 0 {
                senders.push((*room, client));
                tokio::spawn(async move { while rx.recv().await.is_some() {} });
                continue;
            }
            let (kick_tx, mut kick) = mpsc::unbounded_channel::<()>();
            kicks.push(kick_tx);
            let (target, user, room) = (target.clone(), user.clone(), *room);
            let (deliveries, reconnects, errors) =
                (deliveries.clone(), reconnects.clone(), errors.clone());
            slots.push(tokio::spawn(async move {
                let mut current = Some((client, rx));
                while Instant::now() < deadline {
                    let Some((client, mut rx)) = current.take() else {
                        let (tx, mut rx) = mpsc::unbounded_channel();
                        match setup::join(&target, index, &user, room, tx, &mut rx).await {
                            Ok(c) => {
                                reconnects.fetch_add(1, Relaxed);
                                current = Some((c, rx));
                            }
                            Err(_) => {
                                errors.fetch_add(1, Relaxed);
                                tokio::time::sleep(Duration::from_millis(100)).await;
                            }
                        }
                        continue;
                    };
                    tokio::select! {
                        incoming = rx.recv() => match incoming {
                            Some(Incoming::Event { name, .. }) => {
                                if name == wanted {
                                    deliveries.fetch_add(1, Relaxed);
                                }
                                current = Some((client, rx));
                            }
                            Some(Incoming::Closed) | None => {
                                errors.fetch_add(1, Relaxed);
                            }
                            Some(_) => current = Some((client, rx)),
                        },
                        _ = kick.recv() => drop(client),
                        _ = tokio::time::sleep_until(deadline.into()) => {}
                    }
                }
            }));
        }
    }
    eprintln!("soak: {} rooms x {members} members connected", groups.len());
    let ticker = progress(
        "soak",
        vec![
            ("sent", sent.clone()),
            ("deliveries", deliveries.clone()),
            ("reconnects", reconnects.clone()),
            ("errors", errors.clone()),
        ],
    );
    // Churn: kick one receiver `churn` times a second, round robin.
    let churner = {
        let kicks = kicks.clone();
        tokio::spawn(async move {
            if churn == 0 || kicks.is_empty() {
                return;
            }
            let interval = Duration::from_secs_f64(1.0 / churn as f64);
            let mut next = Instant::now();
            let mut i = 0usize;
            while Instant::now() < deadline {
                tokio::time::sleep_until(next.into()).await;
                next += interval;
                let _ = kicks[i % kicks.len()].send(());
                i = i.wrapping_mul(7919).wrapping_add(1) % kicks.len();
            }
        })
    };
    let interval = Duration::from_secs_f64(1.0 / rate as f64);
    let mut next = Instant::now();
    let mut i = 0usize;
    while Instant::now() < deadline {
        tokio::time::sleep_until(next.into()).await;
        next += interval;
        let (room, client) = &mut senders[i % groups.len()];
        let data = if typing {
            json!({ "roomId": room.to_hex() })
        } else {
            json!({ "roomId": room.to_hex(), "content": format!("soak {i}") })
        };
        client.emit(if typing { "typing" } else { "send_message" }, &data, false);
        sent.fetch_add(1, Relaxed);
        i += 1;
    }
    churner.await?;
    for slot in slots {
        slot.await?;
    }
    ticker.abort();
    let (s, d) = (sent.load(Relaxed), deliveries.load(Relaxed));
    eprintln!(
        "soak: {s} sent, {d} deliveries, {} reconnects, {} errors",
        reconnects.load(Relaxed),
        errors.load(Relaxed)
    );
    Ok(json!({
        "scenario": "soak", "event": event, "rooms": rooms, "members": members, "rate": rate,
        "churn_per_second": churn, "seconds": duration, "sent": s, "deliveries": d,
        // Receivers are briefly away while reconnecting, so not every message reaches all.
        "delivery_ratio": d as f64 / (s as f64 * (members as f64 - 1.0)).max(1.0),
        "reconnects": reconnects.load(Relaxed), "errors": errors.load(Relaxed),
    }))
}

async fn persist(
    target: &Target,
    metrics: &[String],
    messages: usize,
    batch: usize,
    senders: usize,
) -> anyhow::Result<Value> {
    use shared::store::{SequencedMessage, Store};
    anyhow::ensure!(
        target.jwt_secret.is_some() && !target.mint_only,
        "persist needs --jwt-secret and the gateways' MongoDB"
    );
    anyhow::ensure!(
        !metrics.is_empty(),
        "persist needs --metrics of the persister(s) to see what they stored"
    );
    // 1. The ceiling: the same inserts, straight into the store, in a database of their own.
    let store = shared::store::MongoStore::connect(
        &shared::config::MongoSettings {
            uri: Some(target.mongodb_uri.clone()),
            db: format!("{}_baseline", target.mongodb_db),
        },
        "chat-loadtest",
    )
    .await?;
    // Spread over as many rooms as the pipeline run uses: each stored batch also updates
    // the activity of every room it touches.
    let rooms: Vec<shared::ObjectId> = (0..senders.max(1))
        .map(|_| shared::ObjectId::new())
        .collect();
    let sender = shared::wire::Sender {
        id: shared::ObjectId::new(),
        email: Some("load@example.com".into()),
        display_name: Some("load".into()),
    };
    let all: Vec<SequencedMessage> = (0..messages)
        .map(|i| SequencedMessage {
            seq: i as i64,
            message: shared::wire::ChatMessage {
                id: shared::ObjectId::new(),
                room_id: rooms[i % rooms.len()],
                sender: sender.clone(),
                content: format!("persist {i}"),
                created_at: shared::wire::now_millis(),
                seq: None,
                server_event: None,
            },
        })
        .collect();
    let started = Instant::now();
    for chunk in all.chunks(batch.max(1)) {
        store.insert_messages(chunk).await?;
    }
    let direct_seconds = started.elapsed().as_secs_f64();
    let direct_rate = messages as f64 / direct_seconds;
    eprintln!(
        "persist: store alone {direct_rate:.0} messages/s ({messages} in {direct_seconds:.2} s)"
    );

    // 2. The same number through gateways, ingest stream and persister.
    let groups = setup::rooms(target, senders.max(1), 1).await?;
    let stored = |m: &std::collections::BTreeMap<String, f64>| {
        m.get("chat_persister_messages_total")
            .copied()
            .unwrap_or(0.0)
    };
    let before = stored(&report::scrape(metrics).await);
    let sent = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let per_sender = messages.div_ceil(groups.len());
    let mut tasks = Vec::new();
    for (i, (room, users)) in groups.iter().enumerate() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let mut client = setup::join(target, i, &users[0], *room, tx, &mut rx).await?;
        let (room, sent) = (*room, sent.clone());
        tasks.push(tokio::spawn(async move {
            let mut outstanding = 0usize;
            for n in 0..per_sender {
                client.emit(
                    "send_message",
                    &json!({ "roomId": room.to_hex(), "content": format!("persist {n}") }),
                    true,
                );
                outstanding += 1;
                if !await_acks(&mut rx, &mut outstanding, 64, &sent).await {
                    return;
                }
            }
            // The rest of the acks; a closed connection has no more to give.
            await_acks(&mut rx, &mut outstanding, 1, &sent).await;
        }));
    }
    for t in tasks {
        t.await?;
    }
    let accepted = sent.load(Relaxed);
    let append_seconds = started.elapsed().as_secs_f64();
    let deadline = Instant::now() + Duration::from_secs(300);
    let mut done = 0.0;
    while Instant::now() < deadline {
        done = stored(&report::scrape(metrics).await) - before;
        if done >= accepted as f64 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let pipeline_seconds = started.elapsed().as_secs_f64();
    let pipeline_rate = done / pipeline_seconds;
    eprintln!(
        "persist: through the persister {pipeline_rate:.0} messages/s ({done} of {accepted} in {pipeline_seconds:.2} s; appends took {append_seconds:.2} s), {:.0}% of the store alone",
        pipeline_rate / direct_rate * 100.0
    );
    Ok(json!({
        "scenario": "persist", "messages": messages, "batch": batch,
        "store_alone_messages_per_second": direct_rate,
        "accepted": accepted, "stored": done, "append_seconds": append_seconds,
        "pipeline_seconds": pipeline_seconds, "pipeline_messages_per_second": pipeline_rate,
        "ratio": pipeline_rate / direct_rate,
    }))
}
