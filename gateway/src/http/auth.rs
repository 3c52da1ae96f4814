//! `/auth/register`, `/auth/login`, `/auth/me`.

use crate::error::ChatError;
use crate::http::HttpState;
use crate::http::extract::{Authenticated, JsonBody};
use argon2::Argon2;
use argon2::password_hash::{
    PasswordHash, PasswordHasher, PasswordVerifier, SaltString, rand_core::OsRng,
};
use axum::Json;
use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderMap, StatusCode};
use serde::Deserialize;
use serde_json::{Value, json};
use shared::ObjectId;
use shared::domain::{Email, check_new_password, parse_name};
use shared::store::{StoreError, User};
use std::net::{IpAddr, SocketAddr};
use std::sync::LazyLock;

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RegisterBody {
    email: String,
    password: String,
    display_name: Option<String>,
}

#[derive(Deserialize)]
pub struct LoginBody {
    email: String,
    password: String,
}

/// A valid registration.
pub struct NewUser {
    pub email: Email,
    pub password: String,
    pub display_name: String,
}

impl RegisterBody {
    pub fn validate(self) -> Result<NewUser, ChatError> {
        let email = Email::parse(&self.email)?;
        check_new_password(&self.password)?;
        let display_name = match self.display_name.as_deref() {
            Some(name) => parse_name("displayName", name)?,
            None => email.local_part().to_owned(),
        };
        Ok(NewUser {
            email,
            password: self.password,
            display_name,
        })
    }
}

/// Hashing is deliberately slow and memory-hungry: it runs on the hashing pool.
async fn hash_password(state: &HttpState, password: String) -> Result<String, ChatError> {
    state
        .hasher
        .run(move || {
            let salt = SaltString::generate(&mut OsRng);
            Argon2::default()
                .hash_password(password.as_bytes(), &salt)
                .map(|h| h.to_string())
                .map_err(|e| ChatError::Internal(format!("hashing failed: {e}")))
        })
        .await
        .unwrap_or_else(|super::hashing::Busy| Err(ChatError::busy()))
}

/// A hash to verify against when the e-mail is unknown, so that an unknown e-mail takes
/// as long as a wrong password.
static DUMMY_HASH: LazyLock<String> = LazyLock::new(|| {
    let salt = SaltString::generate(&mut OsRng);
    Argon2::default()
        .hash_password(b"not a real password", &salt)
        .map(|h| h.to_string())
        .unwrap_or_default()
});

async fn verify_password(
    state: &HttpState,
    password: String,
    hash: String,
) -> Result<bool, ChatError> {
    state
        .hasher
        .run(move || {
            PasswordHash::new(&hash)
                .map(|parsed| {
                    Argon2::default()
                        .verify_password(password.as_bytes(), &parsed)
                        .is_ok()
                })
                .unwrap_or(false)
        })
        .await
        .map_err(|super::hashing::Busy| ChatError::busy())
}

fn session(state: &HttpState, user: User) -> Result<Json<Value>, ChatError> {
    let token = state
        .chat
        .jwt
        .issue(user.id, &user.email, &user.display_name)
        .map_err(|e| ChatError::Internal(format!("signing failed: {e}")))?;
    Ok(Json(json!({ "accessToken": token, "user": user })))
}

/// Registers a user. Limited per client address (`REGISTER_MAX_PER_IP` attempts per
/// `LOGIN_WINDOW_SECS`, every attempt counted): each attempt costs a password hash, and its
/// 409 tells whether an e-mail has an account.
pub async fn register(
    State(state): State<HttpState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    JsonBody(body): JsonBody<RegisterBody>,
) -> Result<(StatusCode, Json<Value>), ChatError> {
    let ip_key = format!("register:ip:{}", client_ip(&state, peer, &headers));
    count_attempt(
        &state,
        &ip_key,
        state.login.max_registrations_per_ip,
        "too many registrations from this address, try again later",
    )
    .await?;
    let NewUser {
        email,
        password,
        display_name,
    } = body.validate()?;
    let hash = hash_password(&state, password).await?;
    let user = match state
        .chat
        .store
        .create_user(email.as_str(), &display_name, &hash)
        .await
    {
        Ok(user) => user,
        Err(StoreError::Conflict) => {
            return Err(ChatError::Conflict("email is already registered".into()));
        }
        Err(e) => return Err(e.into()),
    };
    tracing::info!(user_id = %user.id, "user registered");
    Ok((StatusCode::CREATED, session(&state, user)?))
}

/// The client's address. Behind `TRUSTED_PROXY_HOPS` proxies, each of which appends the
/// address it received the request from to `X-Forwarded-For`, it is the entry that many
/// places from the right: entries further left were written by the client and can be
/// forged. Without trusted proxies, or with fewer entries than hops, the connection's peer.
fn client_ip(state: &HttpState, peer: SocketAddr, headers: &HeaderMap) -> IpAddr {
    let hops = state.login.trusted_proxy_hops;
    if hops == 0 {
        return peer.ip();
    }
    let forwarded: Vec<&str> = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .collect();
    forwarded
        .len()
        .checked_sub(hops)
        .and_then(|i| forwarded[i].parse().ok())
        .unwrap_or_else(|| peer.ip())
}

/// Counts an attempt against a limit first, then compares, in one atomic step, so that
/// parallel attempts cannot all pass a check made before any of them was counted. An
/// attempt over the limit is refused (429) and not counted.
pub(crate) async fn count_attempt(
    state: &HttpState,
    key: &str,
    max: u64,
    refusal: &str,
) -> Result<(), ChatError> {
    let counters = &state.login.counters;
    let attempts = counters.increment(key, state.login.window).await?;
    if attempts <= max {
        return Ok(());
    }
    counters.decrement(key).await?;
    metrics::counter!("chat_gateway_login_rate_limited_total").increment(1);
    let (_, left) = counters.get(key).await?;
    Err(ChatError::RateLimited {
        message: refusal.into(),
        retry_after_secs: left.as_secs().max(1),
    })
}

/// Counts an answer that tells `user` whether an account exists (an e-mail lookup, or a
/// "user not found" for an id); 429 past `USER_LOOKUPS_PER_USER` in the window.
pub(crate) async fn count_lookup(state: &HttpState, user: &ObjectId) -> Result<(), ChatError> {
    count_attempt(
        state,
        &format!("lookup:user:{}", user.to_hex()),
        state.login.max_lookups_per_user,
        "too many user lookups, try again later",
    )
    .await
}

pub async fn login(
    State(state): State<HttpState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    JsonBody(body): JsonBody<LoginBody>,
) -> Result<Json<Value>, ChatError> {
    let refused = || ChatError::Unauthorized("invalid email or password".into());
    // Counted by the normalised e-mail whether or not it exists, so limits reveal nothing.
    let email_key = format!("login:email:{}", body.email.trim().to_lowercase());
    let ip_key = format!("login:ip:{}", client_ip(&state, peer, &headers));
    const REFUSAL: &str = "too many failed logins, try again later";
    count_attempt(
        &state,
        &email_key,
        state.login.max_failures_per_email,
        REFUSAL,
    )
    .await?;
    if let Err(limited) =
        count_attempt(&state, &ip_key, state.login.max_failures_per_ip, REFUSAL).await
    {
        state.login.counters.decrement(&email_key).await?;
        return Err(limited);
    }

    // A malformed e-mail cannot be registered: same answer as an unknown one.
    let credentials = match Email::parse(&body.email) {
        Ok(email) => state.chat.store.user_credentials(email.as_str()).await?,
        Err(_) => None,
    };
    let verified = match credentials {
        Some(credentials) => verify_password(&state, body.password, credentials.password_hash)
            .await
            .map(|ok| ok.then_some(credentials.user)),
        None => verify_password(&state, body.password, DUMMY_HASH.clone())
            .await
            .map(|_| None),
    };
    let ok = match verified {
        Ok(ok) => ok,
        // Not checked, so not a failure: uncounted.
        Err(busy) => {
            state.login.counters.decrement(&email_key).await?;
            state.login.counters.decrement(&ip_key).await?;
            return Err(busy);
        }
    };
    // A failure stays counted; a success is not a failure.
    let Some(user) = ok else {
        return Err(refused());
    };
    state.login.counters.reset(&email_key).await?;
    state.login.counters.decrement(&ip_key).await?;
    session(&state, user)
}

pub async fn me(
    State(state): State<HttpState>,
    Authenticated(user): Authenticated,
) -> Result<Json<User>, ChatError> {
    state
        .chat
        .store
        .user(user.id)
        .await?
        .map(Json)
        .ok_or_else(|| ChatError::Unauthorized("user no longer exists".into()))
}
