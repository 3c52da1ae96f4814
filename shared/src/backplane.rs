//! The backplane: how gateways and persisters talk to each other.
//!
//! Two paths with different guarantees:
//!
//! * **Ingest** ([`Backplane::append`] → [`Ingest::read`] / [`Ingest::ack`]): at least once.
//!   A message appended successfully stays in the ingest stream until a persister has stored
//!   it and acknowledged it; a persister that dies before acknowledging leaves it pending, and
//!   it is read again. The store makes redelivery harmless (idempotent by message id).
//! * **Room events** ([`Backplane::publish`] → the sink given to the implementation): at most
//!   once, to every gateway subscribed to the room at that moment. Used for the canonical
//!   `message` after it was stored, and for `typing`.

use crate::config::RedisSettings;
use crate::wire::{ChatMessage, RoomEvent};
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use fred::clients::SubscriberClient;
use fred::prelude::*;
use mongodb::bson::oid::ObjectId;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// The backplane could not do what was asked; the caller reports `UNAVAILABLE`.
#[derive(Debug, thiserror::Error)]
#[error("backplane unavailable: {0}")]
pub struct BackplaneError(pub String);

impl From<fred::error::Error> for BackplaneError {
    fn from(e: fred::error::Error) -> Self {
        Self(e.to_string())
    }
}

/// Receives every room event published on a subscribed room. Called on the backplane's
/// own task: it must not block.
pub type RoomEventSink = Arc<dyn Fn(RoomEvent) + Send + Sync>;

/// The gateway's side of the backplane.
#[async_trait]
pub trait Backplane: Send + Sync + 'static {
    /// Appends a message to the ingest stream. At least once: `Ok` means the message is
    /// in Redis and will be stored and published by a persister.
    ///
    /// With an idempotency key (the sender's id and its `clientMsgId`), a key seen in the last
    /// [`IDEMPOTENCY_TTL`] appends nothing and returns the first message's id and time.
    async fn append(
        &self,
        message: &ChatMessage,
        idempotency_key: Option<&str>,
    ) -> Result<Appended, BackplaneError>;

    /// Publishes events to their rooms' subscribers on every gateway. At most once.
    async fn publish(&self, events: &[RoomEvent]) -> Result<(), BackplaneError>;

    /// Starts delivering a room's events to this process's sink.
    async fn subscribe(&self, room: ObjectId) -> Result<(), BackplaneError>;

    /// Stops delivering a room's events to this process.
    async fn unsubscribe(&self, room: ObjectId) -> Result<(), BackplaneError>;

    /// Answers when the backplane is reachable.
    async fn ping(&self) -> Result<(), BackplaneError>;

    /// The count of a fixed-window counter and the time until its window ends.
    async fn counter(&self, key: &str) -> Result<(u64, Duration), BackplaneError>;

    /// Adds one to a fixed-window counter (the window starts with its first count).
    async fn count(&self, key: &str, window: Duration) -> Result<(), BackplaneError>;

    /// Resets a counter.
    async fn reset_counter(&self, key: &str) -> Result<(), BackplaneError>;
}

/// What [`Backplane::append`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Appended {
    /// The message was appended.
    New,
    /// A message with the same idempotency key was appended before; this is its id and time.
    Duplicate {
        id: ObjectId,
        created_at: DateTime<Utc>,
    },
}

/// How long an idempotency key (`clientMsgId`) is remembered.
pub const IDEMPOTENCY_TTL: Duration = Duration::from_secs(24 * 3600);

/// One entry of the ingest stream.
#[derive(Debug, Clone)]
pub struct IngestEntry {
    /// The stream entry id, used to acknowledge it.
    pub id: String,
    /// The message, or why it could not be decoded (such entries are logged and acknowledged:
    /// retrying cannot fix them).
    pub message: Result<ChatMessage, String>,
}

/// The persister's side of the ingest stream.
#[async_trait]
pub trait Ingest: Send + Sync + 'static {
    /// Takes, or keeps, the leadership of the ingest stream for `ttl`; `true` while this
    /// consumer leads. Only the leader reads, so messages are stored and published in stream
    /// order even when several persisters run; the others stand by and take over when the
    /// leader stops renewing (crash) or resigns (shutdown).
    async fn lead(&self, ttl: Duration) -> Result<bool, BackplaneError>;

    /// Gives the leadership up so that a standby takes over at once.
    async fn resign(&self) -> Result<(), BackplaneError>;

    /// Reads up to `max` entries. After taking the leadership: first every entry that was
    /// read but never acknowledged, by any consumer (claimed, in stream order); then new
    /// ones, waiting up to `block` for them.
    async fn read(&self, max: usize, block: Duration) -> Result<Vec<IngestEntry>, BackplaneError>;

    /// Acknowledges (and removes) entries that were stored and published.
    async fn ack(&self, ids: &[String]) -> Result<(), BackplaneError>;

    /// How far behind the persisters are.
    async fn backlog(&self) -> Result<Backlog, BackplaneError>;
}

/// How far behind the persisters are: what `chat_persister_pending_entries` and
/// `chat_persister_stream_lag` report.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Backlog {
    /// Entries read by a persister and not yet acknowledged.
    pub pending: u64,
    /// Entries not yet read by any persister (`None` when the server cannot tell).
    pub lag: Option<u64>,
}

/// The position of an ingest stream entry (`<millis>-<n>`) as one sortable number:
/// milliseconds shifted left by 20 bits, plus `n` (capped at 2^20 - 1).
pub fn stream_seq(entry_id: &str) -> Option<i64> {
    let (ms, n) = entry_id.split_once('-')?;
    let (ms, n): (i64, i64) = (ms.parse().ok()?, n.parse().ok()?);
    Some((ms << 20) | n.min((1 << 20) - 1))
}

/// Redis names, all under one prefix.
#[derive(Debug, Clone)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    pub fn new(prefix: &str) -> Self {
        Self {
            prefix: prefix.to_owned(),
        }
    }

    /// The ingest stream. The braces make it one hash slot in a cluster.
    pub fn ingest_stream(&self) -> String {
        format!("{{{}}}:ingest", self.prefix)
    }

    /// Who leads the ingest stream (same hash slot as the stream).
    pub fn ingest_leader(&self) -> String {
        format!("{{{}}}:ingest:leader", self.prefix)
    }

    /// Remembers a sender's idempotency key (same hash slot as the stream, so that the
    /// check and the append are one atomic script).
    pub fn idempotency(&self, key: &str) -> String {
        format!("{{{}}}:idem:{key}", self.prefix)
    }

    /// A rate-limit counter.
    pub fn counter(&self, key: &str) -> String {
        format!("{}:count:{key}", self.prefix)
    }

    /// The consumer group every persister joins.
    pub fn ingest_group(&self) -> &'static str {
        "persisters"
    }

    /// A room's pub/sub channel; the room id is its hash tag.
    pub fn room_channel(&self, room: &ObjectId) -> String {
        format!("{}:room:{{{}}}", self.prefix, room.to_hex())
    }

    /// The channel every gateway subscribes to, for events about users rather than rooms.
    pub fn control_channel(&self) -> String {
        format!("{}:control", self.prefix)
    }

    /// Where an event is published.
    pub fn channel_of(&self, event: &RoomEvent) -> String {
        match event {
            RoomEvent::MemberRemoved(_) => self.control_channel(),
            _ => self.room_channel(&event.room_id()),
        }
    }

    /// The room id of one of our room channels.
    pub fn room_of_channel(&self, channel: &str) -> Option<ObjectId> {
        let rest = channel
            .strip_prefix(&self.prefix)?
            .strip_prefix(":room:{")?;
        ObjectId::parse_str(rest.strip_suffix('}')?).ok()
    }
}

/// Field of a stream entry that holds the message JSON.
const MESSAGE_FIELD: &str = "m";

/// Redis commands that do not answer within this time fail with `UNAVAILABLE`.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(3);

fn builder(settings: &RedisSettings) -> Result<Builder, BackplaneError> {
    let config = Config::from_url(settings.url())
        .map_err(|e| BackplaneError(format!("REDIS_URL is invalid: {e}")))?;
    let mut builder = Builder::from_config(config);
    builder
        .with_performance_config(|p| {
            p.broadcast_channel_capacity = settings.pubsub_capacity;
            p.default_command_timeout = COMMAND_TIMEOUT;
        })
        .with_connection_config(|c| {
            c.connection_timeout = Duration::from_secs(5);
            // Retry a command once after a reconnect; callers see an error rather than a hang.
            c.max_command_attempts = 2;
        })
        // Reconnect forever: 100 ms doubling up to 2 s between attempts.
        .set_policy(ReconnectPolicy::new_exponential(0, 100, 2_000, 2));
    Ok(builder)
}

/// The Redis backplane: a stream for ingest, one pub/sub channel per room.
pub struct RedisBackplane {
    keys: Keys,
    commands: Client,
    subscriber: Option<SubscriberClient>,
    /// False from the moment the subscriber connection fails until every room channel was
    /// subscribed again on the new connection: room events published meanwhile are lost
    /// for this process, so it reports itself not ready.
    subscriptions_live: Arc<AtomicBool>,
}

impl RedisBackplane {
    /// Connects for publishing and appending only (the persister's use).
    pub async fn connect(settings: &RedisSettings) -> Result<Self, BackplaneError> {
        let commands = builder(settings)?.build()?;
        commands.init().await?;
        Ok(Self {
            keys: Keys::new(&settings.prefix),
            commands,
            subscriber: None,
            subscriptions_live: Arc::new(AtomicBool::new(true)),
        })
    }

    /// Connects and delivers the events of subscribed rooms to `sink` (the gateway's use).
    /// Subscriptions are restored automatically after a reconnect.
    pub async fn connect_with_sink(
        settings: &RedisSettings,
        sink: RoomEventSink,
    ) -> Result<Self, BackplaneError> {
        let mut backplane = Self::connect(settings).await?;
        let subscriber = builder(settings)?.build_subscriber_client()?;
        subscriber.init().await?;
        backplane.watch_subscriptions(&subscriber);
        subscriber
            .subscribe(backplane.keys.control_channel())
            .await?;
        let mut rx = subscriber.message_rx();
        let keys = backplane.keys.clone();
        tokio::spawn(async move {
            use tokio::sync::broadcast::error::RecvError;
            loop {
                match rx.recv().await {
                    Ok(message) => dispatch(&keys, &sink, message),
                    Err(RecvError::Lagged(n)) => {
                        metrics::counter!("chat_gateway_backplane_lagged_total").increment(n);
                        tracing::error!(
                            lost = n,
                            "pub/sub fan-out fell behind and Redis messages were lost; raise REDIS_PUBSUB_CAPACITY"
                        );
                    }
                    Err(RecvError::Closed) => break,
                }
            }
        });
        backplane.subscriber = Some(subscriber);
        Ok(backplane)
    }

    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    /// Restores the subscriptions after every reconnect (as fred's `manage_subscriptions`
    /// does) and keeps `subscriptions_live` true only while they are in place, so that
    /// readiness can tell a gateway that would miss room events.
    fn watch_subscriptions(&self, subscriber: &SubscriberClient) {
        let mut errors = subscriber.error_rx();
        let mut reconnects = subscriber.reconnect_rx();
        let live = self.subscriptions_live.clone();
        let subscriber = subscriber.clone();
        tokio::spawn(async move {
            use tokio::sync::broadcast::error::RecvError;
            loop {
                tokio::select! {
                    error = errors.recv() => match error {
                        Ok((error, _)) => {
                            if live.swap(false, Ordering::SeqCst) {
                                tracing::warn!(%error, "Redis subscriber connection lost; room events are missed until it is back");
                            }
                        }
                        Err(RecvError::Lagged(_)) => live.store(false, Ordering::SeqCst),
                        Err(RecvError::Closed) => break,
                    },
                    reconnect = reconnects.recv() => match reconnect {
                        Ok(_) | Err(RecvError::Lagged(_)) => {
                            live.store(false, Ordering::SeqCst);
                            match subscriber.resubscribe_all().await {
                                Ok(()) => {
                                    live.store(true, Ordering::SeqCst);
                                    tracing::info!(
                                        channels = subscriber.tracked_channels().len(),
                                        "Redis subscriber reconnected and resubscribed"
                                    );
                                }
                                // The connection failed again; the next reconnect retries.
                                Err(error) => tracing::error!(%error, "resubscribing after a Redis reconnect failed"),
                            }
                        }
                        Err(RecvError::Closed) => break,
                    },
                }
            }
        });
    }

    fn subscriber(&self) -> Result<&SubscriberClient, BackplaneError> {
        self.subscriber
            .as_ref()
            .ok_or_else(|| BackplaneError("this backplane was built without a subscriber".into()))
    }
}

fn dispatch(keys: &Keys, sink: &RoomEventSink, message: fred::types::Message) {
    let decode = |message: &fred::types::Message| {
        message
            .value
            .as_bytes()
            .ok_or_else(|| "not a string".to_owned())
            .and_then(|b| serde_json::from_slice::<RoomEvent>(b).map_err(|e| e.to_string()))
    };
    if *message.channel == *keys.control_channel() {
        match decode(&message) {
            Ok(event @ RoomEvent::MemberRemoved(_)) => sink(event),
            Ok(_) => tracing::warn!("room event on the control channel ignored"),
            Err(error) => tracing::warn!(%error, "undecodable control event ignored"),
        }
        return;
    }
    let Some(room) = keys.room_of_channel(&message.channel) else {
        return;
    };
    let decoded = message
        .value
        .as_bytes()
        .ok_or_else(|| "not a string".to_owned())
        .and_then(|b| serde_json::from_slice::<RoomEvent>(b).map_err(|e| e.to_string()));
    match decoded {
        Ok(event) if event.room_id() == room => sink(event),
        Ok(_) => tracing::warn!(%room, "room event on another room's channel ignored"),
        Err(error) => tracing::warn!(%room, %error, "undecodable room event ignored"),
    }
}

#[async_trait]
impl Backplane for RedisBackplane {
    async fn append(
        &self,
        message: &ChatMessage,
        idempotency_key: Option<&str>,
    ) -> Result<Appended, BackplaneError> {
        let json = serde_json::to_string(message).map_err(|e| BackplaneError(e.to_string()))?;
        let Some(key) = idempotency_key else {
            let _id: String = self
                .commands
                .xadd(
                    self.keys.ingest_stream(),
                    false,
                    None,
                    "*",
                    (MESSAGE_FIELD, json),
                )
                .await?;
            return Ok(Appended::New);
        };
        let first = format!(
            "{} {}",
            message.id.to_hex(),
            message.created_at.timestamp_millis()
        );
        let prior: Option<String> = self
            .commands
            .eval(
                APPEND_ONCE_SCRIPT,
                vec![self.keys.ingest_stream(), self.keys.idempotency(key)],
                vec![json, first, IDEMPOTENCY_TTL.as_secs().to_string()],
            )
            .await?;
        let Some(prior) = prior else {
            return Ok(Appended::New);
        };
        let parsed = prior.split_once(' ').and_then(|(id, ms)| {
            Some((
                ObjectId::parse_str(id).ok()?,
                DateTime::from_timestamp_millis(ms.parse().ok()?)?,
            ))
        });
        match parsed {
            Some((id, created_at)) => Ok(Appended::Duplicate { id, created_at }),
            None => Err(BackplaneError(format!(
                "malformed idempotency record {prior:?}"
            ))),
        }
    }

    async fn publish(&self, events: &[RoomEvent]) -> Result<(), BackplaneError> {
        if events.is_empty() {
            return Ok(());
        }
        let pipeline = self.commands.pipeline();
        for event in events {
            let json = serde_json::to_string(event).map_err(|e| BackplaneError(e.to_string()))?;
            let _: () = pipeline.publish(self.keys.channel_of(event), json).await?;
        }
        let _: Vec<Value> = pipeline.all().await?;
        Ok(())
    }

    async fn subscribe(&self, room: ObjectId) -> Result<(), BackplaneError> {
        self.subscriber()?
            .subscribe(self.keys.room_channel(&room))
            .await?;
        metrics::gauge!("chat_gateway_redis_subscriptions").increment(1);
        Ok(())
    }

    async fn unsubscribe(&self, room: ObjectId) -> Result<(), BackplaneError> {
        self.subscriber()?
            .unsubscribe(self.keys.room_channel(&room))
            .await?;
        metrics::gauge!("chat_gateway_redis_subscriptions").decrement(1);
        Ok(())
    }

    async fn ping(&self) -> Result<(), BackplaneError> {
        let _: String = self.commands.ping(None).await?;
        if let Some(subscriber) = &self.subscriber
            && (!subscriber.is_connected() || !self.subscriptions_live.load(Ordering::SeqCst))
        {
            return Err(BackplaneError(
                "the pub/sub connection is down or still resubscribing".into(),
            ));
        }
        Ok(())
    }

    async fn counter(&self, key: &str) -> Result<(u64, Duration), BackplaneError> {
        let key = self.keys.counter(key);
        let pipeline = self.commands.pipeline();
        let _: () = pipeline.get(&key).await?;
        let _: () = pipeline.pttl(&key).await?;
        let (count, ttl): (Option<u64>, i64) = pipeline.all().await?;
        Ok((
            count.unwrap_or(0),
            Duration::from_millis(u64::try_from(ttl).unwrap_or(0)),
        ))
    }

    async fn count(&self, key: &str, window: Duration) -> Result<(), BackplaneError> {
        let _: i64 = self
            .commands
            .eval(
                COUNT_SCRIPT,
                vec![self.keys.counter(key)],
                vec![window.as_millis().to_string()],
            )
            .await?;
        Ok(())
    }

    async fn reset_counter(&self, key: &str) -> Result<(), BackplaneError> {
        let _: i64 = self.commands.del(self.keys.counter(key)).await?;
        Ok(())
    }
}

/// Increments a counter, starting its window on the first count.
const COUNT_SCRIPT: &str = r#"
local n = redis.call('INCR', KEYS[1])
if n == 1 then
  redis.call('PEXPIRE', KEYS[1], ARGV[1])
end
return n
"#;

/// Appends unless the idempotency key was seen: returns the first message's "id millis",
/// or nil after appending.
const APPEND_ONCE_SCRIPT: &str = r#"
local prior = redis.call('GET', KEYS[2])
if prior then
  return prior
end
redis.call('XADD', KEYS[1], '*', 'm', ARGV[1])
redis.call('SET', KEYS[2], ARGV[2], 'EX', ARGV[3])
return false
"#;

/// A persister's consumer on the ingest stream.
pub struct RedisIngest {
    keys: Keys,
    consumer: String,
    /// Blocking reads get their own connection so they never delay acknowledgements.
    reader: Client,
    commands: Client,
    mode: std::sync::Mutex<ReadMode>,
}

/// Where the leader reads next.
#[derive(Debug, Clone, PartialEq, Eq)]
enum ReadMode {
    /// Not leading: nothing to read.
    Standby,
    /// Just took over: claiming pending entries of every consumer, from this cursor on.
    Claim(String),
    /// Reading new entries.
    New,
}

/// Sets the leader key to us if free or ours, with a fresh expiry; 1 when we lead.
const LEAD_SCRIPT: &str = r#"
local holder = redis.call('GET', KEYS[1])
if holder == false or holder == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
"#;

/// Deletes the leader key if it is ours.
const RESIGN_SCRIPT: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"#;

impl RedisIngest {
    /// Joins the ingest consumer group as `consumer` (creating stream and group if needed).
    pub async fn connect(settings: &RedisSettings, consumer: &str) -> Result<Self, BackplaneError> {
        let reader = builder(settings)?.build()?;
        reader.init().await?;
        let commands = builder(settings)?.build()?;
        commands.init().await?;
        let ingest = Self {
            keys: Keys::new(&settings.prefix),
            consumer: consumer.to_owned(),
            reader,
            commands,
            mode: std::sync::Mutex::new(ReadMode::Standby),
        };
        ingest.create_group().await?;
        Ok(ingest)
    }

    /// Creates the stream and the group unless they exist (again, after a Redis restart
    /// without persistence).
    async fn create_group(&self) -> Result<(), BackplaneError> {
        let created: Result<(), _> = self
            .commands
            .xgroup_create(
                self.keys.ingest_stream(),
                self.keys.ingest_group(),
                "0",
                true,
            )
            .await;
        match created {
            Err(e) if !e.details().contains("BUSYGROUP") => Err(e.into()),
            _ => Ok(()),
        }
    }

    pub async fn ping(&self) -> Result<(), BackplaneError> {
        let _: String = self.commands.ping(None).await?;
        Ok(())
    }

    fn mode(&self) -> ReadMode {
        self.mode.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn set_mode(&self, mode: ReadMode) {
        *self.mode.lock().unwrap_or_else(|e| e.into_inner()) = mode;
    }

    async fn read_once(
        &self,
        max: usize,
        block: Duration,
    ) -> Result<Vec<IngestEntry>, fred::error::Error> {
        match self.mode() {
            ReadMode::Standby => Ok(Vec::new()),
            ReadMode::Claim(cursor) => {
                // Every pending entry, whoever read it: the previous leader is gone or resigned.
                let reply: Value = self
                    .commands
                    .xautoclaim(
                        self.keys.ingest_stream(),
                        self.keys.ingest_group(),
                        self.consumer.as_str(),
                        0,
                        cursor.as_str(),
                        Some(max as u64),
                        false,
                    )
                    .await?;
                let (next, entries) = parse_xautoclaim(reply)
                    .map_err(|e| fred::error::Error::new(fred::error::ErrorKind::Parse, e.0))?;
                self.set_mode(if next == "0-0" {
                    ReadMode::New
                } else {
                    ReadMode::Claim(next)
                });
                Ok(entries)
            }
            ReadMode::New => {
                let reply: Value = self
                    .reader
                    .xreadgroup(
                        self.keys.ingest_group(),
                        self.consumer.as_str(),
                        Some(max as u64),
                        Some(block.as_millis() as u64),
                        false,
                        self.keys.ingest_stream(),
                        ">",
                    )
                    .await?;
                parse_xread(reply)
                    .map_err(|e| fred::error::Error::new(fred::error::ErrorKind::Parse, e.0))
            }
        }
    }
}

#[async_trait]
impl Ingest for RedisIngest {
    async fn lead(&self, ttl: Duration) -> Result<bool, BackplaneError> {
        let leading: i64 = self
            .commands
            .eval(
                LEAD_SCRIPT,
                vec![self.keys.ingest_leader()],
                vec![self.consumer.clone(), ttl.as_millis().to_string()],
            )
            .await?;
        let leading = leading == 1;
        let mode = self.mode();
        if leading && mode == ReadMode::Standby {
            tracing::info!(consumer = %self.consumer, "leading the ingest stream");
            self.set_mode(ReadMode::Claim("0-0".into()));
        } else if !leading && mode != ReadMode::Standby {
            tracing::warn!(consumer = %self.consumer, "lost the ingest stream leadership");
            self.set_mode(ReadMode::Standby);
        }
        Ok(leading)
    }

    async fn resign(&self) -> Result<(), BackplaneError> {
        self.set_mode(ReadMode::Standby);
        let _: i64 = self
            .commands
            .eval(
                RESIGN_SCRIPT,
                vec![self.keys.ingest_leader()],
                vec![self.consumer.clone()],
            )
            .await?;
        Ok(())
    }

    async fn read(&self, max: usize, block: Duration) -> Result<Vec<IngestEntry>, BackplaneError> {
        match self.read_once(max, block).await {
            // Redis lost the group (restarted without persistence): recreate it and go on.
            Err(e) if e.details().contains("NOGROUP") => {
                tracing::warn!("ingest consumer group missing, recreating it");
                self.create_group().await?;
                Ok(Vec::new())
            }
            Err(e) => {
                // The read may have reached Redis and moved entries into our pending list with
                // the reply lost on the way back: re-read pending entries before new ones.
                if self.mode() == ReadMode::New {
                    self.set_mode(ReadMode::Claim("0-0".into()));
                }
                Err(e.into())
            }
            Ok(entries) => Ok(entries),
        }
    }

    async fn backlog(&self) -> Result<Backlog, BackplaneError> {
        let reply: Value = self
            .commands
            .xinfo_groups(self.keys.ingest_stream())
            .await?;
        parse_xinfo_groups(reply, self.keys.ingest_group())
    }

    async fn ack(&self, ids: &[String]) -> Result<(), BackplaneError> {
        if ids.is_empty() {
            return Ok(());
        }
        let stream = self.keys.ingest_stream();
        let pipeline = self.commands.pipeline();
        let _: () = pipeline
            .xack(&stream, self.keys.ingest_group(), ids.to_vec())
            .await?;
        // One consumer group reads the stream, so an acknowledged entry is not needed again.
        let _: () = pipeline.xdel(&stream, ids.to_vec()).await?;
        let _: Vec<Value> = pipeline.all().await?;
        Ok(())
    }
}

/// Parses an `XREADGROUP` reply (RESP2, the client's default) on one stream: `nil`
/// (timeout) or `[[stream, [entry, ...]]]`. Parsed here rather than through fred's typed
/// conversion, which refuses the empty entry list Redis sends for "no pending entries".
fn parse_xread(reply: Value) -> Result<Vec<IngestEntry>, BackplaneError> {
    let streams = match reply {
        Value::Null => return Ok(Vec::new()),
        Value::Array(streams) => streams,
        _ => return Err(malformed("XREADGROUP reply is not an array")),
    };
    let mut entries = Vec::new();
    for stream in streams {
        let Value::Array(mut pair) = stream else {
            return Err(malformed("stream is not a pair"));
        };
        if let Some(Value::Array(items)) = pair.pop() {
            entries.extend(parse_entries(items)?);
        }
    }
    Ok(entries)
}

/// Parses an `XAUTOCLAIM` reply: `[next-cursor, [entry, ...], [deleted-id, ...]]`.
fn parse_xautoclaim(reply: Value) -> Result<(String, Vec<IngestEntry>), BackplaneError> {
    let Value::Array(parts) = reply else {
        return Err(malformed("XAUTOCLAIM reply is not an array"));
    };
    let mut parts = parts.into_iter();
    let cursor = parts
        .next()
        .and_then(|v| v.into_string())
        .ok_or_else(|| malformed("XAUTOCLAIM cursor"))?;
    let entries = match parts.next() {
        Some(Value::Array(items)) => parse_entries(items)?,
        _ => Vec::new(),
    };
    Ok((cursor, entries))
}

/// The `pending` and `lag` of one group in an `XINFO GROUPS` reply (a list of field/value
/// lists, or of maps with RESP3). `lag` is nil when Redis cannot tell (after deletions).
fn parse_xinfo_groups(reply: Value, group: &str) -> Result<Backlog, BackplaneError> {
    let Value::Array(groups) = reply else {
        return Err(malformed("XINFO GROUPS reply is not an array"));
    };
    for g in groups {
        let pairs: Vec<(String, Value)> = match g {
            Value::Array(flat) => flat
                .chunks_exact(2)
                .filter_map(|kv| Some((kv[0].clone().into_string()?, kv[1].clone())))
                .collect(),
            Value::Map(map) => map
                .inner()
                .into_iter()
                .filter_map(|(k, v)| Some((k.into_string()?, v)))
                .collect(),
            _ => continue,
        };
        let field = |name: &str| {
            pairs
                .iter()
                .find(|(k, _)| k == name)
                .and_then(|(_, v)| v.as_u64())
        };
        let is_ours = pairs
            .iter()
            .any(|(k, v)| k == "name" && v.as_str().as_deref() == Some(group));
        if is_ours {
            return Ok(Backlog {
                pending: field("pending").unwrap_or(0),
                lag: field("lag"),
            });
        }
    }
    Ok(Backlog::default())
}

fn malformed(what: &str) -> BackplaneError {
    BackplaneError(format!("malformed Redis reply: {what}"))
}

/// Parses stream entries `[id, [field, value, ...]]`. An entry whose fields are gone
/// (deleted while pending) or undecodable is returned with an error message.
fn parse_entries(items: Vec<Value>) -> Result<Vec<IngestEntry>, BackplaneError> {
    let mut entries = Vec::with_capacity(items.len());
    for item in items {
        let Value::Array(mut item) = item else {
            return Err(malformed("entry is not a pair"));
        };
        if item.len() != 2 {
            return Err(malformed("entry is not a pair"));
        }
        let fields = item.pop().unwrap_or(Value::Null);
        let id = item
            .pop()
            .and_then(|v| v.into_string())
            .ok_or_else(|| malformed("entry id is not a string"))?;
        let mut message = Err("entry has no message field".to_owned());
        if let Value::Array(fields) = fields {
            for kv in fields.chunks(2) {
                if let [k, v] = kv
                    && k.as_str().as_deref() == Some(MESSAGE_FIELD)
                {
                    message = v
                        .as_bytes()
                        .ok_or_else(|| "message field is not a string".to_owned())
                        .and_then(|b| serde_json::from_slice(b).map_err(|e| e.to_string()));
                }
            }
        }
        entries.push(IngestEntry { id, message });
    }
    Ok(entries)
}

/// Keeps the implementations honest about the ports.
const _: fn() = || {
    fn backplane<T: Backplane>() {}
    fn ingest<T: Ingest>() {}
    backplane::<RedisBackplane>();
    ingest::<RedisIngest>();
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        let keys = Keys::new("chat");
        let room = ObjectId::parse_str("6560a0000000000000000002").unwrap();
        assert_eq!(keys.ingest_stream(), "{chat}:ingest");
        assert_eq!(
            keys.room_channel(&room),
            "chat:room:{6560a0000000000000000002}"
        );
        assert_eq!(keys.room_of_channel(&keys.room_channel(&room)), Some(room));
        assert_eq!(
            keys.room_of_channel("other:room:{6560a0000000000000000002}"),
            None
        );
    }

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
    fn xinfo_groups_replies() {
        let s = |v: &str| Value::from(v);
        let group = |name: &str, pending: i64, lag: Value| {
            Value::Array(vec![
                s("name"),
                s(name),
                s("consumers"),
                Value::Integer(2),
                s("pending"),
                Value::Integer(pending),
                s("lag"),
                lag,
            ])
        };
        let reply = Value::Array(vec![
            group("others", 9, Value::Integer(9)),
            group("persisters", 3, Value::Integer(42)),
        ]);
        assert_eq!(
            parse_xinfo_groups(reply, "persisters").unwrap(),
            Backlog {
                pending: 3,
                lag: Some(42)
            }
        );
        let unknown = Value::Array(vec![group("persisters", 0, Value::Null)]);
        assert_eq!(
            parse_xinfo_groups(unknown, "persisters").unwrap(),
            Backlog {
                pending: 0,
                lag: None
            }
        );
        assert!(parse_xinfo_groups(Value::Null, "persisters").is_err());
    }

    #[test]
    fn xread_replies() {
        let s = |v: &str| Value::from(v);
        assert!(parse_xread(Value::Null).unwrap().is_empty());
        // What Redis answers when the consumer has no pending entries.
        let empty = Value::Array(vec![Value::Array(vec![
            s("{chat}:ingest"),
            Value::Array(vec![]),
        ])]);
        assert!(parse_xread(empty).unwrap().is_empty());
        let entry =
            |id: &str, json: &str| Value::Array(vec![s(id), Value::Array(vec![s("m"), s(json)])]);
        let reply = Value::Array(vec![Value::Array(vec![
            s("{chat}:ingest"),
            Value::Array(vec![entry("1-0", "not json"), entry("2-0", "{}")]),
        ])]);
        let entries = parse_xread(reply).unwrap();
        let ids: Vec<&str> = entries.iter().map(|e| e.id.as_str()).collect();
        assert_eq!(ids, ["1-0", "2-0"]);
        assert!(entries.iter().all(|e| e.message.is_err()));
        assert!(parse_xread(s("x")).is_err());
    }
}
