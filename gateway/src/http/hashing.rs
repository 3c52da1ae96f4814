//! Password hashing (argon2id) on a few threads of its own.
//!
//! Each hash needs 19 MiB of memory by design. On tokio's blocking pool (up to 512 threads)
//! a burst of registrations or logins ran hundreds of hashes at once, and the allocator kept
//! that memory afterwards: 400 registrations left the gateway at 1.6 GB of RSS. A fixed pool
//! of one thread per core bounds both the memory (one hash per thread) and the CPU a login
//! flood can take; requests beyond it wait in the queue.

use std::sync::mpsc;
use std::sync::{Arc, LazyLock, Mutex};

type Job = Box<dyn FnOnce() + Send>;

static POOL: LazyLock<mpsc::Sender<Job>> = LazyLock::new(|| {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get().min(4));
    let (tx, rx) = mpsc::channel::<Job>();
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
    tx
});

/// Runs `f` on the hashing pool; `None` if the pool is gone (never, in practice).
pub async fn run<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Option<T> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    POOL.send(Box::new(move || {
        let _ = tx.send(f());
    }))
    .ok()?;
    rx.await.ok()
}
