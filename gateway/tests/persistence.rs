//! The ingest stream and the store: nothing acknowledged is lost while no persister runs,
//! and redelivery never stores a second copy.

mod common;

use common::TestApp;
use serde_json::json;
use shared::ObjectId;
use shared::store::{SequencedMessage, Store};
use shared::wire::ChatMessage;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_acknowledged_while_no_persister_runs_are_stored_and_delivered_later() {
    let mut app = TestApp::spawn(2).await;
    let (ann, _) = app.user("ann").await;
    let (bob, bob_id) = app.user("bob").await;
    let room = app.room(&ann, &[&bob_id]).await;
    let mut a = app.member(0, &ann, &[]).await;
    let b = app.member(1, &bob, &[&room]).await;

    app.persister_stop.cancel();
    let mut ids = Vec::new();
    for i in 0..20 {
        let ack = a
            .request(
                "send_message",
                json!({ "roomId": room, "content": format!("q{i}") }),
            )
            .await;
        assert_eq!(ack["ok"], json!(true), "{ack}");
        ids.push(ack["id"].clone());
    }
    app.start_persister().await;
    for id in &ids {
        assert_eq!(&b.next("message").await["id"], id);
    }
    let (_, history) = app
        .call(
            "GET",
            &format!("/chat/rooms/{room}/messages"),
            Some(&bob),
            None,
        )
        .await;
    assert_eq!(history.as_array().unwrap().len(), 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_insert_is_idempotent_by_message_id() {
    let app = TestApp::spawn(0).await;
    let store = app.store().await;
    let room = ObjectId::new();
    let message = |content: &str| common::chat_message(room, content);
    // Sequence numbers, not ids, give the order (ids from several gateways interleave).
    let seq = |n: i64, m: ChatMessage| SequencedMessage { seq: n, message: m };
    let first = vec![seq(1, message("a")), seq(2, message("b"))];
    store.insert_messages(&first).await.unwrap();
    // A redelivered batch overlapping the stored one.
    let mut again = first.clone();
    again.push(seq(3, message("c")));
    store.insert_messages(&again).await.unwrap();
    let stored = store.messages(room, None, 100).await.unwrap();
    let contents: Vec<&str> = stored.iter().map(|m| m.content.as_str()).collect();
    assert_eq!(contents, vec!["c", "b", "a"]);
    // Read back with its sequence number.
    assert_eq!(
        stored[2],
        ChatMessage {
            seq: Some(1),
            ..first[0].message.clone()
        }
    );
    assert_eq!(store.latest_seq(room).await.unwrap(), 3);
    assert_eq!(store.latest_seq(ObjectId::new()).await.unwrap(), 0);
    let after: Vec<String> = store
        .messages_after(room, 1, 10)
        .await
        .unwrap()
        .into_iter()
        .map(|m| m.content)
        .collect();
    assert_eq!(after, ["b", "c"], "oldest first");
    let older = store.messages(room, Some(stored[0].id), 100).await.unwrap();
    assert_eq!(
        older.iter().map(|m| m.content.as_str()).collect::<Vec<_>>(),
        vec!["b", "a"]
    );
}
