//! A room's local sockets: joining and leaving the local Socket.IO rooms, the room's socket
//! list kept between events, emitting one encoded packet to all of them, and the
//! slow-consumer policy.
//!
//! Each socket has a bounded buffer (`SOCKET_BUFFER_SIZE`). A socket whose buffer is full
//! is a slow consumer: it leaves every room at once and is disconnected (so its client
//! reconnects and catches up with `afterSeq`) rather than silently missing a message.

use crate::socket::session::Session;
use serde::Serialize;
use shared::ObjectId;
use shared::wire::{ChatMessage, PresenceChange, RoomAdded, UserTyping};
use socketioxide::SocketIo;
use socketioxide::extract::SocketRef;
use socketioxide::socket::Sid;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex as StdMutex};

/// The Socket.IO namespace of the chat.
pub const NAMESPACE: &str = "/chat";

/// The local Socket.IO room of a chat room.
pub fn room_key(room: &ObjectId) -> String {
    room.to_hex()
}

/// The local sockets of each connected user, for what is addressed to a user rather than
/// to a room: `room_added`, a participant's removal, the typist's own sockets. One small
/// entry per socket: a Socket.IO room per user cost about 480 bytes per connection in
/// socketioxide's adapter (docs/BENCHMARKS.md, "Memory per connection"). Shared by the
/// gateways of one process (tests run several): a socket id is looked up in the caller's
/// own namespace, so another gateway's sockets are passed over.
static USER_SOCKETS: LazyLock<StdMutex<HashMap<ObjectId, Vec<Sid>>>> =
    LazyLock::new(Default::default);

fn user_sockets_map() -> std::sync::MutexGuard<'static, HashMap<ObjectId, Vec<Sid>>> {
    USER_SOCKETS.lock().unwrap_or_else(|e| e.into_inner())
}

/// Counts a socket as one of its user's (at connect).
pub fn add_user_socket(user: ObjectId, socket: Sid) {
    user_sockets_map().entry(user).or_default().push(socket);
}

/// A socket is no longer addressed as one of its user's (a disconnect, a slow consumer
/// cut off). Idempotent.
pub fn remove_user_socket(user: &ObjectId, socket: Sid) {
    let mut map = user_sockets_map();
    if let Some(sockets) = map.get_mut(user) {
        sockets.retain(|s| *s != socket);
        if sockets.is_empty() {
            map.remove(user);
        }
    }
}

/// The ids of a user's sockets, on every gateway of this process.
fn user_socket_ids(user: &ObjectId) -> Vec<Sid> {
    user_sockets_map().get(user).cloned().unwrap_or_default()
}

/// A user's sockets on this gateway.
pub fn user_sockets(io: &SocketIo, user: &ObjectId) -> Vec<SocketRef> {
    let Some(ns) = io.of(NAMESPACE) else {
        return Vec::new();
    };
    user_socket_ids(user)
        .into_iter()
        .filter_map(|sid| ns.get_socket(sid))
        .collect()
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

/// Takes a socket out of every local Socket.IO room, and out of its user's sockets.
pub fn leave_all(socket: &SocketRef) {
    socket.leave_all();
    if let Some(session) = socket.extensions.get::<Arc<Session>>() {
        remove_user_socket(&session.user.id, socket.id);
    }
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

/// Takes a socket out of a chat room: its session forgets having joined, and it leaves the
/// local Socket.IO room. `true` when it was in the room: the caller then counts one local
/// member less ([`crate::rooms::RoomRegistry::release`]).
pub fn leave_room(socket: &SocketRef, room: &ObjectId) -> bool {
    let leave = || leave(socket, room_key(room));
    match socket.extensions.get::<Arc<Session>>() {
        Some(session) => session.leave_recorded(room, leave),
        None => {
            leave();
            false
        }
    }
}

/// Puts a socket into a chat room's local Socket.IO room, if its session still records it
/// as joined (it may have left, or been removed, while its join waited): `false` otherwise.
/// Checked and joined under the lock that [`leave_room`] takes, so a leave cannot slip in
/// between.
pub fn join_room(socket: &SocketRef, room: &ObjectId) -> bool {
    let Some(session) = socket.extensions.get::<Arc<Session>>() else {
        return false;
    };
    session.join_recorded(room, || join(socket, room_key(room)))
}

/// Whether the socket is being cut off as a slow consumer ([`disconnect_slow_consumer`]).
pub fn is_cut_off(socket: &SocketRef) -> bool {
    socket
        .extensions
        .get::<Arc<Session>>()
        .is_some_and(|s| s.is_slow())
}

/// Emits an item of a room's sequence to every local socket of the room: `message`, or a
/// server event by its name.
pub fn emit_to_room(io: &SocketIo, sockets: &RoomSockets, message: &ChatMessage) {
    let (name, payload) = message.emitted();
    emit_serialised(sockets.get(io).iter(), name, &payload);
}

/// Emits `user_typing` to every local socket of the room but the typing user's own.
pub fn emit_typing(io: &SocketIo, sockets: &RoomSockets, typing: &UserTyping) {
    let typist = user_socket_ids(&typing.user_id);
    let room = sockets.get(io);
    let others = room.iter().filter(|s| !typist.contains(&s.id));
    emit_serialised(others, "user_typing", typing);
}

/// Emits `room_added {room}` to every local socket of the users given the room.
pub fn emit_room_added(io: &SocketIo, added: &RoomAdded) {
    let sockets: Vec<SocketRef> = added
        .user_ids
        .iter()
        .flat_map(|user| user_sockets(io, user))
        .collect();
    emit_serialised(
        sockets.iter(),
        "room_added",
        &serde_json::json!({ "room": added.room }),
    );
}

/// Emits `presence` to every local socket of the room.
pub fn emit_presence(io: &SocketIo, sockets: &RoomSockets, change: &PresenceChange) {
    emit_serialised(sockets.get(io).iter(), "presence", change);
}

/// Emits one event to the given sockets, encoded once for all of them: every socket's
/// buffer gets a reference to the same packet, and each send still says whether that
/// socket's buffer was full (the slow-consumer policy needs to know whose; socketioxide's
/// broadcast does not say, vendor/socketioxide/PATCH.md).
fn emit_serialised<'a, T: Serialize>(
    sockets: impl Iterator<Item = &'a SocketRef>,
    name: &str,
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
    metrics::counter!("chat_gateway_deliveries_total", "event" => metric_label(name))
        .increment(delivered);
}

/// The `event` label of a delivery count: the gateway's own events by name, and every server
/// event under one label (their names are the deployment's, and any gateway may see any).
fn metric_label(event: &str) -> &'static str {
    match event {
        "message" => "message",
        "user_typing" => "user_typing",
        "room_added" => "room_added",
        "presence" => "presence",
        _ => "server_event",
    }
}

/// A socket whose buffer is full is cut off: it leaves every room at once (so it gets
/// nothing more, and what it got is a gap-free prefix) and joins no room again, then is
/// disconnected as soon as its buffer has room for the disconnect packet, or by the
/// heartbeat (the client cannot answer pings it does not receive) at the latest.
pub fn disconnect_slow_consumer(socket: SocketRef, event: &str) {
    let Some(session) = socket.extensions.get::<Arc<Session>>() else {
        leave_all(&socket);
        return;
    };
    // Every call leaves (a join may have been under way); logged, counted and disconnected
    // once per socket.
    if !session.cut_off_slow(|| leave_all(&socket)) {
        return;
    }
    metrics::counter!("chat_gateway_slow_consumer_disconnects_total").increment(1);
    tracing::warn!(socket = %socket.id, event, "slow consumer: buffer full, disconnecting");
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
