//! The ws transport module is responsible for handling websocket connections
//! The only public function is [`new_req`] which is used to upgrade a http request to a websocket connection
//!
//! Other functions are used internally to handle the websocket connection through tasks and channels
//! and to handle upgrade from polling to ws

use std::{
    future::{Future, poll_fn},
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use futures_util::{FutureExt as _, SinkExt, StreamExt, future::Either};
use http::{HeaderValue, Request, Response, StatusCode, request::Parts};
use smallvec::smallvec;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::{Instant, Sleep};
use tokio_tungstenite::{
    WebSocketStream,
    tungstenite::{
        self, Message,
        handshake::derive_accept_key,
        protocol::{Role, WebSocketConfig},
    },
};

use engineioxide_core::{Packet, PacketBuf, ProtocolVersion, Sid, Str, TransportType};

use crate::{
    DisconnectReason, Socket, body::ResponseBody, config::EngineIoConfig, engine::EngineIo,
    errors::Error, handler::EngineIoHandler, queue::Receiver, transport::make_open_packet,
};

/// Create a response for websocket upgrade
fn ws_response<B>(ws_key: &HeaderValue) -> Response<ResponseBody<B>> {
    let derived = derive_accept_key(ws_key.as_bytes());
    let sec = derived.parse::<HeaderValue>().unwrap();
    Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(http::header::UPGRADE, HeaderValue::from_static("websocket"))
        .header(
            http::header::CONNECTION,
            HeaderValue::from_static("Upgrade"),
        )
        .header(http::header::SEC_WEBSOCKET_ACCEPT, sec)
        .body(ResponseBody::empty_response())
        .unwrap() // we are only using constants
}

/// Upgrade a websocket request to create a websocket connection.
///
/// If a sid is provided in the query it means that is is upgraded from an existing HTTP polling request.
/// In this case the http polling request is closed and the SID is kept for the websocket
pub fn new_req<R: Send + 'static, B, H: EngineIoHandler>(
    engine: Arc<EngineIo<H>>,
    protocol: ProtocolVersion,
    sid: Option<Sid>,
    req: Request<R>,
) -> Result<Response<ResponseBody<B>>, Error> {
    let (mut parts, _body) = req.into_parts();

    let ws_key = parts
        .headers
        .get("Sec-WebSocket-Key")
        .ok_or(Error::InvalidWebSocketKey)?
        .clone();
    // Taken out of the parts, which the socket keeps for its whole life (and an emptied
    // extension map is not kept either).
    let on_upgrade = parts.extensions.remove::<hyper::upgrade::OnUpgrade>();
    if parts.extensions.is_empty() {
        parts.extensions = http::Extensions::new();
    }

    // Boxed, see `on_init`.
    let opening = Box::pin(async move {
        let conn = match on_upgrade {
            Some(on_upgrade) => on_upgrade.await,
            None => {
                #[cfg(feature = "tracing")]
                tracing::debug!("ws upgrade error: no upgrade for this request");
                return None;
            }
        };
        let conn = match conn {
            Ok(conn) => hyper_util::rt::TokioIo::new(conn),
            Err(_e) => {
                #[cfg(feature = "tracing")]
                tracing::debug!("ws upgrade error: {}", _e);
                return None;
            }
        };
        match open(engine.clone(), conn, protocol, sid, parts).await {
            Ok(conn) => conn,
            Err(Error::MultipleWebsocketRequests) => None,
            Err(_e) => {
                #[cfg(feature = "tracing")]
                tracing::debug!(?sid, "ws closed with error: {_e}");
                if let Some(sid) = sid {
                    engine.close_session(sid, DisconnectReason::TransportError);
                }
                None
            }
        }
    });
    tokio::spawn(opening.then(serve_opened));

    Ok(ws_response(&ws_key))
}

/// Handle a websocket connection upgrade
///
/// Sends an open packet if it is not an upgrade from a polling request
///
/// Read packets from the websocket and handle them, it will block until the connection is closed
///
/// The handshake runs in a boxed future of its own: an `async` function keeps room for
/// its arguments and for the largest state it passes through, for as long as it runs, so
/// the handshake inline would size the connection's task for the socket's whole life.
pub fn on_init<H: EngineIoHandler, S>(
    engine: Arc<EngineIo<H>>,
    conn: S,
    protocol: ProtocolVersion,
    sid: Option<Sid>,
    req_data: Parts,
) -> impl Future<Output = Result<(), Error>> + Send + 'static
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    Box::pin(open(engine, conn, protocol, sid, req_data)).then(|opened| match opened {
        Ok(conn) => Either::Left(serve_opened(conn).map(Ok)),
        Err(e) => Either::Right(std::future::ready(Err(e))),
    })
}

/// [`serve`] for a connection the handshake opened. Combinators, not an `async` block: a
/// block would keep room both for the connection it received and for the one it moved into
/// `serve` (futures do not reuse a moved value's room), tripling the task's size.
fn serve_opened<H: EngineIoHandler, S>(
    conn: Option<Connection<H, S>>,
) -> Either<impl Future<Output = ()>, std::future::Ready<()>>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    match conn {
        Some(conn) => Either::Left(serve(conn)),
        None => Either::Right(std::future::ready(())),
    }
}

/// The handshake: a new session's open packet, or the upgrade of a polling session. `None`
/// if the session closes meanwhile.
#[cfg_attr(
    feature = "tracing",
    tracing::instrument(level = "trace", name = "init_websocket", skip(engine, conn, req_data))
)]
async fn open<H: EngineIoHandler, S>(
    engine: Arc<EngineIo<H>>,
    conn: S,
    protocol: ProtocolVersion,
    sid: Option<Sid>,
    req_data: Parts,
) -> Result<Option<Connection<H, S>>, Error>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let ws_config = WebSocketConfig::default()
        .read_buffer_size(engine.config.ws_read_buffer_size)
        .max_message_size(Some(engine.config.ws_max_message_size))
        .max_frame_size(Some(engine.config.ws_max_frame_size));

    let ws_init = move || WebSocketStream::from_raw_socket(conn, Role::Server, Some(ws_config));
    let (socket, ws) = if let Some(sid) = sid {
        match engine.get_socket(sid) {
            None => return Err(Error::UnknownSessionID(sid)),
            Some(socket) if socket.is_ws() => return Err(Error::MultipleWebsocketRequests),
            Some(socket) => {
                let mut ws = ws_init().await;

                let upgrade_fut = upgrade_handshake::<H, S>(&socket, &mut ws);
                let upgrade_fut = tokio::time::timeout(engine.config.upgrade_timeout, upgrade_fut);
                match socket.cancellation_token.or_closed(upgrade_fut).await {
                    Some(Ok(res)) => res?,
                    Some(Err(_)) => {
                        #[cfg(feature = "tracing")]
                        tracing::debug!(?sid, "ws upgrade timed out, closing session");
                        engine.close_session(socket.id, DisconnectReason::TransportError);
                        return Err(Error::Upgrade);
                    }
                    None => {
                        #[cfg(feature = "tracing")]
                        tracing::debug!(?sid, "socket is being closed");
                        return Err(Error::Upgrade);
                    }
                }
                (socket, ws)
            }
        }
    } else {
        let socket = engine.create_session(protocol, TransportType::Websocket, req_data, false);

        #[cfg(feature = "tracing")]
        tracing::debug!("new websocket connection");

        let mut ws = ws_init().await;
        init_handshake(socket.id, &mut ws, &engine.config).await?;
        (socket, ws)
    };

    let rx = socket.internal_tx.receiver();

    // A socket opened over WebSocket keeps its v4 heartbeat in its connection's task. One
    // upgraded from polling keeps the heartbeat task it started with, and so does the v3
    // protocol.
    let beat = if sid.is_none() && socket.protocol == ProtocolVersion::V4 {
        Some(Heartbeat::new(&engine.config))
    } else {
        if sid.is_none() {
            socket
                .clone()
                .spawn_heartbeat(engine.config.ping_interval, engine.config.ping_timeout);
        }
        None
    };
    Ok(Some(Connection {
        engine,
        socket,
        ws,
        rx,
        unflushed: false,
        beat,
    }))
}

/// Runs the connection until it ends, then closes the session.
///
/// The task holds the socket's `internal_rx` lock from the start (a polling request that
/// was in progress during the upgrade may still hold it: the connection waits for it) to
/// the end, once the WebSocket has written what was queued and is closed: the session's
/// close waits for the lock before it closes the queue and tells the handler, so that
/// `Socket::closed` and `on_disconnect` come after the last write, and a second upgrade
/// of the same session never reads the queue.
///
/// A function returning a block rather than an `async fn`: an `async fn` moves its
/// argument into a local of its own and keeps room for both.
fn serve<H: EngineIoHandler, S>(mut conn: Connection<H, S>) -> impl Future<Output = ()>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    async move {
        let socket = conn.socket.clone();
        let lock = socket.internal_rx.lock();
        let Some(mut internal) = socket.cancellation_token.or_closed(lock).await else {
            #[cfg(feature = "tracing")]
            tracing::debug!(sid = %socket.id, "session closed before starting the ws writer");
            return;
        };
        // A packet a polling request peeked and could not send comes first.
        if let Some(peeked) = internal.peeked_packet.take() {
            conn.rx.push_front(*peeked);
        }

        let end = conn.run().await;
        let engine = &conn.engine;
        match end {
            Err(Error::HeartbeatTimeout) => {
                #[cfg(feature = "tracing")]
                tracing::debug!(sid = %socket.id, "heartbeat timeout");
                // As the heartbeat task does: the close packet goes first.
                socket.close(DisconnectReason::HeartbeatTimeout);
            }
            Err(ref e) => {
                let reason =
                    Option::<DisconnectReason>::from(e).unwrap_or(DisconnectReason::TransportError);

                #[cfg(feature = "tracing")]
                tracing::debug!("error when handling packet: {:?}", e);
                engine.close_session(socket.id, reason);
            }
            Ok(End::TransportClosed) => {
                #[cfg(feature = "tracing")]
                tracing::debug!(sid = %socket.id, "ws transport was closed");
                engine.close_session(socket.id, DisconnectReason::TransportClose);
            }
            Ok(End::Cancelled) => {
                #[cfg(feature = "tracing")]
                tracing::debug!(sid = %socket.id, "socket is closing");
            }
        }
        // What was queued before the end is still written (the close packet of
        // `Socket::close`), then the WebSocket is closed, within `ping_timeout` for a
        // client that does not read. Not after a failed read or write: the stream is gone.
        if !matches!(end, Err(Error::WsTransport(_))) {
            let timeout = engine.config.ping_timeout;
            // Boxed: only the end of a connection needs this state.
            Box::pin(tokio::time::timeout(timeout, conn.shutdown()))
                .await
                .ok();
        }
        drop(internal);
    }
}

/// How a connection's task ended without an error.
#[derive(Debug, PartialEq)]
enum End {
    /// The client closed the transport (a close packet, a close frame or the end of the stream).
    TransportClosed,
    /// The session was closed from the server's side.
    Cancelled,
}

/// Client messages handled in one poll before the task yields, so that a client that
/// writes without pause cannot hold the worker thread.
const READ_BUDGET: usize = 32;

/// A WebSocket connection, run by one task: it reads the client's packets, writes the
/// packets queued on the socket and keeps the heartbeat, where three tasks (a reader, a
/// writer and a heartbeat) used to run, each with its own allocation. The writer does not
/// wait behind the reader, nor the reader behind the writer: both are polled from the same
/// future, each registering its own waker with the stream.
struct Connection<H: EngineIoHandler, S> {
    engine: Arc<EngineIo<H>>,
    socket: Arc<Socket<H::Data>>,
    ws: WebSocketStream<S>,
    /// The socket's outgoing queue, read only here once the WebSocket runs.
    rx: Receiver<PacketBuf>,
    /// Written since the last flush.
    unflushed: bool,
    beat: Option<Heartbeat>,
}

impl<H: EngineIoHandler, S> Connection<H, S>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    /// Runs until the client or the server ends the connection.
    async fn run(&mut self) -> Result<End, Error> {
        let sleep = tokio::time::sleep(self.engine.config.ping_interval);
        tokio::pin!(sleep);
        let socket = self.socket.clone();
        let cancelled = socket.cancellation_token.cancelled();
        tokio::pin!(cancelled);
        poll_fn(|cx| self.poll(cx, sleep.as_mut(), cancelled.as_mut())).await
    }

    fn poll(
        &mut self,
        cx: &mut Context<'_>,
        sleep: Pin<&mut Sleep>,
        cancelled: Pin<&mut impl Future<Output = ()>>,
    ) -> Poll<Result<End, Error>> {
        if cancelled.poll(cx).is_ready() {
            return Poll::Ready(Ok(End::Cancelled));
        }
        if let Poll::Ready(end) = self.poll_read(cx) {
            return Poll::Ready(end);
        }
        if let Some(beat) = &mut self.beat {
            if let Err(e) = beat.poll(cx, sleep, &self.socket) {
                return Poll::Ready(Err(e));
            }
        }
        if let Err(e) = self.poll_write(cx) {
            return Poll::Ready(Err(e));
        }
        Poll::Pending
    }

    /// Hands the client's packets to the handler until the stream has no more.
    fn poll_read(&mut self, cx: &mut Context<'_>) -> Poll<Result<End, Error>> {
        for _ in 0..READ_BUDGET {
            let msg = match self.ws.poll_next_unpin(cx) {
                Poll::Ready(Some(Ok(msg))) => msg,
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Err(e.into())),
                Poll::Ready(None) => return Poll::Ready(Ok(End::TransportClosed)),
                Poll::Pending => return Poll::Pending,
            };
            match self.on_message(msg) {
                Ok(None) => {}
                Ok(Some(end)) => return Poll::Ready(Ok(end)),
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
        // More may be waiting: come back after the other tasks of this thread.
        cx.waker().wake_by_ref();
        Poll::Pending
    }

    fn on_message(&mut self, msg: Message) -> Result<Option<End>, Error> {
        let socket = &self.socket;
        match msg {
            Message::Text(msg) => match Packet::parse(socket.protocol, ws_bytes_to_str(msg))? {
                Packet::Close => {
                    #[cfg(feature = "tracing")]
                    tracing::debug!("[sid={}] closing session", socket.id);
                    return Ok(Some(End::TransportClosed));
                }
                Packet::Pong | Packet::Ping => match &mut self.beat {
                    Some(beat) => beat.pong = true,
                    // A signal already waiting means that the client is known to be alive.
                    None => socket.on_heartbeat(),
                },
                Packet::Message(msg) => self.engine.handler.on_message(msg, socket.clone()),
                p => return Err(Error::BadPacket(p)),
            },
            Message::Binary(mut data) => {
                if socket.protocol == ProtocolVersion::V3 && !data.is_empty() {
                    // The first byte is the message type, which we don't need.
                    data = data.split_off(1);
                }
                self.engine.handler.on_binary(data, socket.clone());
            }
            Message::Close(_) => {
                #[cfg(feature = "tracing")]
                tracing::debug!("websocket closed, closing session");
                return Ok(Some(End::TransportClosed));
            }
            _ => {
                #[cfg(feature = "tracing")]
                tracing::debug!(sid = ?socket.id, "unexpected ws message");
            }
        }
        Ok(None)
    }

    /// Writes the queued packets while the WebSocket takes them, then flushes. The
    /// WebSocket is asked first, so a batch is only taken from the queue once it can be
    /// written (and nothing is held here meanwhile).
    fn poll_write(&mut self, cx: &mut Context<'_>) -> Result<(), Error> {
        loop {
            match self.ws.poll_ready_unpin(cx) {
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(e)) => return Err(e.into()),
                Poll::Pending => break,
            }
            // `None` once the queue is closed: the session's cancellation follows.
            let Poll::Ready(Some(packets)) = self.rx.poll_recv(cx) else {
                break;
            };
            // A batch is written whole after one `poll_ready`: tungstenite buffers every
            // frame it is given as long as `max_write_buffer_size` is left unlimited (its
            // default, kept here); with a limit it would refuse frames in mid-batch.
            for packet in packets {
                if let Some(msg) = to_message(self.socket.protocol, packet) {
                    self.ws.start_send_unpin(msg)?;
                    self.unflushed = true;
                }
            }
        }
        if self.unflushed {
            match self.ws.poll_flush_unpin(cx) {
                Poll::Ready(Ok(())) => self.unflushed = false,
                Poll::Ready(Err(e)) => return Err(e.into()),
                Poll::Pending => {}
            }
        }
        Ok(())
    }

    /// Writes what is left in the queue, then closes the WebSocket. At most a queue's
    /// capacity of batches: producers may still be queueing until the session's close
    /// closes the queue, after this.
    async fn shutdown(&mut self) {
        let protocol = self.socket.protocol;
        for _ in 0..=self.engine.config.max_buffer_size {
            let Ok(packets) = self.rx.try_recv() else {
                break;
            };
            for msg in packets.into_iter().filter_map(|p| to_message(protocol, p)) {
                if self.ws.feed(msg).await.is_err() {
                    return;
                }
            }
        }
        self.ws.close(None).await.ok();
    }
}

/// The v4 heartbeat of a socket opened over WebSocket: a ping every `ping_interval`, and
/// the connection closes if no pong follows within `ping_timeout`.
struct Heartbeat {
    interval: Duration,
    timeout: Duration,
    /// When the unanswered ping was sent.
    ping_sent: Option<Instant>,
    /// A pong (or ping) was read since the last poll.
    pong: bool,
}

impl Heartbeat {
    fn new(config: &EngineIoConfig) -> Self {
        Self {
            interval: config.ping_interval,
            timeout: config.ping_timeout,
            ping_sent: None,
            pong: false,
        }
    }

    fn poll<D: Default + Send + Sync + 'static>(
        &mut self,
        cx: &mut Context<'_>,
        mut sleep: Pin<&mut Sleep>,
        socket: &Socket<D>,
    ) -> Result<(), Error> {
        // A pong that comes before any ping (some clients send one first) answers nothing.
        if std::mem::take(&mut self.pong) {
            if let Some(sent) = self.ping_sent.take() {
                #[cfg(feature = "tracing")]
                tracing::trace!(sid = ?socket.id, "pong received");
                sleep
                    .as_mut()
                    .reset((sent + self.interval).max(Instant::now()));
            }
        }
        while sleep.as_mut().poll(cx).is_ready() {
            if self.ping_sent.is_some() {
                return Err(Error::HeartbeatTimeout);
            }
            #[cfg(feature = "tracing")]
            tracing::trace!(sid = ?socket.id, "emitting ping");
            socket
                .internal_tx
                .try_send(smallvec![Packet::Ping])
                .map_err(|_| Error::HeartbeatTimeout)?;
            let now = Instant::now();
            self.ping_sent = Some(now);
            sleep.as_mut().reset(now + self.timeout);
        }
        Ok(())
    }
}

/// The WebSocket message of a packet; none for a `Noop` left from an upgrade, which only
/// ends a polling request.
fn to_message(protocol: ProtocolVersion, packet: Packet) -> Option<Message> {
    match packet {
        Packet::Binary(bin) | Packet::BinaryV3(bin) if protocol == ProtocolVersion::V3 => {
            // v3 protocol requires packet type as the first byte.
            // This requires a new buffer. This is OK as it is only for the V3 protocol.
            let mut buff = Vec::with_capacity(bin.len() + 1);
            buff.push(0x04);
            buff.extend(bin);
            Some(Message::Binary(buff.into()))
        }
        Packet::Binary(bin) | Packet::BinaryV3(bin) => Some(Message::Binary(bin)),
        Packet::Noop => None,
        packet => Some(Message::Text(String::from(packet).into())),
    }
}

/// Send a Engine.IO [`OpenPacket`] to initiate a websocket connection
async fn init_handshake<S>(
    sid: Sid,
    ws: &mut WebSocketStream<S>,
    config: &EngineIoConfig,
) -> Result<(), Error>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let packet = Packet::Open(make_open_packet(TransportType::Websocket, sid, config));
    let packet: String = packet.into();
    ws.send(Message::Text(packet.into())).await?;
    Ok(())
}

/// Upgrade a session from a polling request to a websocket request.
///
/// Before upgrading the session the server should send a NOOP packet to any pending polling request.
///
/// ## Handshake :
/// ```text
/// CLIENT                                                 SERVER
///│                                                      │
///│   GET /engine.io/?EIO=4&transport=websocket&sid=...  │
///│ ───────────────────────────────────────────────────► │
///│  ◄─────────────────────────────────────────────────┘ │
///│            HTTP 101 (WebSocket handshake)            │
///│                                                      │
///│            -----  WebSocket frames -----             │
///│  ─────────────────────────────────────────────────►  │
///│                         2probe                       │ (ping packet)
///│  ◄─────────────────────────────────────────────────  │
///│                         3probe                       │ (pong packet)
///│  ─────────────────────────────────────────────────►  │
///│                         5                            │ (upgrade packet)
///│                                                      │
///│            -----  WebSocket frames -----             │
/// ```
#[cfg_attr(
    feature = "tracing",
    tracing::instrument(level = "trace", skip(socket, ws))
)]
async fn upgrade_handshake<H: EngineIoHandler, S>(
    socket: &Arc<Socket<H::Data>>,
    ws: &mut WebSocketStream<S>,
) -> Result<(), Error>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    #[cfg(feature = "tracing")]
    tracing::debug!("starting websocket connection upgrade");

    // The socket is upgrading, from now on all polling
    // request will return a `Packet::Noop`
    socket.start_upgrade();

    // We send a last Noop request to close a potential waiting polling request.
    socket
        .internal_tx
        .force_send(smallvec![Packet::Noop])
        .map_err(|_| Error::Upgrade)?;

    // wait for any current polling connection to finish by waiting for the socket to be unlocked
    // All other polling connection will be immediately closed with a NOOP packet.
    let _lock = socket.internal_rx.lock().await;
    // Another upgrade of the same session finished first (its task now holds the lock or
    // waits for it): this one is refused.
    if socket.is_ws() {
        return Err(Error::MultipleWebsocketRequests);
    }

    // Fetch the next packet from the ws stream, it should be a PingUpgrade packet
    let msg = match ws.next().await {
        Some(Ok(Message::Text(d))) => d,
        _ => Err(Error::Upgrade)?,
    };
    match Packet::parse(socket.protocol, ws_bytes_to_str(msg))? {
        Packet::PingUpgrade => {
            #[cfg(feature = "tracing")]
            tracing::debug!("received first ping upgrade");
            // Respond with a PongUpgrade packet
            ws.send(Message::Text(String::from(Packet::PongUpgrade).into()))
                .await?;
        }
        p => Err(Error::BadPacket(p))?,
    };

    // Fetch the next packet from the ws stream, it should be an Upgrade packet
    let msg = match ws.next().await {
        Some(Ok(Message::Text(d))) => d,
        Some(Ok(Message::Close(_))) => {
            #[cfg(feature = "tracing")]
            tracing::debug!("ws stream closed before upgrade");
            Err(Error::Upgrade)?
        }
        _ => {
            #[cfg(feature = "tracing")]
            tracing::debug!("unexpected ws message before upgrade");
            Err(Error::Upgrade)?
        }
    };
    match Packet::parse(socket.protocol, ws_bytes_to_str(msg))? {
        Packet::Upgrade => {
            #[cfg(feature = "tracing")]
            tracing::debug!("ws upgraded successfully")
        }
        p => Err(Error::BadPacket(p))?,
    };

    socket.upgrade_to_websocket();
    Ok(())
}

fn ws_bytes_to_str(bytes: tungstenite::Utf8Bytes) -> Str {
    // SAFETY: the bytes are guaranteed to be valid UTF-8 by the tungstenite parser
    unsafe { Str::from_bytes_unchecked(bytes.into()) }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use bytes::Bytes;
    use futures_util::StreamExt;
    use http::Request;
    use tokio::io::DuplexStream;

    use super::*;

    const TIMEOUT: Duration = Duration::from_secs(1);

    #[derive(Debug)]
    struct StubHandler;
    impl EngineIoHandler for StubHandler {
        type Data = ();
        fn on_connect(self: Arc<Self>, _: Arc<Socket<()>>) {}
        fn on_disconnect(&self, _: Arc<Socket<()>>, _: DisconnectReason) {}
        fn on_message(self: &Arc<Self>, _: Str, _: Arc<Socket<()>>) {}
        fn on_binary(self: &Arc<Self>, _: Bytes, _: Arc<Socket<()>>) {}
    }

    fn engine(config: EngineIoConfig) -> Arc<EngineIo<StubHandler>> {
        Arc::new(EngineIo::new(Arc::new(StubHandler), config))
    }

    fn socket(engine: &Arc<EngineIo<StubHandler>>) -> Arc<Socket<()>> {
        engine.create_session(
            ProtocolVersion::V4,
            TransportType::Websocket,
            Request::<()>::default().into_parts().0,
            false,
        )
    }

    async fn ws_pair() -> (WebSocketStream<DuplexStream>, WebSocketStream<DuplexStream>) {
        let (server, client) = tokio::io::duplex(1024);
        (
            WebSocketStream::from_raw_socket(server, Role::Server, None).await,
            WebSocketStream::from_raw_socket(client, Role::Client, None).await,
        )
    }

    fn connection(
        engine: &Arc<EngineIo<StubHandler>>,
        socket: &Arc<Socket<()>>,
        ws: WebSocketStream<DuplexStream>,
        beat: Option<Heartbeat>,
    ) -> Connection<StubHandler, DuplexStream> {
        Connection {
            engine: engine.clone(),
            socket: socket.clone(),
            ws,
            rx: socket.internal_tx.receiver(),
            unflushed: false,
            beat,
        }
    }

    fn spawn_run(
        engine: &Arc<EngineIo<StubHandler>>,
        socket: &Arc<Socket<()>>,
        ws: WebSocketStream<DuplexStream>,
        beat: Option<Heartbeat>,
    ) -> tokio::task::JoinHandle<Result<End, Error>> {
        let mut conn = connection(engine, socket, ws, beat);
        tokio::spawn(async move { conn.run().await })
    }

    fn spawn_serve(
        engine: &Arc<EngineIo<StubHandler>>,
        socket: &Arc<Socket<()>>,
        ws: WebSocketStream<DuplexStream>,
    ) -> tokio::task::JoinHandle<()> {
        tokio::spawn(serve(connection(engine, socket, ws, None)))
    }

    async fn next_text(client: &mut WebSocketStream<DuplexStream>) -> Message {
        tokio::time::timeout(TIMEOUT, client.next())
            .await
            .expect("the server should send a message")
            .unwrap()
            .unwrap()
    }

    /// A polling request can still hold the lock at the end of an upgrade.
    #[tokio::test]
    async fn the_writer_waits_for_a_polling_request_to_end() {
        let engine = engine(EngineIoConfig::default());
        let socket = socket(&engine);
        let (server, mut client) = ws_pair().await;

        let polling = socket.internal_rx.lock().await;
        let task = spawn_serve(&engine, &socket, server);
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!task.is_finished(), "the writer should wait for the lock");

        drop(polling);
        socket.emit(Str::from("hello")).unwrap();
        assert_eq!(next_text(&mut client).await, Message::text("4hello"));
    }

    #[tokio::test]
    async fn a_writer_waiting_for_the_lock_stops_with_the_session() {
        let engine = engine(EngineIoConfig::default());
        let socket = socket(&engine);
        let (server, _client) = ws_pair().await;

        let _polling = socket.internal_rx.lock().await;
        let task = spawn_serve(&engine, &socket, server);
        tokio::time::sleep(Duration::from_millis(20)).await;
        socket.cancellation_token.cancel();
        tokio::time::timeout(TIMEOUT, task)
            .await
            .expect("the writer should stop")
            .unwrap();
    }

    /// The connection's task lives as long as its socket, so its size is a cost per
    /// connection: it was 3,966 bytes with the handshake inline, 1,536 with the values an
    /// `async` block copies. Under 1 KB with tokio's header, the task fits jemalloc's
    /// 1,024-byte class.
    #[test]
    fn the_connection_task_stays_small() {
        type C = Connection<StubHandler, hyper_util::rt::TokioIo<hyper::upgrade::Upgraded>>;
        fn size_of_output<A, R>(_: impl Fn(A) -> R) -> usize {
            std::mem::size_of::<R>()
        }
        let size = size_of_output(|conn: Option<C>| serve_opened(conn));
        eprintln!("serve_opened {size}");
        assert!(size <= 1024, "{size} bytes");
    }

    /// What was queued before the session closed is written, then the WebSocket closes.
    #[tokio::test]
    async fn queued_packets_are_written_before_the_close() {
        let engine = engine(EngineIoConfig::default());
        let socket = socket(&engine);
        let (server, mut client) = ws_pair().await;
        let task = spawn_serve(&engine, &socket, server);

        socket.emit(Str::from("a")).unwrap();
        socket.close(DisconnectReason::ClosingServer);
        assert_eq!(next_text(&mut client).await, Message::text("4a"));
        assert_eq!(next_text(&mut client).await, Message::text("1"));
        assert!(matches!(next_text(&mut client).await, Message::Close(_)));
        tokio::time::timeout(TIMEOUT, task).await.unwrap().unwrap();
        // The session's close waited for the writer: the queue is closed now.
        tokio::time::timeout(TIMEOUT, socket.closed())
            .await
            .unwrap();
    }

    /// The heartbeat in the connection's task: pings every interval while pongs come back,
    /// and a missing pong ends the connection.
    #[tokio::test]
    async fn heartbeat_pings_and_times_out() {
        let config = EngineIoConfig::builder()
            .ping_interval(Duration::from_millis(30))
            .ping_timeout(Duration::from_millis(30))
            .build();
        let engine = engine(config);
        let socket = socket(&engine);
        let (server, mut client) = ws_pair().await;
        let task = spawn_run(
            &engine,
            &socket,
            server,
            Some(Heartbeat::new(&engine.config)),
        );

        for _ in 0..3 {
            assert_eq!(next_text(&mut client).await, Message::text("2"));
            client.send(Message::text("3")).await.unwrap();
        }
        assert_eq!(next_text(&mut client).await, Message::text("2"));
        let end = tokio::time::timeout(TIMEOUT, task).await.unwrap().unwrap();
        assert!(matches!(end, Err(Error::HeartbeatTimeout)), "{end:?}");
    }

    /// A client message reaches the handler while the writer is blocked on a full stream.
    #[tokio::test]
    async fn reads_while_the_writer_waits() {
        #[derive(Debug, Default)]
        struct Count(std::sync::atomic::AtomicUsize);
        #[derive(Debug)]
        struct Counting(Arc<Count>);
        impl EngineIoHandler for Counting {
            type Data = ();
            fn on_connect(self: Arc<Self>, _: Arc<Socket<()>>) {}
            fn on_disconnect(&self, _: Arc<Socket<()>>, _: DisconnectReason) {}
            fn on_message(self: &Arc<Self>, _: Str, _: Arc<Socket<()>>) {
                self.0.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
            fn on_binary(self: &Arc<Self>, _: Bytes, _: Arc<Socket<()>>) {}
        }
        let count = Arc::new(Count::default());
        let engine = Arc::new(EngineIo::new(
            Arc::new(Counting(count.clone())),
            EngineIoConfig::default(),
        ));
        let socket = engine.create_session(
            ProtocolVersion::V4,
            TransportType::Websocket,
            Request::<()>::default().into_parts().0,
            false,
        );
        let (server, mut client) = ws_pair().await;
        let mut conn = Connection {
            engine: engine.clone(),
            socket: socket.clone(),
            ws: server,
            rx: socket.internal_tx.receiver(),
            unflushed: false,
            beat: None,
        };
        let task = tokio::spawn(async move { conn.run().await });
        // Fill the 1 KB pipe: the client does not read.
        for _ in 0..64 {
            socket.emit(Str::from("x".repeat(100))).unwrap();
        }
        client.send(Message::text("4hi")).await.unwrap();
        tokio::time::timeout(TIMEOUT, async {
            while count.0.load(std::sync::atomic::Ordering::SeqCst) == 0 {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("the message should reach the handler");
        assert!(!task.is_finished());
    }
}
