//! Per-socket state, and the extractor that keeps one socket's events in order.

use crate::drain::{Drain, InFlight};
use crate::error::ChatError;
use shared::ObjectId;
use shared::jwt::AuthUser;
use socketioxide::adapter::Adapter;
use socketioxide::handler::FromMessageParts;
use socketioxide::handler::Value;
use socketioxide::socket::Socket;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

/// Per-connection limits on `send_message` and `typing`.
#[derive(Debug, Clone, Copy)]
pub struct EventLimits {
    /// Sustained events per second.
    pub per_second: f64,
    /// Events allowed at once above the sustained rate.
    pub burst: f64,
    /// Refused events in a row after which the socket is disconnected.
    pub disconnect_after: u32,
}

/// What the rate limiter says about one event.
#[derive(Debug, PartialEq, Eq)]
pub enum Admission {
    Allowed,
    Refused,
    /// Refused, and the client keeps going over the limit: disconnect it.
    Disconnect,
}

/// A token bucket, refilled continuously.
struct Bucket {
    tokens: f64,
    last: Instant,
    refused_in_a_row: u32,
}

/// What the gateway keeps for one connected socket.
pub struct Session {
    pub user: AuthUser,
    drain: Arc<Drain>,
    rooms: Mutex<Rooms>,
    /// Rooms where the user was found to be a participant, and when.
    verified: Mutex<HashMap<ObjectId, Instant>>,
    membership_ttl: Duration,
    /// Completion signal of the previous event; the next event waits for it.
    previous: Mutex<Option<oneshot::Receiver<()>>>,
    /// Cancelled when the socket disconnects; ends the socket's background tasks.
    pub closed: CancellationToken,
    limits: EventLimits,
    bucket: Mutex<Bucket>,
    kick: std::sync::atomic::AtomicBool,
    /// Set once the socket is being cut off for flooding, so that the events still queued
    /// behind that decision are refused without logging and counting it again.
    cut_off: std::sync::atomic::AtomicBool,
}

#[derive(Default)]
struct Rooms {
    joined: HashSet<ObjectId>,
    closed: bool,
}

impl Session {
    pub fn new(
        user: AuthUser,
        membership_ttl: Duration,
        drain: Arc<Drain>,
        limits: EventLimits,
    ) -> Self {
        Self {
            user,
            drain,
            rooms: Mutex::default(),
            verified: Mutex::default(),
            membership_ttl,
            previous: Mutex::new(None),
            closed: CancellationToken::new(),
            limits,
            kick: Default::default(),
            cut_off: Default::default(),
            bucket: Mutex::new(Bucket {
                tokens: limits.burst,
                last: Instant::now(),
                refused_in_a_row: 0,
            }),
        }
    }

    /// Marks the socket to be disconnected after the current event's answer.
    pub fn kick(&self) {
        self.kick.store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// `true` the first time only: the socket is now being cut off for flooding.
    pub fn cut_off_once(&self) -> bool {
        !self
            .cut_off
            .swap(true, std::sync::atomic::Ordering::Relaxed)
    }

    pub fn take_kick(&self) -> bool {
        self.kick.swap(false, std::sync::atomic::Ordering::Relaxed)
    }

    /// Takes one token for a rate-limited event.
    pub fn admit_event(&self) -> Admission {
        let mut bucket = self.bucket.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        let refill = now.duration_since(bucket.last).as_secs_f64() * self.limits.per_second;
        bucket.tokens = (bucket.tokens + refill).min(self.limits.burst);
        bucket.last = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            bucket.refused_in_a_row = 0;
            return Admission::Allowed;
        }
        bucket.refused_in_a_row += 1;
        if bucket.refused_in_a_row >= self.limits.disconnect_after {
            Admission::Disconnect
        } else {
            Admission::Refused
        }
    }

    /// Forgets that the user may use `room` (they were removed from it).
    pub fn forget(&self, room: &ObjectId) {
        self.verified
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(room);
    }

    /// Whether the user was recently verified as a participant of `room`.
    pub fn is_verified(&self, room: &ObjectId) -> bool {
        let verified = self.verified.lock().unwrap_or_else(|e| e.into_inner());
        verified
            .get(room)
            .is_some_and(|at| at.elapsed() < self.membership_ttl)
    }

    pub fn mark_verified(&self, room: ObjectId) {
        let mut verified = self.verified.lock().unwrap_or_else(|e| e.into_inner());
        // Bounded: a socket can only accumulate rooms it is a participant of, and stale
        // entries are dropped whenever the map grows.
        if verified.len() >= 1024 {
            let ttl = self.membership_ttl;
            verified.retain(|_, at| at.elapsed() < ttl);
        }
        verified.insert(room, Instant::now());
    }

    pub fn is_joined(&self, room: &ObjectId) -> bool {
        self.rooms
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .joined
            .contains(room)
    }

    /// Records a join; `false` when the socket already disconnected (the caller undoes it).
    pub fn record_join(&self, room: ObjectId) -> bool {
        let mut rooms = self.rooms.lock().unwrap_or_else(|e| e.into_inner());
        if rooms.closed {
            return false;
        }
        rooms.joined.insert(room);
        true
    }

    /// Records a leave; `true` when the socket was in the room.
    pub fn record_leave(&self, room: &ObjectId) -> bool {
        self.rooms
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .joined
            .remove(room)
    }

    /// Marks the session closed and returns the rooms it was in.
    pub fn close(&self) -> Vec<ObjectId> {
        self.closed.cancel();
        let mut rooms = self.rooms.lock().unwrap_or_else(|e| e.into_inner());
        rooms.closed = true;
        rooms.joined.drain().collect()
    }
}

/// Extractor for every client event: the socket's [`Session`], whether the client asked
/// for an ack, and its turn.
///
/// socketioxide runs each event handler on its own task, so two events of one socket could
/// otherwise be handled concurrently and finish out of order. Extractors run synchronously
/// in arrival order, so each event takes the completion signal of the one before it here,
/// and waits for it in [`Turn::wait`].
pub struct Turn {
    pub session: Arc<Session>,
    pub wants_ack: bool,
    /// `None` when the gateway is shutting down: the event is refused, not half-done.
    admitted: Option<InFlight>,
    previous: Option<oneshot::Receiver<()>>,
    // Dropped when this event is done, which releases the next one.
    _done: oneshot::Sender<()>,
}

impl Turn {
    /// Waits until every earlier event of this socket was handled. Fails with
    /// `UNAVAILABLE` when the event arrived after shutdown started.
    pub async fn wait(&mut self) -> Result<(), ChatError> {
        if let Some(previous) = self.previous.take() {
            // An error only means the previous handler finished (its sender was dropped).
            let _ = previous.await;
        }
        match self.admitted {
            Some(_) => Ok(()),
            None => Err(ChatError::Unavailable("gateway shutting down".into())),
        }
    }
}

/// The socket has no session: it was not authenticated (cannot happen after the middleware).
#[derive(Debug, thiserror::Error)]
#[error("socket has no session")]
pub struct NoSession;

impl<A: Adapter> FromMessageParts<A> for Turn {
    type Error = NoSession;

    fn from_message_parts(
        s: &Arc<Socket<A>>,
        _: &mut Value,
        ack_id: &Option<i64>,
    ) -> Result<Self, NoSession> {
        let session = s.extensions.get::<Arc<Session>>().ok_or(NoSession)?;
        let (done, next) = oneshot::channel();
        let previous = session
            .previous
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .replace(next);
        Ok(Turn {
            admitted: session.drain.enter(),
            session,
            wants_ack: ack_id.is_some(),
            previous,
            _done: done,
        })
    }
}
