//! Clients as real ones behave: each user keeps one connection to a gateway of its choice,
//! joins its rooms from the last message it holds (`join_room {afterSeq}`), sends at a
//! steady pace and waits for each answer, types now and then, and now and then leaves for
//! another gateway. Most sends go once, as the seed's clients send; some carry a
//! `clientMsgId` and are retried with it after an error or a time-out, as a careful client
//! does. Room owners remove members and add them back. Everything is recorded.

use super::history::{Event, History, JoinOutcome, Outcome};
use super::topology::SERVER_API_KEY;
use crate::client::{Client, Incoming};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::{Value, json};
use shared::ObjectId;
use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

/// How long a client waits for an answer before taking it as lost.
const ACK_TIMEOUT: Duration = Duration::from_secs(5);
/// Attempts of a careful client's send before it gives up.
const KEYED_ATTEMPTS: u32 = 30;
/// Messages per history page when a replay did not reach the end.
const PAGE: usize = 100;

/// Who is where.
pub struct Cast {
    pub rooms: Vec<ObjectId>,
    pub tokens: Vec<String>,
    pub users: Vec<ObjectId>,
    /// Each client's rooms.
    pub rooms_of: Vec<Vec<usize>>,
    /// Each room's members; the first is its owner.
    pub members_of: Vec<Vec<usize>>,
}

/// What every client task shares.
pub struct Crowd {
    pub cast: Cast,
    pub gateways: Vec<String>,
    pub history: History,
    /// Cancelled when sending, typing, leaving and removing stop (the run is settling).
    pub quiet: CancellationToken,
    /// Cancelled when the clients close their connections and end.
    pub done: CancellationToken,
    states: Vec<Mutex<State>>,
    connections: AtomicU64,
    http: reqwest::Client,
}

/// One client's view, shared by its loop and its connection's reader.
#[derive(Default)]
struct State {
    /// The last message held of each room without a gap, and those held past a gap.
    last: HashMap<usize, u64>,
    held: HashMap<usize, BTreeSet<u64>>,
    /// Rooms joined on the current connection.
    joined: HashSet<usize>,
    /// Rooms the client is a member of, as the owners' answers say.
    member: HashSet<usize>,
}

impl State {
    fn receive(&mut self, room: usize, seq: u64) {
        let held = self.held.entry(room).or_default();
        held.insert(seq);
        let last = self.last.entry(room).or_insert(0);
        while held.remove(&(*last + 1)) {
            *last += 1;
        }
        held.retain(|s| *s > *last);
    }

    fn has(&self, room: usize, seq: u64) -> bool {
        self.last.get(&room).is_some_and(|l| seq <= *l)
            || self.held.get(&room).is_some_and(|h| h.contains(&seq))
    }
}

impl Crowd {
    pub fn new(cast: Cast, gateways: Vec<String>, history: History) -> Arc<Self> {
        let states = cast
            .rooms_of
            .iter()
            .map(|rooms| {
                Mutex::new(State {
                    member: rooms.iter().copied().collect(),
                    ..State::default()
                })
            })
            .collect();
        Arc::new(Self {
            cast,
            gateways,
            history,
            quiet: CancellationToken::new(),
            done: CancellationToken::new(),
            states,
            connections: AtomicU64::new(0),
            http: reqwest::Client::new(),
        })
    }

    fn state(&self, client: usize) -> std::sync::MutexGuard<'_, State> {
        self.states[client]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// The last message of `room` that `client` holds without a gap.
    pub fn last(&self, client: usize, room: usize) -> u64 {
        self.state(client).last.get(&room).copied().unwrap_or(0)
    }

    /// Marks everyone a member of all their rooms again (after the owners added them back).
    pub fn all_members(&self) {
        for (client, rooms) in self.cast.rooms_of.iter().enumerate() {
            self.state(client).member = rooms.iter().copied().collect();
        }
    }

    /// The client number of the backend's sends ([`run_backend`]): after every real client's.
    pub fn backend(&self) -> usize {
        self.cast.tokens.len()
    }

    fn room_index(&self, id: &str) -> Option<usize> {
        self.cast.rooms.iter().position(|r| r.to_hex() == id)
    }

    /// A REST call on a gateway of the client's choice.
    async fn rest(
        &self,
        rng: &mut ChaCha8Rng,
        method: reqwest::Method,
        path: &str,
        token: &str,
        body: Option<Value>,
    ) -> Result<(u16, Value), String> {
        let base = &self.gateways[rng.random_range(0..self.gateways.len())];
        let mut request = self
            .http
            .request(method, format!("{base}{path}"))
            .bearer_auth(token)
            .timeout(ACK_TIMEOUT);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.map_err(|e| e.to_string())?;
        let status = response.status().as_u16();
        let body = response.json().await.unwrap_or(Value::Null);
        Ok((status, body))
    }
}

/// An answer awaited on a connection.
enum Pending {
    Join {
        room: usize,
        reply: oneshot::Sender<Value>,
    },
    Other(oneshot::Sender<Value>),
}

struct Conn {
    id: u64,
    client: Client,
    pending: Arc<Mutex<HashMap<u64, Pending>>>,
    closed: CancellationToken,
}

impl Conn {
    /// Emits with an ack; the answer arrives on the returned receiver (dropped when the
    /// connection closes).
    fn request(
        &mut self,
        event: &str,
        data: &Value,
        join: Option<usize>,
    ) -> oneshot::Receiver<Value> {
        let (reply, answer) = oneshot::channel();
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(id) = self.client.emit(event, data, true) {
            let entry = match join {
                Some(room) => Pending::Join { room, reply },
                None => Pending::Other(reply),
            };
            pending.insert(id, entry);
        }
        answer
    }
}

/// Runs client `index` until `done`.
pub async fn run_client(crowd: Arc<Crowd>, index: usize, seed: u64) {
    let mut rng =
        ChaCha8Rng::seed_from_u64(seed ^ (index as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let mut sent = 0u64;
    // A careful client's send not yet answered: room, content, key, attempts so far.
    let mut unanswered: Option<(usize, String, String, u32)> = None;
    let mut backoff = Duration::from_millis(100);
    while !crowd.done.is_cancelled() {
        let Some(mut conn) = connect(&crowd, index, &mut rng).await else {
            tokio::select! {
                _ = crowd.done.cancelled() => break,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(1));
            continue;
        };
        backoff = Duration::from_millis(100);
        crowd.state(index).joined.clear();
        'connected: while !conn.closed.is_cancelled() && !crowd.done.is_cancelled() {
            // Join whatever the client is a member of and not in yet, from where it is.
            let to_join: Vec<usize> = {
                let state = crowd.state(index);
                let mut rooms: Vec<usize> =
                    state.member.difference(&state.joined).copied().collect();
                rooms.sort_unstable();
                rooms
            };
            for room in to_join {
                match join(&crowd, index, &mut conn, room, &mut rng).await {
                    Joined::Yes | Joined::No => {}
                    Joined::Lost => break 'connected,
                }
            }
            if let Some((room, content, key, attempts)) = unanswered.take() {
                unanswered =
                    send(&crowd, index, &mut conn, room, content, Some(key), attempts).await;
            } else if !crowd.quiet.is_cancelled() {
                let roll: f64 = rng.random();
                let rooms: Vec<usize> = {
                    let state = crowd.state(index);
                    let mut rooms: Vec<usize> =
                        state.joined.intersection(&state.member).copied().collect();
                    rooms.sort_unstable();
                    rooms
                };
                if roll < 0.75 && !rooms.is_empty() {
                    let room = rooms[rng.random_range(0..rooms.len())];
                    sent += 1;
                    let content = format!("{index}.{sent}");
                    let key = rng.random_bool(0.3).then(|| format!("k{index}.{sent}"));
                    unanswered = send(&crowd, index, &mut conn, room, content, key, 0).await;
                } else if roll < 0.85 && !rooms.is_empty() {
                    let room = rooms[rng.random_range(0..rooms.len())];
                    let answer = conn.request(
                        "typing",
                        &json!({ "roomId": crowd.cast.rooms[room].to_hex() }),
                        None,
                    );
                    let _ = tokio::time::timeout(ACK_TIMEOUT, answer).await;
                } else if roll < 0.88 {
                    // Off to another gateway, and back to where it was.
                    break 'connected;
                }
            }
            let pause = Duration::from_millis(rng.random_range(100..600));
            tokio::select! {
                _ = crowd.done.cancelled() => break,
                _ = conn.closed.cancelled() => break,
                _ = tokio::time::sleep(pause) => {}
            }
        }
        conn.client.close();
        let _ = tokio::time::timeout(Duration::from_secs(2), conn.closed.cancelled()).await;
    }
}

/// Connects client `index` to a gateway of its choice and starts the connection's reader.
async fn connect(crowd: &Arc<Crowd>, index: usize, rng: &mut ChaCha8Rng) -> Option<Conn> {
    let gateway = rng.random_range(0..crowd.gateways.len());
    let (tx, rx) = mpsc::unbounded_channel();
    let client = tokio::time::timeout(
        ACK_TIMEOUT,
        Client::connect(
            &crowd.gateways[gateway],
            None,
            &crowd.cast.tokens[index],
            tx,
        ),
    )
    .await
    .ok()?
    .ok()?;
    let id = crowd.connections.fetch_add(1, Ordering::Relaxed) + 1;
    crowd.history.record(Event::Connected {
        client: index,
        conn: id,
        gateway,
        at: crowd.history.now(),
    });
    let conn = Conn {
        id,
        client,
        pending: Arc::default(),
        closed: CancellationToken::new(),
    };
    tokio::spawn(read(
        crowd.clone(),
        index,
        id,
        rx,
        conn.pending.clone(),
        conn.closed.clone(),
    ));
    Some(conn)
}

/// Records what arrives on a connection, in the order it arrives, and hands answers over.
async fn read(
    crowd: Arc<Crowd>,
    client: usize,
    conn: u64,
    mut rx: mpsc::UnboundedReceiver<Incoming>,
    pending: Arc<Mutex<HashMap<u64, Pending>>>,
    closed: CancellationToken,
) {
    let history = &crowd.history;
    while let Some(incoming) = rx.recv().await {
        match incoming {
            Incoming::Ack { id, payload } => {
                let entry = pending
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&id);
                match entry {
                    Some(Pending::Join { room, reply }) => {
                        let outcome = if payload["ok"] == json!(true) {
                            crowd.state(client).joined.insert(room);
                            JoinOutcome::Ok {
                                replayed: payload["replayed"].as_u64().unwrap_or(0),
                                has_more: payload["hasMore"] == json!(true),
                            }
                        } else {
                            JoinOutcome::Refused {
                                code: code(&payload),
                            }
                        };
                        history.record(Event::Joined {
                            client,
                            conn,
                            room,
                            at: history.now(),
                            outcome,
                        });
                        let _ = reply.send(payload);
                    }
                    Some(Pending::Other(reply)) => {
                        let _ = reply.send(payload);
                    }
                    None => {}
                }
            }
            Incoming::Event { name, raw } => {
                let args: Value = serde_json::from_str(&raw).unwrap_or(Value::Null);
                let data = &args[1];
                let Some(room) = data["roomId"].as_str().and_then(|r| crowd.room_index(r)) else {
                    continue;
                };
                match name.as_str() {
                    "message" | SERVER_EVENT => {
                        let seq = data["seq"].as_u64().unwrap_or(0);
                        crowd.state(client).receive(room, seq);
                        history.record(Event::Message {
                            client,
                            conn,
                            room,
                            id: item_id(&name, data),
                            seq,
                            at: history.now(),
                        });
                    }
                    "resync" => {
                        crowd.state(client).joined.remove(&room);
                        history.record(Event::Resync {
                            client,
                            conn,
                            room,
                            after_seq: data["afterSeq"].as_u64().unwrap_or(0),
                            at: history.now(),
                        });
                    }
                    _ => {}
                }
            }
            Incoming::Closed => break,
        }
    }
    pending.lock().unwrap_or_else(|e| e.into_inner()).clear();
    history.record(Event::Closed {
        client,
        conn,
        at: history.now(),
    });
    closed.cancel();
}

fn code(payload: &Value) -> String {
    payload["error"]["code"]
        .as_str()
        .unwrap_or("MALFORMED")
        .to_owned()
}

enum Joined {
    Yes,
    /// Refused; tried again later.
    No,
    /// No answer: the connection is given up (a join that may still happen must not be
    /// sent again on it, or its replay would repeat what arrived live meanwhile).
    Lost,
}

async fn join(
    crowd: &Arc<Crowd>,
    client: usize,
    conn: &mut Conn,
    room: usize,
    rng: &mut ChaCha8Rng,
) -> Joined {
    let after_seq = crowd.last(client, room);
    crowd.history.record(Event::JoinSent {
        client,
        conn: conn.id,
        room,
        after_seq: Some(after_seq),
        at: crowd.history.now(),
    });
    let data = json!({ "roomId": crowd.cast.rooms[room].to_hex(), "afterSeq": after_seq });
    let answer = conn.request("join_room", &data, Some(room));
    match tokio::time::timeout(ACK_TIMEOUT * 2, answer).await {
        Ok(Ok(payload)) if payload["ok"] == json!(true) => {
            if payload["hasMore"] == json!(true) {
                page(crowd, client, room, rng).await;
            }
            Joined::Yes
        }
        Ok(Ok(_)) => Joined::No,
        Ok(Err(_)) => Joined::Lost,
        Err(_) => {
            crowd.history.record(Event::Joined {
                client,
                conn: conn.id,
                room,
                at: crowd.history.now(),
                outcome: JoinOutcome::TimedOut,
            });
            Joined::Lost
        }
    }
}

/// Pages forward over REST after a replay that stopped at `REPLAY_LIMIT`, keeping only what
/// the client does not hold yet (live messages may be ahead).
async fn page(crowd: &Arc<Crowd>, client: usize, room: usize, rng: &mut ChaCha8Rng) {
    loop {
        let after = crowd.last(client, room);
        let path = format!(
            "/chat/rooms/{}/messages?afterSeq={after}&limit={PAGE}",
            crowd.cast.rooms[room].to_hex()
        );
        let token = crowd.cast.tokens[client].clone();
        let Ok((200, Value::Array(messages))) = crowd
            .rest(rng, reqwest::Method::GET, &path, &token, None)
            .await
        else {
            return;
        };
        for m in &messages {
            let seq = m["seq"].as_u64().unwrap_or(0);
            let mut state = crowd.state(client);
            if state.has(room, seq) {
                continue;
            }
            state.receive(room, seq);
            drop(state);
            crowd.history.record(Event::Message {
                client,
                conn: 0,
                room,
                id: match m["event"].as_str() {
                    Some(event) => item_id(event, &m["data"]),
                    None => item_id("message", m),
                },
                seq,
                at: crowd.history.now(),
            });
        }
        if messages.len() < PAGE {
            return;
        }
    }
}

/// One attempt of a send; returns the send still to retry (a careful client's, unanswered).
async fn send(
    crowd: &Arc<Crowd>,
    client: usize,
    conn: &mut Conn,
    room: usize,
    content: String,
    key: Option<String>,
    attempts: u32,
) -> Option<(usize, String, String, u32)> {
    let attempt = attempts + 1;
    let mut data = json!({ "roomId": crowd.cast.rooms[room].to_hex(), "content": content });
    if let Some(key) = &key {
        data["clientMsgId"] = json!(key);
    }
    let started = crowd.history.now();
    let answer = conn.request("send_message", &data, None);
    let outcome = match tokio::time::timeout(ACK_TIMEOUT, answer).await {
        Ok(Ok(payload)) if payload["ok"] == json!(true) => Outcome::Acked {
            id: payload["id"].as_str().unwrap_or_default().to_owned(),
        },
        Ok(Ok(payload)) => Outcome::Refused {
            code: code(&payload),
        },
        Ok(Err(_)) | Err(_) => Outcome::TimedOut,
    };
    let retry = match (&outcome, &key) {
        (Outcome::Acked { .. }, _) | (_, None) => false,
        (Outcome::Refused { code }, Some(_)) => code == "UNAVAILABLE" || code == "RATE_LIMITED",
        (Outcome::TimedOut, Some(_)) => true,
    };
    crowd.history.record(Event::Send {
        client,
        room,
        content: content.clone(),
        keyed: key.is_some(),
        attempt,
        conn: conn.id,
        started,
        at: crowd.history.now(),
        outcome,
    });
    match key {
        Some(key) if retry && attempt < KEYED_ATTEMPTS => Some((room, content, key, attempt)),
        _ => None,
    }
}

/// The event the backend posts through the server API.
pub const SERVER_EVENT: &str = "file_uploaded";

/// What the history calls an item: a message by its id; a server event by the unique
/// `fileId` its poster gave it (the server API answers with its number, not an id).
fn item_id(event: &str, data: &Value) -> String {
    let field = if event == "message" { "id" } else { "fileId" };
    data[field].as_str().unwrap_or_default().to_owned()
}

/// A backend service: posts server events into random rooms through random gateways until
/// `quiet`, each with an idempotency key, retried after errors and time-outs as a careful
/// client's send is. Recorded as sends of client `crowd.backend()`, whose content and id are
/// the event's `fileId`.
pub async fn run_backend(crowd: Arc<Crowd>, seed: u64) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x5E12_7E12);
    let client = crowd.backend();
    let mut posted = 0u64;
    while !crowd.quiet.is_cancelled() {
        let wait = Duration::from_millis(rng.random_range(200..800));
        tokio::select! {
            _ = crowd.quiet.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
        posted += 1;
        let room = rng.random_range(0..crowd.cast.rooms.len());
        let file = format!("file.{posted}");
        let path = format!("/server/rooms/{}/events", crowd.cast.rooms[room].to_hex());
        let body =
            json!({ "event": SERVER_EVENT, "data": { "fileId": file }, "idempotencyKey": file });
        for attempt in 1..=KEYED_ATTEMPTS {
            let started = crowd.history.now();
            let answer = crowd
                .rest(
                    &mut rng,
                    reqwest::Method::POST,
                    &path,
                    SERVER_API_KEY,
                    Some(body.clone()),
                )
                .await;
            let outcome = match &answer {
                Ok((202, _)) => Outcome::Acked { id: file.clone() },
                Ok((_, payload)) => Outcome::Refused {
                    code: payload["error"].as_str().unwrap_or("MALFORMED").to_owned(),
                },
                Err(_) => Outcome::TimedOut,
            };
            let retry = match &answer {
                Ok((202, _)) => false,
                Ok((status, _)) => *status == 503 || *status == 429,
                Err(_) => true,
            };
            crowd.history.record(Event::Send {
                client,
                room,
                content: file.clone(),
                keyed: true,
                attempt,
                conn: 0,
                started,
                at: crowd.history.now(),
                outcome,
            });
            if !retry {
                break;
            }
            tokio::time::sleep(Duration::from_millis(rng.random_range(100..500))).await;
        }
    }
}

/// Each room's owner removes a member now and then and adds them back, until `quiet`.
pub async fn run_owner(crowd: Arc<Crowd>, room: usize, seed: u64) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0xA5A5_0000 ^ room as u64);
    let members = crowd.cast.members_of[room].clone();
    let owner = members[0];
    let token = crowd.cast.tokens[owner].clone();
    let room_id = crowd.cast.rooms[room].to_hex();
    loop {
        let wait = Duration::from_millis(rng.random_range(3_000..10_000));
        tokio::select! {
            _ = crowd.quiet.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
        let user = members[rng.random_range(1..members.len())];
        let user_id = crowd.cast.users[user].to_hex();
        let started = crowd.history.now();
        let path = format!("/chat/rooms/{room_id}/participants/{user_id}");
        let answer = crowd
            .rest(&mut rng, reqwest::Method::DELETE, &path, &token, None)
            .await;
        let ok = matches!(answer, Ok((200 | 204, _)));
        if ok {
            let mut state = crowd.state(user);
            state.member.remove(&room);
            state.joined.remove(&room);
        }
        crowd.history.record(Event::Removed {
            user,
            room,
            started,
            at: crowd.history.now(),
            ok,
        });
        let away = Duration::from_millis(rng.random_range(500..5_000));
        tokio::time::sleep(away).await;
        add_back(&crowd, &mut rng, room, user).await;
    }
}

/// The owner adds `user` to `room` again, until it is done (or the run ends).
pub async fn add_back(crowd: &Arc<Crowd>, rng: &mut ChaCha8Rng, room: usize, user: usize) {
    let owner = crowd.cast.members_of[room][0];
    let token = crowd.cast.tokens[owner].clone();
    let path = format!(
        "/chat/rooms/{}/participants",
        crowd.cast.rooms[room].to_hex()
    );
    let body = json!({ "userId": crowd.cast.users[user].to_hex() });
    while !crowd.done.is_cancelled() {
        let started = crowd.history.now();
        let answer = crowd
            .rest(
                rng,
                reqwest::Method::POST,
                &path,
                &token,
                Some(body.clone()),
            )
            .await;
        let ok = matches!(answer, Ok((200, _)));
        crowd.history.record(Event::Added {
            user,
            room,
            started,
            at: crowd.history.now(),
            ok,
        });
        if ok {
            let mut state = crowd.state(user);
            state.member.insert(room);
            // Its socket left the room with the removal: it joins again.
            state.joined.remove(&room);
            return;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
