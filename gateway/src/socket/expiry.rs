//! Closes sockets whose token has expired, all of a gateway's sockets in one task.
//!
//! A timer task per socket cost about 2.4 KB of every connection (heaptrack, see
//! docs/BENCHMARKS.md); an ordered set of (expiry, socket) and a sweep once a second cost
//! one entry. A second's lateness is well inside the clock skew tokens are allowed.

use crate::error::ChatError;
use shared::jwt::TokenError;
use socketioxide::extract::SocketRef;
use socketioxide::socket::Sid;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

const SWEEP_EVERY: Duration = Duration::from_secs(1);

#[derive(Default)]
pub struct Expiries {
    /// (token expiry in Unix seconds, socket) → the socket to close.
    due: Mutex<BTreeMap<(i64, Sid), SocketRef>>,
}

impl Expiries {
    /// A new set and its sweeping task, which ends when the set is dropped.
    pub fn start() -> Arc<Self> {
        let expiries = Arc::new(Self::default());
        tokio::spawn(sweep(Arc::downgrade(&expiries)));
        expiries
    }

    /// Closes `s` at `exp` (Unix seconds) unless [`Expiries::remove`]d first.
    pub fn insert(&self, exp: i64, s: SocketRef) {
        self.lock().insert((exp, s.id), s);
    }

    /// The socket is gone: forget it.
    pub fn remove(&self, exp: i64, sid: Sid) {
        self.lock().remove(&(exp, sid));
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<(i64, Sid), SocketRef>> {
        self.due.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes every socket due at `now` (Unix seconds) out of the set.
    fn take_due(&self, now: i64) -> Vec<SocketRef> {
        let mut due = self.lock();
        // Everything at or before `now`; `split_off` keeps the rest.
        let later = due.split_off(&(now.saturating_add(1), Sid::ZERO));
        std::mem::replace(&mut *due, later).into_values().collect()
    }
}

async fn sweep(expiries: Weak<Expiries>) {
    let mut tick = tokio::time::interval(SWEEP_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(expiries) = expiries.upgrade() else {
            return;
        };
        for s in expiries.take_due(chrono::Utc::now().timestamp()) {
            metrics::counter!("chat_gateway_token_expiry_disconnects_total").increment(1);
            tracing::debug!(socket = %s.id, "token expired, disconnecting");
            // `{ status: "error", event: "connect", code: "UNAUTHORIZED", message: "token
            // expired" }`; the client reconnects with a fresh token.
            let error = ChatError::Unauthorized(TokenError::Expired.to_string());
            let _ = s.emit("exception", &error.exception("connect"));
            let _ = s.disconnect();
        }
    }
}
