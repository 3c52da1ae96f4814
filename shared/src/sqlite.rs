//! The embedded store: users, rooms and messages in one SQLite file, for the single-process
//! mode. Same contract as [`crate::store::MongoStore`]; queries run on tokio's blocking pool.
//!
//! Durability: write-ahead log with `synchronous = NORMAL`, so a committed write survives
//! a crash of the process (a power cut may lose the last moments).

use crate::store::{Room, SequencedMessage, Store, StoreError, StoredSeq, User, UserCredentials};
use crate::wire::{ChatMessage, SERVER_SENDER, Sender, ServerEvent};
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use mongodb::bson::oid::ObjectId;
use rusqlite::{Connection, OptionalExtension, params};
use std::path::Path;
use std::sync::{Arc, Mutex};

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        match e {
            rusqlite::Error::SqliteFailure(f, _)
                if f.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_UNIQUE
                    || f.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_PRIMARYKEY =>
            {
                StoreError::Conflict
            }
            other => StoreError::Unavailable(other.to_string()),
        }
    }
}

const SCHEMA: &str = r#"
PRAGMA journal_mode = WAL;
PRAGMA synchronous = NORMAL;
PRAGMA foreign_keys = ON;
CREATE TABLE IF NOT EXISTS users (
    id TEXT PRIMARY KEY,
    email TEXT NOT NULL UNIQUE,
    display_name TEXT NOT NULL,
    password_hash TEXT NOT NULL,
    created_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS rooms (
    id TEXT PRIMARY KEY,
    name TEXT,
    created_at INTEGER NOT NULL,
    last_message_at INTEGER,
    active_at INTEGER NOT NULL,
    owner_id TEXT
);
-- Participants keep the order they were added in (rowid order).
CREATE TABLE IF NOT EXISTS room_participants (
    room_id TEXT NOT NULL REFERENCES rooms(id),
    user_id TEXT NOT NULL,
    PRIMARY KEY (room_id, user_id)
);
CREATE INDEX IF NOT EXISTS room_participants_user ON room_participants(user_id);
"#;

/// The items of rooms' sequences: chat messages (a sender and content) and server events (an
/// event name and its data as JSON text), one kind per row.
const MESSAGE_COLUMNS: &str = "
    id TEXT PRIMARY KEY,
    room_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    sender_id TEXT,
    sender_email TEXT,
    sender_name TEXT,
    content TEXT,
    created_at INTEGER NOT NULL,
    event TEXT,
    data TEXT,
    CHECK ((event IS NULL) = (sender_id IS NOT NULL AND content IS NOT NULL))
";

/// Databases written before server events had a sender and content in every row (NOT NULL):
/// the table is made again with the columns above, keeping every row.
fn allow_server_events(conn: &mut Connection) -> Result<(), StoreError> {
    let has_event: bool = conn.query_row(
        "SELECT COUNT(*) > 0 FROM pragma_table_info('messages') WHERE name = 'event'",
        [],
        |r| r.get(0),
    )?;
    if has_event {
        return Ok(());
    }
    let tx = conn.transaction()?;
    tx.execute_batch(&format!(
        "CREATE TABLE messages_items ({MESSAGE_COLUMNS});
         INSERT INTO messages_items
            (id, room_id, seq, sender_id, sender_email, sender_name, content, created_at)
            SELECT id, room_id, seq, sender_id, sender_email, sender_name, content, created_at
            FROM messages;
         DROP TABLE messages;
         ALTER TABLE messages_items RENAME TO messages;"
    ))?;
    tx.commit()?;
    tracing::info!("store: the messages table can now hold server events");
    Ok(())
}

/// A room's numbers are unique. Databases written before they were may hold one number twice
/// in a room; [`renumber_duplicates`] runs first there.
const UNIQUE_SEQS: &str = "
DROP INDEX IF EXISTS messages_room_seq;
CREATE UNIQUE INDEX IF NOT EXISTS messages_room_seq_unique ON messages(room_id, seq);
";

/// The history listing reads chat messages only: this index holds nothing else, so a room
/// with many server events is not walked through them.
const CHAT_INDEX: &str =
    "CREATE INDEX IF NOT EXISTS messages_chat ON messages(room_id, seq) WHERE event IS NULL;";

/// The SQLite store.
#[derive(Clone)]
pub struct SqliteStore {
    conn: Arc<Mutex<Connection>>,
}

fn oid(raw: &str) -> rusqlite::Result<ObjectId> {
    ObjectId::parse_str(raw).map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, Box::new(e))
    })
}

fn time(ms: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(ms).unwrap_or_default()
}

impl SqliteStore {
    /// Opens (creating when missing) the database file at `path`.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let conn = Connection::open(path)?;
        conn.execute_batch(SCHEMA)?;
        conn.execute_batch(&format!(
            "CREATE TABLE IF NOT EXISTS messages ({MESSAGE_COLUMNS});"
        ))?;
        // Databases created before rooms had owners lack the column.
        let has_owner: bool = conn.query_row(
            "SELECT COUNT(*) > 0 FROM pragma_table_info('rooms') WHERE name = 'owner_id'",
            [],
            |r| r.get(0),
        )?;
        if !has_owner {
            conn.execute_batch("ALTER TABLE rooms ADD COLUMN owner_id TEXT")?;
        }
        let mut conn = conn;
        allow_server_events(&mut conn)?;
        let has_unique: bool = conn.query_row(
            "SELECT COUNT(*) > 0 FROM sqlite_master WHERE type = 'index' AND name = 'messages_room_seq_unique'",
            [],
            |r| r.get(0),
        )?;
        if !has_unique {
            let tx = conn.transaction()?;
            renumber_duplicates(&tx)?;
            tx.execute_batch(UNIQUE_SEQS)?;
            tx.commit()?;
        }
        conn.execute_batch(CHAT_INDEX)?;
        Ok(Self {
            conn: Arc::new(Mutex::new(conn)),
        })
    }

    /// Runs `f` with the connection on the blocking pool.
    async fn with<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let conn = self.conn.clone();
        tokio::task::spawn_blocking(move || {
            let mut conn = conn
                .lock()
                .map_err(|_| StoreError::Unavailable("store lock poisoned".into()))?;
            f(&mut conn)
        })
        .await
        .map_err(|e| StoreError::Unavailable(e.to_string()))?
    }
}

fn load_room(conn: &Connection, id: ObjectId) -> Result<Option<Room>, StoreError> {
    let hex = id.to_hex();
    let row = conn
        .query_row(
            "SELECT name, created_at, last_message_at, owner_id FROM rooms WHERE id = ?1",
            params![hex],
            |r| {
                Ok((
                    r.get::<_, Option<String>>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, Option<i64>>(2)?,
                    r.get::<_, Option<String>>(3)?,
                ))
            },
        )
        .optional()?;
    let Some((name, created_at, last_message_at, owner)) = row else {
        return Ok(None);
    };
    let mut stmt = conn.prepare_cached(
        "SELECT user_id FROM room_participants WHERE room_id = ?1 ORDER BY rowid",
    )?;
    let participants = stmt
        .query_map(params![hex], |r| oid(&r.get::<_, String>(0)?))?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    Ok(Some(Room {
        id,
        name,
        owner_id: owner.as_deref().map(oid).transpose()?,
        participants,
        created_at: time(created_at),
        last_message_at: last_message_at.map(time),
    }))
}

/// In every room that holds one number twice, numbers the messages from the first such
/// number on again, one after the other in their stored order (number, then id).
fn renumber_duplicates(c: &Connection) -> Result<(), StoreError> {
    let mut first = c.prepare(
        "SELECT room_id, MIN(seq) FROM (SELECT room_id, seq FROM messages
         GROUP BY room_id, seq HAVING COUNT(*) > 1) GROUP BY room_id",
    )?;
    let rooms = first
        .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    for (room, from) in rooms {
        let mut list =
            c.prepare("SELECT id FROM messages WHERE room_id = ?1 AND seq >= ?2 ORDER BY seq, id")?;
        let ids = list
            .query_map(params![room, from], |r| r.get::<_, String>(0))?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        let mut set = c.prepare("UPDATE messages SET seq = ?2 WHERE id = ?1")?;
        for (next, id) in (from..).zip(&ids) {
            set.execute(params![id, next])?;
        }
        tracing::warn!(room_id = %room, from, messages = ids.len(), "a room held a sequence number twice: numbered its messages again");
    }
    Ok(())
}

/// The columns [`message_row`] reads, in its order.
const ROW: &str =
    "id, room_id, sender_id, sender_email, sender_name, content, created_at, seq, event, data";

fn message_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<ChatMessage> {
    let event: Option<String> = r.get(8)?;
    let server_event = match event {
        None => None,
        Some(event) => {
            let data: String = r.get(9)?;
            let data = serde_json::from_str(&data).map_err(|e| {
                rusqlite::Error::FromSqlConversionFailure(
                    9,
                    rusqlite::types::Type::Text,
                    Box::new(e),
                )
            })?;
            Some(ServerEvent { event, data })
        }
    };
    let sender_id: Option<String> = r.get(2)?;
    Ok(ChatMessage {
        id: oid(&r.get::<_, String>(0)?)?,
        room_id: oid(&r.get::<_, String>(1)?)?,
        sender: Sender {
            id: sender_id
                .as_deref()
                .map(oid)
                .transpose()?
                .unwrap_or(SERVER_SENDER),
            email: r.get(3)?,
            display_name: r.get(4)?,
        },
        content: r.get::<_, Option<String>>(5)?.unwrap_or_default(),
        created_at: time(r.get(6)?),
        seq: u64::try_from(r.get::<_, i64>(7)?).ok(),
        server_event,
    })
}

#[async_trait]
impl Store for SqliteStore {
    async fn create_user(
        &self,
        email: &str,
        display_name: &str,
        password_hash: &str,
    ) -> Result<User, StoreError> {
        let user = User {
            id: ObjectId::new(),
            email: email.to_owned(),
            display_name: display_name.to_owned(),
        };
        let (u, hash) = (user.clone(), password_hash.to_owned());
        self.with(move |c| {
            c.execute(
                "INSERT INTO users (id, email, display_name, password_hash, created_at) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![u.id.to_hex(), u.email, u.display_name, hash, Utc::now().timestamp_millis()],
            )?;
            Ok(())
        })
        .await?;
        Ok(user)
    }

    async fn user_credentials(&self, email: &str) -> Result<Option<UserCredentials>, StoreError> {
        let email = email.to_owned();
        self.with(move |c| {
            c.query_row(
                "SELECT id, email, display_name, password_hash FROM users WHERE email = ?1",
                params![email],
                |r| {
                    Ok(UserCredentials {
                        user: User {
                            id: oid(&r.get::<_, String>(0)?)?,
                            email: r.get(1)?,
                            display_name: r.get(2)?,
                        },
                        password_hash: r.get(3)?,
                    })
                },
            )
            .optional()
            .map_err(StoreError::from)
        })
        .await
    }

    async fn user(&self, id: ObjectId) -> Result<Option<User>, StoreError> {
        self.with(move |c| {
            c.query_row(
                "SELECT email, display_name FROM users WHERE id = ?1",
                params![id.to_hex()],
                |r| {
                    Ok(User {
                        id,
                        email: r.get(0)?,
                        display_name: r.get(1)?,
                    })
                },
            )
            .optional()
            .map_err(StoreError::from)
        })
        .await
    }

    async fn missing_users(&self, ids: &[ObjectId]) -> Result<Vec<ObjectId>, StoreError> {
        let ids = ids.to_vec();
        self.with(move |c| {
            let mut stmt = c.prepare_cached("SELECT 1 FROM users WHERE id = ?1")?;
            let mut missing = Vec::new();
            for id in ids {
                if !stmt.exists(params![id.to_hex()])? {
                    missing.push(id);
                }
            }
            Ok(missing)
        })
        .await
    }

    async fn create_room(
        &self,
        name: Option<String>,
        participants: Vec<ObjectId>,
    ) -> Result<Room, StoreError> {
        let id = ObjectId::new();
        let now = crate::wire::now_millis().timestamp_millis();
        self.with(move |c| {
            let tx = c.transaction()?;
            tx.execute(
                "INSERT INTO rooms (id, name, created_at, active_at, owner_id) VALUES (?1, ?2, ?3, ?3, ?4)",
                params![id.to_hex(), name, now, participants.first().map(|o| o.to_hex())],
            )?;
            for user in &participants {
                tx.execute(
                    "INSERT OR IGNORE INTO room_participants (room_id, user_id) VALUES (?1, ?2)",
                    params![id.to_hex(), user.to_hex()],
                )?;
            }
            let room = load_room(&tx, id)?;
            tx.commit()?;
            room.ok_or_else(|| StoreError::Unavailable("room vanished".into()))
        })
        .await
    }

    async fn room(&self, id: ObjectId) -> Result<Option<Room>, StoreError> {
        self.with(move |c| load_room(c, id)).await
    }

    async fn rooms_of(
        &self,
        user: ObjectId,
        before: Option<ObjectId>,
        limit: u32,
    ) -> Result<Vec<Room>, StoreError> {
        self.with(move |c| {
            let user = user.to_hex();
            let ids = match before {
                None => {
                    let mut stmt = c.prepare_cached(
                        "SELECT r.id FROM rooms r JOIN room_participants p ON p.room_id = r.id
                         WHERE p.user_id = ?1 ORDER BY r.active_at DESC, r.id DESC LIMIT ?2",
                    )?;
                    stmt.query_map(params![user, limit], |r| oid(&r.get::<_, String>(0)?))?
                        .collect::<rusqlite::Result<Vec<_>>>()?
                }
                Some(before) => {
                    let mut stmt = c.prepare_cached(
                        "SELECT r.id FROM rooms r JOIN room_participants p ON p.room_id = r.id
                         JOIN rooms a ON a.id = ?2
                         JOIN room_participants ap ON ap.room_id = a.id AND ap.user_id = ?1
                         WHERE p.user_id = ?1
                           AND (r.active_at < a.active_at OR (r.active_at = a.active_at AND r.id < a.id))
                         ORDER BY r.active_at DESC, r.id DESC LIMIT ?3",
                    )?;
                    stmt.query_map(params![user, before.to_hex(), limit], |r| {
                        oid(&r.get::<_, String>(0)?)
                    })?
                    .collect::<rusqlite::Result<Vec<_>>>()?
                }
            };
            ids.into_iter()
                .filter_map(|id| load_room(c, id).transpose())
                .collect()
        })
        .await
    }

    async fn share_a_room(&self, a: ObjectId, b: ObjectId) -> Result<bool, StoreError> {
        self.with(move |c| {
            let mut stmt = c.prepare_cached(
                "SELECT 1 FROM room_participants x JOIN room_participants y ON x.room_id = y.room_id
                 WHERE x.user_id = ?1 AND y.user_id = ?2 LIMIT 1",
            )?;
            Ok(stmt.exists(params![a.to_hex(), b.to_hex()])?)
        })
        .await
    }

    async fn remove_participant(
        &self,
        room: ObjectId,
        user: ObjectId,
    ) -> Result<Option<Room>, StoreError> {
        self.with(move |c| {
            c.execute(
                "DELETE FROM room_participants WHERE room_id = ?1 AND user_id = ?2",
                params![room.to_hex(), user.to_hex()],
            )?;
            load_room(c, room)
        })
        .await
    }

    async fn add_participant(
        &self,
        room: ObjectId,
        user: ObjectId,
        max: usize,
    ) -> Result<Option<Room>, StoreError> {
        self.with(move |c| {
            let tx = c.transaction()?;
            let Some(current) = load_room(&tx, room)? else {
                return Ok(None);
            };
            if !current.has_participant(&user) && current.participants.len() >= max {
                return Err(StoreError::Full);
            }
            tx.execute(
                "INSERT OR IGNORE INTO room_participants (room_id, user_id) VALUES (?1, ?2)",
                params![room.to_hex(), user.to_hex()],
            )?;
            let updated = load_room(&tx, room)?;
            tx.commit()?;
            Ok(updated)
        })
        .await
    }

    async fn insert_messages(&self, messages: &[SequencedMessage]) -> Result<(), StoreError> {
        if messages.is_empty() {
            return Ok(());
        }
        let messages = messages.to_vec();
        self.with(move |c| {
            let tx = c.transaction()?;
            let mut refused = None;
            {
                // A redelivered id is already stored: that counts as stored. A number held
                // by another message of the room is refused by the unique index.
                let mut insert = tx.prepare_cached(
                    "INSERT INTO messages
                     (id, room_id, seq, sender_id, sender_email, sender_name, content, created_at,
                      event, data)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10) ON CONFLICT(id) DO NOTHING",
                )?;
                let mut touch = tx.prepare_cached(
                    "UPDATE rooms SET last_message_at = max(coalesce(last_message_at, 0), ?2),
                     active_at = max(active_at, ?2) WHERE id = ?1",
                )?;
                for (index, SequencedMessage { seq, message: m }) in messages.iter().enumerate() {
                    let at = m.created_at.timestamp_millis();
                    // A chat message has a sender and content; a server event, its name and data.
                    let (sender, content) = match m.server_event {
                        Some(_) => (None, None),
                        None => (Some(m.sender.id.to_hex()), Some(&m.content)),
                    };
                    let event = m.server_event.as_ref();
                    let inserted = insert.execute(params![
                        m.id.to_hex(),
                        m.room_id.to_hex(),
                        seq,
                        sender,
                        m.sender.email,
                        m.sender.display_name,
                        content,
                        at,
                        event.map(|e| &e.event),
                        event.map(|e| serde_json::Value::Object(e.data.clone()).to_string()),
                    ]);
                    match inserted.map_err(StoreError::from) {
                        Ok(_) => {}
                        Err(StoreError::Conflict) => {
                            refused = Some(StoreError::SeqTaken {
                                stored: index,
                                room: m.room_id,
                                seq: *seq,
                            });
                            break;
                        }
                        Err(other) => return Err(other),
                    }
                    touch.execute(params![m.room_id.to_hex(), at])?;
                }
            }
            // What came before a refused message is stored, as the contract says.
            tx.commit()?;
            refused.map_or(Ok(()), Err)
        })
        .await
    }

    async fn stored_in(
        &self,
        ranges: &[(ObjectId, u64, u64)],
        ids: &[ObjectId],
    ) -> Result<Vec<StoredSeq>, StoreError> {
        let (ranges, ids) = (ranges.to_vec(), ids.to_vec());
        self.with(move |c| {
            let mut s = c.prepare_cached(
                "SELECT id, seq FROM messages WHERE room_id = ?1 AND seq >= ?2 AND seq <= ?3",
            )?;
            let mut found = Vec::new();
            for (room, first, last) in ranges {
                let number = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
                let rows = s
                    .query_map(params![room.to_hex(), number(first), number(last)], |r| {
                        Ok(StoredSeq {
                            room,
                            id: oid(&r.get::<_, String>(0)?)?,
                            seq: u64::try_from(r.get::<_, i64>(1)?).unwrap_or(0),
                        })
                    })?
                    .collect::<rusqlite::Result<Vec<_>>>()?;
                found.extend(rows);
            }
            let mut by_id = c.prepare_cached("SELECT room_id, seq FROM messages WHERE id = ?1")?;
            for id in ids {
                let row = by_id
                    .query_row(params![id.to_hex()], |r| {
                        Ok(StoredSeq {
                            room: oid(&r.get::<_, String>(0)?)?,
                            id,
                            seq: u64::try_from(r.get::<_, i64>(1)?).unwrap_or(0),
                        })
                    })
                    .optional()?;
                found.extend(row.filter(|r| !found.contains(r)));
            }
            Ok(found)
        })
        .await
    }

    async fn messages(
        &self,
        room: ObjectId,
        before: Option<ObjectId>,
        limit: u32,
    ) -> Result<Vec<ChatMessage>, StoreError> {
        self.with(move |c| {
            // Chat messages only: server events are listed by `messages_after` alone.
            let room_hex = room.to_hex();
            let anchor: Option<i64> = match before {
                Some(b) => c
                    .query_row(
                        "SELECT seq FROM messages WHERE id = ?1 AND room_id = ?2",
                        params![b.to_hex(), room_hex],
                        |r| r.get(0),
                    )
                    .optional()?,
                None => None,
            };
            let rows = match (before, anchor) {
                (None, _) => {
                    let mut s = c.prepare_cached(&format!(
                        "SELECT {ROW} FROM messages WHERE event IS NULL AND room_id = ?1 ORDER BY seq DESC, id DESC LIMIT ?2"
                    ))?;
                    s.query_map(params![room_hex, limit], message_row)?
                        .collect::<rusqlite::Result<Vec<_>>>()?
                }
                (Some(_), Some(seq)) => {
                    let mut s = c.prepare_cached(&format!(
                        "SELECT {ROW} FROM messages WHERE event IS NULL AND room_id = ?1 AND seq < ?2 ORDER BY seq DESC, id DESC LIMIT ?3"
                    ))?;
                    s.query_map(params![room_hex, seq, limit], message_row)?
                        .collect::<rusqlite::Result<Vec<_>>>()?
                }
                // Not stored (yet): ids still order messages roughly by time.
                (Some(b), None) => {
                    let mut s = c.prepare_cached(&format!(
                        "SELECT {ROW} FROM messages WHERE event IS NULL AND room_id = ?1 AND id < ?2 ORDER BY seq DESC, id DESC LIMIT ?3"
                    ))?;
                    s.query_map(params![room_hex, b.to_hex(), limit], message_row)?
                        .collect::<rusqlite::Result<Vec<_>>>()?
                }
            };
            Ok(rows)
        })
        .await
    }

    async fn messages_after(
        &self,
        room: ObjectId,
        after_seq: u64,
        limit: u32,
    ) -> Result<Vec<ChatMessage>, StoreError> {
        let after = i64::try_from(after_seq).unwrap_or(i64::MAX);
        self.with(move |c| {
            let mut s = c.prepare_cached(&format!(
                "SELECT {ROW} FROM messages WHERE room_id = ?1 AND seq > ?2 ORDER BY seq ASC, id ASC LIMIT ?3"
            ))?;
            let rows = s
                .query_map(params![room.to_hex(), after, limit], message_row)?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            Ok(rows)
        })
        .await
    }

    async fn latest_seq(&self, room: ObjectId) -> Result<u64, StoreError> {
        self.with(move |c| {
            let latest: Option<i64> = c.query_row(
                "SELECT MAX(seq) FROM messages WHERE room_id = ?1",
                params![room.to_hex()],
                |r| r.get(0),
            )?;
            Ok(latest.and_then(|s| u64::try_from(s).ok()).unwrap_or(0))
        })
        .await
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.with(|c| {
            c.query_row("SELECT 1", [], |_| Ok(()))?;
            Ok(())
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(room: ObjectId, content: &str) -> ChatMessage {
        ChatMessage {
            id: ObjectId::new(),
            room_id: room,
            sender: Sender {
                id: ObjectId::new(),
                email: Some("a@example.com".into()),
                display_name: Some("A".into()),
            },
            content: content.into(),
            created_at: crate::wire::now_millis(),
            seq: None,
            server_event: None,
        }
    }

    #[tokio::test]
    async fn users_rooms_and_messages_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("chat.db");
        let store = SqliteStore::open(&path).unwrap();
        let ann = store
            .create_user("ann@example.com", "Ann", "h")
            .await
            .unwrap();
        assert!(matches!(
            store.create_user("ann@example.com", "Ann", "h").await,
            Err(StoreError::Conflict)
        ));
        let bob = store
            .create_user("bob@example.com", "Bob", "h")
            .await
            .unwrap();
        let room = store
            .create_room(Some("r".into()), vec![ann.id, bob.id])
            .await
            .unwrap();
        assert_eq!(room.participants, vec![ann.id, bob.id]);
        let batch: Vec<SequencedMessage> = (0..5)
            .map(|i| SequencedMessage {
                seq: i,
                message: message(room.id, &format!("m{i}")),
            })
            .collect();
        store.insert_messages(&batch).await.unwrap();
        // Redelivery stores nothing twice.
        store.insert_messages(&batch[3..]).await.unwrap();
        drop(store);

        let store = SqliteStore::open(&path).unwrap();
        let newest: Vec<String> = store
            .messages(room.id, None, 2)
            .await
            .unwrap()
            .into_iter()
            .map(|m| m.content)
            .collect();
        assert_eq!(newest, ["m4", "m3"]);
        let older = store
            .messages(room.id, Some(batch[3].message.id), 50)
            .await
            .unwrap();
        assert_eq!(older.len(), 3);
        assert_eq!(
            store.rooms_of(bob.id, None, 10).await.unwrap()[0].id,
            room.id
        );
        assert!(
            store.rooms_of(bob.id, None, 10).await.unwrap()[0]
                .last_message_at
                .is_some()
        );
        let after = store
            .remove_participant(room.id, bob.id)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(after.participants, vec![ann.id]);
        assert!(
            store
                .add_participant(ObjectId::new(), bob.id, 10)
                .await
                .unwrap()
                .is_none()
        );
        assert_eq!(
            store
                .missing_users(&[ann.id, bob.id, room.id])
                .await
                .unwrap(),
            vec![room.id]
        );
        let creds = store
            .user_credentials("ann@example.com")
            .await
            .unwrap()
            .unwrap();
        assert_eq!(creds.user, ann);
    }

    #[tokio::test]
    async fn numbers_are_unique_and_an_older_database_is_numbered_again() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("chat.db");
        let room = ObjectId::new();
        // As an older release left it: a number held twice in a room.
        let ids: Vec<ObjectId> = (0..4).map(|_| ObjectId::new()).collect();
        {
            let c = Connection::open(&path).unwrap();
            c.execute_batch(SCHEMA).unwrap();
            // The messages table as it was before server events: every column NOT NULL.
            c.execute_batch(
                "CREATE TABLE messages (id TEXT PRIMARY KEY, room_id TEXT NOT NULL,
                 seq INTEGER NOT NULL, sender_id TEXT NOT NULL, sender_email TEXT,
                 sender_name TEXT, content TEXT NOT NULL, created_at INTEGER NOT NULL)",
            )
            .unwrap();
            c.execute_batch("CREATE INDEX messages_room_seq ON messages(room_id, seq DESC)")
                .unwrap();
            for (id, seq) in ids.iter().zip([1, 2, 2, 3]) {
                c.execute(
                    "INSERT INTO messages (id, room_id, seq, sender_id, content, created_at)
                     VALUES (?1, ?2, ?3, ?4, 'x', 0)",
                    params![id.to_hex(), room.to_hex(), seq, ObjectId::new().to_hex()],
                )
                .unwrap();
            }
        }
        let store = SqliteStore::open(&path).unwrap();
        let numbers: Vec<(ObjectId, u64)> = store
            .messages_after(room, 0, 10)
            .await
            .unwrap()
            .into_iter()
            .map(|m| (m.id, m.seq.unwrap()))
            .collect();
        assert_eq!(
            numbers,
            [(ids[0], 1), (ids[1], 2), (ids[2], 3), (ids[3], 4)]
        );
        // From now on a taken number is refused, and the insert stops there.
        let batch: Vec<SequencedMessage> = [(5, "five"), (4, "taken"), (6, "six")]
            .into_iter()
            .map(|(seq, c)| SequencedMessage {
                seq,
                message: message(room, c),
            })
            .collect();
        let refused = store.insert_messages(&batch).await;
        assert!(
            matches!(
                refused,
                Err(StoreError::SeqTaken {
                    stored: 1,
                    seq: 4,
                    ..
                })
            ),
            "{refused:?}"
        );
        assert_eq!(store.latest_seq(room).await.unwrap(), 5);
        // A stored id counts as stored, whatever its number.
        let copy = SequencedMessage {
            seq: 9,
            ..batch[0].clone()
        };
        store.insert_messages(&[copy]).await.unwrap();
        let found = store.stored_in(&[(room, 5, 9)], &[]).await.unwrap();
        assert_eq!(found.len(), 1);
        assert_eq!((found[0].id, found[0].seq), (batch[0].message.id, 5));
        // The old table now takes server events: listed in the sequence, not in the history.
        let mut event = ChatMessage::server(
            room,
            crate::wire::ServerEvent {
                event: "file_uploaded".into(),
                data: serde_json::json!({ "fileId": "f1" })
                    .as_object()
                    .unwrap()
                    .clone(),
            },
        );
        event.seq = Some(6);
        store
            .insert_messages(&[SequencedMessage {
                seq: 6,
                message: event.clone(),
            }])
            .await
            .unwrap();
        let items = store.messages_after(room, 5, 10).await.unwrap();
        assert_eq!(items, [event]);
        let history = store.messages(room, None, 10).await.unwrap();
        assert!(history.iter().all(|m| m.server_event.is_none()));
        assert_eq!(history.len(), 5);
        drop(store);
        // Opened again: nothing to do.
        SqliteStore::open(&path).unwrap();
    }
}
