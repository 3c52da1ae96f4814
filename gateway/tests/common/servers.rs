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

fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// A Redis server with an append-only file synced on every write, so that a test can
/// kill and restart it without losing data, as a production Redis should be run.
pub struct Redis {
    pub port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl Redis {
    pub async fn start() -> Self {
        let mut redis = Self {
            port: free_port(),
            dir: tempfile::tempdir().unwrap(),
            child: None,
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

    /// Waits until `channel` has `expected` subscribers (a subscription is acknowledged on
    /// the subscriber's own connection, a moment before every other client sees it).
    pub async fn wait_numsub(&self, channel: &str, expected: i64) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let now = self.numsub(channel).await;
            if now == expected {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{channel} has {now} subscribers, expected {expected}"
            );
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    }

    /// `PUBSUB NUMSUB channel`: how many connections are subscribed to it.
    pub async fn numsub(&self, channel: &str) -> i64 {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut conn = tokio::net::TcpStream::connect(("127.0.0.1", self.port))
            .await
            .unwrap();
        let command = format!(
            "*3\r\n$6\r\nPUBSUB\r\n$6\r\nNUMSUB\r\n${}\r\n{channel}\r\n",
            channel.len()
        );
        conn.write_all(command.as_bytes()).await.unwrap();
        // `*2 $<n> <channel> :<count>`: the count is the last line.
        let mut reply = Vec::new();
        while !reply.ends_with(b"\r\n") || !reply.contains(&b':') {
            let mut buf = [0u8; 256];
            let n = conn.read(&mut buf).await.unwrap();
            assert!(n > 0, "redis closed the connection");
            reply.extend_from_slice(&buf[..n]);
        }
        let text = String::from_utf8(reply).unwrap();
        let count = text.rsplit(':').next().unwrap().trim();
        count.parse().unwrap()
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
}

impl Drop for Mongo {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
