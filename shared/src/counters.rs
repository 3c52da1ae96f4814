//! Fixed-window counters (login failure limits): a port of their own, apart from the room
//! events of the backplane, with a Redis implementation shared by every gateway and an
//! in-process one for the embedded mode.

use crate::backplane::{BackplaneError, Keys};
use async_trait::async_trait;
use fred::prelude::*;
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Counters that count events in a window starting with the first one.
#[async_trait]
pub trait Counters: Send + Sync + 'static {
    /// The count of a counter and the time until its window ends.
    async fn get(&self, key: &str) -> Result<(u64, Duration), BackplaneError>;

    /// Adds one (the window starts with the first count); returns the new count, so that
    /// counting and comparing is one atomic step.
    async fn increment(&self, key: &str, window: Duration) -> Result<u64, BackplaneError>;

    /// Takes one back (an attempt that turned out not to count), if the window still runs.
    async fn decrement(&self, key: &str) -> Result<(), BackplaneError>;

    /// Resets a counter.
    async fn reset(&self, key: &str) -> Result<(), BackplaneError>;
}

/// Counters in Redis, one key each (`<prefix>:count:<key>`), expiring with their window.
pub struct RedisCounters {
    keys: Keys,
    client: Client,
}

impl RedisCounters {
    pub fn new(client: Client, prefix: &str) -> Self {
        Self {
            keys: Keys::new(prefix, 1),
            client,
        }
    }
}

#[async_trait]
impl Counters for RedisCounters {
    async fn get(&self, key: &str) -> Result<(u64, Duration), BackplaneError> {
        let key = self.keys.counter(key);
        let pipeline = self.client.pipeline();
        let _: () = pipeline.get(&key).await?;
        let _: () = pipeline.pttl(&key).await?;
        let (count, ttl): (Option<u64>, i64) = pipeline.all().await?;
        Ok((
            count.unwrap_or(0),
            Duration::from_millis(u64::try_from(ttl).unwrap_or(0)),
        ))
    }

    async fn increment(&self, key: &str, window: Duration) -> Result<u64, BackplaneError> {
        Ok(crate::backplane::count_script(&self.client, &self.keys.counter(key), window).await?)
    }

    async fn decrement(&self, key: &str) -> Result<(), BackplaneError> {
        crate::backplane::uncount_script(&self.client, &self.keys.counter(key)).await?;
        Ok(())
    }

    async fn reset(&self, key: &str) -> Result<(), BackplaneError> {
        let _: i64 = self.client.del(self.keys.counter(key)).await?;
        Ok(())
    }
}

/// Counters in this process's memory (the embedded mode).
#[derive(Default)]
pub struct MemoryCounters {
    counters: Mutex<Windows>,
}

/// The counters, and how many there were after expired ones were last swept out: a sweep
/// runs when their number has doubled since, so that its cost is spread over the counts
/// that grew the map (one sweep per count would go over every counter each time).
#[derive(Default)]
struct Windows {
    counts: HashMap<String, (u64, Instant)>,
    after_sweep: usize,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[async_trait]
impl Counters for MemoryCounters {
    async fn get(&self, key: &str) -> Result<(u64, Duration), BackplaneError> {
        let counters = lock(&self.counters);
        let now = Instant::now();
        Ok(match counters.counts.get(key) {
            Some((n, ends)) if *ends > now => (*n, *ends - now),
            _ => (0, Duration::ZERO),
        })
    }

    async fn increment(&self, key: &str, window: Duration) -> Result<u64, BackplaneError> {
        let mut counters = lock(&self.counters);
        let now = Instant::now();
        if counters.counts.len() >= (2 * counters.after_sweep).max(1024) {
            counters.counts.retain(|_, (_, ends)| *ends > now);
            counters.after_sweep = counters.counts.len();
        }
        let entry = match counters.counts.entry(key.to_owned()) {
            std::collections::hash_map::Entry::Occupied(entry) => {
                let entry = entry.into_mut();
                // An expired window starts again.
                if entry.1 <= now {
                    *entry = (0, now + window);
                }
                entry
            }
            std::collections::hash_map::Entry::Vacant(entry) => entry.insert((0, now + window)),
        };
        entry.0 += 1;
        Ok(entry.0)
    }

    async fn decrement(&self, key: &str) -> Result<(), BackplaneError> {
        let mut counters = lock(&self.counters);
        if let Some((n, ends)) = counters.counts.get_mut(key)
            && *ends > Instant::now()
        {
            *n = n.saturating_sub(1);
        }
        Ok(())
    }

    async fn reset(&self, key: &str) -> Result<(), BackplaneError> {
        lock(&self.counters).counts.remove(key);
        Ok(())
    }
}

const _: fn() = || {
    fn counters<T: Counters>() {}
    counters::<RedisCounters>();
    counters::<MemoryCounters>();
};

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn memory_counters_count_in_a_window() {
        let c = MemoryCounters::default();
        assert_eq!(c.increment("c", Duration::from_secs(60)).await.unwrap(), 1);
        assert_eq!(c.increment("c", Duration::from_secs(60)).await.unwrap(), 2);
        assert_eq!(c.get("c").await.unwrap().0, 2);
        c.decrement("c").await.unwrap();
        assert_eq!(c.get("c").await.unwrap().0, 1);
        c.reset("c").await.unwrap();
        assert_eq!(c.get("c").await.unwrap().0, 0);
        // An expired window starts again at one.
        assert_eq!(c.increment("d", Duration::ZERO).await.unwrap(), 1);
        assert_eq!(c.increment("d", Duration::from_secs(60)).await.unwrap(), 1);
        // Expired counters are swept out once the map has doubled.
        for i in 0..2048 {
            c.increment(&format!("x{i}"), Duration::ZERO).await.unwrap();
        }
        assert!(lock(&c.counters).counts.len() <= 1100);
    }
}
