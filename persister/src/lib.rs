//! The persister: reads the ingest stream as a member of the `persisters` consumer group,
//! stores messages in MongoDB in batches, publishes each stored message on its room's
//! channel, then acknowledges the stream entries.
//!
//! Guarantee: at least once, made exactly-once in effect by the store's idempotent insert
//! (a redelivered message id is already stored and counts as success). An entry is
//! acknowledged only after it was stored and published; while MongoDB or Redis fails, the
//! batch is retried with capped backoff and nothing new is read.

use anyhow::Context;
use clap::Parser;
use shared::backplane::{Backplane, Ingest, IngestEntry, RedisBackplane, RedisIngest, stream_seq};
use shared::config::{MongoSettings, RedisSettings, TelemetrySettings};
use shared::store::{MongoStore, SequencedMessage, Store};
use shared::wire::RoomEvent;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Stores chat messages from the ingest stream in MongoDB.
#[derive(Parser, Debug, Clone)]
#[command(name = "persister", version, about)]
pub struct Settings {
    /// Address of the admin server.
    #[arg(long, env = "HOST", default_value = "0.0.0.0")]
    pub host: IpAddr,
    /// Port of the admin server: `/metrics`, `/healthz`, `/readyz` (0 picks a free port).
    #[arg(long, env = "METRICS_PORT", default_value_t = 9101)]
    pub metrics_port: u16,
    /// Probe this persister's `/healthz` on METRICS_PORT of this machine and exit 0 when it
    /// answers (the container image's HEALTHCHECK).
    #[arg(long)]
    pub healthcheck: bool,
    /// Name of this consumer in the group. Keep it stable across restarts of one replica
    /// (the pod name) so that a restarted replica takes up the entries it had read.
    #[arg(long, env = "PERSISTER_NAME", default_value_t = default_name())]
    pub name: String,
    /// Most messages stored in one `insert_many`.
    #[arg(long, env = "BATCH_SIZE", default_value_t = 500)]
    pub batch_size: usize,
    /// How long one read waits for new messages, in milliseconds.
    #[arg(long, env = "READ_BLOCK_MS", default_value_t = 1000)]
    pub read_block_ms: u64,
    /// Leadership lease, in milliseconds. One persister (the leader) processes the stream
    /// at a time, which keeps messages in order; a standby takes over this long after the
    /// leader stopped renewing (at once when it shut down cleanly).
    #[arg(long, env = "LEASE_MS", default_value_t = 10_000)]
    pub lease_ms: u64,
    #[command(flatten)]
    pub redis: RedisSettings,
    #[command(flatten)]
    pub mongo: MongoSettings,
    #[command(flatten)]
    pub telemetry: TelemetrySettings,
}

fn default_name() -> String {
    std::env::var("HOSTNAME").unwrap_or_else(|_| "persister-1".to_owned())
}

/// A persister, connected and bound to its admin port, not yet running.
pub struct Application {
    settings: Settings,
    ingest: Arc<RedisIngest>,
    backplane: Arc<RedisBackplane>,
    store: Arc<MongoStore>,
    admin: TcpListener,
    healthy: Arc<AtomicBool>,
    shutdown: CancellationToken,
}

impl Application {
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        shared::admin::prometheus();
        describe_metrics();
        let store = Arc::new(
            MongoStore::connect(&settings.mongo, "chat-persister")
                .await
                .with_context(|| {
                    format!(
                        "connecting to MongoDB (MONGODB_URI, database {})",
                        settings.mongo.db
                    )
                })?,
        );
        let backplane = Arc::new(
            RedisBackplane::connect(&settings.redis)
                .await
                .context("connecting to Redis (REDIS_URL)")?,
        );
        let ingest = Arc::new(
            RedisIngest::connect(&settings.redis, &settings.name)
                .await
                .context("joining the ingest consumer group")?,
        );
        let admin =
            shared::admin::listen(SocketAddr::new(settings.host, settings.metrics_port), 1024)
                .with_context(|| format!("binding METRICS_PORT {}", settings.metrics_port))?;
        Ok(Self {
            settings,
            ingest,
            backplane,
            store,
            admin,
            healthy: Arc::new(AtomicBool::new(true)),
            shutdown: CancellationToken::new(),
        })
    }

    pub fn admin_port(&self) -> u16 {
        self.admin
            .local_addr()
            .map(|a| a.port())
            .unwrap_or_default()
    }

    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Runs until the shutdown token is cancelled. The batch in hand is finished first.
    pub async fn run_until_stopped(self) -> anyhow::Result<()> {
        let ready = {
            let (store, ingest, healthy) = (
                self.store.clone(),
                self.ingest.clone(),
                self.healthy.clone(),
            );
            shared::admin::router(Arc::new(move || {
                let (store, ingest, healthy) = (store.clone(), ingest.clone(), healthy.clone());
                Box::pin(async move {
                    ingest.ping().await.map_err(|e| format!("redis: {e}"))?;
                    store.ping().await.map_err(|e| format!("mongodb: {e}"))?;
                    if !healthy.load(Ordering::Relaxed) {
                        return Err("retrying a failed batch".to_owned());
                    }
                    Ok(())
                })
            }))
        };
        let admin = axum::serve(self.admin, ready)
            .with_graceful_shutdown(self.shutdown.clone().cancelled_owned());
        let admin = tokio::spawn(async move { admin.await });
        let sampler = tokio::spawn(sample_backlog(self.ingest.clone() as Arc<dyn Ingest>));
        tracing::info!(consumer = %self.settings.name, "persister running");

        let lease = Duration::from_millis(self.settings.lease_ms.max(100));
        let worker = Worker {
            ingest: self.ingest.as_ref(),
            backplane: self.backplane.as_ref(),
            store: self.store.as_ref(),
            healthy: &self.healthy,
            shutdown: &self.shutdown,
            batch_size: self.settings.batch_size.max(1),
            lease,
            // Reads return in time for the lease to be renewed.
            block: Duration::from_millis(self.settings.read_block_ms).min(lease / 4),
        };
        worker.run().await;
        sampler.abort();
        admin.abort();
        tracing::info!("persister stopped");
        Ok(())
    }
}

/// Help texts of the persister's metrics (Prometheus `# HELP`).
pub fn describe_metrics() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_gauge!(
        "chat_persister_leader",
        "1 while this persister holds the ingest lease (processes the stream), else 0."
    );
    describe_counter!(
        "chat_persister_messages_total",
        "Messages stored, published and acknowledged."
    );
    describe_histogram!("chat_persister_batch_size", "Messages per stored batch.");
    describe_histogram!(
        "chat_persister_insert_seconds",
        Unit::Seconds,
        "Time to store one batch in the store."
    );
    describe_histogram!(
        "chat_persister_batch_seconds",
        Unit::Seconds,
        "Time from reading a batch to acknowledging it (store, publish, ack)."
    );
    describe_counter!(
        "chat_persister_errors_total",
        "Failed steps (read, insert, publish, ack) that are being retried, by step."
    );
    describe_counter!(
        "chat_persister_invalid_entries_total",
        "Undecodable ingest entries, logged and acknowledged."
    );
    describe_gauge!(
        "chat_persister_pending_entries",
        "Ingest entries read by a persister and not yet acknowledged."
    );
    describe_gauge!(
        "chat_persister_stream_lag",
        "Ingest entries not yet read by any persister."
    );
}

/// How often the stream backlog is sampled into gauges.
const BACKLOG_SAMPLE: Duration = Duration::from_secs(5);

/// Keeps `chat_persister_pending_entries` and `chat_persister_stream_lag` current: the
/// numbers to alert on when persisting falls behind (every replica reports the same
/// stream, so take the max, not the sum).
pub async fn sample_backlog(ingest: Arc<dyn Ingest>) {
    loop {
        match ingest.backlog().await {
            Ok(backlog) => {
                metrics::gauge!("chat_persister_pending_entries").set(backlog.pending as f64);
                if let Some(lag) = backlog.lag {
                    metrics::gauge!("chat_persister_stream_lag").set(lag as f64);
                }
            }
            Err(error) => tracing::debug!(%error, "cannot sample the ingest backlog"),
        }
        tokio::time::sleep(BACKLOG_SAMPLE).await;
    }
}

/// Runs the persister loop over any ingest, backplane and store until `shutdown` is
/// cancelled (the batch in hand is finished first). The gateway's embedded mode runs it in
/// its own process, with the in-process backplane and the SQLite store.
pub async fn run_worker(
    ingest: &dyn Ingest,
    backplane: &dyn Backplane,
    store: &dyn Store,
    batch_size: usize,
    shutdown: &CancellationToken,
) {
    let healthy = AtomicBool::new(true);
    Worker {
        ingest,
        backplane,
        store,
        healthy: &healthy,
        shutdown,
        batch_size: batch_size.max(1),
        lease: Duration::from_secs(10),
        block: Duration::from_millis(500),
    }
    .run()
    .await;
}

struct Worker<'a> {
    ingest: &'a dyn Ingest,
    backplane: &'a dyn Backplane,
    store: &'a dyn Store,
    healthy: &'a AtomicBool,
    shutdown: &'a CancellationToken,
    batch_size: usize,
    lease: Duration,
    block: Duration,
}

/// Backoff between retries of a failed step: 100 ms doubling to at most 5 s.
const BACKOFF_START: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

impl Worker<'_> {
    async fn run(&self) {
        while !self.shutdown.is_cancelled() {
            if !self.lead().await {
                tokio::select! {
                    _ = self.shutdown.cancelled() => break,
                    _ = tokio::time::sleep(self.lease / 4) => continue,
                }
            }
            let entries = tokio::select! {
                _ = self.shutdown.cancelled() => break,
                read = self.retry("read", || self.ingest.read(self.batch_size, self.block)) => match read {
                    Some(entries) => entries,
                    None => break,
                },
            };
            if entries.is_empty() {
                continue;
            }
            // Once read, a batch is finished even during shutdown: it is stored, published and
            // acknowledged, or left pending for the next start if a step keeps failing.
            if !self.process(entries).await {
                break;
            }
        }
        if let Err(error) = self.ingest.resign().await {
            tracing::warn!(%error, "could not resign the ingest leadership; a standby takes over when the lease expires");
        }
    }

    /// Takes or renews the leadership; `false` when another persister leads (or Redis fails).
    async fn lead(&self) -> bool {
        let leading = match self.ingest.lead(self.lease).await {
            Ok(leading) => leading,
            Err(error) => {
                tracing::warn!(%error, "cannot reach Redis to renew the ingest leadership");
                false
            }
        };
        metrics::gauge!("chat_persister_leader").set(if leading { 1.0 } else { 0.0 });
        leading
    }

    /// Stores, publishes and acknowledges one batch. `false` if shutdown interrupted it.
    async fn process(&self, entries: Vec<IngestEntry>) -> bool {
        let started = Instant::now();
        let ids: Vec<String> = entries.iter().map(|e| e.id.clone()).collect();
        let mut messages: Vec<SequencedMessage> = Vec::with_capacity(entries.len());
        for entry in entries {
            let decoded = entry.message.and_then(|m| {
                Ok(SequencedMessage {
                    seq: stream_seq(&entry.id).ok_or("malformed entry id")?,
                    message: m,
                })
            });
            match decoded {
                Ok(m) => messages.push(m),
                Err(error) => {
                    // Retrying cannot fix an undecodable entry; it is logged and acknowledged.
                    metrics::counter!("chat_persister_invalid_entries_total").increment(1);
                    tracing::error!(entry = %entry.id, %error, "undecodable ingest entry dropped");
                }
            }
        }
        metrics::histogram!("chat_persister_batch_size").record(messages.len() as f64);

        let insert_started = Instant::now();
        if self
            .retry("insert", || self.store.insert_messages(&messages))
            .await
            .is_none()
        {
            return false;
        }
        metrics::histogram!("chat_persister_insert_seconds")
            .record(insert_started.elapsed().as_secs_f64());

        // A leader that lost its lease while blocked (say, on MongoDB) leaves the batch to the
        // new leader, which has claimed it: publishing now could reorder messages.
        if !self.lead().await {
            tracing::warn!("lost the ingest leadership; leaving the batch to the new leader");
            return true;
        }
        let events: Vec<RoomEvent> = messages
            .into_iter()
            .map(|m| RoomEvent::Message(m.message))
            .collect();
        if self
            .retry("publish", || self.backplane.publish(&events))
            .await
            .is_none()
        {
            return false;
        }
        if self.retry("ack", || self.ingest.ack(&ids)).await.is_none() {
            return false;
        }
        metrics::counter!("chat_persister_messages_total").increment(events.len() as u64);
        metrics::histogram!("chat_persister_batch_seconds").record(started.elapsed().as_secs_f64());
        tracing::debug!(count = events.len(), "batch persisted");
        true
    }

    /// Runs `step` until it succeeds, backing off between attempts. `None` on shutdown.
    async fn retry<T, E, F, Fut>(&self, what: &'static str, step: F) -> Option<T>
    where
        E: std::fmt::Display,
        F: Fn() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        let mut backoff = BACKOFF_START;
        loop {
            match step().await {
                Ok(value) => {
                    self.healthy.store(true, Ordering::Relaxed);
                    return Some(value);
                }
                Err(error) => {
                    self.healthy.store(false, Ordering::Relaxed);
                    metrics::counter!("chat_persister_errors_total", "step" => what).increment(1);
                    tracing::warn!(step = what, %error, retry_in_ms = backoff.as_millis() as u64, "persister step failed");
                    tokio::select! {
                        _ = self.shutdown.cancelled() => return None,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                    // Still alive, only blocked: keep the lease so no standby takes over.
                    let _ = self.ingest.lead(self.lease).await;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    //! The worker against in-process fakes: what is acknowledged, and when.
    use super::*;
    use async_trait::async_trait;
    use shared::ObjectId;
    use shared::backplane::BackplaneError;
    use shared::store::{Room, StoreError, User, UserCredentials};
    use shared::wire::{ChatMessage, Sender, now_millis};
    use std::sync::Mutex;
    use std::sync::atomic::AtomicUsize;

    fn message(content: &str) -> ChatMessage {
        ChatMessage {
            id: ObjectId::new(),
            room_id: ObjectId::new(),
            sender: Sender {
                id: ObjectId::new(),
                email: None,
                display_name: None,
            },
            content: content.into(),
            created_at: now_millis(),
        }
    }

    #[derive(Default)]
    struct FakeIngest {
        batches: Mutex<Vec<Vec<IngestEntry>>>,
        acked: Mutex<Vec<String>>,
    }

    #[async_trait]
    impl Ingest for FakeIngest {
        async fn lead(&self, _: Duration) -> Result<bool, BackplaneError> {
            Ok(true)
        }
        async fn resign(&self) -> Result<(), BackplaneError> {
            Ok(())
        }
        async fn read(&self, _: usize, _: Duration) -> Result<Vec<IngestEntry>, BackplaneError> {
            Ok(self.batches.lock().unwrap().pop().unwrap_or_default())
        }
        async fn ack(&self, ids: &[String]) -> Result<(), BackplaneError> {
            self.acked.lock().unwrap().extend_from_slice(ids);
            Ok(())
        }

        async fn backlog(&self) -> Result<shared::backplane::Backlog, BackplaneError> {
            Ok(shared::backplane::Backlog::default())
        }
    }

    #[derive(Default)]
    struct FakeBackplane {
        published: Mutex<Vec<RoomEvent>>,
    }

    #[async_trait]
    impl Backplane for FakeBackplane {
        async fn append(
            &self,
            _: &ChatMessage,
            _: Option<&str>,
        ) -> Result<shared::backplane::Appended, BackplaneError> {
            unreachable!("the persister never appends")
        }
        async fn publish(&self, events: &[RoomEvent]) -> Result<(), BackplaneError> {
            self.published.lock().unwrap().extend_from_slice(events);
            Ok(())
        }
        async fn subscribe(&self, _: ObjectId) -> Result<(), BackplaneError> {
            Ok(())
        }
        async fn unsubscribe(&self, _: ObjectId) -> Result<(), BackplaneError> {
            Ok(())
        }
        async fn ping(&self) -> Result<(), BackplaneError> {
            Ok(())
        }
        async fn counter(&self, _: &str) -> Result<(u64, Duration), BackplaneError> {
            unimplemented!()
        }
        async fn count(&self, _: &str, _: Duration) -> Result<(), BackplaneError> {
            unimplemented!()
        }
        async fn reset_counter(&self, _: &str) -> Result<(), BackplaneError> {
            unimplemented!()
        }
    }

    /// Fails the first `failures` inserts, then stores.
    #[derive(Default)]
    struct FlakyStore {
        failures: AtomicUsize,
        stored: Mutex<Vec<ChatMessage>>,
    }

    #[async_trait]
    impl Store for FlakyStore {
        async fn create_user(&self, _: &str, _: &str, _: &str) -> Result<User, StoreError> {
            unimplemented!()
        }
        async fn user_credentials(&self, _: &str) -> Result<Option<UserCredentials>, StoreError> {
            unimplemented!()
        }
        async fn user(&self, _: ObjectId) -> Result<Option<User>, StoreError> {
            unimplemented!()
        }
        async fn missing_users(&self, _: &[ObjectId]) -> Result<Vec<ObjectId>, StoreError> {
            unimplemented!()
        }
        async fn create_room(
            &self,
            _: Option<String>,
            _: Vec<ObjectId>,
        ) -> Result<Room, StoreError> {
            unimplemented!()
        }
        async fn room(&self, _: ObjectId) -> Result<Option<Room>, StoreError> {
            unimplemented!()
        }
        async fn rooms_of(&self, _: ObjectId) -> Result<Vec<Room>, StoreError> {
            unimplemented!()
        }
        async fn remove_participant(
            &self,
            _: ObjectId,
            _: ObjectId,
        ) -> Result<Option<Room>, StoreError> {
            unimplemented!()
        }
        async fn add_participant(
            &self,
            _: ObjectId,
            _: ObjectId,
        ) -> Result<Option<Room>, StoreError> {
            unimplemented!()
        }
        async fn insert_messages(&self, messages: &[SequencedMessage]) -> Result<(), StoreError> {
            if self.failures.load(Ordering::SeqCst) > 0 {
                self.failures.fetch_sub(1, Ordering::SeqCst);
                return Err(StoreError::Unavailable("down".into()));
            }
            self.stored
                .lock()
                .unwrap()
                .extend(messages.iter().map(|m| m.message.clone()));
            Ok(())
        }
        async fn messages(
            &self,
            _: ObjectId,
            _: Option<ObjectId>,
            _: u32,
        ) -> Result<Vec<ChatMessage>, StoreError> {
            unimplemented!()
        }
        async fn ping(&self) -> Result<(), StoreError> {
            Ok(())
        }
    }

    /// A worker's surroundings, faked.
    struct Fakes {
        ingest: FakeIngest,
        store: FlakyStore,
        backplane: FakeBackplane,
        healthy: AtomicBool,
        shutdown: CancellationToken,
    }

    impl Fakes {
        /// The store fails its first `failures` inserts.
        fn new(ingest: FakeIngest, failures: usize) -> Self {
            Self {
                ingest,
                store: FlakyStore {
                    failures: AtomicUsize::new(failures),
                    ..Default::default()
                },
                backplane: FakeBackplane::default(),
                healthy: AtomicBool::new(true),
                shutdown: CancellationToken::new(),
            }
        }

        fn worker(&self) -> Worker<'_> {
            Worker {
                ingest: &self.ingest,
                backplane: &self.backplane,
                store: &self.store,
                healthy: &self.healthy,
                shutdown: &self.shutdown,
                batch_size: 10,
                lease: Duration::from_secs(10),
                block: Duration::from_millis(10),
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_batch_is_acknowledged_only_after_it_was_stored_and_published() {
        let (a, b) = (message("a"), message("b"));
        let ingest = FakeIngest::default();
        ingest.batches.lock().unwrap().push(vec![
            IngestEntry {
                id: "1-0".into(),
                message: Ok(a.clone()),
            },
            IngestEntry {
                id: "2-0".into(),
                message: Err("garbage".into()),
            },
            IngestEntry {
                id: "3-0".into(),
                message: Ok(b.clone()),
            },
        ]);
        let fakes = Fakes::new(ingest, 3);
        let (ingest, store, backplane, healthy) = (
            &fakes.ingest,
            &fakes.store,
            &fakes.backplane,
            &fakes.healthy,
        );
        let worker = fakes.worker();
        let entries = ingest.read(10, Duration::ZERO).await.unwrap();
        // Three failed inserts are retried (with backoff, on the paused clock) before success.
        assert!(worker.process(entries).await);
        assert_eq!(*store.stored.lock().unwrap(), vec![a.clone(), b.clone()]);
        assert_eq!(
            *backplane.published.lock().unwrap(),
            vec![RoomEvent::Message(a), RoomEvent::Message(b)]
        );
        // The undecodable entry is acknowledged too: retrying cannot fix it.
        assert_eq!(*ingest.acked.lock().unwrap(), vec!["1-0", "2-0", "3-0"]);
        assert!(healthy.load(Ordering::Relaxed));
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_while_the_store_is_down_leaves_the_batch_unacknowledged() {
        let fakes = Fakes::new(FakeIngest::default(), usize::MAX);
        let (ingest, backplane, healthy, shutdown) = (
            &fakes.ingest,
            &fakes.backplane,
            &fakes.healthy,
            &fakes.shutdown,
        );
        let worker = fakes.worker();
        let entries = vec![IngestEntry {
            id: "1-0".into(),
            message: Ok(message("x")),
        }];
        let stopper = async {
            tokio::time::sleep(Duration::from_secs(30)).await;
            assert!(!healthy.load(Ordering::Relaxed), "not ready while retrying");
            shutdown.cancel();
        };
        let (finished, ()) = tokio::join!(worker.process(entries), stopper);
        assert!(!finished);
        assert!(ingest.acked.lock().unwrap().is_empty());
        assert!(backplane.published.lock().unwrap().is_empty());
    }
}
