//! The ingest stream and the store: nothing acknowledged is lost while no persister runs,
//! and redelivery never stores a second copy.

mod common;

use common::TestApp;
use serde_json::json;
use shared::ObjectId;
use shared::store::{SequencedMessage, Store, StoreError};
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
            server_event: None,
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rooms_numbers_are_unique_and_a_taken_one_stops_the_insert_there() {
    let app = TestApp::spawn(0).await;
    let store = app.store().await;
    let room = ObjectId::new();
    let numbered = |n: i64, content: &str| SequencedMessage {
        seq: n,
        message: common::chat_message(room, content),
    };
    let first = numbered(1, "first");
    store
        .insert_messages(std::slice::from_ref(&first))
        .await
        .unwrap();
    // Another message under a taken number is refused; what came before it is stored, and
    // nothing after it.
    let batch = [
        numbered(2, "second"),
        numbered(1, "taken"),
        numbered(3, "after"),
    ];
    let refused = store.insert_messages(&batch).await;
    assert!(
        matches!(refused, Err(StoreError::SeqTaken { stored: 1, room: r, seq: 1 }) if r == room),
        "{refused:?}"
    );
    let contents: Vec<String> = store
        .messages_after(room, 0, 10)
        .await
        .unwrap()
        .into_iter()
        .map(|m| m.content)
        .collect();
    assert_eq!(contents, ["first", "second"]);
    // A stored id counts as stored, whatever number it comes with (a redelivered copy).
    let copy = SequencedMessage {
        seq: 7,
        ..first.clone()
    };
    store
        .insert_messages(&[copy, numbered(3, "third")])
        .await
        .unwrap();
    assert_eq!(store.latest_seq(room).await.unwrap(), 3);
    let other = ObjectId::new();
    let mut found = store
        .stored_in(&[(room, 2, 3), (other, 1, 9)], &[first.message.id])
        .await
        .unwrap();
    found.sort_by_key(|s| s.seq);
    assert_eq!(
        found.iter().map(|s| (s.room, s.seq)).collect::<Vec<_>>(),
        [(room, 1), (room, 2), (room, 3)],
        "the ranges, and the ids wherever they are"
    );
    assert_eq!(found[0].id, first.message.id);
    assert_eq!(found[1].id, batch[0].message.id);
}

/// A database written before numbers were unique may hold one number twice in a room: the
/// store numbers those rooms again (deterministically) before it makes the unique index.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_numbers_of_an_older_database_are_renumbered_before_the_unique_index() {
    use mongodb::bson::{DateTime, doc};
    let app = TestApp::spawn(0).await;
    // A database of its own: the test's services made the new index in theirs already.
    let db = format!("{}_old", app.db);
    let client = mongodb::Client::with_uri_str(app.mongo.uri())
        .await
        .unwrap();
    let messages = client
        .database(&db)
        .collection::<mongodb::bson::Document>("messages");
    messages
        .create_index(
            mongodb::IndexModel::builder()
                .keys(doc! { "roomId": 1, "seq": -1 })
                .build(),
        )
        .await
        .unwrap();
    let (room, quiet) = (ObjectId::new(), ObjectId::new());
    // Ids in creation order: the tie between two messages numbered 2 goes to the older id.
    let ids: Vec<ObjectId> = (0..6).map(|_| ObjectId::new()).collect();
    let rows = [
        (ids[0], room, 1),
        (ids[1], room, 2),
        (ids[2], room, 2),
        (ids[3], room, 3),
        (ids[4], quiet, 1),
        (ids[5], quiet, 2),
    ];
    for (id, r, seq) in rows {
        messages
            .insert_one(doc! {
                "_id": id, "roomId": r, "seq": seq as i64,
                "sender": { "_id": ObjectId::new() }, "content": id.to_hex(),
                "createdAt": DateTime::now(),
            })
            .await
            .unwrap();
    }
    let settings = shared::config::MongoSettings {
        uri: Some(app.mongo.uri()),
        db,
    };
    let store = shared::store::MongoStore::connect(&settings, "test")
        .await
        .unwrap();
    let numbers: Vec<(ObjectId, u64)> = store
        .messages_after(room, 0, 10)
        .await
        .unwrap()
        .into_iter()
        .map(|m| (m.id, m.seq.unwrap()))
        .collect();
    assert_eq!(
        numbers,
        [(ids[0], 1), (ids[1], 2), (ids[2], 3), (ids[3], 4)]
    );
    assert_eq!(store.latest_seq(quiet).await.unwrap(), 2, "untouched");
    let indexes = messages.list_index_names().await.unwrap();
    assert!(
        indexes.contains(&"roomId_seq_unique".to_owned()),
        "{indexes:?}"
    );
    assert!(
        !indexes.contains(&"roomId_1_seq_-1".to_owned()),
        "{indexes:?}"
    );
}
