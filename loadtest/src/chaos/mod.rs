//! `loadtest chaos`: the whole deployment on this machine (3 gateways, 3 persisters,
//! SecantusDB, one Redis or a 6-node Redis Cluster), clients that behave like real ones,
//! faults drawn from a seed and overlapping, then a checker that reads the recorded history
//! and the store and says whether every promise of docs/RELIABILITY.md held.
//!
//! A run: start the topology, seed users and rooms, run clients, room owners and the
//! fault schedule for `--duration` seconds; then heal everything (every process running,
//! nothing paused, every member added back), let the system settle (the ingest empty, every
//! client caught up with every room), read the store and check. The report goes to stdout
//! and, with the history and the services' logs, to `--out`. Exit status 1 on any
//! violation. The seed reproduces the fault schedule and every client's choices; the
//! interleavings of the processes vary from run to run.

mod check;
mod clients;
mod faults;
mod history;
mod topology;

use anyhow::Context;
use check::{CheckResult, Stored, World};
use clients::{Cast, Crowd};
use faults::FaultKind;
use history::{Event, History};
use serde_json::json;
use shared::config::MongoSettings;
use shared::jwt::JwtKeys;
use shared::store::{MongoStore, Store};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::Mutex;
use topology::{RedisMode, Topology, Tuning};

#[derive(clap::Args, Debug, Clone)]
pub struct ChaosArgs {
    /// One Redis, or a 6-node Redis Cluster (with `INGEST_MIN_REPLICAS=1`).
    #[arg(long, value_enum, default_value = "single")]
    pub redis: RedisMode,
    /// Seeds of the runs, one run each, one after the other (each on a fresh deployment).
    #[arg(long = "seed", required = true)]
    pub seeds: Vec<u64>,
    /// Seconds of clients and faults per run (then healing and settling).
    #[arg(long, default_value_t = 60)]
    pub duration: u64,
    /// Faults to draw from (default: every kind that applies to the Redis deployment).
    #[arg(long, value_enum, value_delimiter = ',')]
    pub faults: Vec<FaultKind>,
    /// Mean seconds between two faults' starts.
    #[arg(long, default_value_t = 3.0)]
    pub fault_every: f64,
    #[arg(long, default_value_t = 12)]
    pub clients: usize,
    #[arg(long, default_value_t = 4)]
    pub rooms: usize,
    /// The persisters' `LEASE_MS`.
    #[arg(long, default_value_t = 2000)]
    pub lease_ms: u64,
    /// Where the report, the history and the services' logs go (a folder per seed).
    #[arg(long, default_value = "target/chaos")]
    pub out: PathBuf,
}

/// Runs every seed; `Ok(false)` when a check found a violation.
pub async fn run(args: &ChaosArgs) -> anyhow::Result<bool> {
    let mut passed = true;
    for seed in &args.seeds {
        passed &= run_seed(args, *seed).await?;
    }
    Ok(passed)
}

async fn run_seed(args: &ChaosArgs, seed: u64) -> anyhow::Result<bool> {
    let mode_name = match args.redis {
        RedisMode::Single => "single",
        RedisMode::Cluster => "cluster",
    };
    let dir = args.out.join(format!("{mode_name}-{seed}"));
    let _ = std::fs::remove_dir_all(&dir);
    let kinds: Vec<FaultKind> = if args.faults.is_empty() {
        FaultKind::ALL.to_vec()
    } else {
        args.faults.clone()
    };
    let kinds: Vec<FaultKind> = kinds
        .into_iter()
        .filter(|k| k.applies_to(args.redis))
        .collect();
    eprintln!(
        "chaos: seed {seed}, {mode_name} Redis, {} s, faults {}",
        args.duration,
        kinds.iter().map(|k| k.name()).collect::<Vec<_>>().join(",")
    );
    let started = Instant::now();
    let tuning = Tuning {
        lease_ms: args.lease_ms,
        min_replicas: u32::from(args.redis == RedisMode::Cluster),
        jwt_secret: format!("chaos-secret-{seed}-of-at-least-32-bytes"),
    };
    let topology = Topology::start(args.redis, &dir, tuning.clone()).await?;
    eprintln!(
        "chaos: deployment ready in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let cast = seed_cast(&topology, &tuning.jwt_secret, args.clients, args.rooms).await?;
    let gateways: Vec<String> = topology.gateways.iter().map(|g| g.url()).collect();
    let mongo = MongoSettings {
        uri: Some(topology.mongo.uri()),
        db: topology.db.clone(),
    };
    let topology = Arc::new(Mutex::new(topology));

    let history = History::new();
    let crowd = Crowd::new(cast, gateways, history.clone());
    let mut tasks = Vec::new();
    for client in 0..args.clients {
        tasks.push(tokio::spawn(clients::run_client(
            crowd.clone(),
            client,
            seed,
        )));
    }
    let mut owners = Vec::new();
    for room in 0..args.rooms {
        owners.push(tokio::spawn(clients::run_owner(crowd.clone(), room, seed)));
    }
    let backend = tokio::spawn(clients::run_backend(crowd.clone(), seed));
    let plan = faults::schedule(
        seed,
        args.duration as f64,
        args.fault_every,
        &kinds,
        args.lease_ms,
    );
    let faults = tokio::spawn(faults::run(plan, topology.clone(), history.clone()));
    tokio::time::sleep(Duration::from_secs(args.duration)).await;

    // Heal, then settle.
    crowd.quiet.cancel();
    for owner in owners {
        let _ = owner.await;
    }
    let _ = faults.await;
    topology.lock().await.heal().await;
    topology
        .lock()
        .await
        .wait_ready(Duration::from_secs(120))
        .await?;
    let heal_rng_seed = seed;
    {
        use rand::SeedableRng;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(heal_rng_seed);
        for (room, members) in crowd.cast.members_of.clone().iter().enumerate() {
            for user in &members[1..] {
                clients::add_back(&crowd, &mut rng, room, *user).await;
            }
        }
    }
    // Its last event is answered (or given up) once everything is healed.
    let _ = backend.await;
    crowd.all_members();
    let settled = settle(&topology, &crowd, &mongo, args.rooms).await;
    crowd.done.cancel();
    for task in tasks {
        let _ = task.await;
    }
    let store = MongoStore::connect(&mongo, "chaos-checker")
        .await
        .context("reading the store")?;
    let mut stored: HashMap<usize, Vec<Stored>> = HashMap::new();
    for (room, id) in crowd.cast.rooms.iter().enumerate() {
        let messages = store.messages_after(*id, 0, u32::MAX).await?;
        stored.insert(
            room,
            messages
                .into_iter()
                .map(|m| match m.server_event {
                    // The backend's events go by the unique fileId it gave them.
                    Some(event) => {
                        let file = event.data["fileId"].as_str().unwrap_or_default().to_owned();
                        Stored {
                            id: file.clone(),
                            seq: m.seq.unwrap_or(0),
                            content: file,
                        }
                    }
                    None => Stored {
                        id: m.id.to_hex(),
                        seq: m.seq.unwrap_or(0),
                        content: m.content,
                    },
                })
                .collect(),
        );
    }
    store.close().await;
    let events = history.events();
    let results = check::check(&World {
        events: &events,
        stored: &stored,
        rooms_of: &crowd.cast.rooms_of,
    });
    let passed = results.iter().all(|r| r.violations.is_empty()) && settled.is_ok();
    let report = report(seed, mode_name, args, &events, &stored, &results, &settled);
    print!("{report}");
    write(&dir, &events, &results, &report)?;
    drop(topology);
    Ok(passed)
}

/// Users and rooms straight in the store, tokens minted with the gateways' secret. Client
/// `i` is in rooms `i % rooms` and `(i + 1) % rooms`; a room's first member owns it.
async fn seed_cast(
    topology: &Topology,
    secret: &str,
    clients: usize,
    rooms: usize,
) -> anyhow::Result<Cast> {
    anyhow::ensure!(
        rooms >= 2 && clients >= 2 * rooms,
        "at least 2 rooms and 2 clients per room"
    );
    let store = MongoStore::connect(
        &MongoSettings {
            uri: Some(topology.mongo.uri()),
            db: topology.db.clone(),
        },
        "chaos-setup",
    )
    .await?;
    let keys = JwtKeys::new(secret.as_bytes(), 24 * 3600);
    let mut users = Vec::new();
    let mut tokens = Vec::new();
    for i in 0..clients {
        let user = store
            .create_user(&format!("chaos{i}@example.com"), &format!("chaos {i}"), "!")
            .await?;
        tokens.push(keys.issue(user.id, &user.email, &user.display_name)?);
        users.push(user.id);
    }
    let rooms_of: Vec<Vec<usize>> = (0..clients)
        .map(|i| {
            let mut r = vec![i % rooms, (i + 1) % rooms];
            r.dedup();
            r
        })
        .collect();
    let mut members_of: Vec<Vec<usize>> = vec![Vec::new(); rooms];
    for (client, rs) in rooms_of.iter().enumerate() {
        for r in rs {
            members_of[*r].push(client);
        }
    }
    let mut room_ids = Vec::new();
    for (r, members) in members_of.iter().enumerate() {
        let room = store
            .create_room(
                Some(format!("chaos {r}")),
                members.iter().map(|m| users[*m]).collect(),
            )
            .await?;
        room_ids.push(room.id);
    }
    store.close().await;
    Ok(Cast {
        rooms: room_ids,
        tokens,
        users,
        rooms_of,
        members_of,
    })
}

/// Waits until the ingest is empty and every client holds every message of its rooms.
async fn settle(
    topology: &Arc<Mutex<Topology>>,
    crowd: &Arc<Crowd>,
    mongo: &MongoSettings,
    rooms: usize,
) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        match topology.lock().await.backlog().await {
            Ok(0) => break,
            Ok(n) if Instant::now() > deadline => {
                return Err(format!("{n} entries still in the ingest after 120 s"));
            }
            Err(e) if Instant::now() > deadline => return Err(e.to_string()),
            _ => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
    let store = MongoStore::connect(mongo, "chaos-settle")
        .await
        .map_err(|e| e.to_string())?;
    let mut latest = Vec::with_capacity(rooms);
    for room in &crowd.cast.rooms {
        latest.push(store.latest_seq(*room).await.map_err(|e| e.to_string())?);
    }
    store.close().await;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let behind: Vec<(usize, usize, u64)> = crowd
            .cast
            .rooms_of
            .iter()
            .enumerate()
            .flat_map(|(client, rs)| rs.iter().map(move |r| (client, *r)))
            .filter_map(|(client, room)| {
                let last = crowd.last(client, room);
                (last < latest[room]).then_some((client, room, last))
            })
            .collect();
        if behind.is_empty() {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!(
                "clients still behind after 60 s (client, room, last held): {behind:?}; stored latest {latest:?}"
            ));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn report(
    seed: u64,
    mode: &str,
    args: &ChaosArgs,
    events: &[Event],
    stored: &HashMap<usize, Vec<Stored>>,
    results: &[CheckResult],
    settled: &Result<(), String>,
) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let count = |f: &dyn Fn(&Event) -> bool| events.iter().filter(|e| f(e)).count();
    let _ = writeln!(
        out,
        "\n# chaos run: seed {seed}, {mode} Redis, {} s",
        args.duration
    );
    let sends = count(&|e| matches!(e, Event::Send { .. }));
    let acked = count(&|e| {
        matches!(
            e,
            Event::Send {
                outcome: history::Outcome::Acked { .. },
                ..
            }
        )
    });
    let stored_total: usize = stored.values().map(Vec::len).sum();
    let _ = writeln!(
        out,
        "clients {}, rooms {}; send attempts {sends}, acknowledged {acked}, stored {stored_total}; deliveries {}; connections {}; joins {}; resyncs {}; removals {}",
        args.clients,
        args.rooms,
        count(&|e| matches!(e, Event::Message { .. })),
        count(&|e| matches!(e, Event::Connected { .. })),
        count(&|e| matches!(e, Event::JoinSent { .. })),
        count(&|e| matches!(e, Event::Resync { .. })),
        count(&|e| matches!(e, Event::Removed { ok: true, .. })),
    );
    let mut kinds: HashMap<&str, usize> = HashMap::new();
    for e in events {
        if let Event::Fault { kind, .. } = e {
            *kinds.entry(kind.as_str()).or_default() += 1;
        }
    }
    let mut kinds: Vec<_> = kinds.into_iter().collect();
    kinds.sort();
    let _ = writeln!(out, "faults injected: {kinds:?}");
    let _ = writeln!(out, "\nfault timeline:");
    let mut timeline: Vec<&Event> = events
        .iter()
        .filter(|e| matches!(e, Event::Fault { .. }))
        .collect();
    timeline.sort_by(|a, b| start_of(a).total_cmp(&start_of(b)));
    for e in timeline {
        if let Event::Fault {
            kind,
            target,
            start,
            end,
        } = e
        {
            let _ = writeln!(out, "  {start:7.2}–{end:7.2} s  {kind:15} {target}");
        }
    }
    let _ = writeln!(out, "\nchecks:");
    for r in results {
        let _ = writeln!(
            out,
            "  ({}) {:4} violations in {:7} checked: {}",
            r.name,
            r.violations.len(),
            r.checked,
            r.promise
        );
    }
    if let Err(why) = settled {
        let _ = writeln!(out, "  settling failed: {why}");
    }
    for r in results {
        let Some(first) = r.violations.first() else {
            continue;
        };
        let _ = writeln!(out, "\nfirst violation of ({}): {}", r.name, first.what);
        if let Some(index) = first.event {
            let _ = writeln!(out, "events around it (same client and room):");
            let near: Vec<(usize, &Event)> = events
                .iter()
                .enumerate()
                .filter(|(_, e)| {
                    let (c, room) = e.client_room();
                    (c == first.client || c.is_none()) && (room == first.room || room.is_none())
                })
                .collect();
            let at = near.iter().position(|(i, _)| *i == index).unwrap_or(0);
            for (i, e) in &near[at.saturating_sub(12)..(at + 6).min(near.len())] {
                let mark = if *i == index { ">>" } else { "  " };
                let _ = writeln!(out, "  {mark} #{i} {}", json!(e));
            }
        }
    }
    let verdict = if results.iter().all(|r| r.violations.is_empty()) && settled.is_ok() {
        "PASSED"
    } else {
        "FAILED"
    };
    let _ = writeln!(
        out,
        "\n{verdict}: seed {seed} (replay: loadtest chaos --redis {mode} --seed {seed} --duration {})",
        args.duration
    );
    out
}

fn start_of(e: &Event) -> f64 {
    match e {
        Event::Fault { start, .. } => *start,
        _ => 0.0,
    }
}

/// The report, the history (one JSON event per line) and the checks' violations.
fn write(
    dir: &Path,
    events: &[Event],
    results: &[CheckResult],
    report: &str,
) -> anyhow::Result<()> {
    use std::io::Write;
    std::fs::write(dir.join("report.txt"), report)?;
    let mut history = std::io::BufWriter::new(std::fs::File::create(dir.join("history.jsonl"))?);
    for e in events {
        serde_json::to_writer(&mut history, e)?;
        history.write_all(b"\n")?;
    }
    std::fs::write(dir.join("checks.json"), serde_json::to_vec_pretty(results)?)?;
    Ok(())
}
