//! Room participants cached per gateway, for the checks of `join_room`, `send_message` and
//! `typing`.
//!
//! A connect storm (every client of a restarted gateway reconnecting and joining its rooms)
//! would ask MongoDB once per join: 10,000 reads for 100 rooms. Instead a room's participants
//! are read once and shared, and every check first reads the room's removal count from the
//! backplane (one Redis `HGET`, see `Backplane::members_version`): a removal raises it, so
//! a list read before a removal is never trusted after it. Additions raise nothing; a user
//! missing from the cached list has the room read again before being refused. Concurrent
//! checks of an uncached room wait for one read. A list is trusted for `MEMBERSHIP_CACHE_SECS`
//! at most, whatever the count says: a removal whose count never reached Redis (Redis failed
//! right after the store's update) is seen within that time.

use crate::error::ChatError;
use shared::ObjectId;
use shared::backplane::Backplane;
use shared::store::Store;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::OnceCell;

type Participants = Arc<OnceCell<HashSet<ObjectId>>>;

pub struct MembershipCache {
    store: Arc<dyn Store>,
    backplane: Arc<dyn Backplane>,
    /// Most rooms held; past it an arbitrary room is forgotten (read again when needed).
    max_rooms: usize,
    /// Longest a list is trusted (`MEMBERSHIP_CACHE_SECS`).
    max_age: Duration,
    /// Room → (removal count when read, when, its participants once read).
    rooms: Mutex<HashMap<ObjectId, (u64, Instant, Participants)>>,
}

impl MembershipCache {
    pub fn new(
        store: Arc<dyn Store>,
        backplane: Arc<dyn Backplane>,
        max_rooms: usize,
        max_age: Duration,
    ) -> Self {
        Self {
            store,
            backplane,
            max_rooms: max_rooms.max(1),
            max_age,
            rooms: Mutex::default(),
        }
    }

    /// `Ok` when `user` is a participant of `room`, with the room's count of removals the
    /// answer is as new as; `NotFound` or `Forbidden` otherwise.
    pub async fn check(&self, user: &ObjectId, room: ObjectId) -> Result<u64, ChatError> {
        let version = self.backplane.members_version(room).await?;
        let cell = self.cell(room, version, false);
        if self.read(&cell, room).await?.contains(user) {
            metrics::counter!("chat_gateway_membership_checks_total", "source" => "cache")
                .increment(1);
            return Ok(version);
        }
        // Perhaps added since the list was read: read it again before refusing.
        let cell = self.cell(room, version, true);
        let found = self.read(&cell, room).await?.contains(user);
        metrics::counter!("chat_gateway_membership_checks_total", "source" => "store").increment(1);
        if found {
            Ok(version)
        } else {
            Err(ChatError::Forbidden(
                "you are not a participant of this room".into(),
            ))
        }
    }

    /// The room's cell for `version`: the cached one unless it is older (by count or by
    /// age), or `fresh`.
    fn cell(&self, room: ObjectId, version: u64, fresh: bool) -> Participants {
        let mut rooms = self.rooms.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((cached, at, cell)) = rooms.get(&room)
            && *cached >= version
            && at.elapsed() < self.max_age
            && !fresh
        {
            return cell.clone();
        }
        if rooms.len() >= self.max_rooms
            && !rooms.contains_key(&room)
            && let Some(evicted) = rooms.keys().next().copied()
        {
            rooms.remove(&evicted);
        }
        let cell = Participants::default();
        rooms.insert(room, (version, Instant::now(), cell.clone()));
        cell
    }

    async fn read<'a>(
        &self,
        cell: &'a Participants,
        room: ObjectId,
    ) -> Result<&'a HashSet<ObjectId>, ChatError> {
        let read = cell
            .get_or_try_init(|| async {
                metrics::counter!("chat_gateway_membership_reads_total").increment(1);
                match self.store.room(room).await? {
                    Some(room) => Ok(room.participants.into_iter().collect()),
                    None => Err(ChatError::NotFound("room not found".into())),
                }
            })
            .await;
        if read.is_err() {
            // Nothing to cache (no such room, or the store failed): do not keep the cell.
            self.forget(room, cell);
        }
        read
    }

    fn forget(&self, room: ObjectId, cell: &Participants) {
        let mut rooms = self.rooms.lock().unwrap_or_else(|e| e.into_inner());
        if rooms
            .get(&room)
            .is_some_and(|(_, _, c)| Arc::ptr_eq(c, cell))
        {
            rooms.remove(&room);
        }
    }
}
