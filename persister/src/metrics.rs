//! The persister's metrics: their help texts, and the backlog gauges sampled from Redis.

use shared::backplane::Ingest;
use std::sync::Arc;
use std::time::Duration;

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
        "chat_persister_renumbered_total",
        "Messages numbered again after the store's latest because Redis's counter had given numbers the store holds (after a failover or a Redis restart that lost writes)."
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
