//! The backplane: how gateways and persisters talk to each other.
//!
//! Two paths with different guarantees:
//!
//! * **Ingest** ([`Backplane::append`] → [`Ingest::read`] / [`Ingest::complete`]): at least
//!   once. The ingest is split into [`IngestSettings::partitions`] partitions; a room always
//!   maps to the same one ([`Keys::partition_of`]), so the messages of one room keep one
//!   order. A message appended successfully stays in its partition until the persister that
//!   holds the partition's lease has stored, published and acknowledged it; a persister that
//!   dies before acknowledging leaves it pending, and the next holder reads it again. The store
//!   makes redelivery harmless (idempotent by message id).
//! * **Room events** ([`Backplane::publish`] → the sink given to the implementation): at most
//!   once, to every gateway subscribed to the room at that moment. Used for the canonical
//!   `message` after it was stored, and for `typing`.
//!
//! Layout: the ports and their types here; [`keys`] names everything in Redis;
//! [`redis_ingest`] and [`redis_pubsub`] are the Redis implementations (the Lua they run is in
//! `scripts/`), [`memory`] the in-process one of the embedded mode.

pub mod keys;
pub mod memory;
pub mod presence;
pub mod redis_ingest;
pub mod redis_pubsub;
mod redis_util;

pub use keys::Keys;
pub use memory::{MAX_IDEMPOTENCY_KEYS, MemoryBackplane, MemoryLimits};
pub use presence::{Beat, MemoryPresence, Presence, RedisPresence};
pub use redis_ingest::RedisIngest;
pub use redis_pubsub::RedisBackplane;
pub use redis_util::{check_url, connect_client, durability_warnings};

pub(crate) use redis_util::{count_script, uncount_script};

use crate::wire::{ChatMessage, RoomEvent};
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use mongodb::bson::oid::ObjectId;
use std::sync::Arc;
use std::time::Duration;

/// Why a backplane operation failed. Every kind is `UNAVAILABLE` to a client; the persister
/// tells [`BackplaneError::Fenced`] apart (it stops working on that partition).
#[derive(Debug, thiserror::Error)]
pub enum BackplaneError {
    /// Redis failed or did not answer. The message says it all: not also a `source`, or an
    /// error chain printed on one line would repeat it.
    #[error("redis: {0}")]
    Redis(fred::error::Error),
    /// The partition's backlog is at `INGEST_MAX_BACKLOG`: nothing was appended.
    #[error(
        "ingest partition {partition} holds {entries} entries, the most allowed (INGEST_MAX_BACKLOG)"
    )]
    BacklogFull { partition: u16, entries: u64 },
    /// The message was appended, but fewer replicas than `INGEST_MIN_REPLICAS` confirmed it
    /// in time: it may be lost if the master fails now.
    #[error("only {confirmed} of {wanted} replicas confirmed the append in time")]
    NotReplicated { confirmed: i64, wanted: i64 },
    /// Redis holds no sequence counter for the message's room (it never did, or lost it):
    /// seed it from the store ([`Backplane::seed_seq`]) and append again.
    #[error("no sequence counter for room {0} in Redis")]
    SeqUnknown(ObjectId),
    /// This persister no longer holds the partition's lease: another may own it now.
    #[error("the lease of ingest partition {0} is held by another persister")]
    Fenced(u16),
    /// Redis answered something this code does not understand.
    #[error("malformed Redis reply: {0}")]
    Malformed(String),
    /// The pub/sub connection is down, or its subscriptions are being restored: room events
    /// published now would be missed.
    #[error("the pub/sub connection is down or still resubscribing")]
    SubscriptionsDown,
    /// A setting does not fit the deployment (the message says which and why).
    #[error("{0}")]
    Config(String),
}

impl From<fred::error::Error> for BackplaneError {
    fn from(e: fred::error::Error) -> Self {
        BackplaneError::Redis(e)
    }
}

/// Receives every room event published on a subscribed room. Called on the backplane's
/// own task: it must not block.
pub type RoomEventSink = Arc<dyn Fn(RoomEvent) + Send + Sync>;

/// Called when room events may have been lost for this process: after the pub/sub
/// connection came back and every channel was subscribed again, and after the process fell
/// behind its pub/sub buffer. The gateway then checks its rooms against the store.
/// Called on the backplane's own task: it must not block.
pub type MissedSink = Arc<dyn Fn() + Send + Sync>;

/// The gateway's side of the backplane.
#[async_trait]
pub trait Backplane: Send + Sync + 'static {
    /// Appends a message to its room's ingest partition. At least once: `Ok` means the
    /// message is in Redis (and, with `INGEST_MIN_REPLICAS`, on that many replicas) and will
    /// be stored and published by a persister.
    ///
    /// Once per message id: a second run of the same append within [`APPENDED_TTL`] (the
    /// Redis client sends a command again when its connection dropped with the reply in
    /// flight) appends nothing and answers with the number the first run gave. With an
    /// idempotency key (sender, room and `clientMsgId`), a key seen in the last
    /// `IDEMPOTENCY_TTL_SECS` appends nothing and returns the first message's id and time.
    async fn append(
        &self,
        message: &ChatMessage,
        idempotency_key: Option<&str>,
    ) -> Result<Appended, BackplaneError>;

    /// Sets a room's sequence counter to `latest` (the highest number stored) unless one is
    /// set already. Called after [`BackplaneError::SeqUnknown`].
    async fn seed_seq(&self, room: ObjectId, latest: u64) -> Result<(), BackplaneError>;

    /// Publishes events to their rooms' subscribers on every gateway. At most once.
    async fn publish(&self, events: &[RoomEvent]) -> Result<(), BackplaneError>;

    /// Counts a removal from `room`'s participants (after the store has it). Every later
    /// batch of the room carries the count, so gateways notice the removal even when its
    /// notice on the control channel is lost.
    async fn members_changed(&self, room: ObjectId) -> Result<(), BackplaneError>;

    /// How many removals [`Backplane::members_changed`] has counted for `room`: a list of its
    /// participants read when the count was lower may name someone removed since.
    async fn members_version(&self, room: ObjectId) -> Result<u64, BackplaneError>;

    /// Starts delivering a room's events to this process's sink.
    async fn subscribe(&self, room: ObjectId) -> Result<(), BackplaneError>;

    /// Stops delivering a room's events to this process.
    async fn unsubscribe(&self, room: ObjectId) -> Result<(), BackplaneError>;

    /// Answers when the backplane is reachable and every subscription is in place.
    async fn ping(&self) -> Result<(), BackplaneError>;
}

/// What [`Backplane::append`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Appended {
    /// The message was appended with this sequence number in its room (now, or by an
    /// earlier run of the same append whose answer was lost).
    New { seq: u64 },
    /// A message with the same idempotency key was appended before; this is its id, time and
    /// sequence number, and whether its content was the same as this one's.
    Duplicate {
        id: ObjectId,
        created_at: DateTime<Utc>,
        seq: u64,
        same_content: bool,
    },
}

/// How long a message's own id is remembered after its append, so that a second run of the
/// same append (the Redis client sends a command again after a reconnect, within its command
/// timeout of a few seconds) is recognised and takes no second number.
pub const APPENDED_TTL: Duration = Duration::from_secs(120);

/// How long a renumbering is remembered, so that a second run of it moves nothing again.
pub const RENUMBERED_TTL: Duration = Duration::from_secs(600);

/// How long an idempotency key (`clientMsgId`) is remembered by default.
pub const IDEMPOTENCY_TTL: Duration = Duration::from_secs(24 * 3600);

/// One entry of an ingest partition.
#[derive(Debug, Clone)]
pub struct IngestEntry {
    /// The stream entry id, used to acknowledge it.
    pub id: String,
    /// The message, or why it could not be decoded (such entries are logged and acknowledged:
    /// retrying cannot fix them).
    pub message: Result<ChatMessage, String>,
}

/// A persister's hold on one ingest partition, valid while the lease key in Redis still
/// names this holder. The fencing token grows with every acquisition of the partition, so
/// a holder that was paused and lost the lease can never pass for the current one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub partition: u16,
    pub token: u64,
    /// What the lease key holds while this lease is valid: `<instance> <token>`.
    pub holder: String,
}

/// Where a partition's holder reads next: after the last entry it received. A read first
/// hands out again whatever was handed out after that entry and never received (a reply
/// lost with its connection, or an earlier holder's), then new entries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadPosition {
    last: String,
}

impl ReadPosition {
    /// Where a new lease starts: with whatever earlier holders left unacknowledged.
    pub fn start() -> Self {
        Self { last: "0".into() }
    }

    /// The id of the last entry received (`0` before the first).
    pub fn last(&self) -> &str {
        &self.last
    }

    /// Records the last entry of a read.
    pub fn received(&mut self, entries: &[IngestEntry]) {
        if let Some(last) = entries.last() {
            self.last.clone_from(&last.id);
        }
    }
}

/// What [`Ingest::renumber`] did: the room's entries from the first one to move up to
/// `upto` (an entry id) were appended again with new numbers; any of them read before is
/// gone (acknowledged and deleted) and must not be stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Renumbered {
    pub upto: String,
    pub moved: u64,
}

/// Messages of one room stored together: published as one [`RoomEvent::Messages`].
pub fn group_by_room(messages: &[ChatMessage]) -> Vec<RoomEvent> {
    let mut order: Vec<ObjectId> = Vec::new();
    let mut groups: std::collections::HashMap<ObjectId, Vec<ChatMessage>> =
        std::collections::HashMap::new();
    for m in messages {
        groups
            .entry(m.room_id)
            .or_insert_with(|| {
                order.push(m.room_id);
                Vec::new()
            })
            .push(m.clone());
    }
    order
        .into_iter()
        .filter_map(|room| {
            let messages = groups.remove(&room)?;
            Some(RoomEvent::Messages(crate::wire::MessageBatch {
                room_id: room,
                messages,
                members_version: None,
            }))
        })
        .collect()
}

/// The persister's side of the ingest: partition leases, reads, and the fenced
/// publish-and-acknowledge of a stored batch.
#[async_trait]
pub trait Ingest: Send + Sync + 'static {
    /// How many partitions there are.
    fn partitions(&self) -> u16;

    /// This process's id among the persisters (unique per process).
    fn instance(&self) -> &str;

    /// Says this persister is alive for `ttl`; returns every live persister, sorted, so
    /// that each can work out its fair share of the partitions.
    async fn heartbeat(&self, ttl: Duration) -> Result<Vec<String>, BackplaneError>;

    /// Says this persister is gone (at shutdown), so the others take its share at once.
    async fn leave(&self) -> Result<(), BackplaneError>;

    /// The instance holding each partition's lease (`None` while free), by partition.
    async fn owners(&self) -> Result<Vec<Option<String>>, BackplaneError>;

    /// Takes the lease of a free partition for `ttl`; `None` when another holds it.
    async fn acquire(&self, partition: u16, ttl: Duration)
    -> Result<Option<Lease>, BackplaneError>;

    /// Extends a lease; `false` when it was lost (expired, or taken by another).
    async fn renew(&self, lease: &Lease, ttl: Duration) -> Result<bool, BackplaneError>;

    /// Gives a lease up so that another persister can take it at once.
    async fn release(&self, lease: &Lease) -> Result<(), BackplaneError>;

    /// Reads up to `max` entries at `position` (and moves it on), waiting up to `block` for
    /// new ones. Safe to run twice: a read whose answer was lost is answered again by the
    /// next. [`BackplaneError::Fenced`] when the lease is no longer ours.
    async fn read(
        &self,
        lease: &Lease,
        position: &mut ReadPosition,
        max: usize,
        block: Duration,
    ) -> Result<Vec<IngestEntry>, BackplaneError>;

    /// Publishes stored messages to their rooms (one event per room) and acknowledges the
    /// entries `ids`, atomically and only while `lease` holds: a persister that lost the
    /// partition can never publish or acknowledge for it ([`BackplaneError::Fenced`]).
    async fn complete(
        &self,
        lease: &Lease,
        events: &[RoomEvent],
        ids: &[String],
    ) -> Result<(), BackplaneError>;

    /// Numbers `room`'s entries again from the entry `from` on, because their numbers are
    /// held by other messages in the store already (Redis's counter fell behind the store:
    /// a failover to a replica that missed the last writes, or an append-only file that lost
    /// its last second). Sets the room's counter to `store_latest`, then appends each of
    /// the room's entries from `from` to the end of the stream again, in order, with the
    /// next number, and deletes the original. Safe to run twice. Only while `lease` holds
    /// ([`BackplaneError::Fenced`]).
    async fn renumber(
        &self,
        lease: &Lease,
        room: ObjectId,
        from: &str,
        store_latest: u64,
    ) -> Result<Renumbered, BackplaneError>;

    /// Entries of a partition not yet acknowledged.
    async fn backlog(&self, partition: u16) -> Result<u64, BackplaneError>;
}

/// The ingest settings every gateway and persister of one deployment must share.
#[derive(clap::Args, Debug, Clone)]
pub struct IngestSettings {
    /// Ingest partitions (streams, each in its own hash slot). A room always maps to the
    /// same partition; persisters share the partitions out. Fixed for the life of a Redis:
    /// the first process records it, and a process started with another count refuses to
    /// start.
    #[arg(long = "ingest-partitions", env = "INGEST_PARTITIONS", default_value_t = 16, value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub partitions: u16,
    /// Most unacknowledged entries in one partition. Past it, sends to rooms of that
    /// partition fail with `UNAVAILABLE` instead of filling Redis's memory.
    #[arg(
        long = "ingest-max-backlog",
        env = "INGEST_MAX_BACKLOG",
        default_value_t = 100_000
    )]
    pub max_backlog: u64,
    /// Replicas that must confirm an append (Redis `WAIT`) before the sender gets its ack,
    /// and hold an entry before a persister stores it; with 1 or more, a master failover
    /// loses no acknowledged message. Set it alike on gateways and persisters.
    #[arg(
        long = "ingest-min-replicas",
        env = "INGEST_MIN_REPLICAS",
        default_value_t = 0
    )]
    pub min_replicas: u32,
    /// How long an append, or a persister's read, waits for INGEST_MIN_REPLICAS, in
    /// milliseconds. Past it the sender gets `UNAVAILABLE` (the message may still be
    /// delivered: retry with the same `clientMsgId`); the persister reads again.
    #[arg(
        long = "ingest-replica-timeout-ms",
        env = "INGEST_REPLICA_TIMEOUT_MS",
        default_value_t = 1000
    )]
    pub replica_timeout_ms: u64,
    /// How long a `clientMsgId` is remembered, in seconds: a retry within this time gets the
    /// first message back. Each remembered id costs about 260 bytes of Redis memory
    /// (measured, docs/REDIS.md): size it from the send rate.
    #[arg(long = "idempotency-ttl-secs", env = "IDEMPOTENCY_TTL_SECS", default_value_t = 86_400, value_parser = clap::value_parser!(u64).range(1..))]
    pub idempotency_ttl_secs: u64,
}

impl Default for IngestSettings {
    fn default() -> Self {
        Self {
            partitions: 16,
            max_backlog: 100_000,
            min_replicas: 0,
            replica_timeout_ms: 1000,
            idempotency_ttl_secs: IDEMPOTENCY_TTL.as_secs(),
        }
    }
}

/// The position of an ingest stream entry (`<millis>-<n>`) as one sortable number:
/// milliseconds shifted left by 20 bits, plus `n` (capped at 2^20 - 1).
pub fn stream_seq(entry_id: &str) -> Option<i64> {
    let (ms, n) = entry_id.split_once('-')?;
    let (ms, n): (i64, i64) = (ms.parse().ok()?, n.parse().ok()?);
    Some((ms << 20) | n.min((1 << 20) - 1))
}

/// Keeps the implementations honest about the ports.
const _: fn() = || {
    fn backplane<T: Backplane>() {}
    fn ingest<T: Ingest>() {}
    backplane::<RedisBackplane>();
    backplane::<MemoryBackplane>();
    ingest::<RedisIngest>();
    ingest::<MemoryBackplane>();
};

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::Sender;

    #[test]
    fn stream_positions_sort_like_entry_ids() {
        let ids = [
            "1700000000000-0",
            "1700000000000-1",
            "1700000000000-999999",
            "1700000000001-0",
        ];
        let seqs: Vec<i64> = ids.iter().map(|id| stream_seq(id).unwrap()).collect();
        assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
        assert_eq!(stream_seq("garbage"), None);
    }

    #[test]
    fn a_read_position_is_the_last_entry_received() {
        let mut p = ReadPosition::start();
        assert_eq!(p.last(), "0");
        let entry = |id: &str| IngestEntry {
            id: id.into(),
            message: Err(String::new()),
        };
        p.received(&[entry("1-0"), entry("2-3")]);
        assert_eq!(p.last(), "2-3");
        p.received(&[]);
        assert_eq!(p.last(), "2-3", "an empty read keeps it");
    }

    #[test]
    fn a_batch_is_published_as_one_event_per_room_in_order() {
        let (a, b) = (ObjectId::new(), ObjectId::new());
        let m = |room: ObjectId, content: &str| ChatMessage {
            id: ObjectId::new(),
            room_id: room,
            sender: Sender {
                id: ObjectId::new(),
                email: None,
                display_name: None,
            },
            content: content.into(),
            created_at: crate::wire::now_millis(),
            seq: None,
            server_event: None,
        };
        let batch = [m(a, "1"), m(b, "2"), m(a, "3")];
        let events = group_by_room(&batch);
        assert_eq!(events.len(), 2);
        let RoomEvent::Messages(first) = &events[0] else {
            panic!("{events:?}")
        };
        assert_eq!(first.room_id, a);
        let contents: Vec<&str> = first.messages.iter().map(|m| m.content.as_str()).collect();
        assert_eq!(contents, ["1", "3"]);
    }
}
