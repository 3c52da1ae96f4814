//! Gap-free live delivery: a socket that stays connected gets every message of its rooms
//! once and in `seq` order, whatever pub/sub loses on the way; a socket that comes back
//! catches up with `join_room {afterSeq}`.
//!
//! The first tests lose messages on purpose (stored, never published; or published with
//! a hole before them) and watch the gateway repair them from the store. The last ones run
//! 1,000 messages through two gateways while pub/sub connections are killed, a persister
//! dies between storing and publishing, or the partition's holder is paused until another
//! takes over, on a single Redis and on a Redis Cluster.

mod common;

use common::procs::{ChaosProxy, Proc};
use common::servers::redis_cli;
use common::sio::{SioClient, TIMEOUT};
use common::{TestApp, chat_message, eventually, metric, send_quickly, wait_ready};
use serde_json::{Value, json};
use shared::backplane::{Keys, group_by_room};
use shared::store::{SequencedMessage, Store};
use std::time::{Duration, Instant};

/// Stores messages `seqs` of `room` directly, as a persister would, without publishing them.
async fn store_only(app: &TestApp, room: &str, seqs: std::ops::RangeInclusive<u64>) -> Vec<Value> {
    let room = room.parse().unwrap();
    let messages: Vec<SequencedMessage> = seqs
        .map(|seq| {
            let mut message = chat_message(room, &format!("stored-only {seq}"));
            message.seq = Some(seq);
            SequencedMessage {
                seq: seq as i64,
                message,
            }
        })
        .collect();
    app.store().await.insert_messages(&messages).await.unwrap();
    messages
        .iter()
        .map(|m| json!(m.message.id.to_hex()))
        .collect()
}

/// Stores message `seq` of `room` and publishes it on the room's channel, as a persister
/// would (so that whatever came before it and was never published is a gap).
async fn store_and_publish(app: &TestApp, room: &str, seq: u64) -> Value {
    let ids = store_only(app, room, seq..=seq).await;
    // The room's counter moves on as if these had been appended.
    let keys = Keys::new(&app.prefix, 16);
    let partition = keys.partition_of(&room.parse().unwrap());
    redis_cli(
        app.redis_port(),
        &["HSET", &keys.ingest_seq(partition), room, &seq.to_string()],
    )
    .await;
    let stored = app
        .store()
        .await
        .messages_after(room.parse().unwrap(), seq - 1, 1)
        .await
        .unwrap();
    let event = serde_json::to_string(&group_by_room(&stored)[0]).unwrap();
    let channel = Keys::new(&app.prefix, 16).room_channel(&room.parse().unwrap());
    redis_cli(app.redis_port(), &["SPUBLISH", &channel, &event]).await;
    ids[0].clone()
}

/// Takes `n` `message` events and returns their ids, checking that their `seq` run on from
/// `first_seq` without a gap or a repeat.
async fn take_in_seq(client: &SioClient, first_seq: u64, n: usize) -> Vec<Value> {
    let mut ids = Vec::with_capacity(n);
    for i in 0..n as u64 {
        let m = client.next("message").await;
        assert_eq!(m["seq"], json!(first_seq + i), "message {i}: {m}");
        ids.push(m["id"].clone());
    }
    ids
}

/// Every Redis node of the test: the cluster's, or the one.
fn redis_ports(app: &TestApp) -> Vec<u16> {
    match &app.cluster {
        Some(cluster) => cluster.nodes.iter().map(|n| n.port).collect(),
        None => vec![app.redis.port],
    }
}

async fn counter(app: &TestApp, gateway: usize, name: &str) -> f64 {
    metric(app.gateways[gateway].admin_port, name)
        .await
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hole_before_a_live_message_is_filled_from_the_store_first() {
    let app = TestApp::spawn(1).await;
    if app.skip_when_embedded("no pub/sub to lose messages") {
        return;
    }
    let (ann, _) = app.user("ann").await;
    let (bob, bob_id) = app.user("bob").await;
    let room = app.room(&ann, &[&bob_id]).await;
    let mut a = app.member(0, &ann, &[&room]).await;
    let b = app.member(0, &bob, &[&room]).await;
    let sent = send_quickly(&mut a, &room, 3).await;
    assert_eq!(take_in_seq(&b, 1, 3).await, sent);

    // 4, 5 and 6 were stored and their publication was lost; 7 arrives.
    let mut expected = store_only(&app, &room, 4..=6).await;
    expected.push(store_and_publish(&app, &room, 7).await);
    assert_eq!(take_in_seq(&b, 4, 4).await, expected);
    assert_eq!(
        counter(&app, 0, "chat_gateway_messages_repaired_total").await,
        3.0
    );
    assert!(counter(&app, 0, "chat_gateway_gaps_total").await >= 1.0);

    // 8 was stored and its publication lost, with nothing after it to reveal the hole: the
    // gateway finds it when its pub/sub connection comes back.
    let lost_last = store_only(&app, &room, 8..=8).await;
    for port in redis_ports(&app) {
        redis_cli(port, &["CLIENT", "KILL", "TYPE", "pubsub"]).await;
    }
    assert_eq!(take_in_seq(&b, 8, 1).await, lost_last);
    assert!(b.pending("message").is_empty());
}

/// Redis drops the command connections of the gateways and the persister every 5 ms while
/// 600 messages are sent in bursts of 10: appends, reads and publishes are in flight when
/// their connection drops, and the Redis client sends them again on the next. Every member
/// on either gateway gets the room's stored messages 1..N once each, in order, each
/// acknowledged message among them once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn six_hundred_messages_survive_command_connections_dropped_every_5_ms() {
    use fred::interfaces::ClientLike;
    use fred::types::{ClusterHash, CustomCommand};
    let app = TestApp::spawn(2).await;
    if app.skip_when_embedded("no Redis") || app.skip_when_cluster("one node's connections") {
        return;
    }
    let (ann, _) = app.user("ann").await;
    let (bob, bob_id) = app.user("bob").await;
    let (cat, cat_id) = app.user("cat").await;
    let room = app.room(&ann, &[&bob_id, &cat_id]).await;
    let mut sender = app.member(0, &ann, &[&room]).await;
    let members = [
        app.member(1, &bob, &[&room]).await,
        app.member(0, &cat, &[&room]).await,
    ];
    let killer = shared::backplane::connect_client(&shared::config::RedisSettings {
        url: Some(app.redis_url()),
        prefix: "killer".into(),
        pubsub_capacity: 16,
    })
    .await
    .unwrap();
    let stop = tokio_util::sync::CancellationToken::new();
    let killing = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let kill = CustomCommand::new_static("CLIENT", ClusterHash::Random, false);
            let mut kills = 0u32;
            while !stop.is_cancelled() {
                let killed: Result<fred::types::Value, _> = killer
                    .custom(kill.clone(), vec!["KILL", "TYPE", "normal"])
                    .await;
                kills += u32::from(killed.is_ok());
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            kills
        })
    };
    let mut acked = Vec::new();
    for burst in 0..60 {
        let answers: Vec<_> = (0..10)
            .map(|i| {
                sender.emit_with_ack(
                    "send_message",
                    vec![json!({ "roomId": room, "content": format!("{burst}.{i}") })],
                )
            })
            .collect();
        for answer in answers {
            if let Ok(Ok(ack)) = tokio::time::timeout(TIMEOUT, answer).await
                && ack["ok"] == json!(true)
            {
                acked.push(ack["id"].clone());
            }
        }
    }
    stop.cancel();
    let kills = killing.await.unwrap();
    assert!(kills > 100, "{kills} kills");
    assert!(
        acked.len() > 300,
        "only {} of 600 acknowledged",
        acked.len()
    );
    // What the store holds, 1..N: every member gets exactly that, in order.
    let store = app.store().await;
    let room_id = room.parse().unwrap();
    let mut latest = 0;
    eventually(
        "every acknowledged message stored",
        Duration::from_secs(30),
        || {
            let (store, acked) = (&store, &acked);
            async move {
                let stored = store.messages_after(room_id, 0, 10_000).await.unwrap();
                let ids: std::collections::HashSet<Value> =
                    stored.iter().map(|m| json!(m.id.to_hex())).collect();
                acked.iter().all(|id| ids.contains(id))
            }
        },
    )
    .await;
    let stored = store.messages_after(room_id, 0, 10_000).await.unwrap();
    for (i, m) in stored.iter().enumerate() {
        assert_eq!(
            m.seq,
            Some(i as u64 + 1),
            "stored seqs 1..N, one message each"
        );
        latest = i as u64 + 1;
    }
    let expected: Vec<Value> = stored.iter().map(|m| json!(m.id.to_hex())).collect();
    for member in &members {
        assert_eq!(take_in_seq(member, 1, latest as usize).await, expected);
    }
    let unique: std::collections::HashSet<&Value> = expected.iter().collect();
    assert_eq!(unique.len(), expected.len(), "no message twice");
}

/// A replay never goes past a hole: while a message of the range is not stored yet (a batch
/// stored in part, its first message still being retried), `join_room {afterSeq}` reads
/// again a few times and is then refused with `UNAVAILABLE`, having replayed nothing. Once
/// the hole is stored, the same join replays every message of the range, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_stops_at_a_hole_and_is_given_whole_once_the_hole_is_stored() {
    let app = TestApp::spawn(2).await;
    if app.skip_when_embedded("stores directly into MongoDB") {
        return;
    }
    let (ann, _) = app.user("ann").await;
    let (bob, bob_id) = app.user("bob").await;
    let room = app.room(&ann, &[&bob_id]).await;
    let mut a = app.member(0, &ann, &[&room]).await;
    let sent = send_quickly(&mut a, &room, 5).await;
    common::receive_until(&a, &sent[4]).await;
    let later = store_only(&app, &room, 7..=8).await;

    // Bob's gateway has no feed of the room yet: it starts at the store's latest, 8.
    let mut b = app.member(1, &bob, &[]).await;
    let refused = b
        .request("join_room", json!({ "roomId": room, "afterSeq": 5 }))
        .await;
    assert_eq!(refused["ok"], json!(false), "{refused}");
    assert_eq!(refused["error"]["code"], json!("UNAVAILABLE"));
    assert_eq!(b.count("message"), 0, "nothing replayed past the hole");

    let mut expected = store_only(&app, &room, 6..=6).await;
    expected.extend(later);
    let ack = b
        .request("join_room", json!({ "roomId": room, "afterSeq": 5 }))
        .await;
    assert_eq!(ack["ok"], json!(true), "{ack}");
    assert_eq!(ack["replayed"], json!(3));
    assert_eq!(take_in_seq(&b, 6, 3).await, expected);
}

/// Redis's counter falls behind the store (as after a failover to a replica that missed the
/// last appends): the numbers it gives again are held by stored messages. The new messages
/// are numbered after the store's latest, in the order they were accepted, and delivered
/// once each; the store keeps one message per number.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_counter_behind_the_store_numbers_new_messages_after_the_stored_ones() {
    let app = TestApp::spawn(2).await;
    if app.skip_when_embedded("no Redis counter to fall behind") {
        return;
    }
    let (ann, _) = app.user("ann").await;
    let (bob, bob_id) = app.user("bob").await;
    let room = app.room(&ann, &[&bob_id]).await;
    let mut a = app.member(0, &ann, &[&room]).await;
    let b = app.member(1, &bob, &[&room]).await;
    let first = send_quickly(&mut a, &room, 3).await;
    assert_eq!(take_in_seq(&b, 1, 3).await, first);

    let keys = Keys::new(&app.prefix, 16);
    let partition = keys.partition_of(&room.parse().unwrap());
    redis_cli(
        app.redis_port(),
        &["HSET", &keys.ingest_seq(partition), &room, "1"],
    )
    .await;
    let late = send_quickly(&mut a, &room, 4).await;
    assert_eq!(
        take_in_seq(&b, 4, 4).await,
        late,
        "after the stored ones, in order"
    );
    let stored = common::history(&app, &bob, &room).await;
    let mut numbers: Vec<(u64, Value)> = stored
        .iter()
        .map(|m| (m["seq"].as_u64().unwrap(), m["id"].clone()))
        .collect();
    numbers.sort_by_key(|(seq, _)| *seq);
    let expected: Vec<(u64, Value)> = (1..=7).zip(first.into_iter().chain(late)).collect();
    assert_eq!(numbers, expected, "one message per number");
    // The counter is past them: the next message follows on, live.
    let next = send_quickly(&mut a, &room, 1).await;
    assert_eq!(take_in_seq(&b, 8, 1).await, next);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gap_beyond_the_repair_limit_sends_resync_and_a_rejoin_replays_it() {
    let mut app = TestApp::spawn(0).await;
    if app.skip_when_embedded("no pub/sub to lose messages") {
        return;
    }
    let g = app.add_gateway_with(|s| s.gap_repair_max = 3).await;
    let (ann, _) = app.user("ann").await;
    let (bob, bob_id) = app.user("bob").await;
    let room = app.room(&ann, &[&bob_id]).await;
    let mut a = app.member(g, &ann, &[&room]).await;
    let mut b = app.member(g, &bob, &[&room]).await;
    let sent = send_quickly(&mut a, &room, 2).await;
    assert_eq!(take_in_seq(&b, 1, 2).await, sent);

    // Six lost (more than GAP_REPAIR_MAX), then 9 arrives.
    let mut missed = store_only(&app, &room, 3..=8).await;
    missed.push(store_and_publish(&app, &room, 9).await);
    let resync = b.next("resync").await;
    assert_eq!(resync, json!({ "roomId": room, "afterSeq": 2 }));
    assert_eq!(counter(&app, g, "chat_gateway_resyncs_total").await, 1.0);
    // Out of the room until it catches up: nothing arrives out of order meanwhile.
    assert!(b.pending("message").is_empty());

    let ack = b
        .request("join_room", json!({ "roomId": room, "afterSeq": 2 }))
        .await;
    // The replay came before the ack.
    assert_eq!(b.count("message"), 7);
    assert_eq!(
        ack,
        json!({ "ok": true, "roomId": room, "replayed": 7, "hasMore": false })
    );
    assert_eq!(take_in_seq(&b, 3, 7).await, missed);
    // And live again, right after the replay.
    let next = a
        .request("send_message", json!({ "roomId": room, "content": "live" }))
        .await;
    let live = b.next("message").await;
    assert_eq!(
        (live["id"].clone(), live["seq"].clone()),
        (next["id"].clone(), json!(10))
    );
}

/// Joining again a room the socket is in (a client added back to a room whose removal
/// failed, say) replays nothing: the socket has been sent every message since it joined,
/// some perhaps not read yet. Found by the chaos run (seed 301), where such a join sent 30
/// messages a second time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn joining_again_a_room_the_socket_is_in_replays_nothing() {
    let app = TestApp::spawn(1).await;
    let (ann, _) = app.user("ann").await;
    let (bob, bob_id) = app.user("bob").await;
    let room = app.room(&ann, &[&bob_id]).await;
    let mut a = app.member(0, &ann, &[&room]).await;
    let mut b = app.member(0, &bob, &[&room]).await;
    send_quickly(&mut a, &room, 5).await;
    take_in_seq(&b, 1, 5).await;
    // Five more on their way to b, read or not: b asks again from seq 2.
    send_quickly(&mut a, &room, 5).await;
    let ack = b
        .request("join_room", json!({ "roomId": room, "afterSeq": 2 }))
        .await;
    assert_eq!(
        ack,
        json!({ "ok": true, "roomId": room, "replayed": 0, "hasMore": false })
    );
    take_in_seq(&b, 6, 5).await;
    let live = a
        .request("send_message", json!({ "roomId": room, "content": "live" }))
        .await;
    let next = b.next("message").await;
    assert_eq!(
        (next["id"].clone(), next["seq"].clone()),
        (live["id"].clone(), json!(11))
    );
    assert!(b.pending("message").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_away_for_200_messages_rejoins_with_after_seq_and_gets_exactly_those() {
    let mut app = TestApp::spawn(0).await;
    // A replay limit under 200 on the second gateway shows `hasMore` and the REST pages.
    let g0 = app.add_gateway().await;
    let g1 = app.add_gateway_with(|s| s.replay_limit = 150).await;
    let (ann, _) = app.user("ann").await;
    let (bob, bob_id) = app.user("bob").await;
    let room = app.room(&ann, &[&bob_id]).await;
    let mut a = app.member(g0, &ann, &[&room]).await;
    let b = app.member(g0, &bob, &[&room]).await;
    send_quickly(&mut a, &room, 5).await;
    take_in_seq(&b, 1, 5).await;
    drop(b);

    let away = send_quickly(&mut a, &room, 200).await;
    let mut back = SioClient::with_token(app.port(g0), &bob).await;
    let ack = back
        .request("join_room", json!({ "roomId": room, "afterSeq": 5 }))
        .await;
    // The replay reaches as far as this gateway delivered; the last few may still be on
    // their way from the persister and follow live, right behind it.
    assert_eq!(
        (ack["ok"].clone(), ack["hasMore"].clone()),
        (json!(true), json!(false))
    );
    assert!(ack["replayed"].as_u64().unwrap() <= 200, "{ack}");
    assert_eq!(take_in_seq(&back, 6, 200).await, away);
    let live = a
        .request("send_message", json!({ "roomId": room, "content": "live" }))
        .await;
    let next = back.next("message").await;
    assert_eq!(
        (next["id"].clone(), next["seq"].clone()),
        (live["id"].clone(), json!(206))
    );
    assert!(back.pending("message").is_empty());

    // A replay from 0 is the whole room; a bad `afterSeq` is refused and joins nothing.
    let mut fresh = SioClient::with_token(app.port(g0), &bob).await;
    let bad = fresh
        .request("join_room", json!({ "roomId": room, "afterSeq": -1 }))
        .await;
    assert_eq!(bad["error"]["code"], json!("BAD_REQUEST"), "{bad}");
    let ack = fresh
        .request("join_room", json!({ "roomId": room, "afterSeq": 0 }))
        .await;
    assert_eq!(ack["replayed"], json!(206));

    // On a gateway replaying at most 150: the rest is paged over REST. (An embedded
    // gateway is a server of its own, with its own database.)
    if app.embedded {
        return;
    }
    let mut other = SioClient::with_token(app.port(g1), &bob).await;
    let ack = other
        .request("join_room", json!({ "roomId": room, "afterSeq": 5 }))
        .await;
    assert_eq!(
        ack,
        json!({ "ok": true, "roomId": room, "replayed": 150, "hasMore": true })
    );
    take_in_seq(&other, 6, 150).await;
    let (status, page) = app
        .call(
            "GET",
            &format!("/chat/rooms/{room}/messages?afterSeq=155&limit=100"),
            Some(&bob),
            None,
        )
        .await;
    assert_eq!(status, 200);
    let seqs: Vec<u64> = page
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(seqs, (156..=206).collect::<Vec<_>>());
}

/// What goes wrong while the 1,000 messages flow.
#[derive(Clone, Copy, Debug)]
enum Fault {
    /// `CLIENT KILL TYPE pubsub` on every Redis node, twice.
    PubsubKilledTwice,
    /// The persister holding the room's partition loses MongoDB's answer to an insert (the
    /// insert may be stored) and is killed before it publishes; another takes over.
    PersisterKilledBeforePublish,
    /// The holder of the room's partition is paused until another takes it over, then
    /// resumed (its late publish and acknowledge are fenced off).
    HolderPaused,
}

/// Two gateways, two persister processes (each behind its own MongoDB proxy), a sender and
/// three members: two on the other gateway, one on the sender's. 1,000 messages while
/// `fault` happens; every member gets all of them once, in order, `seq` 1 to 1,000.
async fn thousand_messages_survive(cluster: bool, fault: Fault) {
    const N: usize = 1000;
    let mut app = TestApp::spawn_with(0, cluster).await;
    if app.skip_when_embedded("no Redis") {
        return;
    }
    app.persister_stop.cancel();
    app.gateway_process(&[]).await;
    app.gateway_process(&[]).await;
    let proxies = [
        ChaosProxy::start(app.mongo.port).await,
        ChaosProxy::start(app.mongo.port).await,
    ];
    let mut persisters: Vec<(Proc, u16)> = Vec::new();
    for (name, proxy) in ["p1", "p2"].iter().zip(&proxies) {
        let uri = format!("mongodb://127.0.0.1:{}/?directConnection=true", proxy.port);
        persisters.push(app.persister_process(name, &[("MONGODB_URI", uri)]).await);
    }
    let (ann, _) = app.user("ann").await;
    let mut others = Vec::new();
    for name in ["bob", "cat", "dan"] {
        others.push(app.user(name).await);
    }
    let ids: Vec<&str> = others.iter().map(|(_, id)| id.as_str()).collect();
    let room = app.room(&ann, &ids).await;
    let mut sender = app.member(0, &ann, &[&room]).await;
    let members = vec![
        app.member(1, &others[0].0, &[&room]).await,
        app.member(1, &others[1].0, &[&room]).await,
        app.member(0, &others[2].0, &[&room]).await,
    ];
    let keys = Keys::new(&app.prefix, 16);
    let partition = keys.partition_of(&room.parse().unwrap());
    app.wait_shard_numsub(&keys.room_channel(&room.parse().unwrap()), 2)
        .await;
    let redis_ports = redis_ports(&app);
    let holder = || async {
        let lease = redis_cli(app.redis_port(), &["GET", &keys.ingest_lease(partition)]).await;
        lease.trim().split('/').next().unwrap_or("").to_owned()
    };

    let flow = send_numbered(&mut sender, &room, N);
    let trouble = async {
        let seen = &members[0];
        let after = |n: usize| async move {
            eventually("the flow is under way", TIMEOUT, || async {
                seen.count("message") >= n
            })
            .await
        };
        match fault {
            Fault::PubsubKilledTwice => {
                for at in [250, 600] {
                    after(at).await;
                    for port in &redis_ports {
                        redis_cli(*port, &["CLIENT", "KILL", "TYPE", "pubsub"]).await;
                    }
                }
            }
            Fault::PersisterKilledBeforePublish => {
                after(300).await;
                let name = holder().await;
                let i = usize::from(name == "p2");
                proxies[i].cut();
                persisters[i].0.kill();
            }
            Fault::HolderPaused => {
                after(300).await;
                let name = holder().await;
                let i = usize::from(name == "p2");
                persisters[i].0.signal("STOP");
                eventually(
                    "another persister took the partition over",
                    TIMEOUT,
                    || async {
                        let now = holder().await;
                        !now.is_empty() && now != name
                    },
                )
                .await;
                after(500).await;
                persisters[i].0.signal("CONT");
            }
        }
    };
    let (sent, ()) = tokio::join!(flow, trouble);
    for member in &members {
        assert_eq!(take_in_seq(member, 1, N).await, sent, "{fault:?}");
    }
    // Nothing more: no duplicate trailing behind.
    let last = sender
        .request("send_message", json!({ "roomId": room, "content": "end" }))
        .await;
    for member in &members {
        let m = member.next("message").await;
        assert_eq!(
            (m["id"].clone(), m["seq"].clone()),
            (last["id"].clone(), json!(N + 1))
        );
    }
    for (i, g) in app.gateways.iter().enumerate() {
        wait_ready(g.admin_port).await;
        let repaired = counter(&app, i, "chat_gateway_messages_repaired_total").await;
        let dropped = counter(&app, i, "chat_gateway_duplicates_suppressed_total").await;
        eprintln!(
            "{fault:?}: gateway {i} repaired {repaired} messages, dropped {dropped} duplicates"
        );
    }
}

/// Sends `n` messages with a `clientMsgId` each, up to 20 unanswered at a time, retrying a
/// refused or unanswered one as a client would; returns the ids in order.
async fn send_numbered(client: &mut SioClient, room: &str, n: usize) -> Vec<Value> {
    let mut acked: Vec<Value> = Vec::with_capacity(n);
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut next = 0;
    while next < n {
        let window: Vec<usize> = (next..n.min(next + 20)).collect();
        let acks: Vec<_> = window
            .iter()
            .map(|i| {
                client.emit_with_ack(
                    "send_message",
                    vec![json!({ "roomId": room, "content": format!("m{i}"), "clientMsgId": format!("m-{i}") })],
                )
            })
            .collect();
        let mut all_ok = true;
        for ack in acks {
            match tokio::time::timeout(Duration::from_secs(5), ack).await {
                // One socket's events are handled in order: acks come in `seq` order.
                Ok(Ok(ack)) if ack["ok"] == json!(true) => acked.push(ack["id"].clone()),
                _ => all_ok = false,
            }
        }
        assert!(Instant::now() < deadline, "the flow did not finish");
        if all_ok {
            next += window.len();
        } else {
            // Resent whole: the clientMsgIds make the retries of accepted ones no-ops.
            acked.truncate(next);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    acked
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_messages_survive_pubsub_killed_twice() {
    thousand_messages_survive(false, Fault::PubsubKilledTwice).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_messages_survive_pubsub_killed_twice_on_a_cluster() {
    thousand_messages_survive(true, Fault::PubsubKilledTwice).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_messages_survive_a_persister_killed_before_publishing() {
    thousand_messages_survive(false, Fault::PersisterKilledBeforePublish).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_messages_survive_a_persister_killed_before_publishing_on_a_cluster() {
    thousand_messages_survive(true, Fault::PersisterKilledBeforePublish).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_messages_survive_a_paused_holder() {
    thousand_messages_survive(false, Fault::HolderPaused).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_messages_survive_a_paused_holder_on_a_cluster() {
    thousand_messages_survive(true, Fault::HolderPaused).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_user_gets_nothing_more_even_if_the_removal_notice_is_lost() {
    let app = TestApp::spawn(2).await;
    if app.skip_when_embedded("no pub/sub to lose the notice") {
        return;
    }
    let (ann, _) = app.user("ann").await;
    let (bob, bob_id) = app.user("bob").await;
    let (cat, cat_id) = app.user("cat").await;
    let room = app.room(&ann, &[&bob_id, &cat_id]).await;
    let mut a = app.member(0, &ann, &[&room]).await;
    let mut b = app.member(1, &bob, &[&room]).await;
    let c = app.member(1, &cat, &[&room]).await;
    let first = send_quickly(&mut a, &room, 1).await;
    assert_eq!(take_in_seq(&b, 1, 1).await, first);
    take_in_seq(&c, 1, 1).await;

    // What `DELETE …/participants/:bob` does, but its notice on the control channel never
    // goes out: the store and Redis's count of removals know, the gateways were not told.
    let room_id = room.parse().unwrap();
    let store = app.store().await;
    store
        .remove_participant(room_id, bob_id.parse().unwrap())
        .await
        .unwrap();
    let keys = Keys::new(&app.prefix, 16);
    redis_cli(
        app.redis_port(),
        &[
            "HINCRBY",
            &keys.ingest_members(keys.partition_of(&room_id)),
            &room,
            "1",
        ],
    )
    .await;

    let after = send_quickly(&mut a, &room, 3).await;
    assert_eq!(take_in_seq(&c, 2, 3).await, after);
    assert!(
        b.pending("message").is_empty(),
        "the removed user received {:?}",
        b.pending("message")
    );
    // And its next send is refused: the gateway asks the store again.
    let refused = b
        .request(
            "send_message",
            json!({ "roomId": room, "content": "still here?" }),
        )
        .await;
    assert_eq!(refused["error"]["code"], json!("FORBIDDEN"), "{refused}");
}
