//! A small Socket.IO v5 client over a raw WebSocket, so tests can pin exact frames.

use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{Notify, mpsc, oneshot};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

pub const TIMEOUT: Duration = Duration::from_secs(10);
const NS: &str = "/chat";

#[derive(Default)]
struct Inbox {
    events: VecDeque<(String, Value)>,
    acks: HashMap<i64, oneshot::Sender<Value>>,
    connect: Option<Result<Value, String>>,
    disconnected: bool,
    /// The server disconnected the namespace (`41`), which clients do not retry,
    /// rather than closing the transport.
    ns_disconnected: bool,
}

pub struct SioClient {
    out: mpsc::UnboundedSender<String>,
    inbox: Arc<Mutex<Inbox>>,
    notify: Arc<Notify>,
    next_ack: i64,
}

impl SioClient {
    /// Connects to `/chat` with the handshake `auth` and extra headers.
    /// `Err` carries the `connect_error` message.
    pub async fn connect(
        port: u16,
        auth: Option<Value>,
        headers: &[(&str, &str)],
    ) -> Result<Self, String> {
        let url = format!("ws://127.0.0.1:{port}/socket.io/?EIO=4&transport=websocket");
        let mut request = url.into_client_request().unwrap();
        for (k, v) in headers {
            request
                .headers_mut()
                .insert(http_name(k), v.parse().unwrap());
        }
        let (ws, _) = tokio_tungstenite::connect_async(request)
            .await
            .map_err(|e| e.to_string())?;
        let (mut sink, mut stream) = ws.split();
        let (out, mut out_rx) = mpsc::unbounded_channel::<String>();
        tokio::spawn(async move {
            while let Some(frame) = out_rx.recv().await {
                if sink.send(Message::text(frame)).await.is_err() {
                    break;
                }
            }
            let _ = sink.close().await;
        });
        let inbox = Arc::new(Mutex::new(Inbox::default()));
        let notify = Arc::new(Notify::new());
        {
            let (inbox, notify, out) = (inbox.clone(), notify.clone(), out.clone());
            tokio::spawn(async move {
                while let Some(Ok(msg)) = stream.next().await {
                    let Message::Text(text) = msg else { continue };
                    handle_frame(text.as_str(), &inbox, &out);
                    notify.notify_waiters();
                }
                let mut inbox = inbox.lock().unwrap();
                inbox.disconnected = true;
                // Unanswered acks never will be: their receivers see an error.
                inbox.acks.clear();
                drop(inbox);
                notify.notify_waiters();
            });
        }
        let connect = match auth {
            Some(auth) => format!("40{NS},{auth}"),
            None => format!("40{NS},"),
        };
        out.send(connect).unwrap();
        let client = Self {
            out,
            inbox,
            notify,
            next_ack: 0,
        };
        let result = client
            .wait_for(|inbox| inbox.connect.take())
            .await
            .expect("no answer to the namespace connect");
        result.map(|_| client)
    }

    /// Connects with a token in `auth.token`; panics on refusal.
    pub async fn with_token(port: u16, token: &str) -> Self {
        Self::connect(port, Some(json!({ "token": token })), &[])
            .await
            .expect("connect")
    }

    async fn wait_for<T>(&self, mut f: impl FnMut(&mut Inbox) -> Option<T>) -> Option<T> {
        let deadline = tokio::time::Instant::now() + TIMEOUT;
        loop {
            let notified = self.notify.notified();
            if let Some(v) = f(&mut self.inbox.lock().unwrap()) {
                return Some(v);
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return None;
            }
        }
    }

    /// Sends a raw Socket.IO packet (e.g. `42/chat,["x"]`).
    pub fn send_raw(&self, frame: String) {
        let _ = self.out.send(frame);
    }

    /// Emits an event without asking for an ack.
    pub fn emit(&self, event: &str, data: Value) {
        self.send_raw(format!("42{NS},{}", json!([event, data])));
    }

    /// Emits an event with the given argument list, without an ack.
    pub fn emit_args(&self, event: &str, args: Vec<Value>) {
        let mut list = vec![json!(event)];
        list.extend(args);
        self.send_raw(format!("42{NS},{}", Value::Array(list)));
    }

    /// Emits an event and returns a receiver for its ack.
    pub fn emit_with_ack(&mut self, event: &str, args: Vec<Value>) -> oneshot::Receiver<Value> {
        let id = self.next_ack;
        self.next_ack += 1;
        let (tx, rx) = oneshot::channel();
        let mut inbox = self.inbox.lock().unwrap();
        // Once the connection is gone nothing will answer: dropping the sender tells the
        // caller at once. (Inserting it would leave it waiting, since the reader task
        // cleared the pending acks when the connection closed.)
        if !inbox.disconnected {
            inbox.acks.insert(id, tx);
        }
        drop(inbox);
        let mut list = vec![json!(event)];
        list.extend(args);
        self.send_raw(format!("42{NS},{id}{}", Value::Array(list)));
        rx
    }

    /// Emits an event with one argument and waits for its ack.
    /// Sends the raw frame `frame(ack_id)` and waits for the ack of that id.
    pub async fn raw_request(&mut self, frame: impl FnOnce(i64) -> String) -> Value {
        let id = self.next_ack;
        self.next_ack += 1;
        let (tx, rx) = oneshot::channel();
        self.inbox.lock().unwrap().acks.insert(id, tx);
        self.send_raw(frame(id));
        tokio::time::timeout(TIMEOUT, rx)
            .await
            .expect("ack timed out")
            .expect("ack dropped")
    }

    pub async fn request(&mut self, event: &str, data: Value) -> Value {
        let rx = self.emit_with_ack(event, vec![data]);
        tokio::time::timeout(TIMEOUT, rx)
            .await
            .expect("ack timed out")
            .expect("ack dropped")
    }

    /// Waits for the next event called `name`, removing it (and nothing else) from the inbox.
    pub async fn next(&self, name: &str) -> Value {
        self.wait_for(|inbox| {
            let pos = inbox.events.iter().position(|(n, _)| n == name)?;
            inbox.events.remove(pos).map(|(_, v)| v)
        })
        .await
        .unwrap_or_else(|| panic!("no `{name}` event within {TIMEOUT:?}"))
    }

    /// Waits for the next event called any of `names`, taking the first to arrive: its name
    /// and payload.
    pub async fn next_of(&self, names: &[&str]) -> (String, Value) {
        self.wait_for(|inbox| {
            let pos = inbox
                .events
                .iter()
                .position(|(n, _)| names.contains(&n.as_str()))?;
            inbox.events.remove(pos)
        })
        .await
        .unwrap_or_else(|| panic!("none of {names:?} within {TIMEOUT:?}"))
    }

    /// Events received so far and not yet taken, by name.
    pub fn pending(&self, name: &str) -> Vec<Value> {
        let inbox = self.inbox.lock().unwrap();
        inbox
            .events
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, v)| v.clone())
            .collect()
    }

    /// How many events called `name` were received and not yet taken.
    pub fn count(&self, name: &str) -> usize {
        let inbox = self.inbox.lock().unwrap();
        inbox.events.iter().filter(|(n, _)| n == name).count()
    }

    /// Waits until the connection closed or the server disconnected the namespace.
    pub async fn wait_disconnected(&self) {
        self.wait_for(|inbox| (inbox.disconnected || inbox.ns_disconnected).then_some(()))
            .await
            .expect("still connected");
    }

    pub fn is_disconnected(&self) -> bool {
        let inbox = self.inbox.lock().unwrap();
        inbox.disconnected || inbox.ns_disconnected
    }

    /// Whether the server disconnected the namespace (a Socket.IO client would not
    /// reconnect) rather than closing the connection.
    pub fn was_ns_disconnected(&self) -> bool {
        self.inbox.lock().unwrap().ns_disconnected
    }

    /// Closes the connection.
    pub fn close(&self) {
        self.send_raw(format!("41{NS},"));
    }
}

fn http_name(name: &str) -> tokio_tungstenite::tungstenite::http::HeaderName {
    name.parse().unwrap()
}

/// Parses one Engine.IO text frame.
fn handle_frame(text: &str, inbox: &Mutex<Inbox>, out: &mpsc::UnboundedSender<String>) {
    let (eio, rest) = text.split_at(1);
    match eio {
        "2" => {
            let _ = out.send("3".into());
        }
        "4" => {
            let (kind, rest) = rest.split_at(1);
            let rest = rest
                .strip_prefix(NS)
                .and_then(|r| r.strip_prefix(','))
                .unwrap_or(rest);
            let mut inbox = inbox.lock().unwrap();
            match kind {
                "0" => inbox.connect = Some(Ok(serde_json::from_str(rest).unwrap_or(Value::Null))),
                "4" => {
                    let err: Value = serde_json::from_str(rest).unwrap_or(Value::Null);
                    let msg = err
                        .get("message")
                        .and_then(Value::as_str)
                        .unwrap_or("")
                        .to_owned();
                    inbox.connect = Some(Err(msg));
                }
                "1" => inbox.ns_disconnected = true,
                "2" => {
                    let start = rest.find('[').unwrap();
                    let list: Vec<Value> = serde_json::from_str(&rest[start..]).unwrap();
                    let name = list[0].as_str().unwrap().to_owned();
                    let data = list.get(1).cloned().unwrap_or(Value::Null);
                    inbox.events.push_back((name, data));
                }
                "3" => {
                    let start = rest.find('[').unwrap();
                    let id: i64 = rest[..start].parse().unwrap();
                    let list: Vec<Value> = serde_json::from_str(&rest[start..]).unwrap();
                    if let Some(tx) = inbox.acks.remove(&id) {
                        let _ = tx.send(list.into_iter().next().unwrap_or(Value::Null));
                    }
                }
                _ => {}
            }
        }
        _ => {}
    }
}
