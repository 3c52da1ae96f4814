//! The partition leases: every live persister takes its fair share, gives up what is over
//! it, and runs one [`crate::worker`] per partition it holds.

use crate::worker::{Shared, work};
use shared::backplane::{Ingest, Lease};
use shared::store::Store;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::time::Duration;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

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
    pub(crate) fn tick(&self) -> Duration {
        self.lease / 4
    }

    pub(crate) fn lease_ttl(&self) -> Duration {
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
