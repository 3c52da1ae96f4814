//! `TestApp`: real Redis, real SecantusDB, an in-process persister and N gateways on free
//! ports, with a unique database name and Redis prefix per test.
//!
//! With `CHAT_TEST_MODE=embedded` the same tests run against the embedded mode instead: one
//! gateway process-in-test with its in-process backplane and persister and a SQLite store in
//! a temporary directory; "gateway N" is then that same gateway.
//!
//! With `CHAT_TEST_REDIS=cluster` they run against a Redis Cluster of 3 masters and 3
//! replicas instead of one Redis, with 3 persisters (all started with the same name).
#![allow(dead_code)] // each test binary uses a different part of the harness

pub mod procs;
pub mod servers;
pub mod sio;

use clap::Parser;
use reqwest::StatusCode;
use serde_json::{Value, json};
use servers::{Mongo, Redis, RedisCluster};
use sio::SioClient;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

pub const JWT_SECRET: &str = "integration-test-secret-of-32-bytes-or-more";
/// The server API key of the test gateways.
pub const SERVER_API_KEY: &str = "integration-test-server-api-key-of-32-bytes";

pub struct Gateway {
    pub port: u16,
    pub admin_port: u16,
    /// Stops an in-process gateway.
    pub stop: CancellationToken,
    /// Set for a gateway running as its own process.
    pub process: Option<procs::Proc>,
}

pub struct TestApp {
    /// Whether the gateways run in the embedded mode (`CHAT_TEST_MODE=embedded`).
    pub embedded: bool,
    /// Data directories of embedded gateways.
    pub data_root: tempfile::TempDir,
    /// The single Redis (also started in cluster mode, where nothing uses it).
    pub redis: Redis,
    /// The Redis Cluster every service uses instead, with `CHAT_TEST_REDIS=cluster`.
    pub cluster: Option<RedisCluster>,
    pub mongo: Mongo,
    pub prefix: String,
    pub db: String,
    pub gateways: Vec<Gateway>,
    pub persister_stop: CancellationToken,
    pub http: reqwest::Client,
}

/// Whether this run uses a Redis Cluster (`CHAT_TEST_REDIS=cluster`).
pub fn cluster_mode() -> bool {
    std::env::var("CHAT_TEST_REDIS").as_deref() == Ok("cluster")
}

fn unique(name: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "{name}_{}_{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

impl TestApp {
    /// Real servers, a persister (three on a cluster) and `gateways` gateways; a Redis
    /// Cluster when `CHAT_TEST_REDIS=cluster`.
    pub async fn spawn(gateways: usize) -> Self {
        Self::spawn_with(gateways, cluster_mode()).await
    }

    /// The same on a Redis Cluster (`true`) or a single Redis, whatever the environment says.
    pub async fn spawn_with(gateways: usize, on_cluster: bool) -> Self {
        // `RUST_LOG=debug cargo test` shows the services' logs of failing tests.
        let _ = tracing_subscriber::fmt()
            .with_test_writer()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .try_init();
        let (redis, mongo) = tokio::join!(Redis::start(), Mongo::start());
        let embedded = std::env::var("CHAT_TEST_MODE").as_deref() == Ok("embedded");
        let cluster = if on_cluster && !embedded {
            Some(RedisCluster::start().await)
        } else {
            None
        };
        let prefix = unique("t");
        let db = unique("chat");
        let mut app = Self {
            embedded,
            data_root: tempfile::tempdir().expect("temporary directory"),
            redis,
            cluster,
            mongo,
            prefix,
            db,
            gateways: Vec::new(),
            persister_stop: CancellationToken::new(),
            http: reqwest::Client::new(),
        };
        app.start_persister().await;
        if app.cluster.is_some() {
            // Every tier scaled out: three persisters, sharing the partitions.
            let mut stops = vec![app.persister_stop.clone()];
            for _ in 0..2 {
                app.start_persister().await;
                stops.push(app.persister_stop.clone());
            }
            app.persister_stop = CancellationToken::new();
            let all = app.persister_stop.clone();
            tokio::spawn(async move {
                all.cancelled().await;
                stops.iter().for_each(CancellationToken::cancel);
            });
        }
        for i in 0..gateways {
            if app.embedded && i > 0 {
                // One embedded gateway is the whole server: "gateway i" is that one.
                let first = &app.gateways[0];
                let same = Gateway {
                    port: first.port,
                    admin_port: first.admin_port,
                    stop: first.stop.clone(),
                    process: None,
                };
                app.gateways.push(same);
                continue;
            }
            app.add_gateway().await;
        }
        app
    }

    /// The URL of this test's Redis: the cluster's in cluster mode.
    pub fn redis_url(&self) -> String {
        match &self.cluster {
            Some(cluster) => cluster.url(),
            None => self.redis.url(),
        }
    }

    /// A port of this test's Redis (any node of the cluster), for `redis-cli -c`.
    pub fn redis_port(&self) -> u16 {
        match &self.cluster {
            Some(cluster) => cluster.any_port(),
            None => self.redis.port,
        }
    }

    /// The ports of this test's running Redis nodes (one without a cluster).
    fn redis_ports(&self) -> Vec<u16> {
        match &self.cluster {
            Some(cluster) => cluster
                .nodes
                .iter()
                .filter(|n| n.is_running())
                .map(|n| n.port)
                .collect(),
            None => vec![self.redis.port],
        }
    }

    /// The keys matching `pattern`, from every running node on a cluster (`KEYS` answers for
    /// the node asked).
    pub async fn redis_keys(&self, pattern: &str) -> Vec<String> {
        let mut keys = Vec::new();
        for port in self.redis_ports() {
            let found = servers::redis_cli(port, &["KEYS", pattern]).await;
            keys.extend(found.lines().filter(|l| !l.is_empty()).map(str::to_owned));
        }
        keys
    }

    /// Waits until Redis itself counts `expected` subscribers of a shard channel (on a
    /// cluster, summed over the nodes: `PUBSUB SHARDNUMSUB` answers for the node asked).
    pub async fn wait_shard_numsub(&self, channel: &str, expected: i64) {
        servers::wait_shard_numsub(&self.redis_ports(), channel, expected).await
    }

    /// Tests that kill or restart the single Redis do not apply to a cluster.
    pub fn skip_when_cluster(&self, why: &str) -> bool {
        if self.cluster.is_some() {
            eprintln!("skipped on a Redis Cluster: {why}");
        }
        self.cluster.is_some()
    }

    /// Tests of Redis or MongoDB failures have nothing to test in the embedded mode.
    pub fn skip_when_embedded(&self, why: &str) -> bool {
        if self.embedded {
            eprintln!("skipped in the embedded mode: {why}");
        }
        self.embedded
    }

    /// Starts a persister (the previous one, if any, should be stopped first).
    pub async fn start_persister(&mut self) {
        if self.embedded {
            return; // the gateway runs its own
        }
        let settings = persister::Settings::parse_from(self.args(
            "persister",
            &[
                "--metrics-port",
                "0",
                "--host",
                "127.0.0.1",
                "--name",
                "test-persister",
                "--read-block-ms",
                "200",
                "--batch-size",
                "50",
            ],
        ));
        let persister = persister::Application::build(settings)
            .await
            .expect("persister starts");
        self.persister_stop = persister.shutdown_token();
        tokio::spawn(persister.run_until_stopped());
    }

    /// Command-line arguments of a service: `own`, then Redis and MongoDB of this test.
    fn args(&self, program: &str, own: &[&str]) -> Vec<String> {
        let mut args: Vec<String> = std::iter::once(program)
            .chain(own.iter().copied())
            .map(String::from)
            .collect();
        args.extend([
            "--redis-url".into(),
            self.redis_url(),
            "--redis-prefix".into(),
            self.prefix.clone(),
            "--mongodb-uri".into(),
            self.mongo.uri(),
            "--mongodb-db".into(),
            self.db.clone(),
        ]);
        args
    }

    /// A store on the test database, to look behind the API.
    pub async fn store(&self) -> shared::store::MongoStore {
        let settings = shared::config::MongoSettings {
            uri: Some(self.mongo.uri()),
            db: self.db.clone(),
        };
        shared::store::MongoStore::connect(&settings, "test")
            .await
            .unwrap()
    }

    pub fn gateway_settings(&self) -> gateway::Settings {
        let own = [
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--metrics-port",
            "0",
            "--jwt-secret",
            JWT_SECRET,
            // Tests that flood a socket on purpose set their own limits.
            "--events-per-second",
            "1000000",
            "--event-burst",
            "1000000",
            // `room_beside` creates rooms until one falls in a given partition: one in 16,
            // so now and then more than the default allows.
            "--room-creations-per-user",
            "100000",
            "--server-api-key",
            SERVER_API_KEY,
        ];
        if self.embedded {
            let dir = self
                .data_root
                .path()
                .join(format!("gateway{}", self.gateways.len()));
            let dir = dir.to_str().expect("UTF-8 temporary path");
            return gateway::Settings::parse_from(
                // The same batch size as the distributed tests' persister.
                [
                    "gateway",
                    "--embedded",
                    "--data-dir",
                    dir,
                    "--batch-size",
                    "50",
                ]
                .into_iter()
                .chain(own),
            );
        }
        gateway::Settings::parse_from(self.args("gateway", &own))
    }

    pub async fn add_gateway(&mut self) -> usize {
        self.add_gateway_with(|_| {}).await
    }

    /// Adds an in-process gateway with adjusted settings.
    pub async fn add_gateway_with(&mut self, adjust: impl FnOnce(&mut gateway::Settings)) -> usize {
        let mut settings = self.gateway_settings();
        adjust(&mut settings);
        let app = gateway::Application::build(settings)
            .await
            .expect("gateway starts");
        let gw = Gateway {
            port: app.port(),
            admin_port: app.admin_port(),
            stop: app.shutdown_token(),
            process: None,
        };
        tokio::spawn(app.run_until_stopped());
        self.gateways.push(gw);
        self.gateways.len() - 1
    }

    /// The environment of a service process on this test's Redis and MongoDB.
    pub fn service_env(&self, extra: &[(&str, String)]) -> Vec<(String, String)> {
        let mut env: Vec<(String, String)> = vec![
            ("HOST".into(), "127.0.0.1".into()),
            ("REDIS_URL".into(), self.redis_url()),
            ("REDIS_PREFIX".into(), self.prefix.clone()),
            ("MONGODB_URI".into(), self.mongo.uri()),
            ("MONGODB_DB".into(), self.db.clone()),
        ];
        for (k, v) in extra {
            env.retain(|(key, _)| key != k);
            env.push(((*k).to_owned(), v.clone()));
        }
        env
    }

    /// Starts a persister process (lease 1 s, so a standby takes over quickly) and waits
    /// until it is ready. Returns it and its admin port.
    pub async fn persister_process(
        &self,
        name: &str,
        extra: &[(&str, String)],
    ) -> (procs::Proc, u16) {
        let admin = servers::free_port();
        let mut env = vec![
            ("METRICS_PORT", admin.to_string()),
            ("PERSISTER_NAME", name.to_owned()),
            ("LEASE_MS", "1000".to_owned()),
            ("READ_BLOCK_MS", "200".to_owned()),
        ];
        env.extend(extra.iter().cloned());
        let proc = procs::Proc::spawn(name, "persister", &self.service_env(&env));
        wait_ready(admin).await;
        (proc, admin)
    }

    /// Starts a gateway process and waits until it is ready; returns its index.
    pub async fn gateway_process(&mut self, extra: &[(&str, String)]) -> usize {
        let (port, admin) = (servers::free_port(), servers::free_port());
        let mut env = vec![
            ("PORT", port.to_string()),
            ("METRICS_PORT", admin.to_string()),
            ("JWT_SECRET", JWT_SECRET.to_owned()),
            ("EVENTS_PER_SECOND", "1000000".to_owned()),
            ("EVENT_BURST", "1000000".to_owned()),
        ];
        env.extend(extra.iter().cloned());
        let proc = procs::Proc::spawn(
            &format!("gateway:{port}"),
            "gateway",
            &self.service_env(&env),
        );
        wait_ready(admin).await;
        self.gateways.push(Gateway {
            port,
            admin_port: admin,
            stop: CancellationToken::new(),
            process: Some(proc),
        });
        self.gateways.len() - 1
    }

    pub fn port(&self, gateway: usize) -> u16 {
        self.gateways[gateway].port
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port(0))
    }

    /// Sends a request to gateway 0; returns the status and the JSON body (or Null).
    pub async fn call(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let mut req = self.http.request(method.parse().unwrap(), self.url(path));
        if let Some(token) = token {
            req = req.bearer_auth(token);
        }
        if let Some(body) = body {
            req = req.json(&body);
        }
        let resp = req.send().await.expect("request");
        let status = resp.status();
        let text = resp.text().await.unwrap();
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    /// Registers a new user; returns (token, user id).
    pub async fn user(&self, name: &str) -> (String, String) {
        let email = format!("{}@example.com", unique(name));
        let (status, body) = self
            .call(
                "POST",
                "/auth/register",
                None,
                Some(json!({ "email": email, "password": "password123", "displayName": name })),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        (
            body["accessToken"].as_str().unwrap().to_owned(),
            body["user"]["_id"].as_str().unwrap().to_owned(),
        )
    }

    /// Creates a room owned by `token` with the other participants; returns its id.
    pub async fn room(&self, token: &str, others: &[&str]) -> String {
        let (status, body) = self
            .call(
                "POST",
                "/chat/rooms",
                Some(token),
                Some(json!({ "name": "room", "participantIds": others })),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        body["_id"].as_str().unwrap().to_owned()
    }

    /// Creates rooms like [`TestApp::room`] until one falls in the same ingest partition as
    /// `room`: messages of one partition are stored and published in one order. A gateway
    /// delivers each room through its own feed, so a message in that room is a barrier for
    /// a socket only behind a witness (see the socket tests).
    pub async fn room_beside(&self, token: &str, others: &[&str], room: &str) -> String {
        let keys = shared::backplane::Keys::new(&self.prefix, 16);
        let partition = keys.partition_of(&room.parse().unwrap());
        for _ in 0..500 {
            let candidate = self.room(token, others).await;
            if self.embedded || keys.partition_of(&candidate.parse().unwrap()) == partition {
                return candidate;
            }
        }
        panic!("no room in partition {partition} after 500 tries");
    }

    /// Connects a socket to `gateway` and joins `rooms`.
    pub async fn member(&self, gateway: usize, token: &str, rooms: &[&str]) -> SioClient {
        let mut client = SioClient::with_token(self.port(gateway), token).await;
        for room in rooms {
            let ack = client.request("join_room", json!({ "roomId": room })).await;
            assert_eq!(ack, json!({ "ok": true, "roomId": room }));
        }
        client
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        self.persister_stop.cancel();
        for gw in &self.gateways {
            gw.stop.cancel();
        }
    }
}

/// Waits until `/readyz` on an admin port answers 200.
pub async fn wait_ready(admin_port: u16) {
    let url = format!("http://127.0.0.1:{admin_port}/readyz");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        if let Ok(resp) = reqwest::get(&url).await
            && resp.status().is_success()
        {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{url} not ready within 30 s"
        );
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
}

/// The Prometheus text of an admin port, if it answers.
pub async fn metrics_text(admin_port: u16) -> Option<String> {
    reqwest::get(format!("http://127.0.0.1:{admin_port}/metrics"))
        .await
        .ok()?
        .text()
        .await
        .ok()
}

/// The value of an unlabelled metric on an admin port, if present.
pub async fn metric(admin_port: u16, name: &str) -> Option<f64> {
    let text = metrics_text(admin_port).await?;
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// Waits until `check` holds, polling; panics after `timeout`.
pub async fn eventually<F, Fut>(what: &str, timeout: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while !check().await {
        assert!(
            Instant::now() < deadline,
            "{what} not true within {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Every message of a room, oldest first, through the REST history.
pub async fn history(app: &TestApp, token: &str, room: &str) -> Vec<Value> {
    let mut all = Vec::new();
    let mut before: Option<String> = None;
    loop {
        let mut path = format!("/chat/rooms/{room}/messages?limit=100");
        if let Some(b) = &before {
            path.push_str(&format!("&before={b}"));
        }
        let (_, page) = app.call("GET", &path, Some(token), None).await;
        let page = page.as_array().unwrap().clone();
        if page.is_empty() {
            break;
        }
        before = page.last().unwrap()["id"].as_str().map(str::to_owned);
        all.extend(page);
    }
    all.reverse();
    all
}

/// Sends `n` messages (`m0`, `m1`, …) to `room`, all emitted before any ack is awaited;
/// returns their ids in order.
pub async fn send_quickly(client: &mut SioClient, room: &str, n: usize) -> Vec<Value> {
    let acks: Vec<_> = (0..n)
        .map(|i| {
            client.emit_with_ack(
                "send_message",
                vec![json!({ "roomId": room, "content": format!("m{i}") })],
            )
        })
        .collect();
    let mut ids = Vec::with_capacity(n);
    for ack in acks {
        let ack = tokio::time::timeout(sio::TIMEOUT, ack)
            .await
            .expect("acknowledged in time")
            .expect("connection open");
        assert_eq!(ack["ok"], json!(true), "{ack}");
        ids.push(ack["id"].clone());
    }
    ids
}

/// Receives `message` events until the one with `id`, skipping earlier ones.
pub async fn receive_until(client: &SioClient, id: &Value) {
    loop {
        if &client.next("message").await["id"] == id {
            return;
        }
    }
}

/// The partitions each persister (by admin port) holds, smallest first.
pub async fn partition_shares(admin_ports: &[u16]) -> Vec<f64> {
    let mut owned = Vec::new();
    for admin in admin_ports {
        owned.push(
            metric(*admin, "chat_persister_partitions_owned")
                .await
                .unwrap_or(0.0),
        );
    }
    owned.sort_by(f64::total_cmp);
    owned
}

/// A message as a gateway builds it before appending (no sequence number yet), from a new
/// sender, for tests that talk to the backplane or the store directly.
pub fn chat_message(room: shared::ObjectId, content: &str) -> shared::wire::ChatMessage {
    shared::wire::ChatMessage {
        id: shared::ObjectId::new(),
        room_id: room,
        sender: shared::wire::Sender {
            id: shared::ObjectId::new(),
            email: None,
            display_name: None,
        },
        content: content.into(),
        created_at: shared::wire::now_millis(),
        seq: None,
        server_event: None,
    }
}
