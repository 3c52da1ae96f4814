//! Real Redis and a real MongoDB-protocol server (SecantusDB), each on a free port,
//! owned by the test and killed when dropped.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A port nothing listens on, never the same twice in one test process (the kernel may
/// hand a just-released port out again before its first taker binds it).
pub fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut given = GIVEN.lock().unwrap();
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
}

/// Waits until something accepts TCP connections on `port`.
pub async fn wait_for_port(port: u16, what: &str, child: &mut Child) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            return;
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!("{what} exited before listening: {status}");
        }
        assert!(
            Instant::now() < deadline,
            "{what} did not listen on {port} within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The workspace's root: this crate lives in `loadtest/testkit`.
fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .nth(2)
        .unwrap()
        .to_path_buf()
}

/// A Redis server with an append-only file synced on every write, so that a test can
/// kill and restart it without losing data, as a production Redis should be run.
pub struct Redis {
    pub port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
    /// The master's port, for a replica.
    replica_of: Option<u16>,
}

impl Redis {
    pub async fn start() -> Self {
        Self::start_as(None).await
    }

    /// A replica of the Redis on `master`'s port.
    pub async fn replica_of(master: u16) -> Self {
        Self::start_as(Some(master)).await
    }

    async fn start_as(replica_of: Option<u16>) -> Self {
        let mut redis = Self {
            port: free_port(),
            dir: tempfile::tempdir().unwrap(),
            child: None,
            replica_of,
        };
        redis.restart().await;
        redis
    }

    /// Starts (again) on the same port and data directory.
    pub async fn restart(&mut self) {
        self.kill();
        let bin = std::env::var("REDIS_SERVER").unwrap_or_else(|_| "redis-server".into());
        let child = Command::new(&bin)
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
            ])
            .args(["--appendonly", "yes", "--appendfsync", "always"])
            .args(
                self.replica_of
                    .map(|master| {
                        vec!["--replicaof".into(), "127.0.0.1".into(), master.to_string()]
                    })
                    .unwrap_or_default(),
            )
            .arg("--dir")
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {bin} (install redis-server): {e}"));
        // Owned by `self` before waiting, so that a panic or a cancelled start (e.g. the
        // other server of a `join!` failing) kills it instead of leaving it running.
        let child = self.child.insert(child);
        wait_for_port(self.port, "redis-server", child).await;
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// The server's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// Waits until the shard channel `channel` has `expected` subscribers (a subscription is
    /// acknowledged on the subscriber's own connection, a moment before every other client
    /// sees it).
    pub async fn wait_shard_numsub(&self, channel: &str, expected: i64) {
        wait_shard_numsub(&[self.port], channel, expected).await
    }

    /// Runs a command with `redis-cli` and returns its output.
    pub async fn cli(&self, args: &[&str]) -> String {
        redis_cli(self.port, args).await
    }

    /// Kills the server (SIGKILL).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
    }
}

pub struct Mongo {
    pub port: u16,
    child: Child,
}

impl Mongo {
    pub async fn start() -> Self {
        let bin = std::env::var("SECANTUSD")
            .map(PathBuf::from)
            .unwrap_or_else(|_| workspace_root().join(".venv/bin/secantusd-py"));
        let port = free_port();
        let child = Command::new(&bin)
            .args([
                "--host",
                "127.0.0.1",
                "--port",
                &port.to_string(),
                "--storage-path",
                ":memory:",
                "--log-level",
                "WARNING",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start {} (run scripts/test.sh once to create the venv): {e}",
                    bin.display()
                )
            });
        // Owned (and so killed on drop) before waiting, as for Redis.
        let mut mongo = Self { port, child };
        wait_for_port(port, "secantusd-py", &mut mongo.child).await;
        mongo
    }

    pub fn uri(&self) -> String {
        format!("mongodb://127.0.0.1:{}", self.port)
    }

    /// Sends a signal by name (`STOP` pauses the store, `CONT` resumes it).
    pub fn signal(&self, name: &str) {
        signal(self.child.id(), name);
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

/// Sends a signal by name (`TERM`, `STOP`, `CONT`…) to a process this test started.
pub fn signal(pid: u32, name: &str) {
    let status = Command::new("kill")
        .args([&format!("-{name}"), &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success(), "kill -{name} {pid}");
}

impl Drop for Mongo {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `redis-cli -c` (following cluster redirections) against a port; returns stdout.
pub async fn redis_cli(port: u16, args: &[&str]) -> String {
    try_redis_cli(port, args)
        .await
        .unwrap_or_else(|error| panic!("{error}"))
}

/// [`redis_cli`] without panicking: stdout, or what went wrong (for failure reports, where
/// an unreachable node is worth saying rather than hiding the rest).
pub async fn try_redis_cli(port: u16, args: &[&str]) -> Result<String, String> {
    let out = tokio::process::Command::new("redis-cli")
        .args(["-c", "-p", &port.to_string()])
        .args(args)
        .output()
        .await
        .map_err(|e| format!("redis-cli did not run: {e}"))?;
    if !out.status.success() {
        return Err(format!("redis-cli {args:?}: {out:?}"));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `PUBSUB SHARDNUMSUB channel`: the subscribers connected to the node on `port`.
pub async fn shard_numsub(port: u16, channel: &str) -> i64 {
    let out = redis_cli(port, &["PUBSUB", "SHARDNUMSUB", channel]).await;
    out.lines()
        .last()
        .and_then(|l| l.trim().parse().ok())
        .unwrap_or_else(|| panic!("SHARDNUMSUB {channel}: {out:?}"))
}

/// Waits until a shard channel has `expected` subscribers over the nodes on `ports`, as
/// Redis itself counts them.
pub async fn wait_shard_numsub(ports: &[u16], channel: &str, expected: i64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut now = 0;
        for port in ports {
            now += shard_numsub(*port, channel).await;
        }
        if now == expected {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{channel} has {now} subscribers, expected {expected}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A Redis Cluster of 3 masters and 3 replicas (`redis-server --cluster-enabled yes` on 6
/// free ports, joined by `redis-cli --cluster create … --cluster-replicas 1`), each node
/// with an append-only file synced on every write, owned by the test.
pub struct RedisCluster {
    pub nodes: Vec<ClusterNode>,
}

pub struct ClusterNode {
    pub port: u16,
    /// The cluster bus port, chosen free too: by default Redis takes `port + 10000`, which
    /// may be taken, or past 65535.
    bus_port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl ClusterNode {
    fn spawn(&mut self) {
        let bin = std::env::var("REDIS_SERVER").unwrap_or_else(|_| "redis-server".into());
        let child = Command::new(&bin)
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args([
                "--save",
                "",
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
            ])
            .args([
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                "nodes.conf",
            ])
            .args(["--cluster-port", &self.bus_port.to_string()])
            // Fail over within about two seconds of a master's death.
            .args(["--cluster-node-timeout", "1000"])
            .arg("--dir")
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {bin} (install redis-server): {e}"));
        self.child = Some(child);
    }

    /// SIGKILL.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the node again on its port and data (it rejoins the cluster from its
    /// `nodes.conf`; a master that was failed over comes back as a replica).
    pub async fn restart(&mut self) {
        self.kill();
        self.spawn();
        let port = self.port;
        wait_for_port(port, "redis-server (cluster)", self.child.as_mut().unwrap()).await;
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// The node's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }
}

impl Drop for ClusterNode {
    fn drop(&mut self) {
        self.kill();
    }
}

impl RedisCluster {
    pub async fn start() -> Self {
        let mut nodes: Vec<ClusterNode> = (0..6)
            .map(|_| ClusterNode {
                port: free_port(),
                bus_port: free_port(),
                dir: tempfile::tempdir().unwrap(),
                child: None,
            })
            .collect();
        for node in &mut nodes {
            node.spawn();
        }
        for node in &mut nodes {
            let port = node.port;
            wait_for_port(port, "redis-server (cluster)", node.child.as_mut().unwrap()).await;
        }
        let addresses: Vec<String> = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        let out = tokio::process::Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(&addresses)
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .output()
            .await
            .expect("redis-cli runs");
        assert!(out.status.success(), "cluster create: {out:?}");
        let cluster = Self { nodes };
        cluster.wait_healthy().await;
        cluster
    }

    /// `redis-cluster://` URL naming three of the nodes (the rest are discovered).
    pub fn url(&self) -> String {
        let mut url = format!("redis-cluster://127.0.0.1:{}", self.nodes[0].port);
        for n in &self.nodes[1..3] {
            url.push_str(&format!(
                "{}node=127.0.0.1:{}",
                if url.contains('?') { '&' } else { '?' },
                n.port
            ));
        }
        url
    }

    /// A running node to send commands to.
    pub fn any_port(&self) -> u16 {
        self.nodes.iter().find(|n| n.is_running()).unwrap().port
    }

    /// Waits until every running node sees the cluster as ok with every slot served.
    pub async fn wait_healthy(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        'again: loop {
            assert!(
                Instant::now() < deadline,
                "the cluster did not become healthy"
            );
            for node in self.nodes.iter().filter(|n| n.is_running()) {
                let info = redis_cli(node.port, &["CLUSTER", "INFO"]).await;
                if !info.contains("cluster_state:ok") || !info.contains("cluster_slots_ok:16384") {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue 'again;
                }
            }
            return;
        }
    }

    /// The port of the master that serves `key`'s slot, as the cluster sees it now (`None`
    /// between a master's failure and its replica's promotion).
    pub async fn master_of(&self, key: &str) -> Option<u16> {
        let slot: u16 = redis_cli(self.any_port(), &["CLUSTER", "KEYSLOT", key])
            .await
            .trim()
            .parse()
            .unwrap();
        // `<id> <ip:port@cport> <flags> <master> <ping> <pong> <epoch> <state> <slots...>`
        let nodes = redis_cli(self.any_port(), &["CLUSTER", "NODES"]).await;
        for line in nodes.lines() {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let flags: Vec<&str> = fields.get(2).map_or(Vec::new(), |f| f.split(',').collect());
            // A master only suspected of failure (`fail?`) still serves its slots.
            if fields.len() < 9 || !flags.contains(&"master") || flags.contains(&"fail") {
                continue;
            }
            let serves = fields[8..].iter().any(|range| {
                let (start, end) = range.split_once('-').unwrap_or((range, range));
                matches!((start.parse::<u16>(), end.parse::<u16>()), (Ok(s), Ok(e)) if (s..=e).contains(&slot))
            });
            if serves {
                let address = fields[1].split('@').next().unwrap();
                return address.rsplit(':').next()?.parse().ok();
            }
        }
        None
    }

    /// The node on `port`.
    pub fn node(&mut self, port: u16) -> &mut ClusterNode {
        self.nodes.iter_mut().find(|n| n.port == port).unwrap()
    }
}
