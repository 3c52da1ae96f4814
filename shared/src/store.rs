//! The store: users, rooms and messages.
//!
//! [`Store::insert_messages`] is idempotent by message id, which turns the ingest
//! stream's at-least-once delivery into exactly one stored copy, and a room's sequence
//! numbers are unique: a number held by another message is refused
//! ([`StoreError::SeqTaken`]), never stored twice.

use crate::config::MongoSettings;
use crate::wire::{ChatMessage, Sender, ServerEvent};
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use futures::TryStreamExt;
use mongodb::bson::{self, Document, doc, oid::ObjectId};
use mongodb::error::{ErrorKind, WriteFailure};
use mongodb::options::{ClientOptions, IndexOptions};
use mongodb::{Collection, IndexModel};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::future::IntoFuture;
use std::time::Duration;

/// A user as clients see it (never with the password hash).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct User {
    #[serde(rename = "_id", with = "crate::wire::oid_hex")]
    #[schema(value_type = String, pattern = "^[0-9a-f]{24}$")]
    pub id: ObjectId,
    pub email: String,
    #[serde(rename = "displayName")]
    pub display_name: String,
}

/// A user with the credentials needed to log in.
#[derive(Debug, Clone)]
pub struct UserCredentials {
    pub user: User,
    pub password_hash: String,
}

/// A room as clients see it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Room {
    #[serde(rename = "_id", with = "crate::wire::oid_hex")]
    #[schema(value_type = String, pattern = "^[0-9a-f]{24}$")]
    pub id: ObjectId,
    /// `null` until set.
    #[schema(required = true)]
    pub name: Option<String>,
    /// The creator: the only one who adds or removes others. Absent on rooms stored before
    /// rooms had owners (their first participant counts as the owner).
    #[serde(with = "opt_oid_hex", default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = String, pattern = "^[0-9a-f]{24}$", required = false, nullable = false)]
    pub owner_id: Option<ObjectId>,
    #[serde(with = "oid_hex_vec")]
    #[schema(value_type = Vec<String>)]
    pub participants: Vec<ObjectId>,
    #[serde(with = "crate::wire::rfc3339_millis")]
    #[schema(value_type = String, format = DateTime)]
    pub created_at: DateTime<Utc>,
    /// The time of the room's last item (a message or a server event); `null` until then.
    #[serde(with = "opt_rfc3339_millis")]
    #[schema(value_type = Option<String>, format = DateTime, required = true)]
    pub last_message_at: Option<DateTime<Utc>>,
}

impl Room {
    pub fn has_participant(&self, user: &ObjectId) -> bool {
        self.participants.contains(user)
    }

    /// Whether `user` owns the room (see [`Room::owner_id`]).
    pub fn is_owner(&self, user: &ObjectId) -> bool {
        self.owner_id.or_else(|| self.participants.first().copied()) == Some(*user)
    }
}

/// Serde for an optional [`ObjectId`] as a 24-hex string.
mod opt_oid_hex {
    use mongodb::bson::oid::ObjectId;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(id: &Option<ObjectId>, s: S) -> Result<S::Ok, S::Error> {
        match id {
            Some(id) => crate::wire::oid_hex::serialize(id, s),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<ObjectId>, D::Error> {
        #[derive(Deserialize)]
        struct Wrapped(#[serde(with = "crate::wire::oid_hex")] ObjectId);
        Ok(Option::<Wrapped>::deserialize(d)?.map(|w| w.0))
    }
}

/// A message with its place in the canonical order: its room sequence number. History is
/// sorted by it, so every reader sees messages in the order they were accepted, whichever
/// gateway accepted them.
#[derive(Debug, Clone, PartialEq)]
pub struct SequencedMessage {
    pub seq: i64,
    pub message: ChatMessage,
}

/// A message of a room, by its number: what [`Store::stored_in`] answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoredSeq {
    pub room: ObjectId,
    pub seq: u64,
    pub id: ObjectId,
}

/// A store failure.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A unique value (a user's e-mail) is taken.
    #[error("already exists")]
    Conflict,
    /// The room has the most participants allowed.
    #[error("the room is full")]
    Full,
    /// [`Store::insert_messages`] stopped at a message whose room already gives its number to
    /// another message; the `stored` messages before it are stored.
    #[error("sequence number {seq} of room {room} is held by another message")]
    SeqTaken {
        stored: usize,
        room: ObjectId,
        seq: i64,
    },
    /// The store did not answer or failed; the cause is for the log only.
    #[error("store unavailable: {0}")]
    Unavailable(String),
}

impl From<mongodb::error::Error> for StoreError {
    fn from(e: mongodb::error::Error) -> Self {
        if is_duplicate_key(&e) {
            StoreError::Conflict
        } else {
            StoreError::Unavailable(e.to_string())
        }
    }
}

/// Users, rooms and messages.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Creates a user; [`StoreError::Conflict`] when the (normalised) e-mail is taken.
    async fn create_user(
        &self,
        email: &str,
        display_name: &str,
        password_hash: &str,
    ) -> Result<User, StoreError>;
    async fn user_credentials(&self, email: &str) -> Result<Option<UserCredentials>, StoreError>;
    async fn user(&self, id: ObjectId) -> Result<Option<User>, StoreError>;
    /// The users of `ids` that exist, in any order. One query where the store allows.
    async fn users(&self, ids: &[ObjectId]) -> Result<Vec<User>, StoreError> {
        let mut found = Vec::with_capacity(ids.len());
        for id in ids {
            if let Some(user) = self.user(*id).await? {
                found.push(user);
            }
        }
        Ok(found)
    }
    /// Those of `ids` that are not users.
    async fn missing_users(&self, ids: &[ObjectId]) -> Result<Vec<ObjectId>, StoreError>;

    async fn create_room(
        &self,
        name: Option<String>,
        participants: Vec<ObjectId>,
    ) -> Result<Room, StoreError>;
    async fn room(&self, id: ObjectId) -> Result<Option<Room>, StoreError>;
    /// A user's rooms, most recently active first, at most `limit`; with `before` (one of the
    /// user's rooms), those less recently active than it.
    async fn rooms_of(
        &self,
        user: ObjectId,
        before: Option<ObjectId>,
        limit: u32,
    ) -> Result<Vec<Room>, StoreError>;
    /// Whether two users are participants of one room together.
    async fn share_a_room(&self, a: ObjectId, b: ObjectId) -> Result<bool, StoreError>;
    /// Removes a participant; `None` when the room does not exist.
    async fn remove_participant(
        &self,
        room: ObjectId,
        user: ObjectId,
    ) -> Result<Option<Room>, StoreError>;
    /// Adds a participant (no-op when already one); `None` when the room does not exist,
    /// [`StoreError::Full`] when it has `max` participants already (checked in the same
    /// step, so concurrent adds cannot pass it together).
    async fn add_participant(
        &self,
        room: ObjectId,
        user: ObjectId,
        max: usize,
    ) -> Result<Option<Room>, StoreError>;

    /// Stores messages in the given order. Idempotent: a message whose id is already stored
    /// counts as stored (whatever its number). Stops at the first message whose room already
    /// gives its number to another message: [`StoreError::SeqTaken`], with the messages
    /// before it stored and none after.
    async fn insert_messages(&self, messages: &[SequencedMessage]) -> Result<(), StoreError>;

    /// The messages stored in each room with a number from `first` to `last`, and those of
    /// `ids` wherever they are stored, in any order: one query for many rooms
    /// (`(room, first, last)`).
    async fn stored_in(
        &self,
        ranges: &[(ObjectId, u64, u64)],
        ids: &[ObjectId],
    ) -> Result<Vec<StoredSeq>, StoreError>;
    /// A room's chat messages (not its server events), newest first (in accepted order), at
    /// most `limit`, older than the message `before` when given.
    async fn messages(
        &self,
        room: ObjectId,
        before: Option<ObjectId>,
        limit: u32,
    ) -> Result<Vec<ChatMessage>, StoreError>;

    /// The items of a room (chat messages and server events) with a sequence number above
    /// `after_seq`, oldest first.
    async fn messages_after(
        &self,
        room: ObjectId,
        after_seq: u64,
        limit: u32,
    ) -> Result<Vec<ChatMessage>, StoreError>;

    /// The highest sequence number stored in a room (0 when it has no message).
    async fn latest_seq(&self, room: ObjectId) -> Result<u64, StoreError>;

    async fn ping(&self) -> Result<(), StoreError>;

    /// Releases connections at shutdown, after the last use.
    async fn close(&self) {}
}

#[derive(Debug, Serialize, Deserialize)]
struct UserDoc {
    #[serde(rename = "_id")]
    id: ObjectId,
    email: String,
    #[serde(rename = "displayName")]
    display_name: String,
    #[serde(rename = "passwordHash")]
    password_hash: String,
    #[serde(rename = "createdAt")]
    created_at: bson::DateTime,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RoomDoc {
    #[serde(rename = "_id")]
    id: ObjectId,
    name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    owner_id: Option<ObjectId>,
    participants: Vec<ObjectId>,
    created_at: bson::DateTime,
    last_message_at: Option<bson::DateTime>,
    /// Last message time, or creation time: what "most recently active" sorts on.
    active_at: bson::DateTime,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct MessageDoc {
    #[serde(rename = "_id")]
    id: ObjectId,
    room_id: ObjectId,
    #[serde(default)]
    seq: i64,
    /// A chat message's; absent on a server event.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    sender: Option<SenderDoc>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    content: Option<String>,
    created_at: bson::DateTime,
    /// A server event's name and its data, as JSON text (kept as text so that it comes back
    /// exactly as posted: BSON has no unsigned 64-bit integer). Absent on a chat message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    event: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    data: Option<String>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct SenderDoc {
    #[serde(rename = "_id")]
    id: ObjectId,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    email: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    display_name: Option<String>,
}

fn to_bson_time(t: &DateTime<Utc>) -> bson::DateTime {
    bson::DateTime::from_millis(t.timestamp_millis())
}

fn from_bson_time(t: bson::DateTime) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(t.timestamp_millis()).unwrap_or_default()
}

impl From<RoomDoc> for Room {
    fn from(d: RoomDoc) -> Self {
        Room {
            id: d.id,
            name: d.name,
            owner_id: d.owner_id,
            participants: d.participants,
            created_at: from_bson_time(d.created_at),
            last_message_at: d.last_message_at.map(from_bson_time),
        }
    }
}

impl From<&SequencedMessage> for MessageDoc {
    fn from(s: &SequencedMessage) -> Self {
        let m = &s.message;
        let (sender, content) = match m.server_event {
            Some(_) => (None, None),
            None => (
                Some(SenderDoc {
                    id: m.sender.id,
                    email: m.sender.email.clone(),
                    display_name: m.sender.display_name.clone(),
                }),
                Some(m.content.clone()),
            ),
        };
        MessageDoc {
            id: m.id,
            room_id: m.room_id,
            seq: s.seq,
            sender,
            content,
            created_at: to_bson_time(&m.created_at),
            event: m.server_event.as_ref().map(|e| e.event.clone()),
            data: m
                .server_event
                .as_ref()
                .map(|e| serde_json::Value::Object(e.data.clone()).to_string()),
        }
    }
}

impl From<MessageDoc> for ChatMessage {
    fn from(d: MessageDoc) -> Self {
        let server_event = d.event.map(|event| ServerEvent {
            event,
            data: d
                .data
                .and_then(|text| {
                    serde_json::from_str(&text)
                        .inspect_err(|e| tracing::error!(id = %d.id, error = %e, "a stored server event's data is not a JSON object: shown as {{}}"))
                        .ok()
                })
                .unwrap_or_default(),
        });
        let sender = match d.sender {
            Some(s) => Sender {
                id: s.id,
                email: s.email,
                display_name: s.display_name,
            },
            None => Sender {
                id: crate::wire::SERVER_SENDER,
                email: None,
                display_name: None,
            },
        };
        ChatMessage {
            id: d.id,
            room_id: d.room_id,
            sender,
            content: d.content.unwrap_or_default(),
            created_at: from_bson_time(d.created_at),
            seq: u64::try_from(d.seq).ok(),
            server_event,
        }
    }
}

const DUPLICATE_KEY: i32 = 11000;

fn is_duplicate_key(e: &mongodb::error::Error) -> bool {
    match e.kind.as_ref() {
        ErrorKind::Write(WriteFailure::WriteError(w)) => w.code == DUPLICATE_KEY,
        ErrorKind::InsertMany(m) => m
            .write_errors
            .as_ref()
            .is_some_and(|errs| errs.iter().any(|w| w.code == DUPLICATE_KEY)),
        ErrorKind::Command(c) => c.code == DUPLICATE_KEY,
        _ => false,
    }
}

/// The MongoDB store. Collections `users`, `rooms`, `messages`.
#[derive(Clone)]
pub struct MongoStore {
    db: mongodb::Database,
    users: Collection<UserDoc>,
    rooms: Collection<RoomDoc>,
    messages: Collection<MessageDoc>,
}

impl MongoStore {
    /// Connects and creates the indexes the queries need.
    pub async fn connect(settings: &MongoSettings, app_name: &str) -> Result<Self, StoreError> {
        let mut options = ClientOptions::parse(settings.uri())
            .await
            .map_err(|e| StoreError::Unavailable(format!("MONGODB_URI is invalid: {e}")))?;
        options.app_name = Some(app_name.to_owned());
        options.server_selection_timeout = Some(Duration::from_secs(5));
        options.connect_timeout = Some(Duration::from_secs(5));
        let hosts: Vec<String> = options.hosts.iter().map(ToString::to_string).collect();
        let client = mongodb::Client::with_options(options)?;
        let db = client.database(&settings.db);
        // The driver's own error for an unreachable server describes the whole topology in
        // several hundred characters; at start one line says what to check.
        if let Err(e) = db.run_command(doc! { "ping": 1 }).await {
            return Err(StoreError::Unavailable(match *e.kind {
                ErrorKind::ServerSelection { .. } => format!(
                    "no MongoDB server answered at {} within 5 s",
                    hosts.join(",")
                ),
                _ => e.to_string(),
            }));
        }
        let store = Self {
            users: db.collection("users"),
            rooms: db.collection("rooms"),
            messages: db.collection("messages"),
            db,
        };
        store.ensure_indexes().await?;
        Ok(store)
    }

    /// Applies an update to a room; the room after it, or `None` when it does not exist.
    async fn update_room(
        &self,
        room: ObjectId,
        update: Document,
    ) -> Result<Option<Room>, StoreError> {
        let result = self.rooms.update_one(doc! { "_id": room }, update).await?;
        if result.matched_count == 0 {
            return Ok(None);
        }
        self.room(room).await
    }

    async fn ensure_indexes(&self) -> Result<(), StoreError> {
        self.users
            .create_index(
                IndexModel::builder()
                    .keys(doc! { "email": 1 })
                    .options(IndexOptions::builder().unique(true).build())
                    .build(),
            )
            .await?;
        self.rooms
            .create_index(
                IndexModel::builder()
                    .keys(doc! { "participants": 1, "activeAt": -1 })
                    .build(),
            )
            .await?;
        self.ensure_unique_seqs().await
    }

    /// Makes a room's sequence numbers unique (index `roomId_seq_unique`). Databases written
    /// before it was may hold one number twice in a room (a Redis failover could give a
    /// stored number again): those rooms are numbered again first
    /// ([`Self::renumber_duplicates`]), then the index is made. The index it replaces
    /// (`roomId_1_seq_-1`, not unique) is dropped once the unique one exists.
    async fn ensure_unique_seqs(&self) -> Result<(), StoreError> {
        let unique = IndexModel::builder()
            .keys(doc! { "roomId": 1, "seq": 1 })
            .options(
                IndexOptions::builder()
                    .unique(true)
                    .name("roomId_seq_unique".to_owned())
                    .build(),
            )
            .build();
        let mut attempts = 0;
        loop {
            attempts += 1;
            match self.messages.create_index(unique.clone()).await {
                Ok(_) => break,
                // Other processes may add duplicates while this one renumbers: a few rounds.
                Err(e) if is_duplicate_key(&e) && attempts <= 3 => {
                    self.renumber_duplicates().await?;
                }
                Err(e) => return Err(StoreError::Unavailable(e.to_string())),
            }
        }
        let names = self.messages.list_index_names().await?;
        if names.iter().any(|n| n == OLD_SEQ_INDEX) {
            self.messages.drop_index(OLD_SEQ_INDEX).await?;
        }
        Ok(())
    }

    /// The migration step of [`Self::ensure_unique_seqs`]: in every room that holds one number
    /// twice, the messages from the first such number on are numbered again, one after the
    /// other in their stored order (number, then id). Two processes running it at once may
    /// leave a number twice again; the index then still fails, and the next round (or the
    /// next start) numbers that room again.
    async fn renumber_duplicates(&self) -> Result<(), StoreError> {
        let pipeline = vec![
            doc! { "$group": { "_id": { "room": "$roomId", "seq": "$seq" }, "n": { "$sum": 1 } } },
            doc! { "$match": { "n": { "$gt": 1 } } },
        ];
        let groups: Vec<Document> = self
            .messages
            .aggregate(pipeline)
            .await?
            .try_collect()
            .await?;
        let mut first: BTreeMap<ObjectId, i64> = BTreeMap::new();
        for group in &groups {
            let Ok(key) = group.get_document("_id") else {
                continue;
            };
            let (Ok(room), Ok(seq)) = (key.get_object_id("room"), key.get_i64("seq")) else {
                continue;
            };
            let lowest = first.entry(room).or_insert(seq);
            *lowest = (*lowest).min(seq);
        }
        for (room, from) in first {
            let docs: Vec<Document> = self
                .messages
                .clone_with_type::<Document>()
                .find(doc! { "roomId": room, "seq": { "$gte": from } })
                .sort(doc! { "seq": 1, "_id": 1 })
                .projection(doc! { "_id": 1, "seq": 1 })
                .await?
                .try_collect()
                .await?;
            let mut renumbered = 0;
            for (next, d) in (from..).zip(&docs) {
                let (Ok(id), Ok(seq)) = (d.get_object_id("_id"), d.get_i64("seq")) else {
                    continue;
                };
                if seq != next {
                    self.messages
                        .update_one(doc! { "_id": id }, doc! { "$set": { "seq": next } })
                        .await?;
                    renumbered += 1;
                }
            }
            tracing::warn!(room_id = %room, from, renumbered, "a room held a sequence number twice: numbered its messages again");
        }
        Ok(())
    }

    /// Newest message time per room, for "most recently active first". One update per room,
    /// all in flight at once: a batch spanning many rooms costs one round trip.
    async fn touch_rooms(&self, messages: &[SequencedMessage]) -> Result<(), StoreError> {
        let mut latest: BTreeMap<ObjectId, DateTime<Utc>> = BTreeMap::new();
        for m in messages.iter().map(|s| &s.message) {
            let t = latest.entry(m.room_id).or_insert(m.created_at);
            *t = (*t).max(m.created_at);
        }
        futures::future::try_join_all(latest.into_iter().map(|(room, t)| {
            let t = to_bson_time(&t);
            self.rooms
                .update_one(
                    doc! { "_id": room },
                    doc! { "$max": { "lastMessageAt": t, "activeAt": t } },
                )
                .into_future()
        }))
        .await?;
        Ok(())
    }
}

/// The sequence index of databases written before numbers were unique.
const OLD_SEQ_INDEX: &str = "roomId_1_seq_-1";

#[async_trait]
impl Store for MongoStore {
    async fn create_user(
        &self,
        email: &str,
        display_name: &str,
        password_hash: &str,
    ) -> Result<User, StoreError> {
        let doc = UserDoc {
            id: ObjectId::new(),
            email: email.to_owned(),
            display_name: display_name.to_owned(),
            password_hash: password_hash.to_owned(),
            created_at: bson::DateTime::now(),
        };
        self.users.insert_one(&doc).await?;
        Ok(User {
            id: doc.id,
            email: doc.email,
            display_name: doc.display_name,
        })
    }

    async fn user_credentials(&self, email: &str) -> Result<Option<UserCredentials>, StoreError> {
        Ok(self
            .users
            .find_one(doc! { "email": email })
            .await?
            .map(|d| UserCredentials {
                user: User {
                    id: d.id,
                    email: d.email,
                    display_name: d.display_name,
                },
                password_hash: d.password_hash,
            }))
    }

    async fn user(&self, id: ObjectId) -> Result<Option<User>, StoreError> {
        Ok(self
            .users
            .find_one(doc! { "_id": id })
            .await?
            .map(|d| User {
                id: d.id,
                email: d.email,
                display_name: d.display_name,
            }))
    }

    async fn users(&self, ids: &[ObjectId]) -> Result<Vec<User>, StoreError> {
        let docs: Vec<UserDoc> = self
            .users
            .find(doc! { "_id": { "$in": ids } })
            .await?
            .try_collect()
            .await?;
        Ok(docs
            .into_iter()
            .map(|d| User {
                id: d.id,
                email: d.email,
                display_name: d.display_name,
            })
            .collect())
    }

    async fn missing_users(&self, ids: &[ObjectId]) -> Result<Vec<ObjectId>, StoreError> {
        let found: Vec<Document> = self
            .users
            .clone_with_type::<Document>()
            .find(doc! { "_id": { "$in": ids } })
            .projection(doc! { "_id": 1 })
            .await?
            .try_collect()
            .await?;
        let found: Vec<ObjectId> = found
            .iter()
            .filter_map(|d| d.get_object_id("_id").ok())
            .collect();
        Ok(ids
            .iter()
            .filter(|id| !found.contains(id))
            .copied()
            .collect())
    }

    async fn create_room(
        &self,
        name: Option<String>,
        participants: Vec<ObjectId>,
    ) -> Result<Room, StoreError> {
        let now = bson::DateTime::from_millis(crate::wire::now_millis().timestamp_millis());
        let doc = RoomDoc {
            id: ObjectId::new(),
            name,
            owner_id: participants.first().copied(),
            participants,
            created_at: now,
            last_message_at: None,
            active_at: now,
        };
        self.rooms.insert_one(&doc).await?;
        Ok(doc.into())
    }

    async fn room(&self, id: ObjectId) -> Result<Option<Room>, StoreError> {
        Ok(self
            .rooms
            .find_one(doc! { "_id": id })
            .await?
            .map(Room::from))
    }

    async fn rooms_of(
        &self,
        user: ObjectId,
        before: Option<ObjectId>,
        limit: u32,
    ) -> Result<Vec<Room>, StoreError> {
        let mut filter = doc! { "participants": user };
        if let Some(before) = before {
            let anchor = self
                .rooms
                .find_one(doc! { "_id": before, "participants": user })
                .await?;
            let Some(anchor) = anchor else {
                return Ok(Vec::new());
            };
            filter.insert(
                "$or",
                vec![
                    doc! { "activeAt": { "$lt": anchor.active_at } },
                    doc! { "activeAt": anchor.active_at, "_id": { "$lt": before } },
                ],
            );
        }
        let docs: Vec<RoomDoc> = self
            .rooms
            .find(filter)
            .sort(doc! { "activeAt": -1, "_id": -1 })
            .limit(i64::from(limit))
            .await?
            .try_collect()
            .await?;
        Ok(docs.into_iter().map(Room::from).collect())
    }

    async fn share_a_room(&self, a: ObjectId, b: ObjectId) -> Result<bool, StoreError> {
        let shared = self
            .rooms
            .clone_with_type::<Document>()
            .find_one(doc! { "participants": { "$all": [a, b] } })
            .projection(doc! { "_id": 1 })
            .await?;
        Ok(shared.is_some())
    }

    async fn add_participant(
        &self,
        room: ObjectId,
        user: ObjectId,
        max: usize,
    ) -> Result<Option<Room>, StoreError> {
        // Only while the room has fewer than `max`: its participant at index max - 1 does not
        // exist yet.
        let room_filter = doc! { "_id": room, format!("participants.{}", max.saturating_sub(1)): { "$exists": false } };
        let result = self
            .rooms
            .update_one(room_filter, doc! { "$addToSet": { "participants": user } })
            .await?;
        let current = self.room(room).await?;
        match current {
            Some(r) if result.matched_count == 0 && !r.has_participant(&user) => {
                Err(StoreError::Full)
            }
            other => Ok(other),
        }
    }

    async fn remove_participant(
        &self,
        room: ObjectId,
        user: ObjectId,
    ) -> Result<Option<Room>, StoreError> {
        self.update_room(room, doc! { "$pull": { "participants": user } })
            .await
    }

    async fn insert_messages(&self, messages: &[SequencedMessage]) -> Result<(), StoreError> {
        let docs: Vec<MessageDoc> = messages.iter().map(MessageDoc::from).collect();
        let mut start = 0;
        // Ordered: a refused message stops the insert there, so nothing of its room after
        // it is stored ahead of it.
        while start < docs.len() {
            let Err(e) = self
                .messages
                .insert_many(&docs[start..])
                .ordered(true)
                .await
            else {
                break;
            };
            let refused = match e.kind.as_ref() {
                ErrorKind::InsertMany(m) if m.write_concern_error.is_none() => m
                    .write_errors
                    .as_ref()
                    .and_then(|errs| errs.iter().min_by_key(|w| w.index))
                    .filter(|w| w.code == DUPLICATE_KEY)
                    .map(|w| start + w.index),
                _ => None,
            };
            let Some(at) = refused else {
                return Err(StoreError::Unavailable(e.to_string()));
            };
            // Its id stored already (a redelivery) counts as stored; else its number is taken.
            let stored = self
                .messages
                .clone_with_type::<Document>()
                .find_one(doc! { "_id": docs[at].id })
                .projection(doc! { "_id": 1 })
                .await?;
            if stored.is_none() {
                self.touch_rooms(&messages[..at]).await?;
                return Err(StoreError::SeqTaken {
                    stored: at,
                    room: docs[at].room_id,
                    seq: docs[at].seq,
                });
            }
            start = at + 1;
        }
        self.touch_rooms(messages).await
    }

    async fn stored_in(
        &self,
        ranges: &[(ObjectId, u64, u64)],
        ids: &[ObjectId],
    ) -> Result<Vec<StoredSeq>, StoreError> {
        if ranges.is_empty() && ids.is_empty() {
            return Ok(Vec::new());
        }
        let number = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
        let mut any: Vec<Document> = ranges
            .iter()
            .map(|(room, first, last)| {
                doc! { "roomId": room, "seq": { "$gte": number(*first), "$lte": number(*last) } }
            })
            .collect();
        if !ids.is_empty() {
            any.push(doc! { "_id": { "$in": ids } });
        }
        let docs: Vec<Document> = self
            .messages
            .clone_with_type::<Document>()
            .find(doc! { "$or": any })
            .projection(doc! { "_id": 1, "roomId": 1, "seq": 1 })
            .await?
            .try_collect()
            .await?;
        Ok(docs
            .iter()
            .filter_map(|d| {
                Some(StoredSeq {
                    id: d.get_object_id("_id").ok()?,
                    room: d.get_object_id("roomId").ok()?,
                    seq: u64::try_from(d.get_i64("seq").ok()?).ok()?,
                })
            })
            .collect())
    }

    async fn messages(
        &self,
        room: ObjectId,
        before: Option<ObjectId>,
        limit: u32,
    ) -> Result<Vec<ChatMessage>, StoreError> {
        // Chat messages only: server events are listed by `messages_after` alone.
        let mut filter = doc! { "roomId": room, "event": { "$exists": false } };
        if let Some(before) = before {
            let anchor = self
                .messages
                .clone_with_type::<Document>()
                .find_one(doc! { "_id": before, "roomId": room })
                .projection(doc! { "seq": 1 })
                .await?;
            match anchor.and_then(|d| d.get_i64("seq").ok()) {
                Some(seq) => filter.insert("seq", doc! { "$lt": seq }),
                // Not stored (yet): ids still order messages roughly by time.
                None => filter.insert("_id", doc! { "$lt": before }),
            };
        }
        let docs: Vec<MessageDoc> = self
            .messages
            .find(filter)
            .sort(doc! { "seq": -1, "_id": -1 })
            .limit(i64::from(limit))
            .await?
            .try_collect()
            .await?;
        Ok(docs.into_iter().map(ChatMessage::from).collect())
    }

    async fn messages_after(
        &self,
        room: ObjectId,
        after_seq: u64,
        limit: u32,
    ) -> Result<Vec<ChatMessage>, StoreError> {
        let after = i64::try_from(after_seq).unwrap_or(i64::MAX);
        let docs: Vec<MessageDoc> = self
            .messages
            .find(doc! { "roomId": room, "seq": { "$gt": after } })
            .sort(doc! { "seq": 1, "_id": 1 })
            .limit(i64::from(limit))
            .await?
            .try_collect()
            .await?;
        Ok(docs.into_iter().map(ChatMessage::from).collect())
    }

    async fn latest_seq(&self, room: ObjectId) -> Result<u64, StoreError> {
        let latest = self
            .messages
            .clone_with_type::<Document>()
            .find_one(doc! { "roomId": room })
            .sort(doc! { "seq": -1 })
            .projection(doc! { "seq": 1 })
            .await?;
        Ok(latest
            .and_then(|d| d.get_i64("seq").ok())
            .and_then(|s| u64::try_from(s).ok())
            .unwrap_or(0))
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.db.run_command(doc! { "ping": 1 }).await?;
        Ok(())
    }

    /// Shuts the driver down explicitly. Left to `Drop`, it ends its sessions from a task it
    /// spawns while the runtime is stopping, and panics when the pool is already gone.
    async fn close(&self) {
        let shutdown = self.db.client().clone().shutdown().immediate(true);
        if tokio::time::timeout(Duration::from_secs(5), shutdown)
            .await
            .is_err()
        {
            tracing::warn!("MongoDB client did not shut down within 5 s");
        }
    }
}

const _: fn() = || {
    fn store<T: Store>() {}
    store::<MongoStore>();
};

pub(crate) mod oid_hex_vec {
    use mongodb::bson::oid::ObjectId;
    use serde::{Deserialize, Deserializer, Serializer, de::Error, ser::SerializeSeq};

    pub fn serialize<S: Serializer>(ids: &[ObjectId], s: S) -> Result<S::Ok, S::Error> {
        let mut seq = s.serialize_seq(Some(ids.len()))?;
        for id in ids {
            seq.serialize_element(&id.to_hex())?;
        }
        seq.end()
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<ObjectId>, D::Error> {
        Vec::<String>::deserialize(d)?
            .iter()
            .map(|s| ObjectId::parse_str(s).map_err(D::Error::custom))
            .collect()
    }
}

mod opt_rfc3339_millis {
    use chrono::{DateTime, Utc};
    use serde::{Deserialize, Deserializer, Serializer, de::Error};

    pub fn serialize<S: Serializer>(t: &Option<DateTime<Utc>>, s: S) -> Result<S::Ok, S::Error> {
        match t {
            Some(t) => s.serialize_str(&crate::wire::format_time(t)),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<DateTime<Utc>>, D::Error> {
        Option::<String>::deserialize(d)?
            .map(|raw| {
                DateTime::parse_from_rfc3339(&raw)
                    .map(|t| t.with_timezone(&Utc))
                    .map_err(D::Error::custom)
            })
            .transpose()
    }
}
