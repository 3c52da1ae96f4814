//! The Socket.IO namespace `/chat`: authentication on connect, then `join_room`,
//! `leave_room`, `send_message` and `typing`.
//!
//! Every event accepts an optional ack. A failed event is answered with a failure ack, or,
//! when the client asked for none, with an `exception` event. Bad input never disconnects.

mod detach;
mod expiry;
pub(crate) mod payload;
mod per_address;
pub(crate) mod session;

use crate::chat::Chat;
use crate::delivery;
use crate::drain::Drain;
use crate::error::ChatError;
use crate::feed::{Join, JoinAnswer};
use crate::limits::Limits;
use crate::rooms::RoomRegistry;
use serde::Serialize;
use serde_json::{Value, json};
use session::{Joins, Session, Turn, Typing};
use shared::ObjectId;
use shared::jwt::{TokenError, bearer};
use shared::wire::format_time;
use socketioxide::SocketIo;
use socketioxide::extract::{AckSender, SocketRef, State, TryData};
use socketioxide::handler::ConnectHandler;
use socketioxide::socket::DisconnectReason;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

pub use detach::detach_request;
pub use expiry::Expiries;
pub use per_address::{AddressSlots, admit as admit_session};

/// Shared by every socket handler (socketioxide state, held in an `Arc`: the `State`
/// extractor clones it for every event).
pub struct SocketState {
    pub drain: Arc<Drain>,
    pub chat: Chat,
    pub rooms: Arc<RoomRegistry>,
    pub membership_ttl: Duration,
    pub limits: Arc<Limits>,
    pub connections: Arc<Connections>,
    /// Token expiries of this gateway's sockets.
    pub expiries: Arc<Expiries>,
}

/// Open connections per user on this gateway, bounded.
pub struct Connections {
    max: usize,
    per_user: std::sync::Mutex<HashMap<ObjectId, usize>>,
}

impl Connections {
    pub fn new(max: usize) -> Self {
        Self {
            max,
            per_user: Default::default(),
        }
    }

    fn try_add(&self, user: ObjectId) -> bool {
        let mut per_user = self.per_user.lock().unwrap_or_else(|e| e.into_inner());
        let count = per_user.entry(user).or_insert(0);
        if *count >= self.max {
            return false;
        }
        *count += 1;
        true
    }

    fn remove(&self, user: ObjectId) {
        let mut per_user = self.per_user.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(count) = per_user.get_mut(&user) {
            *count -= 1;
            if *count == 0 {
                per_user.remove(&user);
            }
        }
    }
}

/// Why a connection was refused; the text is the client's `connect_error` message.
#[derive(Debug, thiserror::Error)]
enum Refusal {
    #[error(transparent)]
    Token(#[from] TokenError),
    #[error("too many connections")]
    TooManyConnections,
    /// The token is valid but its user was deleted (REST answers such tokens with 401 too).
    #[error("user no longer exists")]
    UnknownUser,
}

impl Refusal {
    fn reason(&self) -> &'static str {
        match self {
            Refusal::Token(e) => e.reason(),
            Refusal::TooManyConnections => "too_many_connections",
            Refusal::UnknownUser => "unknown_user",
        }
    }
}

/// Registers the `/chat` namespace.
pub fn register(io: &SocketIo) {
    io.ns(delivery::NAMESPACE, on_connect.with(authenticate));
}

/// The token from the handshake's `auth.token`, else from `Authorization: Bearer`.
fn handshake_token(s: &SocketRef, auth: &Option<Value>) -> Result<String, TokenError> {
    if let Some(token) = auth.as_ref().and_then(|a| a.get("token")) {
        return match token {
            Value::String(t) => Ok(t.clone()),
            Value::Null => Err(TokenError::Missing),
            _ => Err(TokenError::Invalid),
        };
    }
    let header = s
        .req_parts()
        .headers
        .get("authorization")
        .and_then(|v| v.to_str().ok());
    match header {
        None => Err(TokenError::Missing),
        Some(h) => bearer(Some(h))
            .map(str::to_owned)
            .ok_or(TokenError::Invalid),
    }
}

/// Connect middleware: refuses the connection (the client's `connect_error` carries the
/// reason: `missing token`, `invalid token`, `token expired`) or stores the session and
/// registers the event handlers.
///
/// Handlers are registered here, not in the connect handler: socketioxide sends the
/// client its CONNECT packet before it spawns the connect handler, so a client that emits
/// right after connecting could otherwise reach a socket with no handlers yet.
async fn authenticate(
    s: SocketRef,
    TryData(auth): TryData<Value>,
    State(state): State<Arc<SocketState>>,
) -> Result<(), Refusal> {
    let result = match handshake_token(&s, &auth.ok()).and_then(|t| state.chat.jwt.verify(&t)) {
        Ok(user) => current_user(&state, user).await,
        Err(error) => Err(Refusal::from(error)),
    }
    .and_then(|user| {
        if state.connections.try_add(user.id) {
            Ok(user)
        } else {
            Err(Refusal::TooManyConnections)
        }
    });
    match result {
        Ok(user) => {
            delivery::add_user_socket(user.id, s.id);
            tracing::debug!(socket = %s.id, user_id = %user.id, "connected");
            let session = Arc::new(
                Session::new(
                    user,
                    state.membership_ttl,
                    state.drain.clone(),
                    state.limits.clone(),
                )
                .with_presence(state.chat.presence.clone()),
            );
            s.extensions.insert(session.clone());
            state.expiries.insert(session.user.exp, s.clone());
            s.on("join_room", on_join_room);
            s.on("leave_room", on_leave_room);
            s.on("get_presence", on_get_presence);
            s.on("send_message", on_send_message);
            s.on("typing", on_typing);
            s.on_fallback(on_unknown_event);
            s.on_disconnect(on_disconnect);
            metrics::gauge!("chat_gateway_connections").increment(1);
            metrics::counter!("chat_gateway_connects_total").increment(1);
            Ok(())
        }
        Err(e) => {
            metrics::counter!("chat_gateway_auth_failures_total", "reason" => e.reason())
                .increment(1);
            tracing::debug!(reason = e.reason(), "connection refused");
            Err(e)
        }
    }
}

/// How long a connect waits for the user record before it goes ahead on the token alone.
const USER_LOOKUP_TIMEOUT: Duration = Duration::from_secs(2);

/// The token's user as the store knows it now: refused when it was deleted; its e-mail and
/// display name from the record (what others see on its messages), not from the token,
/// which may be older than a rename. When the store does not answer in time the token's
/// claims are used: connections keep working through a MongoDB outage.
async fn current_user(
    state: &SocketState,
    mut user: shared::jwt::AuthUser,
) -> Result<shared::jwt::AuthUser, Refusal> {
    match tokio::time::timeout(USER_LOOKUP_TIMEOUT, state.chat.users.get(user.id)).await {
        Ok(Ok(Some(record))) => {
            user.email = Some(record.email);
            user.display_name = Some(record.display_name);
            Ok(user)
        }
        Ok(Ok(None)) => Err(Refusal::UnknownUser),
        Ok(Err(_)) => {
            // The cause is logged once per batch, or counted (a full queue).
            tracing::debug!(user_id = %user.id, "user lookup failed: connecting on the token's claims");
            Ok(user)
        }
        Err(_) => {
            tracing::warn!(user_id = %user.id, "user lookup timed out: connecting on the token's claims");
            Ok(user)
        }
    }
}

/// Everything is set up by [`authenticate`]; see there why.
async fn on_connect() {}

async fn on_disconnect(
    s: SocketRef,
    reason: DisconnectReason,
    State(state): State<Arc<SocketState>>,
) {
    delivery::membership_changed();
    metrics::gauge!("chat_gateway_connections").decrement(1);
    metrics::counter!("chat_gateway_disconnects_total", "reason" => reason_label(&reason))
        .increment(1);
    if let Some(session) = s.extensions.get::<Arc<Session>>() {
        tracing::debug!(socket = %s.id, user_id = %session.user.id, %reason, "disconnected");
        delivery::remove_user_socket(&session.user.id, s.id);
        state.expiries.remove(session.user.exp, s.id);
        state.connections.remove(session.user.id);
        for room in session.close() {
            state.rooms.release(room).await;
        }
    }
}

/// Answers an event: the ack when asked for, else `exception` on failure. Counts it.
fn respond<T: Serialize>(
    s: &SocketRef,
    wants_ack: bool,
    ack: AckSender,
    event: &'static str,
    result: Result<T, ChatError>,
) {
    let outcome = match &result {
        Ok(_) => "ok",
        Err(e) => e.label(),
    };
    metrics::counter!("chat_gateway_events_total", "event" => event, "result" => outcome)
        .increment(1);
    match result {
        Ok(body) => {
            if wants_ack {
                let _ = ack.send(&body);
            }
        }
        Err(error) => {
            error.log();
            if wants_ack {
                let _ = ack.send(&error.ack());
            } else {
                let _ = s.emit("exception", &error.exception(event));
            }
        }
    }
}

/// Refuses the events of a socket whose user was deleted since it connected (its token is
/// still valid), and marks it to be disconnected. Asked whenever the socket's checks are
/// renewed: on joins, and on sends and typing once `MEMBERSHIP_CACHE_SECS` have passed; at
/// most once a second per socket (a reconnecting client's burst of joins asks once).
async fn still_a_user(state: &SocketState, session: &Session) -> Result<(), ChatError> {
    if !session.user_check_due() {
        return Ok(());
    }
    if state.chat.users.deleted(session.user.id).await {
        session.kick();
        return Err(ChatError::Unauthorized("user no longer exists".into()));
    }
    session.user_checked();
    Ok(())
}

/// Checks that the socket's user is a participant of `room`, trusting a recent check.
async fn authorize(
    state: &SocketState,
    session: &Session,
    room: ObjectId,
) -> Result<(), ChatError> {
    if session.is_verified(&room) {
        return Ok(());
    }
    let verification = session.verification();
    still_a_user(state, session).await?;
    state.chat.check_member(&session.user.id, room).await?;
    session.mark_verified(room, verification);
    Ok(())
}

/// A bounded label for a disconnect reason.
pub fn reason_label(reason: &DisconnectReason) -> &'static str {
    match reason {
        DisconnectReason::TransportClose => "transport_close",
        DisconnectReason::MultipleHttpPollingError => "multiple_polling",
        DisconnectReason::PacketParsingError => "packet_parsing",
        DisconnectReason::TransportError => "transport_error",
        DisconnectReason::HeartbeatTimeout => "heartbeat_timeout",
        DisconnectReason::ClientNSDisconnect => "client_disconnect",
        DisconnectReason::ServerNSDisconnect => "server_disconnect",
        DisconnectReason::ClosingServer => "server_closing",
    }
}

async fn on_join_room(
    s: SocketRef,
    mut turn: Turn<Joins>,
    ack: AckSender,
    State(state): State<Arc<SocketState>>,
    TryData(data): TryData<Value>,
) {
    let session = turn.session.clone();
    let prepared = async {
        turn.wait().await?;
        // A socket being cut off joins nothing: no store reads, no replay for it.
        if session.is_slow() {
            return Err(ChatError::Busy {
                message: "this connection is cut off as a slow consumer".into(),
                retry_after_secs: 1,
            });
        }
        let input = payload::join_room(payload::read(data))?;
        let room = input.room_id;
        // Always checked (not trusting the socket's earlier checks): joining is where
        // access is decided. The cache is never older than the room's last removal.
        let verification = session.verification();
        still_a_user(&state, &session).await?;
        let checked_version = state.chat.check_member(&session.user.id, room).await?;
        session.mark_verified(room, verification);
        if session.is_joined(&room)
            && let Some(feed) = state.rooms.feed(&room)
        {
            return Ok((input, feed, checked_version, false));
        }
        let feed = state.rooms.acquire(room).await?;
        if !session.record_join(room) {
            state.rooms.release(room).await;
            return Err(ChatError::BadRequest("socket disconnected".into()));
        }
        Ok((input, feed, checked_version, true))
    }
    .await;
    let (input, feed, checked_version, newly) = match prepared {
        Ok(prepared) => prepared,
        Err(error) => {
            respond::<Value>(&s, turn.wants_ack, ack, "join_room", Err(error));
            if session.take_kick() {
                let _ = s.disconnect();
            }
            return;
        }
    };
    let (room, after_seq) = (input.room_id, input.after_seq);
    // The room's feed joins the socket (after replaying what follows `afterSeq`) and
    // answers, between two live messages of the room.
    let (done, outcome) = tokio::sync::oneshot::channel();
    let (socket, wants_ack) = (s.clone(), turn.wants_ack);
    let answer: JoinAnswer = Box::new(move |result| {
        let ok = result.is_ok();
        let body = result.map(|r| match after_seq {
            Some(_) => json!({ "ok": true, "roomId": room.to_hex(), "replayed": r.replayed, "hasMore": r.has_more }),
            None => json!({ "ok": true, "roomId": room.to_hex() }),
        });
        respond(&socket, wants_ack, ack, "join_room", body);
        let _ = done.send(ok);
    });
    let join = Join {
        socket: s.clone(),
        after_seq,
        checked_version,
    };
    feed.join(join, answer).await;
    if outcome.await.unwrap_or(false) {
        tracing::debug!(socket = %s.id, user_id = %session.user.id, room_id = %room, ?after_seq, "joined");
    } else if newly && delivery::leave_room(&s, &room) {
        state.rooms.release(room).await;
    }
}

async fn on_leave_room(
    s: SocketRef,
    mut turn: Turn<Joins>,
    ack: AckSender,
    State(state): State<Arc<SocketState>>,
    TryData(data): TryData<Value>,
) {
    let result = async {
        turn.wait().await?;
        let room = payload::room_id(payload::read(data))?;
        if delivery::leave_room(&s, &room) {
            state.rooms.release(room).await;
        }
        Ok(json!({ "ok": true }))
    }
    .await;
    respond(&s, turn.wants_ack, ack, "leave_room", result);
}

async fn on_send_message(
    s: SocketRef,
    mut turn: Turn,
    ack: AckSender,
    State(state): State<Arc<SocketState>>,
    TryData(data): TryData<Value>,
) {
    let result = async {
        turn.wait().await?;
        let input = payload::send_message(payload::read(data))?;
        authorize(&state, &turn.session, input.room_id).await?;
        let message = state.chat.post_message(&turn.session.user, input.room_id, input.content, input.client_msg_id.as_ref()).await?;
        Ok(json!({ "ok": true, "id": message.id.to_hex(), "createdAt": format_time(&message.created_at) }))
    }
    .await;
    respond(&s, turn.wants_ack, ack, "send_message", result);
    if turn.session.take_kick() {
        let _ = s.disconnect();
    }
}

async fn on_get_presence(
    s: SocketRef,
    mut turn: Turn<Joins>,
    ack: AckSender,
    State(state): State<Arc<SocketState>>,
    TryData(data): TryData<Value>,
) {
    let result = async {
        turn.wait().await?;
        let room = payload::room_id(payload::read(data))?;
        authorize(&state, &turn.session, room).await?;
        let online = state.chat.online(room).await?;
        Ok(json!({ "ok": true, "roomId": room.to_hex(), "online": online }))
    }
    .await;
    respond(&s, turn.wants_ack, ack, "get_presence", result);
    if turn.session.take_kick() {
        let _ = s.disconnect();
    }
}

async fn on_typing(
    s: SocketRef,
    mut turn: Turn<Typing>,
    ack: AckSender,
    State(state): State<Arc<SocketState>>,
    TryData(data): TryData<Value>,
) {
    let result = async {
        turn.wait().await?;
        let room = payload::room_id(payload::read(data))?;
        authorize(&state, &turn.session, room).await?;
        state.chat.typing(&turn.session.user, room).await?;
        Ok(json!({ "ok": true }))
    }
    .await;
    respond(&s, turn.wants_ack, ack, "typing", result);
    if turn.session.take_kick() {
        let _ = s.disconnect();
    }
}

/// Any other event, and an event whose name cannot be read: refused with `BAD_REQUEST` (and
/// rate-limited like a message), so that a client emitting a misspelt event or broken JSON
/// hears about it.
async fn on_unknown_event(
    s: SocketRef,
    mut turn: Turn,
    ack: AckSender,
    TryData(data): TryData<Value>,
) {
    let result: Result<Value, ChatError> = match turn.wait().await {
        Err(error) => Err(error),
        Ok(()) if data.is_err() => Err(ChatError::BadRequest(
            "the event is not valid JSON: [\"name\", payload]".into(),
        )),
        Ok(()) => Err(ChatError::BadRequest("unknown event".into())),
    };
    respond(&s, turn.wants_ack, ack, "unknown", result);
    if turn.session.take_kick() {
        let _ = s.disconnect();
    }
}
