//! Which rooms have local members, and the routing of room events to them.
//!
//! The gateway holds one Redis subscription and one ordered feed ([`crate::feed`]) per room
//! with at least one local member: it subscribes on the first local join and unsubscribes
//! after the last local member left, so a gateway receives only the traffic of its own
//! rooms. [`Fanout`] routes what the backplane delivers: messages to the room's feed,
//! typing notices straight to the room's sockets, removals to the removed user's sockets.

use crate::delivery::{self, emit_presence, emit_typing};
use crate::error::ChatError;
use crate::feed::{FeedContext, FeedHandle, FeedLimits};
use crate::socket::session::Session;
use shared::ObjectId;
use shared::backplane::Backplane;
use shared::store::Store;
use shared::wire::{MemberRemoved, RoomEvent};
use socketioxide::SocketIo;
use std::collections::HashMap;
use std::sync::{Arc, Mutex as StdMutex, OnceLock, RwLock, Weak};
use tokio::sync::{Mutex, Semaphore};

/// Store reads of all feeds of a gateway at once, at most (see [`FeedContext::reads`]).
const FEED_STORE_READS: usize = 32;

/// A room's local members, counted.
#[derive(Default)]
struct Slot {
    count: usize,
    /// Set when the slot left the map (its last member left): whoever locks it after that
    /// takes a new one.
    retired: bool,
}

/// Reference counts of local members per room, kept in step with Redis subscriptions, and
/// the ordered feed of every room with local members.
pub struct RoomRegistry {
    backplane: Arc<dyn Backplane>,
    store: Arc<dyn Store>,
    limits: FeedLimits,
    /// Made when the Socket.IO server is attached.
    context: OnceLock<Arc<FeedContext>>,
    myself: Weak<RoomRegistry>,
    /// One slot per room with local members. Each has its own async lock: the first join of
    /// a room waits for the subscription and the store while holding its room's lock only,
    /// so a concurrent leave cannot unsubscribe in between, and joins of other rooms go on.
    members: StdMutex<HashMap<ObjectId, Arc<Mutex<Slot>>>>,
    /// Read on the backplane's task for every event, written on joins and leaves.
    feeds: RwLock<HashMap<ObjectId, FeedHandle>>,
}

impl RoomRegistry {
    pub fn new(
        backplane: Arc<dyn Backplane>,
        store: Arc<dyn Store>,
        limits: FeedLimits,
    ) -> Arc<Self> {
        Arc::new_cyclic(|myself| Self {
            backplane,
            store,
            limits,
            context: OnceLock::new(),
            myself: myself.clone(),
            members: StdMutex::default(),
            feeds: RwLock::new(HashMap::new()),
        })
    }

    /// The Socket.IO server exists after the registry; it is attached then.
    pub fn attach(&self, io: SocketIo) {
        let myself = self.myself.clone();
        let release: Arc<dyn Fn(ObjectId) + Send + Sync> = Arc::new(move |room| {
            if let Some(registry) = myself.upgrade() {
                tokio::spawn(async move { registry.release(room).await });
            }
        });
        let _ = self.context.set(Arc::new(FeedContext {
            store: self.store.clone(),
            backplane: self.backplane.clone(),
            io,
            limits: self.limits,
            reads: Arc::new(Semaphore::new(FEED_STORE_READS)),
            release,
        }));
    }

    /// The slot of a room, made when missing.
    fn slot(&self, room: ObjectId) -> Arc<Mutex<Slot>> {
        self.members
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(room)
            .or_default()
            .clone()
    }

    /// Counts one more local member, subscribing and starting the room's feed first if it is
    /// the first. Returns the feed.
    pub async fn acquire(&self, room: ObjectId) -> Result<FeedHandle, ChatError> {
        loop {
            let entry = self.slot(room);
            let mut slot = entry.lock().await;
            if slot.retired {
                continue;
            }
            if slot.count > 0
                && let Some(feed) = self.feed(&room)
            {
                slot.count += 1;
                return Ok(feed);
            }
            match self.start_feed(room).await {
                Ok(feed) => {
                    slot.count += 1;
                    return Ok(feed);
                }
                Err(error) => {
                    // Nobody is in the room here: leave no empty slot behind.
                    if slot.count == 0 {
                        slot.retired = true;
                        let mut members = self.members.lock().unwrap_or_else(|e| e.into_inner());
                        if members.get(&room).is_some_and(|s| Arc::ptr_eq(s, &entry)) {
                            members.remove(&room);
                        }
                    }
                    return Err(error);
                }
            }
        }
    }

    /// Subscribes to a room and starts its feed.
    async fn start_feed(&self, room: ObjectId) -> Result<FeedHandle, ChatError> {
        let context = self
            .context
            .get()
            .cloned()
            .ok_or_else(|| ChatError::Unavailable("gateway still starting".into()))?;
        self.backplane.subscribe(room).await?;
        // Subscribed first, then positioned: every message stored after this read is
        // published after the subscription, so the feed sees it.
        let latest = match self.store.latest_seq(room).await {
            Ok(latest) => latest,
            Err(error) => {
                if let Err(error) = self.backplane.unsubscribe(room).await {
                    tracing::warn!(%room, %error, "unsubscribe failed");
                }
                return Err(error.into());
            }
        };
        let feed = FeedHandle::start(room, latest, context);
        self.feeds
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(room, feed.clone());
        metrics::gauge!("chat_gateway_rooms_local").increment(1);
        Ok(feed)
    }

    /// Counts one local member less, unsubscribing after the last.
    pub async fn release(&self, room: ObjectId) {
        // The member that left may still be in the room's socket list until the room's
        // next event: not kept until then.
        if let Some(feed) = self.feed(&room) {
            feed.sockets.clear();
        }
        let Some(slot) = self
            .members
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&room)
            .cloned()
        else {
            return;
        };
        let mut guard = slot.lock().await;
        if guard.retired || guard.count == 0 {
            return;
        }
        guard.count -= 1;
        if guard.count > 0 {
            return;
        }
        // Dropping the handle ends the feed's task once its queue is empty; retired, it
        // touches no socket meanwhile (a new feed may serve the room by then).
        if let Some(feed) = self
            .feeds
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&room)
        {
            feed.retire();
        }
        metrics::gauge!("chat_gateway_rooms_local").decrement(1);
        // Unsubscribed while the slot is still the room's and locked: a join arriving now
        // waits, and subscribes again only after this.
        if let Err(error) = self.backplane.unsubscribe(room).await {
            // A stale subscription only costs traffic: events for a room without local
            // members reach no socket.
            tracing::warn!(%room, %error, "unsubscribe failed");
        }
        guard.retired = true;
        let mut members = self.members.lock().unwrap_or_else(|e| e.into_inner());
        if members.get(&room).is_some_and(|s| Arc::ptr_eq(s, &slot)) {
            members.remove(&room);
        }
    }

    /// The feed of a room with local members.
    pub fn feed(&self, room: &ObjectId) -> Option<FeedHandle> {
        self.feeds
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(room)
            .cloned()
    }

    /// Every local room's feed catches up with the store (events may have been lost).
    pub fn catch_up_all(&self) {
        let feeds = self.feeds.read().unwrap_or_else(|e| e.into_inner());
        tracing::info!(
            rooms = feeds.len(),
            "room events may have been missed: every local room catches up with the store"
        );
        for feed in feeds.values() {
            feed.catch_up();
        }
    }
}

/// Routes room events to the local sockets of their room: messages through the room's
/// feed (ordered and repaired), typing notices straight to the sockets, removals to the
/// removed user's sockets.
pub struct Fanout {
    io: OnceLock<SocketIo>,
    rooms: OnceLock<Arc<RoomRegistry>>,
}

impl Default for Fanout {
    fn default() -> Self {
        Self::new()
    }
}

impl Fanout {
    pub fn new() -> Self {
        Self {
            io: OnceLock::new(),
            rooms: OnceLock::new(),
        }
    }

    /// The Socket.IO server and the room registry exist after the backplane that feeds
    /// this; they are attached then.
    pub fn attach(&self, io: SocketIo, rooms: Arc<RoomRegistry>) {
        let _ = self.io.set(io);
        let _ = self.rooms.set(rooms);
    }

    /// Events may have been lost: every local room catches up with the store.
    pub fn missed(&self) {
        if let Some(rooms) = self.rooms.get() {
            rooms.catch_up_all();
        }
    }

    /// Makes a removed participant's local sockets leave the room, and forgets that the
    /// user was allowed in it (so `send_message` and `typing` ask the store again). The
    /// room's feed does the same on its own when this notice is lost (`membersVersion`).
    fn remove_member(&self, io: &SocketIo, removed: &MemberRemoved) {
        for socket in delivery::user_sockets(io, &removed.user_id) {
            if let Some(session) = socket.extensions.get::<Arc<Session>>() {
                session.forget(&removed.room_id);
            }
            if delivery::leave_room(&socket, &removed.room_id)
                && let Some(rooms) = self.rooms.get()
            {
                let (rooms, room) = (rooms.clone(), removed.room_id);
                tokio::spawn(async move { rooms.release(room).await });
            }
        }
        tracing::info!(user_id = %removed.user_id, room_id = %removed.room_id, "participant removed");
    }

    pub fn deliver(&self, event: RoomEvent) {
        let Some(io) = self.io.get() else { return };
        // No feed: no local member any more (the unsubscription is under way).
        let feed = |room: &ObjectId| self.rooms.get().and_then(|rooms| rooms.feed(room));
        match event {
            RoomEvent::MemberRemoved(removed) => self.remove_member(io, &removed),
            RoomEvent::RoomAdded(added) => delivery::emit_room_added(io, &added),
            RoomEvent::Typing(typing) => {
                if let Some(feed) = feed(&typing.room_id) {
                    emit_typing(io, &feed.sockets, &typing);
                }
            }
            RoomEvent::Presence(change) => {
                if let Some(feed) = feed(&change.room_id) {
                    emit_presence(io, &feed.sockets, &change);
                }
            }
            RoomEvent::Messages(batch) => {
                if let Some(feed) = feed(&batch.room_id) {
                    feed.deliver(batch.messages, batch.members_version);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::delivery::NAMESPACE;
    use crate::delivery::room_key;
    use crate::feed::{Join, Replayed};
    use crate::testing::{ProbedStore, numbered, server};
    use shared::backplane::MemoryBackplane;
    use shared::store::SequencedMessage;
    use shared::wire::ChatMessage;
    use socketioxide::extract::SocketRef;
    use std::sync::atomic::Ordering;
    use std::time::Duration;
    use tokio::sync::mpsc::Receiver;

    type Packets = Receiver<engineioxide::Packet>;

    fn registry(store: Arc<ProbedStore>, io: &SocketIo, gap_repair_max: u64) -> Arc<RoomRegistry> {
        let backplane = Arc::new(MemoryBackplane::new(Arc::new(|_| {})));
        let registry = RoomRegistry::new(
            backplane,
            store,
            FeedLimits {
                gap_repair_max,
                replay_limit: 100,
            },
        );
        registry.attach(io.clone());
        registry
    }

    /// A socket of `user`, connected (its connect packet taken).
    async fn connect(io: &SocketIo, user: ObjectId) -> (SocketRef, Packets) {
        let (_tx, mut rx) = io.new_dummy_sock(NAMESPACE, user.to_hex()).await;
        rx.recv().await.expect("connected");
        let socket = io
            .of(NAMESPACE)
            .expect("namespace")
            .sockets()
            .into_iter()
            .find(|s| {
                s.extensions
                    .get::<Arc<Session>>()
                    .is_some_and(|session| session.user.id == user)
            })
            .expect("the socket");
        (socket, rx)
    }

    /// Joins a socket to a room as `join_room` does, checked at `checked_version`.
    async fn join(
        registry: &RoomRegistry,
        socket: &SocketRef,
        room: ObjectId,
        checked_version: u64,
    ) -> Result<Replayed, ChatError> {
        let feed = registry.acquire(room).await?;
        let session = socket.extensions.get::<Arc<Session>>().expect("session");
        assert!(session.record_join(room));
        let (done, answer) = tokio::sync::oneshot::channel();
        let join = Join {
            socket: socket.clone(),
            after_seq: None,
            checked_version,
        };
        feed.join(join, Box::new(move |r| drop(done.send(r)))).await;
        answer.await.expect("answered")
    }

    /// The names of the events waiting for a socket.
    fn events(rx: &mut Packets) -> Vec<String> {
        let mut names = Vec::new();
        while let Ok(packet) = rx.try_recv() {
            let text = format!("{packet:?}");
            for name in ["message", "resync"] {
                if text.contains(&format!("[\\\"{name}\\\"")) {
                    names.push(name.to_owned());
                }
            }
        }
        names
    }

    async fn until(what: &str, check: impl Fn() -> bool) {
        for _ in 0..1000 {
            if check() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("{what}: not within 10 s");
    }

    /// After a pub/sub reconnect every local room catches up with the store at once; the
    /// reads are bounded, not one per room all at the same moment.
    #[tokio::test]
    async fn catching_up_reads_the_store_a_bounded_number_at_a_time() {
        let store = ProbedStore::new(Duration::from_millis(20));
        let io = server(16);
        let registry = registry(store.clone(), &io, 1000);
        for _ in 0..100 {
            registry.acquire(ObjectId::new()).await.unwrap();
        }
        store.reads.store(0, Ordering::SeqCst);
        store.most_in_flight.store(0, Ordering::SeqCst);
        registry.catch_up_all();
        until("every room caught up", || {
            store.reads.load(Ordering::SeqCst) >= 100
        })
        .await;
        let most = store.most_in_flight.load(Ordering::SeqCst);
        assert!(
            (2..=FEED_STORE_READS).contains(&most),
            "{most} reads at once"
        );
        assert_eq!(store.reads.load(Ordering::SeqCst), 100, "one read per room");
    }

    /// A `resync` that finds the socket's buffer full cuts the socket off as a slow consumer
    /// (it leaves every room, its own user's too), rather than leaving it in the dark.
    #[tokio::test]
    async fn a_resync_that_finds_a_full_buffer_cuts_the_socket_off() {
        let store = ProbedStore::new(Duration::ZERO);
        let io = server(2);
        let registry = registry(store, &io, 1);
        let (user, room) = (ObjectId::new(), ObjectId::new());
        let (socket, _rx) = connect(&io, user).await;
        crate::delivery::add_user_socket(user, socket.id);
        join(&registry, &socket, room, 0).await.unwrap();
        // Fill the socket's buffer: its reader takes nothing.
        let mut full = 0;
        while full < 3 {
            match socket.emit("filler", &0) {
                Ok(()) => full = 0,
                Err(_) => full += 1,
            }
            tokio::task::yield_now().await;
        }
        // A gap beyond GAP_REPAIR_MAX (1): resync.
        let feed = registry.feed(&room).unwrap();
        feed.deliver(vec![numbered(room, 3)], None);
        until("the socket left every room", || socket.rooms().is_empty()).await;
        let session = socket.extensions.get::<Arc<Session>>().unwrap();
        assert!(!session.is_joined(&room));
    }

    /// A removal whose participants cannot be read: nothing more is delivered to the room's
    /// sockets (one of them may be the removed user); they get `resync` instead.
    #[tokio::test]
    async fn unreadable_participants_after_a_removal_stop_delivery_with_resync() {
        let store = ProbedStore::new(Duration::ZERO);
        let io = server(64);
        let registry = registry(store.clone(), &io, 1000);
        let (removed, staying) = (ObjectId::new(), ObjectId::new());
        let room = store
            .create_room(None, vec![staying, removed])
            .await
            .unwrap()
            .id;
        let (a, mut a_rx) = connect(&io, removed).await;
        let (b, mut b_rx) = connect(&io, staying).await;
        join(&registry, &a, room, 0).await.unwrap();
        join(&registry, &b, room, 0).await.unwrap();
        store.remove_participant(room, removed).await.unwrap();
        let stored = |m: &ChatMessage| SequencedMessage {
            seq: m.seq.unwrap() as i64,
            message: m.clone(),
        };
        let (first, second) = (numbered(room, 1), numbered(room, 2));
        store.insert_messages(&[stored(&first)]).await.unwrap();
        store.refuse.store(true, Ordering::SeqCst);
        let feed = registry.feed(&room).unwrap();
        // The batch counts one removal; its notice never came.
        feed.deliver(vec![first], Some(1));
        until("both sockets left the room", || {
            a.rooms().is_empty() && b.rooms().is_empty()
        })
        .await;
        assert_eq!(events(&mut a_rx), ["resync"]);
        assert_eq!(events(&mut b_rx), ["resync"]);
        // Readable again: the next batch goes to whoever is in the room, and a join of the
        // removed user checked before the removal is checked again and refused.
        store.refuse.store(false, Ordering::SeqCst);
        join(&registry, &b, room, 1).await.unwrap();
        // Everyone left: the room has a new feed.
        let feed = registry.feed(&room).unwrap();
        store.insert_messages(&[stored(&second)]).await.unwrap();
        feed.deliver(vec![second], Some(1));
        until("the staying user got it", || !b_rx.is_empty()).await;
        assert_eq!(events(&mut b_rx), ["message"]);
        let refused = join(&registry, &a, room, 0).await;
        assert!(
            matches!(refused, Err(ChatError::Forbidden(_))),
            "{refused:?}"
        );
        assert!(events(&mut a_rx).is_empty());
        assert!(!a.rooms().contains(&room_key(&room).into()));
    }
}
