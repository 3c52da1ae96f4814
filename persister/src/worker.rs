//! One partition's worker: reads a batch, checks its numbers ([`crate::numbering`]),
//! stores it, then publishes and acknowledges it in one fenced step; reads the next batch
//! while the current one is stored.

use crate::balance::Tuning;
use crate::numbering::{Numbered, Numbering};
use shared::backplane::{BackplaneError, Ingest, IngestEntry, Lease, ReadPosition, group_by_room};
use shared::store::{SequencedMessage, Store, StoreError};
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// What every worker of a persister shares.
pub(crate) struct Shared {
    pub(crate) ingest: Arc<dyn Ingest>,
    pub(crate) store: Arc<dyn Store>,
    pub(crate) tuning: Tuning,
    pub(crate) shutdown: CancellationToken,
    /// Workers retrying a failed step; the persister is not ready while any is.
    pub(crate) failing: Arc<AtomicUsize>,
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
pub(crate) async fn work(ctx: Arc<Shared>, lease: Lease, stop: CancellationToken) {
    let partition = lease.partition;
    let mut position = ReadPosition::start();
    let mut numbering = Numbering::default();
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
        let finished = ctx.finish(&lease, &stop, &mut numbering, current);
        let (finished, next) = tokio::join!(finished, next);
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
    /// Reads the next batch, retrying failures (the next read hands out again whatever a
    /// failed one handed out).
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
        numbering: &mut Numbering,
        entries: Vec<IngestEntry>,
    ) -> Step<()> {
        let started = Instant::now();
        let ids: Vec<String> = entries.iter().map(|e| e.id.clone()).collect();
        let mut batch: Vec<Numbered> = Vec::with_capacity(entries.len());
        for entry in entries {
            let decoded = entry.message.and_then(|m| {
                let seq = m.seq.ok_or("entry has no sequence number")?;
                let seq = i64::try_from(seq).map_err(|_| "sequence number too large")?;
                Ok(SequencedMessage { seq, message: m })
            });
            match decoded {
                Ok(m) if numbering.is_moved(&m.message.room_id, &entry.id) => {}
                Ok(message) => batch.push(Numbered {
                    entry: entry.id,
                    message,
                }),
                Err(error) => {
                    // Retrying cannot fix an undecodable entry; it is logged and acknowledged.
                    metrics::counter!("chat_persister_invalid_entries_total").increment(1);
                    tracing::error!(entry = %entry.id, %error, "undecodable ingest entry dropped");
                }
            }
        }
        metrics::histogram!("chat_persister_batch_size").record(batch.len() as f64);

        let insert_started = Instant::now();
        let publish = loop {
            let plan = match self
                .retry("check", lease.partition, stop, || {
                    numbering.plan(self.store.as_ref(), &batch)
                })
                .await
            {
                Step::Done(plan) => plan,
                Step::Fenced => return Step::Fenced,
                Step::Stopped => return Step::Stopped,
            };
            for (room, first) in &plan.taken {
                match self.renumber(lease, stop, *room, first).await {
                    Step::Done((upto, latest)) => {
                        numbering.renumbered(*room, first, &upto, latest);
                        batch.retain(|n| !numbering.is_moved(&n.message.message.room_id, &n.entry));
                    }
                    Step::Fenced => return Step::Fenced,
                    Step::Stopped => return Step::Stopped,
                }
            }
            let inserted = self
                .retry("insert", lease.partition, stop, || async {
                    match self.store.insert_messages(&plan.store).await {
                        Err(StoreError::SeqTaken { room, seq, .. }) => Ok(Err((room, seq))),
                        Err(e) => Err(e),
                        Ok(()) => Ok(Ok(())),
                    }
                })
                .await;
            match inserted {
                Step::Done(Ok(())) => break plan.publish,
                // Someone stored under a number this worker took for free (a paused earlier
                // holder): plan again from what the store holds now.
                Step::Done(Err((room, seq))) => {
                    tracing::warn!(partition = lease.partition, room_id = %room, seq, "a number was taken while the batch was stored: checking it again");
                    numbering.forget();
                }
                Step::Fenced => return Step::Fenced,
                Step::Stopped => return Step::Stopped,
            }
        };
        metrics::histogram!("chat_persister_insert_seconds")
            .record(insert_started.elapsed().as_secs_f64());

        let events = group_by_room(&publish);
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
        numbering.stored(&publish);
        metrics::counter!("chat_persister_messages_total").increment(publish.len() as u64);
        metrics::histogram!("chat_persister_batch_seconds").record(started.elapsed().as_secs_f64());
        tracing::debug!(
            partition = lease.partition,
            count = publish.len(),
            "batch persisted"
        );
        Step::Done(())
    }

    /// Numbers a room's entries again from `first` on (their numbers are taken in the
    /// store); returns the last entry looked at and the store's latest number.
    async fn renumber(
        &self,
        lease: &Lease,
        stop: &CancellationToken,
        room: shared::ObjectId,
        first: &str,
    ) -> Step<(String, u64)> {
        let done = self
            .retry("renumber", lease.partition, stop, || async {
                let latest = self
                    .store
                    .latest_seq(room)
                    .await
                    .map_err(|e| e.to_string())?;
                match self.ingest.renumber(lease, room, first, latest).await {
                    Ok(done) => Ok(Ok((done, latest))),
                    Err(BackplaneError::Fenced(_)) => Ok(Err(())),
                    Err(e) => Err(e.to_string()),
                }
            })
            .await;
        match done {
            Step::Done(Ok((done, latest))) => {
                metrics::counter!("chat_persister_renumbered_total").increment(done.moved);
                tracing::warn!(
                    partition = lease.partition,
                    room_id = %room,
                    from_entry = first,
                    store_latest = latest,
                    moved = done.moved,
                    "sequence numbers already stored were given again (Redis's counter fell behind the store): the room's entries were numbered again after the store's latest"
                );
                Step::Done((done.upto, latest))
            }
            Step::Done(Err(())) | Step::Fenced => Step::Fenced,
            Step::Stopped => Step::Stopped,
        }
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
