//! Which rooms have local members, and the fan-out of room events to them.
//!
//! The gateway holds one Redis subscription per room with at least one local member: it
//! subscribes on the first local join and unsubscribes after the last local member left,
//! so a gateway receives only the traffic of its own rooms.

use crate::error::ChatError;
use crate::feed::{FeedHandle, FeedLimits};
use crate::socket::session::Session;
use serde::Serialize;
use shared::ObjectId;
use shared::backplane::Backplane;
use shared::store::Store;
use shared::wire::{ChatMessage, MemberRemoved, RoomEvent, UserTyping};
use socketioxide::SocketIo;
use socketioxide::extract::SocketRef;
use socketioxide::socket::DisconnectReason;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex as StdMutex, OnceLock, RwLock, Weak};
use tokio::sync::Mutex;

/// The Socket.IO namespace of the chat.
pub const NAMESPACE: &str = "/chat";

/// The local Socket.IO room of a chat room.
pub fn room_key(room: &ObjectId) -> String {
    room.to_hex()
}

/// The local Socket.IO room holding every socket of one user.
pub fn user_key(user: &ObjectId) -> String {
    format!("user:{}", user.to_hex())
}

/// Counts the changes to the local rooms' membership (a socket joining or leaving a room, a
/// disconnect). A room's socket list taken before the latest change is listed again
/// ([`RoomSockets`]).
static MEMBERSHIP: AtomicU64 = AtomicU64::new(0);

/// Adds a socket to a local Socket.IO room. Joins and leaves all go through here,
/// [`leave`] and [`leave_all`], so that no room's socket list outlives a change.
pub fn join(socket: &SocketRef, key: String) {
    socket.join(key);
    membership_changed();
}

/// Takes a socket out of a local Socket.IO room.
pub fn leave(socket: &SocketRef, key: String) {
    socket.leave(key);
    membership_changed();
}

/// Takes a socket out of every local Socket.IO room.
pub fn leave_all(socket: &SocketRef) {
    socket.leave_all();
    membership_changed();
}

/// Marks every room's socket list as out of date (also after a disconnect: socketioxide
/// takes the socket out of its rooms itself).
pub fn membership_changed() {
    MEMBERSHIP.fetch_add(1, Ordering::AcqRel);
}

/// The local sockets of one room, listed once and reused while no socket joins or leaves a
/// room here. socketioxide lists a room by looking every member up in the namespace (a lock
/// and a hash per socket), which it would do again for every event of the room: 3 to 6% of
/// a gateway's CPU under fan-out (docs/BENCHMARKS.md).
pub struct RoomSockets {
    /// The room's local Socket.IO room ([`room_key`]).
    key: String,
    listed: StdMutex<Option<(u64, Arc<[SocketRef]>)>>,
}

impl RoomSockets {
    pub fn new(key: String) -> Self {
        Self {
            key,
            listed: StdMutex::new(None),
        }
    }

    /// The room's connected local sockets.
    pub fn get(&self, io: &SocketIo) -> Arc<[SocketRef]> {
        // Read before listing: a change that lands while the list is taken makes the next
        // call list again.
        let now = MEMBERSHIP.load(Ordering::Acquire);
        let mut listed = self.listed.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((taken, sockets)) = listed.as_ref()
            && *taken == now
        {
            return sockets.clone();
        }
        let mut sockets = match io.of(NAMESPACE) {
            Some(ns) => ns.to(self.key.clone()).sockets(),
            None => Vec::new(),
        };
        // A closing socket is still in its rooms until its disconnect handler has run.
        sockets.retain(|s| s.connected());
        let sockets: Arc<[SocketRef]> = sockets.into();
        *listed = Some((now, sockets.clone()));
        sockets
    }

    /// Lets go of the list (and of the sockets in it) until the next event of the room.
    pub fn clear(&self) {
        *self.listed.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }
}

/// A room's local members, counted.
#[derive(Default)]
struct Slot {
    count: usize,
    /// Set when the slot left the map (its last member left): whoever locks it after that
    /// takes a new one.
    retired: bool,
}

/// Reference counts of local members per room, kept in step with Redis subscriptions, and
/// the ordered feed ([`crate::feed`]) of every room with local members.
pub struct RoomRegistry {
    backplane: Arc<dyn Backplane>,
    store: Arc<dyn Store>,
    limits: FeedLimits,
    io: OnceLock<SocketIo>,
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
            io: OnceLock::new(),
            myself: myself.clone(),
            members: StdMutex::default(),
            feeds: RwLock::new(HashMap::new()),
        })
    }

    /// The Socket.IO server exists after the registry; it is attached then.
    pub fn attach(&self, io: SocketIo) {
        let _ = self.io.set(io);
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
        let io = self
            .io
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
        let feed = FeedHandle::start(
            room,
            latest,
            self.store.clone(),
            io,
            self.myself.clone(),
            self.limits,
        );
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
        // Dropping the handle ends the feed's task once its queue is empty.
        self.feeds
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&room);
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

    /// Asks every local room's feed to compare itself with the store (events may have been
    /// lost).
    pub fn check_all(&self) {
        let feeds = self.feeds.read().unwrap_or_else(|e| e.into_inner());
        tracing::info!(
            rooms = feeds.len(),
            "room events may have been missed: checking every local room against the store"
        );
        for feed in feeds.values() {
            feed.check();
        }
    }
}

/// Routes room events to the local sockets of their room: messages through the room's
/// feed (ordered and repaired), typing notices straight to the sockets.
///
/// Each socket has a bounded buffer (`SOCKET_BUFFER_SIZE`). A socket whose buffer is full
/// is a slow consumer: it is disconnected (so its client reconnects and catches up with
/// `afterSeq`) rather than silently missing a message.
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

    /// Events may have been lost: every local room checks itself against the store.
    pub fn missed(&self) {
        if let Some(rooms) = self.rooms.get() {
            rooms.check_all();
        }
    }

    /// Makes a removed participant's local sockets leave the room, and forgets that the
    /// user was allowed in it (so `send_message` and `typing` ask the store again).
    fn remove_member(&self, io: &SocketIo, removed: &MemberRemoved) {
        let Some(ns) = io.of(NAMESPACE) else { return };
        for socket in ns.to(user_key(&removed.user_id)).sockets() {
            let Some(session) = socket.extensions.get::<Arc<Session>>() else {
                continue;
            };
            session.forget(&removed.room_id);
            if session.record_leave(&removed.room_id) {
                leave(&socket, room_key(&removed.room_id));
                if let Some(rooms) = self.rooms.get() {
                    let (rooms, room) = (rooms.clone(), removed.room_id);
                    tokio::spawn(async move { rooms.release(room).await });
                }
            }
        }
        tracing::info!(user_id = %removed.user_id, room_id = %removed.room_id, "participant removed");
    }

    pub fn deliver(&self, event: RoomEvent) {
        let Some(io) = self.io.get() else { return };
        let (messages, members_version) = match event {
            RoomEvent::MemberRemoved(removed) => return self.remove_member(io, &removed),
            RoomEvent::Typing(typing) => {
                // No feed: no local member any more (the unsubscription is under way).
                if let Some(feed) = self.rooms.get().and_then(|r| r.feed(&typing.room_id)) {
                    emit_typing(io, &feed.sockets, &typing);
                }
                return;
            }
            RoomEvent::Message(message) => (vec![message], None),
            RoomEvent::Messages(batch) => (batch.messages, batch.members_version),
        };
        let Some(room) = messages.first().map(|m| m.room_id) else {
            return;
        };
        // No feed: no local member any more (the unsubscription is under way).
        if let Some(feed) = self.rooms.get().and_then(|rooms| rooms.feed(&room)) {
            feed.deliver(messages, members_version);
        }
    }
}

/// Emits `message` to every local socket of a room.
pub fn emit_to_room(io: &SocketIo, sockets: &RoomSockets, message: &ChatMessage) {
    emit_serialised(sockets.get(io).iter(), "message", message);
}

/// Emits `user_typing` to every local socket of the room but the typing user's own.
pub fn emit_typing(io: &SocketIo, sockets: &RoomSockets, typing: &UserTyping) {
    let Some(ns) = io.of(NAMESPACE) else { return };
    let typist: Vec<_> = ns
        .to(user_key(&typing.user_id))
        .sockets()
        .iter()
        .map(|s| s.id)
        .collect();
    let room = sockets.get(io);
    let others = room.iter().filter(|s| !typist.contains(&s.id));
    emit_serialised(others, "user_typing", typing);
}

/// Emits one event to the given sockets, encoded once for all of them: every socket's
/// buffer gets a reference to the same packet, and each send still says whether that
/// socket's buffer was full (the slow-consumer policy needs to know whose; socketioxide's
/// broadcast does not say, vendor/socketioxide/PATCH.md).
fn emit_serialised<'a, T: Serialize>(
    sockets: impl Iterator<Item = &'a SocketRef>,
    name: &'static str,
    payload: &T,
) {
    let mut sockets = sockets.peekable();
    let Some(first) = sockets.peek() else { return };
    let packet = match first.encode_event(name, payload) {
        Ok(packet) => packet,
        Err(error) => {
            tracing::error!(%error, "room event not serialisable");
            return;
        }
    };
    let mut delivered = 0u64;
    for socket in sockets {
        match socket.emit_encoded(&packet) {
            Ok(()) => delivered += 1,
            Err(socketioxide::SocketError::InternalChannelFull) => {
                disconnect_slow_consumer(socket.clone(), name);
            }
            Err(error) => tracing::debug!(socket = %socket.id, %error, "emit to closed socket"),
        }
    }
    metrics::counter!("chat_gateway_deliveries_total", "event" => name).increment(delivered);
}

/// A socket whose buffer is full is cut off: it leaves every room at once (so it gets
/// nothing more, and what it got is a gap-free prefix), then is disconnected as soon as
/// its buffer has room for the disconnect packet, or by the heartbeat (the client cannot
/// answer pings it does not receive) at the latest.
fn disconnect_slow_consumer(socket: SocketRef, event: &str) {
    metrics::counter!("chat_gateway_slow_consumer_disconnects_total").increment(1);
    tracing::warn!(socket = %socket.id, event, "slow consumer: buffer full, disconnecting");
    leave_all(&socket);
    let Some(session) = socket.extensions.get::<Arc<Session>>() else {
        return;
    };
    tokio::spawn(async move {
        loop {
            match socket.clone().disconnect() {
                Err(socketioxide::SocketError::InternalChannelFull) => {}
                _ => return,
            }
            tokio::select! {
                _ = session.closed.cancelled() => return,
                _ = tokio::time::sleep(std::time::Duration::from_millis(100)) => {}
            }
        }
    });
}

/// A bounded label for a disconnect reason.
pub fn reason_label(reason: &DisconnectReason) -> &'static str {
    match reason {
        DisconnectReason::TransportClose => "transport_close",
        DisconnectReason::MultipleHttpPollingError => "multiple_polling",
        DisconnectReason::PacketParsingError => "packet_parsing",
        DisconnectReason::TransportError => "transport_error",
        DisconnectReason::HeartbeatTimeout => "heartbeat_timeout",
        DisconnectReason::ClientNSDisconnect => "client_disconnect",
        DisconnectReason::ServerNSDisconnect => "server_disconnect",
        DisconnectReason::ClosingServer => "server_closing",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `/chat` namespace whose disconnects are handled as the gateway's are.
    fn server() -> SocketIo {
        let (_layer, io) = SocketIo::builder().build_layer();
        io.ns(NAMESPACE, async |s: SocketRef| {
            s.on_disconnect(async || membership_changed());
        });
        io
    }

    fn ids<'a>(sockets: impl IntoIterator<Item = &'a SocketRef>) -> Vec<socketioxide::socket::Sid> {
        let mut ids: Vec<_> = sockets.into_iter().map(|s| s.id).collect();
        ids.sort();
        ids
    }

    #[tokio::test]
    async fn a_rooms_socket_list_follows_joins_leaves_and_disconnects() {
        let io = server();
        let mut receivers = Vec::new();
        for _ in 0..3 {
            let (tx, mut rx) = io.new_dummy_sock(NAMESPACE, ()).await;
            rx.recv().await.expect("connected");
            receivers.push((tx, rx));
        }
        let all = io.of(NAMESPACE).expect("namespace").sockets();
        let (a, b, c) = (&all[0], &all[1], &all[2]);
        let key = "room".to_string();
        let list = RoomSockets::new(key.clone());
        assert!(list.get(&io).is_empty());

        join(a, key.clone());
        join(b, key.clone());
        let first = list.get(&io);
        assert_eq!(ids(first.iter()), ids([a, b]));
        // Nothing changed: the same list, not listed again.
        assert!(Arc::ptr_eq(&first, &list.get(&io)));

        join(c, key.clone());
        assert_eq!(ids(list.get(&io).iter()), ids(&all));
        leave(a, key.clone());
        assert_eq!(ids(list.get(&io).iter()), ids([b, c]));
        leave_all(b);
        assert_eq!(ids(list.get(&io).iter()), ids([c]));

        // A disconnect (socketioxide takes the socket out of its rooms itself).
        list.get(&io);
        c.clone().disconnect().expect("disconnect");
        // The disconnect handler runs on a task of its own (on this thread: when this yields).
        for _ in 0..100 {
            if list.get(&io).is_empty() {
                break;
            }
            tokio::task::yield_now().await;
        }
        assert!(list.get(&io).is_empty());

        // Cleared: the sockets are let go.
        join(a, key.clone());
        list.get(&io);
        list.clear();
        assert!(list.listed.lock().unwrap().is_none());
        assert_eq!(ids(list.get(&io).iter()), ids([a]));
    }
}
