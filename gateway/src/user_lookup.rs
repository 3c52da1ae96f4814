//! User records for connecting sockets, looked up in batches.
//!
//! Every connect checks that its token's user still exists and takes the e-mail and display
//! name from the record. One query per connect turned a storm of 10,000 connects into 10,000
//! queries queued in the driver's pool, each waiting behind the others; the lookups that
//! arrive while a query runs are gathered into the next one (`_id: {$in: [...]}`), so a storm
//! costs a few dozen queries.

use shared::ObjectId;
use shared::store::{Store, User};
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot};

/// Ids per query, at most.
const BATCH: usize = 256;
/// Lookups waiting for the next query, at most; past it a connect is told the store is busy.
const QUEUE: usize = 16_384;

type Answer = Result<Option<User>, LookupFailed>;

/// The store did not answer (the cause is logged).
#[derive(Debug, Clone, Copy)]
pub struct LookupFailed;

/// Batches user lookups onto one task.
pub struct UserLookup {
    tx: mpsc::Sender<(ObjectId, oneshot::Sender<Answer>)>,
}

impl UserLookup {
    pub fn new(store: Arc<dyn Store>) -> Self {
        let (tx, rx) = mpsc::channel(QUEUE);
        tokio::spawn(run(store, rx));
        Self { tx }
    }

    /// The user's record, `None` when there is no such user.
    pub async fn get(&self, id: ObjectId) -> Answer {
        let (answer, wait) = oneshot::channel();
        self.tx.try_send((id, answer)).map_err(|_| LookupFailed)?;
        wait.await.map_err(|_| LookupFailed)?
    }
}

async fn run(store: Arc<dyn Store>, mut rx: mpsc::Receiver<(ObjectId, oneshot::Sender<Answer>)>) {
    while let Some(first) = rx.recv().await {
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
        let mut ids: Vec<ObjectId> = batch.iter().map(|(id, _)| *id).collect();
        ids.sort_unstable();
        ids.dedup();
        metrics::histogram!("chat_gateway_user_lookup_batch_size").record(ids.len() as f64);
        match store.users(&ids).await {
            Ok(users) => {
                for (id, answer) in batch {
                    let _ = answer.send(Ok(users.iter().find(|u| u.id == id).cloned()));
                }
            }
            Err(error) => {
                tracing::warn!(%error, users = ids.len(), "looking up connecting users failed");
                for (_, answer) in batch {
                    let _ = answer.send(Err(LookupFailed));
                }
            }
        }
    }
}
