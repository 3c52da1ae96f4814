//! What a chaos run records, as its clients saw it: every send and its answer, every
//! connection, join and event received, the owners' removals and additions, and the faults.
//! Nothing here knows how the gateway works; the checker reads only this and the store.
//!
//! Clients and rooms are numbered; times are seconds since the run started, on one clock.
//! Events are kept in the order they were recorded: a client records a join before it sends
//! it, and its reader records what arrives in the order it arrived.

use serde::Serialize;
use std::sync::{Arc, Mutex};
use std::time::Instant;

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// One attempt at `send_message`. `content` is unique per message a client means to
    /// send; a careful client's retries (`keyed`: with a `clientMsgId`) repeat it.
    Send {
        client: usize,
        room: usize,
        content: String,
        keyed: bool,
        attempt: u32,
        conn: u64,
        started: f64,
        at: f64,
        outcome: Outcome,
    },
    Connected {
        client: usize,
        conn: u64,
        gateway: usize,
        at: f64,
    },
    Closed {
        client: usize,
        conn: u64,
        at: f64,
    },
    /// A `join_room` about to be sent on `conn`.
    JoinSent {
        client: usize,
        conn: u64,
        room: usize,
        after_seq: Option<u64>,
        at: f64,
    },
    /// Its answer.
    Joined {
        client: usize,
        conn: u64,
        room: usize,
        at: f64,
        outcome: JoinOutcome,
    },
    /// A `message` event, or a message of a history page read over REST (`conn` 0).
    Message {
        client: usize,
        conn: u64,
        room: usize,
        id: String,
        seq: u64,
        at: f64,
    },
    Resync {
        client: usize,
        conn: u64,
        room: usize,
        after_seq: u64,
        at: f64,
    },
    /// An owner's removal of `user` from `room`: sent at `started`, answered at `at`.
    Removed {
        user: usize,
        room: usize,
        started: f64,
        at: f64,
        ok: bool,
    },
    /// An owner's adding `user` to `room` again.
    Added {
        user: usize,
        room: usize,
        started: f64,
        at: f64,
        ok: bool,
    },
    Fault {
        kind: String,
        target: String,
        start: f64,
        end: f64,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Outcome {
    Acked { id: String },
    Refused { code: String },
    TimedOut,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum JoinOutcome {
    Ok { replayed: u64, has_more: bool },
    Refused { code: String },
    TimedOut,
}

impl Event {
    /// The client and room an event is about, if any.
    pub fn client_room(&self) -> (Option<usize>, Option<usize>) {
        match self {
            Event::Send { client, room, .. }
            | Event::JoinSent { client, room, .. }
            | Event::Joined { client, room, .. }
            | Event::Message { client, room, .. }
            | Event::Resync { client, room, .. } => (Some(*client), Some(*room)),
            Event::Removed { user, room, .. } | Event::Added { user, room, .. } => {
                (Some(*user), Some(*room))
            }
            Event::Connected { client, .. } | Event::Closed { client, .. } => (Some(*client), None),
            Event::Fault { .. } => (None, None),
        }
    }
}

/// The recorded history, shared by every task of the run.
#[derive(Clone)]
pub struct History {
    started: Instant,
    events: Arc<Mutex<Vec<Event>>>,
}

impl History {
    pub fn new() -> Self {
        Self {
            started: Instant::now(),
            events: Arc::default(),
        }
    }

    /// Seconds since the run started.
    pub fn now(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }

    pub fn record(&self, event: Event) {
        self.events
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(event);
    }

    pub fn events(&self) -> Vec<Event> {
        self.events
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}
