//! The REST API (same port as Socket.IO). JSON in and out; errors in the NestJS shape
//! `{ statusCode, error, message }`.

pub(crate) mod auth;
mod extract;
pub mod hashing;
pub(crate) mod rooms;
mod users;
pub mod web;

use crate::chat::Chat;
use crate::drain::Drain;
use crate::error::ChatError;
use axum::Router;
use axum::extract::{Request, State};
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
}

/// Brute-force protection of `/auth/login`.
#[derive(Clone)]
pub struct LoginLimits {
    /// Failure counters, shared by every gateway (Redis) or in this process (embedded).
    pub counters: std::sync::Arc<dyn shared::counters::Counters>,
    pub max_failures_per_email: u64,
    pub max_failures_per_ip: u64,
    /// Registrations from one client address per window.
    pub max_registrations_per_ip: u64,
    /// `GET /users?email=` lookups, and answers naming an unknown user id, per user and
    /// window (each tells whether an account exists).
    pub max_lookups_per_user: u64,
    pub window: std::time::Duration,
    /// Proxies in front of the gateway that append to `X-Forwarded-For`.
    pub trusted_proxy_hops: usize,
}

pub fn router(state: HttpState) -> Router {
    Router::new()
        .route("/auth/register", post(auth::register))
        .route("/auth/login", post(auth::login))
        .route("/auth/me", get(auth::me))
        .route("/chat/rooms", post(rooms::create).get(rooms::list))
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
            get(rooms::messages).post(rooms::post_message),
        )
        .route("/users", get(users::find))
        .route("/users/{id}", get(users::get))
        .fallback(not_found)
        .method_not_allowed_fallback(not_found)
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
