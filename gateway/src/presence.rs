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
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// Presence writes in flight at once, at most: enough that the Redis client pipelines them
/// (a connect storm joins thousands of users a second), bounded so that a round of a
/// hundred thousand entries does not start them all at once.
const WRITES_IN_FLIGHT: usize = 1024;
/// Pause before a failed write is tried again.
const RETRY: Duration = Duration::from_secs(1);

type Key = (ObjectId, ObjectId);

#[derive(Default)]
struct Entry {
    /// Local sockets of the user joined to the room.
    sockets: usize,
    /// What the shared presence holds for this gateway: `None` when unknown (a write failed,
    /// and Redis may or may not have applied it), so the wanted state is written again.
    written: Option<bool>,
}

#[derive(Default)]
struct State {
    entries: HashMap<Key, Entry>,
    /// Entries whose `sockets` may no longer match `written`.
    dirty: HashSet<Key>,
    /// Names this gateway went by before it was found dead, whose entries are still to be
    /// taken offline.
    spent: Vec<String>,
    /// Set once the first heartbeat registered this gateway: nothing is written before, so
    /// that everything written is under a name some gateway would reap.
    registered: bool,
}

/// Counts local sockets per room and user, and keeps the shared presence in step.
pub struct PresenceTracker {
    presence: Arc<dyn Presence>,
    state: Mutex<State>,
    wake: Notify,
    ttl: Duration,
    reaping: AtomicBool,
}

impl PresenceTracker {
    pub fn new(presence: Arc<dyn Presence>, ttl: Duration) -> Arc<Self> {
        Arc::new(Self {
            presence,
            state: Mutex::default(),
            wake: Notify::new(),
            ttl,
            reaping: AtomicBool::new(false),
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

    /// Writes the changes and keeps the heartbeat until `stop`; then writes what changed
    /// meanwhile (the sockets closed at shutdown) and declares this gateway gone, so that the
    /// others take whatever is left offline. The handle ends after that.
    pub fn start(self: &Arc<Self>, stop: CancellationToken) -> tokio::task::JoinHandle<()> {
        let writer = {
            let (this, stop) = (self.clone(), stop.clone());
            tokio::spawn(async move { this.write_changes(stop).await })
        };
        let beat = {
            let (this, stop) = (self.clone(), stop.clone());
            tokio::spawn(async move { this.keep_heartbeat(stop).await })
        };
        let this = self.clone();
        tokio::spawn(async move {
            let _ = beat.await;
            let _ = writer.await;
            if let Err(error) = this.presence.leave().await {
                tracing::warn!(%error, "presence: leaving failed; the others take this gateway's users offline when its heartbeat expires");
            }
        })
    }

    /// What the next round writes: the old names' entries to take offline, or the entries
    /// whose wanted state is not the written one.
    fn next_round(&self) -> Round {
        let mut state = self.state();
        if !state.registered {
            return Round::Nothing;
        }
        if let Some(spent) = state.spent.first().cloned() {
            let keys = state
                .entries
                .iter()
                .filter(|(_, e)| e.written != Some(false))
                .map(|(k, _)| *k)
                .collect();
            return Round::Spent(spent, keys);
        }
        let State { entries, dirty, .. } = &mut *state;
        let writes: Vec<(Key, bool)> = dirty
            .drain()
            .filter_map(|key| {
                let entry = entries.get(&key)?;
                let wanted = entry.sockets > 0;
                if entry.written == Some(wanted) {
                    if !wanted {
                        entries.remove(&key);
                    }
                    return None;
                }
                Some((key, wanted))
            })
            .collect();
        if writes.is_empty() {
            Round::Nothing
        } else {
            Round::Writes(writes)
        }
    }

    /// Runs writes, `WRITES_IN_FLIGHT` at most at a time; answers each with whether it
    /// succeeded.
    async fn write_all(&self, instance: &str, writes: &[(Key, bool)]) -> Vec<(Key, bool, bool)> {
        let mut results = Vec::with_capacity(writes.len());
        let mut tasks = tokio::task::JoinSet::new();
        for &((room, user), online) in writes {
            if tasks.len() >= WRITES_IN_FLIGHT
                && let Some(Ok(result)) = tasks.join_next().await
            {
                results.push(result);
            }
            let (presence, instance) = (self.presence.clone(), instance.to_owned());
            tasks.spawn(async move {
                let result = presence.set_as(&instance, room, user, online).await;
                if let Err(error) = &result {
                    tracing::debug!(%room, %user, online, %error, "presence write failed");
                }
                ((room, user), online, result.is_ok())
            });
        }
        results.extend(tasks.join_all().await);
        let failed = results.iter().filter(|(_, _, ok)| !ok).count() as u64;
        metrics::counter!("chat_gateway_presence_writes_total", "result" => "ok")
            .increment(results.len() as u64 - failed);
        metrics::counter!("chat_gateway_presence_writes_total", "result" => "error")
            .increment(failed);
        results
    }

    /// One round at a time, so that each entry has at most one write in flight and a
    /// rename never happens under a write.
    async fn write_changes(&self, stop: CancellationToken) {
        loop {
            let failed = match self.next_round() {
                Round::Nothing => {
                    if stop.is_cancelled() {
                        return;
                    }
                    tokio::select! {
                        _ = self.wake.notified() => {}
                        // After the stop, one more round for what closing the sockets changed.
                        _ = stop.cancelled() => {}
                    }
                    continue;
                }
                Round::Spent(name, keys) => {
                    let writes: Vec<(Key, bool)> = keys.into_iter().map(|k| (k, false)).collect();
                    let results = self.write_all(&name, &writes).await;
                    let failed = results.iter().any(|(_, _, ok)| !ok);
                    if !failed {
                        // Nothing is written under the new name yet: everything held is
                        // to be written again.
                        let mut state = self.state();
                        state.spent.retain(|n| *n != name);
                        let State { entries, dirty, .. } = &mut *state;
                        entries.retain(|key, entry| {
                            entry.written = Some(false);
                            if entry.sockets > 0 {
                                dirty.insert(*key);
                            }
                            entry.sockets > 0
                        });
                    }
                    failed
                }
                Round::Writes(writes) => {
                    let instance = self.presence.instance();
                    let results = self.write_all(&instance, &writes).await;
                    let mut state = self.state();
                    let State { entries, dirty, .. } = &mut *state;
                    let mut failed = false;
                    for (key, online, ok) in results {
                        let Some(entry) = entries.get_mut(&key) else {
                            continue;
                        };
                        if ok {
                            entry.written = Some(online);
                        } else {
                            entry.written = None;
                            failed = true;
                        }
                        if entry.written != Some(entry.sockets > 0) {
                            dirty.insert(key);
                        } else if entry.sockets == 0 {
                            entries.remove(&key);
                        }
                    }
                    failed
                }
            };
            if failed {
                tracing::warn!("presence writes failed; trying again");
                if stop.is_cancelled() {
                    return;
                }
                tokio::select! {
                    _ = tokio::time::sleep(RETRY) => {}
                    _ = stop.cancelled() => {}
                }
            }
        }
    }

    /// Beats every quarter of the ttl: a heartbeat expires after half of it, and another
    /// gateway sees that at its next beat, so a dead gateway's users are offline within the
    /// ttl. Reaping runs beside the beats, never delaying them.
    async fn keep_heartbeat(self: Arc<Self>, stop: CancellationToken) {
        let mut every = tokio::time::interval(self.ttl / 4);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = every.tick() => {}
                _ = stop.cancelled() => return,
            }
            let beat = match self.presence.heartbeat(self.ttl / 2).await {
                Ok(beat) => beat,
                Err(error) => {
                    tracing::warn!(%error, "presence heartbeat failed");
                    continue;
                }
            };
            {
                let mut state = self.state();
                state.registered = true;
                if let Some(old) = beat.renamed_from {
                    state.spent.push(old);
                }
            }
            self.wake.notify_one();
            if !beat.dead.is_empty() && !self.reaping.swap(true, Ordering::AcqRel) {
                let this = self.clone();
                tokio::spawn(async move {
                    for dead in beat.dead {
                        if let Err(error) = this.presence.reap(&dead).await {
                            tracing::warn!(gateway = %dead, %error, "taking a dead gateway's users offline failed; trying again at the next heartbeat");
                        }
                    }
                    this.reaping.store(false, Ordering::Release);
                });
            }
        }
    }
}

/// What one round of the writer does.
enum Round {
    Nothing,
    /// Take these entries offline under a name this gateway no longer goes by.
    Spent(String, Vec<Key>),
    /// Write these entries' wanted state under the current name.
    Writes(Vec<(Key, bool)>),
}

#[cfg(test)]
mod tests {
    use super::*;
    use shared::backplane::{BackplaneError, Beat};
    use std::sync::atomic::AtomicUsize;

    /// Records every write; fails the first `fail` of them; renames itself once when asked.
    #[derive(Default)]
    struct Fake {
        writes: Mutex<Vec<(String, Key, bool)>>,
        fail: AtomicUsize,
        name: Mutex<String>,
        rename: AtomicBool,
    }

    #[async_trait::async_trait]
    impl Presence for Fake {
        fn instance(&self) -> String {
            self.name.lock().unwrap().clone()
        }
        async fn set_as(
            &self,
            instance: &str,
            room: ObjectId,
            user: ObjectId,
            online: bool,
        ) -> Result<(), BackplaneError> {
            self.writes
                .lock()
                .unwrap()
                .push((instance.to_owned(), (room, user), online));
            let failing = self
                .fail
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok();
            if failing {
                // As after a lost reply: Redis may have applied it.
                return Err(BackplaneError::Malformed("lost reply".into()));
            }
            Ok(())
        }
        async fn online(&self, _room: ObjectId) -> Result<Vec<ObjectId>, BackplaneError> {
            Ok(Vec::new())
        }
        async fn heartbeat(&self, _ttl: Duration) -> Result<Beat, BackplaneError> {
            let renamed_from = self.rename.swap(false, Ordering::SeqCst).then(|| {
                let mut name = self.name.lock().unwrap();
                std::mem::replace(&mut *name, "second".into())
            });
            Ok(Beat {
                renamed_from,
                dead: Vec::new(),
            })
        }
        async fn reap(&self, _dead: &str) -> Result<(), BackplaneError> {
            Ok(())
        }
        async fn leave(&self) -> Result<(), BackplaneError> {
            Ok(())
        }
    }

    fn fake() -> Arc<Fake> {
        let fake = Arc::new(Fake::default());
        *fake.name.lock().unwrap() = "first".into();
        fake
    }

    async fn until(what: &str, check: impl Fn() -> bool) {
        for _ in 0..500 {
            if check() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("{what}: not within 5 s");
    }

    fn last(fake: &Fake, key: Key) -> Option<(String, bool)> {
        let writes = fake.writes.lock().unwrap();
        writes
            .iter()
            .rev()
            .find(|(_, k, _)| *k == key)
            .map(|(name, _, online)| (name.clone(), *online))
    }

    /// A write whose reply was lost is written again, whatever the sockets did meanwhile:
    /// the user who left while "online" failed still ends offline.
    #[tokio::test]
    async fn a_failed_write_is_written_again() {
        let fake = fake();
        fake.fail.store(1, Ordering::SeqCst);
        let tracker = PresenceTracker::new(fake.clone(), Duration::from_secs(2));
        let stop = CancellationToken::new();
        let done = tracker.start(stop.clone());
        let key = (ObjectId::new(), ObjectId::new());
        tracker.joined(key.0, key.1);
        until("the first write failed", || {
            fake.writes.lock().unwrap().len() == 1
        })
        .await;
        tracker.left(key.0, key.1);
        until("written offline", || {
            last(&fake, key) == Some(("first".into(), false))
        })
        .await;
        stop.cancel();
        done.await.unwrap();
        assert!(
            tracker.state().entries.is_empty(),
            "nothing kept for a user who left"
        );
    }

    /// Found dead and renamed: what was written under the old name is taken offline under
    /// it, and the users still here are written again under the new one.
    #[tokio::test]
    async fn after_a_rename_the_old_names_entries_go_and_the_new_name_gets_them() {
        let fake = fake();
        let tracker = PresenceTracker::new(fake.clone(), Duration::from_millis(400));
        let stop = CancellationToken::new();
        let done = tracker.start(stop.clone());
        let (here, gone) = (
            (ObjectId::new(), ObjectId::new()),
            (ObjectId::new(), ObjectId::new()),
        );
        tracker.joined(here.0, here.1);
        tracker.joined(gone.0, gone.1);
        until("both written", || {
            last(&fake, here).is_some() && last(&fake, gone).is_some()
        })
        .await;
        tracker.left(gone.0, gone.1);
        until("gone written offline", || {
            last(&fake, gone) == Some(("first".into(), false))
        })
        .await;
        fake.rename.store(true, Ordering::SeqCst);
        until("here written under the new name", || {
            last(&fake, here) == Some(("second".into(), true))
        })
        .await;
        let writes = fake.writes.lock().unwrap().clone();
        assert!(
            writes.contains(&("first".into(), here, false)),
            "taken offline under the old name: {writes:?}"
        );
        assert_eq!(last(&fake, gone), Some(("first".into(), false)));
        stop.cancel();
        done.await.unwrap();
    }
}
