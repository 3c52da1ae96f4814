//! The Redis ingest against a real `redis-server`: the partition count check, the bound on
//! a partition's backlog, leases with fencing tokens, and every change of read position
//! (pending after a takeover, new entries, back to pending after a failed read).

mod common;

use common::servers::Redis;
use common::{TestApp, chat_message as message};
use serde_json::json;
use shared::ObjectId;
use shared::backplane::{
    Appended, Backplane, BackplaneError, Ingest, IngestSettings, ReadPosition, RedisBackplane,
    RedisIngest, group_by_room,
};
use shared::config::RedisSettings;
use shared::wire::ChatMessage;
use std::time::Duration;

fn redis_settings(redis: &Redis, prefix: &str) -> RedisSettings {
    RedisSettings {
        url: Some(redis.url()),
        prefix: prefix.to_owned(),
        pubsub_capacity: 1024,
    }
}

fn ids(entries: &[shared::backplane::IngestEntry]) -> Vec<String> {
    entries
        .iter()
        .map(|e| e.message.as_ref().unwrap().content.clone())
        .collect()
}

#[tokio::test]
async fn a_process_with_another_partition_count_refuses_to_start() {
    let redis = Redis::start().await;
    let settings = redis_settings(&redis, "count");
    let sixteen = IngestSettings::default();
    RedisIngest::connect(&settings, &sixteen, "p")
        .await
        .unwrap();
    let eight = IngestSettings {
        partitions: 8,
        ..IngestSettings::default()
    };
    let Err(refused) = RedisBackplane::connect(&settings, &eight).await else {
        panic!("a gateway with 8 partitions started against 16");
    };
    let text = refused.to_string();
    assert!(
        text.contains("INGEST_PARTITIONS is 8") && text.contains("holds 16"),
        "{text}"
    );
    assert!(matches!(refused, BackplaneError::Config(_)));
}

/// A process started while Redis is down (restarting, failing over) waits for it rather
/// than exiting. Seen in the chaos run: gateways restarted while a cluster master was down
/// exited, and were restarted again and again.
#[tokio::test]
async fn a_process_started_while_redis_is_down_waits_for_it() {
    let mut redis = Redis::start().await;
    let settings = redis_settings(&redis, "late");
    redis.kill();
    let connecting = tokio::spawn(async move {
        RedisBackplane::connect(&settings, &IngestSettings::default())
            .await
            .map(drop)
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!connecting.is_finished(), "gave up at once");
    redis.restart().await;
    connecting.await.unwrap().unwrap();
}

#[tokio::test]
async fn a_full_partition_refuses_appends_and_the_others_go_on() {
    let redis = Redis::start().await;
    let settings = redis_settings(&redis, "full");
    let ingest = IngestSettings {
        max_backlog: 3,
        ..IngestSettings::default()
    };
    let backplane = RedisBackplane::connect(&settings, &ingest).await.unwrap();
    let room = ObjectId::new();
    backplane.seed_seq(room, 0).await.unwrap();
    for i in 0..3 {
        let appended = backplane.append(&message(room, &i.to_string()), None).await;
        assert_eq!(appended.unwrap(), Appended::New { seq: i + 1 });
    }
    let full = backplane.append(&message(room, "3"), Some("u:r:c")).await;
    let partition = backplane.keys().partition_of(&room);
    assert!(
        matches!(full, Err(BackplaneError::BacklogFull { partition: p, entries: 3 }) if p == partition),
        "{full:?}"
    );
    // Nothing was remembered for the refused send: its retry can succeed later.
    let other_room = (0..)
        .map(|_| ObjectId::new())
        .find(|r| backplane.keys().partition_of(r) != partition)
        .unwrap();
    backplane.seed_seq(other_room, 0).await.unwrap();
    assert_eq!(
        backplane
            .append(&message(other_room, "x"), None)
            .await
            .unwrap(),
        Appended::New { seq: 1 }
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_partition_is_unavailable_to_senders() {
    let mut app = TestApp::spawn(0).await;
    if app.skip_when_embedded("no partitions") {
        return;
    }
    // Nobody stores: the partition fills up.
    app.persister_stop.cancel();
    app.add_gateway_with(|s| s.ingest.max_backlog = 2).await;
    let (ann, _) = app.user("ann").await;
    let room = app.room(&ann, &[]).await;
    let mut a = app.member(0, &ann, &[&room]).await;
    for i in 0..2 {
        let ack = a
            .request(
                "send_message",
                json!({ "roomId": room, "content": format!("{i}") }),
            )
            .await;
        assert_eq!(ack["ok"], json!(true), "{ack}");
    }
    let refused = a
        .request("send_message", json!({ "roomId": room, "content": "full" }))
        .await;
    assert_eq!(
        refused,
        json!({ "ok": false, "error": { "code": "UNAVAILABLE", "message": "service temporarily unavailable" } })
    );
}

/// With `INGEST_MIN_REPLICAS`, the persister reads only what the replicas hold: an append no
/// replica confirmed (its sender was told UNAVAILABLE) stays in the stream, unread, until
/// one does, so that a failover losing it loses it from the store too. Then it is read, and
/// the sender's retry with the same `clientMsgId` answers with it. Found by the chaos run
/// (seed 301): a message stored twice, once from an unconfirmed append that a failover then
/// lost from Redis (with the record of its `clientMsgId`), once from its sender's retry.
#[tokio::test]
async fn entries_no_replica_holds_are_not_read() {
    let redis = Redis::start().await;
    let settings = redis_settings(&redis, "replicas");
    let ingest = IngestSettings {
        min_replicas: 1,
        replica_timeout_ms: 200,
        ..IngestSettings::default()
    };
    let backplane = RedisBackplane::connect(&settings, &ingest).await.unwrap();
    let persister = RedisIngest::connect(&settings, &ingest, "p").await.unwrap();
    let room = ObjectId::new();
    backplane.seed_seq(room, 0).await.unwrap();
    let first = message(room, "one");
    let refused = backplane.append(&first, Some("u:r:k")).await;
    assert!(
        matches!(
            refused,
            Err(BackplaneError::NotReplicated {
                confirmed: 0,
                wanted: 1
            })
        ),
        "{refused:?}"
    );
    let partition = backplane.keys().partition_of(&room);
    let lease = persister
        .acquire(partition, Duration::from_secs(30))
        .await
        .unwrap()
        .unwrap();
    let mut position = ReadPosition::start();
    let unread = persister
        .read(&lease, &mut position, 10, Duration::ZERO)
        .await;
    assert!(
        matches!(unread, Err(BackplaneError::NotReplicated { .. })),
        "{unread:?}"
    );
    // A replica comes and copies everything: the same read now returns the entry.
    let _replica = Redis::replica_of(redis.port).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let read = loop {
        match persister
            .read(&lease, &mut position, 10, Duration::ZERO)
            .await
        {
            Ok(read) => break read,
            Err(BackplaneError::NotReplicated { .. }) => {
                assert!(std::time::Instant::now() < deadline, "no replica confirmed");
            }
            Err(other) => panic!("{other:?}"),
        }
    };
    assert_eq!(ids(&read), ["one"]);
    let retry = backplane
        .append(&message(room, "one"), Some("u:r:k"))
        .await
        .unwrap();
    assert!(
        matches!(retry, Appended::Duplicate { id, seq: 1, same_content: true, .. } if id == first.id),
        "{retry:?}"
    );
}

#[tokio::test]
async fn leases_are_fenced_and_every_read_position_change_loses_and_repeats_nothing() {
    let redis = Redis::start().await;
    let settings = redis_settings(&redis, "lease");
    let ingest = IngestSettings::default();
    let backplane = RedisBackplane::connect(&settings, &ingest).await.unwrap();
    let first = RedisIngest::connect(&settings, &ingest, "same")
        .await
        .unwrap();
    let second = RedisIngest::connect(&settings, &ingest, "same")
        .await
        .unwrap();
    assert_ne!(
        first.instance(),
        second.instance(),
        "one name, two identities"
    );

    let room = ObjectId::new();
    let partition = backplane.keys().partition_of(&room);
    backplane.seed_seq(room, 0).await.unwrap();
    for i in 0..5 {
        backplane
            .append(&message(room, &format!("m{i}")), None)
            .await
            .unwrap();
    }
    let ttl = Duration::from_secs(30);
    let lease = first.acquire(partition, ttl).await.unwrap().unwrap();
    assert_eq!(second.acquire(partition, ttl).await.unwrap(), None);
    assert!(first.renew(&lease, ttl).await.unwrap());
    let owners = second.owners().await.unwrap();
    assert_eq!(
        owners[partition as usize].as_deref(),
        Some(first.instance())
    );

    // A new holder starts with the pending entries (none), then reads new ones.
    let mut position = ReadPosition::start();
    let batch = first
        .read(&lease, &mut position, 2, Duration::ZERO)
        .await
        .unwrap();
    assert_eq!(ids(&batch), ["m0", "m1"]);
    let seqs: Vec<Option<u64>> = batch
        .iter()
        .map(|e| e.message.as_ref().unwrap().seq)
        .collect();
    assert_eq!(seqs, [Some(1), Some(2)], "entries carry their room numbers");
    assert_eq!(position.last(), batch[1].id);
    // A read whose reply was lost (the client library sends the script again after a
    // reconnect): the second run hands out again what the first handed out, then new ones.
    let before = position.clone();
    let lost = first
        .read(&lease, &mut position, 1, Duration::ZERO)
        .await
        .unwrap();
    assert_eq!(ids(&lost), ["m2"]);
    let mut position = before;
    let again = first
        .read(&lease, &mut position, 10, Duration::ZERO)
        .await
        .unwrap();
    assert_eq!(ids(&again), ["m2"], "the entry whose reply was lost");
    let new = first
        .read(&lease, &mut position, 10, Duration::ZERO)
        .await
        .unwrap();
    assert_eq!(ids(&new), ["m3", "m4"]);
    // m0 and m1 are completed (published and acknowledged); the rest stay pending.
    let done: Vec<ChatMessage> = batch.iter().map(|e| e.message.clone().unwrap()).collect();
    first
        .complete(
            &lease,
            &group_by_room(&done),
            &[batch[0].id.clone(), batch[1].id.clone()],
        )
        .await
        .unwrap();
    assert_eq!(first.backlog(partition).await.unwrap(), 3);

    // The lease passes to the other instance (as after an expiry); the first is fenced.
    first.release(&lease).await.unwrap();
    let taken = second.acquire(partition, ttl).await.unwrap().unwrap();
    assert!(taken.token > lease.token, "fencing tokens grow");
    assert!(!first.renew(&lease, ttl).await.unwrap());
    let mut stale = ReadPosition::start();
    assert!(matches!(
        first.read(&lease, &mut stale, 10, Duration::ZERO).await,
        Err(BackplaneError::Fenced(p)) if p == partition
    ));
    assert!(matches!(
        first.complete(&lease, &[], &[new[0].id.clone()]).await,
        Err(BackplaneError::Fenced(_))
    ));
    assert_eq!(
        first.backlog(partition).await.unwrap(),
        3,
        "nothing acknowledged"
    );
    // The new holder gets what the first had read and not completed, in order, then waits
    // for new entries.
    let mut position = ReadPosition::start();
    let pending = second
        .read(&taken, &mut position, 10, Duration::ZERO)
        .await
        .unwrap();
    assert_eq!(ids(&pending), ["m2", "m3", "m4"]);
    let waited = second
        .read(&taken, &mut position, 10, Duration::from_millis(50))
        .await
        .unwrap();
    assert!(waited.is_empty());
    let ids: Vec<String> = pending.iter().map(|e| e.id.clone()).collect();
    second.complete(&taken, &[], &ids).await.unwrap();
    assert_eq!(second.backlog(partition).await.unwrap(), 0);
}

#[tokio::test]
async fn room_numbers_continue_from_the_store_when_redis_has_no_counter() {
    let redis = Redis::start().await;
    let settings = redis_settings(&redis, "seq");
    let backplane = RedisBackplane::connect(&settings, &IngestSettings::default())
        .await
        .unwrap();
    let room = ObjectId::new();
    let counters = backplane
        .keys()
        .ingest_seq(backplane.keys().partition_of(&room));
    // No counter yet: nothing is appended, and the caller is told to seed it.
    assert!(matches!(
        backplane.append(&message(room, "a"), Some("u:r:1")).await,
        Err(BackplaneError::SeqUnknown(r)) if r == room
    ));
    assert_eq!(
        redis
            .cli(&[
                "XLEN",
                &backplane
                    .keys()
                    .ingest_stream(backplane.keys().partition_of(&room))
            ])
            .await
            .trim(),
        "0"
    );
    backplane.seed_seq(room, 10).await.unwrap();
    assert_eq!(
        backplane
            .append(&message(room, "a"), Some("u:r:1"))
            .await
            .unwrap(),
        Appended::New { seq: 11 }
    );
    // A retry keeps its number; a later seed does not move the counter back.
    assert!(matches!(
        backplane
            .append(&message(room, "a"), Some("u:r:1"))
            .await
            .unwrap(),
        Appended::Duplicate { seq: 11, .. }
    ));
    backplane.seed_seq(room, 3).await.unwrap();
    assert_eq!(
        backplane.append(&message(room, "b"), None).await.unwrap(),
        Appended::New { seq: 12 }
    );
    // Redis loses the counter (restarted without its data): the next send is refused
    // until it is seeded again.
    redis.cli(&["DEL", &counters]).await;
    assert!(matches!(
        backplane.append(&message(room, "c"), None).await,
        Err(BackplaneError::SeqUnknown(_))
    ));
}

#[tokio::test]
async fn redis_settings_that_break_durability_are_named() {
    let redis = Redis::start().await;
    let client = shared::backplane::connect_client(&redis_settings(&redis, "conf"))
        .await
        .unwrap();
    // The test Redis runs as production should: append-only, no eviction.
    assert!(
        shared::backplane::durability_warnings(&client)
            .await
            .is_empty()
    );
    redis
        .cli(&["CONFIG", "SET", "maxmemory-policy", "allkeys-lru"])
        .await;
    redis.cli(&["CONFIG", "SET", "appendonly", "no"]).await;
    let warnings = shared::backplane::durability_warnings(&client).await;
    assert_eq!(warnings.len(), 2, "{warnings:?}");
    assert!(warnings[0].contains("maxmemory-policy is allkeys-lru"));
    assert!(warnings[1].contains("appendonly is no"));
}

/// The Redis client sends a command again when its connection dropped with the reply in
/// flight, so every script may run twice. The second run of an append must not take a
/// second number: one message, one number, one entry.
#[tokio::test]
async fn an_append_run_twice_takes_one_number_and_leaves_one_entry() {
    let redis = Redis::start().await;
    let settings = redis_settings(&redis, "twice");
    let backplane = RedisBackplane::connect(&settings, &IngestSettings::default())
        .await
        .unwrap();
    let room = ObjectId::new();
    backplane.seed_seq(room, 0).await.unwrap();
    let stream = backplane
        .keys()
        .ingest_stream(backplane.keys().partition_of(&room));
    let plain = message(room, "without clientMsgId");
    for _ in 0..2 {
        assert_eq!(
            backplane.append(&plain, None).await.unwrap(),
            Appended::New { seq: 1 }
        );
    }
    let keyed = message(room, "with clientMsgId");
    for _ in 0..2 {
        assert_eq!(
            backplane.append(&keyed, Some("u:r:k")).await.unwrap(),
            Appended::New { seq: 2 }
        );
    }
    assert_eq!(redis.cli(&["XLEN", &stream]).await.trim(), "2");
    // A client's retry (a new message, the same clientMsgId) gets the first one back; with
    // other content it is told apart.
    let retry = ChatMessage {
        id: ObjectId::new(),
        ..keyed.clone()
    };
    assert!(matches!(
        backplane.append(&retry, Some("u:r:k")).await.unwrap(),
        Appended::Duplicate { id, seq: 2, same_content: true, .. } if id == keyed.id
    ));
    let other = message(room, "other content");
    assert!(matches!(
        backplane.append(&other, Some("u:r:k")).await.unwrap(),
        Appended::Duplicate {
            seq: 2,
            same_content: false,
            ..
        }
    ));
    assert_eq!(redis.cli(&["XLEN", &stream]).await.trim(), "2");
    let next = message(room, "next");
    assert_eq!(
        backplane.append(&next, None).await.unwrap(),
        Appended::New { seq: 3 },
        "no number was left without a message"
    );
}

/// A lease acquisition run twice answers the same lease, not "held by another".
#[tokio::test]
async fn an_acquisition_run_twice_answers_the_same_lease() {
    let redis = Redis::start().await;
    let settings = redis_settings(&redis, "acquire");
    let ingest = IngestSettings::default();
    let holder = RedisIngest::connect(&settings, &ingest, "p").await.unwrap();
    let other = RedisIngest::connect(&settings, &ingest, "p").await.unwrap();
    let ttl = Duration::from_secs(30);
    let lease = holder.acquire(3, ttl).await.unwrap().unwrap();
    assert_eq!(holder.acquire(3, ttl).await.unwrap(), Some(lease.clone()));
    assert_eq!(other.acquire(3, ttl).await.unwrap(), None);
}

/// Redis's counter behind the store (a failover to a replica that missed the last writes):
/// the room's entries from the first taken number on are appended again after the store's
/// latest, in order, once, whatever else the stream holds.
#[tokio::test]
async fn renumbering_moves_a_rooms_entries_after_the_stores_latest_once() {
    let redis = Redis::start().await;
    let settings = redis_settings(&redis, "renumber");
    let ingest = IngestSettings::default();
    let backplane = RedisBackplane::connect(&settings, &ingest).await.unwrap();
    let persister = RedisIngest::connect(&settings, &ingest, "p").await.unwrap();
    let keys = backplane.keys().clone();
    let room = ObjectId::new();
    let partition = keys.partition_of(&room);
    let neighbour = (0..)
        .map(|_| ObjectId::new())
        .find(|r| keys.partition_of(r) == partition && *r != room)
        .unwrap();
    // The counter restarts at 1 while the store holds 1 to 3.
    backplane.seed_seq(room, 1).await.unwrap();
    backplane.seed_seq(neighbour, 0).await.unwrap();
    let mut sent = Vec::new();
    for (i, r) in [room, neighbour, room, room].into_iter().enumerate() {
        let m = message(r, &format!("m{i}"));
        backplane.append(&m, None).await.unwrap();
        sent.push(m);
    }
    let lease = persister
        .acquire(partition, Duration::from_secs(30))
        .await
        .unwrap()
        .unwrap();
    let mut position = ReadPosition::start();
    let read = persister
        .read(&lease, &mut position, 10, Duration::ZERO)
        .await
        .unwrap();
    let numbers = |entries: &[shared::backplane::IngestEntry]| -> Vec<(String, u64)> {
        entries
            .iter()
            .map(|e| {
                let m = e.message.as_ref().unwrap();
                (m.content.clone(), m.seq.unwrap())
            })
            .collect()
    };
    assert_eq!(
        numbers(&read),
        [("m0", 2), ("m1", 1), ("m2", 3), ("m3", 4)].map(|(c, s)| (c.to_owned(), s))
    );
    let first = read[0].id.clone();
    let done = persister.renumber(&lease, room, &first, 3).await.unwrap();
    assert_eq!(done.moved, 3);
    assert_eq!(done.upto, read[3].id);
    // Run again (a lost reply): the record answers, nothing moves twice.
    assert_eq!(
        persister.renumber(&lease, room, &first, 3).await.unwrap(),
        done
    );
    let stream = keys.ingest_stream(partition);
    assert_eq!(redis.cli(&["XLEN", &stream]).await.trim(), "4");
    let mut position = ReadPosition::start();
    let mut rest = persister
        .read(&lease, &mut position, 10, Duration::ZERO)
        .await
        .unwrap();
    rest.extend(
        persister
            .read(&lease, &mut position, 10, Duration::ZERO)
            .await
            .unwrap(),
    );
    assert_eq!(
        numbers(&rest),
        [("m1", 1), ("m0", 4), ("m2", 5), ("m3", 6)].map(|(c, s)| (c.to_owned(), s)),
        "the neighbour keeps its number; the room's follow the store's latest, in order"
    );
    // A second run of an append of a moved message answers its new number.
    assert_eq!(
        backplane.append(&sent[0], None).await.unwrap(),
        Appended::New { seq: 4 }
    );
    let next = message(room, "next");
    assert_eq!(
        backplane.append(&next, None).await.unwrap(),
        Appended::New { seq: 7 }
    );
    // Only the lease holder renumbers.
    persister.release(&lease).await.unwrap();
    assert!(matches!(
        persister.renumber(&lease, room, &first, 3).await,
        Err(BackplaneError::Fenced(_))
    ));
}
