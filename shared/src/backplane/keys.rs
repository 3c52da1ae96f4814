//! Every Redis key and channel, under one prefix (`REDIS_PREFIX`, default `chat`).
//!
//! In a Redis Cluster a command or script may only touch keys of one hash slot, and a
//! sharded channel lives on the shard that owns its slot. The hash tags (the part in braces)
//! are chosen so that everything one script touches shares a slot and the partitions spread
//! over the masters. With the default prefix and partition `p`:
//!
//! | name | type | hash tag, and why | holds | bound |
//! |---|---|---|---|---|
//! | `{chat:ingest:p}:stream` | stream, group `persisters` | the partition: append, read and acknowledge are scripts on it | messages accepted and not yet stored | `INGEST_MAX_BACKLOG` entries; acknowledged entries are deleted |
//! | `{chat:ingest:p}:lease` | string | the partition: the read and complete scripts check it with the stream | `<instance> <token>` of the persister holding the partition | `PX LEASE_MS × 3/4` |
//! | `{chat:ingest:p}:seq` | hash | the partition: read and raised in the append script | the last sequence number given in each room of the partition | one field per room, never expires |
//! | `{chat:ingest:p}:fence` | string (counter) | the partition | the last fencing token handed out | one per partition |
//! | `{chat:ingest:p}:msg:<messageId>` | string | the partition of the room: checked and set in the append script | the sequence number the message was given | `EX 120` |
//! | `{chat:ingest:p}:idem:<user>:<room>:<clientMsgId>` | string | the partition of the room: checked and set in the append script | `<messageId> <millis> <seq> <content hash>` of the first send | `EX IDEMPOTENCY_TTL_SECS` (24 h) |
//! | `{chat:ingest:p}:idem:server:<room>:<idempotencyKey>` | string | the same, for a server event | `<id> <millis> <seq> <event and data hash>` | `EX IDEMPOTENCY_TTL_SECS` (24 h) |
//! | `{chat:ingest:p}:renumbered:<roomId>:<entryId>` | string | the partition: set by the renumber script | what one renumbering moved | `EX 600` |
//! | `{chat:ingest:p}:room:<roomId>` | sharded channel | the partition: the complete script publishes with the fenced acknowledge | `message` batches and `typing` of one room | pub/sub |
//! | `{chat:ingest:p}:presence:<roomId>` | hash | the partition of the room: the presence script changes it and publishes on the room's channel | `<gateway> <userId>` for each user a gateway holds sockets of in the room, and `u:<userId>` → how many gateways do | one field per user and gateway holding them; deleted with the last |
//! | `{chat}:presence:gateways` | sorted set | its own, with the next | live gateway instances, scored by heartbeat expiry | one member per live gateway |
//! | `{chat}:presence:dead` | set | the previous | gateway instances whose heartbeat expired, until their entries are taken offline | removed once reaped |
//! | `{chat:presence:<gateway>}:held` | set | its own (one per gateway) | `<roomId> <userId>` of every entry the gateway holds, for taking them offline after it died | deleted when reaped |
//! | `{chat}:control` | sharded channel | its own | participant removals, heard by every gateway | pub/sub |
//! | `{chat}:ingest:partitions` | string | its own | the partition count, recorded by the first process | one key |
//! | `{chat}:persisters` | sorted set | its own | live persister instances, scored by heartbeat expiry | one member per live persister; stale ones removed at every heartbeat |
//! | `chat:count:<name>` | string (counter) | none (one key per command) | login failure counters | `PX` of the window |

use crate::wire::RoomEvent;
use mongodb::bson::oid::ObjectId;

/// The names of one deployment.
#[derive(Debug, Clone)]
pub struct Keys {
    prefix: String,
    partitions: u16,
}

impl Keys {
    pub fn new(prefix: &str, partitions: u16) -> Self {
        Self {
            prefix: prefix.to_owned(),
            partitions: partitions.max(1),
        }
    }

    pub fn partitions(&self) -> u16 {
        self.partitions
    }

    /// The partition of a room: CRC16 of its id (the cluster's own hash) modulo the count,
    /// the same in every process and release.
    pub fn partition_of(&self, room: &ObjectId) -> u16 {
        fred::util::redis_keyslot(room.to_hex().as_bytes()) % self.partitions
    }

    fn tag(&self, partition: u16) -> String {
        format!("{{{}:ingest:{partition}}}", self.prefix)
    }

    /// A partition's stream.
    pub fn ingest_stream(&self, partition: u16) -> String {
        format!("{}:stream", self.tag(partition))
    }

    /// How many reads of a partition returned entries (written so that a `WAIT` after a
    /// read covers what it returned, `read.lua`).
    pub fn ingest_reads(&self, partition: u16) -> String {
        format!("{}:reads", self.tag(partition))
    }

    /// Who holds a partition.
    pub fn ingest_lease(&self, partition: u16) -> String {
        format!("{}:lease", self.tag(partition))
    }

    /// The sequence counters of a partition's rooms (a hash: room id → last number given).
    pub fn ingest_seq(&self, partition: u16) -> String {
        format!("{}:seq", self.tag(partition))
    }

    /// How many times each room of a partition lost a participant (a hash: room id → count).
    pub fn ingest_members(&self, partition: u16) -> String {
        format!("{}:members", self.tag(partition))
    }

    /// The fencing token counter of a partition.
    pub fn ingest_fence(&self, partition: u16) -> String {
        format!("{}:fence", self.tag(partition))
    }

    /// A message's own key, set when it is appended: a second run of the append finds it.
    pub fn appended(&self, room: &ObjectId, message: &ObjectId) -> String {
        format!(
            "{}{}",
            self.appended_prefix(self.partition_of(room)),
            message.to_hex()
        )
    }

    /// What every message's own key in a partition starts with.
    pub fn appended_prefix(&self, partition: u16) -> String {
        format!("{}:msg:", self.tag(partition))
    }

    /// The record of one renumbering of a room's entries (see `renumber.lua`).
    pub fn renumbered(&self, room: &ObjectId, from: &str) -> String {
        format!(
            "{}:renumbered:{}:{from}",
            self.tag(self.partition_of(room)),
            room.to_hex()
        )
    }

    /// An idempotency key (`<user>:<room>:<clientMsgId>`), in its room's partition.
    pub fn idempotency(&self, room: &ObjectId, key: &str) -> String {
        format!("{}:idem:{key}", self.tag(self.partition_of(room)))
    }

    /// The consumer group of every partition stream.
    pub fn ingest_group(&self) -> &'static str {
        "persisters"
    }

    /// The one consumer name in each group: only the lease holder reads (the read script
    /// checks), so the pending entries of a holder that died are simply the next one's.
    pub fn ingest_consumer(&self) -> &'static str {
        "holder"
    }

    /// Where the partition count is recorded.
    pub fn partitions_record(&self) -> String {
        format!("{{{}}}:ingest:partitions", self.prefix)
    }

    /// The live persisters.
    pub fn persisters(&self) -> String {
        format!("{{{}}}:persisters", self.prefix)
    }

    /// Who is online in a room, per gateway (a hash), in the slot of the room's channel.
    pub fn presence(&self, room: &ObjectId) -> String {
        format!(
            "{}:presence:{}",
            self.tag(self.partition_of(room)),
            room.to_hex()
        )
    }

    /// The live gateways, scored by when their presence heartbeat expires.
    pub fn presence_gateways(&self) -> String {
        format!("{{{}}}:presence:gateways", self.prefix)
    }

    /// Gateways whose heartbeat expired and whose entries are still to be taken offline.
    pub fn presence_dead(&self) -> String {
        format!("{{{}}}:presence:dead", self.prefix)
    }

    /// What a gateway instance holds online: `<roomId> <userId>` entries.
    pub fn presence_held(&self, gateway: &str) -> String {
        format!("{{{}:presence:{gateway}}}:held", self.prefix)
    }

    /// A rate-limit counter.
    pub fn counter(&self, key: &str) -> String {
        format!("{}:count:{key}", self.prefix)
    }

    /// A room's sharded channel, in the slot of its partition.
    pub fn room_channel(&self, room: &ObjectId) -> String {
        format!(
            "{}:room:{}",
            self.tag(self.partition_of(room)),
            room.to_hex()
        )
    }

    /// The channel every gateway subscribes to, for events about users rather than rooms.
    pub fn control_channel(&self) -> String {
        format!("{{{}}}:control", self.prefix)
    }

    /// Where an event is published.
    pub fn channel_of(&self, event: &RoomEvent) -> String {
        match event {
            RoomEvent::MemberRemoved(_) | RoomEvent::RoomAdded(_) => self.control_channel(),
            _ => self.room_channel(&event.room_id()),
        }
    }

    /// The room id of one of our room channels.
    pub fn room_of_channel(&self, channel: &str) -> Option<ObjectId> {
        let rest = channel.strip_prefix(&format!("{{{}:ingest:", self.prefix))?;
        let (_, room) = rest.split_once("}:room:")?;
        let room = ObjectId::parse_str(room).ok()?;
        (self.room_channel(&room) == channel).then_some(room)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fred::util::redis_keyslot;

    #[test]
    fn names() {
        let keys = Keys::new("chat", 16);
        let room = ObjectId::parse_str("6560a0000000000000000002").unwrap();
        let p = keys.partition_of(&room);
        assert_eq!(keys.ingest_stream(3), "{chat:ingest:3}:stream");
        assert_eq!(
            keys.room_channel(&room),
            format!("{{chat:ingest:{p}}}:room:6560a0000000000000000002")
        );
        assert_eq!(keys.room_of_channel(&keys.room_channel(&room)), Some(room));
        assert_eq!(keys.room_of_channel("other:room:{x}"), None);
        // A channel in the wrong partition is not ours.
        let wrong = format!(
            "{{chat:ingest:{}}}:room:6560a0000000000000000002",
            (p + 1) % 16
        );
        assert_eq!(keys.room_of_channel(&wrong), None);
    }

    #[test]
    fn what_a_script_touches_shares_one_slot() {
        let keys = Keys::new("chat", 16);
        for _ in 0..100 {
            let room = ObjectId::new();
            let p = keys.partition_of(&room);
            let slot = redis_keyslot(keys.ingest_stream(p).as_bytes());
            for key in [
                keys.ingest_lease(p),
                keys.ingest_fence(p),
                keys.ingest_seq(p),
                keys.idempotency(&room, "u:r:c"),
                keys.appended(&room, &ObjectId::new()),
                keys.renumbered(&room, "1-0"),
                keys.room_channel(&room),
                keys.presence(&room),
            ] {
                assert_eq!(redis_keyslot(key.as_bytes()), slot, "{key}");
            }
        }
    }

    #[test]
    fn the_presence_lists_share_a_slot() {
        let keys = Keys::new("chat", 16);
        assert_eq!(
            redis_keyslot(keys.presence_gateways().as_bytes()),
            redis_keyslot(keys.presence_dead().as_bytes())
        );
    }

    #[test]
    fn rooms_and_partitions_spread() {
        let keys = Keys::new("chat", 16);
        let mut rooms = [0u32; 16];
        for _ in 0..16_000 {
            rooms[keys.partition_of(&ObjectId::new()) as usize] += 1;
        }
        assert!(rooms.iter().all(|&n| (700..1300).contains(&n)), "{rooms:?}");
        let slots: std::collections::HashSet<u16> = (0..16)
            .map(|p| redis_keyslot(keys.ingest_stream(p).as_bytes()))
            .collect();
        assert_eq!(slots.len(), 16, "every partition in its own slot");
    }
}
