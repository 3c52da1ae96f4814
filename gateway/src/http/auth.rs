//! `/auth/register`, `/auth/login`, `/auth/me`.

use crate::address::client_address;
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
use std::net::SocketAddr;
use std::sync::LazyLock;
use std::time::Duration;

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
) -> Result<u64, ChatError> {
    count_attempt_in(state, key, max, state.login.window, refusal).await
}

/// [`count_attempt`] in a window of its own; returns the count with this attempt.
async fn count_attempt_in(
    state: &HttpState,
    key: &str,
    max: u64,
    window: Duration,
    refusal: &str,
) -> Result<u64, ChatError> {
    let counters = &state.login.counters;
    let attempts = counters.increment(key, window).await?;
    if attempts <= max {
        return Ok(attempts);
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
    .map(drop)
}

/// Logs in. Refused with 429 past `LOGIN_MAX_FAILURES_PER_IP` failures from the client's
/// address, and past `LOGIN_MAX_FAILURES_PER_EMAIL` failures for the e-mail from that
/// address. Past `LOGIN_SLOWDOWN_AFTER` failures for the e-mail from anywhere (counted for
/// the whole window, successes or not), each attempt waits longer before the password is
/// checked, and the addresses that have failed on the e-mail before share one attempt per
/// wait (429 otherwise), so that parallel attempts do not share a wait either. An address
/// new to the e-mail, the owner's, is only slowed: a guesser elsewhere slows the owner down
/// but cannot lock them out. The e-mail's counters are named by its fingerprint, never by
/// what the client sent.
pub async fn login(
    State(state): State<HttpState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    JsonBody(body): JsonBody<LoginBody>,
) -> Result<Json<Value>, ChatError> {
    let refused = || ChatError::Unauthorized("invalid email or password".into());
    const REFUSAL: &str = "too many failed logins, try again later";
    let address = client_address(state.login.trusted_proxy_hops, peer, &headers);
    let ip_key = format!("login:ip:{address}");
    count_attempt(&state, &ip_key, state.login.max_failures_per_ip, REFUSAL).await?;
    // A malformed e-mail cannot be registered: a failure, with the same answer as an unknown
    // one, and no counter named after it.
    let Ok(email) = Email::parse(&body.email) else {
        return Err(refused());
    };
    let account_key = format!("login:account:{}", email.fingerprint());
    let pair_key = format!("login:ip-account:{address}:{}", email.fingerprint());
    let from_here = match count_attempt(
        &state,
        &pair_key,
        state.login.max_failures_per_email,
        REFUSAL,
    )
    .await
    {
        Ok(attempts) => attempts,
        Err(limited) => {
            state.login.counters.decrement(&ip_key).await?;
            return Err(limited);
        }
    };
    let (failures, _) = state.login.counters.get(&account_key).await?;
    if let Some(over) = failures
        .checked_sub(state.login.slowdown_after)
        .filter(|n| *n > 0)
    {
        let wait =
            (LOGIN_SLOWDOWN_STEP * u32::try_from(over).unwrap_or(u32::MAX)).min(LOGIN_SLOWDOWN_MAX);
        if from_here > 1 {
            let gate = format!("login:gate:{}", email.fingerprint());
            if let Err(limited) = count_attempt_in(&state, &gate, 1, wait, REFUSAL).await {
                state.login.counters.decrement(&pair_key).await?;
                state.login.counters.decrement(&ip_key).await?;
                return Err(limited);
            }
        }
        tokio::time::sleep(wait).await;
    }

    let credentials = state.chat.store.user_credentials(email.as_str()).await?;
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
            state.login.counters.decrement(&pair_key).await?;
            state.login.counters.decrement(&ip_key).await?;
            return Err(busy);
        }
    };
    // A failure stays counted (and slows the account down); a success is not a failure.
    let Some(user) = ok else {
        state
            .login
            .counters
            .increment(&account_key, state.login.window)
            .await?;
        return Err(refused());
    };
    // The account's failures stay: an owner logging in often must not lift a guesser's
    // slowdown.
    state.login.counters.reset(&pair_key).await?;
    state.login.counters.decrement(&ip_key).await?;
    session(&state, user)
}

/// How much longer each login waits per failure of its e-mail past `LOGIN_SLOWDOWN_AFTER`,
/// and at most.
const LOGIN_SLOWDOWN_STEP: Duration = Duration::from_millis(250);
const LOGIN_SLOWDOWN_MAX: Duration = Duration::from_secs(5);

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
