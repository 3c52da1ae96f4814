//! The persister: stores the messages of the ingest partitions in MongoDB, publishes each
//! stored batch on its rooms' channels, then acknowledges it.
//!
//! Every persister works at once. The partitions are shared out by lease: each live
//! persister takes its fair share (with 3 persisters and 16 partitions, 5 or 6 each), one
//! that dies loses its partitions to the others within `LEASE_MS`, and one that starts takes
//! its share from the others without restarting anyone. Each owned partition has its own
//! worker, which reads the next batch while the current one is stored.
//!
//! Guarantee: at least once, made exactly-once in effect by the store's idempotent insert
//! (a redelivered message id is already stored and counts as success). A batch is published
//! and acknowledged in one step that checks the lease in Redis, so a persister that lost a
//! partition (paused, cut off) can never publish or acknowledge for it: per-room order
//! holds. While MongoDB or Redis fails, the batch is retried with capped backoff and nothing
//! new is read from that partition.

use anyhow::Context;
use clap::Parser;
use shared::backplane::{
    BackplaneError, Ingest, IngestEntry, IngestSettings, Lease, ReadPosition, RedisIngest,
    group_by_room, stream_seq,
};
use shared::config::{MongoSettings, RedisSettings, TelemetrySettings};
use shared::store::{MongoStore, SequencedMessage, Store};
use std::collections::BTreeMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Stores chat messages from the ingest partitions in MongoDB.
#[derive(Parser, Debug, Clone)]
#[command(name = "persister", version, about)]
pub struct Settings {
    /// Address of the admin server.
    #[arg(long, env = "HOST", default_value = "0.0.0.0")]
    pub host: IpAddr,
    /// Address of the admin server (`/metrics`, `/healthz`, `/readyz`, without
    /// authentication); default: HOST. Bind it to a private interface, or keep the port
    /// off public networks (the Helm chart admits it from the release's namespace only). The
    /// container HEALTHCHECK probes it on 127.0.0.1.
    #[arg(long = "admin-host", env = "ADMIN_HOST")]
    pub admin_host: Option<IpAddr>,
    /// Port of the admin server: `/metrics`, `/healthz`, `/readyz` (0 picks a free port).
    #[arg(long, env = "METRICS_PORT", default_value_t = 9101)]
    pub metrics_port: u16,
    /// Probe this persister's `/healthz` on METRICS_PORT of this machine and exit 0 when it
    /// answers (the container image's HEALTHCHECK).
    #[arg(long)]
    pub healthcheck: bool,
    /// Name of this persister in logs and in its instance id (the pod name; default
    /// `$HOSTNAME`, else `persister`). Each process adds a random suffix, so two processes
    /// never share an identity even with the same name.
    #[arg(long, env = "PERSISTER_NAME", default_value_t = default_name())]
    pub name: String,
    /// Most messages stored in one `insert_many`.
    #[arg(long, env = "BATCH_SIZE", default_value_t = 500)]
    pub batch_size: usize,
    /// How long one read waits for new messages, in milliseconds (at most LEASE_MS / 4).
    #[arg(long, env = "READ_BLOCK_MS", default_value_t = 1000)]
    pub read_block_ms: u64,
    /// Partition lease, in milliseconds: a persister that stops renewing (crash, pause,
    /// network cut) loses its partitions to the others within this time.
    #[arg(long, env = "LEASE_MS", default_value_t = 10_000)]
    pub lease_ms: u64,
    #[command(flatten)]
    pub redis: RedisSettings,
    #[command(flatten)]
    pub ingest: IngestSettings,
    #[command(flatten)]
    pub mongo: MongoSettings,
    #[command(flatten)]
    pub telemetry: TelemetrySettings,
}

fn default_name() -> String {
    std::env::var("HOSTNAME").unwrap_or_else(|_| "persister".to_owned())
}

/// A persister, connected and bound to its admin port, not yet running.
pub struct Application {
    settings: Settings,
    ingest: Arc<RedisIngest>,
    store: Arc<MongoStore>,
    admin: TcpListener,
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
        let ingest = Arc::new(
            RedisIngest::connect(&settings.redis, &settings.ingest, &settings.name)
                .await
                .context("connecting to the ingest partitions in Redis (REDIS_URL)")?,
        );
        let admin = shared::admin::listen(
            SocketAddr::new(
                settings.admin_host.unwrap_or(settings.host),
                settings.metrics_port,
            ),
            1024,
        )
        .with_context(|| format!("binding METRICS_PORT {}", settings.metrics_port))?;
        Ok(Self {
            settings,
            ingest,
            store,
            admin,
            shutdown: CancellationToken::new(),
        })
    }

    pub fn admin_port(&self) -> u16 {
        self.admin
            .local_addr()
            .map(|a| a.port())
            .unwrap_or_default()
    }

    /// This process's instance id (its name plus a random suffix).
    pub fn instance(&self) -> &str {
        self.ingest.instance()
    }

    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Runs until the shutdown token is cancelled. The batches in hand are finished first.
    pub async fn run_until_stopped(self) -> anyhow::Result<()> {
        let lease = Duration::from_millis(self.settings.lease_ms.max(100));
        let persister = Persister::new(
            self.ingest.clone(),
            self.store.clone(),
            Tuning {
                batch_size: self.settings.batch_size.max(1),
                lease,
                // Reads return in time for shutdown and rebalancing to be prompt.
                block: Duration::from_millis(self.settings.read_block_ms.max(1)).min(lease / 4),
            },
            self.shutdown.clone(),
        );
        let ready = {
            let (store, ingest, failing) = (
                self.store.clone(),
                self.ingest.clone(),
                persister.failing.clone(),
            );
            shared::admin::router(Arc::new(move || {
                let (store, ingest, failing) = (store.clone(), ingest.clone(), failing.clone());
                Box::pin(async move {
                    ingest.ping().await.map_err(|e| format!("redis: {e}"))?;
                    store.ping().await.map_err(|e| format!("mongodb: {e}"))?;
                    if failing.load(Ordering::Relaxed) > 0 {
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
        tracing::info!(instance = %self.ingest.instance(), partitions = self.settings.ingest.partitions, "persister running");
        persister.run().await;
        sampler.abort();
        admin.abort();
        self.store.close().await;
        tracing::info!("persister stopped");
        Ok(())
    }
}

/// Help texts of the persister's metrics (Prometheus `# HELP`).
pub fn describe_metrics() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_gauge!(
        "chat_persister_partitions_owned",
        "Ingest partitions this persister holds the lease of."
    );
    describe_gauge!(
        "chat_persister_partitions_unowned",
        "Ingest partitions no persister holds, as this persister last saw them (alert when above 0 for long)."
    );
    describe_counter!(
        "chat_redis_client_restarts_total",
        "Redis clients whose routing task ended by itself and was started again."
    );
    describe_counter!(
        "chat_persister_partition_takeovers_total",
        "Partition leases this persister took (at start, from one that stopped, or to even the load)."
    );
    describe_counter!(
        "chat_persister_partition_losses_total",
        "Partition leases this persister lost without giving them up (expired or taken while it was cut off or paused)."
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
        "Failed steps (read, insert, complete) that are being retried, by step."
    );
    describe_counter!(
        "chat_persister_invalid_entries_total",
        "Undecodable ingest entries, logged and acknowledged."
    );
    describe_gauge!(
        "chat_persister_backlog_entries",
        "Entries of an ingest partition not yet stored and acknowledged, by partition (every persister reports every partition: take the max)."
    );
}

/// How often the partitions' backlog is sampled into gauges.
const BACKLOG_SAMPLE: Duration = Duration::from_secs(5);

/// Keeps `chat_persister_backlog_entries` current: the number to alert on when persisting
/// falls behind.
pub async fn sample_backlog(ingest: Arc<dyn Ingest>) {
    loop {
        for partition in 0..ingest.partitions() {
            match ingest.backlog(partition).await {
                Ok(entries) => {
                    metrics::gauge!("chat_persister_backlog_entries", "partition" => partition.to_string())
                        .set(entries as f64);
                }
                Err(error) => tracing::debug!(%error, partition, "cannot sample the backlog"),
            }
        }
        tokio::time::sleep(BACKLOG_SAMPLE).await;
    }
}

/// Runs the persister over any ingest and store until `shutdown` is cancelled (the batches
/// in hand are finished first). The gateway's embedded mode runs it in its own process, with
/// the in-process ingest and the SQLite store.
pub async fn run_worker(
    ingest: Arc<dyn Ingest>,
    store: Arc<dyn Store>,
    batch_size: usize,
    shutdown: CancellationToken,
) {
    let tuning = Tuning {
        batch_size: batch_size.max(1),
        lease: Duration::from_secs(10),
        block: Duration::from_millis(500),
    };
    Persister::new(ingest, store, tuning, shutdown).run().await;
}

/// How the persister paces itself.
#[derive(Debug, Clone, Copy)]
pub struct Tuning {
    pub batch_size: usize,
    /// `LEASE_MS`. Leases are renewed every quarter of it and last three quarters of it,
    /// so a stopped persister's partitions are free, and taken, within it.
    pub lease: Duration,
    /// Longest wait of one read for new entries.
    pub block: Duration,
}

impl Tuning {
    fn tick(&self) -> Duration {
        self.lease / 4
    }

    fn lease_ttl(&self) -> Duration {
        self.lease * 3 / 4
    }
}

/// The persister's loop: keeps its fair share of the partition leases and one worker per
/// partition held.
pub struct Persister {
    ctx: Arc<Shared>,
    /// Workers retrying a failed step; the persister is not ready while any is.
    pub failing: Arc<AtomicUsize>,
}

struct Shared {
    ingest: Arc<dyn Ingest>,
    store: Arc<dyn Store>,
    tuning: Tuning,
    shutdown: CancellationToken,
    failing: Arc<AtomicUsize>,
}

/// A partition this persister holds, and its worker.
struct Held {
    lease: Lease,
    stop: CancellationToken,
    worker: JoinHandle<()>,
}

impl Persister {
    pub fn new(
        ingest: Arc<dyn Ingest>,
        store: Arc<dyn Store>,
        tuning: Tuning,
        shutdown: CancellationToken,
    ) -> Self {
        let failing = Arc::new(AtomicUsize::new(0));
        Self {
            ctx: Arc::new(Shared {
                ingest,
                store,
                tuning,
                shutdown,
                failing: failing.clone(),
            }),
            failing,
        }
    }

    pub async fn run(self) {
        let ctx = &self.ctx;
        let mut held: BTreeMap<u16, Held> = BTreeMap::new();
        let mut releasing: Vec<JoinHandle<()>> = Vec::new();
        loop {
            self.balance(&mut held, &mut releasing).await;
            metrics::gauge!("chat_persister_partitions_owned").set(held.len() as f64);
            tokio::select! {
                _ = ctx.shutdown.cancelled() => break,
                _ = tokio::time::sleep(ctx.tuning.tick()) => {}
            }
        }
        // Finish the batches in hand, then let the others take over at once.
        for (_, h) in std::mem::take(&mut held) {
            releasing.push(release(ctx.clone(), h));
        }
        for task in releasing {
            let _ = task.await;
        }
        metrics::gauge!("chat_persister_partitions_owned").set(0.0);
        if let Err(error) = ctx.ingest.leave().await {
            tracing::warn!(%error, "could not leave the persister set; the others notice when its entry expires");
        }
    }

    /// One round: say we are alive, renew what we hold, then take or give up partitions
    /// until we hold our fair share.
    async fn balance(&self, held: &mut BTreeMap<u16, Held>, releasing: &mut Vec<JoinHandle<()>>) {
        let ctx = &self.ctx;
        let ingest = ctx.ingest.as_ref();
        releasing.retain(|task| !task.is_finished());
        // A worker that ended on its own was fenced: the lease is gone.
        held.retain(|partition, h| {
            let running = !h.worker.is_finished();
            if !running {
                tracing::warn!(partition, "partition lost: its worker was fenced");
            }
            running
        });
        let live = match ingest.heartbeat(ctx.tuning.lease_ttl()).await {
            Ok(live) => Some(live),
            Err(error) => {
                tracing::warn!(%error, "cannot reach Redis to say this persister is alive");
                None
            }
        };
        let mut lost = Vec::new();
        for (partition, h) in held.iter() {
            match ingest.renew(&h.lease, ctx.tuning.lease_ttl()).await {
                Ok(true) => {}
                Ok(false) => lost.push(*partition),
                Err(error) => tracing::warn!(%error, partition, "cannot renew a partition lease"),
            }
        }
        for partition in lost {
            if let Some(h) = held.remove(&partition) {
                metrics::counter!("chat_persister_partition_losses_total").increment(1);
                tracing::warn!(
                    partition,
                    "partition lease lost; another persister takes it"
                );
                h.stop.cancel();
            }
        }
        let owners = match ingest.owners().await {
            Ok(owners) => owners,
            Err(error) => {
                tracing::warn!(%error, "cannot read the partition owners");
                return;
            }
        };
        metrics::gauge!("chat_persister_partitions_unowned")
            .set(owners.iter().filter(|o| o.is_none()).count() as f64);
        let Some(target) =
            live.and_then(|live| fair_share(ingest.partitions(), &live, ingest.instance()))
        else {
            return;
        };
        // Over our share (a persister joined): give up the highest partitions.
        while held.len() > target {
            let Some((_, h)) = held.pop_last() else { break };
            tracing::info!(
                partition = h.lease.partition,
                target,
                "giving a partition up to even the load"
            );
            releasing.push(release(ctx.clone(), h));
        }
        // Under it (one left, or we just started): take free ones, starting at a place of our
        // own so that persisters starting together do not all race for partition 0.
        let n = ingest.partitions();
        let start = free_start(ingest.instance(), n);
        for i in 0..n {
            if held.len() >= target {
                break;
            }
            let partition = (start + i) % n;
            if owners.get(partition as usize).is_none_or(|o| o.is_some()) {
                continue;
            }
            match ingest.acquire(partition, ctx.tuning.lease_ttl()).await {
                Ok(Some(lease)) => {
                    metrics::counter!("chat_persister_partition_takeovers_total").increment(1);
                    tracing::info!(partition, token = lease.token, "partition taken");
                    let stop = CancellationToken::new();
                    let worker = tokio::spawn(work(ctx.clone(), lease.clone(), stop.clone()));
                    held.insert(
                        partition,
                        Held {
                            lease,
                            stop,
                            worker,
                        },
                    );
                }
                Ok(None) => {}
                Err(error) => tracing::warn!(%error, partition, "cannot take a partition lease"),
            }
        }
    }
}

/// Where an instance starts looking for free partitions: spread by its id.
fn free_start(instance: &str, partitions: u16) -> u16 {
    let hash = instance
        .bytes()
        .fold(0u32, |h, b| h.wrapping_mul(31).wrapping_add(u32::from(b)));
    (hash % u32::from(partitions.max(1))) as u16
}

/// How many partitions `me` should hold: the live persisters, in their sorted order, take
/// `partitions / n` each and the first `partitions % n` one more, so the shares add up to
/// exactly the partition count. `None` when `me` is not among them (its heartbeat failed).
pub fn fair_share(partitions: u16, live: &[String], me: &str) -> Option<usize> {
    // The rank among the others, whatever order the list came in.
    if !live.iter().any(|l| l == me) {
        return None;
    }
    let index = live.iter().filter(|l| l.as_str() < me).count();
    let (n, p) = (live.len(), usize::from(partitions));
    Some(p / n + usize::from(index < p % n))
}

/// Stops a partition's worker (its batch in hand is finished first), then gives the lease up.
fn release(ctx: Arc<Shared>, held: Held) -> JoinHandle<()> {
    tokio::spawn(async move {
        held.stop.cancel();
        let _ = held.worker.await;
        if let Err(error) = ctx.ingest.release(&held.lease).await {
            tracing::warn!(%error, partition = held.lease.partition, "could not release a partition; it is free when the lease expires");
        }
    })
}

/// What a step came to.
enum Step<T> {
    Done(T),
    /// The lease is no longer ours: stop working on the partition.
    Fenced,
    /// Shutdown (or the partition's release) while the step kept failing.
    Stopped,
}

/// Backoff between retries of a failed step: 100 ms doubling to at most 5 s.
const BACKOFF_START: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// Works on one partition until `stop` (or shutdown), or until the lease is lost. Reads
/// the next batch while the current one is stored and published; batches are completed in
/// read order.
async fn work(ctx: Arc<Shared>, lease: Lease, stop: CancellationToken) {
    let partition = lease.partition;
    let mut position = ReadPosition::start();
    let mut current = match ctx.read(&lease, &mut position, &stop).await {
        Step::Done(entries) => entries,
        Step::Fenced => return fenced(partition),
        Step::Stopped => return,
    };
    loop {
        if current.is_empty() {
            if stop.is_cancelled() || ctx.shutdown.is_cancelled() {
                return;
            }
            current = match ctx.read(&lease, &mut position, &stop).await {
                Step::Done(entries) => entries,
                Step::Fenced => return fenced(partition),
                Step::Stopped => return,
            };
            continue;
        }
        let next = async {
            if stop.is_cancelled() || ctx.shutdown.is_cancelled() {
                return Step::Done(Vec::new());
            }
            ctx.read(&lease, &mut position, &stop).await
        };
        let (finished, next) = tokio::join!(ctx.finish(&lease, &stop, current), next);
        match finished {
            Step::Done(()) => {}
            Step::Fenced => return fenced(partition),
            // Left pending: the next holder reads it again.
            Step::Stopped => return,
        }
        current = match next {
            Step::Done(entries) => entries,
            Step::Fenced => return fenced(partition),
            Step::Stopped => Vec::new(),
        };
    }
}

fn fenced(partition: u16) {
    metrics::counter!("chat_persister_partition_losses_total").increment(1);
    tracing::warn!(
        partition,
        "partition lease lost: another persister holds it now; this one stops working on it"
    );
}

impl Shared {
    /// Reads the next batch, retrying failures (with the position moved back to re-read
    /// what a lost reply may have handed over).
    async fn read(
        &self,
        lease: &Lease,
        position: &mut ReadPosition,
        stop: &CancellationToken,
    ) -> Step<Vec<IngestEntry>> {
        let mut failures = Failures::new(self);
        loop {
            let read = tokio::select! {
                // A read cut short may have handed entries over: they stay pending, for the
                // next holder (or this one) to read again.
                _ = stop.cancelled() => return Step::Stopped,
                _ = self.shutdown.cancelled() => return Step::Stopped,
                read = self.ingest.read(lease, position, self.tuning.batch_size, self.tuning.block) => read,
            };
            match read {
                Ok(entries) => return Step::Done(entries),
                Err(BackplaneError::Fenced(_)) => return Step::Fenced,
                Err(error) => {
                    position.after_failure();
                    if !failures.wait("read", lease.partition, &error, stop).await {
                        return Step::Stopped;
                    }
                }
            }
        }
    }

    /// Stores, publishes and acknowledges one batch.
    async fn finish(
        &self,
        lease: &Lease,
        stop: &CancellationToken,
        entries: Vec<IngestEntry>,
    ) -> Step<()> {
        let started = Instant::now();
        let ids: Vec<String> = entries.iter().map(|e| e.id.clone()).collect();
        let mut messages: Vec<SequencedMessage> = Vec::with_capacity(entries.len());
        for entry in entries {
            let decoded = entry.message.and_then(|m| {
                // Entries of gateways older than room sequence numbers sort by their place
                // in the stream.
                let seq = match m.seq {
                    Some(seq) => i64::try_from(seq).map_err(|_| "sequence number too large")?,
                    None => stream_seq(&entry.id).ok_or("malformed entry id")?,
                };
                Ok(SequencedMessage { seq, message: m })
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
        match self
            .retry("insert", lease.partition, stop, || {
                self.store.insert_messages(&messages)
            })
            .await
        {
            Step::Done(()) => {}
            Step::Fenced => return Step::Fenced,
            Step::Stopped => return Step::Stopped,
        }
        metrics::histogram!("chat_persister_insert_seconds")
            .record(insert_started.elapsed().as_secs_f64());

        let stored: Vec<_> = messages.into_iter().map(|m| m.message).collect();
        let events = group_by_room(&stored);
        let completed = self
            .retry("complete", lease.partition, stop, || async {
                match self.ingest.complete(lease, &events, &ids).await {
                    Err(BackplaneError::Fenced(_)) => Ok(Err(())),
                    Err(e) => Err(e),
                    Ok(()) => Ok(Ok(())),
                }
            })
            .await;
        match completed {
            Step::Done(Ok(())) => {}
            Step::Done(Err(())) | Step::Fenced => return Step::Fenced,
            Step::Stopped => return Step::Stopped,
        }
        metrics::counter!("chat_persister_messages_total").increment(stored.len() as u64);
        metrics::histogram!("chat_persister_batch_seconds").record(started.elapsed().as_secs_f64());
        tracing::debug!(
            partition = lease.partition,
            count = stored.len(),
            "batch persisted"
        );
        Step::Done(())
    }

    /// Runs `step` until it succeeds, backing off between attempts. Gives up only at
    /// shutdown or when the partition is being released, leaving the batch pending.
    async fn retry<T, E, F, Fut>(
        &self,
        what: &'static str,
        partition: u16,
        stop: &CancellationToken,
        step: F,
    ) -> Step<T>
    where
        E: std::fmt::Display + Sync,
        F: Fn() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        let mut failures = Failures::new(self);
        loop {
            match step().await {
                Ok(value) => return Step::Done(value),
                Err(error) => {
                    if !failures.wait(what, partition, &error, stop).await {
                        return Step::Stopped;
                    }
                }
            }
        }
    }
}

/// Counts a worker among the failing ones (not ready) from its first failure until it
/// succeeds or ends, and paces its retries.
struct Failures<'a> {
    ctx: &'a Shared,
    backoff: Duration,
    counted: bool,
}

impl<'a> Failures<'a> {
    fn new(ctx: &'a Shared) -> Self {
        Self {
            ctx,
            backoff: BACKOFF_START,
            counted: false,
        }
    }

    /// Logs and counts a failure and waits before the next attempt; `false` when the
    /// worker should stop instead (shutdown, or its partition is being given up).
    async fn wait(
        &mut self,
        what: &'static str,
        partition: u16,
        error: &(dyn std::fmt::Display + Sync),
        stop: &CancellationToken,
    ) -> bool {
        if !self.counted {
            self.counted = true;
            self.ctx.failing.fetch_add(1, Ordering::Relaxed);
        }
        metrics::counter!("chat_persister_errors_total", "step" => what).increment(1);
        tracing::warn!(step = what, partition, %error, retry_in_ms = self.backoff.as_millis() as u64, "persister step failed");
        let go_on = tokio::select! {
            _ = self.ctx.shutdown.cancelled() => false,
            _ = stop.cancelled() => false,
            _ = tokio::time::sleep(self.backoff) => true,
        };
        self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
        go_on
    }
}

impl Drop for Failures<'_> {
    fn drop(&mut self) {
        if self.counted {
            self.ctx.failing.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    //! The persister against the in-process ingest and a flaky store: what is published and
    //! acknowledged, and when.
    use super::*;
    use async_trait::async_trait;
    use shared::ObjectId;
    use shared::backplane::{Backplane, MemoryBackplane, RoomEventSink};
    use shared::store::{Room, StoreError, User, UserCredentials};
    use shared::wire::{ChatMessage, RoomEvent, Sender, now_millis};
    use std::sync::Mutex;
    use std::sync::atomic::AtomicUsize;

    fn message(room: ObjectId, content: &str) -> ChatMessage {
        ChatMessage {
            id: ObjectId::new(),
            room_id: room,
            sender: Sender {
                id: ObjectId::new(),
                email: None,
                display_name: None,
            },
            content: content.into(),
            created_at: now_millis(),
            seq: None,
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
        async fn messages_after(
            &self,
            _: ObjectId,
            _: u64,
            _: u32,
        ) -> Result<Vec<ChatMessage>, StoreError> {
            unimplemented!()
        }
        async fn latest_seq(&self, _: ObjectId) -> Result<u64, StoreError> {
            unimplemented!()
        }
        async fn ping(&self) -> Result<(), StoreError> {
            Ok(())
        }
    }

    /// The in-process ingest with a room subscribed, recording what is published.
    async fn ingest(room: ObjectId) -> (Arc<MemoryBackplane>, Arc<Mutex<Vec<ChatMessage>>>) {
        let published = Arc::new(Mutex::new(Vec::new()));
        let sink: RoomEventSink = {
            let published = published.clone();
            Arc::new(move |event| {
                if let RoomEvent::Messages(batch) = event {
                    published.lock().unwrap().extend(batch.messages);
                }
            })
        };
        let memory = Arc::new(MemoryBackplane::new(sink));
        memory.subscribe(room).await.unwrap();
        memory.seed_seq(room, 0).await.unwrap();
        (memory, published)
    }

    fn tuning() -> Tuning {
        Tuning {
            batch_size: 10,
            lease: Duration::from_secs(10),
            block: Duration::from_millis(10),
        }
    }

    #[test]
    fn fair_shares_add_up_to_the_partitions() {
        let live: Vec<String> = ["a", "b", "c"].map(String::from).to_vec();
        let shares: Vec<usize> = live
            .iter()
            .map(|me| fair_share(16, &live, me).unwrap())
            .collect();
        assert_eq!(shares, [6, 5, 5]);
        assert_eq!(fair_share(16, &live, "d"), None);
        assert_eq!(fair_share(2, &live, "c"), Some(0));
        // The order of the list does not matter: the rank by name does.
        let shuffled: Vec<String> = ["c", "a", "b"].map(String::from).to_vec();
        assert_eq!(fair_share(16, &shuffled, "a"), Some(6));
    }

    #[tokio::test(start_paused = true)]
    async fn a_batch_is_published_and_acknowledged_only_after_it_was_stored() {
        let room = ObjectId::new();
        let (memory, published) = ingest(room).await;
        let (mut a, mut b) = (message(room, "a"), message(room, "b"));
        memory.append(&a, None).await.unwrap();
        memory.append(&b, None).await.unwrap();
        // Numbered in their room when appended, and stored and published with the numbers.
        (a.seq, b.seq) = (Some(1), Some(2));
        let store = Arc::new(FlakyStore {
            failures: AtomicUsize::new(3),
            ..Default::default()
        });
        let shutdown = CancellationToken::new();
        let persister = Persister::new(memory.clone(), store.clone(), tuning(), shutdown.clone());
        let failing = persister.failing.clone();
        let run = tokio::spawn(persister.run());
        // Three failed inserts are retried (with backoff, on the paused clock) before success.
        while memory.queued() > 0 {
            assert!(
                published.lock().unwrap().is_empty() || store.stored.lock().unwrap().len() == 2
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(*store.stored.lock().unwrap(), vec![a.clone(), b.clone()]);
        assert_eq!(*published.lock().unwrap(), vec![a, b]);
        assert_eq!(failing.load(Ordering::Relaxed), 0, "ready again");
        shutdown.cancel();
        run.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_while_the_store_is_down_leaves_the_batch_unacknowledged() {
        let room = ObjectId::new();
        let (memory, published) = ingest(room).await;
        memory.append(&message(room, "x"), None).await.unwrap();
        let store = Arc::new(FlakyStore {
            failures: AtomicUsize::new(usize::MAX),
            ..Default::default()
        });
        let shutdown = CancellationToken::new();
        let persister = Persister::new(memory.clone(), store, tuning(), shutdown.clone());
        let failing = persister.failing.clone();
        let run = tokio::spawn(persister.run());
        tokio::time::sleep(Duration::from_secs(30)).await;
        assert_eq!(
            failing.load(Ordering::Relaxed),
            1,
            "not ready while retrying"
        );
        shutdown.cancel();
        run.await.unwrap();
        assert_eq!(memory.queued(), 1);
        assert!(published.lock().unwrap().is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_worker_that_lost_its_lease_neither_publishes_nor_acknowledges() {
        let room = ObjectId::new();
        let (memory, published) = ingest(room).await;
        memory.append(&message(room, "x"), None).await.unwrap();
        // The store hangs on to the batch while the lease passes to another holder.
        let store = Arc::new(FlakyStore {
            failures: AtomicUsize::new(2),
            ..Default::default()
        });
        let shutdown = CancellationToken::new();
        let persister = Persister::new(memory.clone(), store.clone(), tuning(), shutdown.clone());
        let run = tokio::spawn(persister.run());
        tokio::time::sleep(Duration::from_millis(150)).await;
        let taken = memory.owners().await.unwrap();
        assert_eq!(taken, vec![Some("embedded".to_owned())]);
        // Another holder takes the partition behind the worker's back (as after a pause).
        let stale = Lease {
            partition: 0,
            token: 1,
            holder: "embedded 1".into(),
        };
        memory.release(&stale).await.unwrap();
        let thief = memory
            .acquire(0, Duration::from_secs(10))
            .await
            .unwrap()
            .unwrap();
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(store.stored.lock().unwrap().len(), 1, "stored (idempotent)");
        assert!(published.lock().unwrap().is_empty(), "but never published");
        assert_eq!(memory.queued(), 1, "nor acknowledged");
        // The new holder reads it again.
        let mut position = ReadPosition::start();
        let again = memory
            .read(&thief, &mut position, 10, Duration::ZERO)
            .await
            .unwrap();
        assert_eq!(again.len(), 1);
        shutdown.cancel();
        run.await.unwrap();
    }
}
