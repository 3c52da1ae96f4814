//! One ordered feed per local room: every `message` of the room reaches the room's local
//! sockets once, in `seq` order, without gaps, and never after a removal reached the room.
//!
//! Room events travel on Redis pub/sub, which is at most once: a message published while
//! this gateway's subscriber reconnects, or while it is behind, never arrives. Each message
//! carries its room's sequence number, so the feed sees a hole as soon as a later message
//! arrives and reads the missing ones from the store before delivering it. A lost *last*
//! message has nothing after it to reveal it, so after anything that may have lost events
//! (a reconnect, a resubscription, an overflow) the feed catches up: it compares its
//! position with the room's latest `seq` in the store.
//!
//! The feed is a task per room fed by a bounded queue, and the only code that joins sockets
//! to the room and emits `message` to them. So a join, with the replay of what the socket
//! missed (`join_room` with `afterSeq`), runs between two live messages and the socket sees
//! one ordered stream, and a join checked before a removal is checked again if the feed has
//! seen the removal since.
//!
//! Removals: every published batch carries the room's count of removals
//! (`membersVersion`); before delivering a batch with a higher count, and before catching
//! up, the feed reads the participants and takes every socket of a removed user out of the
//! room. A removal is thus never missed for longer than it takes the next delivery to
//! arrive, even when its own notice on the control channel was lost.

use crate::delivery::{self, RoomSockets, emit_to_room, room_key};
use crate::error::ChatError;
use crate::socket::session::Session;
use serde_json::json;
use shared::ObjectId;
use shared::backplane::Backplane;
use shared::store::Store;
use shared::wire::ChatMessage;
use socketioxide::SocketIo;
use socketioxide::extract::SocketRef;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::{Semaphore, mpsc};

/// Commands queued per room. A full queue drops the delivery and marks the feed to catch
/// up, which reads what was dropped from the store: an overflow costs a store read, not a
/// message.
const QUEUE: usize = 1024;
/// Attempts to read missing messages, or the participants, before the feed gives up.
const READ_ATTEMPTS: u32 = 5;
/// Pause between those attempts (doubling), and before a failed catch-up is tried again.
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

/// What every feed of a gateway shares.
pub struct FeedContext {
    pub store: Arc<dyn Store>,
    pub backplane: Arc<dyn Backplane>,
    pub io: SocketIo,
    pub limits: FeedLimits,
    /// Store reads of all feeds in flight at once, at most: after a pub/sub reconnect every
    /// local room catches up, and would otherwise read the store all at the same moment.
    pub reads: Arc<Semaphore>,
    /// Counts one local member of a room less (a socket the feed took out of the room).
    pub release: Arc<dyn Fn(ObjectId) + Send + Sync>,
}

/// A join the feed carries out.
pub struct Join {
    pub socket: SocketRef,
    /// Replay the messages after this `seq` first.
    pub after_seq: Option<u64>,
    /// The room's count of removals when the user was found to be a participant.
    pub checked_version: u64,
}

/// What a join replayed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Replayed {
    pub replayed: u64,
    /// More messages follow the replayed ones than the replay limit allowed: the client pages
    /// forward with `GET /chat/rooms/:id/messages?afterSeq=N`.
    pub has_more: bool,
}

/// Answers a join once the socket joined (after its replay), from the feed's task, so that
/// the ack precedes any later live message.
pub type JoinAnswer = Box<dyn FnOnce(Result<Replayed, ChatError>) + Send>;

enum Command {
    /// Live messages, the room's count of removals when they were published, and when they
    /// arrived from Redis.
    Deliver(Vec<ChatMessage>, Option<u64>, Instant),
    /// Events may have been lost: compare with the store.
    CatchUp,
    Join(Join, JoinAnswer),
}

/// The sending side of a room's feed, kept by the room registry.
#[derive(Clone)]
pub struct FeedHandle {
    tx: mpsc::Sender<Command>,
    catch_up: Arc<AtomicBool>,
    /// Set when the registry lets the feed go (its last local member left): a feed still
    /// finishing its queue must not emit to the sockets of the room's next feed.
    retired: Arc<AtomicBool>,
    /// The room's local sockets, shared with the room's `user_typing` notices.
    pub sockets: Arc<RoomSockets>,
}

impl FeedHandle {
    /// Starts the feed of `room`, positioned after `latest` (the room's latest stored `seq`
    /// when this gateway subscribed: nothing before it is owed to anyone here).
    pub fn start(room: ObjectId, latest: u64, context: Arc<FeedContext>) -> Self {
        let (tx, rx) = mpsc::channel(QUEUE);
        let catch_up = Arc::new(AtomicBool::new(false));
        let retired = Arc::new(AtomicBool::new(false));
        let sockets = Arc::new(RoomSockets::new(room_key(&room)));
        let feed = Feed {
            room,
            last: latest,
            members_version: 0,
            context,
            catch_up: catch_up.clone(),
            retired: retired.clone(),
            sockets: sockets.clone(),
            myself: tx.downgrade(),
        };
        tokio::spawn(feed.run(rx));
        Self {
            tx,
            catch_up,
            retired,
            sockets,
        }
    }

    /// The registry lets the feed go: from now on it emits nothing and joins no one (what
    /// is still queued is dropped or refused), while a new feed may serve the room.
    pub fn retire(&self) {
        self.retired.store(true, Ordering::SeqCst);
    }

    /// Queues live messages of the room (one published batch).
    pub fn deliver(&self, messages: Vec<ChatMessage>, members_version: Option<u64>) {
        let command = Command::Deliver(messages, members_version, Instant::now());
        if self.tx.try_send(command).is_err() {
            metrics::counter!("chat_gateway_feed_overflows_total").increment(1);
            tracing::warn!("room feed queue full: dropped a batch, catching up from the store");
            self.catch_up.store(true, Ordering::SeqCst);
        }
    }

    /// Asks the feed to compare its position with the store.
    pub fn catch_up(&self) {
        self.catch_up.store(true, Ordering::SeqCst);
        // A full queue is fine: the flag is read after the command being handled.
        let _ = self.tx.try_send(Command::CatchUp);
    }

    /// Joins a socket to the room's live messages (after replaying what followed
    /// `after_seq`), then answers. Waits for room in the queue (a join is never dropped).
    pub async fn join(&self, join: Join, answer: JoinAnswer) {
        if let Err(mpsc::error::SendError(Command::Join(_, answer))) =
            self.tx.send(Command::Join(join, answer)).await
        {
            answer(Err(ChatError::Unavailable("room feed closed".into())));
        }
    }
}

struct Feed {
    room: ObjectId,
    /// The `seq` of the last message delivered to the room's sockets.
    last: u64,
    /// The room's count of removals when its participants were last read.
    members_version: u64,
    context: Arc<FeedContext>,
    catch_up: Arc<AtomicBool>,
    retired: Arc<AtomicBool>,
    sockets: Arc<RoomSockets>,
    /// To ask itself to catch up later without keeping itself alive.
    myself: mpsc::WeakSender<Command>,
}

impl Feed {
    async fn run(mut self, mut rx: mpsc::Receiver<Command>) {
        // Ends when the registry drops the handle (the last local member left).
        while let Some(command) = rx.recv().await {
            match command {
                Command::Deliver(messages, members_version, arrived) => {
                    if let Some(version) = members_version {
                        self.remove_the_removed(version).await;
                    }
                    self.deliver(messages).await;
                    // The gateway's part of a message after its publication: waiting in the
                    // feed's queue, any repair before it, and the emits to the local sockets.
                    metrics::histogram!("chat_gateway_fanout_seconds")
                        .record(arrived.elapsed().as_secs_f64());
                }
                Command::CatchUp => {}
                Command::Join(join, answer) => {
                    let result = self.join(join).await;
                    answer(result);
                }
            }
            if self.catch_up.swap(false, Ordering::SeqCst) {
                self.catch_up().await;
            }
        }
    }

    async fn deliver(&mut self, messages: Vec<ChatMessage>) {
        for message in messages {
            let Some(seq) = message.seq else {
                tracing::warn!(room_id = %self.room, id = %message.id, "published message without a number ignored");
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
        if missing > self.context.limits.gap_repair_max {
            return self.resync(until, "gap larger than GAP_REPAIR_MAX");
        }
        let (run, complete) = self.read_run(self.last, until).await;
        for message in &run {
            self.emit(message);
            metrics::counter!("chat_gateway_messages_repaired_total").increment(1);
        }
        self.last += run.len() as u64;
        if !complete {
            self.resync(until, "missing messages could not be read from the store");
        }
    }

    /// Reads the stored messages after `after` up to `until` as one run without a hole:
    /// where the store has a hole (a message being stored, or read from a lagging replica)
    /// it reads again, a few times. Returns the run, and whether it reached `until`.
    async fn read_run(&self, after: u64, until: u64) -> (Vec<ChatMessage>, bool) {
        let mut run: Vec<ChatMessage> = Vec::new();
        let mut pause = RETRY_PAUSE;
        for attempt in 1..=READ_ATTEMPTS {
            let from = after + run.len() as u64;
            let wanted = u32::try_from(until - from).unwrap_or(u32::MAX);
            let read = {
                let _permit = self.context.reads.acquire().await;
                self.context
                    .store
                    .messages_after(self.room, from, wanted)
                    .await
            };
            match read {
                Ok(messages) => {
                    for message in messages {
                        let next = after + run.len() as u64 + 1;
                        if message.seq != Some(next) || next > until {
                            break;
                        }
                        run.push(message);
                    }
                    if after + run.len() as u64 >= until {
                        return (run, true);
                    }
                }
                Err(error) => {
                    tracing::warn!(room_id = %self.room, %error, attempt, "reading missing messages failed");
                }
            }
            tokio::time::sleep(pause).await;
            pause *= 2;
        }
        (run, false)
    }

    /// Compares the feed's position with the room's latest stored message and delivers what
    /// is missing, after taking out anyone removed meanwhile. A failed read is tried again
    /// shortly.
    async fn catch_up(&mut self) {
        let version = self.context.backplane.members_version(self.room).await;
        let latest = match version {
            Ok(version) => {
                self.remove_the_removed(version).await;
                let _permit = self.context.reads.acquire().await;
                self.context
                    .store
                    .latest_seq(self.room)
                    .await
                    .map_err(|e| e.to_string())
            }
            Err(error) => Err(error.to_string()),
        };
        match latest {
            Ok(latest) if latest > self.last => {
                metrics::counter!("chat_gateway_gaps_total").increment(1);
                tracing::info!(room_id = %self.room, from = self.last + 1, to = latest, "messages missed while events were lost: repairing from the store");
                self.fill(latest).await;
            }
            Ok(_) => {}
            Err(error) => {
                tracing::warn!(room_id = %self.room, %error, "catching up with the store failed; retrying");
                let (myself, catch_up) = (self.myself.clone(), self.catch_up.clone());
                tokio::spawn(async move {
                    tokio::time::sleep(RETRY_PAUSE * 10).await;
                    if let Some(tx) = myself.upgrade() {
                        catch_up.store(true, Ordering::SeqCst);
                        let _ = tx.try_send(Command::CatchUp);
                    }
                });
            }
        }
    }

    /// Tells every local socket of the room that it missed messages the gateway will not
    /// deliver: `resync {roomId, afterSeq}`. The sockets leave the room, so they get nothing
    /// out of order; the client joins again with `afterSeq` and is replayed what follows. A
    /// socket whose buffer has no room for the notice is cut off as a slow consumer.
    fn resync(&mut self, until: u64, why: &str) {
        if self.is_retired() {
            return;
        }
        let after_seq = self.last;
        tracing::warn!(room_id = %self.room, after_seq, until, why, "sending resync to the room's sockets");
        metrics::counter!("chat_gateway_resyncs_total").increment(1);
        let payload = json!({ "roomId": self.room.to_hex(), "afterSeq": after_seq });
        for socket in self.sockets.get(&self.context.io).iter() {
            if delivery::leave_room(socket, &self.room) {
                (self.context.release)(self.room);
            }
            if let Err(socketioxide::SendError::Socket(
                socketioxide::SocketError::InternalChannelFull,
            )) = socket.emit("resync", &payload)
            {
                delivery::disconnect_slow_consumer(socket.clone(), "resync");
            }
        }
        self.last = until;
    }

    async fn join(&mut self, join: Join) -> Result<Replayed, ChatError> {
        let Join {
            socket,
            after_seq,
            checked_version,
        } = join;
        if self.is_retired() {
            return Err(ChatError::Unavailable(
                "room feed closed: join again".into(),
            ));
        }
        let user = socket
            .extensions
            .get::<Arc<Session>>()
            .map(|s| s.user.id)
            .ok_or_else(|| ChatError::BadRequest("socket disconnected".into()))?;
        if after_seq.is_some_and(|after| after > self.last) {
            // The client saw more than this gateway delivered (it came from a gateway that
            // was ahead): catch up first, so that the live messages continue after its own.
            self.catch_up().await;
        }
        // A removal counted since the user was checked (the feed may not have seen it: its
        // notice can reach this gateway before the join was recorded, and a batch carrying
        // its count may not have come yet): check again. A removal counted after this read
        // finds the join recorded, and its notice or the next batch takes the socket out.
        let now = self.context.backplane.members_version(self.room).await?;
        if now.max(self.members_version) > checked_version {
            let participants = self.participants().await?;
            if !participants.contains(&user) {
                return Err(ChatError::Forbidden(
                    "you are not a participant of this room".into(),
                ));
            }
        }
        let mut replayed = 0;
        let mut has_more = false;
        // A socket already in the room has been sent every message of it up to `self.last`
        // on this connection, in order (one that missed any was taken out of the room): a
        // replay would send them twice, and the client may not have read them yet when it
        // asks again.
        let in_room = self
            .sockets
            .get(&self.context.io)
            .iter()
            .any(|s| s.id == socket.id);
        if let Some(after_seq) = after_seq.filter(|_| !in_room) {
            let until = self
                .last
                .min(after_seq.saturating_add(self.context.limits.replay_limit));
            if after_seq < until {
                let (run, complete) = self.read_run(after_seq, until).await;
                if !complete {
                    return Err(ChatError::Unavailable(format!(
                        "room {} has messages after {} not readable from the store yet",
                        self.room,
                        after_seq + run.len() as u64
                    )));
                }
                // Encoded here, not per room: only this socket gets the replay.
                for message in &run {
                    let (event, payload) = message.emitted();
                    if let Err(error) = socket.emit(event, &payload) {
                        if let socketioxide::SendError::Socket(
                            socketioxide::SocketError::InternalChannelFull,
                        ) = error
                        {
                            delivery::disconnect_slow_consumer(socket.clone(), event);
                        }
                        // The client's doing, not a dependency's: answered, not logged.
                        return Err(ChatError::Busy {
                            message: "this connection cannot take the replay".into(),
                            retry_after_secs: 1,
                        });
                    }
                    replayed += 1;
                }
                metrics::counter!("chat_gateway_messages_replayed_total").increment(replayed);
            }
            has_more = self.last > until;
        }
        if !delivery::join_room(&socket, &self.room) {
            if delivery::is_cut_off(&socket) {
                return Err(ChatError::Busy {
                    message: "this connection is cut off as a slow consumer".into(),
                    retry_after_secs: 1,
                });
            }
            return Err(ChatError::Forbidden(
                "you left or were removed from this room while joining".into(),
            ));
        }
        Ok(Replayed { replayed, has_more })
    }

    /// The room's participants, read from the store (a few attempts).
    async fn participants(&self) -> Result<Vec<ObjectId>, ChatError> {
        let mut pause = RETRY_PAUSE;
        let mut attempt = 1;
        loop {
            let read = {
                let _permit = self.context.reads.acquire().await;
                self.context.store.room(self.room).await
            };
            match read {
                Ok(room) => return Ok(room.map(|r| r.participants).unwrap_or_default()),
                Err(error) if attempt >= READ_ATTEMPTS => return Err(error.into()),
                Err(error) => {
                    tracing::warn!(room_id = %self.room, %error, attempt, "reading the participants failed");
                }
            }
            tokio::time::sleep(pause).await;
            pause *= 2;
            attempt += 1;
        }
    }

    /// When the room's count of removals is above what the feed last read, takes the local
    /// sockets of users who are no longer participants out of the room, before anything
    /// more is delivered. When the participants cannot be read, every socket of the room is
    /// sent `resync` instead (it joins again, checked, when the store is back): delivering
    /// on would risk reaching someone removed.
    async fn remove_the_removed(&mut self, version: u64) {
        if version <= self.members_version || self.is_retired() {
            return;
        }
        let participants = match self.participants().await {
            Ok(participants) => participants,
            Err(error) => {
                tracing::warn!(room_id = %self.room, %error, "participants unreadable after a removal");
                let last = self.last;
                self.resync(last, "the participants could not be read after a removal");
                return;
            }
        };
        self.members_version = version;
        for socket in self.sockets.get(&self.context.io).iter() {
            let Some(session) = socket.extensions.get::<Arc<Session>>() else {
                continue;
            };
            if participants.contains(&session.user.id) {
                continue;
            }
            session.forget(&self.room);
            if delivery::leave_room(socket, &self.room) {
                tracing::info!(room_id = %self.room, user_id = %session.user.id, "socket of a removed participant left the room");
                (self.context.release)(self.room);
            }
        }
    }

    /// Whether the registry let this feed go; see [`FeedHandle::retire`].
    fn is_retired(&self) -> bool {
        self.retired.load(Ordering::SeqCst)
    }

    fn emit(&self, message: &ChatMessage) {
        if self.is_retired() {
            return;
        }
        emit_to_room(&self.context.io, &self.sockets, message);
    }
}
