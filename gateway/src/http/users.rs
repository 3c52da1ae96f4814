//! `/users`: finding people to put in a room (the chat page picks participants by e-mail).

use crate::error::ChatError;
use crate::http::HttpState;
use crate::http::extract::Authenticated;
use crate::http::extract::QueryParams;
use axum::Json;
use axum::extract::{Path, State};
use serde::Deserialize;
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

/// `GET /users/:id`: a user's public profile, or 404.
pub async fn get(
    State(state): State<HttpState>,
    Authenticated(_): Authenticated,
    Path(id): Path<String>,
) -> Result<Json<User>, ChatError> {
    let id = parse_object_id("id", &id)?;
    state
        .chat
        .store
        .user(id)
        .await?
        .map(Json)
        .ok_or_else(|| ChatError::NotFound("user not found".into()))
}
