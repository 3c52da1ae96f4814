//! The REST API (same port as Socket.IO). JSON in and out; errors in the NestJS shape
//! `{ statusCode, error, message }`.

pub(crate) mod auth;
mod extract;
pub mod hashing;
pub mod openapi;
pub(crate) mod rooms;
pub mod server_api;
mod users;
pub mod web;

use crate::chat::Chat;
use crate::drain::Drain;
use crate::error::ChatError;
use axum::Router;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{Method, Uri};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use std::sync::Arc;

#[derive(Clone)]
pub struct HttpState {
    pub chat: Chat,
    /// Per-user rate limits, shared with the sockets.
    pub limits: Arc<crate::limits::Limits>,
    pub drain: Arc<Drain>,
    /// Password hashing threads behind a bounded queue.
    pub hasher: Arc<hashing::Hasher>,
    pub login: LoginLimits,
    /// `MAX_ROOM_PARTICIPANTS`.
    pub max_room_participants: usize,
    /// The server API, when `SERVER_API_KEY` is set.
    pub server_api: Option<server_api::ServerApi>,
}

/// Brute-force protection of `/auth/login`.
#[derive(Clone)]
pub struct LoginLimits {
    /// Failure counters, shared by every gateway (Redis) or in this process (embedded).
    pub counters: std::sync::Arc<dyn shared::counters::Counters>,
    /// Failed logins of one e-mail from one address.
    pub max_failures_per_email: u64,
    pub max_failures_per_ip: u64,
    /// Failed logins of one e-mail from anywhere after which each login waits longer.
    pub slowdown_after: u64,
    /// Rooms a user may create per window.
    pub max_room_creations: u64,
    /// Registrations from one client address per window.
    pub max_registrations_per_ip: u64,
    /// `GET /users?email=` lookups, and answers naming an unknown user id, per user and
    /// window (each tells whether an account exists).
    pub max_lookups_per_user: u64,
    pub window: std::time::Duration,
    /// Proxies in front of the gateway that append to `X-Forwarded-For`.
    pub trusted_proxy_hops: usize,
}

/// The largest request body of most routes (sign-ups, logins, a participant to add): a
/// 1 MB e-mail is refused with 413 once 16 KB of it are read, and no more is kept.
const BODY_LIMIT: usize = 16 * 1024;
/// A message's body: 10,000 characters, each of which JSON may write as a 12-byte escape pair.
const MESSAGE_BODY_LIMIT: usize = 128 * 1024;

pub fn router(state: HttpState) -> Router {
    // A room's creation names up to MAX_ROOM_PARTICIPANTS ids of 26 bytes each in JSON.
    let create_room_limit = BODY_LIMIT + 32 * state.max_room_participants;
    let mut router = Router::new();
    if state.server_api.is_some() {
        router = router.route(
            "/server/rooms/{id}/events",
            post(server_api::post_event).layer(DefaultBodyLimit::max(server_api::BODY_LIMIT)),
        );
    }
    router
        .route(
            "/openapi.json",
            openapi::serve(openapi::document(
                state.server_api.as_ref().map(server_api::ServerApi::events),
            )),
        )
        .route("/auth/register", post(auth::register))
        .route("/auth/login", post(auth::login))
        .route("/auth/me", get(auth::me))
        .route(
            "/chat/rooms",
            post(rooms::create)
                .layer(DefaultBodyLimit::max(create_room_limit))
                .get(rooms::list),
        )
        .route("/chat/rooms/{id}", get(rooms::get))
        .route(
            "/chat/rooms/{id}/participants",
            post(rooms::add_participant),
        )
        .route(
            "/chat/rooms/{id}/participants/{user_id}",
            delete(rooms::remove_participant),
        )
        .route(
            "/chat/rooms/{id}/messages",
            get(rooms::messages)
                .post(rooms::post_message)
                .layer(DefaultBodyLimit::max(MESSAGE_BODY_LIMIT)),
        )
        .route("/chat/rooms/{id}/presence", get(rooms::presence))
        .route("/users", get(users::find))
        .route("/users/{id}", get(users::get))
        .fallback(not_found)
        .method_not_allowed_fallback(not_found)
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .layer(middleware::from_fn_with_state(state.drain.clone(), admit))
        .with_state(state)
}

/// Counts the request as in flight, or refuses it with 503 once shutdown started.
async fn admit(State(drain): State<Arc<Drain>>, request: Request, next: Next) -> Response {
    match drain.enter() {
        Some(_in_flight) => next.run(request).await,
        None => ChatError::Unavailable("gateway shutting down".into()).into_response(),
    }
}

async fn not_found(method: Method, uri: Uri) -> ChatError {
    ChatError::NotFound(format!("Cannot {method} {}", uri.path()))
}
