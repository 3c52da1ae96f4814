//! The signal that a session is closing.
//!
//! It replaces a `tokio_util` `CancellationToken`, which allocates a node of a token tree
//! (224 bytes) for every socket, when no socket ever has a child token: a flag and a
//! `Notify`, inside the socket.
use std::{
    future::Future,
    sync::atomic::{AtomicBool, Ordering},
};

use tokio::sync::Notify;

#[derive(Debug, Default)]
pub(crate) struct Closing {
    closed: AtomicBool,
    notify: Notify,
}

impl Closing {
    /// Marks the session closing and wakes everything waiting on it. Idempotent.
    pub(crate) fn cancel(&self) {
        if !self.closed.swap(true, Ordering::AcqRel) {
            self.notify.notify_waiters();
        }
    }

    pub(crate) fn is_cancelled(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Resolves once the session is closing.
    pub(crate) async fn cancelled(&self) {
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            // Registered before the check, so a close between the two is not missed.
            notified.as_mut().enable();
            if self.is_cancelled() {
                return;
            }
            notified.await;
        }
    }

    /// Runs `fut` until it completes (`Some`) or the session closes (`None`). The future is
    /// polled first, so one that is ready wins over a close that came meanwhile.
    pub(crate) async fn or_closed<F: Future>(&self, fut: F) -> Option<F::Output> {
        tokio::select! {
            biased;
            out = fut => Some(out),
            () = self.cancelled() => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[tokio::test]
    async fn waiters_before_and_after_the_close_are_released() {
        let closing = Arc::new(Closing::default());
        let waiter = {
            let closing = closing.clone();
            tokio::spawn(async move { closing.cancelled().await })
        };
        tokio::task::yield_now().await;
        closing.cancel();
        closing.cancel();
        waiter.await.unwrap();
        closing.cancelled().await;
        assert_eq!(closing.or_closed(std::future::pending::<()>()).await, None);
        assert_eq!(closing.or_closed(async { 1 }).await, Some(1));
    }
}
