//! Who is online in a room, across every gateway.
//!
//! A user is online in a room while at least one of their sockets is joined to it, on any
//! gateway. Each gateway counts its own sockets and tells the [`Presence`] only when a
//! user's first local socket joins a room or the last one leaves; the presence then
//! announces `presence` to the room when the user's state across all gateways changes.
//!
//! A gateway that dies cannot say that its users left. Each gateway instance keeps a
//! heartbeat (one write per beat, whatever it holds); the live gateways take the entries of
//! an instance whose heartbeat expired offline. An instance that was only paused past its
//! heartbeat and comes back finds itself declared dead: it goes on under a new name
//! (registered in the same call), takes offline under the old name whatever it wrote with it
//! (a write of its may have landed after a reaper's pass), and sets its users again under the
//! new one, which no reaper touches.

use super::redis_util::SCRIPTS;
use super::{Backplane, BackplaneError, Keys};
use crate::wire::{PresenceChange, RoomEvent};
use async_trait::async_trait;
use fred::prelude::*;
use mongodb::bson::oid::ObjectId;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Entries of a dead instance taken offline per round trip.
const REAP_BATCH: usize = 500;

/// What a heartbeat found.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Beat {
    /// This gateway had been found dead (paused past its heartbeat): it now goes on under a
    /// new name, and this was the old one. Whatever it wrote under the old name is to be
    /// taken offline under that name ([`Presence::set_as`]), then written again.
    pub renamed_from: Option<String>,
    /// Gateways found dead whose entries are still to be taken offline ([`Presence::reap`]).
    pub dead: Vec<String>,
}

/// The presence of users in rooms, shared by every gateway.
#[async_trait]
pub trait Presence: Send + Sync + 'static {
    /// This gateway's current name.
    fn instance(&self) -> String;

    /// Records that gateway `instance` holds (`online`) or no longer holds sockets of
    /// `user` joined to `room`. The room hears `presence` when the user's state across
    /// every gateway changes. Running it twice changes nothing more.
    async fn set_as(
        &self,
        instance: &str,
        room: ObjectId,
        user: ObjectId,
        online: bool,
    ) -> Result<(), BackplaneError>;

    /// The users online in `room`.
    async fn online(&self, room: ObjectId) -> Result<Vec<ObjectId>, BackplaneError>;

    /// Keeps this gateway's entries alive for `ttl`; see [`Beat`].
    async fn heartbeat(&self, ttl: Duration) -> Result<Beat, BackplaneError>;

    /// Takes every entry of a dead gateway offline, then forgets it. Safe to run on several
    /// gateways at once, and again after a failure half way.
    async fn reap(&self, dead: &str) -> Result<(), BackplaneError>;

    /// At shutdown, after the last write: declares this gateway dead, so that the others
    /// take its entries offline at their next heartbeat.
    async fn leave(&self) -> Result<(), BackplaneError>;
}

/// The payload a presence change is published with.
fn payload(room: ObjectId, user: ObjectId, online: bool) -> Result<String, BackplaneError> {
    serde_json::to_string(&RoomEvent::Presence(PresenceChange {
        room_id: room,
        user_id: user,
        online,
    }))
    .map_err(|e| BackplaneError::Malformed(e.to_string()))
}

/// Presence in Redis (one node or a cluster): see the key table in [`super::keys`].
pub struct RedisPresence {
    keys: Keys,
    client: Client,
    /// This gateway instance's name in Redis; a new one after it was found dead.
    instance: Mutex<String>,
    beaten: AtomicBool,
}

impl RedisPresence {
    pub fn new(client: Client, keys: Keys) -> Self {
        Self {
            keys,
            client,
            instance: Mutex::new(ObjectId::new().to_hex()),
            beaten: AtomicBool::new(false),
        }
    }

    /// Runs the presence script for one entry of `instance`.
    async fn change(
        &self,
        instance: &str,
        room: ObjectId,
        user: ObjectId,
        online: bool,
    ) -> Result<(), BackplaneError> {
        let _: i64 = SCRIPTS
            .presence
            .evalsha_with_reload(
                &self.client,
                vec![self.keys.presence(&room), self.keys.room_channel(&room)],
                vec![
                    instance.to_owned(),
                    user.to_hex(),
                    if online { "1" } else { "0" }.to_owned(),
                    payload(room, user, true)?,
                    payload(room, user, false)?,
                ],
            )
            .await?;
        Ok(())
    }
}

#[async_trait]
impl Presence for RedisPresence {
    fn instance(&self) -> String {
        self.instance
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    async fn set_as(
        &self,
        instance: &str,
        room: ObjectId,
        user: ObjectId,
        online: bool,
    ) -> Result<(), BackplaneError> {
        let held = self.keys.presence_held(instance);
        let entry = format!("{} {}", room.to_hex(), user.to_hex());
        // Listed before it is set, and unlisted after it is unset: whoever reaps this
        // instance finds every entry it may hold.
        if online {
            let _: i64 = self.client.sadd(&held, entry).await?;
            self.change(instance, room, user, true).await
        } else {
            self.change(instance, room, user, false).await?;
            let _: i64 = self.client.srem(&held, entry).await?;
            Ok(())
        }
    }

    async fn online(&self, room: ObjectId) -> Result<Vec<ObjectId>, BackplaneError> {
        let fields: Vec<String> = self.client.hkeys(self.keys.presence(&room)).await?;
        Ok(fields
            .iter()
            .filter_map(|f| ObjectId::parse_str(f.strip_prefix("u:")?).ok())
            .collect())
    }

    async fn heartbeat(&self, ttl: Duration) -> Result<Beat, BackplaneError> {
        let instance = self.instance();
        let first = !self.beaten.load(Ordering::Relaxed);
        let replacement = ObjectId::new().to_hex();
        let reply: Vec<Value> = SCRIPTS
            .presence_heartbeat
            .evalsha_with_reload(
                &self.client,
                vec![self.keys.presence_gateways(), self.keys.presence_dead()],
                vec![
                    instance.clone(),
                    ttl.as_millis().to_string(),
                    if first { "1" } else { "0" }.to_owned(),
                    replacement.clone(),
                ],
            )
            .await?;
        self.beaten.store(true, Ordering::Relaxed);
        let mut reply = reply.into_iter();
        let listed = reply.next().and_then(|v| v.as_i64()) == Some(1);
        let renamed_from = (!listed).then(|| {
            tracing::warn!(
                gateway = %instance,
                now = %replacement,
                "this gateway's presence heartbeat had expired (was it paused?): its users were taken offline; setting them again"
            );
            *self.instance.lock().unwrap_or_else(|e| e.into_inner()) = replacement;
            instance
        });
        Ok(Beat {
            renamed_from,
            dead: reply.filter_map(|v| v.into_string()).collect(),
        })
    }

    async fn reap(&self, dead: &str) -> Result<(), BackplaneError> {
        let held = self.keys.presence_held(dead);
        loop {
            let entries: Vec<String> = self.client.srandmember(&held, Some(REAP_BATCH)).await?;
            if entries.is_empty() {
                break;
            }
            // A batch at once: the client pipelines them on its connections.
            let changes = entries.iter().filter_map(|entry| {
                let (room, user) = entry.split_once(' ')?;
                let (room, user) = (
                    ObjectId::parse_str(room).ok()?,
                    ObjectId::parse_str(user).ok()?,
                );
                Some(self.change(dead, room, user, false))
            });
            futures::future::try_join_all(changes).await?;
            let _: i64 = self.client.srem(&held, entries.clone()).await?;
            metrics::counter!("chat_gateway_presence_reaped_total").increment(entries.len() as u64);
        }
        let _: i64 = self.client.srem(self.keys.presence_dead(), dead).await?;
        tracing::info!(gateway = dead, "a dead gateway's users are offline");
        Ok(())
    }

    async fn leave(&self) -> Result<(), BackplaneError> {
        let instance = self.instance();
        // Dead first: between the two commands the instance is in both sets (harmless),
        // never in neither (it would never be reaped).
        let _: i64 = self
            .client
            .sadd(self.keys.presence_dead(), &instance)
            .await?;
        let _: i64 = self
            .client
            .zrem(self.keys.presence_gateways(), &instance)
            .await?;
        Ok(())
    }
}

/// Presence in one process (the embedded mode), announced through the in-process
/// backplane.
pub struct MemoryPresence {
    online: Mutex<HashMap<ObjectId, HashSet<ObjectId>>>,
    backplane: Arc<dyn Backplane>,
}

impl MemoryPresence {
    pub fn new(backplane: Arc<dyn Backplane>) -> Self {
        Self {
            online: Mutex::default(),
            backplane,
        }
    }
}

#[async_trait]
impl Presence for MemoryPresence {
    fn instance(&self) -> String {
        "embedded".to_owned()
    }

    async fn set_as(
        &self,
        _instance: &str,
        room: ObjectId,
        user: ObjectId,
        online: bool,
    ) -> Result<(), BackplaneError> {
        // One gateway: its own count of sockets decides; here only the state is kept.
        let changed = {
            let mut rooms = self.online.lock().unwrap_or_else(|e| e.into_inner());
            if online {
                rooms.entry(room).or_default().insert(user)
            } else {
                let users = rooms.get_mut(&room);
                let removed = users.is_some_and(|users| users.remove(&user));
                if rooms.get(&room).is_some_and(HashSet::is_empty) {
                    rooms.remove(&room);
                }
                removed
            }
        };
        if changed {
            let change = PresenceChange {
                room_id: room,
                user_id: user,
                online,
            };
            self.backplane
                .publish(&[RoomEvent::Presence(change)])
                .await?;
        }
        Ok(())
    }

    async fn online(&self, room: ObjectId) -> Result<Vec<ObjectId>, BackplaneError> {
        let rooms = self.online.lock().unwrap_or_else(|e| e.into_inner());
        Ok(rooms
            .get(&room)
            .map(|users| users.iter().copied().collect())
            .unwrap_or_default())
    }

    async fn heartbeat(&self, _ttl: Duration) -> Result<Beat, BackplaneError> {
        Ok(Beat::default())
    }

    async fn reap(&self, _dead: &str) -> Result<(), BackplaneError> {
        Ok(())
    }

    async fn leave(&self) -> Result<(), BackplaneError> {
        Ok(())
    }
}
