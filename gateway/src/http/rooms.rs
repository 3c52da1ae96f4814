//! `/chat/rooms` and its messages.

use crate::error::ChatError;
use crate::http::HttpState;
use crate::http::extract::QueryParams;
use crate::http::extract::{Authenticated, JsonBody};
use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::Value;
use shared::ObjectId;
use shared::domain::{ClientMsgId, MessageContent, parse_name, parse_object_id};
use shared::store::Room;
use shared::wire::{ChatMessage, Listed, MemberRemoved, RoomAdded, RoomEvent};
use std::collections::HashMap;

/// Default and largest page of `GET /chat/rooms/:id/messages` and of `GET /chat/rooms`.
const DEFAULT_PAGE: u32 = 50;
const MAX_PAGE: u32 = 100;

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct CreateRoomBody {
    name: Option<String>,
    /// The other participants' ids; the caller is added.
    #[serde(default)]
    #[schema(inline, value_type = Vec<String>, pattern = "^[0-9a-f]{24}$")]
    participant_ids: Vec<String>,
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct AddParticipantBody {
    #[schema(pattern = "^[0-9a-f]{24}$")]
    user_id: String,
}

/// Read as JSON values and checked by hand, for errors that name the field.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct PostMessageBody {
    /// 1 to 10,000 characters (Unicode code points).
    #[schema(value_type = String)]
    content: Value,
    /// Makes a retry safe: 1 to 64 characters.
    #[schema(value_type = Option<String>, nullable = false)]
    client_msg_id: Option<Value>,
}

impl AddParticipantBody {
    pub fn user_id(&self) -> &str {
        &self.user_id
    }
}

impl CreateRoomBody {
    /// The room's name and its participants, the creator first, without duplicates, at
    /// most `max` with the creator.
    pub fn validate(
        self,
        creator: ObjectId,
        max: usize,
    ) -> Result<(Option<String>, Vec<ObjectId>), ChatError> {
        let name = self
            .name
            .as_deref()
            .map(|n| parse_name("name", n))
            .transpose()?;
        let too_many = || {
            ChatError::BadRequest(format!(
                "a room has at most {max} participants, its creator included"
            ))
        };
        if self.participant_ids.len() > max {
            return Err(too_many());
        }
        let mut participants = vec![creator];
        let mut seen = std::collections::HashSet::from([creator]);
        for raw in &self.participant_ids {
            let id = parse_object_id("participantIds", raw)?;
            if seen.insert(id) {
                participants.push(id);
            }
        }
        if participants.len() > max {
            return Err(too_many());
        }
        Ok((name, participants))
    }
}

impl PostMessageBody {
    pub fn validate(self) -> Result<(MessageContent, Option<ClientMsgId>), ChatError> {
        let content = match self.content {
            Value::String(s) => MessageContent::parse(s)?,
            _ => return Err(ChatError::BadRequest("content must be a string".into())),
        };
        Ok((
            content,
            crate::socket::payload::client_msg_id(self.client_msg_id)?,
        ))
    }
}

/// Creates a room. Limited per user (`ROOM_CREATIONS_PER_USER` per `LOGIN_WINDOW_SECS`):
/// each room costs every gateway of its members a feed and a subscription.
#[utoipa::path(
    post,
    path = "/chat/rooms",
    tag = "rooms",
    request_body = CreateRoomBody,
    security(("accessToken" = [])),
    responses(
        (status = 201, description = "The room; the caller is its owner and a participant", body = shared::store::Room),
        (status = 400, description = "A malformed id or body, or more than MAX_ROOM_PARTICIPANTS participants", body = crate::http::openapi::ApiError),
        (status = 401, description = "No valid access token, or its user no longer exists", body = crate::http::openapi::ApiError),
        (status = 404, description = "A participant is not a user", body = crate::http::openapi::ApiError),
        (status = 429, description = "Past ROOM_CREATIONS_PER_USER or USER_LOOKUPS_PER_USER in the window", body = crate::http::openapi::ApiError, headers(("Retry-After" = u64, description = "Seconds to wait before trying again (on a 503, only when the gateway knows: a full password-hashing queue)"))),
        (status = 408, description = "The body did not arrive within HTTP_BODY_TIMEOUT_SECS", body = crate::http::openapi::ApiError),
        (status = 413, description = "The body is over the route's limit", body = crate::http::openapi::ApiError),
        (status = 503, description = "Redis or the store did not answer, or the gateway is shutting down", body = crate::http::openapi::ApiError, headers(("Retry-After" = u64, description = "Seconds to wait before trying again (on a 503, only when the gateway knows: a full password-hashing queue)"))),
    )
)]
pub async fn create(
    State(state): State<HttpState>,
    Authenticated(user): Authenticated,
    JsonBody(body): JsonBody<CreateRoomBody>,
) -> Result<(StatusCode, Json<Room>), ChatError> {
    let (name, participants) = body.validate(user.id, state.max_room_participants)?;
    // Counted before the room exists, so that parallel creations cannot all pass; taken
    // back when no room is created (a participant not found is a lookup, counted as one).
    let mut counted = super::auth::Counted::new(&state);
    counted
        .count(
            &state,
            format!("rooms:user:{}", user.id.to_hex()),
            state.login.max_room_creations,
            "too many rooms created, try again later",
        )
        .await?;
    let missing = state.chat.store.missing_users(&participants[1..]).await?;
    if let Some(id) = missing.first() {
        super::auth::count_lookup(&state, &user.id).await?;
        return Err(ChatError::NotFound(format!(
            "user {} not found",
            id.to_hex()
        )));
    }
    let room = state.chat.store.create_room(name, participants).await?;
    counted.keep();
    tracing::info!(room_id = %room.id, user_id = %user.id, "room created");
    announce_room(&state, room.participants.clone(), &room).await;
    Ok((StatusCode::CREATED, Json(room)))
}

/// `GET /chat/rooms?limit=&before=`: the user's rooms, most recently active first, at most
/// `limit` (default 50, at most 100); with `before` (a room id from the page before), the
/// ones after it.
#[utoipa::path(
    get,
    path = "/chat/rooms",
    tag = "rooms",
    params(("limit" = Option<u32>, Query, minimum = 1, description = "Page size, 50 by default; above 100 counts as 100"), ("before" = Option<String>, Query, description = "The last room of the page before: the next page")),
    security(("accessToken" = [])),
    responses(
        (status = 200, description = "The caller's rooms, most recently active first", body = Vec<shared::store::Room>),
        (status = 400, description = "A bad limit or before, or a repeated parameter", body = crate::http::openapi::ApiError),
        (status = 401, description = "No valid access token, or its user no longer exists", body = crate::http::openapi::ApiError),
        (status = 503, description = "Redis or the store did not answer, or the gateway is shutting down", body = crate::http::openapi::ApiError, headers(("Retry-After" = u64, description = "Seconds to wait before trying again (on a 503, only when the gateway knows: a full password-hashing queue)"))),
    )
)]
pub async fn list(
    State(state): State<HttpState>,
    Authenticated(user): Authenticated,
    QueryParams(pairs): QueryParams<Vec<(String, String)>>,
) -> Result<Json<Vec<Room>>, ChatError> {
    let query = single_values(pairs)?;
    let limit = page_limit(&query)?;
    let before = query
        .get("before")
        .map(|raw| parse_object_id("before", raw))
        .transpose()?;
    Ok(Json(
        state.chat.store.rooms_of(user.id, before, limit).await?,
    ))
}

/// Query parameters, each at most once.
fn single_values(pairs: Vec<(String, String)>) -> Result<HashMap<String, String>, ChatError> {
    let mut query = HashMap::new();
    for (key, value) in pairs {
        if query.contains_key(&key) {
            return Err(ChatError::BadRequest(format!(
                "{key} is given more than once"
            )));
        }
        query.insert(key, value);
    }
    Ok(query)
}

/// `limit`: a positive integer, at most [`MAX_PAGE`]; [`DEFAULT_PAGE`] when absent.
fn page_limit(query: &HashMap<String, String>) -> Result<u32, ChatError> {
    match query.get("limit") {
        None => Ok(DEFAULT_PAGE),
        Some(raw) => match raw.parse::<u32>() {
            Ok(n) if n >= 1 => Ok(n.min(MAX_PAGE)),
            _ => Err(ChatError::BadRequest(
                "limit must be a positive integer".into(),
            )),
        },
    }
}

#[utoipa::path(
    get,
    path = "/chat/rooms/{id}",
    operation_id = "getRoom",
    tag = "rooms",
    params(("id" = String, Path, pattern = "^[0-9a-fA-F]{24}$", description = "Room id, 24 hex digits")),
    security(("accessToken" = [])),
    responses(
        (status = 200, description = "The room", body = shared::store::Room),
        (status = 400, description = "A malformed id", body = crate::http::openapi::ApiError),
        (status = 401, description = "No valid access token, or its user no longer exists", body = crate::http::openapi::ApiError),
        (status = 403, description = "The caller is not a participant", body = crate::http::openapi::ApiError),
        (status = 404, description = "No such room", body = crate::http::openapi::ApiError),
        (status = 503, description = "Redis or the store did not answer, or the gateway is shutting down", body = crate::http::openapi::ApiError, headers(("Retry-After" = u64, description = "Seconds to wait before trying again (on a 503, only when the gateway knows: a full password-hashing queue)"))),
    )
)]
pub async fn get(
    State(state): State<HttpState>,
    Authenticated(user): Authenticated,
    Path(id): Path<String>,
) -> Result<Json<Room>, ChatError> {
    let room = parse_object_id("id", &id)?;
    Ok(Json(state.chat.room_for(&user.id, room).await?))
}

#[utoipa::path(
    post,
    path = "/chat/rooms/{id}/participants",
    tag = "rooms",
    params(("id" = String, Path, pattern = "^[0-9a-fA-F]{24}$", description = "Room id, 24 hex digits")), request_body = AddParticipantBody,
    security(("accessToken" = [])),
    responses(
        (status = 200, description = "The room (adding a participant twice changes nothing)", body = shared::store::Room),
        (status = 400, description = "A malformed id or body", body = crate::http::openapi::ApiError),
        (status = 401, description = "No valid access token, or its user no longer exists", body = crate::http::openapi::ApiError),
        (status = 403, description = "The caller is not the room's owner", body = crate::http::openapi::ApiError),
        (status = 404, description = "No such room or user", body = crate::http::openapi::ApiError),
        (status = 409, description = "The room has MAX_ROOM_PARTICIPANTS participants", body = crate::http::openapi::ApiError),
        (status = 429, description = "Past USER_LOOKUPS_PER_USER in the window", body = crate::http::openapi::ApiError, headers(("Retry-After" = u64, description = "Seconds to wait before trying again (on a 503, only when the gateway knows: a full password-hashing queue)"))),
        (status = 408, description = "The body did not arrive within HTTP_BODY_TIMEOUT_SECS", body = crate::http::openapi::ApiError),
        (status = 413, description = "The body is over the route's limit", body = crate::http::openapi::ApiError),
        (status = 503, description = "Redis or the store did not answer, or the gateway is shutting down", body = crate::http::openapi::ApiError, headers(("Retry-After" = u64, description = "Seconds to wait before trying again (on a 503, only when the gateway knows: a full password-hashing queue)"))),
    )
)]
pub async fn add_participant(
    State(state): State<HttpState>,
    Authenticated(user): Authenticated,
    Path(id): Path<String>,
    JsonBody(body): JsonBody<AddParticipantBody>,
) -> Result<Json<Room>, ChatError> {
    let room = parse_object_id("id", &id)?;
    let new = parse_object_id("userId", body.user_id())?;
    if !state
        .chat
        .room_for(&user.id, room)
        .await?
        .is_owner(&user.id)
    {
        return Err(ChatError::Forbidden(
            "only the room's owner adds participants".into(),
        ));
    }
    if !state.chat.store.missing_users(&[new]).await?.is_empty() {
        super::auth::count_lookup(&state, &user.id).await?;
        return Err(ChatError::NotFound(format!(
            "user {} not found",
            new.to_hex()
        )));
    }
    let updated = state
        .chat
        .store
        .add_participant(room, new, state.max_room_participants)
        .await?
        .ok_or_else(|| ChatError::NotFound("room not found".into()))?;
    announce_room(&state, vec![new], &updated).await;
    Ok(Json(updated))
}

/// Tells the sockets of `users` that they have `room` now (`room_added`). At most once: the
/// room is in the store already, and a client that misses the notice finds it in its next
/// `GET /chat/rooms`.
async fn announce_room(state: &HttpState, users: Vec<shared::ObjectId>, room: &Room) {
    let added = RoomEvent::RoomAdded(RoomAdded {
        user_ids: users,
        room: room.clone(),
    });
    if let Err(error) = state.chat.backplane.publish(&[added]).await {
        tracing::warn!(room_id = %room.id, %error, "room_added not published");
    }
}

/// Removes a participant: the owner removes anyone, every participant may remove themself
/// (leaving). Idempotent: removing someone who is not a participant answers the room as it
/// is (and tells the gateways again). Every gateway is told, so the user's sockets leave the
/// room; the removal is also counted in Redis, and every later message batch carries the
/// count, so a gateway that missed the notice finds out before delivering anything more.
///
/// A user who removes themself and is no longer a participant is retrying a removal whose
/// count or notice failed (Redis answered 503 after the store had it): the retry completes
/// them and answers 204, without the room they are no longer in. Removals take from the
/// user's join budget (`JOINS_PER_SECOND`): each makes every gateway with the room read its
/// participants again.
#[utoipa::path(
    delete,
    path = "/chat/rooms/{id}/participants/{user_id}",
    tag = "rooms",
    params(("id" = String, Path, pattern = "^[0-9a-fA-F]{24}$", description = "Room id, 24 hex digits"), ("user_id" = String, Path, pattern = "^[0-9a-fA-F]{24}$", description = "User id, 24 hex digits")),
    security(("accessToken" = [])),
    responses(
        (status = 200, description = "The room", body = shared::store::Room),
        (status = 204, description = "The caller removed themself and is not a participant (a retry of a removal whose answer was lost): told to the gateways again"),
        (status = 400, description = "A malformed id", body = crate::http::openapi::ApiError),
        (status = 401, description = "No valid access token, or its user no longer exists", body = crate::http::openapi::ApiError),
        (status = 403, description = "Not a participant, or removing someone else without being the owner", body = crate::http::openapi::ApiError),
        (status = 404, description = "No such room", body = crate::http::openapi::ApiError),
        (status = 429, description = "Over the caller's join budget", body = crate::http::openapi::ApiError, headers(("Retry-After" = u64, description = "Seconds to wait before trying again (on a 503, only when the gateway knows: a full password-hashing queue)"))),
        (status = 503, description = "Redis or the store did not answer, or the gateway is shutting down", body = crate::http::openapi::ApiError, headers(("Retry-After" = u64, description = "Seconds to wait before trying again (on a 503, only when the gateway knows: a full password-hashing queue)"))),
    )
)]
pub async fn remove_participant(
    State(state): State<HttpState>,
    Authenticated(user): Authenticated,
    Path((id, user_id)): Path<(String, String)>,
) -> Result<Response, ChatError> {
    let room = parse_object_id("id", &id)?;
    let target = parse_object_id("userId", &user_id)?;
    if !state.limits.joins.try_take(&user.id) {
        metrics::counter!("chat_gateway_rate_limited_total").increment(1);
        return Err(ChatError::RateLimited {
            message: "rate limit exceeded".into(),
            retry_after_secs: 1,
        });
    }
    let current = state
        .chat
        .store
        .room(room)
        .await?
        .ok_or_else(|| ChatError::NotFound("room not found".into()))?;
    let participant = current.has_participant(&user.id);
    if !participant && target != user.id {
        return Err(ChatError::Forbidden(
            "you are not a participant of this room".into(),
        ));
    }
    if target != user.id && !current.is_owner(&user.id) {
        return Err(ChatError::Forbidden(
            "only the room's owner removes other participants".into(),
        ));
    }
    let updated = state
        .chat
        .store
        .remove_participant(room, target)
        .await?
        .ok_or_else(|| ChatError::NotFound("room not found".into()))?;
    state.chat.backplane.members_changed(room).await?;
    state
        .chat
        .backplane
        .publish(&[RoomEvent::MemberRemoved(MemberRemoved {
            user_id: target,
            room_id: room,
        })])
        .await?;
    tracing::info!(room_id = %room, user_id = %target, by = %user.id, "participant removed");
    if participant {
        Ok(Json(updated).into_response())
    } else {
        Ok(StatusCode::NO_CONTENT.into_response())
    }
}

/// Where a page of history starts.
enum Anchor {
    /// The newest messages, newest first.
    Latest,
    /// Older than this message, newest first (`before`).
    Before(ObjectId),
    /// With a larger sequence number than this, oldest first (`afterSeq`): how a client
    /// catches up.
    AfterSeq(u64),
}

fn page(query: &HashMap<String, String>) -> Result<(u32, Anchor), ChatError> {
    let limit = page_limit(query)?;
    let anchor = match (query.get("before"), query.get("afterSeq")) {
        (Some(_), Some(_)) => {
            return Err(ChatError::BadRequest(
                "before and afterSeq cannot be combined".into(),
            ));
        }
        (Some(raw), None) => Anchor::Before(parse_object_id("before", raw)?),
        (None, Some(raw)) => Anchor::AfterSeq(raw.parse::<u64>().map_err(|_| {
            ChatError::BadRequest("afterSeq must be a non-negative integer".into())
        })?),
        (None, None) => Anchor::Latest,
    };
    Ok((limit, anchor))
}

#[utoipa::path(
    get,
    path = "/chat/rooms/{id}/messages",
    tag = "rooms",
    params(("id" = String, Path, pattern = "^[0-9a-fA-F]{24}$", description = "Room id, 24 hex digits"), ("limit" = Option<u32>, Query, minimum = 1, description = "Page size, 50 by default; above 100 counts as 100"), ("before" = Option<String>, Query, description = "A message id: older chat messages, newest first"), ("afterSeq" = Option<u64>, Query, description = "Every item with a larger seq, oldest first (server events included)")),
    security(("accessToken" = [])),
    responses(
        (status = 200, description = "Without afterSeq: chat messages, newest first. With afterSeq: every item of the sequence, oldest first", body = Vec<crate::http::openapi::SequenceItem>),
        (status = 400, description = "A bad limit, before or afterSeq, or before with afterSeq", body = crate::http::openapi::ApiError),
        (status = 401, description = "No valid access token, or its user no longer exists", body = crate::http::openapi::ApiError),
        (status = 403, description = "The caller is not a participant", body = crate::http::openapi::ApiError),
        (status = 404, description = "No such room", body = crate::http::openapi::ApiError),
        (status = 503, description = "Redis or the store did not answer, or the gateway is shutting down", body = crate::http::openapi::ApiError, headers(("Retry-After" = u64, description = "Seconds to wait before trying again (on a 503, only when the gateway knows: a full password-hashing queue)"))),
    )
)]
pub async fn messages(
    State(state): State<HttpState>,
    Authenticated(user): Authenticated,
    Path(id): Path<String>,
    QueryParams(pairs): QueryParams<Vec<(String, String)>>,
) -> Result<Json<Vec<Listed>>, ChatError> {
    let room = parse_object_id("id", &id)?;
    let (limit, anchor) = page(&single_values(pairs)?)?;
    state.chat.room_for(&user.id, room).await?;
    let store = &state.chat.store;
    let page = match anchor {
        Anchor::Latest => store.messages(room, None, limit).await?,
        Anchor::Before(id) => store.messages(room, Some(id), limit).await?,
        // Every item of the sequence, server events too: a client paging by `seq` must
        // never stall on a number it cannot see.
        Anchor::AfterSeq(seq) => store.messages_after(room, seq, limit).await?,
    };
    Ok(Json(page.into_iter().map(ChatMessage::listed).collect()))
}

/// `GET /chat/rooms/:id/presence`: who is online in the room, for its participants.
#[utoipa::path(
    get,
    path = "/chat/rooms/{id}/presence",
    tag = "rooms",
    params(("id" = String, Path, pattern = "^[0-9a-fA-F]{24}$", description = "Room id, 24 hex digits")),
    security(("accessToken" = [])),
    responses(
        (status = 200, description = "Who is online in the room", body = crate::http::openapi::Online),
        (status = 400, description = "A malformed id", body = crate::http::openapi::ApiError),
        (status = 401, description = "No valid access token, or its user no longer exists", body = crate::http::openapi::ApiError),
        (status = 403, description = "The caller is not a participant", body = crate::http::openapi::ApiError),
        (status = 404, description = "No such room", body = crate::http::openapi::ApiError),
        (status = 503, description = "Redis or the store did not answer, or the gateway is shutting down", body = crate::http::openapi::ApiError, headers(("Retry-After" = u64, description = "Seconds to wait before trying again (on a 503, only when the gateway knows: a full password-hashing queue)"))),
    )
)]
pub async fn presence(
    State(state): State<HttpState>,
    Authenticated(user): Authenticated,
    Path(id): Path<String>,
) -> Result<Json<crate::http::openapi::Online>, ChatError> {
    let room = parse_object_id("id", &id)?;
    state.chat.room_for(&user.id, room).await?;
    let online = state.chat.online(room).await?;
    Ok(Json(crate::http::openapi::Online {
        room_id: room.to_hex(),
        online,
    }))
}

#[utoipa::path(
    post,
    path = "/chat/rooms/{id}/messages",
    tag = "rooms",
    params(("id" = String, Path, pattern = "^[0-9a-fA-F]{24}$", description = "Room id, 24 hex digits")), request_body = PostMessageBody,
    security(("accessToken" = [])),
    responses(
        (status = 201, description = "The message, also delivered to sockets as `message`", body = shared::wire::ChatMessage),
        (status = 400, description = "Bad content, clientMsgId or body", body = crate::http::openapi::ApiError),
        (status = 401, description = "No valid access token, or its user no longer exists", body = crate::http::openapi::ApiError),
        (status = 403, description = "The caller is not a participant", body = crate::http::openapi::ApiError),
        (status = 404, description = "No such room", body = crate::http::openapi::ApiError),
        (status = 409, description = "The clientMsgId was used for a message with other content", body = crate::http::openapi::ApiError),
        (status = 429, description = "Over the caller's event rate (shared with their sockets)", body = crate::http::openapi::ApiError, headers(("Retry-After" = u64, description = "Seconds to wait before trying again (on a 503, only when the gateway knows: a full password-hashing queue)"))),
        (status = 408, description = "The body did not arrive within HTTP_BODY_TIMEOUT_SECS", body = crate::http::openapi::ApiError),
        (status = 413, description = "The body is over the route's limit", body = crate::http::openapi::ApiError),
        (status = 503, description = "Redis or the store did not answer, or the gateway is shutting down", body = crate::http::openapi::ApiError, headers(("Retry-After" = u64, description = "Seconds to wait before trying again (on a 503, only when the gateway knows: a full password-hashing queue)"))),
    )
)]
pub async fn post_message(
    State(state): State<HttpState>,
    Authenticated(user): Authenticated,
    Path(id): Path<String>,
    JsonBody(body): JsonBody<PostMessageBody>,
) -> Result<(StatusCode, Json<ChatMessage>), ChatError> {
    let room = parse_object_id("id", &id)?;
    let (content, client_msg_id) = body.validate()?;
    // The same budget as the user's sockets.
    if !state.limits.events.try_take(&user.id) {
        metrics::counter!("chat_gateway_rate_limited_total").increment(1);
        return Err(ChatError::RateLimited {
            message: "rate limit exceeded".into(),
            retry_after_secs: 1,
        });
    }
    state.chat.room_for(&user.id, room).await?;
    // Sender names from the user record, as on sockets, not from a possibly older token.
    let user = match state.chat.store.user(user.id).await? {
        Some(record) => shared::jwt::AuthUser {
            email: Some(record.email),
            display_name: Some(record.display_name),
            ..user
        },
        None => return Err(ChatError::Unauthorized("user no longer exists".into())),
    };
    let message = state
        .chat
        .post_message(&user, room, content, client_msg_id.as_ref())
        .await?;
    Ok((StatusCode::CREATED, Json(message)))
}
