//! This gateway's share of presence: how many local sockets each user has joined to each
//! room, and the task that tells the shared [`Presence`] when a user's first socket joined
//! a room or the last one left it.
//!
//! Sockets join and leave on their own tasks; the presence is written by one task that takes
//! the changes in rounds. A user who joins and leaves quickly may cost no write at all, and
//! each (room, user) has at most one write in flight, so the writes of one entry cannot
//! overtake each other.

use shared::ObjectId;
use shared::backplane::Presence;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// Presence writes in flight at once, at most.
const WRITES_IN_FLIGHT: usize = 64;
/// Pause before a failed write is tried again.
const RETRY: Duration = Duration::from_secs(1);

type Key = (ObjectId, ObjectId);

#[derive(Default)]
struct Entry {
    /// Local sockets of the user joined to the room.
    sockets: usize,
    /// What the shared presence holds for this gateway.
    written: bool,
}

#[derive(Default)]
struct State {
    entries: HashMap<Key, Entry>,
    /// Entries whose `sockets` may no longer match `written`.
    dirty: HashSet<Key>,
}

/// Counts local sockets per room and user, and keeps the shared presence in step.
pub struct PresenceTracker {
    presence: Arc<dyn Presence>,
    state: Mutex<State>,
    wake: Notify,
    ttl: Duration,
}

impl PresenceTracker {
    pub fn new(presence: Arc<dyn Presence>, ttl: Duration) -> Arc<Self> {
        Arc::new(Self {
            presence,
            state: Mutex::default(),
            wake: Notify::new(),
            ttl,
        })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A socket of `user` joined `room`.
    pub fn joined(&self, room: ObjectId, user: ObjectId) {
        let mut state = self.state();
        let entry = state.entries.entry((room, user)).or_default();
        entry.sockets += 1;
        if entry.sockets == 1 {
            state.dirty.insert((room, user));
            drop(state);
            self.wake.notify_one();
        }
    }

    /// A socket of `user` left `room` (or disconnected).
    pub fn left(&self, room: ObjectId, user: ObjectId) {
        let mut state = self.state();
        let Some(entry) = state.entries.get_mut(&(room, user)) else {
            return;
        };
        entry.sockets = entry.sockets.saturating_sub(1);
        if entry.sockets == 0 {
            state.dirty.insert((room, user));
            drop(state);
            self.wake.notify_one();
        }
    }

    /// Who is online in `room`, across every gateway.
    pub async fn online(
        &self,
        room: ObjectId,
    ) -> Result<Vec<ObjectId>, shared::backplane::BackplaneError> {
        self.presence.online(room).await
    }

    /// Writes the changes until `stop`, and keeps the heartbeat; at `stop`, declares this
    /// gateway gone so that the others take its users offline. The handle ends after that.
    pub fn start(self: &Arc<Self>, stop: CancellationToken) -> tokio::task::JoinHandle<()> {
        let writer = self.clone();
        let stop_writes = stop.clone();
        tokio::spawn(async move { writer.write_changes(stop_writes).await });
        let beat = self.clone();
        tokio::spawn(async move { beat.keep_heartbeat(stop).await })
    }

    async fn write_changes(&self, stop: CancellationToken) {
        loop {
            let round: Vec<(Key, bool)> = {
                let mut state = self.state();
                let dirty: Vec<Key> = state.dirty.drain().collect();
                dirty
                    .into_iter()
                    .filter_map(|key| {
                        let entry = state.entries.get(&key)?;
                        let wanted = entry.sockets > 0;
                        if wanted == entry.written {
                            if !wanted {
                                state.entries.remove(&key);
                            }
                            return None;
                        }
                        Some((key, wanted))
                    })
                    .collect()
            };
            if round.is_empty() {
                tokio::select! {
                    _ = self.wake.notified() => continue,
                    _ = stop.cancelled() => return,
                }
            }
            let mut results: Vec<(Key, bool, bool)> = Vec::with_capacity(round.len());
            for chunk in round.chunks(WRITES_IN_FLIGHT) {
                let mut writes = tokio::task::JoinSet::new();
                for &((room, user), online) in chunk {
                    let presence = self.presence.clone();
                    writes.spawn(async move {
                        let result = presence.set(room, user, online).await;
                        if let Err(error) = &result {
                            tracing::debug!(%room, %user, online, %error, "presence write failed");
                        }
                        ((room, user), online, result.is_ok())
                    });
                }
                results.extend(writes.join_all().await);
            }
            let (mut written, mut failed) = (0u64, 0u64);
            {
                let mut state = self.state();
                for (key, online, ok) in results {
                    if ok {
                        written += 1;
                        if let Some(entry) = state.entries.get_mut(&key) {
                            entry.written = online;
                            if entry.sockets == 0 && !online {
                                state.entries.remove(&key);
                                continue;
                            }
                            if (entry.sockets > 0) != online {
                                state.dirty.insert(key);
                            }
                        }
                    } else {
                        failed += 1;
                        state.dirty.insert(key);
                    }
                }
            }
            metrics::counter!("chat_gateway_presence_writes_total", "result" => "ok")
                .increment(written);
            if failed > 0 {
                metrics::counter!("chat_gateway_presence_writes_total", "result" => "error")
                    .increment(failed);
                tracing::warn!(failed, "presence writes failed; trying again");
                tokio::select! {
                    _ = tokio::time::sleep(RETRY) => {}
                    _ = stop.cancelled() => return,
                }
            }
        }
    }

    /// Beats every quarter of the ttl: a heartbeat expires after half of it, and a reaper
    /// sees it at its next beat, so a dead gateway's users are offline within the ttl.
    async fn keep_heartbeat(&self, stop: CancellationToken) {
        let mut every = tokio::time::interval(self.ttl / 4);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = every.tick() => {}
                _ = stop.cancelled() => break,
            }
            match self.presence.heartbeat(self.ttl / 2).await {
                Ok(true) => {}
                Ok(false) => {
                    // Found dead: everything held online is to be written again.
                    let mut state = self.state();
                    let State { entries, dirty } = &mut *state;
                    for (key, entry) in entries.iter_mut() {
                        entry.written = false;
                        if entry.sockets > 0 {
                            dirty.insert(*key);
                        }
                    }
                    drop(state);
                    self.wake.notify_one();
                }
                Err(error) => tracing::warn!(%error, "presence heartbeat failed"),
            }
        }
        if let Err(error) = self.presence.leave().await {
            tracing::warn!(%error, "presence: leaving failed; the others take this gateway's users offline when its heartbeat expires");
        }
    }
}
