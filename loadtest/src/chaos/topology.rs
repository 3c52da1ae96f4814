//! The deployment a chaos run starts for itself, on this machine: one Redis or a Redis
//! Cluster of 3 masters and 3 replicas, SecantusDB standing in for MongoDB, 3 persisters and
//! 3 gateways as processes, each with its log in the run's directory.

use anyhow::Context;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use testkit::procs::Proc;
use testkit::servers::{Mongo, Redis, RedisCluster, free_port, try_redis_cli};

/// One Redis or a cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum RedisMode {
    Single,
    Cluster,
}

/// The server API key of the run's gateways (the backend's server events).
pub const SERVER_API_KEY: &str = "chaos-run-server-api-key-of-32-bytes-or-more";

/// How the services are tuned for a run that must see takeovers within seconds.
#[derive(Debug, Clone)]
pub struct Tuning {
    pub lease_ms: u64,
    /// `INGEST_MIN_REPLICAS`: 1 on a cluster (a master failover then loses nothing
    /// acknowledged), 0 on one Redis.
    pub min_replicas: u32,
    pub jwt_secret: String,
}

/// A gateway or a persister process, restartable on the same ports.
pub struct Service {
    pub name: String,
    binary: &'static str,
    /// The Socket.IO and REST port (gateways).
    pub port: u16,
    pub admin_port: u16,
    env: Vec<(String, String)>,
    log: PathBuf,
    proc: Option<Proc>,
    stopped: bool,
}

impl Service {
    fn start(&mut self) {
        self.proc = Some(Proc::spawn_logged(
            &self.name,
            self.binary,
            &self.env,
            &self.log,
        ));
        self.stopped = false;
    }

    /// SIGKILL.
    pub fn kill(&mut self) {
        if let Some(mut proc) = self.proc.take() {
            proc.kill();
        }
        self.stopped = false;
    }

    /// Starts it again (killed first if it still runs).
    pub fn restart(&mut self) {
        self.kill();
        self.start();
    }

    /// SIGSTOP.
    pub fn pause(&mut self) {
        if let Some(proc) = &self.proc {
            proc.signal("STOP");
            self.stopped = true;
        }
    }

    /// SIGCONT.
    pub fn resume(&mut self) {
        if let Some(proc) = &self.proc {
            proc.signal("CONT");
        }
        self.stopped = false;
    }

    /// Running, not stopped, and a process that did not exit by itself.
    pub fn heal(&mut self) {
        if self.stopped {
            self.resume();
        }
        let exited = self.proc.as_mut().is_none_or(Proc::has_exited);
        if exited {
            self.restart();
        }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

/// The Redis side.
pub enum RedisSide {
    Single(Redis),
    Cluster(RedisCluster),
}

pub struct Topology {
    pub dir: PathBuf,
    pub redis: RedisSide,
    pub mongo: Mongo,
    pub prefix: String,
    pub db: String,
    pub gateways: Vec<Service>,
    pub persisters: Vec<Service>,
    pub tuning: Tuning,
    store_paused: bool,
}

impl Topology {
    /// Starts everything and waits until every service is ready.
    pub async fn start(mode: RedisMode, dir: &Path, tuning: Tuning) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let mongo = Mongo::start().await;
        let redis = match mode {
            RedisMode::Single => RedisSide::Single(Redis::start().await),
            RedisMode::Cluster => RedisSide::Cluster(RedisCluster::start().await),
        };
        let mut topology = Self {
            dir: dir.to_owned(),
            redis,
            mongo,
            prefix: "chaos".into(),
            db: "chaos".into(),
            gateways: Vec::new(),
            persisters: Vec::new(),
            tuning,
            store_paused: false,
        };
        for i in 0..3 {
            let service = topology.service(&format!("persister-{i}"), "persister");
            topology.persisters.push(service);
        }
        for i in 0..3 {
            let service = topology.service(&format!("gateway-{i}"), "gateway");
            topology.gateways.push(service);
        }
        for s in topology.persisters.iter_mut().chain(&mut topology.gateways) {
            s.start();
        }
        topology.wait_ready(Duration::from_secs(60)).await?;
        Ok(topology)
    }

    fn service(&self, name: &str, binary: &'static str) -> Service {
        let (port, admin_port) = (free_port(), free_port());
        let t = &self.tuning;
        let mut env: Vec<(String, String)> = vec![
            ("HOST".into(), "127.0.0.1".into()),
            ("METRICS_PORT".into(), admin_port.to_string()),
            ("REDIS_URL".into(), self.redis_url()),
            ("REDIS_PREFIX".into(), self.prefix.clone()),
            ("MONGODB_URI".into(), self.mongo.uri()),
            ("MONGODB_DB".into(), self.db.clone()),
            ("INGEST_MIN_REPLICAS".into(), t.min_replicas.to_string()),
        ];
        if binary == "gateway" {
            env.extend([
                ("PORT".into(), port.to_string()),
                ("JWT_SECRET".into(), t.jwt_secret.clone()),
                ("SERVER_API_KEY".into(), SERVER_API_KEY.into()),
                // The clients reconnect and rejoin often, on purpose.
                ("JOINS_PER_SECOND".into(), "1000".into()),
                ("JOIN_BURST".into(), "1000".into()),
                ("EVENTS_PER_SECOND".into(), "1000".into()),
                ("EVENT_BURST".into(), "1000".into()),
            ]);
        } else {
            env.extend([
                ("PERSISTER_NAME".into(), name.to_owned()),
                ("LEASE_MS".into(), t.lease_ms.to_string()),
                ("READ_BLOCK_MS".into(), (t.lease_ms / 8).max(50).to_string()),
            ]);
        }
        Service {
            name: name.to_owned(),
            binary,
            port,
            admin_port,
            env,
            log: self.dir.join(format!("{name}.log")),
            proc: None,
            stopped: false,
        }
    }

    pub fn redis_url(&self) -> String {
        match &self.redis {
            RedisSide::Single(redis) => redis.url(),
            RedisSide::Cluster(cluster) => cluster.url(),
        }
    }

    /// The ports of every Redis node, running or not.
    pub fn redis_ports(&self) -> Vec<u16> {
        match &self.redis {
            RedisSide::Single(redis) => vec![redis.port],
            RedisSide::Cluster(cluster) => cluster.nodes.iter().map(|n| n.port).collect(),
        }
    }

    /// The ports of the nodes that serve slots now (the one Redis; a cluster's masters).
    pub async fn masters(&self) -> Vec<u16> {
        match &self.redis {
            RedisSide::Single(redis) => vec![redis.port],
            RedisSide::Cluster(cluster) => {
                let mut masters = Vec::new();
                for node in cluster.nodes.iter().filter(|n| n.is_running()) {
                    let Ok(nodes) = try_redis_cli(node.port, &["CLUSTER", "NODES"]).await else {
                        continue;
                    };
                    for line in nodes.lines() {
                        let fields: Vec<&str> = line.split_whitespace().collect();
                        let flags = fields.get(2).copied().unwrap_or_default();
                        if fields.len() >= 9 && flags.contains("master") && !flags.contains("fail")
                        {
                            let address = fields[1].split('@').next().unwrap_or_default();
                            if let Some(port) =
                                address.rsplit(':').next().and_then(|p| p.parse().ok())
                            {
                                masters.push(port);
                            }
                        }
                    }
                    break;
                }
                masters
            }
        }
    }

    /// Kills the Redis node on `port`.
    pub fn kill_redis(&mut self, port: u16) {
        match &mut self.redis {
            RedisSide::Single(redis) => redis.kill(),
            RedisSide::Cluster(cluster) => cluster.node(port).kill(),
        }
    }

    /// Starts the Redis node on `port` again, on its data.
    pub async fn restart_redis(&mut self, port: u16) {
        match &mut self.redis {
            RedisSide::Single(redis) => redis.restart().await,
            RedisSide::Cluster(cluster) => cluster.node(port).restart().await,
        }
    }

    /// The process of the Redis node on `port`, while it runs.
    pub fn redis_pid(&mut self, port: u16) -> Option<u32> {
        match &mut self.redis {
            RedisSide::Single(redis) => redis.pid(),
            RedisSide::Cluster(cluster) => cluster.node(port).pid(),
        }
    }

    pub fn pause_store(&mut self) {
        self.mongo.signal("STOP");
        self.store_paused = true;
    }

    pub fn resume_store(&mut self) {
        self.mongo.signal("CONT");
        self.store_paused = false;
    }

    /// Every process running and resumed, every Redis node up and unpaused.
    pub async fn heal(&mut self) {
        if self.store_paused {
            self.resume_store();
        }
        for port in self.redis_ports() {
            if let Some(pid) = self.redis_pid(port) {
                testkit::servers::signal(pid, "CONT");
            } else {
                self.restart_redis(port).await;
            }
            let _ = try_redis_cli(port, &["CLIENT", "UNPAUSE"]).await;
        }
        if let RedisSide::Cluster(cluster) = &self.redis {
            cluster.wait_healthy().await;
        }
        for s in self.persisters.iter_mut().chain(&mut self.gateways) {
            s.heal();
        }
    }

    /// Waits until every service answers `/readyz` with 200.
    pub async fn wait_ready(&self, timeout: Duration) -> anyhow::Result<()> {
        let http = reqwest::Client::new();
        let deadline = Instant::now() + timeout;
        for s in self.persisters.iter().chain(&self.gateways) {
            let url = format!("http://127.0.0.1:{}/readyz", s.admin_port);
            loop {
                let ready = http
                    .get(&url)
                    .timeout(Duration::from_secs(2))
                    .send()
                    .await
                    .is_ok_and(|r| r.status().is_success());
                if ready {
                    break;
                }
                anyhow::ensure!(
                    Instant::now() < deadline,
                    "{} not ready within {timeout:?} (its log: {})",
                    s.name,
                    s.log.display()
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        Ok(())
    }

    /// Entries of every ingest partition not yet stored and acknowledged.
    pub async fn backlog(&self) -> anyhow::Result<u64> {
        let keys = shared::backplane::Keys::new(&self.prefix, 16);
        let port = self
            .redis_ports()
            .into_iter()
            .next()
            .context("no Redis node")?;
        let mut total = 0;
        for p in 0..keys.partitions() {
            let out = try_redis_cli(port, &["XLEN", &keys.ingest_stream(p)])
                .await
                .map_err(anyhow::Error::msg)?;
            total += out.trim().parse::<u64>().unwrap_or(0);
        }
        Ok(total)
    }
}
