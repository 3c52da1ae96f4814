//! What the unit tests of the fan-out share: a real store (SQLite in a temporary directory)
//! that counts and can refuse reads, and a Socket.IO server whose sockets carry a session
//! as the gateway's do.

use crate::delivery::NAMESPACE;
use crate::drain::Drain;
use crate::limits::{Limits, Rate, UserLimiter};
use crate::socket::session::Session;
use async_trait::async_trait;
use shared::ObjectId;
use shared::jwt::AuthUser;
use shared::sqlite::SqliteStore;
use shared::store::{Room, SequencedMessage, Store, StoreError, StoredSeq, User, UserCredentials};
use shared::wire::ChatMessage;
use socketioxide::SocketIo;
use socketioxide::extract::{Data, SocketRef};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

/// The SQLite store, with the reads the feeds make (latest number, messages after a number,
/// the room) counted, delayed by `delay`, and refused while `refuse` is set.
pub struct ProbedStore {
    inner: SqliteStore,
    _dir: tempfile::TempDir,
    pub delay: Duration,
    pub refuse: AtomicBool,
    pub reads: AtomicUsize,
    in_flight: AtomicUsize,
    pub most_in_flight: AtomicUsize,
}

impl ProbedStore {
    pub fn new(delay: Duration) -> Arc<Self> {
        let dir = tempfile::tempdir().expect("temporary directory");
        let inner = SqliteStore::open(&dir.path().join("chat.sqlite3")).expect("store");
        Arc::new(Self {
            inner,
            _dir: dir,
            delay,
            refuse: AtomicBool::new(false),
            reads: AtomicUsize::new(0),
            in_flight: AtomicUsize::new(0),
            most_in_flight: AtomicUsize::new(0),
        })
    }

    async fn probe(&self) -> Result<(), StoreError> {
        let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        self.most_in_flight.fetch_max(now, Ordering::SeqCst);
        tokio::time::sleep(self.delay).await;
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
        self.reads.fetch_add(1, Ordering::SeqCst);
        if self.refuse.load(Ordering::SeqCst) {
            return Err(StoreError::Unavailable("refused by the test".into()));
        }
        Ok(())
    }
}

#[async_trait]
impl Store for ProbedStore {
    async fn create_user(&self, e: &str, n: &str, h: &str) -> Result<User, StoreError> {
        self.inner.create_user(e, n, h).await
    }
    async fn user_credentials(&self, e: &str) -> Result<Option<UserCredentials>, StoreError> {
        self.inner.user_credentials(e).await
    }
    async fn user(&self, id: ObjectId) -> Result<Option<User>, StoreError> {
        self.inner.user(id).await
    }
    async fn missing_users(&self, ids: &[ObjectId]) -> Result<Vec<ObjectId>, StoreError> {
        self.inner.missing_users(ids).await
    }
    async fn create_room(
        &self,
        name: Option<String>,
        participants: Vec<ObjectId>,
    ) -> Result<Room, StoreError> {
        self.inner.create_room(name, participants).await
    }
    async fn room(&self, id: ObjectId) -> Result<Option<Room>, StoreError> {
        self.probe().await?;
        self.inner.room(id).await
    }
    async fn rooms_of(
        &self,
        user: ObjectId,
        before: Option<ObjectId>,
        limit: u32,
    ) -> Result<Vec<Room>, StoreError> {
        self.inner.rooms_of(user, before, limit).await
    }
    async fn share_a_room(&self, a: ObjectId, b: ObjectId) -> Result<bool, StoreError> {
        self.inner.share_a_room(a, b).await
    }
    async fn remove_participant(
        &self,
        room: ObjectId,
        user: ObjectId,
    ) -> Result<Option<Room>, StoreError> {
        self.inner.remove_participant(room, user).await
    }
    async fn add_participant(
        &self,
        room: ObjectId,
        user: ObjectId,
        max: usize,
    ) -> Result<Option<Room>, StoreError> {
        self.inner.add_participant(room, user, max).await
    }
    async fn insert_messages(&self, messages: &[SequencedMessage]) -> Result<(), StoreError> {
        self.inner.insert_messages(messages).await
    }
    async fn stored_in(
        &self,
        ranges: &[(ObjectId, u64, u64)],
        ids: &[ObjectId],
    ) -> Result<Vec<StoredSeq>, StoreError> {
        self.inner.stored_in(ranges, ids).await
    }
    async fn messages(
        &self,
        room: ObjectId,
        before: Option<ObjectId>,
        limit: u32,
    ) -> Result<Vec<ChatMessage>, StoreError> {
        self.inner.messages(room, before, limit).await
    }
    async fn messages_after(
        &self,
        room: ObjectId,
        after: u64,
        limit: u32,
    ) -> Result<Vec<ChatMessage>, StoreError> {
        self.probe().await?;
        self.inner.messages_after(room, after, limit).await
    }
    async fn latest_seq(&self, room: ObjectId) -> Result<u64, StoreError> {
        self.probe().await?;
        self.inner.latest_seq(room).await
    }
    async fn ping(&self) -> Result<(), StoreError> {
        Ok(())
    }
}

/// A Socket.IO server with outgoing buffers of `buffer` packets, whose `/chat` sockets get
/// a session for the user id given as their auth data.
pub fn server(buffer: usize) -> SocketIo {
    let (_layer, io) = SocketIo::builder().max_buffer_size(buffer).build_layer();
    io.ns(NAMESPACE, async |s: SocketRef, Data(user): Data<String>| {
        let user = AuthUser {
            id: ObjectId::parse_str(&user).expect("a user id as auth data"),
            email: None,
            display_name: None,
            exp: i64::MAX,
        };
        let limits = Arc::new(Limits {
            events: UserLimiter::new(Rate {
                per_second: 100.0,
                burst: 100.0,
            }),
            joins: UserLimiter::new(Rate {
                per_second: 100.0,
                burst: 100.0,
            }),
            disconnect_after: 100,
        });
        let session = Session::new(
            user,
            Duration::from_secs(30),
            Arc::new(Drain::default()),
            limits,
        );
        s.extensions.insert(Arc::new(session));
    });
    io
}

/// A message of `room` numbered `seq`.
pub fn numbered(room: ObjectId, seq: u64) -> ChatMessage {
    ChatMessage {
        id: ObjectId::new(),
        room_id: room,
        sender: shared::wire::Sender {
            id: ObjectId::new(),
            email: None,
            display_name: None,
        },
        content: format!("m{seq}"),
        created_at: shared::wire::now_millis(),
        seq: Some(seq),
        server_event: None,
    }
}
