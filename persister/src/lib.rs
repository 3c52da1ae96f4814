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

//!
//! Layout: [`settings`] (the command line), [`app`] (start-up and the admin server),
//! [`balance`] (the partition leases: each live persister's fair share), [`worker`] (one
//! partition's read, store, publish and acknowledge loop), [`metrics`].

pub mod app;
pub mod balance;
pub mod metrics;
mod numbering;
pub mod settings;
mod worker;

pub use app::Application;
pub use balance::{Persister, Tuning, fair_share};
pub use metrics::{describe_metrics, sample_backlog};
pub use settings::Settings;

use shared::backplane::Ingest;
use shared::store::Store;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

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
