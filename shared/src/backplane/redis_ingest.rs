//! The ingest on Redis: one stream per partition, each in its own hash slot.
//!
//! * Gateways append with `append.lua` (idempotency check, backlog bound and `XADD` in one
//!   step), then wait for `INGEST_MIN_REPLICAS` replicas if asked to.
//! * Persisters hold partitions by lease (`acquire.lua`, `renew.lua`, `release.lua`), each
//!   acquisition with a fresh fencing token. Reading (`read.lua`) and publishing with
//!   acknowledging (`complete.lua`) check the lease in the same script, so a persister that
//!   lost a partition (paused, cut off, or too slow to renew) can neither take entries nor
//!   publish or acknowledge them.

use super::redis_util::{
    COMMAND_TIMEOUT, SCRIPTS, connect_checked, connect_client, wait_for_replicas,
};
use super::{
    APPENDED_TTL, Appended, BackplaneError, Ingest, IngestEntry, IngestSettings, Keys, Lease,
    RENUMBERED_TTL, ReadPosition, Renumbered,
};
use crate::config::RedisSettings;
use crate::wire::{ChatMessage, MessageBatch, RoomEvent};
use async_trait::async_trait;
use chrono::DateTime;
use fred::prelude::*;
use mongodb::bson::oid::ObjectId;
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

/// Field of a stream entry that holds the message JSON.
const MESSAGE_FIELD: &str = "m";
/// Field of a stream entry that holds the message's sequence number in its room.
const SEQ_FIELD: &str = "s";

/// The gateway's side of the ingest.
pub struct IngestWriter {
    keys: Keys,
    /// Appends have their own connection: `WAIT` blocks the connection it runs on, and must
    /// run on the one the append went over.
    client: Client,
    max_backlog: u64,
    min_replicas: u32,
    replica_timeout: Duration,
    idempotency_ttl: Duration,
}

impl IngestWriter {
    pub(super) async fn connect(
        settings: &RedisSettings,
        ingest: &IngestSettings,
        keys: Keys,
    ) -> Result<Self, BackplaneError> {
        let client = connect_client(settings).await?;
        Ok(Self {
            keys,
            client,
            max_backlog: ingest.max_backlog.max(1),
            min_replicas: ingest.min_replicas,
            replica_timeout: Duration::from_millis(ingest.replica_timeout_ms)
                .min(COMMAND_TIMEOUT / 2),
            idempotency_ttl: Duration::from_secs(ingest.idempotency_ttl_secs.max(1)),
        })
    }

    pub(super) async fn seed_seq(&self, room: ObjectId, latest: u64) -> Result<(), BackplaneError> {
        let _: i64 = SCRIPTS
            .seed
            .evalsha_with_reload(
                &self.client,
                vec![self.keys.ingest_seq(self.keys.partition_of(&room))],
                vec![room.to_hex(), latest.to_string()],
            )
            .await?;
        Ok(())
    }

    pub(super) async fn append(
        &self,
        message: &ChatMessage,
        idempotency_key: Option<&str>,
    ) -> Result<Appended, BackplaneError> {
        let partition = self.keys.partition_of(&message.room_id);
        let stream = self.keys.ingest_stream(partition);
        let json =
            serde_json::to_string(message).map_err(|e| BackplaneError::Malformed(e.to_string()))?;
        let mut keys = vec![
            stream.clone(),
            self.keys.ingest_seq(partition),
            self.keys.appended(&message.room_id, &message.id),
        ];
        keys.extend(idempotency_key.map(|k| self.keys.idempotency(&message.room_id, k)));
        let first = format!(
            "{} {}",
            message.id.to_hex(),
            message.created_at.timestamp_millis()
        );
        let hash = message.fingerprint();
        let reply: (i64, Value) = SCRIPTS
            .append
            .evalsha_with_reload(
                &self.client,
                keys,
                vec![
                    json,
                    self.max_backlog.to_string(),
                    first,
                    self.idempotency_ttl.as_secs().to_string(),
                    message.room_id.to_hex(),
                    APPENDED_TTL.as_secs().to_string(),
                    hash.clone(),
                ],
            )
            .await?;
        let number = |seq: Value| {
            seq.as_u64()
                .ok_or_else(|| BackplaneError::Malformed(format!("append seq {seq:?}")))
        };
        let appended = match reply {
            (0, seq) => Appended::New { seq: number(seq)? },
            (4, seq) => {
                // This very message was appended by an earlier run whose answer was lost.
                metrics::counter!("chat_gateway_append_repeats_total").increment(1);
                Appended::New { seq: number(seq)? }
            }
            (3, _) => return Err(BackplaneError::SeqUnknown(message.room_id)),
            (1, prior) => parse_first(prior.as_str().as_deref().unwrap_or_default(), &hash)?,
            (2, entries) => {
                metrics::counter!("chat_gateway_ingest_full_total").increment(1);
                return Err(BackplaneError::BacklogFull {
                    partition,
                    entries: entries.as_u64().unwrap_or_default(),
                });
            }
            other => return Err(BackplaneError::Malformed(format!("append: {other:?}"))),
        };
        // A duplicate's first append may not have been confirmed either (its sender got
        // UNAVAILABLE and retried): the retry waits for the replicas the same way.
        if self.min_replicas > 0 {
            wait_for_replicas(
                &self.client,
                &stream,
                self.min_replicas,
                self.replica_timeout,
            )
            .await?;
        }
        Ok(appended)
    }
}

/// Parses an idempotency record, `<message id> <millis> <seq> [<content hash>]` (records
/// written before content hashes were kept have none: taken as the same content).
fn parse_first(record: &str, hash: &str) -> Result<Appended, BackplaneError> {
    let mut parts = record.split(' ');
    let parsed = (|| {
        Some(Appended::Duplicate {
            id: ObjectId::parse_str(parts.next()?).ok()?,
            created_at: DateTime::from_timestamp_millis(parts.next()?.parse().ok()?)?,
            seq: parts.next()?.parse().ok()?,
            same_content: parts.next().is_none_or(|first| first == hash),
        })
    })();
    parsed.ok_or_else(|| BackplaneError::Malformed(format!("idempotency record {record:?}")))
}

/// A persister's view of the ingest partitions.
pub struct RedisIngest {
    settings: RedisSettings,
    keys: Keys,
    instance: String,
    commands: Client,
    /// One connection per partition held, for its reads: `XREAD BLOCK` and `WAIT` hold the
    /// connection they run on, so partitions must not share one, nor share the heartbeats'.
    readers: Mutex<HashMap<u16, Client>>,
    /// Replicas that must hold the entries a read returns before they are stored.
    min_replicas: u32,
    replica_timeout: Duration,
}

impl RedisIngest {
    /// Connects as a new persister instance: `name` plus a random suffix, so that two
    /// processes never share an identity, whatever name they were given.
    pub async fn connect(
        settings: &RedisSettings,
        ingest: &IngestSettings,
        name: &str,
    ) -> Result<Self, BackplaneError> {
        let keys = Keys::new(&settings.prefix, ingest.partitions);
        let commands = connect_checked(settings, &keys).await?;
        Ok(Self {
            settings: settings.clone(),
            keys,
            instance: format!("{name}/{}", ObjectId::new().to_hex()),
            commands,
            readers: Mutex::default(),
            min_replicas: ingest.min_replicas,
            replica_timeout: Duration::from_millis(ingest.replica_timeout_ms)
                .min(COMMAND_TIMEOUT / 2),
        })
    }

    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    pub async fn ping(&self) -> Result<(), BackplaneError> {
        let _: String = self.commands.ping(None).await?;
        Ok(())
    }

    /// The blocking-read connection of a partition, made on first use.
    async fn reader(&self, partition: u16) -> Result<Client, BackplaneError> {
        if let Some(client) = lock(&self.readers).get(&partition) {
            return Ok(client.clone());
        }
        let client = connect_client(&self.settings).await?;
        lock(&self.readers).insert(partition, client.clone());
        Ok(client)
    }

    /// One run of `read.lua` on `client`: the entries and the group's last delivered id.
    async fn read_script(
        &self,
        client: &Client,
        lease: &Lease,
        from: &str,
        max: usize,
    ) -> Result<(Vec<IngestEntry>, String), BackplaneError> {
        let reply: Value = SCRIPTS
            .read
            .evalsha_with_reload(
                client,
                vec![
                    self.keys.ingest_stream(lease.partition),
                    self.keys.ingest_lease(lease.partition),
                    self.keys.ingest_reads(lease.partition),
                ],
                vec![
                    lease.holder.clone(),
                    self.keys.ingest_group().to_owned(),
                    self.keys.ingest_consumer().to_owned(),
                    max.max(1).to_string(),
                    from.to_owned(),
                ],
            )
            .await?;
        match reply {
            Value::Integer(-1) => Err(BackplaneError::Fenced(lease.partition)),
            Value::Array(mut parts) if parts.len() == 2 => {
                let last = parts
                    .pop()
                    .and_then(|v| v.into_string())
                    .unwrap_or_default();
                let entries = match parts.pop() {
                    Some(Value::Array(items)) => parse_entries(items)?,
                    _ => Vec::new(),
                };
                Ok((entries, last))
            }
            other => Err(BackplaneError::Malformed(format!("read: {other:?}"))),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[async_trait]
impl Ingest for RedisIngest {
    fn partitions(&self) -> u16 {
        self.keys.partitions()
    }

    fn instance(&self) -> &str {
        &self.instance
    }

    async fn heartbeat(&self, ttl: Duration) -> Result<Vec<String>, BackplaneError> {
        let mut live: Vec<String> = SCRIPTS
            .heartbeat
            .evalsha_with_reload(
                &self.commands,
                vec![self.keys.persisters()],
                vec![self.instance.clone(), ttl.as_millis().to_string()],
            )
            .await?;
        // The set orders by expiry, which every heartbeat changes: sort by name so that
        // every persister sees the same order.
        live.sort_unstable();
        Ok(live)
    }

    async fn leave(&self) -> Result<(), BackplaneError> {
        let _: i64 = self
            .commands
            .zrem(self.keys.persisters(), self.instance.clone())
            .await?;
        Ok(())
    }

    async fn owners(&self) -> Result<Vec<Option<String>>, BackplaneError> {
        let pipeline = self.commands.pipeline();
        for p in 0..self.keys.partitions() {
            let _: () = pipeline.get(self.keys.ingest_lease(p)).await?;
        }
        let holders: Vec<Option<String>> = pipeline.all().await?;
        Ok(holders
            .into_iter()
            .map(|h| h.map(|h| h.rsplit_once(' ').map_or(h.clone(), |(i, _)| i.to_owned())))
            .collect())
    }

    async fn acquire(
        &self,
        partition: u16,
        ttl: Duration,
    ) -> Result<Option<Lease>, BackplaneError> {
        let token: Option<u64> = SCRIPTS
            .acquire
            .evalsha_with_reload(
                &self.commands,
                vec![
                    self.keys.ingest_lease(partition),
                    self.keys.ingest_fence(partition),
                ],
                vec![self.instance.clone(), ttl.as_millis().to_string()],
            )
            .await?;
        Ok(token.map(|token| Lease {
            partition,
            token,
            holder: format!("{} {token}", self.instance),
        }))
    }

    async fn renew(&self, lease: &Lease, ttl: Duration) -> Result<bool, BackplaneError> {
        let renewed: i64 = SCRIPTS
            .renew
            .evalsha_with_reload(
                &self.commands,
                vec![self.keys.ingest_lease(lease.partition)],
                vec![lease.holder.clone(), ttl.as_millis().to_string()],
            )
            .await?;
        Ok(renewed == 1)
    }

    async fn release(&self, lease: &Lease) -> Result<(), BackplaneError> {
        if let Some(reader) = lock(&self.readers).remove(&lease.partition) {
            tokio::spawn(async move { reader.quit().await });
        }
        let _: i64 = SCRIPTS
            .release
            .evalsha_with_reload(
                &self.commands,
                vec![self.keys.ingest_lease(lease.partition)],
                vec![lease.holder.clone()],
            )
            .await?;
        Ok(())
    }

    async fn read(
        &self,
        lease: &Lease,
        position: &mut ReadPosition,
        max: usize,
        block: Duration,
    ) -> Result<Vec<IngestEntry>, BackplaneError> {
        let reader = self.reader(lease.partition).await?;
        let mut waited = false;
        loop {
            let (entries, last_delivered) = self
                .read_script(&reader, lease, position.last(), max)
                .await?;
            if !entries.is_empty() && self.min_replicas > 0 {
                // Only what the replicas hold is stored: an append a failover then loses
                // (its sender was told UNAVAILABLE, and may send it again) is never stored
                // either. Not received until then: the next read returns the same entries.
                wait_for_replicas(
                    &reader,
                    &self.keys.ingest_stream(lease.partition),
                    self.min_replicas,
                    self.replica_timeout,
                )
                .await?;
            }
            if !entries.is_empty() || waited || block.is_zero() {
                position.received(&entries);
                return Ok(entries);
            }
            // Wait (without taking anything) for an entry after the last one the group
            // handed out, then read it with the lease checked.
            waited = true;
            let _: Value = reader
                .xread(
                    Some(1),
                    Some(block.as_millis().max(1) as u64),
                    self.keys.ingest_stream(lease.partition),
                    last_delivered,
                )
                .await?;
        }
    }

    async fn complete(
        &self,
        lease: &Lease,
        events: &[RoomEvent],
        ids: &[String],
    ) -> Result<(), BackplaneError> {
        let mut keys = vec![
            self.keys.ingest_stream(lease.partition),
            self.keys.ingest_lease(lease.partition),
            self.keys.ingest_members(lease.partition),
        ];
        let mut args = vec![
            lease.holder.clone(),
            self.keys.ingest_group().to_owned(),
            events.len().to_string(),
        ];
        for event in events {
            keys.push(self.keys.channel_of(event));
            // The script puts the room's current count of removals in place of the 0.
            let event = match event {
                RoomEvent::Messages(batch) => RoomEvent::Messages(MessageBatch {
                    members_version: Some(0),
                    ..batch.clone()
                }),
                other => other.clone(),
            };
            args.push(
                serde_json::to_string(&event)
                    .map_err(|e| BackplaneError::Malformed(e.to_string()))?,
            );
        }
        args.extend(events.iter().map(|e| e.room_id().to_hex()));
        args.extend(ids.iter().cloned());
        let acked: i64 = SCRIPTS
            .complete
            .evalsha_with_reload(&self.commands, keys, args)
            .await?;
        if acked < 0 {
            return Err(BackplaneError::Fenced(lease.partition));
        }
        Ok(())
    }

    async fn renumber(
        &self,
        lease: &Lease,
        room: ObjectId,
        from: &str,
        store_latest: u64,
    ) -> Result<Renumbered, BackplaneError> {
        let reply: Value = SCRIPTS
            .renumber
            .evalsha_with_reload(
                &self.commands,
                vec![
                    self.keys.ingest_stream(lease.partition),
                    self.keys.ingest_lease(lease.partition),
                    self.keys.ingest_seq(lease.partition),
                    self.keys.renumbered(&room, from),
                ],
                vec![
                    lease.holder.clone(),
                    self.keys.ingest_group().to_owned(),
                    room.to_hex(),
                    from.to_owned(),
                    store_latest.to_string(),
                    RENUMBERED_TTL.as_secs().to_string(),
                    self.keys.appended_prefix(lease.partition),
                ],
            )
            .await?;
        if reply.as_i64() == Some(-1) {
            return Err(BackplaneError::Fenced(lease.partition));
        }
        let text = reply.as_string().unwrap_or_default();
        let parsed = text
            .split_once(' ')
            .and_then(|(upto, moved)| Some((upto.to_owned(), moved.parse().ok()?)));
        let Some((upto, moved)) = parsed else {
            return Err(BackplaneError::Malformed(format!("renumber: {text:?}")));
        };
        Ok(Renumbered { upto, moved })
    }

    async fn backlog(&self, partition: u16) -> Result<u64, BackplaneError> {
        Ok(self
            .commands
            .xlen(self.keys.ingest_stream(partition))
            .await?)
    }
}

/// Parses stream entries `[id, [field, value, ...]]`. An entry whose fields are gone
/// (deleted while pending) or undecodable is returned with an error message.
fn parse_entries(items: Vec<Value>) -> Result<Vec<IngestEntry>, BackplaneError> {
    let malformed = |what: &str| BackplaneError::Malformed(what.to_owned());
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
        let mut message: Result<ChatMessage, String> = Err("entry has no message field".to_owned());
        let mut seq = None;
        if let Value::Array(fields) = fields {
            for kv in fields.chunks(2) {
                let [k, v] = kv else { continue };
                match k.as_str().as_deref() {
                    Some(MESSAGE_FIELD) => {
                        message = v
                            .as_bytes()
                            .ok_or_else(|| "message field is not a string".to_owned())
                            .and_then(|b| serde_json::from_slice(b).map_err(|e| e.to_string()));
                    }
                    Some(SEQ_FIELD) => seq = v.as_u64(),
                    _ => {}
                }
            }
        }
        let message = message.map(|mut m| {
            m.seq = seq;
            m
        });
        entries.push(IngestEntry { id, message });
    }
    Ok(entries)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_entries() {
        let s = |v: &str| Value::from(v);
        let entry =
            |id: &str, json: &str| Value::Array(vec![s(id), Value::Array(vec![s("m"), s(json)])]);
        let message = r#"{"id":"6560a0000000000000000004","roomId":"6560a0000000000000000002","sender":{"_id":"6560a0000000000000000003"},"content":"x","createdAt":"2026-11-27T10:00:00.123Z"}"#;
        let numbered = Value::Array(vec![
            s("4-0"),
            Value::Array(vec![s("m"), s(message), s("s"), s("42")]),
        ]);
        let parsed = parse_entries(vec![numbered]).unwrap();
        assert_eq!(parsed[0].message.as_ref().unwrap().seq, Some(42));
        let deleted = Value::Array(vec![s("3-0"), Value::Null]);
        let entries =
            parse_entries(vec![entry("1-0", "not json"), entry("2-0", "{}"), deleted]).unwrap();
        let ids: Vec<&str> = entries.iter().map(|e| e.id.as_str()).collect();
        assert_eq!(ids, ["1-0", "2-0", "3-0"]);
        assert!(entries.iter().all(|e| e.message.is_err()));
        assert!(parse_entries(vec![s("x")]).is_err());
    }

    #[test]
    fn idempotency_records() {
        let id = ObjectId::new();
        assert!(matches!(
            parse_first(&format!("{} 1700000000000 7", id.to_hex()), "h").unwrap(),
            Appended::Duplicate { id: got, seq: 7, same_content: true, .. } if got == id
        ));
        assert!(matches!(
            parse_first(&format!("{} 1700000000000 7 h", id.to_hex()), "h").unwrap(),
            Appended::Duplicate {
                same_content: true,
                ..
            }
        ));
        assert!(matches!(
            parse_first(&format!("{} 1700000000000 7 other", id.to_hex()), "h").unwrap(),
            Appended::Duplicate {
                same_content: false,
                ..
            }
        ));
        assert!(parse_first(&format!("{} 1700000000000", id.to_hex()), "h").is_err());
        assert!(parse_first("garbage", "h").is_err());
    }
}
