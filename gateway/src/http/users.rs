//! `/users`: finding people to put in a room (the chat page picks participants by e-mail).

use crate::error::ChatError;
use crate::http::HttpState;
use crate::http::extract::Authenticated;
use crate::http::extract::QueryParams;
use axum::Json;
use axum::extract::{Path, State};
use serde::{Deserialize, Serialize};
use shared::ObjectId;
use shared::domain::{Email, parse_object_id};
use shared::store::User;

#[derive(Deserialize)]
pub struct ByEmail {
    email: Option<String>,
}

/// `GET /users?email=<address>`: the user with that e-mail (case-insensitive), or 404.
#[utoipa::path(
    get,
    path = "/users",
    tag = "users",
    params(("email" = String, Query, description = "An e-mail address, matched case-insensitively")),
    security(("accessToken" = [])),
    responses(
        (status = 200, description = "The user", body = shared::store::User),
        (status = 400, description = "A missing or invalid e-mail", body = crate::http::openapi::ApiError),
        (status = 401, description = "No valid access token, or its user no longer exists", body = crate::http::openapi::ApiError),
        (status = 404, description = "No such user", body = crate::http::openapi::ApiError),
        (status = 429, description = "Past USER_LOOKUPS_PER_USER lookups in the window", body = crate::http::openapi::ApiError, headers(("Retry-After" = u64, description = "Seconds to wait before trying again (on a 503, only when the gateway knows: a full password-hashing queue)"))),
        (status = 503, description = "Redis or the store did not answer, or the gateway is shutting down", body = crate::http::openapi::ApiError, headers(("Retry-After" = u64, description = "Seconds to wait before trying again (on a 503, only when the gateway knows: a full password-hashing queue)"))),
    )
)]
pub async fn find(
    State(state): State<HttpState>,
    Authenticated(user): Authenticated,
    QueryParams(query): QueryParams<ByEmail>,
) -> Result<Json<User>, ChatError> {
    let raw = query
        .email
        .ok_or_else(|| ChatError::BadRequest("email is required".into()))?;
    let email = Email::parse(&raw)?;
    // Every answer says whether the address has an account: limited per user.
    super::auth::count_lookup(&state, &user.id).await?;
    state
        .chat
        .store
        .user_credentials(email.as_str())
        .await?
        .map(|c| Json(c.user))
        .ok_or_else(|| ChatError::NotFound(format!("no user with email {}", email.as_str())))
}

/// What `GET /users/:id` shows: the e-mail only to the user and to people who share a room
/// with them.
#[derive(Serialize, utoipa::ToSchema)]
pub struct Profile {
    #[serde(rename = "_id", with = "shared::wire::oid_hex")]
    #[schema(value_type = String, pattern = "^[0-9a-f]{24}$")]
    id: ObjectId,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    email: Option<String>,
    #[serde(rename = "displayName")]
    display_name: String,
}

/// `GET /users/:id`: a user's profile, or 404. Ids are easy to guess (they grow with time),
/// so every answer about someone the caller shares no room with counts against
/// `USER_LOOKUPS_PER_USER`, and the e-mail is shown only to people who share a room with
/// the user. (The names of roommates, which the chat page looks up for typing notices, are
/// not counted: the caller knows them already.)
#[utoipa::path(
    get,
    path = "/users/{id}",
    operation_id = "getUser",
    tag = "users",
    params(("id" = String, Path, pattern = "^[0-9a-fA-F]{24}$", description = "User id, 24 hex digits")),
    security(("accessToken" = [])),
    responses(
        (status = 200, description = "The profile; the e-mail only for the caller and their roommates", body = Profile),
        (status = 400, description = "A malformed id", body = crate::http::openapi::ApiError),
        (status = 401, description = "No valid access token, or its user no longer exists", body = crate::http::openapi::ApiError),
        (status = 404, description = "No such user", body = crate::http::openapi::ApiError),
        (status = 429, description = "Past USER_LOOKUPS_PER_USER lookups in the window", body = crate::http::openapi::ApiError, headers(("Retry-After" = u64, description = "Seconds to wait before trying again (on a 503, only when the gateway knows: a full password-hashing queue)"))),
        (status = 503, description = "Redis or the store did not answer, or the gateway is shutting down", body = crate::http::openapi::ApiError, headers(("Retry-After" = u64, description = "Seconds to wait before trying again (on a 503, only when the gateway knows: a full password-hashing queue)"))),
    )
)]
pub async fn get(
    State(state): State<HttpState>,
    Authenticated(user): Authenticated,
    Path(id): Path<String>,
) -> Result<Json<Profile>, ChatError> {
    let id = parse_object_id("id", &id)?;
    let known = id == user.id || state.chat.store.share_a_room(user.id, id).await?;
    if !known {
        super::auth::count_lookup(&state, &user.id).await?;
    }
    let found = state
        .chat
        .store
        .user(id)
        .await?
        .ok_or_else(|| ChatError::NotFound("user not found".into()))?;
    Ok(Json(Profile {
        id: found.id,
        email: known.then_some(found.email),
        display_name: found.display_name,
    }))
}
