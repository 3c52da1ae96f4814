//! Graceful shutdown: once draining, new events and requests are refused with
//! `UNAVAILABLE` (never half-done), and the gateway waits for those already in flight.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use tokio::sync::Notify;

#[derive(Default)]
pub struct Drain {
    draining: AtomicBool,
    in_flight: AtomicUsize,
    idle: Notify,
}

/// Held while an event or request is handled.
pub struct InFlight(Arc<Drain>);

impl Drop for InFlight {
    fn drop(&mut self) {
        if self.0.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

impl Drain {
    /// Admits one more piece of work, unless draining.
    pub fn enter(self: &Arc<Self>) -> Option<InFlight> {
        // Counted first, so that `wait_idle` cannot miss work admitted concurrently.
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        let guard = InFlight(self.clone());
        (!self.draining.load(Ordering::Acquire)).then_some(guard)
    }

    pub fn start(&self) {
        self.draining.store(true, Ordering::Release);
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    /// Resolves when no admitted work is left.
    pub async fn wait_idle(&self) {
        loop {
            let idle = self.idle.notified();
            if self.in_flight.load(Ordering::Acquire) == 0 {
                return;
            }
            idle.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn refuses_new_work_and_waits_for_the_rest() {
        let drain = Arc::new(Drain::default());
        let first = drain.enter().expect("admitted");
        drain.start();
        assert!(drain.enter().is_none());
        let waiting = tokio::spawn({
            let drain = drain.clone();
            async move { drain.wait_idle().await }
        });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished());
        drop(first);
        waiting.await.unwrap();
    }
}
