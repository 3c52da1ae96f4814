//! Every tier scaled out on a real Redis Cluster (3 masters, 3 replicas): two gateways and
//! three persister processes. The partitions spread over the persisters; a master, a
//! persister and a paused persister are lost under load, and every acknowledged message is
//! stored once, in order, and delivered. The contract suites run on a cluster too
//! (`CHAT_TEST_REDIS=cluster cargo test --test socket --test rest`).

mod common;

use common::servers::{redis_cli, try_redis_cli};
use common::sio::{SioClient, TIMEOUT};
use common::{
    TestApp, eventually, history, metric, metrics_text, partition_shares, receive_until, wait_ready,
};
use serde_json::{Value, json};
use shared::backplane::Keys;
use std::time::{Duration, Instant};

/// A test app on a Redis Cluster (or a single Redis), whatever `CHAT_TEST_REDIS` says,
/// with its in-process persisters stopped: the tests run persister processes they can kill.
async fn app_on(gateways: usize, cluster: bool) -> Option<TestApp> {
    let app = TestApp::spawn_with(gateways, cluster).await;
    if app.skip_when_embedded("no Redis") {
        return None;
    }
    app.persister_stop.cancel();
    Some(app)
}

/// The ids of a room's stored messages, oldest first, once there are at least `expected`
/// (the persisters may still be storing the last ones acknowledged).
async fn stored_ids(app: &TestApp, token: &str, room: &str, expected: usize) -> Vec<Value> {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let ids: Vec<Value> = history(app, token, room)
            .await
            .iter()
            .map(|m| m["id"].clone())
            .collect();
        if ids.len() >= expected || Instant::now() > deadline {
            return ids;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The holder of each partition's lease, by partition.
async fn holders(app: &TestApp) -> Vec<String> {
    let keys = Keys::new(&app.prefix, 16);
    let mut holders = Vec::new();
    for p in 0..16 {
        let holder = redis_cli(app.redis_port(), &["GET", &keys.ingest_lease(p)]).await;
        holders.push(holder.trim().to_owned());
    }
    holders
}

/// Sends `n` messages to `room` with a `clientMsgId` each, retrying a refused or
/// unanswered send (as a client would) until it is acknowledged; returns the ids in order.
async fn send_all(client: &mut SioClient, room: &str, tag: &str, n: usize) -> Vec<Value> {
    let mut ids = Vec::with_capacity(n);
    for i in 0..n {
        let body = json!({ "roomId": room, "content": format!("{tag}{i}"), "clientMsgId": format!("{tag}-{i}") });
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let ack = tokio::time::timeout(
                Duration::from_secs(5),
                client.emit_with_ack("send_message", vec![body.clone()]),
            )
            .await;
            if let Ok(Ok(ack)) = &ack
                && ack["ok"] == json!(true)
            {
                ids.push(ack["id"].clone());
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{tag}{i} never acknowledged: {ack:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitions_spread_over_every_persister_and_move_when_one_dies_or_pauses() {
    let Some(mut app) = app_on(2, true).await else {
        return;
    };
    let mut persisters = Vec::new();
    for name in ["p1", "p2", "p3"] {
        persisters.push(app.persister_process(name, &[]).await);
    }
    let admins: Vec<u16> = persisters.iter().map(|(_, admin)| *admin).collect();
    // Each of the three holds 5 or 6 partitions, and every partition has exactly one holder.
    eventually("16 partitions shared out 6/5/5", TIMEOUT, || async {
        partition_shares(&admins).await == [5.0, 5.0, 6.0]
    })
    .await;
    let held = holders(&app).await;
    assert!(held.iter().all(|h| !h.is_empty()), "{held:?}");
    for name in ["p1/", "p2/", "p3/"] {
        let count = held.iter().filter(|h| h.starts_with(name)).count();
        assert!((5..=6).contains(&count), "{name} holds {count}: {held:?}");
    }

    // Traffic in four rooms while one persister is killed and another is paused past its
    // lease, then resumed: nothing is lost, stored twice or reordered.
    let (ann, _) = app.user("ann").await;
    let (bob, bob_id) = app.user("bob").await;
    let mut rooms = Vec::new();
    for _ in 0..4 {
        rooms.push(app.room(&ann, &[&bob_id]).await);
    }
    let room_refs: Vec<&str> = rooms.iter().map(String::as_str).collect();
    let mut a = app.member(0, &ann, &[]).await;
    let b = app.member(1, &bob, &room_refs).await;

    let mut sent: Vec<Vec<Value>> = vec![Vec::new(); rooms.len()];
    for (r, room) in rooms.iter().enumerate() {
        sent[r].extend(send_all(&mut a, room, "before", 30).await);
    }
    persisters[0].0.kill();
    persisters[1].0.signal("STOP");
    for (r, room) in rooms.iter().enumerate() {
        sent[r].extend(send_all(&mut a, room, "during", 30).await);
    }
    // The third persister takes every partition once the two leases expire (LEASE_MS 1 s).
    eventually(
        "the last running persister holds all 16",
        TIMEOUT,
        || async { metric(admins[2], "chat_persister_partitions_owned").await == Some(16.0) },
    )
    .await;
    persisters[1].0.signal("CONT");
    for (r, room) in rooms.iter().enumerate() {
        sent[r].extend(send_all(&mut a, room, "after", 30).await);
    }
    // The resumed one finds its leases gone, stops working on them, and takes its share
    // back: two live persisters, 8 each.
    eventually(
        "the resumed persister takes its share again",
        TIMEOUT,
        || async {
            metric(admins[1], "chat_persister_partitions_owned").await == Some(8.0)
                && metric(admins[2], "chat_persister_partitions_owned").await == Some(8.0)
        },
    )
    .await;
    for (r, room) in rooms.iter().enumerate() {
        let stored = stored_ids(&app, &bob, room, sent[r].len()).await;
        assert_eq!(
            stored, sent[r],
            "room {r}: stored once each, in the acknowledged order"
        );
    }
    // Live delivery: per room, what reached the socket is in order and without duplicates.
    let barrier = a
        .request(
            "send_message",
            json!({ "roomId": rooms[0], "content": "end" }),
        )
        .await;
    let mut seen: Vec<Vec<Value>> = vec![Vec::new(); rooms.len()];
    loop {
        let m = b.next("message").await;
        let r = rooms
            .iter()
            .position(|room| m["roomId"] == json!(room))
            .unwrap();
        if m["id"] == barrier["id"] {
            break;
        }
        seen[r].push(m["id"].clone());
    }
    for (r, got) in seen.iter().enumerate() {
        let positions: Vec<usize> = got
            .iter()
            .map(|id| {
                sent[r]
                    .iter()
                    .position(|s| s == id)
                    .expect("a sent message")
            })
            .collect();
        assert!(
            positions.windows(2).all(|w| w[0] < w[1]),
            "room {r}: delivered out of order or twice: {positions:?}"
        );
    }
    drop(persisters);
    app.gateways.clear();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_master_killed_mid_flow_loses_no_acknowledged_message() {
    let Some(mut app) = app_on(0, true).await else {
        return;
    };
    let replicas = [("INGEST_MIN_REPLICAS", "1".to_owned())];
    app.gateway_process(&replicas).await;
    app.gateway_process(&replicas).await;
    let (_p1, _) = app.persister_process("p1", &replicas).await;
    let (_p2, _) = app.persister_process("p2", &replicas).await;
    let (ann, _) = app.user("ann").await;
    let (bob, bob_id) = app.user("bob").await;
    let room = app.room(&ann, &[&bob_id]).await;
    let mut a = app.member(0, &ann, &[]).await;
    let b = app.member(1, &bob, &[&room]).await;

    let keys = Keys::new(&app.prefix, 16);
    let stream = keys.ingest_stream(keys.partition_of(&room.parse().unwrap()));
    let mut sent = send_all(&mut a, &room, "before", 100).await;
    let master = app
        .cluster
        .as_ref()
        .unwrap()
        .master_of(&stream)
        .await
        .expect("a master serves the partition");
    app.cluster.as_mut().unwrap().node(master).kill();
    // Sends go on through the failover: refused or unanswered ones are retried with the
    // same clientMsgId. Those acknowledged before the kill were confirmed by the replica
    // (INGEST_MIN_REPLICAS=1), which the cluster promotes. The promoted master has no
    // replica until the old one rejoins as its replica; until then sends to that shard are
    // refused (never acknowledged unreplicated).
    let cluster = app.cluster.as_mut().unwrap();
    let during = send_all(&mut a, &room, "during", 50);
    let failover = async {
        // A replica took over once the cluster serves the slot from another node.
        let deadline = Instant::now() + Duration::from_secs(30);
        while cluster
            .master_of(&stream)
            .await
            .is_none_or(|now| now == master)
        {
            assert!(Instant::now() < deadline, "no replica took over");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        cluster.wait_healthy().await;
        cluster.node(master).restart().await;
    };
    let (during, ()) = tokio::join!(during, failover);
    sent.extend(during);
    sent.extend(send_all(&mut a, &room, "after", 50).await);

    let stored = stored_ids(&app, &bob, &room, sent.len()).await;
    assert_eq!(
        stored, sent,
        "every acknowledged message stored once, in order"
    );
    // Live delivery resumed with nothing restarted: the gateways are ready again and a
    // message sent now reaches the member on the other gateway.
    for gw in &app.gateways {
        wait_ready(gw.admin_port).await;
    }
    let last = a
        .request("send_message", json!({ "roomId": room, "content": "live" }))
        .await;
    receive_until(&b, &last["id"]).await;
}

/// Redis drops subscribers that fall behind (`client-output-buffer-limit pubsub`); here
/// every pub/sub connection of every node is dropped at once, while messages flow. The
/// gateways subscribe again by themselves (as Redis itself counts), are ready again, and
/// live delivery goes on.
/// Two gateway processes (each with metrics of its own) and a persister process, and a
/// room with a member on each gateway, both subscribed as Redis counts them.
struct TwoMembers {
    app: TestApp,
    _persister: common::procs::Proc,
    persister_admin: u16,
    room: String,
    channel: String,
    a: SioClient,
    b: SioClient,
}

async fn two_members(cluster: bool) -> Option<TwoMembers> {
    let mut app = app_on(0, cluster).await?;
    app.gateway_process(&[]).await;
    app.gateway_process(&[]).await;
    let (persister, persister_admin) = app.persister_process("p1", &[]).await;
    let (ann, _) = app.user("ann").await;
    let (bob, bob_id) = app.user("bob").await;
    let room = app.room(&ann, &[&bob_id]).await;
    let a = app.member(0, &ann, &[&room]).await;
    let b = app.member(1, &bob, &[&room]).await;
    let channel = Keys::new(&app.prefix, 16).room_channel(&room.parse().unwrap());
    app.wait_shard_numsub(&channel, 2).await;
    Some(TwoMembers {
        app,
        _persister: persister,
        persister_admin,
        room,
        channel,
        a,
        b,
    })
}

async fn a_dropped_pubsub_connection_is_resubscribed(cluster: bool) {
    let Some(TwoMembers {
        app,
        room,
        channel,
        mut a,
        b,
        // Bound, not `..`: an unbound field would be dropped here, and the process with it.
        _persister,
        ..
    }) = two_members(cluster).await
    else {
        return;
    };
    let resubscribes = |admin| async move {
        metric(admin, "chat_gateway_resubscribes_total")
            .await
            .unwrap_or(0.0)
    };
    let before: Vec<f64> =
        futures::future::join_all(app.gateways.iter().map(|g| resubscribes(g.admin_port))).await;
    let ports: Vec<u16> = match &app.cluster {
        Some(cluster) => cluster.nodes.iter().map(|n| n.port).collect(),
        None => vec![app.redis.port],
    };
    let flow = send_all(&mut a, &room, "flow", 50);
    let kill = async {
        for port in &ports {
            redis_cli(*port, &["CLIENT", "KILL", "TYPE", "pubsub"]).await;
        }
    };
    let (_sent, ()) = tokio::join!(flow, kill);
    for (g, before) in app.gateways.iter().zip(before) {
        eventually("the gateway resubscribed", TIMEOUT, || async {
            resubscribes(g.admin_port).await > before
        })
        .await;
        wait_ready(g.admin_port).await;
    }
    app.wait_shard_numsub(&channel, 2).await;
    let ack = a
        .request(
            "send_message",
            json!({ "roomId": room, "content": "after" }),
        )
        .await;
    receive_until(&b, &ack["id"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_pubsub_connection_is_resubscribed_on_a_single_redis() {
    a_dropped_pubsub_connection_is_resubscribed(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_pubsub_connection_is_resubscribed_on_a_cluster() {
    a_dropped_pubsub_connection_is_resubscribed(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_room_channel_whose_slot_moves_to_another_shard_is_subscribed_there() {
    let Some(TwoMembers {
        app,
        room,
        channel,
        mut a,
        b,
        // Bound, not `..`: an unbound field would be dropped here, and the process with it.
        _persister,
        persister_admin,
    }) = two_members(true).await
    else {
        return;
    };

    // Move the slot of the room's partition (its stream, lease and channel) to another
    // master, the way `redis-cli --cluster reshard` does.
    let cluster = app.cluster.as_ref().unwrap();
    let any = cluster.any_port();
    let slot = redis_cli(any, &["CLUSTER", "KEYSLOT", &channel]).await;
    let slot = slot.trim();
    let from = cluster
        .master_of(&channel)
        .await
        .expect("a master serves it");
    let mut masters = Vec::new();
    for node in &cluster.nodes {
        let role = redis_cli(node.port, &["ROLE"]).await;
        if role.starts_with("master") {
            masters.push(node.port);
        }
    }
    let to = *masters.iter().find(|&&p| p != from).unwrap();
    let id = |port: u16| async move {
        redis_cli(port, &["CLUSTER", "MYID"])
            .await
            .trim()
            .to_owned()
    };
    let (from_id, to_id) = (id(from).await, id(to).await);
    redis_cli(to, &["CLUSTER", "SETSLOT", slot, "IMPORTING", &from_id]).await;
    redis_cli(from, &["CLUSTER", "SETSLOT", slot, "MIGRATING", &to_id]).await;
    loop {
        let keys = redis_cli(from, &["CLUSTER", "GETKEYSINSLOT", slot, "100"]).await;
        let keys: Vec<&str> = keys.lines().filter(|k| !k.is_empty()).collect();
        if keys.is_empty() {
            break;
        }
        let port = to.to_string();
        let mut args = vec!["MIGRATE", "127.0.0.1", &port, "", "0", "5000", "KEYS"];
        args.extend(keys);
        redis_cli(from, &args).await;
    }
    for port in std::iter::once(to).chain(masters.iter().copied().filter(|&p| p != to)) {
        redis_cli(port, &["CLUSTER", "SETSLOT", slot, "NODE", &to_id]).await;
    }
    assert_eq!(cluster.master_of(&channel).await, Some(to));

    // Redis drops the subscriptions on the old shard; the gateways subscribe on the new one.
    common::servers::wait_shard_numsub(&[to], &channel, 2).await;
    for gw in &app.gateways {
        wait_ready(gw.admin_port).await;
    }
    let ack = a
        .request(
            "send_message",
            json!({ "roomId": room, "content": "moved" }),
        )
        .await;
    assert_eq!(ack["ok"], json!(true), "{ack}");
    // The persister follows the partition to its new shard too; if its lease renewal fell
    // into the migration it takes the lease again first (LEASE_MS 1 s here), so this may
    // take longer than one event's usual wait on a loaded machine.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !b.pending("message").iter().any(|m| m["id"] == ack["id"]) {
        if Instant::now() > deadline {
            let state = where_it_stands(&app, persister_admin, &room).await;
            panic!(
                "the message did not reach the member on the other gateway within 30 s\n{state}"
            );
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// What a failed delivery test needs to say where the message stopped: the room's ingest
/// partition in Redis (its stream, consumer group and lease) and the services' counters of
/// retries, losses and resubscriptions.
async fn where_it_stands(app: &TestApp, persister_admin: u16, room: &str) -> String {
    let keys = Keys::new(&app.prefix, 16);
    let partition = keys.partition_of(&room.parse().unwrap());
    let (stream, lease) = (keys.ingest_stream(partition), keys.ingest_lease(partition));
    let port = app.redis_port();
    let mut out = format!("partition {partition}:\n");
    for args in [
        vec!["XLEN", stream.as_str()],
        vec!["XINFO", "GROUPS", stream.as_str()],
        vec!["GET", lease.as_str()],
        vec!["PTTL", lease.as_str()],
    ] {
        let reply = try_redis_cli(port, &args)
            .await
            .unwrap_or_else(|error| error);
        out.push_str(&format!(
            "  {}: {}\n",
            args.join(" "),
            reply.trim().replace('\n', " ")
        ));
    }
    let counters = |admin: u16| async move {
        let text = metrics_text(admin).await?;
        let wanted = [
            "errors",
            "losses",
            "takeovers",
            "restarts",
            "resubscribes",
            "gaps",
            "resyncs",
            "lagged",
            "messages_total",
            "deliveries",
        ];
        Some(
            text.lines()
                .filter(|l| !l.starts_with('#') && wanted.iter().any(|w| l.contains(w)))
                .collect::<Vec<_>>()
                .join("\n    "),
        )
    };
    out.push_str(&format!(
        "  persister:\n    {}\n",
        counters(persister_admin).await.unwrap_or_default()
    ));
    for (i, gw) in app.gateways.iter().enumerate() {
        out.push_str(&format!(
            "  gateway {i}:\n    {}\n",
            counters(gw.admin_port).await.unwrap_or_default()
        ));
    }
    out
}
