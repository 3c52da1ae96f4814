//! Faults, drawn from the run's seed: the whole schedule is drawn before the run starts
//! (kind, start, length, target, whatever else), so the printed seed gives the same
//! schedule again. Faults overlap; a few rules keep each tier alive enough to heal
//! (at most one Redis node down or stopped at a time, so that no cluster shard loses both
//! copies; at least one gateway and one persister untouched).

use super::history::{Event, History};
use super::topology::{RedisMode, Topology};
use fred::prelude::*;
use fred::types::{ClusterHash, CustomCommand};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Mutex;

/// The fault menu.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, clap::ValueEnum)]
pub enum FaultKind {
    /// `CLIENT KILL TYPE normal` on a node, every few milliseconds for a few seconds: command
    /// connections drop with appends, reads and publishes in flight.
    KillNormal,
    /// `CLIENT KILL TYPE pubsub` on a node, likewise: subscriptions drop.
    KillPubsub,
    /// `CLIENT PAUSE` on a node (writes only, or everything) for up to 3 s.
    Pause,
    /// A Redis master SIGKILLed, started again seconds later (on a cluster its replica takes
    /// over meanwhile; one Redis restarts from its append-only file).
    MasterKill,
    /// A cluster master SIGSTOPped past `cluster-node-timeout` (its replica takes over), then
    /// resumed (it comes back as a replica).
    MasterStop,
    /// A persister SIGKILLed, started again seconds later.
    PersisterKill,
    /// A persister SIGSTOPped past `LEASE_MS` (the others take its partitions), resumed,
    /// and sometimes restarted after that.
    PersisterStop,
    /// A gateway SIGKILLed and started again: its clients reconnect elsewhere and catch up.
    GatewayKill,
    /// The store SIGSTOPped for a few seconds.
    StoreStop,
}

impl FaultKind {
    pub const ALL: [FaultKind; 9] = [
        FaultKind::KillNormal,
        FaultKind::KillPubsub,
        FaultKind::Pause,
        FaultKind::MasterKill,
        FaultKind::MasterStop,
        FaultKind::PersisterKill,
        FaultKind::PersisterStop,
        FaultKind::GatewayKill,
        FaultKind::StoreStop,
    ];

    /// The name on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            FaultKind::KillNormal => "kill-normal",
            FaultKind::KillPubsub => "kill-pubsub",
            FaultKind::Pause => "pause",
            FaultKind::MasterKill => "master-kill",
            FaultKind::MasterStop => "master-stop",
            FaultKind::PersisterKill => "persister-kill",
            FaultKind::PersisterStop => "persister-stop",
            FaultKind::GatewayKill => "gateway-kill",
            FaultKind::StoreStop => "store-stop",
        }
    }

    /// Whether the fault applies to the Redis deployment (a stopped master fails over only
    /// where there is a replica).
    pub fn applies_to(self, mode: RedisMode) -> bool {
        !(self == FaultKind::MasterStop && mode == RedisMode::Single)
    }

    /// Whether it takes a Redis node down (one at a time).
    fn takes_redis_down(self) -> bool {
        matches!(self, FaultKind::MasterKill | FaultKind::MasterStop)
    }
}

/// One fault of the schedule.
#[derive(Debug, Clone)]
pub struct Planned {
    pub kind: FaultKind,
    /// Seconds after the run started.
    pub start: f64,
    pub length: f64,
    /// Which node or process, as a fraction: the target is picked among those that exist
    /// when the fault starts (a cluster's masters move).
    pub pick: f64,
    /// Milliseconds between kills (`kill-*`); whether to pause everything (`pause`); whether
    /// to restart after resuming (`persister-stop`).
    pub every_ms: u64,
    pub all: bool,
}

/// Draws the schedule of a run: faults starting on average every `mean_gap` seconds.
pub fn schedule(
    seed: u64,
    duration: f64,
    mean_gap: f64,
    kinds: &[FaultKind],
    tuning_lease_ms: u64,
) -> Vec<Planned> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut plan: Vec<Planned> = Vec::new();
    let mut t = rng.random_range(0.5..2.0);
    let lease = tuning_lease_ms as f64 / 1000.0;
    while t < duration && !kinds.is_empty() {
        let kind = kinds[rng.random_range(0..kinds.len())];
        let length = match kind {
            FaultKind::KillNormal | FaultKind::KillPubsub => rng.random_range(0.5..4.0),
            FaultKind::Pause => rng.random_range(0.2..3.0),
            FaultKind::MasterKill => rng.random_range(2.0..6.0),
            // Past the cluster's node timeout (1 s): its replica is promoted.
            FaultKind::MasterStop => rng.random_range(2.5..5.0),
            FaultKind::PersisterKill => rng.random_range(0.5..5.0),
            FaultKind::PersisterStop => lease + rng.random_range(0.3..3.0),
            FaultKind::GatewayKill => rng.random_range(0.5..3.0),
            FaultKind::StoreStop => rng.random_range(0.5..4.0),
        };
        let planned = Planned {
            kind,
            start: t,
            length,
            pick: rng.random(),
            every_ms: rng.random_range(5..50),
            all: rng.random_bool(0.5),
        };
        // One Redis node down at a time, or a shard could lose both copies.
        let clash = kind.takes_redis_down()
            && plan.iter().any(|p| {
                p.kind.takes_redis_down()
                    && p.start < t + length + 3.0
                    && t < p.start + p.length + 3.0
            });
        if !clash {
            plan.push(planned);
        }
        // Exponential gaps: faults bunch up and overlap now and then.
        let u: f64 = rng.random_range(f64::EPSILON..1.0);
        t += -mean_gap * u.ln();
    }
    plan
}

/// Runs a schedule against the topology, recording each fault as it happens. Returns when
/// the last one has ended.
pub async fn run(plan: Vec<Planned>, topology: Arc<Mutex<Topology>>, history: History) {
    let busy = Arc::new(std::sync::Mutex::new(Busy::default()));
    let mut tasks = Vec::new();
    for planned in plan {
        let (topology, history, busy) = (topology.clone(), history.clone(), busy.clone());
        tasks.push(tokio::spawn(async move {
            let wait = planned.start - history.now();
            if wait > 0.0 {
                tokio::time::sleep(Duration::from_secs_f64(wait)).await;
            }
            let start = history.now();
            let target = inject(&planned, &topology, &busy).await;
            if let Some(target) = target {
                history.record(Event::Fault {
                    kind: planned.kind.name().to_owned(),
                    target,
                    start,
                    end: history.now(),
                });
            }
        }));
    }
    for task in tasks {
        let _ = task.await;
    }
}

/// What faults hold now, so that two faults do not take the same thing at once.
#[derive(Default)]
struct Busy {
    redis_down: bool,
    gateways: Vec<usize>,
    persisters: Vec<usize>,
}

/// Picks one of `n` things by `pick`, skipping those taken, keeping at least one free.
fn choose(pick: f64, n: usize, taken: &[usize]) -> Option<usize> {
    let free: Vec<usize> = (0..n).filter(|i| !taken.contains(i)).collect();
    if free.len() <= 1 {
        return None;
    }
    Some(free[((pick * free.len() as f64) as usize).min(free.len() - 1)])
}

/// Carries one fault out; returns what it hit, or `None` when nothing could be taken.
async fn inject(
    p: &Planned,
    topology: &Arc<Mutex<Topology>>,
    busy: &Arc<std::sync::Mutex<Busy>>,
) -> Option<String> {
    let length = Duration::from_secs_f64(p.length);
    match p.kind {
        FaultKind::KillNormal | FaultKind::KillPubsub => {
            let ports = topology.lock().await.redis_ports();
            let port = ports[((p.pick * ports.len() as f64) as usize).min(ports.len() - 1)];
            let kind = if p.kind == FaultKind::KillNormal {
                "normal"
            } else {
                "pubsub"
            };
            let client = admin_client(port).await?;
            let until = tokio::time::Instant::now() + length;
            while tokio::time::Instant::now() < until {
                let _: Result<Value, _> = client
                    .custom(command("CLIENT"), vec!["KILL", "TYPE", kind])
                    .await;
                tokio::time::sleep(Duration::from_millis(p.every_ms)).await;
            }
            let _ = client.quit().await;
            Some(format!(
                "{kind} connections of :{port} every {} ms",
                p.every_ms
            ))
        }
        FaultKind::Pause => {
            let ports = topology.lock().await.redis_ports();
            let port = ports[((p.pick * ports.len() as f64) as usize).min(ports.len() - 1)];
            let mode = if p.all { "ALL" } else { "WRITE" };
            let client = admin_client(port).await?;
            let millis = length.as_millis().to_string();
            let _: Result<Value, _> = client
                .custom(command("CLIENT"), vec!["PAUSE", millis.as_str(), mode])
                .await;
            tokio::time::sleep(length).await;
            let _ = client.quit().await;
            Some(format!(":{port} ({mode})"))
        }
        FaultKind::MasterKill | FaultKind::MasterStop => {
            {
                let mut b = busy.lock().unwrap_or_else(|e| e.into_inner());
                if b.redis_down {
                    return None;
                }
                b.redis_down = true;
            }
            let masters = topology.lock().await.masters().await;
            let target = if masters.is_empty() {
                None
            } else {
                Some(masters[((p.pick * masters.len() as f64) as usize).min(masters.len() - 1)])
            };
            if let Some(port) = target {
                if p.kind == FaultKind::MasterKill {
                    topology.lock().await.kill_redis(port);
                    tokio::time::sleep(length).await;
                    topology.lock().await.restart_redis(port).await;
                } else {
                    let pid = topology.lock().await.redis_pid(port);
                    if let Some(pid) = pid {
                        testkit::servers::signal(pid, "STOP");
                        tokio::time::sleep(length).await;
                        testkit::servers::signal(pid, "CONT");
                    }
                }
            }
            busy.lock().unwrap_or_else(|e| e.into_inner()).redis_down = false;
            target.map(|port| format!(":{port}"))
        }
        FaultKind::PersisterKill | FaultKind::PersisterStop => {
            let index = {
                let mut b = busy.lock().unwrap_or_else(|e| e.into_inner());
                let index = choose(p.pick, 3, &b.persisters)?;
                b.persisters.push(index);
                index
            };
            let name = topology.lock().await.persisters[index].name.clone();
            if p.kind == FaultKind::PersisterKill {
                topology.lock().await.persisters[index].kill();
                tokio::time::sleep(length).await;
                topology.lock().await.persisters[index].restart();
            } else {
                topology.lock().await.persisters[index].pause();
                tokio::time::sleep(length).await;
                let mut t = topology.lock().await;
                t.persisters[index].resume();
                if p.all {
                    t.persisters[index].restart();
                }
            }
            busy.lock()
                .unwrap_or_else(|e| e.into_inner())
                .persisters
                .retain(|i| *i != index);
            Some(if p.kind == FaultKind::PersisterStop && p.all {
                format!("{name} (then restarted)")
            } else {
                name
            })
        }
        FaultKind::GatewayKill => {
            let index = {
                let mut b = busy.lock().unwrap_or_else(|e| e.into_inner());
                let index = choose(p.pick, 3, &b.gateways)?;
                b.gateways.push(index);
                index
            };
            let name = topology.lock().await.gateways[index].name.clone();
            topology.lock().await.gateways[index].kill();
            tokio::time::sleep(length).await;
            topology.lock().await.gateways[index].restart();
            busy.lock()
                .unwrap_or_else(|e| e.into_inner())
                .gateways
                .retain(|i| *i != index);
            Some(name)
        }
        FaultKind::StoreStop => {
            topology.lock().await.pause_store();
            tokio::time::sleep(length).await;
            topology.lock().await.resume_store();
            Some("SecantusDB".into())
        }
    }
}

fn command(name: &'static str) -> CustomCommand {
    CustomCommand::new_static(name, ClusterHash::Random, false)
}

/// A plain connection to one node, for the commands that act on that node.
async fn admin_client(port: u16) -> Option<Client> {
    let config = Config::from_url(&format!("redis://127.0.0.1:{port}")).ok()?;
    let client = Builder::from_config(config)
        .with_connection_config(|c| c.connection_timeout = Duration::from_secs(2))
        .with_performance_config(|p| p.default_command_timeout = Duration::from_secs(2))
        .build()
        .ok()?;
    client.init().await.ok()?;
    Some(client)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_seed_gives_the_same_schedule() {
        let kinds = FaultKind::ALL;
        let a = schedule(7, 120.0, 3.0, &kinds, 2000);
        let b = schedule(7, 120.0, 3.0, &kinds, 2000);
        let c = schedule(8, 120.0, 3.0, &kinds, 2000);
        let show = |p: &[Planned]| format!("{p:?}");
        assert_eq!(show(&a), show(&b));
        assert_ne!(show(&a), show(&c));
        assert!(a.len() > 20, "{}", a.len());
        // Never two Redis nodes down at once.
        let down: Vec<&Planned> = a.iter().filter(|p| p.kind.takes_redis_down()).collect();
        for pair in down.windows(2) {
            assert!(pair[1].start >= pair[0].start + pair[0].length);
        }
        // Faults overlap.
        assert!(a.windows(2).any(|w| w[1].start < w[0].start + w[0].length));
    }
}
