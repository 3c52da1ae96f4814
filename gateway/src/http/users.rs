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
#[derive(Serialize)]
pub struct Profile {
    #[serde(rename = "_id", with = "shared::wire::oid_hex")]
    id: ObjectId,
    #[serde(skip_serializing_if = "Option::is_none")]
    email: Option<String>,
    #[serde(rename = "displayName")]
    display_name: String,
}

/// `GET /users/:id`: a user's profile, or 404. Ids are easy to guess (they grow with time),
/// so every answer about someone the caller shares no room with counts against
/// `USER_LOOKUPS_PER_USER`, and the e-mail is shown only to people who share a room with
/// the user. (The names of roommates, which the chat page looks up for typing notices, are
/// not counted: the caller knows them already.)
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
