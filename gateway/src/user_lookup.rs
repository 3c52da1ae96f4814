//! User records for connecting sockets, looked up in batches.
//!
//! Every connect checks that its token's user still exists and takes the e-mail and display
//! name from the record. One query per connect would turn a storm of 10,000 connects into
//! 10,000 queries queued in the driver's pool, each waiting behind the others; instead the
//! lookups that arrive while the queries in flight run are gathered into the next ones (`_id: {$in:
//! [...]}`), so a storm costs a few hundred queries, several in flight at once.
//!
//! Small batches, several at once, rather than one large one at a time: a query's time grows
//! with its id list, and with the test store faster than linearly (32 ids: about 100 µs per
//! id; 145: 330 µs; 256: 590 µs; docs/BENCHMARKS.md), and one slow answer does not hold every
//! connect behind it.

use shared::ObjectId;
use shared::store::{Store, StoreError, User};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use tokio::sync::{Semaphore, mpsc, oneshot};

/// Ids per query, at most.
const BATCH: usize = 32;
/// Queries in flight at once, at most.
const IN_FLIGHT: usize = 8;
/// Lookups waiting for the next query, at most; past it a connect is told the store is busy.
const QUEUE: usize = 16_384;

type Answer = Result<Option<User>, LookupFailed>;
type Request = (ObjectId, oneshot::Sender<Answer>);
/// One query for a batch of ids: the store's `users` (a function, so that the batching can
/// be tested on its own).
type Query = Arc<
    dyn Fn(Vec<ObjectId>) -> Pin<Box<dyn Future<Output = Result<Vec<User>, StoreError>> + Send>>
        + Send
        + Sync,
>;

/// The store did not answer (the cause is logged).
#[derive(Debug, Clone, Copy)]
pub struct LookupFailed;

/// Batches user lookups onto one task.
pub struct UserLookup {
    tx: mpsc::Sender<Request>,
}

impl UserLookup {
    pub fn new(store: Arc<dyn Store>) -> Self {
        Self::with_query(Arc::new(move |ids| {
            let store = store.clone();
            Box::pin(async move { store.users(&ids).await })
        }))
    }

    fn with_query(query: Query) -> Self {
        let (tx, rx) = mpsc::channel(QUEUE);
        tokio::spawn(run(query, rx));
        Self { tx }
    }

    /// The user's record, `None` when there is no such user.
    pub async fn get(&self, id: ObjectId) -> Answer {
        let (answer, wait) = oneshot::channel();
        if self.tx.try_send((id, answer)).is_err() {
            // Counted, not logged: a flood of requests would log a line each.
            metrics::counter!("chat_gateway_user_lookup_queue_full_total").increment(1);
            return Err(LookupFailed);
        }
        wait.await.map_err(|_| LookupFailed)?
    }

    /// Whether the store says, within [`DELETION_CHECK_TIMEOUT`], that the user no longer
    /// exists. A store that does not answer, or a queue of lookups that is full, says
    /// nothing: the token was valid, and a request that holds one must not wait on the store
    /// for a check of deletions.
    pub async fn deleted(&self, id: ObjectId) -> bool {
        match tokio::time::timeout(DELETION_CHECK_TIMEOUT, self.get(id)).await {
            Ok(Ok(found)) => found.is_none(),
            Ok(Err(LookupFailed)) => false,
            Err(_) => {
                tracing::debug!(user_id = %id, "user lookup timed out; taken as existing");
                false
            }
        }
    }
}

/// How long a request waits to learn that its token's user was deleted.
pub const DELETION_CHECK_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

async fn run(query: Query, mut rx: mpsc::Receiver<Request>) {
    let slots = Arc::new(Semaphore::new(IN_FLIGHT));
    loop {
        // A slot first, then the lookups: those that arrive while every slot is busy wait in
        // the queue and leave together in the next batch.
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let Some(first) = rx.recv().await else { return };
        let mut batch = vec![first];
        while batch.len() < BATCH {
            match rx.try_recv() {
                Ok(request) => batch.push(request),
                Err(_) => break,
            }
        }
        // Callers that gave up (their connect timed out) are not looked up.
        batch.retain(|(_, answer)| !answer.is_closed());
        if batch.is_empty() {
            continue;
        }
        let query = query.clone();
        tokio::spawn(async move {
            lookup(query, batch).await;
            drop(slot);
        });
    }
}

async fn lookup(query: Query, batch: Vec<Request>) {
    let mut ids: Vec<ObjectId> = batch.iter().map(|(id, _)| *id).collect();
    ids.sort_unstable();
    ids.dedup();
    metrics::histogram!("chat_gateway_user_lookup_batch_size").record(ids.len() as f64);
    let count = ids.len();
    match query(ids).await {
        Ok(users) => {
            for (id, answer) in batch {
                let _ = answer.send(Ok(users.iter().find(|u| u.id == id).cloned()));
            }
        }
        Err(error) => {
            tracing::warn!(%error, users = count, "looking up connecting users failed");
            for (_, answer) in batch {
                let _ = answer.send(Err(LookupFailed));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::sync::Notify;

    /// A storm of lookups: queries of at most `BATCH` ids, `IN_FLIGHT` of them at once, and
    /// every caller gets its own record.
    #[tokio::test]
    async fn a_storm_is_answered_by_small_batches_several_at_once() {
        /// What the fake store saw: queries running now, the largest id list.
        struct Probe {
            in_flight: AtomicUsize,
            largest: AtomicUsize,
            started: Notify,
            gate: Semaphore,
        }
        let probe = Arc::new(Probe {
            in_flight: AtomicUsize::new(0),
            largest: AtomicUsize::new(0),
            started: Notify::new(),
            gate: Semaphore::new(0),
        });
        let query: Query = {
            let probe = probe.clone();
            Arc::new(move |ids: Vec<ObjectId>| {
                let probe = probe.clone();
                Box::pin(async move {
                    probe.largest.fetch_max(ids.len(), Ordering::SeqCst);
                    probe.in_flight.fetch_add(1, Ordering::SeqCst);
                    probe.started.notify_one();
                    probe.gate.acquire().await.expect("open").forget();
                    probe.in_flight.fetch_sub(1, Ordering::SeqCst);
                    Ok(ids
                        .into_iter()
                        .map(|id| User {
                            id,
                            email: format!("{id}@example.com"),
                            display_name: id.to_hex(),
                        })
                        .collect())
                })
            })
        };
        let lookup = Arc::new(UserLookup::with_query(query));
        let ids: Vec<ObjectId> = (0..1000).map(|_| ObjectId::new()).collect();
        let callers: Vec<_> = ids
            .iter()
            .map(|&id| {
                let lookup = lookup.clone();
                tokio::spawn(async move { (id, lookup.get(id).await) })
            })
            .collect();
        let all_slots_busy = async {
            while probe.in_flight.load(Ordering::SeqCst) < IN_FLIGHT {
                probe.started.notified().await;
            }
        };
        tokio::time::timeout(std::time::Duration::from_secs(10), all_slots_busy)
            .await
            .expect("IN_FLIGHT queries at once");
        // Every slot is taken: no ninth query starts before one of them ends.
        tokio::task::yield_now().await;
        assert_eq!(probe.in_flight.load(Ordering::SeqCst), IN_FLIGHT);
        probe.gate.add_permits(Semaphore::MAX_PERMITS);
        for caller in callers {
            let (id, answer) = caller.await.expect("caller");
            let user = answer.expect("answered").expect("found");
            assert_eq!(user.id, id);
        }
        assert!(probe.largest.load(Ordering::SeqCst) <= BATCH);
    }
}
