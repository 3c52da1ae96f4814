//! The floor of the chosen library: socketioxide with its own Redis adapter
//! (`socketioxide-redis`, fred driver), the same `/chat` namespace, events, payloads, acks
//! and JWT auth as the Node peer (`../node/server.mjs`), and nothing more: no storage, no
//! membership checks, no persister. `send_message` is broadcast through the adapter and
//! acknowledged; `typing` goes to the room's other sockets.
//!
//! Environment: PORT (3000), REDIS_URL (redis://127.0.0.1:6379), JWT_SECRET (required).

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use socketioxide::SocketIo;
use socketioxide::adapter::Emitter;
use socketioxide::extract::{AckSender, SocketRef, State, TryData};
use socketioxide::handler::ConnectHandler;
use socketioxide_redis::{FredAdapter, RedisAdapterCtr};

/// The adapter of this server: socketioxide-redis over fred.
type A = FredAdapter<Emitter>;

#[derive(Clone)]
struct Keys(jsonwebtoken::DecodingKey);

#[derive(Clone, Serialize)]
struct User {
    #[serde(rename = "_id")]
    id: String,
    email: Option<String>,
    #[serde(rename = "displayName")]
    display_name: Option<String>,
}

#[derive(Deserialize)]
struct Claims {
    sub: String,
    email: Option<String>,
    #[serde(rename = "displayName")]
    display_name: Option<String>,
}

#[derive(Debug)]
struct Refused(&'static str);

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0)
    }
}

async fn authenticate(
    s: SocketRef<A>,
    TryData(auth): TryData<Value>,
    State(keys): State<Keys>,
) -> Result<(), Refused> {
    let header = s
        .req_parts()
        .headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::to_owned);
    let token = auth
        .unwrap_or_default()
        .get("token")
        .and_then(Value::as_str)
        .map(str::to_owned)
        .or(header)
        .ok_or(Refused("missing token"))?;
    let validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::HS256);
    let claims = jsonwebtoken::decode::<Claims>(&token, &keys.0, &validation).map_err(|e| {
        Refused(match e.kind() {
            jsonwebtoken::errors::ErrorKind::ExpiredSignature => "token expired",
            _ => "invalid token",
        })
    })?;
    s.extensions.insert(User {
        id: claims.claims.sub,
        email: claims.claims.email,
        display_name: claims.claims.display_name,
    });
    Ok(())
}

fn is_id(v: &str) -> bool {
    v.len() == 24 && v.bytes().all(|b| b.is_ascii_hexdigit())
}

fn room_of(data: &Value) -> Option<String> {
    data.get("roomId")
        .and_then(Value::as_str)
        .filter(|r| is_id(r))
        .map(str::to_owned)
}

fn fail(s: &SocketRef<A>, ack: Option<AckSender<A>>, event: &str, message: &str) {
    match ack {
        Some(ack) => {
            let _ = ack.send(
                &json!({ "ok": false, "error": { "code": "BAD_REQUEST", "message": message } }),
            );
        }
        None => {
            let _ = s.emit(
                "exception",
                &json!({ "status": "error", "event": event, "code": "BAD_REQUEST", "message": message }),
            );
        }
    }
}

async fn on_connect(s: SocketRef<A>) {
    s.on("join_room", join_room);
    s.on("leave_room", leave_room);
    s.on("send_message", send_message);
    s.on("typing", typing);
}

async fn join_room(s: SocketRef<A>, TryData(data): TryData<Value>, ack: AckSender<A>) {
    match room_of(&data.unwrap_or_default()) {
        None => fail(&s, Some(ack), "join_room", "roomId must be a 24-hex id"),
        Some(room) => {
            s.join(room.clone());
            let _ = ack.send(&json!({ "ok": true, "roomId": room }));
        }
    }
}

async fn leave_room(s: SocketRef<A>, TryData(data): TryData<Value>, ack: AckSender<A>) {
    match room_of(&data.unwrap_or_default()) {
        None => fail(&s, Some(ack), "leave_room", "roomId must be a 24-hex id"),
        Some(room) => {
            s.leave(room);
            let _ = ack.send(&json!({ "ok": true }));
        }
    }
}

async fn send_message(
    s: SocketRef<A>,
    io: SocketIo<A>,
    TryData(data): TryData<Value>,
    ack: AckSender<A>,
) {
    let data = data.unwrap_or_default();
    let Some(room) = room_of(&data) else {
        return fail(&s, Some(ack), "send_message", "roomId must be a 24-hex id");
    };
    let content = data.get("content").and_then(Value::as_str).unwrap_or("");
    if !(1..=10_000).contains(&content.chars().count()) {
        return fail(
            &s,
            Some(ack),
            "send_message",
            "content must be 1 to 10000 characters",
        );
    }
    let id = bson::oid::ObjectId::new().to_hex();
    let created_at = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    let message = json!({
        "id": id, "roomId": room, "sender": s.extensions.get::<User>(),
        "content": content, "createdAt": created_at,
    });
    if let Some(ns) = io.of("/chat") {
        let _ = ns.to(room).emit("message", &message).await;
    }
    let _ = ack.send(&json!({ "ok": true, "id": id, "createdAt": created_at }));
}

async fn typing(s: SocketRef<A>, TryData(data): TryData<Value>, ack: AckSender<A>) {
    let Some(room) = room_of(&data.unwrap_or_default()) else {
        return fail(&s, Some(ack), "typing", "roomId must be a 24-hex id");
    };
    let user_id = s.extensions.get::<User>().map(|u| u.id).unwrap_or_default();
    let _ = s
        .to(room.clone())
        .emit("user_typing", &json!({ "userId": user_id, "roomId": room }))
        .await;
    let _ = ack.send(&json!({ "ok": true }));
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let port: u16 = std::env::var("PORT")
        .ok()
        .and_then(|p| p.parse().ok())
        .unwrap_or(3000);
    let secret = std::env::var("JWT_SECRET").map_err(|_| "JWT_SECRET is required")?;
    let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let mut config = fred::prelude::Config::from_url(&url)?;
    // The adapter needs RESP3, which fred does not read from the URL.
    config.version = fred::types::RespVersion::RESP3;
    // The same buffers as the gateway's defaults, so that neither side drops under the
    // bench's bursts where the other does not: fred's pub/sub channel (default 32 slots)
    // and socketioxide's per-socket buffer (default 128).
    let client = fred::prelude::Builder::from_config(config)
        .with_performance_config(|p| p.broadcast_channel_capacity = 65_536)
        .build_subscriber_client()?;
    let adapter = RedisAdapterCtr::new_with_fred(client).await?;
    let (layer, io) = SocketIo::builder()
        .max_payload(100_000)
        .max_buffer_size(1024)
        .with_state(Keys(jsonwebtoken::DecodingKey::from_secret(
            secret.as_bytes(),
        )))
        .with_adapter::<A>(adapter)
        .build_layer();
    io.ns("/chat", on_connect.with(authenticate)).await?;
    let app = axum::Router::new()
        .route("/healthz", axum::routing::get(|| async { "ok" }))
        .layer(layer);
    // A listen backlog of 16,384 as the gateway's (TcpListener::bind uses 128).
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.set_reuseaddr(true)?;
    socket.bind(([127, 0, 0, 1], port).into())?;
    let listener = socket.listen(16_384)?;
    println!("socketioxide peer listening on 127.0.0.1:{port}");
    axum::serve(listener, app)
        .with_graceful_shutdown(async {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    .expect("SIGTERM handler");
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        })
        .await?;
    Ok(())
}
