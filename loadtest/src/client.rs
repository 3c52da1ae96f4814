//! A lean Socket.IO v5 client over one WebSocket: speaks Engine.IO v4 framing itself,
//! answers pings at any time, and hands received events to a callback without parsing
//! more than their name.

use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use std::net::{IpAddr, SocketAddr};
use tokio::net::TcpSocket;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

const NS: &str = "/chat";

/// What a connection reports.
#[derive(Debug)]
pub enum Incoming {
    /// An event: its name and the raw text of its arguments (`["name",{...}]`).
    Event {
        name: String,
        raw: String,
    },
    /// An ack: its id and payload.
    Ack {
        id: u64,
        payload: Value,
    },
    Closed,
}

/// A connected, authenticated Socket.IO client.
pub struct Client {
    out: mpsc::UnboundedSender<String>,
    next_ack: u64,
}

impl Client {
    /// Connects to `base` (`http://host:port`) from `source` (a local address, so that many
    /// connections fit) and authenticates on `/chat`. Received events go to `events`.
    pub async fn connect(
        base: &str,
        source: Option<IpAddr>,
        token: &str,
        events: mpsc::UnboundedSender<Incoming>,
    ) -> anyhow::Result<Self> {
        let authority = base.trim_start_matches("http://").trim_end_matches('/');
        let addr: SocketAddr = tokio::net::lookup_host(authority)
            .await?
            .next()
            .ok_or_else(|| anyhow::anyhow!("cannot resolve {authority}"))?;
        anyhow::ensure!(
            addr.ip().is_loopback(),
            "load is only sent to loopback addresses, not {addr}"
        );
        let socket = if addr.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        if let Some(ip) = source {
            socket.bind(SocketAddr::new(ip, 0))?;
        }
        socket.set_nodelay(true)?;
        let stream = socket.connect(addr).await?;
        let url = format!("ws://{authority}/socket.io/?EIO=4&transport=websocket");
        // A 4 KiB read buffer, not tungstenite's 128 KiB: the events are small, and 100,000
        // clients (the scale scenario) would otherwise hold 13 GB of buffers.
        let config = WebSocketConfig::default().read_buffer_size(4096);
        let (ws, _) =
            tokio_tungstenite::client_async_with_config(url, stream, Some(config)).await?;
        let mut ws = ws;
        ws.send(Message::text(format!(
            "40{NS},{}",
            json!({ "token": token })
        )))
        .await?;
        // Wait for the namespace's answer (the open packet and pings come first).
        loop {
            let Some(frame) = ws.next().await else {
                anyhow::bail!("closed during connect")
            };
            let frame = frame?;
            let text = frame.to_text().unwrap_or_default();
            if text == "2" {
                ws.send(Message::text("3")).await?;
            } else if text.starts_with("40/chat,") {
                break;
            } else if let Some(err) = text.strip_prefix("44/chat,") {
                anyhow::bail!("connect refused: {err}");
            }
        }

        // One task owns the connection: it writes what `emit` queues and reads the rest.
        let (out, mut out_rx) = mpsc::unbounded_channel::<String>();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    frame = out_rx.recv() => {
                        let Some(frame) = frame else { break };
                        if ws.send(Message::text(frame)).await.is_err() {
                            break;
                        }
                    }
                    frame = ws.next() => {
                        let Some(Ok(Message::Text(text))) = frame else {
                            if matches!(frame, Some(Ok(_))) { continue }
                            break;
                        };
                        let text = text.as_str();
                        if text == "2" {
                            if ws.send(Message::text("3")).await.is_err() {
                                break;
                            }
                        } else if let Some(rest) = text.strip_prefix("42/chat,") {
                            // `["name",...]`: the name is the first string.
                            let name = rest.get(2..).and_then(|r| r.split('"').next()).unwrap_or("").to_owned();
                            let _ = events.send(Incoming::Event { name, raw: rest.to_owned() });
                        } else if let Some(rest) = text.strip_prefix("43/chat,") {
                            let start = rest.find('[').unwrap_or(rest.len());
                            if let Ok(id) = rest[..start].parse() {
                                let payload: Value = serde_json::from_str::<Vec<Value>>(&rest[start..])
                                    .ok()
                                    .and_then(|v| v.into_iter().next())
                                    .unwrap_or(Value::Null);
                                let _ = events.send(Incoming::Ack { id, payload });
                            }
                        }
                    }
                }
            }
            let _ = events.send(Incoming::Closed);
        });
        Ok(Self { out, next_ack: 0 })
    }

    /// Closes the connection: its task ends and reports `Closed`.
    pub fn close(&mut self) {
        let (closed, _) = mpsc::unbounded_channel();
        // Dropping the only sender ends the connection's task.
        self.out = closed;
    }

    /// Emits an event; with `ack`, returns the ack id to wait for.
    pub fn emit(&mut self, event: &str, data: &Value, ack: bool) -> Option<u64> {
        let body = json!([event, data]);
        if ack {
            let id = self.next_ack;
            self.next_ack += 1;
            let _ = self.out.send(format!("42{NS},{id}{body}"));
            Some(id)
        } else {
            let _ = self.out.send(format!("42{NS},{body}"));
            None
        }
    }
}

/// Pulls `"key":"<value>"` out of raw JSON text without parsing it.
pub fn str_field<'a>(raw: &'a str, key: &str) -> Option<&'a str> {
    let needle = format!("\"{key}\":\"");
    let start = raw.find(&needle)? + needle.len();
    let end = raw[start..].find('"')?;
    Some(&raw[start..start + end])
}
