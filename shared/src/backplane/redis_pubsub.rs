//! The gateway's Redis backplane: appends go to the ingest partitions
//! ([`super::redis_ingest::IngestWriter`]); room events travel on sharded pub/sub
//! (`SPUBLISH` / `SSUBSCRIBE`, Redis 7.0 or later), so in a cluster a room's traffic touches
//! only the shard that owns its channel.

use super::redis_ingest::IngestWriter;
use super::redis_util::{connect_checked, subscriber_builder};
use super::{Appended, Backplane, BackplaneError, IngestSettings, Keys, MissedSink, RoomEventSink};
use crate::config::RedisSettings;
use crate::wire::{ChatMessage, RoomEvent};
use async_trait::async_trait;
use fred::clients::SubscriberClient;
use fred::prelude::*;
use mongodb::bson::oid::ObjectId;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// How often every shard subscription is confirmed again. Redis drops the subscriptions of
/// a slot that moves to another shard with a notice the client library does not surface;
/// subscribing again (a no-op where nothing moved) restores them within this time.
const SUBSCRIPTION_REFRESH: Duration = Duration::from_secs(5);

/// Pause before subscribing again after a refused resubscription (Redis still `LOADING`
/// after a restart, `CLUSTERDOWN` or `TRYAGAIN` during a failover, a permission taken
/// away), doubling up to [`RESUBSCRIBE_RETRY_MAX`]: the gateway keeps trying until every
/// channel is subscribed, however long that takes.
const RESUBSCRIBE_RETRY: Duration = Duration::from_millis(250);
const RESUBSCRIBE_RETRY_MAX: Duration = Duration::from_secs(5);

/// The Redis backplane of a gateway.
pub struct RedisBackplane {
    keys: Keys,
    commands: Client,
    ingest: IngestWriter,
    subscriber: Option<SubscriberClient>,
    /// False from the moment the subscriber connection fails until every room channel was
    /// subscribed again on the new connection: room events published meanwhile are lost
    /// for this process, so it reports itself not ready.
    subscriptions_live: Arc<AtomicBool>,
}

impl RedisBackplane {
    /// Connects for publishing and appending only.
    pub async fn connect(
        settings: &RedisSettings,
        ingest: &IngestSettings,
    ) -> Result<Self, BackplaneError> {
        let keys = Keys::new(&settings.prefix, ingest.partitions);
        let commands = connect_checked(settings, &keys).await?;
        Ok(Self {
            ingest: IngestWriter::connect(settings, ingest, keys.clone()).await?,
            keys,
            commands,
            subscriber: None,
            subscriptions_live: Arc::new(AtomicBool::new(true)),
        })
    }

    /// Connects and delivers the events of subscribed rooms to `sink` (the gateway's use).
    /// Subscriptions are restored after every reconnect; `missed` is called once they are,
    /// and whenever this process fell behind, because events may have been lost meanwhile.
    pub async fn connect_with_sink(
        settings: &RedisSettings,
        ingest: &IngestSettings,
        sink: RoomEventSink,
        missed: MissedSink,
    ) -> Result<Self, BackplaneError> {
        let mut backplane = Self::connect(settings, ingest).await?;
        let subscriber = subscriber_builder(settings)?.build_subscriber_client()?;
        let task = super::redis_util::init(&subscriber).await?;
        super::redis_util::supervise(subscriber.clone(), task);
        backplane.watch_subscriptions(&subscriber, missed.clone());
        subscriber
            .ssubscribe(backplane.keys.control_channel())
            .await?;
        let mut rx = subscriber.message_rx();
        let keys = backplane.keys.clone();
        tokio::spawn(async move {
            use tokio::sync::broadcast::error::RecvError;
            // The most messages ever seen waiting in the buffer: what REDIS_PUBSUB_CAPACITY
            // must hold, measured rather than guessed. Set only when it grows.
            let mut most = 0;
            loop {
                match rx.recv().await {
                    Ok(message) => {
                        let waiting = rx.len() + 1;
                        if waiting > most {
                            most = waiting;
                            metrics::gauge!("chat_gateway_backplane_pubsub_backlog_max_messages")
                                .set(most as f64);
                        }
                        dispatch(&keys, &sink, message)
                    }
                    Err(RecvError::Lagged(n)) => {
                        metrics::counter!("chat_gateway_backplane_lagged_total").increment(n);
                        tracing::error!(
                            lost = n,
                            "pub/sub fan-out fell behind and Redis messages were lost (the rooms are repaired from the store); raise REDIS_PUBSUB_CAPACITY"
                        );
                        missed();
                    }
                    Err(RecvError::Closed) => break,
                }
            }
        });
        backplane.subscriber = Some(subscriber);
        Ok(backplane)
    }

    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    /// Restores the subscriptions after every reconnect, trying again until they are all in
    /// place, and keeps `subscriptions_live` true only while they are, so that readiness can
    /// tell a gateway that would miss room events.
    fn watch_subscriptions(&self, subscriber: &SubscriberClient, missed: MissedSink) {
        let mut errors = subscriber.error_rx();
        let mut reconnects = subscriber.reconnect_rx();
        let live = self.subscriptions_live.clone();
        let subscriber = subscriber.clone();
        tokio::spawn(async move {
            use tokio::sync::broadcast::error::RecvError;
            use tokio::time::Instant;
            let mut refresh = tokio::time::interval(SUBSCRIPTION_REFRESH);
            refresh.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            // While the subscriptions are not all in place: when to try again, and the pause
            // after that.
            let mut retry: Option<(Instant, Duration)> = None;
            loop {
                let retry_at = retry.map_or_else(Instant::now, |(at, _)| at);
                tokio::select! {
                    // Errors first: one that is older than a reconnect must not undo the
                    // resubscription that followed it.
                    biased;
                    error = errors.recv() => {
                        match error {
                            Ok((error, _)) => {
                                if live.swap(false, Ordering::SeqCst) {
                                    tracing::warn!(%error, "Redis subscriber connection lost; room events are missed until it is back");
                                }
                            }
                            Err(RecvError::Lagged(_)) => live.store(false, Ordering::SeqCst),
                            Err(RecvError::Closed) => break,
                        }
                        // Not live until every channel is subscribed again, whether or not a
                        // reconnect is reported after this.
                        retry.get_or_insert((Instant::now() + RESUBSCRIBE_RETRY, RESUBSCRIBE_RETRY));
                    }
                    reconnect = reconnects.recv() => match reconnect {
                        Ok(_) | Err(RecvError::Lagged(_)) => {
                            live.store(false, Ordering::SeqCst);
                            retry = Some((Instant::now(), RESUBSCRIBE_RETRY));
                        }
                        Err(RecvError::Closed) => break,
                    },
                    _ = tokio::time::sleep_until(retry_at), if retry.is_some() => {
                        match resubscribe(&subscriber).await {
                            Ok(channels) => {
                                retry = None;
                                live.store(true, Ordering::SeqCst);
                                metrics::counter!("chat_gateway_resubscribes_total").increment(1);
                                tracing::info!(channels, "Redis subscriber reconnected and resubscribed");
                                // Whatever was published while the connection was down is
                                // stored by now (publishing follows storing).
                                missed();
                            }
                            Err(error) => {
                                let pause = retry.map_or(RESUBSCRIBE_RETRY, |(_, pause)| pause);
                                metrics::counter!("chat_gateway_resubscribe_failures_total").increment(1);
                                tracing::warn!(%error, retry_in_ms = pause.as_millis() as u64, "resubscribing after a Redis reconnect failed; room events are missed until it succeeds");
                                retry = Some((Instant::now() + pause, (pause * 2).min(RESUBSCRIBE_RETRY_MAX)));
                            }
                        }
                    }
                    _ = refresh.tick() => {
                        if live.load(Ordering::SeqCst)
                            && let Err(error) = resubscribe(&subscriber).await
                        {
                            tracing::debug!(%error, "confirming the shard subscriptions failed");
                        }
                    }
                }
            }
        });
    }

    fn subscriber(&self) -> Result<&SubscriberClient, BackplaneError> {
        self.subscriber.as_ref().ok_or_else(|| {
            BackplaneError::Config("this backplane was built without a subscriber".into())
        })
    }
}

/// Subscribes every tracked shard channel again, one `SSUBSCRIBE` per hash slot (a
/// cluster refuses channels of several slots in one command). Returns how many.
async fn resubscribe(subscriber: &SubscriberClient) -> Result<usize, BackplaneError> {
    let channels = subscriber.tracked_shard_channels();
    let count = channels.len();
    for (_, group) in fred::util::group_by_hash_slot(channels)? {
        subscriber.ssubscribe(Vec::from(group)).await?;
    }
    Ok(count)
}

fn dispatch(keys: &Keys, sink: &RoomEventSink, message: fred::types::Message) {
    let decoded = message
        .value
        .as_bytes()
        .ok_or_else(|| "not a string".to_owned())
        .and_then(|b| serde_json::from_slice::<RoomEvent>(b).map_err(|e| e.to_string()));
    if *message.channel == *keys.control_channel() {
        match decoded {
            Ok(event @ (RoomEvent::MemberRemoved(_) | RoomEvent::RoomAdded(_))) => sink(event),
            Ok(_) => tracing::warn!("room event on the control channel ignored"),
            Err(error) => tracing::warn!(%error, "undecodable control event ignored"),
        }
        return;
    }
    let Some(room) = keys.room_of_channel(&message.channel) else {
        return;
    };
    match decoded {
        Ok(event) if event.room_id() == room => sink(event),
        Ok(_) => tracing::warn!(%room, "room event on another room's channel ignored"),
        Err(error) => tracing::warn!(%room, %error, "undecodable room event ignored"),
    }
}

#[async_trait]
impl Backplane for RedisBackplane {
    async fn append(
        &self,
        message: &ChatMessage,
        idempotency_key: Option<&str>,
    ) -> Result<Appended, BackplaneError> {
        self.ingest.append(message, idempotency_key).await
    }

    async fn seed_seq(&self, room: ObjectId, latest: u64) -> Result<(), BackplaneError> {
        self.ingest.seed_seq(room, latest).await
    }

    async fn publish(&self, events: &[RoomEvent]) -> Result<(), BackplaneError> {
        if events.is_empty() {
            return Ok(());
        }
        let pipeline = self.commands.pipeline();
        for event in events {
            let json = serde_json::to_string(event)
                .map_err(|e| BackplaneError::Malformed(e.to_string()))?;
            let _: () = pipeline.spublish(self.keys.channel_of(event), json).await?;
        }
        let _: Vec<Value> = pipeline.all().await?;
        Ok(())
    }

    async fn members_changed(&self, room: ObjectId) -> Result<(), BackplaneError> {
        let partition = self.keys.partition_of(&room);
        let _: i64 = self
            .commands
            .hincrby(self.keys.ingest_members(partition), room.to_hex(), 1)
            .await?;
        Ok(())
    }

    async fn members_version(&self, room: ObjectId) -> Result<u64, BackplaneError> {
        let partition = self.keys.partition_of(&room);
        let count: Option<u64> = self
            .commands
            .hget(self.keys.ingest_members(partition), room.to_hex())
            .await?;
        Ok(count.unwrap_or(0))
    }

    async fn subscribe(&self, room: ObjectId) -> Result<(), BackplaneError> {
        self.subscriber()?
            .ssubscribe(self.keys.room_channel(&room))
            .await?;
        metrics::gauge!("chat_gateway_redis_subscriptions").increment(1);
        Ok(())
    }

    async fn unsubscribe(&self, room: ObjectId) -> Result<(), BackplaneError> {
        self.subscriber()?
            .sunsubscribe(self.keys.room_channel(&room))
            .await?;
        metrics::gauge!("chat_gateway_redis_subscriptions").decrement(1);
        Ok(())
    }

    async fn ping(&self) -> Result<(), BackplaneError> {
        let _: String = self.commands.ping(None).await?;
        if let Some(subscriber) = &self.subscriber
            && (!subscriber.is_connected() || !self.subscriptions_live.load(Ordering::SeqCst))
        {
            return Err(BackplaneError::SubscriptionsDown);
        }
        Ok(())
    }
}
