//! `/auth/register`, `/auth/login`, `/auth/me`.

use crate::address::client_address;
use crate::error::ChatError;
use crate::http::HttpState;
use crate::http::extract::{Authenticated, JsonBody};
use crate::http::openapi::Session;
use argon2::Argon2;
use argon2::password_hash::{
    PasswordHash, PasswordHasher, PasswordVerifier, SaltString, rand_core::OsRng,
};
use axum::Json;
use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderMap, StatusCode};
use serde::Deserialize;
use shared::ObjectId;
use shared::counters::Counters;
use shared::domain::{Email, check_new_password, parse_name};
use shared::store::{StoreError, User};
use std::net::SocketAddr;
use std::sync::{Arc, LazyLock};
use std::time::Duration;

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct RegisterBody {
    #[schema(format = Email)]
    email: String,
    /// 8 to 1,024 characters.
    #[schema(min_length = 8, max_length = 1024)]
    password: String,
    /// The part of the e-mail before `@` by default.
    #[schema(nullable = false)]
    display_name: Option<String>,
}

#[derive(Deserialize, utoipa::ToSchema)]
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

fn session(state: &HttpState, user: User) -> Result<Json<Session>, ChatError> {
    let token = state
        .chat
        .jwt
        .issue(user.id, &user.email, &user.display_name)
        .map_err(|e| ChatError::Internal(format!("signing failed: {e}")))?;
    Ok(Json(Session {
        access_token: token,
        user,
    }))
}

/// Registers a user. Limited per client address (`REGISTER_MAX_PER_IP` attempts per
/// `LOGIN_WINDOW_SECS`, every attempt counted): each attempt costs a password hash, and its
/// 409 tells whether an e-mail has an account.
#[utoipa::path(
    post,
    path = "/auth/register",
    tag = "auth",
    request_body = RegisterBody,
    security(()),
    responses(
        (status = 201, description = "Registered: a token and the user", body = crate::http::openapi::Session),
        (status = 400, description = "Invalid e-mail, display name or password (8 to 1,024 characters), or a malformed body", body = crate::http::openapi::ApiError),
        (status = 409, description = "The e-mail has an account (case-insensitive)", body = crate::http::openapi::ApiError),
        (status = 429, description = "Past REGISTER_MAX_PER_IP registrations from the address in the window", body = crate::http::openapi::ApiError, headers(("Retry-After" = u64, description = "Seconds to wait before trying again (on a 503, only when the gateway knows: a full password-hashing queue)"))),
        (status = 408, description = "The body did not arrive within HTTP_BODY_TIMEOUT_SECS", body = crate::http::openapi::ApiError),
        (status = 413, description = "The body is over the route's limit", body = crate::http::openapi::ApiError),
        (status = 503, description = "Too many sign-ins being hashed at once, Redis or the store did not answer, or shutting down", body = crate::http::openapi::ApiError, headers(("Retry-After" = u64, description = "Seconds to wait before trying again (on a 503, only when the gateway knows: a full password-hashing queue)"))),
    )
)]
pub async fn register(
    State(state): State<HttpState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    JsonBody(body): JsonBody<RegisterBody>,
) -> Result<(StatusCode, Json<Session>), ChatError> {
    let ip_key = format!(
        "register:ip:{}",
        client_address(state.login.trusted_proxy_hops, peer, &headers)
    );
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

/// Attempts counted before their outcome is known, taken back unless kept: on an early
/// return, on an error of Redis or the store, and when the client goes away mid-way (the
/// handler is dropped then, and the refund runs on a task of its own).
pub(crate) struct Counted {
    counters: Arc<dyn Counters>,
    keys: Vec<String>,
}

impl Counted {
    pub fn new(state: &HttpState) -> Self {
        Self {
            counters: state.login.counters.clone(),
            keys: Vec::new(),
        }
    }

    /// [`count_attempt`], to be taken back unless kept.
    pub async fn count(
        &mut self,
        state: &HttpState,
        key: String,
        max: u64,
        refusal: &str,
    ) -> Result<(), ChatError> {
        count_attempt(state, &key, max, refusal).await?;
        self.keys.push(key);
        Ok(())
    }

    /// Keeps every attempt counted so far.
    pub fn keep(mut self) {
        self.keys.clear();
    }

    /// Keeps the attempt counted under `key`.
    fn keep_one(&mut self, key: &str) {
        self.keys.retain(|k| k != key);
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        if self.keys.is_empty() {
            return;
        }
        let (counters, keys) = (self.counters.clone(), std::mem::take(&mut self.keys));
        tokio::spawn(async move {
            for key in keys {
                if let Err(error) = counters.decrement(&key).await {
                    tracing::debug!(%error, "taking back a counted attempt failed");
                }
            }
        });
    }
}

/// Logs in. Refused with 429 past `LOGIN_MAX_FAILURES_PER_IP` failures from the client's
/// address, and past `LOGIN_MAX_FAILURES_PER_EMAIL` failures for the e-mail from that
/// address. Past `LOGIN_SLOWDOWN_AFTER` failures for the e-mail from anywhere (counted for
/// the whole window, successes or not), each attempt waits longer before the password is
/// checked. Nothing locks the e-mail itself: a guesser elsewhere slows the owner down but
/// cannot shut them out. (The wait does not slow guesses sent in parallel; the per-address
/// limits bound those.) The e-mail's counters are named by its fingerprint, never by what
/// the client sent. An attempt that ends without the password checked (Redis or the store
/// failing, the hashing pool full, the client gone) is not counted.
#[utoipa::path(
    post,
    path = "/auth/login",
    tag = "auth",
    request_body = LoginBody,
    security(()),
    responses(
        (status = 200, description = "A token and the user", body = crate::http::openapi::Session),
        (status = 400, description = "A malformed body", body = crate::http::openapi::ApiError),
        (status = 401, description = "Invalid email or password (the same answer for an unknown e-mail)", body = crate::http::openapi::ApiError),
        (status = 429, description = "Past LOGIN_MAX_FAILURES_PER_IP, or LOGIN_MAX_FAILURES_PER_EMAIL from the address", body = crate::http::openapi::ApiError, headers(("Retry-After" = u64, description = "Seconds to wait before trying again (on a 503, only when the gateway knows: a full password-hashing queue)"))),
        (status = 408, description = "The body did not arrive within HTTP_BODY_TIMEOUT_SECS", body = crate::http::openapi::ApiError),
        (status = 413, description = "The body is over the route's limit", body = crate::http::openapi::ApiError),
        (status = 503, description = "Too many sign-ins being hashed at once, Redis or the store did not answer, or shutting down", body = crate::http::openapi::ApiError, headers(("Retry-After" = u64, description = "Seconds to wait before trying again (on a 503, only when the gateway knows: a full password-hashing queue)"))),
    )
)]
pub async fn login(
    State(state): State<HttpState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    JsonBody(body): JsonBody<LoginBody>,
) -> Result<Json<Session>, ChatError> {
    let refused = || ChatError::Unauthorized("invalid email or password".into());
    const REFUSAL: &str = "too many failed logins, try again later";
    let address = client_address(state.login.trusted_proxy_hops, peer, &headers);
    let mut counted = Counted::new(&state);
    counted
        .count(
            &state,
            format!("login:ip:{address}"),
            state.login.max_failures_per_ip,
            REFUSAL,
        )
        .await?;
    // A malformed e-mail cannot be registered: a failure, with the same answer as an unknown
    // one, and no counter named after it.
    let Ok(email) = Email::parse(&body.email) else {
        counted.keep();
        return Err(refused());
    };
    let account_key = format!("login:account:{}", email.fingerprint());
    let pair_key = format!("login:ip-account:{address}:{}", email.fingerprint());
    counted
        .count(
            &state,
            pair_key.clone(),
            state.login.max_failures_per_email,
            REFUSAL,
        )
        .await?;
    let (failures, _) = state.login.counters.get(&account_key).await?;
    if let Some(over) = failures
        .checked_sub(state.login.slowdown_after)
        .filter(|n| *n > 0)
    {
        let wait = LOGIN_SLOWDOWN_STEP * u32::try_from(over).unwrap_or(u32::MAX);
        tokio::time::sleep(wait.min(LOGIN_SLOWDOWN_MAX)).await;
    }

    let credentials = state.chat.store.user_credentials(email.as_str()).await?;
    let verified = match credentials {
        Some(credentials) => verify_password(&state, body.password, credentials.password_hash)
            .await?
            .then_some(credentials.user),
        None => {
            verify_password(&state, body.password, DUMMY_HASH.clone()).await?;
            None
        }
    };
    let Some(user) = verified else {
        // A failure: it stays counted, and slows the e-mail down.
        state
            .login
            .counters
            .increment(&account_key, state.login.window)
            .await?;
        counted.keep();
        return Err(refused());
    };
    // The address's count is taken back (a success is no failure) and its failures on this
    // e-mail forgotten. The e-mail's own failures stay: an owner logging in often must not
    // lift a guesser's slowdown.
    counted.keep_one(&pair_key);
    state.login.counters.reset(&pair_key).await?;
    session(&state, user)
}

/// How much longer each login waits per failure of its e-mail past `LOGIN_SLOWDOWN_AFTER`,
/// and at most.
const LOGIN_SLOWDOWN_STEP: Duration = Duration::from_millis(250);
const LOGIN_SLOWDOWN_MAX: Duration = Duration::from_secs(5);

#[utoipa::path(
    get,
    path = "/auth/me",
    tag = "auth",
    security(("accessToken" = [])),
    responses(
        (status = 200, description = "The caller", body = shared::store::User),
        (status = 401, description = "No valid access token, or its user no longer exists", body = crate::http::openapi::ApiError),
        (status = 503, description = "Redis or the store did not answer, or the gateway is shutting down", body = crate::http::openapi::ApiError, headers(("Retry-After" = u64, description = "Seconds to wait before trying again (on a 503, only when the gateway knows: a full password-hashing queue)"))),
    )
)]
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
