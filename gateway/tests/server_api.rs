//! The server API: backend services post the reserved events into a room's sequence.
//! Runs on one Redis, on a Redis Cluster (`CHAT_TEST_REDIS=cluster`) and embedded
//! (`CHAT_TEST_MODE=embedded`).

mod common;

use common::{SERVER_API_KEY, TestApp};
use reqwest::StatusCode;
use serde_json::{Value, json};

/// Posts a server event to gateway `gw` with `key`; the status and the JSON body.
async fn post_event(
    app: &TestApp,
    gw: usize,
    room: &str,
    key: Option<&str>,
    body: Value,
) -> (StatusCode, Value) {
    let url = format!(
        "http://127.0.0.1:{}/server/rooms/{room}/events",
        app.port(gw)
    );
    let mut req = app.http.post(url).json(&body);
    if let Some(key) = key {
        req = req.bearer_auth(key);
    }
    let resp = req.send().await.expect("request");
    let status = resp.status();
    (status, resp.json().await.unwrap_or(Value::Null))
}

/// The items a socket receives, in order: `("message", content)` or `(event, data.fileId)`,
/// each with its seq.
async fn items(client: &common::sio::SioClient, n: usize) -> Vec<(String, String, u64)> {
    let mut got = Vec::new();
    for _ in 0..n {
        let (name, payload) = client.next_of(&["message", "file_uploaded"]).await;
        let what = match name.as_str() {
            "message" => payload["content"].as_str().unwrap().to_owned(),
            _ => payload["fileId"].as_str().unwrap().to_owned(),
        };
        got.push((name, what, payload["seq"].as_u64().unwrap()));
    }
    got
}

#[tokio::test]
async fn a_server_event_reaches_every_member_in_order_and_is_replayed_and_listed() {
    let app = TestApp::spawn(2).await;
    let (ann, _) = app.user("ann").await;
    let (bob, bob_id) = app.user("bob").await;
    let room = app.room(&ann, &[&bob_id]).await;
    let mut a = app.member(0, &ann, &[&room]).await;
    let b = app.member(1, &bob, &[&room]).await;

    let ack = a
        .request(
            "send_message",
            json!({ "roomId": room, "content": "before" }),
        )
        .await;
    assert_eq!(ack["ok"], true, "{ack}");
    let (status, body) = post_event(
        &app,
        1,
        &room,
        Some(SERVER_API_KEY),
        json!({ "event": "file_uploaded", "data": { "fileId": "f1", "name": "a.pdf" }, "idempotencyKey": "upload-f1" }),
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    assert_eq!(body, json!({ "roomId": room, "seq": 2 }));
    // A backend's retry takes no second number and delivers nothing again.
    let (status, again) = post_event(
        &app,
        0,
        &room,
        Some(SERVER_API_KEY),
        json!({ "event": "file_uploaded", "data": { "fileId": "f1", "name": "a.pdf" }, "idempotencyKey": "upload-f1" }),
    )
    .await;
    assert_eq!((status, &again), (StatusCode::ACCEPTED, &body));
    // The same key with other data is another event: refused.
    let (status, conflict) = post_event(
        &app,
        0,
        &room,
        Some(SERVER_API_KEY),
        json!({ "event": "file_uploaded", "data": { "fileId": "f2" }, "idempotencyKey": "upload-f1" }),
    )
    .await;
    assert_eq!(status, StatusCode::CONFLICT, "{conflict}");
    let ack = a
        .request(
            "send_message",
            json!({ "roomId": room, "content": "after" }),
        )
        .await;
    assert_eq!(ack["ok"], true, "{ack}");

    let expected = vec![
        ("message".to_owned(), "before".to_owned(), 1),
        ("file_uploaded".to_owned(), "f1".to_owned(), 2),
        ("message".to_owned(), "after".to_owned(), 3),
    ];
    assert_eq!(items(&a, 3).await, expected);
    assert_eq!(items(&b, 3).await, expected);
    assert_eq!(b.count("file_uploaded") + b.count("message"), 0);

    // The payload is `{...data, roomId, seq}`.
    let mut c = app.member(0, &bob, &[]).await;
    let ack = c
        .request("join_room", json!({ "roomId": room, "afterSeq": 1 }))
        .await;
    assert_eq!(ack["ok"], true, "{ack}");
    let event = c.next("file_uploaded").await;
    assert_eq!(
        event,
        json!({ "fileId": "f1", "name": "a.pdf", "roomId": room, "seq": 2 })
    );
    assert_eq!(c.next("message").await["content"], "after");

    // Catch-up lists every item of the sequence; history lists chat messages only.
    let path = format!("/chat/rooms/{room}/messages");
    let (status, listed) = app
        .call("GET", &format!("{path}?afterSeq=0"), Some(&bob), None)
        .await;
    assert_eq!(status, StatusCode::OK);
    let listed = listed.as_array().unwrap().clone();
    assert_eq!(listed.len(), 3, "{listed:?}");
    assert_eq!(listed[0]["content"], "before");
    let item = &listed[1];
    let keys: std::collections::BTreeSet<&str> = item
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(
        keys,
        ["createdAt", "data", "event", "id", "roomId", "seq"].into()
    );
    assert_eq!(item["event"], "file_uploaded");
    assert_eq!(item["data"], json!({ "fileId": "f1", "name": "a.pdf" }));
    assert_eq!(
        (item["roomId"].as_str(), item["seq"].as_u64()),
        (Some(room.as_str()), Some(2))
    );
    let (_, history) = app.call("GET", &path, Some(&bob), None).await;
    let contents: Vec<&str> = history
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["content"].as_str().unwrap())
        .collect();
    assert_eq!(contents, ["after", "before"]);
}

#[tokio::test]
async fn the_server_api_refuses_bad_keys_events_bodies_and_rooms() {
    let mut app = TestApp::spawn(1).await;
    let (ann, _) = app.user("ann").await;
    let room = app.room(&ann, &[]).await;
    let good = json!({ "event": "file_unlocked", "data": { "fileId": "f1" } });
    let refused = [
        (None, room.as_str(), good.clone(), StatusCode::UNAUTHORIZED),
        (
            Some("x".repeat(40)),
            room.as_str(),
            good.clone(),
            StatusCode::UNAUTHORIZED,
        ),
        // A user's token is no server key.
        (
            Some(ann.clone()),
            room.as_str(),
            good.clone(),
            StatusCode::UNAUTHORIZED,
        ),
        (
            Some(SERVER_API_KEY.into()),
            room.as_str(),
            json!({ "event": "message", "data": {} }),
            StatusCode::BAD_REQUEST,
        ),
        (
            Some(SERVER_API_KEY.into()),
            room.as_str(),
            json!({ "event": "file_unlocked", "data": "text" }),
            StatusCode::BAD_REQUEST,
        ),
        (
            Some(SERVER_API_KEY.into()),
            room.as_str(),
            json!({ "event": "file_unlocked", "data": { "seq": 9 } }),
            StatusCode::BAD_REQUEST,
        ),
        (
            Some(SERVER_API_KEY.into()),
            room.as_str(),
            json!({ "event": "file_unlocked", "data": { "blob": "x".repeat(20_000) } }),
            StatusCode::BAD_REQUEST,
        ),
        (
            Some(SERVER_API_KEY.into()),
            "not-an-id",
            good.clone(),
            StatusCode::BAD_REQUEST,
        ),
        (
            Some(SERVER_API_KEY.into()),
            "6560a0000000000000000001",
            good.clone(),
            StatusCode::NOT_FOUND,
        ),
    ];
    for (key, room, body, status) in refused {
        let (got, answer) = post_event(&app, 0, room, key.as_deref(), body.clone()).await;
        assert_eq!(got, status, "{body} → {answer}");
        assert_eq!(answer["statusCode"], status.as_u16(), "{answer}");
        assert!(answer["message"].is_string(), "{answer}");
    }

    // Clients cannot emit a server event themselves.
    let mut a = app.member(0, &ann, &[&room]).await;
    let ack = a
        .request("file_unlocked", json!({ "roomId": room, "fileId": "f1" }))
        .await;
    assert_eq!(ack["ok"], false, "{ack}");
    assert_eq!(ack["error"]["code"], "BAD_REQUEST", "{ack}");

    // Without SERVER_API_KEY the route does not exist.
    let off = app.add_gateway_with(|s| s.server_api_key = None).await;
    let (status, _) = post_event(&app, off, &room, Some(SERVER_API_KEY), good).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}
