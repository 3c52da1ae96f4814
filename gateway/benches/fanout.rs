//! The per-delivery path of a gateway on a real in-process socketioxide server: one room
//! event encoded once, then a packet for each of N local sockets pushed into the socket's
//! buffer and taken out by its transport side. A regression in the encoding, the room
//! lookup or the per-socket emit shows here. socketioxide's broadcast of the same message
//! runs alongside, as the reference.
//!
//! `cargo bench -p gateway --bench fanout`

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use gateway::fanout_bench::{
    NAMESPACE, RoomSockets, add_user_socket, emit_to_room, emit_typing, join, room_key,
};
use shared::ObjectId;
use shared::wire::{ChatMessage, Sender, UserTyping, now_millis};
use socketioxide::SocketIo;
use socketioxide::extract::SocketRef;
use tokio::sync::mpsc::Receiver;

/// The gateway's per-socket buffer (`SOCKET_BUFFER_SIZE`'s default).
const SOCKET_BUFFER: usize = 1024;

/// A server whose `/chat` sockets all join `room` (and count as their own user's, as the
/// gateway's do), and `members` sockets connected to it.
async fn server(room: ObjectId, members: usize) -> (SocketIo, Vec<Receiver<engineioxide::Packet>>) {
    let (_layer, io) = SocketIo::builder()
        .max_buffer_size(SOCKET_BUFFER)
        .build_layer();
    io.ns(NAMESPACE, move |s: SocketRef| async move {
        join(&s, room_key(&room));
        add_user_socket(ObjectId::new(), s.id);
    });
    let mut receivers = Vec::with_capacity(members);
    for _ in 0..members {
        let (_tx, mut rx) = io.new_dummy_sock(NAMESPACE, ()).await;
        // The namespace's connect packet.
        rx.recv().await.expect("connected");
        receivers.push(rx);
    }
    (io, receivers)
}

async fn drain(receivers: &mut [Receiver<engineioxide::Packet>]) {
    for rx in receivers {
        rx.recv().await.expect("a delivery");
    }
}

fn fanout(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut g = c.benchmark_group("fan-out to local sockets");
    for members in [1usize, 100, 1000] {
        let room = ObjectId::new();
        let (io, mut receivers) = rt.block_on(server(room, members));
        // The room's socket list, as its feed keeps it: taken at the first event.
        let sockets = RoomSockets::new(room_key(&room));
        let message = ChatMessage {
            id: ObjectId::new(),
            room_id: room,
            sender: Sender {
                id: ObjectId::new(),
                email: Some("ann@example.com".into()),
                display_name: Some("Ann".into()),
            },
            content: "Hello! This is a chat message of a typical length, about eighty chars."
                .into(),
            created_at: now_millis(),
            seq: Some(1),
            server_event: None,
        };
        let typing = UserTyping {
            user_id: ObjectId::new(),
            room_id: room,
        };
        g.throughput(Throughput::Elements(members as u64));
        g.bench_with_input(BenchmarkId::new("message", members), &members, |b, _| {
            b.iter(|| {
                rt.block_on(async {
                    emit_to_room(&io, &sockets, &message);
                    drain(&mut receivers).await;
                })
            })
        });
        g.bench_with_input(
            BenchmarkId::new("user_typing", members),
            &members,
            |b, _| {
                b.iter(|| {
                    rt.block_on(async {
                        emit_typing(&io, &sockets, &typing);
                        drain(&mut receivers).await;
                    })
                })
            },
        );
        // The library's own broadcast: one packet encoded for the room and shared by every
        // socket. The gateway cannot use it (its error does not say whose buffer was full,
        // which the slow-consumer policy needs) and encodes once per room itself
        // (vendor/socketioxide/PATCH.md); the broadcast is the reference it should match.
        g.bench_with_input(
            BenchmarkId::new("message, socketioxide broadcast", members),
            &members,
            |b, _| {
                b.iter(|| {
                    rt.block_on(async {
                        let ns = io.of(NAMESPACE).expect("namespace");
                        ns.to(room_key(&room))
                            .emit("message", &message)
                            .await
                            .expect("broadcast");
                        drain(&mut receivers).await;
                    })
                })
            },
        );
    }
    g.finish();
}

criterion_group!(benches, fanout);
criterion_main!(benches);
