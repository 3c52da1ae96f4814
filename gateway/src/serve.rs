//! Serving the API's connections: hyper's HTTP/1 with the bounds a public server needs,
//! which `axum::serve` does not set. (HTTP/2 is not served: browsers reach the gateway over
//! a load balancer, and Socket.IO's WebSocket upgrade is HTTP/1.)
//!
//! * A request's headers must arrive within `HTTP_HEADER_TIMEOUT_SECS` of the connection
//!   starting to wait for them (hyper starts the clock then, so an idle keep-alive
//!   connection closes after that long too: keep it above the load balancer's idle timeout),
//!   and its whole body within `HTTP_BODY_TIMEOUT_SECS` of the handler asking for it. A
//!   client trickling bytes ("slowloris") holds a connection that long at most.
//! * A write that waits `HTTP_BODY_TIMEOUT_SECS` for the client to read (a large page asked
//!   for and never read) closes the connection: its answer is not held in memory longer.
//! * Without trusted proxies, one peer address holds at most `MAX_CONNECTIONS_PER_ADDRESS`
//!   TCP connections, upgraded ones included; a connection over it is closed at once.
//!   (Behind proxies every peer is a proxy: the client's own address is counted per
//!   Socket.IO session instead, `socket::per_address`.)
//! * WebSocket upgrades (Socket.IO) are served on the same connections; the upgraded
//!   connection is Engine.IO's, with its own heartbeat, and keeps the stream below (with
//!   its peer's slot and its write deadline).
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
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

/// How long a request may take to arrive, and how many connections one peer may hold.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// From waiting for a request to the end of its headers.
    pub header: Duration,
    /// To receive a request's whole body, and the longest a write waits for the client.
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
        let stream = Held {
            stream,
            _slot: held,
            stall: limits.body,
            stalled: None,
        };
        connections.spawn(async move {
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

/// A connection's stream. It holds its peer's slot for as long as it is open (hyper hands
/// the stream on through a WebSocket upgrade, so an upgraded connection keeps it too), and
/// fails a write that has waited `stall` without the client reading anything.
struct Held<S = TcpStream> {
    stream: S,
    _slot: Option<PeerSlot>,
    stall: Duration,
    /// Armed while writes wait; disarmed by any write that goes through.
    stalled: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<S> Held<S> {
    /// After the stream answered `Pending` to a write: `Pending` until the deadline, then
    /// the error that ends the connection.
    fn stalled<T>(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<T>> {
        let stall = self.stall;
        let deadline = self
            .stalled
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(stall)));
        match deadline.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "the client read nothing for HTTP_BODY_TIMEOUT_SECS",
            ))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn written<T>(
        &mut self,
        result: Poll<std::io::Result<T>>,
        cx: &mut Context<'_>,
    ) -> Poll<std::io::Result<T>> {
        match result {
            Poll::Ready(result) => {
                self.stalled = None;
                Poll::Ready(result)
            }
            Poll::Pending => self.stalled(cx),
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Held<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Held<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let result = Pin::new(&mut this.stream).poll_write(cx, buf);
        this.written(result, cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let result = Pin::new(&mut this.stream).poll_write_vectored(cx, bufs);
        this.written(result, cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let result = Pin::new(&mut this.stream).poll_flush(cx);
        this.written(result, cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A client that reads nothing: the write fails after `stall`; one that reads keeps it.
    #[tokio::test(start_paused = true)]
    async fn a_write_the_client_does_not_read_fails_after_the_stall_time() {
        let (server, mut client) = tokio::io::duplex(64);
        let mut held = Held {
            stream: server,
            _slot: None,
            stall: Duration::from_secs(30),
            stalled: None,
        };
        let started = tokio::time::Instant::now();
        let error = held.write_all(&[0; 1024]).await.unwrap_err();
        assert_eq!(error.kind(), std::io::ErrorKind::TimedOut);
        assert_eq!(started.elapsed().as_secs(), 30);

        let (server, mut client2) = tokio::io::duplex(64);
        let mut held = Held {
            stream: server,
            _slot: None,
            stall: Duration::from_secs(30),
            stalled: None,
        };
        // A reader taking 64 bytes every 10 s: slow, never stalled for 30 s.
        let reader = tokio::spawn(async move {
            let mut total = 0;
            let mut buf = [0; 64];
            while total < 1024 {
                tokio::time::sleep(Duration::from_secs(10)).await;
                total += client2.read(&mut buf).await.unwrap();
            }
        });
        held.write_all(&[0; 1024]).await.unwrap();
        reader.await.unwrap();
        let _ = client.read(&mut [0; 1]).await;
    }
}
