//! The admin HTTP server, on its own port: `/metrics` (Prometheus text, with the standard
//! `process_*` metrics), `/healthz` (the process is up) and `/readyz` (Redis and MongoDB
//! answer).

use axum::{Router, extract::State, http::StatusCode, response::IntoResponse, routing::get};
use futures::future::BoxFuture;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

/// Buckets of every `*_seconds` histogram: 0.5 ms to 10 s.
const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
/// Buckets of every `*_size` histogram (batch sizes).
const SIZE_BUCKETS: &[f64] = &[1.0, 2.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0];

/// Returns the process-wide Prometheus recorder, installing it on first use.
///
/// The recorder is global, so several services built in one process (as tests do)
/// share it.
pub fn prometheus() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let handle = PrometheusBuilder::new()
                // Real histograms (not summaries), so that p99s aggregate across pods.
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)
                .and_then(|b| {
                    b.set_buckets_for_metric(Matcher::Suffix("_size".into()), SIZE_BUCKETS)
                })
                .expect("bucket lists are not empty")
                .install_recorder()
                .expect("no other metrics recorder is installed");
            metrics_process::Collector::default().describe();
            let upkeep = handle.clone();
            // Histograms are drained on scrape; upkeep bounds their memory between scrapes.
            std::thread::Builder::new()
                .name("metrics-upkeep".into())
                .spawn(move || {
                    loop {
                        std::thread::sleep(Duration::from_secs(5));
                        upkeep.run_upkeep();
                    }
                })
                .expect("spawn metrics upkeep thread");
            handle
        })
        .clone()
}

/// A readiness check: `Ok` when every dependency answers, else what failed.
pub type ReadyCheck = Arc<dyn Fn() -> BoxFuture<'static, Result<(), String>> + Send + Sync>;

#[derive(Clone)]
struct AdminState {
    metrics: PrometheusHandle,
    ready: ReadyCheck,
}

/// The admin routes.
pub fn router(ready: ReadyCheck) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .with_state(AdminState {
            metrics: prometheus(),
            ready,
        })
}

async fn metrics(State(state): State<AdminState>) -> impl IntoResponse {
    // Process CPU, memory and open file descriptors, read at scrape time.
    metrics_process::Collector::default().collect();
    (
        [("content-type", "text/plain; version=0.0.4; charset=utf-8")],
        state.metrics.render(),
    )
}

async fn readyz(State(state): State<AdminState>) -> impl IntoResponse {
    match tokio::time::timeout(Duration::from_secs(2), (state.ready)()).await {
        Ok(Ok(())) => (StatusCode::OK, "ready".to_owned()),
        Ok(Err(why)) => (StatusCode::SERVICE_UNAVAILABLE, why),
        Err(_) => (
            StatusCode::SERVICE_UNAVAILABLE,
            "readiness check timed out".to_owned(),
        ),
    }
}

/// Binds a listener with an explicit backlog (tokio's `TcpListener::bind` uses 128, which a
/// storm of simultaneous connects overflows).
pub fn listen(
    addr: std::net::SocketAddr,
    backlog: u32,
) -> std::io::Result<tokio::net::TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.set_nodelay(true)?;
    socket.bind(addr)?;
    socket.listen(backlog)
}

/// With `--healthcheck`: probes this machine's admin `port` and exits (0 when healthy),
/// instead of starting the service. Both binaries call it first thing in `main`.
pub fn exit_if_healthcheck(requested: bool, port: u16) {
    if requested {
        std::process::exit(if probe(port) { 0 } else { 1 });
    }
}

/// The container health check: `GET /healthz` on this machine's admin port. `true` on a
/// 200 within two seconds. (The runtime images have no shell and no curl; the binaries
/// probe themselves with `--healthcheck`.)
pub fn probe(port: u16) -> bool {
    use std::io::{Read, Write};
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let timeout = Duration::from_secs(2);
    let Ok(mut stream) = std::net::TcpStream::connect_timeout(&addr, timeout) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(timeout));
    let _ = stream.set_write_timeout(Some(timeout));
    if stream
        .write_all(b"GET /healthz HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut head = [0u8; 12];
    stream.read_exact(&mut head).is_ok()
        && (head.starts_with(b"HTTP/1.0 200") || head.starts_with(b"HTTP/1.1 200"))
}

#[cfg(test)]
mod tests {
    #[tokio::test]
    async fn probe_answers_for_a_live_admin_server_only() {
        let listener = super::listen(([127, 0, 0, 1], 0).into(), 16).unwrap();
        let port = listener.local_addr().unwrap().port();
        let router = super::router(std::sync::Arc::new(|| Box::pin(async { Ok(()) })));
        tokio::spawn(async move { axum::serve(listener, router).await });
        assert!(
            tokio::task::spawn_blocking(move || super::probe(port))
                .await
                .unwrap()
        );
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let dead = closed.local_addr().unwrap().port();
        drop(closed);
        assert!(
            !tokio::task::spawn_blocking(move || super::probe(dead))
                .await
                .unwrap()
        );
    }
}
