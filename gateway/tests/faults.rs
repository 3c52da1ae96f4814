//! Faults against real processes: a persister killed, MongoDB cut off, Redis restarted.
//! Every acknowledged message must end up stored once and delivered, in order.

mod common;

use common::procs::ChaosProxy;
use common::sio::{SioClient, TIMEOUT};
use common::{TestApp, eventually, history, metric, send_quickly, wait_ready};
use serde_json::{Value, json};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Receives `ids.len()` messages and checks they are exactly `ids`, in order.
async fn expect_in_order(client: &SioClient, ids: &[Value]) {
    for (i, id) in ids.iter().enumerate() {
        let m = client.next("message").await;
        assert_eq!(&m["id"], id, "message {i} out of order");
    }
}

/// The instance name holding the lease of `room`'s ingest partition (`p1/<id> <token>`).
async fn partition_holder(app: &TestApp, room: &str) -> Option<String> {
    let keys = shared::backplane::Keys::new(&app.prefix, 16);
    let lease = keys.ingest_lease(keys.partition_of(&room.parse().unwrap()));
    let holder = app.redis.cli(&["GET", &lease]).await;
    let name = holder.trim().split('/').next()?.to_owned();
    (!name.is_empty()).then_some(name)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_persister_loses_its_partitions_to_the_other_and_nothing_is_lost() {
    let app = TestApp::spawn(2).await;
    app.persister_stop.cancel();
    let (mut p1, admin1) = app.persister_process("p1", &[]).await;
    let (mut p2, admin2) = app.persister_process("p2", &[]).await;
    let (ann, _) = app.user("ann").await;
    let (bob, bob_id) = app.user("bob").await;
    let room = app.room(&ann, &[&bob_id]).await;
    let mut a = app.member(0, &ann, &[]).await;
    let b = app.member(1, &bob, &[&room]).await;

    // Both work: the 16 partitions are shared out 8 and 8.
    eventually("the partitions are shared out evenly", TIMEOUT, || async {
        metric(admin1, "chat_persister_partitions_owned").await == Some(8.0)
            && metric(admin2, "chat_persister_partitions_owned").await == Some(8.0)
    })
    .await;
    let owner = partition_holder(&app, &room)
        .await
        .expect("the room's partition is held");

    let acks: Vec<_> = (0..300)
        .map(|i| {
            a.emit_with_ack(
                "send_message",
                vec![json!({ "roomId": room, "content": format!("k{i}") })],
            )
        })
        .collect();
    let mut ids = Vec::new();
    for (i, ack) in acks.into_iter().enumerate() {
        if i == 50 {
            // In the middle of the stream, the room's persister dies without a chance to
            // clean up.
            if owner == "p1" { p1.kill() } else { p2.kill() }
        }
        let ack = tokio::time::timeout(TIMEOUT, ack).await.unwrap().unwrap();
        assert_eq!(ack["ok"], json!(true), "{ack}");
        ids.push(ack["id"].clone());
    }
    // The other takes the partition over, reads what the dead one had read and not
    // acknowledged, and delivers the rest: every message once, in the acknowledged order.
    expect_in_order(&b, &ids).await;
    let stored: Vec<Value> = history(&app, &bob, &room)
        .await
        .iter()
        .map(|m| m["id"].clone())
        .collect();
    assert_eq!(stored, ids, "stored exactly once each, in order");
    let barrier = a
        .request("send_message", json!({ "roomId": room, "content": "end" }))
        .await;
    assert_eq!(b.next("message").await["id"], barrier["id"]);
    assert!(
        b.pending("message").is_empty(),
        "a message was delivered twice"
    );
    let survivor = if owner == "p1" { admin2 } else { admin1 };
    eventually("the survivor holds every partition", TIMEOUT, || async {
        metric(survivor, "chat_persister_partitions_owned").await == Some(16.0)
    })
    .await;
    drop((p1, p2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mongodb_cut_off_makes_the_persister_unready_and_it_catches_up() {
    let app = TestApp::spawn(1).await;
    app.persister_stop.cancel();
    let proxy = ChaosProxy::start(app.mongo.port).await;
    let (_p, admin) = app
        .persister_process(
            "p1",
            &[(
                "MONGODB_URI",
                format!("mongodb://127.0.0.1:{}/?directConnection=true", proxy.port),
            )],
        )
        .await;
    let (ann, _) = app.user("ann").await;
    let room = app.room(&ann, &[]).await;
    let mut a = app.member(0, &ann, &[&room]).await;
    let first = a
        .request(
            "send_message",
            json!({ "roomId": room, "content": "before" }),
        )
        .await;
    assert_eq!(a.next("message").await["id"], first["id"]);

    proxy.cut();
    let mut ids = vec![first["id"].clone()];
    for i in 0..20 {
        // Accepted: the ingest stream holds them while MongoDB is unreachable.
        let ack = a
            .request(
                "send_message",
                json!({ "roomId": room, "content": format!("during {i}") }),
            )
            .await;
        assert_eq!(ack["ok"], json!(true), "{ack}");
        ids.push(ack["id"].clone());
    }
    let readyz = format!("http://127.0.0.1:{admin}/readyz");
    eventually(
        "persister reports not ready",
        Duration::from_secs(20),
        || async {
            reqwest::get(&readyz)
                .await
                .map(|r| r.status() == 503)
                .unwrap_or(false)
        },
    )
    .await;
    assert!(
        a.pending("message").is_empty(),
        "nothing is published before it is stored"
    );

    proxy.restore();
    expect_in_order(&a, &ids[1..]).await;
    wait_ready(admin).await;
    let stored: Vec<Value> = history(&app, &ann, &room)
        .await
        .iter()
        .map(|m| m["id"].clone())
        .collect();
    assert_eq!(stored, ids);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restart_is_survived_without_restarting_anything() {
    let mut app = TestApp::spawn(2).await;
    let (ann, _) = app.user("ann").await;
    let (bob, bob_id) = app.user("bob").await;
    let room = app.room(&ann, &[&bob_id]).await;
    let mut a = app.member(0, &ann, &[&room]).await;
    let b = app.member(1, &bob, &[&room]).await;

    // Acknowledged just before Redis dies: the append-only file keeps them.
    let acks: Vec<_> = (0..20)
        .map(|i| {
            a.emit_with_ack(
                "send_message",
                vec![json!({ "roomId": room, "content": format!("r{i}") })],
            )
        })
        .collect();
    let mut ids = Vec::new();
    for ack in acks {
        let ack = tokio::time::timeout(TIMEOUT, ack).await.unwrap().unwrap();
        assert_eq!(ack["ok"], json!(true));
        ids.push(ack["id"].clone());
    }
    app.redis.kill();
    let ack = a
        .request(
            "send_message",
            json!({ "roomId": room, "content": "during the outage" }),
        )
        .await;
    assert_eq!(
        ack["error"]["code"],
        json!("UNAVAILABLE"),
        "never a false ack: {ack}"
    );
    // Readiness drops while Redis is gone, so a load balancer stops sending new clients.
    for gw in &app.gateways {
        let url = format!("http://127.0.0.1:{}/readyz", gw.admin_port);
        let deadline = Instant::now() + Duration::from_secs(10);
        while reqwest::get(&url).await.unwrap().status().is_success() {
            assert!(
                Instant::now() < deadline,
                "{url} stayed ready without Redis"
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
    app.redis.restart().await;
    // Ready again means resubscribed: /readyz answers 200 only once every room channel is
    // subscribed on the new connection. (Live delivery is at most once: what was published
    // while a gateway was resubscribing is in the history only.)
    for gw in &app.gateways {
        wait_ready(gw.admin_port).await;
    }

    // Both gateways just answered a Redis ping, so the first send is normally acked; the
    // retry only covers a connection that drops again right after that check.
    let deadline = Instant::now() + Duration::from_secs(20);
    let probe = loop {
        assert!(
            Instant::now() < deadline,
            "fan-out did not resume after the Redis restart"
        );
        let ack = a
            .request(
                "send_message",
                json!({ "roomId": room, "content": "probe" }),
            )
            .await;
        if ack["ok"] == json!(true) {
            break ack["id"].clone();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    while b.next("message").await["id"] != probe {}
    let stored: Vec<Value> = history(&app, &bob, &room)
        .await
        .iter()
        .map(|m| m["id"].clone())
        .collect();
    for id in &ids {
        assert!(
            stored.contains(id),
            "acknowledged message {id} lost across the Redis restart"
        );
    }
    let after = a
        .request(
            "send_message",
            json!({ "roomId": room, "content": "after" }),
        )
        .await;
    assert_eq!(b.next("message").await["id"], after["id"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_in_flight_work_and_clients_reconnect_elsewhere() {
    let mut app = TestApp::spawn(1).await;
    let g = app
        .gateway_process(&[("SHUTDOWN_DRAIN_SECS", "5".into())])
        .await;
    let (ann, _) = app.user("ann").await;
    let (bob, bob_id) = app.user("bob").await;
    let room = app.room(&ann, &[&bob_id]).await;
    let b = app.member(0, &bob, &[&room]).await;
    let mut a = app.member(g, &ann, &[]).await;

    // A steady load: windows of 20 messages in flight, before and after the SIGTERM, until
    // the gateway closes the connection.
    let (mut acked, mut refused, mut unanswered, mut sent) = (Vec::new(), 0, 0, 0);
    while !a.is_disconnected() && sent < 5_000 {
        let window: Vec<_> = (0..20)
            .map(|i| {
                a.emit_with_ack(
                    "send_message",
                    vec![json!({ "roomId": room, "content": format!("t{}", sent + i) })],
                )
            })
            .collect();
        sent += 20;
        if sent == 100 {
            app.gateways[g].process.as_ref().unwrap().terminate();
        }
        for ack in window {
            match tokio::time::timeout(TIMEOUT, ack)
                .await
                .expect("every ack is answered or dropped")
            {
                Ok(ack) if ack["ok"] == json!(true) => acked.push(ack["id"].clone()),
                // Refused while draining: not accepted, so the client may retry elsewhere.
                Ok(ack) => {
                    assert_eq!(ack["error"]["code"], json!("UNAVAILABLE"), "{ack}");
                    refused += 1;
                }
                Err(_) => unanswered += 1, // the connection closed first: not accepted either
            }
        }
    }
    eprintln!(
        "sent {sent}: acked {}, refused {refused}, unanswered {unanswered}",
        acked.len()
    );
    let status = app.gateways[g]
        .process
        .as_mut()
        .unwrap()
        .wait_exit(Duration::from_secs(10))
        .await;
    assert!(status.success(), "gateway exit status {status}");
    a.wait_disconnected().await;
    assert!(
        !a.was_ns_disconnected(),
        "the transport must close, so that clients reconnect"
    );
    assert!(acked.len() >= 80, "only {} acked", acked.len());

    // The client reconnects to another gateway and reads what it missed.
    let _a = app.member(0, &ann, &[&room]).await;
    let stored: Vec<Value> = history(&app, &ann, &room)
        .await
        .iter()
        .map(|m| m["id"].clone())
        .collect();
    for id in &acked {
        assert!(
            stored.contains(id),
            "acknowledged {id} missing from history"
        );
    }
    // A message whose ack was lost with the connection may be stored (the client retries
    // it with the same clientMsgId); no more than that.
    assert!(stored.len() >= acked.len() && stored.len() <= acked.len() + unanswered);
    drop(b);
}

/// Sends messages `c0, c1, …` one after the other with a `clientMsgId`, moving to another
/// gateway and retrying the same message whenever its gateway goes away, like a client
/// behind a load balancer. Returns the acknowledged ids in order.
async fn resilient_sender(
    ports: Arc<Mutex<Vec<u16>>>,
    token: String,
    room: String,
    stop: tokio_util::sync::CancellationToken,
) -> Vec<Value> {
    let mut acked = Vec::new();
    let mut attempt = 0usize;
    let mut client: Option<SioClient> = None;
    let mut i = 0;
    while !(stop.is_cancelled() && i >= 50) {
        if client.as_ref().is_none_or(|c| c.is_disconnected()) {
            attempt += 1;
            let live = ports.lock().unwrap().clone();
            let port = live[attempt % live.len()];
            client = SioClient::connect(port, Some(json!({ "token": token })), &[])
                .await
                .ok();
            if client.is_none() {
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        }
        let c = client.as_mut().unwrap();
        let rx = c.emit_with_ack(
            "send_message",
            vec![json!({ "roomId": room, "content": format!("c{i}"), "clientMsgId": format!("c{i}") })],
        );
        match tokio::time::timeout(TIMEOUT, rx)
            .await
            .expect("ack answered or dropped")
        {
            Ok(ack) if ack["ok"] == json!(true) => {
                acked.push(ack["id"].clone());
                i += 1;
            }
            Ok(ack) => {
                assert_eq!(ack["error"]["code"], json!("UNAVAILABLE"), "{ack}");
                client = None; // this gateway is draining: go elsewhere and retry
            }
            Err(_) => client = None,
        }
    }
    acked
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_restart_of_every_gateway_and_persister_loses_nothing() {
    let mut app = TestApp::spawn(0).await;
    app.persister_stop.cancel();
    let (mut p1, _) = app.persister_process("p1", &[]).await;
    let (mut p2, _) = app.persister_process("p2", &[]).await;
    let g1 = app.gateway_process(&[]).await;
    let g2 = app.gateway_process(&[]).await;
    // REST calls go to gateway 0; keep it pointed at a live one as we go.
    let (ann, _) = app.user("ann").await;
    let room = app.room(&ann, &[]).await;

    let ports = Arc::new(Mutex::new(vec![app.port(g1), app.port(g2)]));
    let stop = tokio_util::sync::CancellationToken::new();
    let sender = tokio::spawn(resilient_sender(
        ports.clone(),
        ann.clone(),
        room.clone(),
        stop.clone(),
    ));

    for old in [g1, g2] {
        let fresh = app.gateway_process(&[]).await;
        ports.lock().unwrap().push(app.port(fresh));
        let mut proc = app.gateways[old].process.take().unwrap();
        ports
            .lock()
            .unwrap()
            .retain(|p| *p != app.gateways[old].port);
        proc.terminate();
        assert!(proc.wait_exit(Duration::from_secs(15)).await.success());
    }
    for (name, old) in [("p1b", &mut p1), ("p2b", &mut p2)] {
        let (fresh, _) = app.persister_process(name, &[]).await;
        old.terminate();
        assert!(old.wait_exit(Duration::from_secs(15)).await.success());
        *old = fresh;
    }
    stop.cancel();
    let acked = sender.await.unwrap();
    assert!(acked.len() >= 50);

    app.gateways.retain(|g| g.process.is_some());
    let mut stored = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while stored.len() < acked.len() && Instant::now() < deadline {
        stored = history(&app, &ann, &room)
            .await
            .iter()
            .map(|m| m["id"].clone())
            .collect();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let first_difference = stored.iter().zip(&acked).position(|(s, a)| s != a);
    assert!(
        stored.len() == acked.len() && first_difference.is_none(),
        "every acknowledged message stored once, in order: {} stored, {} acked, first difference at {first_difference:?}",
        stored.len(),
        acked.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn persisters_started_with_one_name_share_the_partitions_and_keep_the_order() {
    let app = TestApp::spawn(2).await;
    if app.skip_when_embedded("no persister processes") {
        return;
    }
    app.persister_stop.cancel();
    // Three processes, one name (as when PERSISTER_NAME is left to a shell's $HOSTNAME).
    let mut persisters = Vec::new();
    for _ in 0..3 {
        persisters.push(app.persister_process("same", &[]).await);
    }
    let admins: Vec<u16> = persisters.iter().map(|(_, admin)| *admin).collect();
    eventually("the partitions are shared out 6/5/5", TIMEOUT, || async {
        common::partition_shares(&admins).await == [5.0, 5.0, 6.0]
    })
    .await;
    let (ann, _) = app.user("ann").await;
    let (bob, bob_id) = app.user("bob").await;
    let room = app.room(&ann, &[&bob_id]).await;
    let mut a = app.member(0, &ann, &[]).await;
    let b = app.member(1, &bob, &[&room]).await;
    let ids = send_quickly(&mut a, &room, 200).await;
    expect_in_order(&b, &ids).await;
    drop(persisters);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_stays_ready_while_mongodb_is_unreachable() {
    let mut app = TestApp::spawn(0).await;
    if app.skip_when_embedded("no MongoDB") {
        return;
    }
    let proxy = ChaosProxy::start(app.mongo.port).await;
    let uri = format!("mongodb://127.0.0.1:{}/?directConnection=true", proxy.port);
    app.add_gateway_with(|s| s.mongo.uri = Some(uri)).await;
    let (ann, _) = app.user("ann").await;
    let room = app.room(&ann, &[]).await;
    let mut a = app.member(0, &ann, &[&room]).await;
    let readyz = format!("http://127.0.0.1:{}/readyz", app.gateways[0].admin_port);
    // A room's first message reads its numbering from MongoDB; later ones do not.
    let first = a
        .request(
            "send_message",
            json!({ "roomId": room, "content": "before" }),
        )
        .await;
    assert_eq!(a.next("message").await["id"], first["id"]);

    proxy.cut();
    // The gateway knows MongoDB is gone: reads that need it fail…
    eventually("REST reads fail", Duration::from_secs(20), || async {
        app.call("GET", "/chat/rooms", Some(&ann), None).await.0 == 503
    })
    .await;
    // …but it stays ready (Kubernetes keeps it in the Service), and what does not need
    // MongoDB goes on: a member sends, the message is accepted.
    assert_eq!(reqwest::get(&readyz).await.unwrap().status(), 200);
    let ack = a
        .request(
            "send_message",
            json!({ "roomId": room, "content": "during" }),
        )
        .await;
    assert_eq!(ack["ok"], json!(true), "{ack}");
    assert_eq!(reqwest::get(&readyz).await.unwrap().status(), 200);

    proxy.restore();
    assert_eq!(a.next("message").await["id"], ack["id"]);
}

/// A resubscription that Redis refuses after a reconnect (here a permission taken away; in
/// life `LOADING` after a restart, `CLUSTERDOWN` or `TRYAGAIN` during a failover) is tried
/// again until it succeeds: the gateways are unready meanwhile, ready again once it does,
/// and deliver across gateways again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_resubscription_is_tried_again_until_it_succeeds() {
    let app = TestApp::spawn(2).await;
    if app.skip_when_embedded("no Redis") || app.skip_when_cluster("one node's ACL") {
        return;
    }
    let (ann, _) = app.user("ann").await;
    let (bob, bob_id) = app.user("bob").await;
    let room = app.room(&ann, &[&bob_id]).await;
    let mut a = app.member(0, &ann, &[&room]).await;
    let b = app.member(1, &bob, &[&room]).await;

    app.redis
        .cli(&["ACL", "SETUSER", "default", "-ssubscribe"])
        .await;
    app.redis.cli(&["CLIENT", "KILL", "TYPE", "pubsub"]).await;
    for gw in &app.gateways {
        eventually(
            "a refused resubscription",
            Duration::from_secs(10),
            || async {
                metric(gw.admin_port, "chat_gateway_resubscribe_failures_total")
                    .await
                    .unwrap_or(0.0)
                    >= 2.0
            },
        )
        .await;
        let url = format!("http://127.0.0.1:{}/readyz", gw.admin_port);
        assert!(!reqwest::get(&url).await.unwrap().status().is_success());
    }
    app.redis
        .cli(&["ACL", "SETUSER", "default", "+ssubscribe"])
        .await;
    for gw in &app.gateways {
        wait_ready(gw.admin_port).await;
    }
    let sent = send_quickly(&mut a, &room, 1).await;
    assert_eq!(b.next("message").await["id"], sent[0]);
}

/// 150 `join_room {afterSeq: 0}` in a row, each after a `leave_room` (a join of a room the
/// socket is in replays nothing) and each replaying 500 messages, from a client that never
/// reads: the socket is cut off as a slow consumer, said once in the log, and the joins still
/// queued are answered without a warning each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_replays_to_a_client_that_never_reads_is_logged_once() {
    use futures::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let mut app = TestApp::spawn(0).await;
    if app.skip_when_embedded("a gateway process on Redis and MongoDB") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("gateway.log");
    let (port, admin) = (common::servers::free_port(), common::servers::free_port());
    let env = app.service_env(&[
        ("PORT", port.to_string()),
        ("METRICS_PORT", admin.to_string()),
        ("JWT_SECRET", common::JWT_SECRET.to_owned()),
        ("LOG_FORMAT", "text".to_owned()),
        ("EVENTS_PER_SECOND", "100000".to_owned()),
        ("EVENT_BURST", "100000".to_owned()),
        ("JOINS_PER_SECOND", "100000".to_owned()),
        ("JOIN_BURST", "100000".to_owned()),
    ]);
    let _gateway = common::procs::Proc::spawn_logged("gateway", "gateway", &env, &log);
    wait_ready(admin).await;
    app.gateways.push(common::Gateway {
        port,
        admin_port: admin,
        stop: Default::default(),
        process: None,
    });
    let (ann, _) = app.user("ann").await;
    let room = app.room(&ann, &[]).await;
    let mut a = app.member(0, &ann, &[&room]).await;
    // Long messages: a replay of 500 fills the client's TCP buffers by itself.
    let long = "x".repeat(5_000);
    for burst in 0..5 {
        let acks: Vec<_> = (0..100)
            .map(|i| {
                a.emit_with_ack(
                    "send_message",
                    vec![json!({ "roomId": room, "content": format!("{burst}.{i} {long}") })],
                )
            })
            .collect();
        for ack in acks {
            let ack = tokio::time::timeout(TIMEOUT, ack).await.unwrap().unwrap();
            assert_eq!(ack["ok"], json!(true), "{ack}");
        }
    }
    // A raw client: connects, asks for 150 replays, and reads nothing more.
    let url = format!("ws://127.0.0.1:{port}/socket.io/?EIO=4&transport=websocket");
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    ws.send(Message::text(format!(
        "40/chat,{}",
        json!({ "token": ann })
    )))
    .await
    .unwrap();
    // Its joins after the namespace's answer, as any client sends them.
    loop {
        let frame = tokio::time::timeout(TIMEOUT, ws.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        if frame.to_string().starts_with("40/chat") {
            break;
        }
    }
    for i in 0..150 {
        let join = json!(["join_room", { "roomId": room, "afterSeq": 0 }]);
        let leave = json!(["leave_room", { "roomId": room }]);
        ws.send(Message::text(format!("42/chat,{}{join}", 2 * i)))
            .await
            .unwrap();
        ws.send(Message::text(format!("42/chat,{}{leave}", 2 * i + 1)))
            .await
            .unwrap();
    }
    eventually(
        "cut off as a slow consumer",
        Duration::from_secs(30),
        || async {
            metric(admin, "chat_gateway_slow_consumer_disconnects_total")
                .await
                .unwrap_or(0.0)
                >= 1.0
        },
    )
    .await;
    // The joins still queued are answered by then, or soon after.
    eventually("the joins answered", Duration::from_secs(30), || async {
        let text = common::metrics_text(admin).await.unwrap_or_default();
        let joins: f64 = text
            .lines()
            .filter(|l| l.starts_with("chat_gateway_events_total{") && l.contains("join_room"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum();
        joins >= 150.0
    })
    .await;
    let text = common::metrics_text(admin).await.unwrap();
    assert!(
        !text.contains(r#"chat_gateway_events_total{event="join_room",result="bad_request"}"#),
        "{text}"
    );
    let text = std::fs::read_to_string(&log).unwrap();
    let warnings: Vec<&str> = text.lines().filter(|l| l.contains("WARN")).collect();
    assert!(
        warnings.len() <= 2,
        "{} warnings: {warnings:#?}",
        warnings.len()
    );
    drop(ws);
}
