//! Presence across gateways: `presence` events, `get_presence` and
//! `GET /chat/rooms/:id/presence`, and a killed gateway's users going offline.

mod common;

use common::TestApp;
use common::sio::SioClient;
use serde_json::{Value, json};
use std::time::{Duration, Instant};

fn change(room: &str, user: &str, online: bool) -> Value {
    json!({ "roomId": room, "userId": user, "online": online })
}

fn sorted(mut ids: Vec<&str>) -> Value {
    ids.sort_unstable();
    json!(ids)
}

/// How many gateways hold `user` online in `room`, as Redis has it (not for the embedded
/// mode: one process, nothing in Redis).
async fn gateways_holding(app: &TestApp, room: &str, user: &str) -> usize {
    let keys = shared::backplane::Keys::new(&app.prefix, 16);
    let key = keys.presence(&room.parse().unwrap());
    let fields = common::servers::redis_cli(app.redis_port(), &["HKEYS", &key]).await;
    fields
        .lines()
        .filter(|f| f.ends_with(&format!(" {user}")))
        .count()
}

async fn rest_presence(app: &TestApp, token: &str, room: &str) -> (u16, Value) {
    let (status, body) = app
        .call(
            "GET",
            &format!("/chat/rooms/{room}/presence"),
            Some(token),
            None,
        )
        .await;
    (status.as_u16(), body)
}

/// Online when the first socket of a user joins, on any gateway; offline when the last one
/// leaves or disconnects; never the same state twice in a row (each side's next `presence`
/// is the one expected, nothing in between).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_follows_every_socket_of_a_user_across_gateways() {
    let app = TestApp::spawn(2).await;
    let (ann, ann_id) = app.user("ann").await;
    let (bob, bob_id) = app.user("bob").await;
    let (eve, _) = app.user("eve").await;
    let room = app.room(&ann, &[&bob_id]).await;

    let b = app.member(1, &bob, &[&room]).await;
    assert_eq!(b.next("presence").await, change(&room, &bob_id, true));
    let mut a = app.member(0, &ann, &[&room]).await;
    assert_eq!(b.next("presence").await, change(&room, &ann_id, true));
    assert_eq!(a.next("presence").await, change(&room, &ann_id, true));

    let ack = a.request("get_presence", json!({ "roomId": room })).await;
    assert_eq!(
        ack,
        json!({ "ok": true, "roomId": room, "online": sorted(vec![&ann_id, &bob_id]) })
    );
    let (status, body) = rest_presence(&app, &bob, &room).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body,
        json!({ "roomId": room, "online": sorted(vec![&ann_id, &bob_id]) })
    );

    // Ann's second socket, on the other gateway: she is online already.
    let mut a2 = app.member(1, &ann, &[&room]).await;
    // Presence is written just after the join's answer: wait until both gateways hold her,
    // or her first socket's going could be seen before her second one's coming.
    if !app.embedded {
        common::eventually(
            "both gateways hold Ann",
            Duration::from_secs(10),
            || async { gateways_holding(&app, &room, &ann_id).await == 2 },
        )
        .await;
    }
    // Her first socket goes: she stays online (a2).
    a.close();
    let ack = a2.request("get_presence", json!({ "roomId": room })).await;
    assert_eq!(ack["online"], sorted(vec![&ann_id, &bob_id]));
    // Her last socket leaves the room: offline, and that is the next change Bob sees
    // (neither a second "online" nor an early "offline" came before it).
    let left = a2.request("leave_room", json!({ "roomId": room })).await;
    assert_eq!(left, json!({ "ok": true }));
    assert_eq!(b.next("presence").await, change(&room, &ann_id, false));
    let (_, body) = rest_presence(&app, &bob, &room).await;
    assert_eq!(body["online"], json!([bob_id]));
    // Back, and away by disconnecting.
    let a3 = app.member(0, &ann, &[&room]).await;
    assert_eq!(b.next("presence").await, change(&room, &ann_id, true));
    a3.close();
    assert_eq!(b.next("presence").await, change(&room, &ann_id, false));
    assert!(
        b.pending("presence").is_empty(),
        "{:?}",
        b.pending("presence")
    );

    // Only participants may ask.
    let mut e = SioClient::with_token(app.port(0), &eve).await;
    let refused = e.request("get_presence", json!({ "roomId": room })).await;
    assert_eq!(refused["ok"], json!(false), "{refused}");
    assert_eq!(refused["error"]["code"], json!("FORBIDDEN"), "{refused}");
    let (status, body) = rest_presence(&app, &eve, &room).await;
    assert_eq!(status, 403, "{body}");
    let bad = e.request("get_presence", json!({ "roomId": "nope" })).await;
    assert_eq!(bad["error"]["code"], json!("BAD_REQUEST"), "{bad}");
    drop(a2);
}

/// Bob on an in-process gateway and Ann on a gateway process, both in one room, each having
/// seen both come online; `ttl` is both gateways' PRESENCE_TTL_SECS (default when `None`).
/// `None` in the embedded mode: one process, no other gateway to stop.
struct Scene {
    app: TestApp,
    process: usize,
    room: String,
    ann_id: String,
    bob: String,
    bob_id: String,
    a: SioClient,
    b: SioClient,
}

async fn ann_on_a_process(ttl: Option<Duration>) -> Option<Scene> {
    let mut app = TestApp::spawn(0).await;
    if app.skip_when_embedded("a gateway process beside another") {
        return None;
    }
    let env: Vec<(&str, String)> = ttl
        .map(|t| vec![("PRESENCE_TTL_SECS", t.as_secs().to_string())])
        .unwrap_or_default();
    app.add_gateway_with(|s| {
        if let Some(t) = ttl {
            s.presence_ttl_secs = t.as_secs();
        }
    })
    .await;
    let process = app.gateway_process(&env).await;
    let (ann, ann_id) = app.user("ann").await;
    let (bob, bob_id) = app.user("bob").await;
    let room = app.room(&ann, &[&bob_id]).await;
    let b = app.member(0, &bob, &[&room]).await;
    assert_eq!(b.next("presence").await, change(&room, &bob_id, true));
    let a = app.member(process, &ann, &[&room]).await;
    assert_eq!(b.next("presence").await, change(&room, &ann_id, true));
    Some(Scene {
        app,
        process,
        room,
        ann_id,
        bob,
        bob_id,
        a,
        b,
    })
}

/// A gateway that is SIGKILLed cannot say that its users left: the others take them
/// offline within PRESENCE_TTL_SECS, announced once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_gateways_users_go_offline_within_the_ttl() {
    let ttl = Duration::from_secs(4);
    let Some(Scene {
        mut app,
        process,
        room,
        ann_id,
        bob,
        bob_id,
        a: _a,
        b,
        ..
    }) = ann_on_a_process(Some(ttl)).await
    else {
        return;
    };
    app.gateways[process].process.as_mut().unwrap().kill();
    let killed = Instant::now();
    assert_eq!(b.next("presence").await, change(&room, &ann_id, false));
    let took = killed.elapsed();
    assert!(
        took <= ttl + Duration::from_secs(1),
        "offline after {took:?}"
    );
    let (_, body) = rest_presence(&app, &bob, &room).await;
    assert_eq!(body["online"], json!([bob_id]));
    // Announced once.
    tokio::time::sleep(ttl).await;
    assert!(
        b.pending("presence").is_empty(),
        "{:?}",
        b.pending("presence")
    );
}

/// A gateway paused past its heartbeat is taken for dead: its users go offline. When it
/// resumes it finds that out and sets them online again, under a new name that the reaper
/// of the old one cannot touch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_gateway_sets_its_users_online_again_when_it_resumes() {
    let Some(Scene {
        app,
        process,
        room,
        ann_id,
        bob_id,
        mut a,
        b,
        ..
    }) = ann_on_a_process(Some(Duration::from_secs(2))).await
    else {
        return;
    };
    let process = app.gateways[process].process.as_ref().unwrap();
    process.signal("STOP");
    assert_eq!(b.next("presence").await, change(&room, &ann_id, false));
    process.signal("CONT");
    assert_eq!(b.next("presence").await, change(&room, &ann_id, true));
    // Ann's socket lived through it (the pause was shorter than the ping timeout).
    let ack = a.request("get_presence", json!({ "roomId": room })).await;
    assert_eq!(ack["online"], sorted(vec![&ann_id, &bob_id]));
}

/// A gateway stopped with SIGTERM takes its users offline as it goes (its sockets close,
/// their last writes are made, then it leaves): no waiting for PRESENCE_TTL_SECS (30 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_gateways_users_go_offline_at_once() {
    let Some(Scene {
        app,
        process,
        room,
        ann_id,
        a: _a,
        b,
        ..
    }) = ann_on_a_process(None).await
    else {
        return;
    };
    app.gateways[process].process.as_ref().unwrap().terminate();
    // Within the events' own wait (well under PRESENCE_TTL_SECS).
    assert_eq!(b.next("presence").await, change(&room, &ann_id, false));
}
