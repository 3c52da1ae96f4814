//! The per-event work on the fan-out path, so that regressions show up:
//! a gateway decodes every room event it receives from Redis once, then encodes the
//! outgoing payload once per room (not once per socket), and the persister encodes each
//! message for the stream and the room channel.
//!
//! `cargo bench -p chat-shared`

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use shared::ObjectId;
use shared::backplane::stream_seq;
use shared::wire::{ChatMessage, MessageBatch, RoomEvent, Sender, UserTyping, now_millis};
use std::hint::black_box;

fn message() -> ChatMessage {
    ChatMessage {
        id: ObjectId::new(),
        room_id: ObjectId::new(),
        sender: Sender {
            id: ObjectId::new(),
            email: Some("ann@example.com".into()),
            display_name: Some("Ann".into()),
        },
        content: "Hello! This is a chat message of a typical length, about eighty chars.".into(),
        created_at: now_millis(),
        seq: None,
        server_event: None,
    }
}

/// One message as a persister publishes it.
fn batch(m: ChatMessage) -> RoomEvent {
    RoomEvent::Messages(MessageBatch {
        room_id: m.room_id,
        messages: vec![m],
        members_version: Some(0),
    })
}

fn encode(c: &mut Criterion) {
    let m = message();
    let mut g = c.benchmark_group("encode");
    g.throughput(Throughput::Elements(1));
    g.bench_function("message payload (once per room)", |b| {
        b.iter(|| serde_json::value::to_raw_value(black_box(&m)).unwrap())
    });
    let event = batch(m.clone());
    g.bench_function("room event for the channel", |b| {
        b.iter(|| serde_json::to_vec(black_box(&event)).unwrap())
    });
    let typing = RoomEvent::Typing(UserTyping {
        user_id: ObjectId::new(),
        room_id: ObjectId::new(),
    });
    g.bench_function("typing event for the channel", |b| {
        b.iter(|| serde_json::to_vec(black_box(&typing)).unwrap())
    });
    g.finish();
}

fn decode(c: &mut Criterion) {
    let event = serde_json::to_vec(&batch(message())).unwrap();
    let mut g = c.benchmark_group("decode");
    g.throughput(Throughput::Elements(1));
    g.bench_function("room event from the channel", |b| {
        b.iter(|| serde_json::from_slice::<RoomEvent>(black_box(&event)).unwrap())
    });
    g.bench_function("stream entry id to sequence", |b| {
        b.iter(|| stream_seq(black_box("1764000000123-42")).unwrap())
    });
    g.finish();
}

criterion_group!(benches, encode, decode);
criterion_main!(benches);
