//! The in-process backplane for the single-process mode: the ingest queue, room events,
//! counters and idempotency keys live in this process's memory. Same contract as the Redis
//! backplane for one gateway with its persister running in the same process.
//!
//! Durability: a message is acknowledged to its sender once queued; the in-process
//! persister stores it within milliseconds, and a graceful shutdown stores every queued
//! message before the process exits. A crash (SIGKILL) loses what was queued but not yet
//! stored; the distributed mode (Redis stream) does not have that window.

use crate::backplane::{
    Appended, Backlog, Backplane, BackplaneError, IDEMPOTENCY_TTL, Ingest, IngestEntry,
    RoomEventSink,
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
}

/// The in-process backplane; it is also the persister's [`Ingest`].
pub struct MemoryBackplane {
    sink: RoomEventSink,
    queue: Mutex<Queue>,
    appended: Notify,
    rooms: Mutex<HashSet<ObjectId>>,
    counters: Mutex<HashMap<String, (u64, Instant)>>,
    idempotency: Mutex<HashMap<String, FirstAppend>>,
}

/// The message first appended under an idempotency key, and when the key expires.
type FirstAppend = (ObjectId, DateTime<Utc>, Instant);

impl MemoryBackplane {
    /// Room events of subscribed rooms (and every control event) go to `sink`.
    pub fn new(sink: RoomEventSink) -> Self {
        Self {
            sink,
            queue: Mutex::default(),
            appended: Notify::new(),
            rooms: Mutex::default(),
            counters: Mutex::default(),
            idempotency: Mutex::default(),
        }
    }

    /// Messages queued and not yet stored.
    pub fn queued(&self) -> usize {
        lock(&self.queue).entries.len()
    }

    fn push(&self, message: &ChatMessage) {
        let mut q = lock(&self.queue);
        let now = Utc::now().timestamp_millis();
        q.last = if now > q.last.0 {
            (now, 0)
        } else {
            (q.last.0, q.last.1 + 1)
        };
        let id = format!("{}-{}", q.last.0, q.last.1);
        q.entries.push_back((id, message.clone()));
        drop(q);
        self.appended.notify_one();
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
            seen.retain(|_, (_, _, expires)| *expires > now);
            if let Some((id, created_at, _)) = seen.get(key) {
                return Ok(Appended::Duplicate {
                    id: *id,
                    created_at: *created_at,
                });
            }
            seen.insert(
                key.to_owned(),
                (message.id, message.created_at, now + IDEMPOTENCY_TTL),
            );
            // Queued under the same lock, so a concurrent duplicate cannot slip in between.
            self.push(message);
            return Ok(Appended::New);
        }
        self.push(message);
        Ok(Appended::New)
    }

    async fn publish(&self, events: &[RoomEvent]) -> Result<(), BackplaneError> {
        for event in events {
            let wanted = matches!(event, RoomEvent::MemberRemoved(_))
                || lock(&self.rooms).contains(&event.room_id());
            if wanted {
                (self.sink)(event.clone());
            }
        }
        Ok(())
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

    async fn counter(&self, key: &str) -> Result<(u64, Duration), BackplaneError> {
        let counters = lock(&self.counters);
        let now = Instant::now();
        Ok(match counters.get(key) {
            Some((n, ends)) if *ends > now => (*n, *ends - now),
            _ => (0, Duration::ZERO),
        })
    }

    async fn count(&self, key: &str, window: Duration) -> Result<(), BackplaneError> {
        let mut counters = lock(&self.counters);
        let now = Instant::now();
        counters.retain(|_, (_, ends)| *ends > now);
        counters
            .entry(key.to_owned())
            .or_insert((0, now + window))
            .0 += 1;
        Ok(())
    }

    async fn reset_counter(&self, key: &str) -> Result<(), BackplaneError> {
        lock(&self.counters).remove(key);
        Ok(())
    }
}

#[async_trait]
impl Ingest for MemoryBackplane {
    async fn lead(&self, _ttl: Duration) -> Result<bool, BackplaneError> {
        Ok(true)
    }

    async fn resign(&self) -> Result<(), BackplaneError> {
        // A later reader starts again with what was read but not acknowledged.
        lock(&self.queue).delivered = 0;
        Ok(())
    }

    async fn read(&self, max: usize, block: Duration) -> Result<Vec<IngestEntry>, BackplaneError> {
        let deadline = tokio::time::Instant::now() + block;
        loop {
            // Registered before looking, so an append in between is not missed.
            let appended = self.appended.notified();
            {
                let mut q = lock(&self.queue);
                if q.entries.len() > q.delivered {
                    let start = q.delivered;
                    let end = q.entries.len().min(start + max.max(1));
                    q.delivered = end;
                    return Ok(q
                        .entries
                        .range(start..end)
                        .map(|(id, m)| IngestEntry {
                            id: id.clone(),
                            message: Ok(m.clone()),
                        })
                        .collect());
                }
            }
            if tokio::time::timeout_at(deadline, appended).await.is_err() {
                return Ok(Vec::new());
            }
        }
    }

    async fn backlog(&self) -> Result<Backlog, BackplaneError> {
        let q = lock(&self.queue);
        Ok(Backlog {
            pending: q.delivered as u64,
            lag: Some((q.entries.len() - q.delivered) as u64),
        })
    }

    async fn ack(&self, ids: &[String]) -> Result<(), BackplaneError> {
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
        }
    }

    #[tokio::test]
    async fn ingest_is_ordered_redelivers_unacked_and_dedupes_keys() {
        let bp = MemoryBackplane::new(Arc::new(|_| {}));
        let room = ObjectId::new();
        let (a, b) = (message(room), message(room));
        assert_eq!(bp.append(&a, Some("k")).await.unwrap(), Appended::New);
        assert!(matches!(
            bp.append(&b, Some("k")).await.unwrap(),
            Appended::Duplicate { id, .. } if id == a.id
        ));
        bp.append(&b, None).await.unwrap();
        let first = bp.read(1, Duration::ZERO).await.unwrap();
        let second = bp.read(10, Duration::ZERO).await.unwrap();
        assert_eq!(first[0].message.as_ref().unwrap().id, a.id);
        assert_eq!(second[0].message.as_ref().unwrap().id, b.id);
        let (s1, s2) = (
            crate::backplane::stream_seq(&first[0].id).unwrap(),
            crate::backplane::stream_seq(&second[0].id).unwrap(),
        );
        assert!(s1 < s2);
        bp.ack(&[first[0].id.clone()]).await.unwrap();
        // A new reader (after resign) gets the unacknowledged entry again.
        bp.resign().await.unwrap();
        let again = bp.read(10, Duration::ZERO).await.unwrap();
        assert_eq!(again.len(), 1);
        assert_eq!(again[0].id, second[0].id);
        bp.ack(&[again[0].id.clone()]).await.unwrap();
        assert_eq!(bp.queued(), 0);
        // A read waits for an append.
        let bp = Arc::new(bp);
        let reader = {
            let bp = bp.clone();
            tokio::spawn(async move { bp.read(10, Duration::from_secs(10)).await })
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
            RoomEvent::Message(message(on)),
            RoomEvent::Message(message(off)),
        ])
        .await
        .unwrap();
        assert_eq!(*lock(&got), vec![on]);
        bp.count("c", Duration::from_secs(60)).await.unwrap();
        bp.count("c", Duration::from_secs(60)).await.unwrap();
        assert_eq!(bp.counter("c").await.unwrap().0, 2);
        bp.reset_counter("c").await.unwrap();
        assert_eq!(bp.counter("c").await.unwrap().0, 0);
    }
}
