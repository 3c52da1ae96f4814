//! The Socket.IO contract across two gateways, a persister, Redis and MongoDB.

mod common;

use common::sio::SioClient;
use common::{JWT_SECRET, TestApp};
use serde_json::{Value, json};
use shared::jwt::{Claims, JwtKeys};
use shared::store::Store;
use std::time::{Duration, Instant};

fn hex24(v: &Value) -> bool {
    v.as_str()
        .is_some_and(|s| s.len() == 24 && s.bytes().all(|b| b.is_ascii_hexdigit()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_accepts_token_or_header_and_refuses_with_reason() {
    let app = TestApp::spawn(1).await;
    let (token, _) = app.user("ann").await;
    let port = app.port(0);

    SioClient::connect(port, Some(json!({ "token": token })), &[])
        .await
        .expect("auth.token accepted");
    SioClient::connect(port, None, &[("authorization", &format!("Bearer {token}"))])
        .await
        .expect("Authorization header accepted");

    let refused = |r: Result<SioClient, String>| r.err().expect("connection must be refused");
    assert_eq!(
        refused(SioClient::connect(port, None, &[]).await),
        "missing token"
    );
    assert_eq!(
        refused(SioClient::connect(port, Some(json!({})), &[]).await),
        "missing token"
    );
    assert_eq!(
        refused(SioClient::connect(port, Some(json!({ "token": "" })), &[]).await),
        "missing token"
    );
    assert_eq!(
        refused(SioClient::connect(port, Some(json!({ "token": "not.a.jwt" })), &[]).await),
        "invalid token"
    );
    assert_eq!(
        refused(SioClient::connect(port, Some(json!({ "token": 42 })), &[]).await),
        "invalid token"
    );
    assert_eq!(
        refused(SioClient::connect(port, None, &[("authorization", "Basic abc")]).await),
        "invalid token"
    );

    let now = chrono::Utc::now().timestamp();
    let claims = |exp: i64| Claims {
        sub: "0123456789abcdef01234567".into(),
        nbf: None,
        email: None,
        display_name: None,
        iat: now - 100,
        exp,
        iss: None,
        aud: None,
    };
    let other_secret = JwtKeys::new(b"another-secret", 60)
        .sign(&claims(now + 60))
        .unwrap();
    assert_eq!(
        refused(SioClient::connect(port, Some(json!({ "token": other_secret })), &[]).await),
        "invalid token"
    );
    let expired = JwtKeys::new(JWT_SECRET.as_bytes(), 60)
        .sign(&claims(now - 10))
        .unwrap();
    assert_eq!(
        refused(SioClient::connect(port, Some(json!({ "token": expired })), &[]).await),
        "token expired"
    );
    // Valid only from an hour ahead, or issued an hour ahead: not valid now.
    let keys = JwtKeys::new(JWT_SECRET.as_bytes(), 60);
    let early = keys
        .sign(&Claims {
            nbf: Some(now + 3600),
            ..claims(now + 7200)
        })
        .unwrap();
    let future = keys
        .sign(&Claims {
            iat: now + 3600,
            ..claims(now + 7200)
        })
        .unwrap();
    for token in [early, future] {
        assert_eq!(
            refused(SioClient::connect(port, Some(json!({ "token": token })), &[]).await),
            "invalid token"
        );
    }
    let payload = token.split('.').nth(1).unwrap();
    let alg_none = format!("eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.{payload}.");
    assert_eq!(
        refused(SioClient::connect(port, Some(json!({ "token": alg_none })), &[]).await),
        "invalid token"
    );
    let mut tampered = token.clone();
    tampered.insert(token.len() - 3, 'x');
    assert_eq!(
        refused(SioClient::connect(port, Some(json!({ "token": tampered })), &[]).await),
        "invalid token"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn message_reaches_members_on_both_gateways_exactly_once() {
    let app = TestApp::spawn(2).await;
    let (ann, ann_id) = app.user("ann").await;
    let (bob, bob_id) = app.user("bob").await;
    let (cat, _) = app.user("cat").await;
    let room = app.room(&ann, &[&bob_id]).await;
    // Its messages serve as barriers for `room`'s.
    let cats_room = app.room_beside(&cat, &[&ann_id], &room).await;

    let mut a = app.member(0, &ann, &[&room, &cats_room]).await;
    let a2 = app.member(1, &ann, &[&room]).await; // the sender's second tab, on the other gateway
    let b = app.member(1, &bob, &[&room]).await;
    let c = app.member(1, &cat, &[&cats_room]).await; // not a member of `room`

    let ack = a
        .request(
            "send_message",
            json!({ "roomId": room, "content": "hello 👋" }),
        )
        .await;
    assert_eq!(ack["ok"], json!(true), "{ack}");
    assert!(hex24(&ack["id"]));
    let created_at = ack["createdAt"].as_str().unwrap();
    assert!(
        chrono::DateTime::parse_from_rfc3339(created_at).is_ok()
            && created_at.len() == 24
            && created_at.ends_with('Z'),
        "createdAt {created_at}"
    );
    let expected = json!({
        "id": ack["id"],
        "roomId": room,
        "sender": { "_id": ann_id, "email": a_email(&app, &ann).await, "displayName": "ann" },
        "content": "hello 👋",
        "createdAt": created_at,
        // The first message of the room.
        "seq": 1,
    });
    for client in [&a, &a2, &b] {
        assert_eq!(client.next("message").await, expected);
    }

    // A barrier: a later message in cat's room reaches cat (and ann) only after anything
    // published before it, so anything leaked to cat would be there by now.
    let ack = a
        .request(
            "send_message",
            json!({ "roomId": cats_room, "content": "barrier" }),
        )
        .await;
    assert_eq!(ack["ok"], json!(true));
    assert_eq!(c.next("message").await["content"], json!("barrier"));
    assert_eq!(a.next("message").await["content"], json!("barrier"));
    assert!(
        c.pending("message").is_empty(),
        "non-member got {:?}",
        c.pending("message")
    );
    for client in [&a, &a2, &b] {
        assert!(client.pending("message").is_empty(), "duplicate delivery");
    }
}

async fn a_email(app: &TestApp, token: &str) -> Value {
    app.call("GET", "/auth/me", Some(token), None).await.1["email"].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typing_reaches_others_but_not_the_typer() {
    let app = TestApp::spawn(2).await;
    let (ann, ann_id) = app.user("ann").await;
    let (bob, bob_id) = app.user("bob").await;
    let room = app.room(&ann, &[&bob_id]).await;
    let mut a = app.member(0, &ann, &[&room]).await;
    let b = app.member(1, &bob, &[&room]).await;

    let ack = a.request("typing", json!({ "roomId": room })).await;
    assert_eq!(ack, json!({ "ok": true }));
    assert_eq!(
        b.next("user_typing").await,
        json!({ "userId": ann_id, "roomId": room })
    );

    // Barrier: a message published after the typing notice.
    a.request("send_message", json!({ "roomId": room, "content": "x" }))
        .await;
    a.next("message").await;
    b.next("message").await;
    assert!(
        a.pending("user_typing").is_empty(),
        "the typer was told it types"
    );
}

/// `typing` is out of the socket's line of events: a notice is not held behind an earlier
/// event that waits (here a join whose room must be read from a paused store).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typing_is_not_held_behind_an_earlier_event_that_waits() {
    let app = TestApp::spawn(1).await;
    if app.skip_when_embedded("the store is in the gateway's process") {
        return;
    }
    let (ann, ann_id) = app.user("ann").await;
    let (bob, bob_id) = app.user("bob").await;
    let room = app.room(&ann, &[&bob_id]).await;
    let other = app.room(&ann, &[]).await;
    let mut a = app.member(0, &ann, &[&room]).await;
    let b = app.member(0, &bob, &[&room]).await;

    app.mongo.signal("STOP");
    // Never checked on this gateway, so the join reads the room from the store and waits.
    let join = a.emit_with_ack("join_room", vec![json!({ "roomId": other })]);
    let ack = a.request("typing", json!({ "roomId": room })).await;
    let delivered = b.next("user_typing").await;
    app.mongo.signal("CONT");
    assert_eq!(ack, json!({ "ok": true }));
    assert_eq!(delivered, json!({ "userId": ann_id, "roomId": room }));
    // The join is answered once the store is back (or refused if it gave up meanwhile).
    let joined = tokio::time::timeout(std::time::Duration::from_secs(60), join)
        .await
        .expect("the join was never answered")
        .unwrap();
    assert!(
        joined["ok"] == json!(true) || joined["error"]["code"] == json!("UNAVAILABLE"),
        "{joined}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn join_leave_and_membership() {
    let app = TestApp::spawn(2).await;
    let (ann, _) = app.user("ann").await;
    let (bob, bob_id) = app.user("bob").await;
    let (eve, _) = app.user("eve").await;
    let room = app.room(&ann, &[&bob_id]).await;
    // Its messages serve as barriers for `room`'s.
    let other = app.room_beside(&ann, &[&bob_id], &room).await;

    let mut e = SioClient::with_token(app.port(0), &eve).await;
    let ack = e.request("join_room", json!({ "roomId": room })).await;
    assert_eq!(
        ack,
        json!({ "ok": false, "error": { "code": "FORBIDDEN", "message": "you are not a participant of this room" } })
    );
    let ack = e
        .request("join_room", json!({ "roomId": "0123456789abcdef01234567" }))
        .await;
    assert_eq!(
        ack,
        json!({ "ok": false, "error": { "code": "NOT_FOUND", "message": "room not found" } })
    );
    let ack = e
        .request(
            "send_message",
            json!({ "roomId": room, "content": "let me in" }),
        )
        .await;
    assert_eq!(ack["error"]["code"], json!("FORBIDDEN"));
    let ack = e.request("typing", json!({ "roomId": room })).await;
    assert_eq!(ack["error"]["code"], json!("FORBIDDEN"));

    // Joining is not needed to send.
    let mut b = SioClient::with_token(app.port(1), &bob).await;
    let mut a = app.member(0, &ann, &[&room, &other]).await;
    let ack = b
        .request(
            "send_message",
            json!({ "roomId": room, "content": "from outside" }),
        )
        .await;
    assert_eq!(ack["ok"], json!(true));
    assert_eq!(a.next("message").await["content"], json!("from outside"));

    // After leaving, nothing more from that room. A witness on the same gateway stays in
    // it: once the witness has a message, the gateway has queued it for every socket of the
    // room, and whatever it queued for `a` would reach `a` before a later barrier.
    let witness = app.member(0, &bob, &[&room]).await;
    assert_eq!(
        a.request("leave_room", json!({ "roomId": room })).await,
        json!({ "ok": true })
    );
    assert_eq!(
        a.request("leave_room", json!({ "roomId": room })).await,
        json!({ "ok": true })
    );
    b.request(
        "send_message",
        json!({ "roomId": room, "content": "after leave" }),
    )
    .await;
    assert_eq!(
        witness.next("message").await["content"],
        json!("after leave")
    );
    b.request(
        "send_message",
        json!({ "roomId": other, "content": "barrier" }),
    )
    .await;
    assert_eq!(a.next("message").await["content"], json!("barrier"));
    assert!(a.pending("message").is_empty());

    // Joining twice is harmless, and a message is still delivered once.
    a.request("join_room", json!({ "roomId": room })).await;
    a.request("join_room", json!({ "roomId": room })).await;
    b.request("send_message", json!({ "roomId": room, "content": "once" }))
        .await;
    assert_eq!(witness.next("message").await["content"], json!("once"));
    b.request(
        "send_message",
        json!({ "roomId": other, "content": "barrier 2" }),
    )
    .await;
    assert_eq!(a.next("message").await["content"], json!("once"));
    assert_eq!(a.next("message").await["content"], json!("barrier 2"));
    assert!(a.pending("message").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_quick_messages_arrive_complete_and_in_order() {
    let app = TestApp::spawn(2).await;
    let (ann, _) = app.user("ann").await;
    let (bob, bob_id) = app.user("bob").await;
    let room = app.room(&ann, &[&bob_id]).await;
    let mut a = app.member(0, &ann, &[]).await;
    let b = app.member(1, &bob, &[&room]).await;

    // All emitted before any ack is awaited.
    let ids = common::send_quickly(&mut a, &room, 200).await;
    for (i, id) in ids.iter().enumerate() {
        let m = b.next("message").await;
        assert_eq!(m["content"], json!(format!("m{i}")));
        assert_eq!(&m["id"], id);
        assert_eq!(m["seq"], json!(i + 1), "contiguous room numbers");
    }
    let (_, history) = app
        .call(
            "GET",
            &format!("/chat/rooms/{room}/messages?limit=100"),
            Some(&bob),
            None,
        )
        .await;
    assert_eq!(history.as_array().unwrap().len(), 100);
    assert_eq!(history[0]["content"], json!("m199"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_an_error_and_the_socket_stays_usable() {
    let app = TestApp::spawn(1).await;
    let (ann, _) = app.user("ann").await;
    let room = app.room(&ann, &[]).await;
    let mut a = app.member(0, &ann, &[&room]).await;

    let long = "x".repeat(10_001);
    let bad =
        |msg: &str| json!({ "ok": false, "error": { "code": "BAD_REQUEST", "message": msg } });
    let cases: Vec<(&str, Vec<Value>, Value)> = vec![
        ("join_room", vec![], bad("payload must be an object")),
        (
            "join_room",
            vec![json!("abc")],
            bad("payload must be an object"),
        ),
        (
            "join_room",
            vec![json!(null)],
            bad("payload must be an object"),
        ),
        (
            "join_room",
            vec![json!([1, 2])],
            bad("payload must be an object"),
        ),
        ("join_room", vec![json!({})], bad("roomId is required")),
        (
            "join_room",
            vec![json!({ "roomId": 7 })],
            bad("roomId must be a string"),
        ),
        (
            "join_room",
            vec![json!({ "roomId": "nothex" })],
            bad("roomId must be a 24-character hex ObjectId"),
        ),
        (
            "leave_room",
            vec![json!({ "roomId": "zz" })],
            bad("roomId must be a 24-character hex ObjectId"),
        ),
        ("typing", vec![json!(3)], bad("payload must be an object")),
        (
            "send_message",
            vec![json!({ "roomId": room })],
            bad("content is required"),
        ),
        (
            "send_message",
            vec![json!({ "roomId": room, "content": "" })],
            bad("content must not be empty"),
        ),
        (
            "send_message",
            vec![json!({ "roomId": room, "content": 5 })],
            bad("content must be a string"),
        ),
        (
            "send_message",
            vec![json!({ "roomId": room, "content": long })],
            bad("content must be at most 10000 characters"),
        ),
        (
            "send_message",
            vec![json!({ "content": "hi" })],
            bad("roomId is required"),
        ),
    ];
    for (event, args, expected) in cases {
        let ack = a.emit_with_ack(event, args.clone());
        let ack = tokio::time::timeout(common::sio::TIMEOUT, ack)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(ack, expected, "{event} {args:?}");
    }
    // Exactly 10,000 code points (multi-byte) is accepted.
    let ack = a
        .request(
            "send_message",
            json!({ "roomId": room, "content": "é".repeat(10_000) }),
        )
        .await;
    assert_eq!(ack["ok"], json!(true), "{ack}");
    a.next("message").await;

    // Without an ack the error comes as an `exception` event.
    a.emit("send_message", json!({ "roomId": room, "content": "" }));
    assert_eq!(
        a.next("exception").await,
        json!({ "status": "error", "event": "send_message", "code": "BAD_REQUEST", "message": "content must not be empty" })
    );
    a.emit_args("join_room", vec![]);
    assert_eq!(
        a.next("exception").await["message"],
        json!("payload must be an object")
    );
    // Unknown events are ignored; the socket stays usable.
    a.emit("no_such_event", json!({}));
    let ack = a
        .request(
            "send_message",
            json!({ "roomId": room, "content": "still here" }),
        )
        .await;
    assert_eq!(ack["ok"], json!(true));
    assert_eq!(a.next("message").await["content"], json!("still here"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_fails_with_unavailable_while_redis_is_down() {
    let mut app = TestApp::spawn(1).await;
    if app.skip_when_embedded("no Redis") || app.skip_when_cluster("kills the single Redis") {
        return;
    }
    let (ann, _) = app.user("ann").await;
    let room = app.room(&ann, &[]).await;
    let mut a = app.member(0, &ann, &[&room]).await;
    app.redis.kill();
    let ack = a
        .request(
            "send_message",
            json!({ "roomId": room, "content": "lost?" }),
        )
        .await;
    assert_eq!(ack["ok"], json!(false), "{ack}");
    assert_eq!(ack["error"]["code"], json!("UNAVAILABLE"));
    assert_eq!(
        ack["error"]["message"],
        json!("service temporarily unavailable")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_with_the_same_client_msg_id_creates_no_second_message() {
    let app = TestApp::spawn(2).await;
    let (ann, _) = app.user("ann").await;
    let (bob, bob_id) = app.user("bob").await;
    let room = app.room(&ann, &[&bob_id]).await;
    let mut a = app.member(0, &ann, &[]).await;
    let mut a2 = app.member(1, &ann, &[]).await; // the retry may reach another gateway
    let b = app.member(1, &bob, &[&room]).await;

    let send = json!({ "roomId": room, "content": "once", "clientMsgId": "c-1" });
    let first = a.request("send_message", send.clone()).await;
    assert_eq!(first["ok"], json!(true));
    let retry = a2.request("send_message", send.clone()).await;
    assert_eq!(
        retry, first,
        "the retry is answered with the original id and time"
    );
    // The same clientMsgId from another user is another message.
    let mut bb = SioClient::with_token(app.port(0), &bob).await;
    let other = bb.request("send_message", send.clone()).await;
    assert_ne!(other["id"], first["id"]);
    // The same clientMsgId in another room is another message too.
    let elsewhere = app.room(&ann, &[]).await;
    let mut a3 = app.member(0, &ann, &[&elsewhere]).await;
    let moved = a3
        .request(
            "send_message",
            json!({ "roomId": elsewhere, "content": "once", "clientMsgId": "c-1" }),
        )
        .await;
    assert_eq!(moved["ok"], json!(true));
    assert_ne!(moved["id"], first["id"]);
    assert_eq!(a3.next("message").await["id"], moved["id"]);
    // REST honours it too.
    let (_, rest) = app
        .call(
            "POST",
            &format!("/chat/rooms/{room}/messages"),
            Some(&ann),
            Some(json!({ "content": "once", "clientMsgId": "c-1" })),
        )
        .await;
    assert_eq!(rest["id"], first["id"]);

    assert_eq!(b.next("message").await["id"], first["id"]);
    assert_eq!(b.next("message").await["id"], other["id"]);
    let barrier = a
        .request("send_message", json!({ "roomId": room, "content": "end" }))
        .await;
    assert_eq!(b.next("message").await["id"], barrier["id"]);
    assert!(
        b.pending("message").is_empty(),
        "a retry was delivered as a new message"
    );
    let (_, history) = app
        .call(
            "GET",
            &format!("/chat/rooms/{room}/messages"),
            Some(&ann),
            None,
        )
        .await;
    assert_eq!(history.as_array().unwrap().len(), 3);

    for (bad, message) in [
        (json!(5), "clientMsgId must be a string"),
        (json!(""), "clientMsgId must be 1 to 64 characters"),
        (
            json!("x".repeat(65)),
            "clientMsgId must be 1 to 64 characters",
        ),
    ] {
        let ack = a
            .request(
                "send_message",
                json!({ "roomId": room, "content": "x", "clientMsgId": bad }),
            )
            .await;
        assert_eq!(ack["error"]["message"], json!(message));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_socket_is_disconnected_when_its_token_expires() {
    let app = TestApp::spawn(1).await;
    let (_, ann_id) = app.user("ann").await;
    let now = chrono::Utc::now().timestamp();
    let short = JwtKeys::new(JWT_SECRET.as_bytes(), 60)
        .sign(&Claims {
            sub: ann_id,
            email: None,
            display_name: None,
            iat: now,
            exp: now + 2,
            nbf: None,
            iss: None,
            aud: None,
        })
        .unwrap();
    let a = SioClient::with_token(app.port(0), &short).await;
    assert_eq!(
        a.next("exception").await,
        json!({ "status": "error", "event": "connect", "code": "UNAUTHORIZED", "message": "token expired" })
    );
    a.wait_disconnected().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_participant_loses_every_access_on_every_gateway() {
    let app = TestApp::spawn(2).await;
    let (ann, ann_id) = app.user("ann").await;
    let (bob, bob_id) = app.user("bob").await;
    let room = app.room(&ann, &[&bob_id]).await;
    let a0 = app.member(0, &ann, &[&room]).await;
    let a1 = app.member(1, &ann, &[&room]).await;
    let b0 = app.member(0, &bob, &[&room]).await; // joined, on gateway 0
    let mut b1 = app.member(1, &bob, &[]).await; // not joined, but has sent (access cached), on gateway 1
    let ack = b1
        .request(
            "send_message",
            json!({ "roomId": room, "content": "before" }),
        )
        .await;
    assert_eq!(ack["ok"], json!(true));
    for c in [&a0, &a1, &b0] {
        c.next("message").await;
    }

    let path = format!("/chat/rooms/{room}/participants/{bob_id}");
    let (status, body) = app.call("DELETE", &path, Some(&ann), None).await;
    assert_eq!(status, reqwest::StatusCode::OK, "{body}");
    assert_eq!(body["participants"], json!([ann_id]));
    // Removing again is harmless.
    assert_eq!(
        app.call("DELETE", &path, Some(&ann), None).await.0,
        reqwest::StatusCode::OK
    );

    // Barrier: the removal was published before this message, on both gateways.
    let mut a = SioClient::with_token(app.port(0), &ann).await;
    let after = a
        .request(
            "send_message",
            json!({ "roomId": room, "content": "after" }),
        )
        .await;
    assert_eq!(a0.next("message").await["id"], after["id"]);
    assert_eq!(a1.next("message").await["id"], after["id"]);
    assert!(
        b0.pending("message").is_empty(),
        "a removed participant still receives the room"
    );

    let forbidden = json!("FORBIDDEN");
    let ack = b1
        .request(
            "send_message",
            json!({ "roomId": room, "content": "still here?" }),
        )
        .await;
    assert_eq!(ack["error"]["code"], forbidden, "{ack}");
    let ack = b1.request("typing", json!({ "roomId": room })).await;
    assert_eq!(ack["error"]["code"], forbidden);
    let ack = b1.request("join_room", json!({ "roomId": room })).await;
    assert_eq!(ack["error"]["code"], forbidden);
    let (status, _) = app
        .call(
            "GET",
            &format!("/chat/rooms/{room}/messages"),
            Some(&bob),
            None,
        )
        .await;
    assert_eq!(status, reqwest::StatusCode::FORBIDDEN);
    // Bob can no longer remove anyone either; bad ids are refused.
    let (status, _) = app
        .call(
            "DELETE",
            &format!("/chat/rooms/{room}/participants/{ann_id}"),
            Some(&bob),
            None,
        )
        .await;
    assert_eq!(status, reqwest::StatusCode::FORBIDDEN);
    let (status, _) = app
        .call(
            "DELETE",
            &format!("/chat/rooms/{room}/participants/nope"),
            Some(&ann),
            None,
        )
        .await;
    assert_eq!(status, reqwest::StatusCode::BAD_REQUEST);
}

/// The gateway keeps a room's participants after the first check; someone added later is
/// not refused on that stale list, and a removal is seen at once (the test above).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_participant_added_after_the_room_was_checked_may_join_at_once() {
    let app = TestApp::spawn(1).await;
    let (ann, _) = app.user("ann").await;
    let (eve, eve_id) = app.user("eve").await;
    let room = app.room(&ann, &[]).await;
    let _a = app.member(0, &ann, &[&room]).await; // the room's participants are now known
    let mut e = SioClient::with_token(app.port(0), &eve).await;
    let ack = e.request("join_room", json!({ "roomId": room })).await;
    assert_eq!(ack["error"]["code"], json!("FORBIDDEN"), "{ack}");

    let add = format!("/chat/rooms/{room}/participants");
    let (status, body) = app
        .call("POST", &add, Some(&ann), Some(json!({ "userId": eve_id })))
        .await;
    assert!(status.is_success(), "{body}");
    let ack = e.request("join_room", json!({ "roomId": room })).await;
    assert_eq!(ack, json!({ "ok": true, "roomId": room }));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_rate_and_connections_per_user_are_limited() {
    let mut app = TestApp::spawn(0).await;
    let g = app
        .add_gateway_with(|s| {
            s.events_per_second = 0.5;
            s.event_burst = 5.0;
            s.rate_limit_disconnect_after = 10;
            s.max_connections_per_user = 2;
        })
        .await;
    let (ann, _) = app.user("ann").await;
    let room = app.room(&ann, &[]).await;
    let mut a = app.member(g, &ann, &[&room]).await;

    for i in 0..5 {
        let ack = a
            .request(
                "send_message",
                json!({ "roomId": room, "content": format!("{i}") }),
            )
            .await;
        assert_eq!(ack["ok"], json!(true), "{ack}");
    }
    let ack = a.request("typing", json!({ "roomId": room })).await;
    assert_eq!(
        ack,
        json!({ "ok": false, "error": { "code": "RATE_LIMITED", "message": "rate limit exceeded" } })
    );
    // Joining has a budget of its own.
    assert_eq!(
        a.request("join_room", json!({ "roomId": room })).await["ok"],
        json!(true)
    );

    // A second connection is fine, a third is refused.
    let second = SioClient::with_token(app.port(g), &ann).await;
    let refused = SioClient::connect(app.port(g), Some(json!({ "token": ann })), &[]).await;
    assert_eq!(refused.err().as_deref(), Some("too many connections"));

    // Persisting over the limit gets the connection closed.
    for _ in 0..9 {
        a.emit(
            "send_message",
            json!({ "roomId": room, "content": "flood" }),
        );
    }
    a.wait_disconnected().await;
    // Refusals are answered at once, in parallel: those still being written when the
    // socket is cut may not arrive.
    assert!(!a.pending("exception").is_empty());
    assert!(
        a.pending("exception")
            .iter()
            .all(|e| e["code"] == json!("RATE_LIMITED"))
    );

    // Its slot is free again once the server has seen it go.
    let deadline = Instant::now() + common::sio::TIMEOUT;
    loop {
        if SioClient::connect(app.port(g), Some(json!({ "token": ann })), &[])
            .await
            .is_ok()
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the closed connection's slot was not freed"
        );
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    drop(second);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_payload_over_the_limit_closes_the_connection() {
    let mut app = TestApp::spawn(0).await;
    let g = app.add_gateway_with(|s| s.max_payload_bytes = 2_000).await;
    let (ann, _) = app.user("ann").await;
    let room = app.room(&ann, &[]).await;
    let mut a = app.member(g, &ann, &[&room]).await;
    let ack = a
        .request(
            "send_message",
            json!({ "roomId": room, "content": "x".repeat(1_500) }),
        )
        .await;
    assert_eq!(ack["ok"], json!(true));
    a.emit(
        "send_message",
        json!({ "roomId": room, "content": "x".repeat(3_000) }),
    );
    a.wait_disconnected().await;
    assert!(
        !a.was_ns_disconnected(),
        "closed at the transport, like any Socket.IO server"
    );
}

/// A client that joins a room and then stops reading, with a small receive buffer.
struct SlowReader {
    ws: tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>,
}

impl SlowReader {
    async fn join(port: u16, token: &str, room: &str) -> Self {
        use futures::{SinkExt, StreamExt};
        use tokio_tungstenite::tungstenite::Message;
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(4096).unwrap();
        let stream = socket.connect(([127, 0, 0, 1], port).into()).await.unwrap();
        let url = format!("ws://127.0.0.1:{port}/socket.io/?EIO=4&transport=websocket");
        let (mut ws, _) = tokio_tungstenite::client_async(url, stream).await.unwrap();
        ws.send(Message::text(format!(
            "40/chat,{}",
            json!({ "token": token })
        )))
        .await
        .unwrap();
        // Like every Socket.IO client, wait for the namespace's CONNECT before emitting: an
        // event for a namespace that is still connecting closes the whole connection.
        while let Some(Ok(msg)) = ws.next().await {
            if msg.to_text().unwrap_or("").starts_with("40/chat,") {
                break;
            }
        }
        ws.send(Message::text(format!(
            "42/chat,0{}",
            json!(["join_room", { "roomId": room }])
        )))
        .await
        .unwrap();
        // Reads up to the join's ack, then nothing more until `drain`.
        while let Some(Ok(msg)) = ws.next().await {
            if msg.to_text().unwrap_or("").starts_with("43/chat,0") {
                break;
            }
        }
        Self { ws }
    }

    /// Reads what the server still sends until it disconnects the namespace or closes the
    /// connection; returns the contents of the `message` events.
    async fn drain(mut self) -> Vec<String> {
        use futures::StreamExt;
        let mut contents = Vec::new();
        let read_all = async {
            while let Some(Ok(msg)) = self.ws.next().await {
                let text = msg.to_text().unwrap_or("").to_owned();
                // The server's DISCONNECT, sent once the buffer has room for it.
                if text.starts_with("41/chat,") {
                    break;
                }
                if let Some(json) = text.strip_prefix("42/chat,") {
                    let event: Value = serde_json::from_str(json).unwrap();
                    if event[0] == json!("message") {
                        contents.push(event[1]["content"].as_str().unwrap().to_owned());
                    }
                }
            }
        };
        // The server retries its DISCONNECT every 100 ms until the buffer has room.
        tokio::time::timeout(std::time::Duration::from_secs(20), read_all)
            .await
            .expect("the slow reader was never disconnected");
        contents
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_reader_is_disconnected_and_healthy_readers_get_everything() {
    let mut app = TestApp::spawn(0).await;
    let g = app
        .add_gateway_with(|s| {
            // Three of the test persister's batches of 50 (a batch arrives as one burst).
            s.socket_buffer_size = 160;
            s.replay_limit = 100;
            // The slow reader never answers pings, and Engine.IO closes a socket whose ping
            // cannot be queued (its buffer is full) or is not answered in time: a heartbeat
            // before the buffer fills would close it as a heartbeat timeout, not as a slow
            // consumer. Long enough that a loaded machine fills the buffer first.
            s.ping_interval_secs = 60;
            s.ping_timeout_secs = 60;
        })
        .await;
    let (ann, _) = app.user("ann").await;
    let (bob, bob_id) = app.user("bob").await;
    let (sid, sid_id) = app.user("sid").await;
    let room = app.room(&ann, &[&bob_id, &sid_id]).await;
    let healthy = app.member(g, &bob, &[&room]).await;
    let slow = SlowReader::join(app.port(g), &sid, &room).await;
    let mut a = app.member(g, &ann, &[]).await;

    // Enough to fill the kernel's socket buffers (about 4 MiB) and the socket's own 160.
    const N: usize = 800;
    let filler = "x".repeat(9_000);
    // In windows of 32: the sender shares the gateway (and its small buffer) with the
    // readers, and must be neither a slow consumer of its own acks nor outrun the healthy
    // reader (the embedded mode stores and delivers faster than a test client parses).
    for window in (0..N).collect::<Vec<_>>().chunks(32) {
        let acks: Vec<_> = window
            .iter()
            .map(|i| {
                a.emit_with_ack(
                    "send_message",
                    vec![json!({ "roomId": room, "content": format!("{i:04}{filler}") })],
                )
            })
            .collect();
        for ack in acks {
            let ack = tokio::time::timeout(common::sio::TIMEOUT, ack)
                .await
                .unwrap()
                .unwrap();
            assert_eq!(ack["ok"], json!(true));
        }
        // The healthy reader keeps up with the sender; the slow one reads nothing.
        for i in window {
            let m = healthy.next("message").await;
            assert_eq!(
                &m["content"].as_str().unwrap()[..4],
                format!("{i:04}"),
                "healthy reader missed a message"
            );
        }
    }
    let got = slow.drain().await;
    eprintln!("slow reader got {} of {N} before it was cut off", got.len());
    assert!(got.len() < N, "the slow reader was not disconnected");
    for (i, content) in got.iter().enumerate() {
        assert_eq!(
            &content[..4],
            format!("{i:04}"),
            "the slow reader was fed a stream with a gap"
        );
    }
    let disconnects = common::metric(
        app.gateways[g].admin_port,
        "chat_gateway_slow_consumer_disconnects_total",
    )
    .await;
    assert!(disconnects >= Some(1.0), "{disconnects:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_gateways_with_local_members_subscribe_to_a_room() {
    let app = TestApp::spawn(2).await;
    if app.skip_when_embedded("no Redis") {
        return;
    }
    let (ann, _) = app.user("ann").await;
    let (bob, bob_id) = app.user("bob").await;
    let room = app.room(&ann, &[&bob_id]).await;
    // The room's sharded channel, in the hash slot of its ingest partition.
    let keys = shared::backplane::Keys::new(&app.prefix, 16);
    let partition = keys.partition_of(&room.parse().unwrap());
    let channel = format!("{{{}:ingest:{partition}}}:room:{room}", app.prefix);
    assert_eq!(channel, keys.room_channel(&room.parse().unwrap()));
    app.wait_shard_numsub(&channel, 0).await;
    // Members on gateway 0 only: only gateway 0 subscribes, so Redis sends this room's
    // traffic to gateway 0 and none to gateway 1.
    let mut a = app.member(0, &ann, &[&room]).await;
    let b = app.member(0, &bob, &[&room]).await;
    app.wait_shard_numsub(&channel, 1).await;
    let ack = a
        .request("send_message", json!({ "roomId": room, "content": "hi" }))
        .await;
    assert_eq!(ack["ok"], json!(true));
    assert_eq!(b.next("message").await["content"], json!("hi"));
    // A member on gateway 1 makes it subscribe too; the last one leaving unsubscribes.
    let mut c = app.member(1, &bob, &[&room]).await;
    app.wait_shard_numsub(&channel, 2).await;
    let left = c.request("leave_room", json!({ "roomId": room })).await;
    assert_eq!(left, json!({ "ok": true }));
    app.wait_shard_numsub(&channel, 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flooding_socket_is_cut_off_and_counted_once() {
    let mut app = TestApp::spawn(0).await;
    if app.skip_when_embedded("a gateway process of its own") {
        return;
    }
    // A process of its own, so that its metrics count this test only.
    let limits = [
        ("EVENTS_PER_SECOND", "1".to_owned()),
        ("EVENT_BURST", "1".to_owned()),
        ("RATE_LIMIT_DISCONNECT_AFTER", "5".to_owned()),
    ];
    let g = app.gateway_process(&limits).await;
    let (ann, _) = app.user("ann").await;
    let room = app.room(&ann, &[]).await;
    // Three sockets flood at once, 500 events each, without waiting for answers.
    let mut sockets = Vec::new();
    for _ in 0..3 {
        sockets.push(app.member(g, &ann, &[&room]).await);
    }
    for socket in &sockets {
        for _ in 0..500 {
            socket.emit("typing", json!({ "roomId": room }));
        }
    }
    for socket in &mut sockets {
        socket.wait_disconnected().await;
    }
    let admin = app.gateways[g].admin_port;
    assert_eq!(
        common::metric(admin, "chat_gateway_rate_limit_disconnects_total").await,
        Some(3.0),
        "one disconnect counted per socket, not one per queued event"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_are_per_user_across_sockets_and_rest() {
    let mut app = TestApp::spawn(0).await;
    let g = app
        .add_gateway_with(|s| {
            s.events_per_second = 0.001;
            s.event_burst = 4.0;
            s.joins_per_second = 0.001;
            s.join_burst = 3.0;
        })
        .await;
    let (ann, _) = app.user("ann").await;
    let room = app.room(&ann, &[]).await;
    let mut first = SioClient::with_token(app.port(g), &ann).await;
    let mut second = SioClient::with_token(app.port(g), &ann).await;
    let send = json!({ "roomId": room, "content": "hi" });
    for socket in [&mut first, &mut second] {
        for _ in 0..2 {
            assert_eq!(
                socket.request("send_message", send.clone()).await["ok"],
                json!(true)
            );
        }
    }
    // Four between the two sockets: the budget is the user's, and REST shares it.
    let refused = second.request("send_message", send.clone()).await;
    assert_eq!(refused["error"]["code"], json!("RATE_LIMITED"), "{refused}");
    let url = format!(
        "http://127.0.0.1:{}/chat/rooms/{room}/messages",
        app.port(g)
    );
    let response = reqwest::Client::new()
        .post(url)
        .bearer_auth(&ann)
        .json(&json!({ "content": "over REST" }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), reqwest::StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(response.headers()["retry-after"], "1");

    // Joins and leaves: a budget of their own, refused past it without waiting.
    let join = json!({ "roomId": room });
    assert_eq!(
        first.request("join_room", join.clone()).await["ok"],
        json!(true)
    );
    assert_eq!(
        second.request("leave_room", join.clone()).await["ok"],
        json!(true)
    );
    assert_eq!(
        first.request("leave_room", join.clone()).await["ok"],
        json!(true)
    );
    let refused = second.request("join_room", join).await;
    assert_eq!(refused["error"]["code"], json!("RATE_LIMITED"), "{refused}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_events_and_unreadable_payloads_get_clear_errors() {
    let app = TestApp::spawn(1).await;
    let (ann, _) = app.user("ann").await;
    let room = app.room(&ann, &[]).await;
    let mut a = app.member(0, &ann, &[&room]).await;
    let ack = a.request("sendMessage", json!({ "roomId": room })).await;
    assert_eq!(
        ack,
        json!({ "ok": false, "error": { "code": "BAD_REQUEST", "message": "unknown event" } })
    );
    a.emit("nonsense", json!({}));
    let exception = a.next("exception").await;
    assert_eq!(
        (exception["code"].clone(), exception["message"].clone()),
        (json!("BAD_REQUEST"), json!("unknown event"))
    );
    // A lone surrogate is not JSON a server can keep: refused as such, nothing stored.
    let ack = a
        .raw_request(|id| {
            format!(
                "42/chat,{id}[\"send_message\",{{\"roomId\":\"{room}\",\"content\":\"\\ud800\"}}]"
            )
        })
        .await;
    assert_eq!(ack["error"]["code"], json!("BAD_REQUEST"), "{ack}");
    let message = ack["error"]["message"].as_str().unwrap();
    assert!(
        message.starts_with("payload is not valid JSON: "),
        "{message}"
    );
    assert!(
        !message.contains("line") && !message.contains("borrowed"),
        "{message}"
    );
    // Broken JSON, or no array: answered, and the connection stays open.
    for broken in [
        format!("[\"send_message\",{{\"roomId\":\"{room}\",\"content\":"),
        "{\"event\":\"send_message\"}".to_owned(),
        "[1,2]".to_owned(),
    ] {
        let ack = a.raw_request(|id| format!("42/chat,{id}{broken}")).await;
        assert_eq!(
            ack["error"]["code"],
            json!("BAD_REQUEST"),
            "{broken}: {ack}"
        );
    }
    // An event name written with escapes is the same name.
    let ack = a
        .raw_request(|id| {
            format!(
                "42/chat,{id}[\"send\\u005fmessage\",{{\"roomId\":\"{room}\",\"content\":\"escaped\"}}]"
            )
        })
        .await;
    assert_eq!(ack["ok"], json!(true), "{ack}");
    assert_eq!(a.next("message").await["content"], json!("escaped"));
    assert!(!a.is_disconnected());
    // Binary packets: the chat has none. One with attachments is refused (the connection
    // closed) rather than held until its attachments come.
    let b = app.member(0, &ann, &[]).await;
    b.send_raw(format!(
        "451-/chat,[\"send_message\",{{\"roomId\":\"{room}\",\"content\":{{\"_placeholder\":true,\"num\":0}}}}]"
    ));
    b.wait_disconnected().await;
}

/// A polling session that asks for unknown namespaces and never polls fills its buffer with
/// the answers: it is closed then (one warning), not kept open logging an error per request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_polling_session_flooding_unknown_namespaces_is_closed() {
    let mut app = TestApp::spawn(0).await;
    app.add_gateway_with(|s| {
        s.socket_buffer_size = 8;
        s.replay_limit = 4;
    })
    .await;
    let http = reqwest::Client::new();
    let base = format!(
        "http://127.0.0.1:{}/socket.io/?EIO=4&transport=polling",
        app.port(0)
    );
    let open = http.get(&base).send().await.unwrap().text().await.unwrap();
    let sid = open
        .split("\"sid\":\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .expect("a session id")
        .to_owned();
    let url = format!("{base}&sid={sid}");
    let mut closed_after = None;
    for i in 0..200 {
        let status = http.post(&url).body("40/a,").send().await.unwrap().status();
        if !status.is_success() {
            closed_after = Some(i);
            break;
        }
    }
    let n = closed_after.expect("the session was never closed");
    assert!(n <= 32, "closed only after {n} requests");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_socket_trusts_the_user_record_over_the_token() {
    let app = TestApp::spawn(1).await;
    let keys = shared::jwt::JwtKeys::new(common::JWT_SECRET.as_bytes(), 3600);
    // A valid token of a user that does not exist: refused, as REST refuses it.
    let ghost = keys
        .issue(shared::ObjectId::new(), "ghost@example.com", "Ghost")
        .unwrap();
    let refused = SioClient::connect(app.port(0), Some(json!({ "token": ghost })), &[]).await;
    assert_eq!(refused.err().as_deref(), Some("user no longer exists"));

    // A token whose claims are not the record's: others see the record's names.
    let (ann, ann_id) = app.user("ann").await;
    let (bob, bob_id) = app.user("bob").await;
    let room = app.room(&ann, &[&bob_id]).await;
    let stale = keys
        .issue(ann_id.parse().unwrap(), "old@example.com", "Old Name")
        .unwrap();
    let mut a = app.member(0, &stale, &[&room]).await;
    let b = app.member(0, &bob, &[&room]).await;
    a.request("send_message", json!({ "roomId": room, "content": "hi" }))
        .await;
    let live = b.next("message").await;
    assert_eq!(live["sender"]["displayName"], json!("ann"));
    assert_ne!(live["sender"]["email"], json!("old@example.com"));
    let (status, posted) = app
        .call(
            "POST",
            &format!("/chat/rooms/{room}/messages"),
            Some(&stale),
            Some(json!({ "content": "over REST" })),
        )
        .await;
    assert_eq!(status, reqwest::StatusCode::CREATED);
    assert_eq!(posted["sender"]["displayName"], json!("ann"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ack_id_too_large_is_refused_before_the_event_runs() {
    let app = TestApp::spawn(1).await;
    let (ann, _) = app.user("ann").await;
    let room = app.room(&ann, &[]).await;
    // Larger than any 64-bit integer, or not followed at once by the data: read as "no ack",
    // the message was stored unanswered.
    for ack in ["99999999999999999999999", "99999999999999999999999 ", "7 "] {
        let a = app.member(0, &ann, &[&room]).await;
        a.send_raw(format!(
            "42/chat,{ack}[\"send_message\",{{\"roomId\":\"{room}\",\"content\":\"lost ack\"}}]"
        ));
        a.wait_disconnected().await;
    }
    // A malformed packet closes the connection, as Socket.IO servers do; nothing was sent.
    let mut b = app.member(0, &ann, &[&room]).await;
    let ack = b
        .request(
            "send_message",
            json!({ "roomId": room, "content": "after" }),
        )
        .await;
    let next = b.next("message").await;
    assert_eq!(next["id"], ack["id"]);
    assert_eq!(next["seq"], json!(1), "the refused one was not stored");
}

/// A removal whose count never reached Redis (Redis failed right after the store took the
/// participant out; the caller got 503) cannot leave a gateway trusting its cached list for
/// ever: the list is read again after `MEMBERSHIP_CACHE_SECS` at most. And the removed
/// user's own retry completes what failed: 204, and every gateway is told.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removal_that_never_reached_redis_is_seen_within_the_cache_time_and_its_retry_completes_it()
 {
    let mut app = TestApp::spawn(0).await;
    if app.skip_when_embedded("the store is written directly") {
        return;
    }
    app.add_gateway_with(|s| s.membership_cache_secs = 1).await;
    let (ann, ann_id) = app.user("ann").await;
    let (bob, bob_id) = app.user("bob").await;
    let room = app.room(&ann, &[&bob_id]).await;
    let mut b = app.member(0, &bob, &[&room]).await;
    // The store has the removal; Redis has neither its count nor its notice.
    app.store()
        .await
        .remove_participant(room.parse().unwrap(), bob_id.parse().unwrap())
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let ack = b.request("join_room", json!({ "roomId": room })).await;
        if ack["error"]["code"] == json!("FORBIDDEN") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the removed user may still join: {ack}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Bob retries his own removal (he left, and his client saw a 503): it completes.
    let path = format!("/chat/rooms/{room}/participants/{bob_id}");
    let (status, body) = app.call("DELETE", &path, Some(&bob), None).await;
    assert_eq!(status, reqwest::StatusCode::NO_CONTENT, "{body}");
    // Someone who never was a participant still cannot remove others.
    let (carol, _) = app.user("carol").await;
    let path = format!("/chat/rooms/{room}/participants/{ann_id}");
    let (status, _) = app.call("DELETE", &path, Some(&carol), None).await;
    assert_eq!(status, reqwest::StatusCode::FORBIDDEN);
}

/// One address holds at most `MAX_CONNECTIONS_PER_ADDRESS` TCP connections on a gateway,
/// authenticated or not, upgraded ones included; a closed one makes room.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_per_address_are_bounded() {
    let mut app = TestApp::spawn(0).await;
    app.add_gateway_with(|s| s.max_connections_per_address = 2)
        .await;
    // Signed up from another address: the test's pooled REST connection would hold a place.
    let other = reqwest::Client::builder()
        .local_address("127.0.0.2".parse::<std::net::IpAddr>().unwrap())
        .build()
        .unwrap();
    let signed_up: Value = other
        .post(app.url("/auth/register"))
        .json(&json!({ "email": "ann@example.com", "password": "password123" }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let ann = signed_up["accessToken"].as_str().unwrap().to_owned();
    let a = app.member(0, &ann, &[]).await;
    let _b = app.member(0, &ann, &[]).await;
    // Two WebSockets hold the address's two TCP connections: a third is closed at once.
    let refused = SioClient::connect(app.port(0), Some(json!({ "token": ann })), &[]).await;
    assert!(refused.is_err(), "a third connection from the address");
    // An Engine.IO close: the session ends, and its connection with it.
    a.send_raw("1".into());
    a.wait_disconnected().await;
    let deadline = Instant::now() + Duration::from_secs(5);
    while SioClient::connect(app.port(0), Some(json!({ "token": ann })), &[])
        .await
        .is_err()
    {
        assert!(
            Instant::now() < deadline,
            "the closed connection's place was not given back"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Behind a trusted proxy every connection comes from the proxy: the client's forwarded
/// address is counted per Socket.IO session instead (429 at the Engine.IO handshake).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_per_forwarded_address_are_bounded_behind_a_proxy() {
    let mut app = TestApp::spawn(0).await;
    app.add_gateway_with(|s| {
        s.max_connections_per_address = 2;
        s.trusted_proxy_hops = 1;
    })
    .await;
    let (ann, _) = app.user("ann").await;
    let port = app.port(0);
    let from = |address: &'static str| {
        let auth = json!({ "token": ann });
        async move { SioClient::connect(port, Some(auth), &[("x-forwarded-for", address)]).await }
    };
    let _c = from("10.0.0.1").await.unwrap();
    let _d = from("10.0.0.1").await.unwrap();
    let error = from("10.0.0.1").await.err().expect("a third session");
    assert!(error.contains("429"), "{error}");
    let _e = from("10.0.0.2").await.unwrap();
}

/// `room_added` reaches every socket of the users given a room, on any gateway: the
/// participants of a new room, and a participant the owner adds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn room_added_reaches_the_users_given_a_room_on_every_gateway() {
    let app = TestApp::spawn(2).await;
    let (ann, ann_id) = app.user("ann").await;
    let (bob, bob_id) = app.user("bob").await;
    let (cat, cat_id) = app.user("cat").await;
    let a = SioClient::with_token(app.port(0), &ann).await;
    let b = SioClient::with_token(app.port(1), &bob).await;
    let c = SioClient::with_token(app.port(1), &cat).await;
    let room = app.room(&ann, &[&bob_id]).await;
    for client in [&a, &b] {
        let added = client.next("room_added").await;
        assert_eq!(added["room"]["_id"], json!(room), "{added}");
        assert_eq!(added["room"]["ownerId"], json!(ann_id), "{added}");
    }
    let (status, body) = app
        .call(
            "POST",
            &format!("/chat/rooms/{room}/participants"),
            Some(&ann),
            Some(json!({ "userId": cat_id })),
        )
        .await;
    assert_eq!(status.as_u16(), 200, "{body}");
    let added = c.next("room_added").await;
    assert_eq!(added["room"]["_id"], json!(room));
    assert_eq!(added["room"]["participants"].as_array().unwrap().len(), 3);
    // Nobody else heard of the addition.
    assert!(a.pending("room_added").is_empty() && b.pending("room_added").is_empty());
}
