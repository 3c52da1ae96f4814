//! One ordered feed per local room: every `message` of the room reaches the room's local
//! sockets once, in `seq` order, without gaps.
//!
//! Room events travel on Redis pub/sub, which is at most once: a message published while
//! this gateway's subscriber reconnects, or while it is behind, never arrives. Each message
//! carries its room's sequence number, so the feed sees a hole as soon as a later message
//! arrives and reads the missing ones from the store before delivering it. A lost *last*
//! message has nothing after it to reveal it, so after anything that may have lost events
//! (a reconnect, a resubscription, an overflow) the feed compares its position with the
//! room's latest `seq` in the store.
//!
//! The feed is a task per room fed by a bounded queue: it is the only code that emits
//! `message` to the room's sockets, so a replay for a joining socket (`join_room` with
//! `afterSeq`) runs between two live messages and the socket sees one ordered stream.

use crate::error::ChatError;
use crate::rooms::{self, NAMESPACE, RoomRegistry, RoomSockets, emit_to_room, room_key};
use crate::socket::session::Session;
use serde_json::json;
use shared::ObjectId;
use shared::store::Store;
use shared::wire::ChatMessage;
use socketioxide::SocketIo;
use socketioxide::extract::SocketRef;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// Commands queued per room. A full queue drops the delivery and marks the feed for a check,
/// which reads what was dropped from the store: an overflow costs a store read, not a message.
const QUEUE: usize = 1024;
/// Attempts to read a missing range before the feed gives up on it and sends `resync`.
const REPAIR_ATTEMPTS: u32 = 5;
/// Pause between those attempts (doubling), and before a failed check is tried again.
const RETRY_PAUSE: Duration = Duration::from_millis(100);

/// Bounds of the repair and of the replay on join.
#[derive(Debug, Clone, Copy)]
pub struct FeedLimits {
    /// Missing messages a feed reads from the store to fill a gap; a larger gap sends
    /// `resync` instead (`GAP_REPAIR_MAX`).
    pub gap_repair_max: u64,
    /// Messages replayed to a socket that joins with `afterSeq` (`REPLAY_LIMIT`).
    pub replay_limit: u64,
}

/// What a join with `afterSeq` replayed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Replayed {
    pub replayed: u64,
    /// More messages follow the replayed ones than the replay limit allowed: the client pages
    /// forward with `GET /chat/rooms/:id/messages?afterSeq=N`.
    pub has_more: bool,
}

/// Answers a join once its replay was emitted and the socket joined, from the feed's task,
/// so that the ack precedes any later live message.
pub type JoinAnswer = Box<dyn FnOnce(Result<Replayed, ChatError>) + Send>;

enum Command {
    /// Live messages, the room's count of removals when they were published, and when they
    /// arrived from Redis.
    Deliver(Vec<ChatMessage>, Option<u64>, Instant),
    /// Events may have been lost: compare with the store.
    Check,
    Join {
        socket: SocketRef,
        after_seq: u64,
        answer: JoinAnswer,
    },
}

/// The sending side of a room's feed, kept by the room registry.
#[derive(Clone)]
pub struct FeedHandle {
    tx: mpsc::Sender<Command>,
    check: Arc<AtomicBool>,
    /// The room's local sockets, shared with the room's `user_typing` notices.
    pub sockets: Arc<RoomSockets>,
}

impl FeedHandle {
    /// Starts the feed of `room`, positioned after `latest` (the room's latest stored `seq`
    /// when this gateway subscribed: nothing before it is owed to anyone here).
    pub fn start(
        room: ObjectId,
        latest: u64,
        store: Arc<dyn Store>,
        io: SocketIo,
        registry: Weak<RoomRegistry>,
        limits: FeedLimits,
    ) -> Self {
        let (tx, rx) = mpsc::channel(QUEUE);
        let check = Arc::new(AtomicBool::new(false));
        let sockets = Arc::new(RoomSockets::new(room_key(&room)));
        let feed = Feed {
            room,
            key: room_key(&room),
            last: latest,
            members_version: 0,
            store,
            io,
            registry,
            limits,
            check: check.clone(),
            sockets: sockets.clone(),
            myself: tx.downgrade(),
        };
        tokio::spawn(feed.run(rx));
        Self { tx, check, sockets }
    }

    /// Queues live messages of the room (one published batch).
    pub fn deliver(&self, messages: Vec<ChatMessage>, members_version: Option<u64>) {
        let command = Command::Deliver(messages, members_version, Instant::now());
        if self.tx.try_send(command).is_err() {
            metrics::counter!("chat_gateway_feed_overflows_total").increment(1);
            tracing::warn!("room feed queue full: dropped a batch, repairing it from the store");
            self.check.store(true, Ordering::SeqCst);
        }
    }

    /// Asks the feed to compare its position with the store.
    pub fn check(&self) {
        self.check.store(true, Ordering::SeqCst);
        // A full queue is fine: the flag is read after the command being handled.
        let _ = self.tx.try_send(Command::Check);
    }

    /// Replays the messages after `after_seq` to `socket`, joins it to the room's live
    /// messages, then answers. Waits for room in the queue (a join is never dropped).
    pub async fn join(&self, socket: SocketRef, after_seq: u64, answer: JoinAnswer) {
        let command = Command::Join {
            socket,
            after_seq,
            answer,
        };
        if let Err(mpsc::error::SendError(Command::Join { answer, .. })) =
            self.tx.send(command).await
        {
            answer(Err(ChatError::Unavailable("room feed closed".into())));
        }
    }
}

struct Feed {
    room: ObjectId,
    key: String,
    /// The `seq` of the last message delivered to the room's sockets.
    last: u64,
    /// The room's count of removals when its participants were last read.
    members_version: u64,
    store: Arc<dyn Store>,
    io: SocketIo,
    registry: Weak<RoomRegistry>,
    limits: FeedLimits,
    check: Arc<AtomicBool>,
    sockets: Arc<RoomSockets>,
    /// To ask itself for a check later without keeping itself alive.
    myself: mpsc::WeakSender<Command>,
}

impl Feed {
    async fn run(mut self, mut rx: mpsc::Receiver<Command>) {
        // Ends when the registry drops the handle (the last local member left).
        while let Some(command) = rx.recv().await {
            match command {
                Command::Deliver(messages, members_version, arrived) => {
                    if let Some(version) = members_version
                        && version > self.members_version
                    {
                        // Someone was removed since: read the participants before
                        // delivering, whether or not the removal's notice arrived.
                        self.members_version = version;
                        self.evict_removed().await;
                    }
                    self.deliver(messages).await;
                    // The gateway's part of a message after its publication: waiting in the
                    // feed's queue, any repair before it, and the emits to the local sockets.
                    metrics::histogram!("chat_gateway_fanout_seconds")
                        .record(arrived.elapsed().as_secs_f64());
                }
                Command::Check => {}
                Command::Join {
                    socket,
                    after_seq,
                    answer,
                } => {
                    let result = self.join(&socket, after_seq).await;
                    answer(result);
                }
            }
            if self.check.swap(false, Ordering::SeqCst) {
                self.check_store().await;
            }
        }
    }

    async fn deliver(&mut self, messages: Vec<ChatMessage>) {
        for message in messages {
            let Some(seq) = message.seq else {
                // Accepted before sequence numbers existed: nothing to order it by.
                self.emit(&message);
                continue;
            };
            if seq <= self.last {
                // Published twice (a persister redelivered it), or delivered already by a
                // repair that read it from the store before its publication arrived.
                metrics::counter!("chat_gateway_duplicates_suppressed_total").increment(1);
                continue;
            }
            if seq > self.last + 1 {
                metrics::counter!("chat_gateway_gaps_total").increment(1);
                tracing::info!(room_id = %self.room, from = self.last + 1, to = seq - 1, "gap in the room's messages: repairing from the store");
                self.fill(seq - 1).await;
            }
            self.emit(&message);
            self.last = seq;
        }
    }

    /// Delivers the stored messages after `last` up to `until` (inclusive). Beyond
    /// `gap_repair_max` of them, or when the store cannot give them, the room's sockets get
    /// `resync` instead and the feed moves on to `until`.
    async fn fill(&mut self, until: u64) {
        let missing = until.saturating_sub(self.last);
        if missing == 0 {
            return;
        }
        if missing > self.limits.gap_repair_max {
            return self.resync(until, "gap larger than GAP_REPAIR_MAX");
        }
        let mut pause = RETRY_PAUSE;
        for attempt in 1..=REPAIR_ATTEMPTS {
            let wanted = until - self.last;
            match self
                .store
                .messages_after(
                    self.room,
                    self.last,
                    u32::try_from(wanted).unwrap_or(u32::MAX),
                )
                .await
            {
                Ok(messages) => {
                    for message in messages {
                        match message.seq {
                            Some(seq) if seq == self.last + 1 && seq <= until => {
                                self.emit(&message);
                                self.last = seq;
                                metrics::counter!("chat_gateway_messages_repaired_total")
                                    .increment(1);
                            }
                            _ => break,
                        }
                    }
                    if self.last >= until {
                        return;
                    }
                    // Not stored yet where this read landed (a lagging replica): try again.
                }
                Err(error) => {
                    tracing::warn!(room_id = %self.room, %error, attempt, "reading missing messages failed");
                }
            }
            tokio::time::sleep(pause).await;
            pause *= 2;
        }
        self.resync(until, "missing messages could not be read from the store");
    }

    /// Compares the feed's position with the room's latest stored message and delivers what
    /// is missing. A failed read is tried again shortly.
    async fn check_store(&mut self) {
        // A removal notice may have been lost with the rest.
        self.evict_removed().await;
        match self.store.latest_seq(self.room).await {
            Ok(latest) if latest > self.last => {
                metrics::counter!("chat_gateway_gaps_total").increment(1);
                tracing::info!(room_id = %self.room, from = self.last + 1, to = latest, "messages missed while events were lost: repairing from the store");
                self.fill(latest).await;
            }
            Ok(_) => {}
            Err(error) => {
                tracing::warn!(room_id = %self.room, %error, "checking the room against the store failed; retrying");
                let (myself, check) = (self.myself.clone(), self.check.clone());
                tokio::spawn(async move {
                    tokio::time::sleep(RETRY_PAUSE * 10).await;
                    if let Some(tx) = myself.upgrade() {
                        check.store(true, Ordering::SeqCst);
                        let _ = tx.try_send(Command::Check);
                    }
                });
            }
        }
    }

    /// Tells every local socket of the room that it missed messages the gateway will not
    /// deliver: `resync {roomId, afterSeq}`. The sockets leave the room, so they get nothing
    /// out of order; the client joins again with `afterSeq` and is replayed what follows.
    fn resync(&mut self, until: u64, why: &str) {
        let after_seq = self.last;
        tracing::warn!(room_id = %self.room, after_seq, until, why, "sending resync to the room's sockets");
        metrics::counter!("chat_gateway_resyncs_total").increment(1);
        if let Some(ns) = self.io.of(NAMESPACE) {
            let payload = json!({ "roomId": self.room.to_hex(), "afterSeq": after_seq });
            for socket in ns.to(self.key.clone()).sockets() {
                rooms::leave(&socket, self.key.clone());
                if let Some(session) = socket.extensions.get::<Arc<Session>>()
                    && session.record_leave(&self.room)
                    && let Some(registry) = self.registry.upgrade()
                {
                    let room = self.room;
                    tokio::spawn(async move { registry.release(room).await });
                }
                let _ = socket.emit("resync", &payload);
            }
        }
        self.last = until;
    }

    async fn join(&mut self, socket: &SocketRef, after_seq: u64) -> Result<Replayed, ChatError> {
        if after_seq > self.last {
            // The client saw more than this gateway delivered (it came from a gateway that
            // was ahead): catch up first, so that the live messages continue after its own.
            self.check_store().await;
        }
        let until = self
            .last
            .min(after_seq.saturating_add(self.limits.replay_limit));
        let mut replayed = 0;
        if after_seq < until {
            let messages = self
                .store
                .messages_after(
                    self.room,
                    after_seq,
                    u32::try_from(until - after_seq).unwrap_or(u32::MAX),
                )
                .await?;
            // Serialised here, not per room: only this socket gets the replay.
            for message in messages
                .iter()
                .filter(|m| m.seq.is_some_and(|s| s <= until))
            {
                match socket.emit("message", message) {
                    Ok(()) => replayed += 1,
                    Err(error) => {
                        tracing::debug!(socket = %socket.id, %error, "replay to a closed or full socket");
                        return Err(ChatError::Unavailable(format!("replay failed: {error}")));
                    }
                }
            }
            metrics::counter!("chat_gateway_messages_replayed_total").increment(replayed);
        }
        rooms::join(socket, self.key.clone());
        Ok(Replayed {
            replayed,
            has_more: self.last > until,
        })
    }

    /// Makes the local sockets of users who are no longer participants leave the room.
    async fn evict_removed(&self) {
        let participants = match self.store.room(self.room).await {
            Ok(Some(room)) => room.participants,
            Ok(None) => Vec::new(),
            Err(error) => {
                // Delivery goes on: holding every message back on a store blip would
                // punish every member for a removal that most likely arrived anyway.
                tracing::warn!(room_id = %self.room, %error, "reading the participants failed");
                return;
            }
        };
        let Some(ns) = self.io.of(NAMESPACE) else {
            return;
        };
        for socket in ns.to(self.key.clone()).sockets() {
            let Some(session) = socket.extensions.get::<Arc<Session>>() else {
                continue;
            };
            if participants.contains(&session.user.id) {
                continue;
            }
            session.forget(&self.room);
            rooms::leave(&socket, self.key.clone());
            tracing::info!(room_id = %self.room, user_id = %session.user.id, "socket of a removed participant left the room");
            if session.record_leave(&self.room)
                && let Some(registry) = self.registry.upgrade()
            {
                let room = self.room;
                tokio::spawn(async move { registry.release(room).await });
            }
        }
    }

    fn emit(&self, message: &ChatMessage) {
        // A feed the registry let go (its last local member left) may still be finishing a
        // repair while a new feed serves the room: only the current one emits.
        if self.myself.upgrade().is_none() {
            return;
        }
        emit_to_room(&self.io, &self.sockets, message);
    }
}
