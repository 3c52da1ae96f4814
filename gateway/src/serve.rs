//! Serving the API's connections: hyper's HTTP/1 with the bounds a public server needs,
//! which `axum::serve` does not set. (HTTP/2 is not served: browsers reach the gateway over
//! a load balancer, and Socket.IO's WebSocket upgrade is HTTP/1.)
//!
//! * A request's headers must arrive within `HTTP_HEADER_TIMEOUT_SECS` of the connection
//!   starting to wait for them (hyper starts the clock then, so an idle keep-alive
//!   connection closes after that long too: keep it above the load balancer's idle timeout),
//!   and its whole body within `HTTP_BODY_TIMEOUT_SECS` of the handler asking for it. A
//!   client trickling bytes ("slowloris") holds a connection that long at most.
//! * Without trusted proxies, one peer address holds at most `MAX_CONNECTIONS_PER_ADDRESS`
//!   TCP connections; a connection over it is closed at once. (Behind proxies every peer is
//!   a proxy: the client's own address is counted per Socket.IO session instead,
//!   `socket::per_address`.)
//! * WebSocket upgrades (Socket.IO) are served on the same connections; the upgraded
//!   connection is Engine.IO's, with its own heartbeat.
//! * On shutdown the listener stops accepting and every connection is asked to close once
//!   its request in flight is answered.

use crate::address::counted;
use axum::Router;
use axum::body::Body;
use axum::extract::ConnectInfo;
use bytes::Bytes;
use http_body::{Frame, SizeHint};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use std::collections::HashMap;
use std::future::Future as _;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

/// How long a request may take to arrive, and how many connections one peer may hold.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// From waiting for a request to the end of its headers.
    pub header: Duration,
    /// To receive a request's whole body.
    pub body: Duration,
    /// TCP connections per peer address (0: any number). Only when no proxy is trusted.
    pub per_peer: usize,
}

/// Serves `router` on `listener` until `shutdown`, then until its connections have closed.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: Limits,
    shutdown: CancellationToken,
) {
    let open = Arc::new(Mutex::new(HashMap::<IpAddr, usize>::new()));
    let connections = tokio_util::task::TaskTracker::new();
    loop {
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of file descriptors, say: the next accept may work.
                    tracing::warn!(%error, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Some(held) = PeerSlot::take(&open, counted(peer.ip()), limits.per_peer) else {
            metrics::counter!("chat_gateway_address_limited_total").increment(1);
            drop(stream);
            continue;
        };
        let router = router.clone();
        let body_timeout = limits.body;
        let service = tower::service_fn(move |mut request: hyper::Request<Incoming>| {
            request.extensions_mut().insert(ConnectInfo(peer));
            let request = request.map(|body| Body::new(Deadline::new(body, body_timeout)));
            router.clone().oneshot(request)
        });
        let shutdown = shutdown.clone();
        let header_timeout = limits.header;
        connections.spawn(async move {
            let _held = held;
            let connection = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(header_timeout)
                .serve_connection(TokioIo::new(stream), TowerToHyperService::new(service))
                .with_upgrades();
            tokio::pin!(connection);
            tokio::select! {
                result = connection.as_mut() => {
                    if let Err(error) = result {
                        tracing::debug!(%error, %peer, "connection ended with an error");
                    }
                    return;
                }
                _ = shutdown.cancelled() => {}
            }
            connection.as_mut().graceful_shutdown();
            let _ = connection.await;
        });
    }
    drop(listener);
    connections.close();
    connections.wait().await;
}

/// A peer's place among its open TCP connections, given back when the connection ends.
struct PeerSlot {
    open: Arc<Mutex<HashMap<IpAddr, usize>>>,
    address: IpAddr,
}

impl PeerSlot {
    /// `None` when `address` holds `max` connections already; `Some` of no slot when there is
    /// no bound.
    fn take(
        open: &Arc<Mutex<HashMap<IpAddr, usize>>>,
        address: IpAddr,
        max: usize,
    ) -> Option<Option<PeerSlot>> {
        if max == 0 {
            return Some(None);
        }
        let mut counts = open.lock().unwrap_or_else(|e| e.into_inner());
        let n = counts.entry(address).or_insert(0);
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(Some(PeerSlot {
            open: open.clone(),
            address,
        }))
    }
}

impl Drop for PeerSlot {
    fn drop(&mut self) {
        let mut counts = self.open.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = counts.get_mut(&self.address) {
            *n -= 1;
            if *n == 0 {
                counts.remove(&self.address);
            }
        }
    }
}

/// A request body that must arrive in full within a time from its first poll: unlike a
/// timeout between frames, a client sending a byte now and then cannot stretch it.
struct Deadline {
    inner: Incoming,
    limit: Duration,
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
}

/// What a body that missed its deadline fails with (the JSON extractor answers 408).
#[derive(Debug, thiserror::Error)]
#[error("the request body did not arrive within HTTP_BODY_TIMEOUT_SECS")]
pub struct BodyTooSlow;

impl Deadline {
    fn new(inner: Incoming, limit: Duration) -> Self {
        Self {
            inner,
            limit,
            deadline: None,
        }
    }
}

impl http_body::Body for Deadline {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let limit = self.limit;
        let deadline = self
            .deadline
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        if deadline.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Some(Err(Box::new(BodyTooSlow))));
        }
        Pin::new(&mut self.inner)
            .poll_frame(cx)
            .map_err(|e| Box::new(e) as Self::Error)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
