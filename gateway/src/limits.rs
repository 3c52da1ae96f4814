//! Per-user rate limits, shared by every socket of a user and by the REST API on this
//! gateway, so that opening more sockets or switching to REST gives no more than one budget.
//!
//! Token buckets in process: a check costs a hash lookup under one of several locks, not a
//! Redis round trip on every send. A user whose sockets are spread over several gateways
//! gets one budget per gateway; behind the sticky load balancer that is the exception.

use shared::ObjectId;
use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::Mutex;
use std::time::Instant;

/// Locks the buckets are spread over, so that users on different cores rarely meet.
const SHARDS: usize = 16;
/// Buckets per shard past which the full ones (idle users) are dropped.
const SHARD_CAP: usize = 4096;

/// A sustained rate with a burst above it.
#[derive(Debug, Clone, Copy)]
pub struct Rate {
    pub per_second: f64,
    pub burst: f64,
}

struct Bucket {
    tokens: f64,
    last: Instant,
}

/// Token buckets by user.
pub struct UserLimiter {
    rate: Rate,
    hasher: RandomState,
    shards: Vec<Mutex<HashMap<ObjectId, Bucket>>>,
}

impl UserLimiter {
    pub fn new(rate: Rate) -> Self {
        Self {
            rate: Rate {
                per_second: rate.per_second.max(f64::MIN_POSITIVE),
                burst: rate.burst.max(1.0),
            },
            hasher: RandomState::new(),
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
        }
    }

    /// Takes one token of `user`'s bucket; `false` when it is empty.
    pub fn try_take(&self, user: &ObjectId) -> bool {
        let shard = self.hasher.hash_one(user) as usize % SHARDS;
        let mut buckets = self.shards[shard].lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        if buckets.len() >= SHARD_CAP && !buckets.contains_key(user) {
            // A full bucket is the same as none: forgetting it changes nothing.
            let Rate { per_second, burst } = self.rate;
            buckets.retain(|_, b| {
                b.tokens + now.duration_since(b.last).as_secs_f64() * per_second < burst
            });
        }
        let bucket = buckets.entry(*user).or_insert(Bucket {
            tokens: self.rate.burst,
            last: now,
        });
        let refill = now.duration_since(bucket.last).as_secs_f64() * self.rate.per_second;
        bucket.tokens = (bucket.tokens + refill).min(self.rate.burst);
        bucket.last = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// The limiters of one gateway.
pub struct Limits {
    /// `send_message`, `typing`, unknown events and `POST …/messages`.
    pub events: UserLimiter,
    /// `join_room` and `leave_room`.
    pub joins: UserLimiter,
    /// Refused events in a row after which a socket is disconnected.
    pub disconnect_after: u32,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_budget_per_user() {
        let limiter = UserLimiter::new(Rate {
            per_second: 0.001,
            burst: 3.0,
        });
        let (ann, bob) = (ObjectId::new(), ObjectId::new());
        assert!((0..3).all(|_| limiter.try_take(&ann)));
        assert!(!limiter.try_take(&ann));
        assert!(
            limiter.try_take(&bob),
            "another user has a budget of their own"
        );
    }

    #[test]
    fn idle_buckets_are_forgotten_when_a_shard_fills() {
        let limiter = UserLimiter::new(Rate {
            per_second: 1e9,
            burst: 1.0,
        });
        for _ in 0..SHARDS * SHARD_CAP * 2 {
            limiter.try_take(&ObjectId::new());
        }
        let held: usize = limiter.shards.iter().map(|s| s.lock().unwrap().len()).sum();
        assert!(held <= SHARDS * SHARD_CAP, "{held}");
    }
}
