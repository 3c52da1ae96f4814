//! The server API: backend services post the seed's reserved events (`file_uploaded`,
//! `file_unlocked`) into a room's sequence. Mounted only when `SERVER_API_KEY` is set.

use crate::error::ChatError;
use crate::http::HttpState;
use crate::http::extract::JsonBody;
use crate::http::openapi::Accepted;
use axum::Json;
use axum::extract::{FromRequestParts, Path, State};
use axum::http::StatusCode;
use axum::http::request::Parts;
use serde::Deserialize;
use serde_json::{Map, Value};
use shared::config::Secret;
use shared::domain::{parse_object_id, sha256};
use shared::wire::{ChatMessage, ServerEvent};
use std::sync::Arc;

/// Largest `data` of a server event, in bytes of its compact JSON: it is stored with the
/// room's messages and replayed with them.
pub const MAX_DATA_BYTES: usize = 16 * 1024;
/// Largest request body of the route: `data` written with spaces and escapes, and the rest.
pub const BODY_LIMIT: usize = 64 * 1024;
/// Longest `idempotencyKey`, in characters.
pub const MAX_IDEMPOTENCY_KEY_CHARS: usize = 64;
/// Shortest `SERVER_API_KEY`, in bytes.
pub const MIN_KEY_BYTES: usize = 32;

/// What the route accepts: the key's digest and the event names.
#[derive(Clone)]
pub struct ServerApi {
    key_digest: [u8; 32],
    events: Arc<[String]>,
}

impl ServerApi {
    /// `None` when the key is unset or empty (the route is then off).
    pub fn new(key: Option<&Secret>, events: &[String]) -> Option<Self> {
        // A key read from a file or a Secret often ends with a line break.
        let key = key.map(|k| k.expose().trim()).filter(|k| !k.is_empty())?;
        Some(Self {
            key_digest: sha256(key),
            events: events.iter().cloned().collect(),
        })
    }

    /// The event names accepted.
    pub fn events(&self) -> &[String] {
        &self.events
    }

    /// Whether `presented` is the key. Both sides are hashed first, so the comparison takes
    /// the same time whatever prefix of the key a caller guessed.
    fn accepts(&self, presented: &str) -> bool {
        sha256(presented) == self.key_digest
    }
}

/// Checks a `SERVER_API_KEY` value: empty (the route off) or at least [`MIN_KEY_BYTES`].
pub fn parse_key(raw: &str) -> Result<Secret, String> {
    let key = raw.trim();
    if !key.is_empty() && key.len() < MIN_KEY_BYTES {
        return Err(format!(
            "must be at least {MIN_KEY_BYTES} bytes (it has {}); generate one with `openssl rand -hex 32`",
            key.len()
        ));
    }
    Ok(Secret::new(key))
}

/// Names a client's own events, or Socket.IO's: a server event must not be mistaken for one.
const RESERVED: &[&str] = &[
    "message",
    "user_typing",
    "presence",
    "room_added",
    "resync",
    "exception",
    "join_room",
    "leave_room",
    "send_message",
    "typing",
    "get_presence",
    "connect",
    "connect_error",
    "disconnect",
    "disconnecting",
    "error",
    "ping",
    "pong",
];

/// Checks one name of `SERVER_EVENTS`: 1 to 64 of `a-z`, `0-9` and `_`, starting with a
/// letter, and none of the events the gateway or Socket.IO use themselves.
pub fn parse_event_name(raw: &str) -> Result<String, String> {
    let name = raw.trim();
    let well_formed = name.len() <= 64
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if !well_formed {
        return Err(format!(
            "`{name}` is not an event name: 1 to 64 of a-z, 0-9 and _, starting with a letter"
        ));
    }
    if RESERVED.contains(&name) {
        return Err(format!(
            "`{name}` is an event of the gateway or of Socket.IO itself"
        ));
    }
    Ok(name.to_owned())
}

/// A request that presented the server API key (it carries the event names the API
/// accepts); 401 otherwise.
pub struct ServerKey(Arc<[String]>);

impl FromRequestParts<HttpState> for ServerKey {
    type Rejection = ChatError;

    async fn from_request_parts(parts: &mut Parts, state: &HttpState) -> Result<Self, ChatError> {
        let Some(api) = &state.server_api else {
            return Err(ChatError::NotFound("the server API is off".into()));
        };
        let presented = parts
            .headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|h| shared::jwt::bearer(Some(h)));
        let refusal = match presented {
            Some(key) if api.accepts(key) => return Ok(ServerKey(api.events.clone())),
            Some(_) => "invalid server API key",
            None => "missing server API key: send Authorization: Bearer <SERVER_API_KEY>",
        };
        metrics::counter!("chat_gateway_server_events_total", "result" => "unauthorized")
            .increment(1);
        Err(ChatError::Unauthorized(refusal.into()))
    }
}

/// Read as JSON values and checked by hand, for errors that name the field.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PostEventBody {
    /// One of `SERVER_EVENTS`.
    #[schema(value_type = String)]
    event: Value,
    /// Up to 16 KB of JSON, without `roomId` or `seq`.
    #[serde(default)]
    #[schema(value_type = Option<Object>, nullable = false)]
    data: Option<Value>,
    /// Makes a retry safe: 1 to 64 characters.
    #[serde(default)]
    #[schema(value_type = Option<String>, nullable = false)]
    idempotency_key: Option<Value>,
}

impl PostEventBody {
    /// The event, and the idempotency key when one is given.
    fn validate(self, allowed: &[String]) -> Result<(ServerEvent, Option<String>), ChatError> {
        let bad = |m: String| ChatError::BadRequest(m);
        let event = match self.event {
            Value::String(name) if allowed.contains(&name) => name,
            _ => {
                return Err(bad(format!("event must be one of: {}", allowed.join(", "))));
            }
        };
        let data: Map<String, Value> = match self.data {
            None | Some(Value::Null) => Map::new(),
            Some(Value::Object(data)) => data,
            Some(_) => return Err(bad("data must be a JSON object".into())),
        };
        // The gateway adds these two to what members receive.
        if data.contains_key("roomId") || data.contains_key("seq") {
            return Err(bad(
                "data must not hold roomId or seq: the gateway sets them".into(),
            ));
        }
        let size = serde_json::to_vec(&data)
            .map(|v| v.len())
            .unwrap_or(usize::MAX);
        if size > MAX_DATA_BYTES {
            return Err(bad(format!(
                "data must be at most {MAX_DATA_BYTES} bytes of JSON (it has {size})"
            )));
        }
        let key = match self.idempotency_key {
            None | Some(Value::Null) => None,
            Some(Value::String(k))
                if (1..=MAX_IDEMPOTENCY_KEY_CHARS).contains(&k.chars().count()) =>
            {
                Some(k)
            }
            Some(_) => {
                return Err(bad(format!(
                    "idempotencyKey must be a string of 1 to {MAX_IDEMPOTENCY_KEY_CHARS} characters"
                )));
            }
        };
        Ok((ServerEvent { event, data }, key))
    }
}

/// `POST /server/rooms/:roomId/events`: appends the event to the room's sequence, as a
/// message is; every member socket gets it as the named event, in order with the messages.
/// 202 `{roomId, seq}`.
#[utoipa::path(
    post,
    path = "/server/rooms/{id}/events",
    tag = "server",
    params(("id" = String, Path, pattern = "^[0-9a-fA-F]{24}$", description = "Room id, 24 hex digits")), request_body = PostEventBody,
    security(("serverApiKey" = [])),
    responses(
        (status = 202, description = "In the room's ordered ingest; members get it as the named event", body = crate::http::openapi::Accepted),
        (status = 400, description = "An event not in SERVER_EVENTS, bad data or idempotencyKey, a malformed id or body", body = crate::http::openapi::ApiError),
        (status = 401, description = "A missing or wrong SERVER_API_KEY", body = crate::http::openapi::ApiError),
        (status = 404, description = "No such room, or the server API is off (SERVER_API_KEY unset)", body = crate::http::openapi::ApiError),
        (status = 409, description = "The idempotencyKey was used for another event or data", body = crate::http::openapi::ApiError),
        (status = 408, description = "The body did not arrive within HTTP_BODY_TIMEOUT_SECS", body = crate::http::openapi::ApiError),
        (status = 413, description = "The body is over the route's limit", body = crate::http::openapi::ApiError),
        (status = 503, description = "Redis or the store did not answer, or the gateway is shutting down", body = crate::http::openapi::ApiError, headers(("Retry-After" = u64, description = "Seconds to wait before trying again (on a 503, only when the gateway knows: a full password-hashing queue)"))),
    )
)]
pub async fn post_event(
    State(state): State<HttpState>,
    ServerKey(events): ServerKey,
    Path(id): Path<String>,
    JsonBody(body): JsonBody<PostEventBody>,
) -> Result<(StatusCode, Json<Accepted>), ChatError> {
    let room = parse_object_id("roomId", &id)?;
    let (event, key) = body.validate(&events)?;
    if state.chat.store.room(room).await?.is_none() {
        return Err(ChatError::NotFound("room not found".into()));
    }
    let name = event.event.clone();
    let item = state
        .chat
        .post_server_event(ChatMessage::server(room, event), key.as_deref())
        .await?;
    metrics::counter!("chat_gateway_server_events_total", "result" => "accepted").increment(1);
    tracing::info!(room_id = %room, event = %name, seq = item.seq, "server event accepted");
    Ok((
        StatusCode::ACCEPTED,
        Json(Accepted {
            room_id: room.to_hex(),
            // Set by every successful append (a new number, or the first one's).
            seq: item.seq.unwrap_or_default(),
        }),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_keys_are_checked() {
        assert_eq!(
            parse_event_name(" file_uploaded ").unwrap(),
            "file_uploaded"
        );
        for wrong in [
            "",
            "File",
            "1x",
            "a-b",
            "message",
            "disconnect",
            &"x".repeat(65),
        ] {
            assert!(parse_event_name(wrong).is_err(), "{wrong}");
        }
        assert!(parse_key("short").is_err());
        assert!(parse_key("").is_ok());
        assert!(parse_key(&"k".repeat(32)).is_ok());
        let api = ServerApi::new(Some(&Secret::new("k".repeat(32))), &[]).unwrap();
        assert!(api.accepts(&"k".repeat(32)));
        assert!(!api.accepts(&"k".repeat(31)));
        assert!(ServerApi::new(Some(&Secret::new("")), &[]).is_none());
    }

    #[test]
    fn bodies_are_checked() {
        let allowed = vec!["file_uploaded".to_owned()];
        let body = |v: Value| serde_json::from_value::<PostEventBody>(v).unwrap();
        let (event, key) = body(
            serde_json::json!({"event": "file_uploaded", "data": {"f": 1}, "idempotencyKey": "k1"}),
        )
        .validate(&allowed)
        .unwrap();
        assert_eq!(
            (event.event.as_str(), key.as_deref()),
            ("file_uploaded", Some("k1"))
        );
        for wrong in [
            serde_json::json!({"event": "file_unlocked"}),
            serde_json::json!({"event": 1}),
            serde_json::json!({"event": "file_uploaded", "data": [1]}),
            serde_json::json!({"event": "file_uploaded", "data": {"seq": 1}}),
            serde_json::json!({"event": "file_uploaded", "data": {"roomId": "x"}}),
            serde_json::json!({"event": "file_uploaded", "data": {"x": "y".repeat(MAX_DATA_BYTES)}}),
            serde_json::json!({"event": "file_uploaded", "idempotencyKey": ""}),
            serde_json::json!({"event": "file_uploaded", "idempotencyKey": 7}),
        ] {
            assert!(body(wrong.clone()).validate(&allowed).is_err(), "{wrong}");
        }
        assert!(
            serde_json::from_value::<PostEventBody>(
                serde_json::json!({"event": "file_uploaded", "extra": 1})
            )
            .is_err()
        );
    }
}
