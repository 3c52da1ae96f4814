//! Password hashing (argon2id) on a few threads of its own, behind a bounded queue.
//!
//! Each hash needs 19 MiB of memory by design. On tokio's blocking pool (up to 512 threads)
//! a burst of registrations or logins ran hundreds of hashes at once, and the allocator kept
//! that memory afterwards: 400 registrations left the gateway at 1.6 GB of RSS. A fixed pool
//! of one thread per core bounds both the memory (one hash per thread) and the CPU a login
//! flood can take. The queue in front of it is bounded too: past [`QUEUE`] waiting jobs a
//! request is refused at once (503 with `Retry-After`) instead of waiting behind a flood, and
//! a job whose client has gone meanwhile is skipped.

use std::sync::mpsc;
use std::sync::{Arc, Mutex};

type Job = Box<dyn FnOnce() + Send>;

/// Jobs waiting for a hashing thread, at most. A hash takes about 20 ms of one core, so a
/// full queue is about a second of work on two cores.
pub const QUEUE: usize = 64;

/// The queue is full: try again shortly.
#[derive(Debug)]
pub struct Busy;

/// The hashing threads and their queue. One per gateway (not a process global), so two
/// gateways in one process, as in tests, do not share a queue.
pub struct Hasher {
    tx: mpsc::SyncSender<Job>,
}

impl Hasher {
    /// Starts one thread per core (at most 4). The threads end when the `Hasher` is dropped.
    pub fn new() -> Self {
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get().min(4));
        let (tx, rx) = mpsc::sync_channel::<Job>(QUEUE);
        let rx = Arc::new(Mutex::new(rx));
        for i in 0..threads {
            let rx = rx.clone();
            std::thread::Builder::new()
                .name(format!("password-hash-{i}"))
                .spawn(move || {
                    loop {
                        // The lock is held only while taking a job, not while running it.
                        let job = rx.lock().unwrap_or_else(|e| e.into_inner()).recv();
                        match job {
                            Ok(job) => job(),
                            Err(_) => return,
                        }
                    }
                })
                .expect("spawn a password hashing thread");
        }
        Hasher { tx }
    }

    /// Runs `f` on the hashing threads, or refuses with [`Busy`] when the queue is full. `f`
    /// is skipped when the caller stopped waiting (its client disconnected) before its turn.
    pub async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, Busy> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let job: Job = Box::new(move || {
            if tx.is_closed() {
                metrics::counter!("chat_gateway_password_hashes_skipped_total").increment(1);
                return;
            }
            let _ = tx.send(f());
        });
        if self.tx.try_send(job).is_err() {
            metrics::counter!("chat_gateway_password_hash_queue_full_total").increment(1);
            return Err(Busy);
        }
        rx.await.map_err(|_| Busy)
    }
}

impl Default for Hasher {
    fn default() -> Self {
        Self::new()
    }
}
