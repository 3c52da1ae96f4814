//! The persister against the in-process ingest and a flaky store: what is published and
//! acknowledged, and when.

use async_trait::async_trait;
use persister::{Persister, Tuning, fair_share};
use shared::ObjectId;
use shared::backplane::{Backplane, Ingest, Lease, MemoryBackplane, ReadPosition, RoomEventSink};
use shared::store::{Room, SequencedMessage, Store, StoreError, StoredSeq, User, UserCredentials};
use shared::wire::{ChatMessage, RoomEvent, Sender, now_millis};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

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
        server_event: None,
    }
}

/// Fails the first `failures` inserts, then stores; refuses a room's number held by another
/// message, as the real stores' unique index does.
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
    async fn create_room(&self, _: Option<String>, _: Vec<ObjectId>) -> Result<Room, StoreError> {
        unimplemented!()
    }
    async fn room(&self, _: ObjectId) -> Result<Option<Room>, StoreError> {
        unimplemented!()
    }
    async fn rooms_of(
        &self,
        _: ObjectId,
        _: Option<ObjectId>,
        _: u32,
    ) -> Result<Vec<Room>, StoreError> {
        unimplemented!()
    }
    async fn share_a_room(&self, _: ObjectId, _: ObjectId) -> Result<bool, StoreError> {
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
        _: usize,
    ) -> Result<Option<Room>, StoreError> {
        unimplemented!()
    }
    async fn insert_messages(&self, messages: &[SequencedMessage]) -> Result<(), StoreError> {
        if self.failures.load(Ordering::SeqCst) > 0 {
            self.failures.fetch_sub(1, Ordering::SeqCst);
            return Err(StoreError::Unavailable("down".into()));
        }
        let mut stored = self.stored.lock().unwrap();
        for (index, m) in messages.iter().enumerate() {
            let seq = u64::try_from(m.seq).ok();
            if stored.iter().any(|s| s.id == m.message.id) {
                continue;
            }
            if stored
                .iter()
                .any(|s| s.room_id == m.message.room_id && s.seq == seq)
            {
                return Err(StoreError::SeqTaken {
                    stored: index,
                    room: m.message.room_id,
                    seq: m.seq,
                });
            }
            stored.push(ChatMessage {
                seq,
                ..m.message.clone()
            });
        }
        Ok(())
    }
    async fn stored_in(
        &self,
        ranges: &[(ObjectId, u64, u64)],
        ids: &[ObjectId],
    ) -> Result<Vec<StoredSeq>, StoreError> {
        let stored = self.stored.lock().unwrap();
        Ok(stored
            .iter()
            .filter_map(|m| {
                let seq = m.seq?;
                let in_range = ranges.iter().any(|(room, first, last)| {
                    *room == m.room_id && (*first..=*last).contains(&seq)
                });
                (in_range || ids.contains(&m.id)).then_some(StoredSeq {
                    room: m.room_id,
                    seq,
                    id: m.id,
                })
            })
            .collect())
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
    async fn latest_seq(&self, room: ObjectId) -> Result<u64, StoreError> {
        let stored = self.stored.lock().unwrap();
        Ok(stored
            .iter()
            .filter(|m| m.room_id == room)
            .filter_map(|m| m.seq)
            .max()
            .unwrap_or(0))
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
        assert!(published.lock().unwrap().is_empty() || store.stored.lock().unwrap().len() == 2);
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

#[tokio::test(start_paused = true)]
async fn numbers_taken_in_the_store_are_given_again_after_its_latest_in_order() {
    let room = ObjectId::new();
    let (memory, published) = ingest(room).await;
    // The store holds three messages that Redis's counter no longer knows of (as after a
    // failover to a replica that missed them): the counter is at 1.
    let store = Arc::new(FlakyStore::default());
    let earlier: Vec<ChatMessage> = (1..=3)
        .map(|seq| ChatMessage {
            seq: Some(seq),
            ..message(room, &format!("earlier {seq}"))
        })
        .collect();
    store.stored.lock().unwrap().extend(earlier.clone());
    memory.seed_seq(room, 0).await.unwrap();
    let first = message(room, "kept");
    memory.append(&first, None).await.unwrap();
    let mut late = Vec::new();
    for i in 0..4 {
        let m = message(room, &format!("late {i}"));
        memory.append(&m, None).await.unwrap();
        late.push(m);
    }
    let shutdown = CancellationToken::new();
    let persister = Persister::new(memory.clone(), store.clone(), tuning(), shutdown.clone());
    let run = tokio::spawn(persister.run());
    while store.stored.lock().unwrap().len() < 7 || memory.queued() > 0 {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Every message from the first taken number on follows the store's latest, in order.
    let stored = store.stored.lock().unwrap().clone();
    let mut numbers: Vec<(u64, String)> = stored
        .iter()
        .map(|m| (m.seq.unwrap(), m.content.clone()))
        .collect();
    numbers.sort();
    let expected: Vec<(u64, String)> = [
        "earlier 1",
        "earlier 2",
        "earlier 3",
        "kept",
        "late 0",
        "late 1",
        "late 2",
        "late 3",
    ]
    .iter()
    .enumerate()
    .map(|(i, c)| (i as u64 + 1, c.to_string()))
    .collect();
    assert_eq!(
        numbers, expected,
        "one message per number, in the order they were accepted"
    );
    let order: Vec<(u64, String)> = published
        .lock()
        .unwrap()
        .iter()
        .map(|m| (m.seq.unwrap(), m.content.clone()))
        .collect();
    assert_eq!(order, expected[3..], "published once each, in order");
    // The counter went past them: the next message follows on.
    let next = message(room, "next");
    assert_eq!(
        memory.append(&next, None).await.unwrap(),
        shared::backplane::Appended::New { seq: 9 }
    );
    shutdown.cancel();
    run.await.unwrap();
}
