//! Which rooms have local members, and the fan-out of room events to them.
//!
//! The gateway holds one Redis subscription per room with at least one local member: it
//! subscribes on the first local join and unsubscribes after the last local member left,
//! so a gateway receives only the traffic of its own rooms.

use crate::socket::session::Session;
use shared::ObjectId;
use shared::backplane::{Backplane, BackplaneError};
use shared::wire::{MemberRemoved, RoomEvent};
use socketioxide::SocketIo;
use socketioxide::extract::SocketRef;
use socketioxide::socket::DisconnectReason;
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex as StdMutex, OnceLock};
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

/// Reference counts of local members per room, kept in step with Redis subscriptions.
pub struct RoomRegistry {
    backplane: Arc<dyn Backplane>,
    // An async mutex: the first join of a room waits for its subscription while holding it,
    // so a concurrent leave cannot unsubscribe in between.
    members: Mutex<HashMap<ObjectId, usize>>,
}

impl RoomRegistry {
    pub fn new(backplane: Arc<dyn Backplane>) -> Self {
        Self {
            backplane,
            members: Mutex::new(HashMap::new()),
        }
    }

    /// Counts one more local member, subscribing first if it is the first.
    pub async fn acquire(&self, room: ObjectId) -> Result<(), BackplaneError> {
        let mut members = self.members.lock().await;
        let count = members.get(&room).copied().unwrap_or(0);
        if count == 0 {
            self.backplane.subscribe(room).await?;
            metrics::gauge!("chat_gateway_rooms_local").increment(1);
        }
        members.insert(room, count + 1);
        Ok(())
    }

    /// Counts one local member less, unsubscribing after the last.
    pub async fn release(&self, room: ObjectId) {
        let mut members = self.members.lock().await;
        let Some(count) = members.get_mut(&room) else {
            return;
        };
        *count -= 1;
        if *count > 0 {
            return;
        }
        members.remove(&room);
        metrics::gauge!("chat_gateway_rooms_local").decrement(1);
        if let Err(error) = self.backplane.unsubscribe(room).await {
            // A stale subscription only costs traffic: events for a room without local
            // members reach no socket.
            tracing::warn!(%room, %error, "unsubscribe failed");
        }
    }
}

/// Emits room events to the local sockets of their room.
///
/// Each socket has a bounded buffer (`SOCKET_BUFFER_SIZE`). A socket whose buffer is full
/// is a slow consumer: it is disconnected (so its client reconnects and fetches history)
/// rather than silently missing a message.
///
/// A message can be published twice (a persister that died after publishing and before
/// acknowledging is followed by one that publishes the batch again); the ids of recent
/// messages are remembered so that each socket still gets each message once.
pub struct Fanout {
    io: OnceLock<SocketIo>,
    rooms: OnceLock<Arc<RoomRegistry>>,
    recent: StdMutex<RecentIds>,
}

impl Fanout {
    pub fn new(remember: usize) -> Self {
        Self {
            io: OnceLock::new(),
            rooms: OnceLock::new(),
            recent: StdMutex::new(RecentIds::new(remember)),
        }
    }

    /// The Socket.IO server and the room registry exist after the backplane that feeds
    /// this; they are attached then.
    pub fn attach(&self, io: SocketIo, rooms: Arc<RoomRegistry>) {
        let _ = self.io.set(io);
        let _ = self.rooms.set(rooms);
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
                socket.leave(room_key(&removed.room_id));
                if let Some(rooms) = self.rooms.get() {
                    let (rooms, room) = (rooms.clone(), removed.room_id);
                    tokio::spawn(async move { rooms.release(room).await });
                }
            }
        }
        tracing::info!(user_id = %removed.user_id, room_id = %removed.room_id, "participant removed");
    }

    pub fn deliver(&self, event: &RoomEvent) {
        if let RoomEvent::Messages(batch) = event {
            // A persister's batch for one room: each message in order, as if published alone.
            for message in &batch.messages {
                self.deliver(&RoomEvent::Message(message.clone()));
            }
            return;
        }
        let Some(io) = self.io.get() else { return };
        if let RoomEvent::Message(m) = event
            && !self
                .recent
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(m.id)
        {
            metrics::counter!("chat_gateway_duplicates_suppressed_total").increment(1);
            return;
        }
        let typing = match event {
            RoomEvent::MemberRemoved(removed) => return self.remove_member(io, removed),
            RoomEvent::Message(_) => None,
            RoomEvent::Typing(t) => Some(t),
            RoomEvent::Messages(_) => return,
        };
        let Some(ns) = io.of(NAMESPACE) else { return };
        let room = room_key(&event.room_id());
        let (name, sockets): (&str, Vec<SocketRef>) = match typing {
            None => ("message", ns.to(room).sockets()),
            Some(t) => (
                "user_typing",
                ns.to(room).except(user_key(&t.user_id)).sockets(),
            ),
        };
        if sockets.is_empty() {
            return;
        }
        // Serialised once for the whole room, not once per socket: each socket then only
        // copies these bytes into its packet.
        let payload = match event {
            RoomEvent::Message(m) => serde_json::value::to_raw_value(m),
            RoomEvent::Typing(t) => serde_json::value::to_raw_value(t),
            RoomEvent::MemberRemoved(_) | RoomEvent::Messages(_) => return,
        };
        let payload = match payload {
            Ok(payload) => payload,
            Err(error) => {
                tracing::error!(%error, "room event not serialisable");
                return;
            }
        };
        let mut delivered = 0u64;
        for socket in sockets {
            let result = socket.emit(name, &payload);
            match result {
                Ok(()) => delivered += 1,
                Err(socketioxide::SendError::Socket(
                    socketioxide::SocketError::InternalChannelFull,
                )) => {
                    disconnect_slow_consumer(socket, name);
                }
                Err(error) => tracing::debug!(socket = %socket.id, %error, "emit to closed socket"),
            }
        }
        metrics::counter!("chat_gateway_deliveries_total", "event" => name).increment(delivered);
    }
}

/// A socket whose buffer is full is cut off: it leaves every room at once (so it gets
/// nothing more, and what it got is a gap-free prefix), then is disconnected as soon as
/// its buffer has room for the disconnect packet, or by the heartbeat (the client cannot
/// answer pings it does not receive) at the latest.
fn disconnect_slow_consumer(socket: SocketRef, event: &str) {
    metrics::counter!("chat_gateway_slow_consumer_disconnects_total").increment(1);
    tracing::warn!(socket = %socket.id, event, "slow consumer: buffer full, disconnecting");
    socket.leave_all();
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

/// The last `cap` message ids seen, oldest evicted first.
struct RecentIds {
    cap: usize,
    set: HashSet<ObjectId>,
    order: VecDeque<ObjectId>,
}

impl RecentIds {
    fn new(cap: usize) -> Self {
        Self {
            cap: cap.max(1),
            set: HashSet::new(),
            order: VecDeque::new(),
        }
    }

    /// `false` if `id` was seen already.
    fn insert(&mut self, id: ObjectId) -> bool {
        if !self.set.insert(id) {
            return false;
        }
        self.order.push_back(id);
        if self.order.len() > self.cap
            && let Some(old) = self.order.pop_front()
        {
            self.set.remove(&old);
        }
        true
    }
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

    #[test]
    fn recent_ids_forget_the_oldest() {
        let ids: Vec<ObjectId> = (0..3).map(|_| ObjectId::new()).collect();
        let mut recent = RecentIds::new(2);
        assert!(recent.insert(ids[0]));
        assert!(!recent.insert(ids[0]));
        assert!(recent.insert(ids[1]));
        assert!(recent.insert(ids[2]));
        assert!(recent.insert(ids[0]), "evicted, so new again");
        assert!(!recent.insert(ids[2]));
    }
}
