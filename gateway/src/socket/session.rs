//! Per-socket state, and the extractor that keeps one socket's events in order.

use crate::drain::{Drain, InFlight};
use crate::error::ChatError;
use crate::limits::{Limits, UserLimiter};
use crate::presence::PresenceTracker;
use shared::ObjectId;
use shared::jwt::AuthUser;
use socketioxide::adapter::Adapter;
use socketioxide::handler::FromMessageParts;
use socketioxide::handler::Value;
use socketioxide::socket::Socket;
use std::collections::{HashMap, HashSet};
use std::marker::PhantomData;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

/// What the rate limiter says about one event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    Allowed,
    Refused,
    /// Refused, and the client keeps going over the limit: disconnect it.
    Disconnect,
}

/// What the gateway keeps for one connected socket.
pub struct Session {
    pub user: AuthUser,
    drain: Arc<Drain>,
    rooms: Mutex<Rooms>,
    /// Rooms where the user was found to be a participant, and when; and how many times a
    /// room was forgotten (a removal), so that a check that began before a removal is not
    /// recorded after it.
    verified: Mutex<(HashMap<ObjectId, Instant>, u64)>,
    membership_ttl: Duration,
    /// Completion signal of the previous event; the next event waits for it.
    previous: Mutex<Option<oneshot::Receiver<()>>>,
    /// Set when the socket disconnects; ends the socket's background tasks.
    pub closed: Closed,
    limits: Arc<Limits>,
    /// Events refused in a row by the rate limits.
    refused_in_a_row: AtomicU32,
    kick: AtomicBool,
    /// Set once the socket is being cut off for flooding, so that the events still queued
    /// behind that decision are refused without logging and counting it again.
    cut_off: AtomicBool,
    /// Set once the socket is being cut off as a slow consumer (its buffer was full).
    slow: AtomicBool,
    /// When the user was last found to exist.
    user_checked: Mutex<Option<Instant>>,
    /// Told of every room this socket joins and leaves.
    presence: Option<Arc<PresenceTracker>>,
}

/// How long a finding that the socket's user exists is trusted.
const USER_RECHECK: Duration = Duration::from_secs(1);

/// A session's end, for the tasks that wait on it: a flag and a `Notify` inside the
/// session, where a `CancellationToken` allocated a 224-byte node of a token tree per socket
/// (docs/BENCHMARKS.md, "Memory per connection").
#[derive(Default)]
pub struct Closed {
    set: AtomicBool,
    notify: tokio::sync::Notify,
}

impl Closed {
    pub fn cancel(&self) {
        if !self.set.swap(true, Ordering::AcqRel) {
            self.notify.notify_waiters();
        }
    }

    pub fn is_cancelled(&self) -> bool {
        self.set.load(Ordering::Acquire)
    }

    /// Resolves once the session is closed.
    pub async fn cancelled(&self) {
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            // Registered before the check, so a close between the two is not missed.
            notified.as_mut().enable();
            if self.is_cancelled() {
                return;
            }
            notified.await;
        }
    }
}

#[derive(Default)]
struct Rooms {
    joined: HashSet<ObjectId>,
    /// The joined rooms the socket is in on Socket.IO's side too, as presence counts it:
    /// the user counts as online there from the moment the socket receives the room's
    /// events, so their own socket hears its `presence` too.
    present: HashSet<ObjectId>,
    closed: bool,
}

impl Session {
    pub fn new(
        user: AuthUser,
        membership_ttl: Duration,
        drain: Arc<Drain>,
        limits: Arc<Limits>,
    ) -> Self {
        Self {
            user,
            drain,
            rooms: Mutex::default(),
            verified: Mutex::default(),
            membership_ttl,
            previous: Mutex::new(None),
            closed: Closed::default(),
            limits,
            refused_in_a_row: AtomicU32::new(0),
            kick: Default::default(),
            cut_off: Default::default(),
            slow: Default::default(),
            user_checked: Mutex::new(None),
            presence: None,
        }
    }

    /// The session tells `presence` of the rooms it joins and leaves.
    pub fn with_presence(mut self, presence: Arc<PresenceTracker>) -> Self {
        self.presence = Some(presence);
        self
    }

    /// Whether the socket is being cut off as a slow consumer.
    pub fn is_slow(&self) -> bool {
        self.slow.load(Ordering::Relaxed)
    }

    /// Whether the user's existence is to be checked again ([`USER_RECHECK`]).
    pub fn user_check_due(&self) -> bool {
        let checked = *self.user_checked.lock().unwrap_or_else(|e| e.into_inner());
        checked.is_none_or(|at| at.elapsed() >= USER_RECHECK)
    }

    /// Records that the user was found to exist.
    pub fn user_checked(&self) {
        *self.user_checked.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
    }

    /// Marks the socket to be disconnected after the current event's answer.
    pub fn kick(&self) {
        self.kick.store(true, Ordering::Relaxed);
    }

    /// `true` the first time only: the socket is now being cut off for flooding.
    pub fn cut_off_once(&self) -> bool {
        !self.cut_off.swap(true, Ordering::Relaxed)
    }

    /// Marks the socket as a slow consumer and runs `leave_all` (it leaving every local
    /// room), under the lock that joins take, so that no join waiting at that moment puts it
    /// back in a room ([`Self::join_recorded`] refuses from then on). Every call leaves;
    /// `true` the first time only.
    pub fn cut_off_slow(&self, leave_all: impl FnOnce()) -> bool {
        let _rooms = self.rooms.lock().unwrap_or_else(|e| e.into_inner());
        let first = !self.slow.swap(true, Ordering::Relaxed);
        leave_all();
        first
    }

    pub fn take_kick(&self) -> bool {
        self.kick.swap(false, Ordering::Relaxed)
    }

    /// Takes one token of the user's budget (shared with their other sockets and REST).
    pub fn admit_event(&self, limiter: &UserLimiter, ends_refusals: bool) -> Admission {
        if limiter.try_take(&self.user.id) {
            if ends_refusals {
                self.refused_in_a_row.store(0, Ordering::Relaxed);
            }
            return Admission::Allowed;
        }
        let refused = self.refused_in_a_row.fetch_add(1, Ordering::Relaxed) + 1;
        if refused >= self.limits.disconnect_after {
            Admission::Disconnect
        } else {
            Admission::Refused
        }
    }

    /// Forgets that the user may use `room` (they were removed from it).
    pub fn forget(&self, room: &ObjectId) {
        let mut verified = self.verified.lock().unwrap_or_else(|e| e.into_inner());
        verified.0.remove(room);
        verified.1 += 1;
    }

    /// Whether the user was recently verified as a participant of `room`.
    pub fn is_verified(&self, room: &ObjectId) -> bool {
        let verified = self.verified.lock().unwrap_or_else(|e| e.into_inner());
        verified
            .0
            .get(room)
            .is_some_and(|at| at.elapsed() < self.membership_ttl)
    }

    /// Taken before a membership check and given to [`Session::mark_verified`].
    pub fn verification(&self) -> u64 {
        self.verified.lock().unwrap_or_else(|e| e.into_inner()).1
    }

    /// Records that the user is a participant of `room`, unless a removal was forgotten
    /// since `verification` was taken (the check may predate it).
    pub fn mark_verified(&self, room: ObjectId, verification: u64) {
        let mut verified = self.verified.lock().unwrap_or_else(|e| e.into_inner());
        if verified.1 != verification {
            return;
        }
        // Bounded: a socket can only accumulate rooms it is a participant of, and stale
        // entries are dropped whenever the map grows.
        if verified.0.len() >= 1024 {
            let ttl = self.membership_ttl;
            verified.0.retain(|_, at| at.elapsed() < ttl);
        }
        verified.0.insert(room, Instant::now());
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

    /// Records a leave and runs `leave` (the socket leaving the local room) under the same
    /// lock as [`Session::join_recorded`]; `true` when the socket was in the room.
    pub fn leave_recorded(&self, room: &ObjectId, leave: impl FnOnce()) -> bool {
        let mut rooms = self.rooms.lock().unwrap_or_else(|e| e.into_inner());
        let was = rooms.joined.remove(room);
        leave();
        if rooms.present.remove(room)
            && let Some(presence) = &self.presence
        {
            presence.left(*room, self.user.id);
        }
        was
    }

    /// Runs `join` (the socket joining the local room) if the socket is still recorded in
    /// `room` and not cut off as a slow consumer, under the lock its leaves take; `false`
    /// when not.
    pub fn join_recorded(&self, room: &ObjectId, join: impl FnOnce()) -> bool {
        let mut rooms = self.rooms.lock().unwrap_or_else(|e| e.into_inner());
        let recorded = rooms.joined.contains(room) && !self.slow.load(Ordering::Relaxed);
        if recorded {
            join();
            if rooms.present.insert(*room)
                && let Some(presence) = &self.presence
            {
                presence.joined(*room, self.user.id);
            }
        }
        recorded
    }

    /// Marks the session closed and returns the rooms it was in.
    pub fn close(&self) -> Vec<ObjectId> {
        self.closed.cancel();
        let mut rooms = self.rooms.lock().unwrap_or_else(|e| e.into_inner());
        rooms.closed = true;
        let present: Vec<ObjectId> = rooms.present.drain().collect();
        if let Some(presence) = &self.presence {
            for room in present {
                presence.left(room, self.user.id);
            }
        }
        rooms.joined.drain().collect()
    }
}

/// Which budget an event takes from ([`Limits`]), and whether it waits for the socket's
/// earlier events.
pub trait EventKind: Send + Sync + 'static {
    fn limiter(limits: &Limits) -> &UserLimiter;
    /// Whether an allowed event of this kind ends a run of refusals (a join in between
    /// does not save a flooding socket).
    const ENDS_REFUSALS: bool;
    /// Whether the event takes a place in the socket's line of events (see [`Turn`]).
    const ORDERED: bool = true;
}

/// `send_message` and unknown events.
pub struct Messages;
/// `typing`: the same budget as messages, but out of line. A typing notice changes no
/// state, so it needs no order with the socket's other events; in line, each one waited
/// for the Redis round trip of the one before, which bounded a socket to one notice per
/// round trip (docs/BENCHMARKS.md).
pub struct Typing;
/// `join_room` and `leave_room`.
pub struct Joins;

impl EventKind for Messages {
    const ENDS_REFUSALS: bool = true;

    fn limiter(limits: &Limits) -> &UserLimiter {
        &limits.events
    }
}

impl EventKind for Typing {
    const ENDS_REFUSALS: bool = true;
    const ORDERED: bool = false;

    fn limiter(limits: &Limits) -> &UserLimiter {
        &limits.events
    }
}

impl EventKind for Joins {
    const ENDS_REFUSALS: bool = false;

    fn limiter(limits: &Limits) -> &UserLimiter {
        &limits.joins
    }
}

/// Extractor for every client event: the socket's [`Session`], whether the client asked
/// for an ack, and its turn.
///
/// socketioxide runs each event handler on its own task, so two events of one socket could
/// otherwise be handled concurrently and finish out of order. Extractors run synchronously
/// in arrival order, so each event takes the completion signal of the one before it here,
/// and waits for it in [`Turn::wait`]. `typing` stays out of that line ([`Typing`]).
///
/// The rate limit is checked here too, before the event takes a place in that line: a
/// refused event is answered at once and leaves nothing waiting behind it, so a flood
/// cannot pile up tasks.
pub struct Turn<K: EventKind = Messages> {
    pub session: Arc<Session>,
    pub wants_ack: bool,
    /// `None` when the gateway is shutting down: the event is refused, not half-done.
    admitted: Option<InFlight>,
    /// Refused by the rate limit (and outside the line of events).
    limited: bool,
    previous: Option<oneshot::Receiver<()>>,
    // Dropped when this event is done, which releases the next one.
    _done: Option<oneshot::Sender<()>>,
    _kind: PhantomData<K>,
}

impl<K: EventKind> Turn<K> {
    /// Waits until every earlier event of this socket was handled. Fails with
    /// `RATE_LIMITED` when the event is over the user's rate, and with `UNAVAILABLE` when
    /// it arrived after shutdown started.
    pub async fn wait(&mut self) -> Result<(), ChatError> {
        if self.limited {
            return Err(ChatError::RateLimited {
                message: "rate limit exceeded".into(),
                retry_after_secs: 1,
            });
        }
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

impl<A: Adapter, K: EventKind> FromMessageParts<A> for Turn<K> {
    type Error = NoSession;

    fn from_message_parts(
        s: &Arc<Socket<A>>,
        _: &mut Value,
        ack_id: &Option<i64>,
    ) -> Result<Self, NoSession> {
        let session = s.extensions.get::<Arc<Session>>().ok_or(NoSession)?;
        let admission = session.admit_event(K::limiter(&session.limits), K::ENDS_REFUSALS);
        if admission != Admission::Allowed {
            metrics::counter!("chat_gateway_rate_limited_total").increment(1);
            // Decided once per socket: events already queued behind the decision are
            // refused without logging and counting the disconnect again.
            if admission == Admission::Disconnect && session.cut_off_once() {
                metrics::counter!("chat_gateway_rate_limit_disconnects_total").increment(1);
                tracing::warn!(user_id = %session.user.id, "rate limit exceeded persistently, disconnecting");
                session.kick();
            }
            return Ok(Turn {
                admitted: None,
                limited: true,
                session,
                wants_ack: ack_id.is_some(),
                previous: None,
                _done: None,
                _kind: PhantomData,
            });
        }
        let (previous, done) = if K::ORDERED {
            let (done, next) = oneshot::channel();
            let previous = session
                .previous
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .replace(next);
            (previous, Some(done))
        } else {
            (None, None)
        };
        Ok(Turn {
            admitted: session.drain.enter(),
            limited: false,
            session,
            wants_ack: ack_id.is_some(),
            previous,
            _done: done,
            _kind: PhantomData,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::Closed;
    use std::sync::Arc;

    #[tokio::test]
    async fn a_close_releases_waiters_before_and_after_it() {
        let closed = Arc::new(Closed::default());
        let waiter = tokio::spawn({
            let closed = closed.clone();
            async move { closed.cancelled().await }
        });
        tokio::task::yield_now().await;
        closed.cancel();
        closed.cancel();
        waiter.await.unwrap();
        closed.cancelled().await;
        assert!(closed.is_cancelled());
    }
}
