//! Payloads on the wire: Socket.IO events and acks, and the envelopes carried over Redis.
//!
//! Ids are 24-hex strings and times RFC 3339 UTC with milliseconds
//! (`2026-11-24T10:00:00.123Z`), exactly as clients see them.

use chrono::{DateTime, SecondsFormat, Utc};
use mongodb::bson::oid::ObjectId;
use serde::{Deserialize, Serialize};

/// The `message` event: one chat message as every member sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ChatMessage {
    #[serde(with = "oid_hex")]
    #[schema(value_type = String, pattern = "^[0-9a-f]{24}$")]
    pub id: ObjectId,
    #[serde(with = "oid_hex")]
    #[schema(value_type = String, pattern = "^[0-9a-f]{24}$")]
    pub room_id: ObjectId,
    pub sender: Sender,
    pub content: String,
    #[serde(with = "rfc3339_millis")]
    #[schema(value_type = String, format = DateTime)]
    pub created_at: DateTime<Utc>,
    /// The message's place in its room: 1, 2, 3… without gaps, in the room's one order,
    /// assigned once when the message is accepted. Absent only before that.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1, nullable = false)]
    pub seq: Option<u64>,
    /// Set on an item a backend service posted through the server API
    /// (`POST /server/rooms/:id/events`) instead of a chat message: it takes the room's
    /// ordered, stored path like a message, and reaches sockets as the named event. Its
    /// `sender` is [`SERVER_SENDER`] and its `content` empty. Only on the internal wire: the
    /// `message` event never carries it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(ignore)]
    pub server_event: Option<ServerEvent>,
}

/// The sender of a room item that a backend service posted ([`ChatMessage::server_event`]):
/// the all-zero id, which no user has ([`ObjectId::new`] never makes it).
pub const SERVER_SENDER: ObjectId = ObjectId::from_bytes([0; 12]);

/// A named event with a JSON object, posted by a backend service into a room's sequence.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServerEvent {
    /// One of `SERVER_EVENTS` (`file_uploaded`, `file_unlocked` by default).
    pub event: String,
    pub data: serde_json::Map<String, serde_json::Value>,
}

impl ChatMessage {
    /// A server event as an item of `room`'s sequence, not yet numbered.
    pub fn server(room: ObjectId, event: ServerEvent) -> Self {
        ChatMessage {
            id: ObjectId::new(),
            room_id: room,
            sender: Sender {
                id: SERVER_SENDER,
                email: None,
                display_name: None,
            },
            content: String::new(),
            created_at: now_millis(),
            seq: None,
            server_event: Some(event),
        }
    }

    /// A fingerprint of what the item says, kept with its idempotency key so that a retry
    /// carrying something else under the same key is told apart from a true retry.
    pub fn fingerprint(&self) -> String {
        match &self.server_event {
            None => crate::domain::fingerprint(&self.content),
            Some(e) => crate::domain::fingerprint(&format!("{}\0{}", e.event, canonical(&e.data))),
        }
    }

    /// The Socket.IO event that delivers the item, and its payload: `message` with the
    /// message, or the server event's name with `{...data, roomId, seq}`.
    pub fn emitted(&self) -> (&str, Emitted<'_>) {
        match &self.server_event {
            None => ("message", Emitted::Message(self)),
            Some(e) => (e.event.as_str(), Emitted::Event(self, e)),
        }
    }

    /// The item as the catch-up listing (`GET /chat/rooms/:id/messages?afterSeq=`) shows it:
    /// a message in its own shape, a server event as `{id, roomId, seq, createdAt, event,
    /// data}`.
    pub fn listed(self) -> Listed {
        Listed(self)
    }
}

/// JSON text with every object's keys sorted: the same data posted with its keys in another
/// order is the same data (objects keep their order here: `serde_json`'s `preserve_order` is
/// on in this build).
fn canonical(data: &serde_json::Map<String, serde_json::Value>) -> String {
    let mut value = serde_json::Value::Object(data.clone());
    value.sort_all_objects();
    value.to_string()
}

/// A payload of [`ChatMessage::emitted`].
pub enum Emitted<'a> {
    Message(&'a ChatMessage),
    Event(&'a ChatMessage, &'a ServerEvent),
}

impl Serialize for Emitted<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        match self {
            Emitted::Message(m) => m.serialize(s),
            Emitted::Event(m, e) => {
                // The server API refuses `roomId` and `seq` in `data`: these two are the
                // gateway's, and a JSON object must not name a key twice.
                let mut map = s.serialize_map(Some(e.data.len() + 2))?;
                for (k, v) in &e.data {
                    map.serialize_entry(k, v)?;
                }
                map.serialize_entry("roomId", &m.room_id.to_hex())?;
                map.serialize_entry("seq", &m.seq)?;
                map.end()
            }
        }
    }
}

/// An item of [`ChatMessage::listed`].
pub struct Listed(ChatMessage);

impl Serialize for Listed {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let m = &self.0;
        match &m.server_event {
            None => m.serialize(s),
            Some(e) => {
                let mut map = s.serialize_map(Some(6))?;
                map.serialize_entry("id", &m.id.to_hex())?;
                map.serialize_entry("roomId", &m.room_id.to_hex())?;
                map.serialize_entry("seq", &m.seq)?;
                map.serialize_entry("createdAt", &format_time(&m.created_at))?;
                map.serialize_entry("event", &e.event)?;
                map.serialize_entry("data", &e.data)?;
                map.end()
            }
        }
    }
}

/// Who sent a message. `email` and `displayName` come from the sender's token.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Sender {
    #[serde(rename = "_id", with = "oid_hex")]
    #[schema(value_type = String, pattern = "^[0-9a-f]{24}$")]
    pub id: ObjectId,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub email: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub display_name: Option<String>,
}

/// The `user_typing` event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct UserTyping {
    #[serde(with = "oid_hex")]
    pub user_id: ObjectId,
    #[serde(with = "oid_hex")]
    pub room_id: ObjectId,
}

/// The `presence` event: a user's first socket joined the room, on any gateway (online), or
/// their last one left it (offline).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PresenceChange {
    #[serde(with = "oid_hex")]
    pub room_id: ObjectId,
    #[serde(with = "oid_hex")]
    pub user_id: ObjectId,
    pub online: bool,
}

/// Users were given a room (they created it, or its owner added them): every gateway emits
/// `room_added {room}` to their sockets. Sent on the control channel, which every gateway
/// hears: those sockets are in no room of it yet.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RoomAdded {
    #[serde(with = "crate::store::oid_hex_vec")]
    pub user_ids: Vec<ObjectId>,
    pub room: crate::store::Room,
}

/// What travels on a room's pub/sub channel.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", content = "data", rename_all = "snake_case")]
pub enum RoomEvent {
    /// Persisted messages of one room, in order, each emitted as `message` to every local
    /// member: what a persister publishes per room and batch (one `SPUBLISH` for the room,
    /// not one per message).
    Messages(MessageBatch),
    /// A typing notice, emitted as `user_typing` to every local member but the typer.
    Typing(UserTyping),
    /// A participant was removed: every gateway makes that user's sockets leave the room
    /// and forgets that the user was allowed in it. Sent on the control channel, which
    /// every gateway hears, not on the room's.
    MemberRemoved(MemberRemoved),
    /// A user came online or went offline in the room: emitted as `presence` to every
    /// local member.
    Presence(PresenceChange),
    /// Users were given a room (on the control channel).
    RoomAdded(RoomAdded),
}

/// Payload of [`RoomEvent::Messages`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MessageBatch {
    #[serde(with = "oid_hex")]
    pub room_id: ObjectId,
    pub messages: Vec<ChatMessage>,
    /// How many times the room's participants were removed, as Redis counted it when the
    /// batch was published. A gateway that sees it grow reads the participants again before
    /// delivering, so a removed user gets nothing more even if the removal's own notice was
    /// lost. Absent where nothing is counted (the embedded mode). Keep it the last field:
    /// the publishing script fills it in at the end of the payload.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub members_version: Option<u64>,
}

/// Payload of [`RoomEvent::MemberRemoved`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MemberRemoved {
    #[serde(with = "oid_hex")]
    pub user_id: ObjectId,
    #[serde(with = "oid_hex")]
    pub room_id: ObjectId,
}

impl RoomEvent {
    pub fn room_id(&self) -> ObjectId {
        match self {
            RoomEvent::Messages(b) => b.room_id,
            RoomEvent::Typing(t) => t.room_id,
            RoomEvent::MemberRemoved(r) => r.room_id,
            RoomEvent::Presence(p) => p.room_id,
            RoomEvent::RoomAdded(a) => a.room.id,
        }
    }
}

/// Error codes shared by acks and `exception` events.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ErrorCode {
    BadRequest,
    Unauthorized,
    Forbidden,
    NotFound,
    Unavailable,
    RateLimited,
}

/// Formats a time the way every payload carries it: RFC 3339, UTC, milliseconds.
pub fn format_time(t: &DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// The current time truncated to milliseconds, the precision that MongoDB keeps.
pub fn now_millis() -> DateTime<Utc> {
    let now = Utc::now();
    DateTime::from_timestamp_millis(now.timestamp_millis()).unwrap_or(now)
}

/// Serde for an [`ObjectId`] as a plain 24-hex string.
pub mod oid_hex {
    use mongodb::bson::oid::ObjectId;
    use serde::{Deserialize, Deserializer, Serializer, de::Error};

    pub fn serialize<S: Serializer>(id: &ObjectId, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&id.to_hex())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<ObjectId, D::Error> {
        let raw = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        ObjectId::parse_str(raw.as_ref()).map_err(D::Error::custom)
    }
}

/// Serde for a time as RFC 3339 UTC with milliseconds.
pub mod rfc3339_millis {
    use chrono::{DateTime, Utc};
    use serde::{Deserialize, Deserializer, Serializer, de::Error};

    pub fn serialize<S: Serializer>(t: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&super::format_time(t))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<DateTime<Utc>, D::Error> {
        let raw = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        DateTime::parse_from_rfc3339(&raw)
            .map(|t| t.with_timezone(&Utc))
            .map_err(D::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn message_shape_is_pinned() {
        let msg = ChatMessage {
            id: ObjectId::parse_str("6560a0000000000000000001").unwrap(),
            room_id: ObjectId::parse_str("6560a0000000000000000002").unwrap(),
            sender: Sender {
                id: ObjectId::parse_str("6560a0000000000000000003").unwrap(),
                email: Some("ann@example.com".into()),
                display_name: Some("Ann".into()),
            },
            content: "hi".into(),
            created_at: DateTime::parse_from_rfc3339("2026-11-24T10:00:00.1Z")
                .unwrap()
                .with_timezone(&Utc),
            seq: None,
            server_event: None,
        };
        assert_eq!(
            serde_json::to_value(&msg).unwrap(),
            json!({
                "id": "6560a0000000000000000001",
                "roomId": "6560a0000000000000000002",
                "sender": {"_id": "6560a0000000000000000003", "email": "ann@example.com", "displayName": "Ann"},
                "content": "hi",
                "createdAt": "2026-11-24T10:00:00.100Z"
            })
        );
        let event = RoomEvent::Messages(MessageBatch {
            room_id: msg.room_id,
            messages: vec![msg.clone()],
            members_version: None,
        });
        let back: RoomEvent =
            serde_json::from_str(&serde_json::to_string(&event).unwrap()).unwrap();
        assert_eq!(back.room_id(), msg.room_id);
    }

    #[test]
    fn a_server_event_is_emitted_and_listed_in_its_own_shapes() {
        let room = ObjectId::parse_str("6560a0000000000000000002").unwrap();
        let data = json!({ "fileId": "f1", "size": 3 })
            .as_object()
            .unwrap()
            .clone();
        let mut item = ChatMessage::server(
            room,
            ServerEvent {
                event: "file_uploaded".into(),
                data,
            },
        );
        item.seq = Some(7);
        let (name, payload) = item.emitted();
        assert_eq!(name, "file_uploaded");
        assert_eq!(
            serde_json::to_value(&payload).unwrap(),
            json!({ "fileId": "f1", "size": 3, "roomId": "6560a0000000000000000002", "seq": 7 })
        );
        let listed = serde_json::to_value(item.clone().listed()).unwrap();
        assert_eq!(listed["event"], "file_uploaded");
        assert_eq!(listed["data"], json!({ "fileId": "f1", "size": 3 }));
        assert_eq!(listed["seq"], 7);
        assert_eq!(listed.as_object().unwrap().len(), 6);
        // On the internal wire it keeps everything.
        let back: ChatMessage =
            serde_json::from_str(&serde_json::to_string(&item).unwrap()).unwrap();
        assert_eq!(back, item);
        // Another event or data under one idempotency key is told apart.
        let mut other = item.clone();
        other
            .server_event
            .as_mut()
            .unwrap()
            .data
            .insert("size".into(), json!(4));
        assert_ne!(item.fingerprint(), other.fingerprint());
        // The same data with its keys in another order is the same.
        let mut reordered = item.clone();
        reordered.server_event.as_mut().unwrap().data = json!({ "size": 3, "fileId": "f1" })
            .as_object()
            .unwrap()
            .clone();
        assert_eq!(item.fingerprint(), reordered.fingerprint());
    }
}
