//! The in-process backplane for the single-process mode: the ingest queue, room events,
//! and idempotency keys live in this process's memory. Same contract as the Redis
//! backplane for one gateway with its persister running in the same process.
//!
//! Durability: a message is acknowledged to its sender once queued; the in-process
//! persister stores it within milliseconds, and a graceful shutdown stores every queued
//! message before the process exits. A crash (SIGKILL) loses what was queued but not yet
//! stored; the distributed mode (Redis stream) does not have that window.

use super::{
    Appended, Backplane, BackplaneError, IDEMPOTENCY_TTL, Ingest, IngestEntry, Lease, ReadPosition,
    Renumbered, RoomEventSink, stream_seq,
};
use crate::wire::{ChatMessage, RoomEvent};
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use mongodb::bson::oid::ObjectId;
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};
use tokio::sync::Notify;

#[derive(Default)]
struct Queue {
    /// Appended and not yet acknowledged, in order.
    entries: VecDeque<(String, ChatMessage)>,
    /// How many of `entries` were handed out by `read` and await their ack.
    delivered: usize,
    /// Last entry id: `(millis, n)`, kept increasing like a Redis stream id.
    last: (i64, i64),
    /// The last sequence number given in each room (seeded from the store on first use).
    seqs: HashMap<ObjectId, u64>,
}

/// Bounds of the in-process ingest, as the Redis one has them.
#[derive(Debug, Clone, Copy)]
pub struct MemoryLimits {
    /// Most messages queued and not yet stored (`INGEST_MAX_BACKLOG`); past it, appends fail
    /// with [`BackplaneError::BacklogFull`].
    pub max_backlog: u64,
    /// How long an idempotency key is remembered (`IDEMPOTENCY_TTL_SECS`).
    pub idempotency_ttl: Duration,
    /// Most idempotency keys remembered; past it the oldest is forgotten first (counted in
    /// `chat_gateway_idempotency_evictions_total`).
    pub max_idempotency_keys: usize,
}

impl Default for MemoryLimits {
    fn default() -> Self {
        Self {
            max_backlog: 100_000,
            idempotency_ttl: IDEMPOTENCY_TTL,
            max_idempotency_keys: MAX_IDEMPOTENCY_KEYS,
        }
    }
}

/// Idempotency keys an embedded server remembers at most: about 200 bytes each, so 20 MB.
pub const MAX_IDEMPOTENCY_KEYS: usize = 100_000;

/// The in-process backplane; it is also the persister's [`Ingest`].
pub struct MemoryBackplane {
    sink: RoomEventSink,
    limits: MemoryLimits,
    queue: Mutex<Queue>,
    appended: Notify,
    rooms: Mutex<HashSet<ObjectId>>,
    idempotency: Mutex<Idempotency>,
    /// The fencing token of the one partition's lease, while it is held.
    lease: Mutex<Option<u64>>,
    tokens: std::sync::atomic::AtomicU64,
    /// Removals from each room's participants (see `Backplane::members_version`).
    removals: Mutex<HashMap<ObjectId, u64>>,
}

/// Idempotency keys with their first append, and the order they expire in: every key lives
/// the same time, so the oldest is always at the front and expiry costs O(1) per append.
#[derive(Default)]
struct Idempotency {
    first: HashMap<String, FirstAppend>,
    expiry: VecDeque<(Instant, String)>,
}

/// The message first appended under an idempotency key: id, time, sequence number and the
/// hash of its content.
type FirstAppend = (ObjectId, DateTime<Utc>, u64, String);

impl MemoryBackplane {
    /// Room events of subscribed rooms (and every control event) go to `sink`.
    pub fn new(sink: RoomEventSink) -> Self {
        Self::with_limits(sink, MemoryLimits::default())
    }

    /// The same with other bounds.
    pub fn with_limits(sink: RoomEventSink, limits: MemoryLimits) -> Self {
        Self {
            sink,
            limits,
            queue: Mutex::default(),
            appended: Notify::new(),
            rooms: Mutex::default(),
            idempotency: Mutex::default(),
            lease: Mutex::default(),
            tokens: std::sync::atomic::AtomicU64::new(0),
            removals: Mutex::default(),
        }
    }

    /// Messages queued and not yet stored.
    pub fn queued(&self) -> usize {
        lock(&self.queue).entries.len()
    }

    /// Queues a message with the next number of its room; returns the number.
    fn push(&self, message: &ChatMessage) -> Result<u64, BackplaneError> {
        let mut q = lock(&self.queue);
        let entries = q.entries.len() as u64;
        if entries >= self.limits.max_backlog {
            metrics::counter!("chat_gateway_ingest_full_total").increment(1);
            return Err(BackplaneError::BacklogFull {
                partition: 0,
                entries,
            });
        }
        let Some(last) = q.seqs.get_mut(&message.room_id) else {
            return Err(BackplaneError::SeqUnknown(message.room_id));
        };
        *last += 1;
        let seq = *last;
        q.enqueue(message.clone(), seq);
        drop(q);
        self.appended.notify_one();
        Ok(seq)
    }
}

impl Queue {
    /// Adds an entry with the next id.
    fn enqueue(&mut self, mut message: ChatMessage, seq: u64) {
        let now = Utc::now().timestamp_millis();
        self.last = if now > self.last.0 {
            (now, 0)
        } else {
            (self.last.0, self.last.1 + 1)
        };
        message.seq = Some(seq);
        self.entries
            .push_back((format!("{}-{}", self.last.0, self.last.1), message));
    }
}

/// The data behind these locks stays consistent even if a holder panicked.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[async_trait]
impl Backplane for MemoryBackplane {
    async fn append(
        &self,
        message: &ChatMessage,
        idempotency_key: Option<&str>,
    ) -> Result<Appended, BackplaneError> {
        if let Some(key) = idempotency_key {
            let mut seen = lock(&self.idempotency);
            let now = Instant::now();
            while seen.expiry.front().is_some_and(|(at, _)| *at <= now) {
                if let Some((_, old)) = seen.expiry.pop_front() {
                    seen.first.remove(&old);
                }
            }
            let hash = message.fingerprint();
            if let Some((id, created_at, seq, first)) = seen.first.get(key) {
                return Ok(Appended::Duplicate {
                    id: *id,
                    created_at: *created_at,
                    seq: *seq,
                    same_content: *first == hash,
                });
            }
            // Queued under the same lock, so a concurrent duplicate cannot slip in between.
            let seq = self.push(message)?;
            while seen.first.len() >= self.limits.max_idempotency_keys {
                let Some((_, old)) = seen.expiry.pop_front() else {
                    break;
                };
                seen.first.remove(&old);
                metrics::counter!("chat_gateway_idempotency_evictions_total").increment(1);
            }
            seen.first
                .insert(key.to_owned(), (message.id, message.created_at, seq, hash));
            seen.expiry
                .push_back((now + self.limits.idempotency_ttl, key.to_owned()));
            return Ok(Appended::New { seq });
        }
        Ok(Appended::New {
            seq: self.push(message)?,
        })
    }

    async fn seed_seq(&self, room: ObjectId, latest: u64) -> Result<(), BackplaneError> {
        lock(&self.queue).seqs.entry(room).or_insert(latest);
        Ok(())
    }

    async fn publish(&self, events: &[RoomEvent]) -> Result<(), BackplaneError> {
        for event in events {
            let wanted = matches!(event, RoomEvent::MemberRemoved(_) | RoomEvent::RoomAdded(_))
                || lock(&self.rooms).contains(&event.room_id());
            if wanted {
                (self.sink)(event.clone());
            }
        }
        Ok(())
    }

    async fn members_changed(&self, room: ObjectId) -> Result<(), BackplaneError> {
        // Removal notices are delivered in-process and cannot be lost; the count is for the
        // membership cache.
        *lock(&self.removals).entry(room).or_default() += 1;
        Ok(())
    }

    async fn members_version(&self, room: ObjectId) -> Result<u64, BackplaneError> {
        Ok(lock(&self.removals).get(&room).copied().unwrap_or(0))
    }

    async fn subscribe(&self, room: ObjectId) -> Result<(), BackplaneError> {
        lock(&self.rooms).insert(room);
        Ok(())
    }

    async fn unsubscribe(&self, room: ObjectId) -> Result<(), BackplaneError> {
        lock(&self.rooms).remove(&room);
        Ok(())
    }

    async fn ping(&self) -> Result<(), BackplaneError> {
        Ok(())
    }
}

/// The embedded mode's one instance name.
const INSTANCE: &str = "embedded";

impl MemoryBackplane {
    fn check(&self, lease: &Lease) -> Result<(), BackplaneError> {
        if *lock(&self.lease) == Some(lease.token) {
            Ok(())
        } else {
            Err(BackplaneError::Fenced(lease.partition))
        }
    }
}

/// One partition, one persister: the in-process persister holds the only lease.
#[async_trait]
impl Ingest for MemoryBackplane {
    fn partitions(&self) -> u16 {
        1
    }

    fn instance(&self) -> &str {
        INSTANCE
    }

    async fn heartbeat(&self, _ttl: Duration) -> Result<Vec<String>, BackplaneError> {
        Ok(vec![INSTANCE.to_owned()])
    }

    async fn leave(&self) -> Result<(), BackplaneError> {
        Ok(())
    }

    async fn owners(&self) -> Result<Vec<Option<String>>, BackplaneError> {
        Ok(vec![lock(&self.lease).map(|_| INSTANCE.to_owned())])
    }

    async fn acquire(
        &self,
        partition: u16,
        _ttl: Duration,
    ) -> Result<Option<Lease>, BackplaneError> {
        let mut lease = lock(&self.lease);
        if lease.is_some() {
            return Ok(None);
        }
        let token = self
            .tokens
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst)
            + 1;
        *lease = Some(token);
        Ok(Some(Lease {
            partition,
            token,
            holder: format!("{INSTANCE} {token}"),
        }))
    }

    async fn renew(&self, lease: &Lease, _ttl: Duration) -> Result<bool, BackplaneError> {
        Ok(self.check(lease).is_ok())
    }

    async fn release(&self, lease: &Lease) -> Result<(), BackplaneError> {
        let mut held = lock(&self.lease);
        if *held == Some(lease.token) {
            *held = None;
        }
        Ok(())
    }

    async fn read(
        &self,
        lease: &Lease,
        position: &mut ReadPosition,
        max: usize,
        block: Duration,
    ) -> Result<Vec<IngestEntry>, BackplaneError> {
        self.check(lease)?;
        let after = stream_seq(position.last()).unwrap_or(0);
        let max = max.max(1);
        let deadline = tokio::time::Instant::now() + block;
        loop {
            // Registered before looking, so an append in between is not missed.
            let appended = self.appended.notified();
            {
                let mut q = lock(&self.queue);
                let entry = |(id, m): &(String, ChatMessage)| IngestEntry {
                    id: id.clone(),
                    message: Ok(m.clone()),
                };
                // Handed out before and not received (an earlier holder's) come first.
                let again: Vec<IngestEntry> = q
                    .entries
                    .iter()
                    .take(q.delivered)
                    .filter(|(id, _)| stream_seq(id).unwrap_or(0) > after)
                    .take(max)
                    .map(entry)
                    .collect();
                if !again.is_empty() {
                    position.received(&again);
                    return Ok(again);
                }
                if q.entries.len() > q.delivered {
                    let start = q.delivered;
                    let end = q.entries.len().min(start + max);
                    q.delivered = end;
                    let entries: Vec<IngestEntry> =
                        q.entries.range(start..end).map(entry).collect();
                    position.received(&entries);
                    return Ok(entries);
                }
            }
            if tokio::time::timeout_at(deadline, appended).await.is_err() {
                return Ok(Vec::new());
            }
        }
    }

    async fn complete(
        &self,
        lease: &Lease,
        events: &[RoomEvent],
        ids: &[String],
    ) -> Result<(), BackplaneError> {
        self.check(lease)?;
        // Each batch carries its room's count of removals, as the Redis script fills it in.
        let events: Vec<RoomEvent> = {
            let removals = lock(&self.removals);
            events
                .iter()
                .map(|event| match event {
                    RoomEvent::Messages(batch) => RoomEvent::Messages(crate::wire::MessageBatch {
                        members_version: Some(removals.get(&batch.room_id).copied().unwrap_or(0)),
                        ..batch.clone()
                    }),
                    other => other.clone(),
                })
                .collect()
        };
        self.publish(&events).await?;
        let ids: HashSet<&str> = ids.iter().map(String::as_str).collect();
        let mut q = lock(&self.queue);
        let delivered = q.delivered;
        let mut index = 0;
        let mut removed_delivered = 0;
        q.entries.retain(|(id, _)| {
            let keep = !ids.contains(id.as_str());
            if !keep && index < delivered {
                removed_delivered += 1;
            }
            index += 1;
            keep
        });
        q.delivered = delivered - removed_delivered;
        Ok(())
    }

    async fn renumber(
        &self,
        lease: &Lease,
        room: ObjectId,
        from: &str,
        store_latest: u64,
    ) -> Result<Renumbered, BackplaneError> {
        self.check(lease)?;
        let from = stream_seq(from).unwrap_or(0);
        let mut q = lock(&self.queue);
        let Some(upto) = q.entries.back().map(|(id, _)| id.clone()) else {
            return Ok(Renumbered {
                upto: "0-0".into(),
                moved: 0,
            });
        };
        q.seqs.insert(room, store_latest);
        let (mut kept, mut moved) = (VecDeque::new(), Vec::new());
        let mut delivered = q.delivered;
        for (index, (id, message)) in std::mem::take(&mut q.entries).into_iter().enumerate() {
            if message.room_id == room && stream_seq(&id).unwrap_or(0) >= from {
                if index < q.delivered {
                    delivered -= 1;
                }
                moved.push(message);
            } else {
                kept.push_back((id, message));
            }
        }
        q.entries = kept;
        q.delivered = delivered;
        let count = moved.len() as u64;
        for message in moved {
            let seq = {
                let counter = q.seqs.entry(room).or_insert(0);
                *counter += 1;
                *counter
            };
            q.enqueue(message, seq);
        }
        drop(q);
        self.appended.notify_one();
        Ok(Renumbered { upto, moved: count })
    }

    async fn backlog(&self, _partition: u16) -> Result<u64, BackplaneError> {
        Ok(lock(&self.queue).entries.len() as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::Sender;
    use std::sync::Arc;

    fn message(room: ObjectId) -> ChatMessage {
        ChatMessage {
            id: ObjectId::new(),
            room_id: room,
            sender: Sender {
                id: ObjectId::new(),
                email: None,
                display_name: None,
            },
            content: "hi".into(),
            created_at: crate::wire::now_millis(),
            seq: None,
            server_event: None,
        }
    }

    #[tokio::test]
    async fn ingest_is_ordered_redelivers_unacked_and_dedupes_keys() {
        let bp = MemoryBackplane::new(Arc::new(|_| {}));
        let room = ObjectId::new();
        let (a, b) = (message(room), message(room));
        // A room's counter starts from what the store holds.
        assert!(matches!(
            bp.append(&a, Some("k")).await,
            Err(BackplaneError::SeqUnknown(r)) if r == room
        ));
        bp.seed_seq(room, 41).await.unwrap();
        bp.seed_seq(room, 7).await.unwrap(); // a later seed changes nothing
        assert_eq!(
            bp.append(&a, Some("k")).await.unwrap(),
            Appended::New { seq: 42 }
        );
        assert!(matches!(
            bp.append(&b, Some("k")).await.unwrap(),
            Appended::Duplicate { id, seq: 42, same_content: true, .. } if id == a.id
        ));
        assert_eq!(
            bp.append(&b, None).await.unwrap(),
            Appended::New { seq: 43 }
        );
        let ttl = Duration::from_secs(1);
        let lease = bp.acquire(0, ttl).await.unwrap().unwrap();
        assert_eq!(bp.acquire(0, ttl).await.unwrap(), None, "one holder");
        let mut position = ReadPosition::start();
        let first = bp
            .read(&lease, &mut position, 1, Duration::ZERO)
            .await
            .unwrap();
        let second = bp
            .read(&lease, &mut position, 10, Duration::ZERO)
            .await
            .unwrap();
        assert_eq!(first[0].message.as_ref().unwrap().id, a.id);
        assert_eq!(
            first[0].message.as_ref().unwrap().seq,
            Some(42),
            "entries carry their numbers"
        );
        assert_eq!(second[0].message.as_ref().unwrap().id, b.id);
        assert!(stream_seq(&first[0].id).unwrap() < stream_seq(&second[0].id).unwrap());
        bp.complete(&lease, &[], &[first[0].id.clone()])
            .await
            .unwrap();
        // The next holder gets the unacknowledged entry again; the old one is fenced.
        bp.release(&lease).await.unwrap();
        let next = bp.acquire(0, ttl).await.unwrap().unwrap();
        assert!(matches!(
            bp.complete(&lease, &[], &[second[0].id.clone()]).await,
            Err(BackplaneError::Fenced(0))
        ));
        let mut position = ReadPosition::start();
        let again = bp
            .read(&next, &mut position, 10, Duration::ZERO)
            .await
            .unwrap();
        assert_eq!(again.len(), 1);
        assert_eq!(again[0].id, second[0].id);
        bp.complete(&next, &[], &[again[0].id.clone()])
            .await
            .unwrap();
        assert_eq!(bp.queued(), 0);
        // A read waits for an append.
        let bp = Arc::new(bp);
        let reader = {
            let bp = bp.clone();
            tokio::spawn(async move {
                let mut position = ReadPosition::start();
                bp.read(&next, &mut position, 10, Duration::from_secs(10))
                    .await
            })
        };
        tokio::task::yield_now().await;
        bp.append(&message(room), None).await.unwrap();
        assert_eq!(reader.await.unwrap().unwrap().len(), 1);
    }

    #[tokio::test]
    async fn room_events_reach_the_sink_only_for_subscribed_rooms() {
        let got = Arc::new(Mutex::new(Vec::new()));
        let sink: RoomEventSink = {
            let got = got.clone();
            Arc::new(move |e: RoomEvent| lock(&got).push(e.room_id()))
        };
        let bp = MemoryBackplane::new(sink);
        let (on, off) = (ObjectId::new(), ObjectId::new());
        bp.subscribe(on).await.unwrap();
        bp.publish(&[
            crate::backplane::group_by_room(&[message(on)]).remove(0),
            crate::backplane::group_by_room(&[message(off)]).remove(0),
        ])
        .await
        .unwrap();
        assert_eq!(*lock(&got), vec![on]);
    }

    /// The embedded mode's ingest keeps the same bounds as Redis's: `INGEST_MAX_BACKLOG`
    /// queued messages, and clientMsgId records for `IDEMPOTENCY_TTL_SECS`, at most
    /// `max_idempotency_keys` of them (the oldest forgotten first).
    #[tokio::test]
    async fn the_in_process_ingest_keeps_its_bounds() {
        let bp = MemoryBackplane::with_limits(
            Arc::new(|_| {}),
            MemoryLimits {
                max_backlog: 2,
                idempotency_ttl: Duration::from_millis(200),
                max_idempotency_keys: 2,
            },
        );
        let room = ObjectId::new();
        bp.seed_seq(room, 0).await.unwrap();
        bp.append(&message(room), Some("k1")).await.unwrap();
        bp.append(&message(room), Some("k2")).await.unwrap();
        assert!(matches!(
            bp.append(&message(room), Some("k3")).await,
            Err(BackplaneError::BacklogFull { entries: 2, .. })
        ));
        // Stored: room again.
        let lease = bp
            .acquire(0, Duration::from_secs(1))
            .await
            .unwrap()
            .unwrap();
        let mut position = ReadPosition::start();
        let read = bp
            .read(&lease, &mut position, 10, Duration::ZERO)
            .await
            .unwrap();
        let ids: Vec<String> = read.iter().map(|e| e.id.clone()).collect();
        bp.complete(&lease, &[], &ids).await.unwrap();
        // A third key: the oldest (k1) is forgotten, the others kept.
        assert!(matches!(
            bp.append(&message(room), Some("k3")).await.unwrap(),
            Appended::New { seq: 3 }
        ));
        assert!(matches!(
            bp.append(&message(room), Some("k2")).await.unwrap(),
            Appended::Duplicate { seq: 2, .. }
        ));
        assert!(matches!(
            bp.append(&message(room), Some("k1")).await.unwrap(),
            Appended::New { seq: 4 }
        ));
        // Past the time, a key is forgotten too.
        std::thread::sleep(Duration::from_millis(250));
        let read = bp
            .read(&lease, &mut position, 10, Duration::ZERO)
            .await
            .unwrap();
        let ids: Vec<String> = read.iter().map(|e| e.id.clone()).collect();
        bp.complete(&lease, &[], &ids).await.unwrap();
        assert!(matches!(
            bp.append(&message(room), Some("k3")).await.unwrap(),
            Appended::New { seq: 5 }
        ));
    }
}
