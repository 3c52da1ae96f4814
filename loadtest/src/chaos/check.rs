//! The history checker: reads the recorded history and what the store holds at the end,
//! knowing nothing of how the gateway works, and says which promise broke where.
//!
//! * (a) every acknowledged message is stored, once: one stored message per message a client
//!   meant to send, whatever its retries, and none that nobody sent;
//! * (b) each room's stored numbers are 1..N with one message each, and the acknowledged
//!   messages of each client (which waits for each answer before its next send) are
//!   numbered in the order they were acknowledged;
//! * (c) during each connection, each room's messages arrive with numbers rising by exactly
//!   one from where the join asked to start, with no message twice, and none after a
//!   `resync` or a refused join until the next join;
//! * (d) over all of a client's connections, replays and history pages, it received each
//!   room's stored messages 1..N exactly once;
//! * (e) no message sent after a removal was acknowledged reaches the removed user before
//!   the acknowledged adding that brought them back;
//! * (f) nothing is received that is not stored, under the number it is stored with.
//!
//! "Messages" here are every item of a room's sequence: the clients' chat messages and the
//! server events a backend posts (known to the history by the unique `fileId` it gave each,
//! as the server API answers with a number, not an id).
//!
//! Not checked: `typing` (best effort by design); whether a `join_room` answered `ok` after
//! its user's removal (nothing reaches the socket after the removal, which (e) checks); and
//! what the run does not inject: Redis Cluster slot migrations (a known limit of live
//! delivery), failovers with `INGEST_MIN_REPLICAS=0` (they may lose acknowledged messages
//! by design).

use super::history::{Event, JoinOutcome, Outcome};
use serde::Serialize;
use std::collections::{BTreeMap, HashMap, HashSet};

/// A message as the store holds it at the end of the run.
#[derive(Debug, Clone, PartialEq)]
pub struct Stored {
    pub id: String,
    pub seq: u64,
    pub content: String,
}

/// What the checker is given besides the history.
pub struct World<'a> {
    pub events: &'a [Event],
    /// Each room's stored messages.
    pub stored: &'a HashMap<usize, Vec<Stored>>,
    /// Each client's rooms.
    pub rooms_of: &'a [Vec<usize>],
}

#[derive(Debug, Clone, Serialize)]
pub struct Violation {
    pub what: String,
    /// The event of the history it was found at, when there is one.
    pub event: Option<usize>,
    pub client: Option<usize>,
    pub room: Option<usize>,
}

#[derive(Debug, Clone, Serialize)]
pub struct CheckResult {
    pub name: &'static str,
    pub promise: &'static str,
    /// How many things were checked (messages, deliveries, connections…).
    pub checked: u64,
    pub violations: Vec<Violation>,
}

impl CheckResult {
    fn new(name: &'static str, promise: &'static str) -> Self {
        Self {
            name,
            promise,
            checked: 0,
            violations: Vec::new(),
        }
    }

    fn violation(
        &mut self,
        what: String,
        event: Option<usize>,
        client: Option<usize>,
        room: Option<usize>,
    ) {
        self.violations.push(Violation {
            what,
            event,
            client,
            room,
        });
    }
}

/// Runs every check.
pub fn check(world: &World) -> Vec<CheckResult> {
    vec![
        stored_once(world),
        numbered(world),
        per_connection(world),
        per_client(world),
        removals(world),
        only_stored(world),
    ]
}

/// (a) every acknowledged message is stored exactly once; nothing stored that nobody sent.
fn stored_once(world: &World) -> CheckResult {
    let mut result = CheckResult::new(
        "a",
        "every acknowledged message is stored exactly once, by id",
    );
    let mut by_id: HashMap<&str, (usize, u64)> = HashMap::new();
    let mut by_content: HashMap<&str, Vec<(usize, u64)>> = HashMap::new();
    for (room, messages) in world.stored {
        for m in messages {
            if let Some((r, seq)) = by_id.insert(&m.id, (*room, m.seq)) {
                result.violation(
                    format!(
                        "message {} is stored twice (room {r} seq {seq}, room {room} seq {})",
                        m.id, m.seq
                    ),
                    None,
                    None,
                    Some(*room),
                );
            }
            by_content
                .entry(&m.content)
                .or_default()
                .push((*room, m.seq));
        }
    }
    let mut sent: HashSet<&str> = HashSet::new();
    for (index, event) in world.events.iter().enumerate() {
        let Event::Send {
            client,
            room,
            content,
            outcome,
            ..
        } = event
        else {
            continue;
        };
        sent.insert(content);
        if let Outcome::Acked { id } = outcome {
            result.checked += 1;
            match by_id.get(id.as_str()) {
                None => result.violation(
                    format!("acknowledged message {id} ({content:?}) is not stored"),
                    Some(index),
                    Some(*client),
                    Some(*room),
                ),
                Some((r, _)) if r != room => result.violation(
                    format!("acknowledged message {id} is stored in room {r}"),
                    Some(index),
                    Some(*client),
                    Some(*room),
                ),
                Some(_) => {}
            }
        }
    }
    for (content, places) in &by_content {
        if places.len() > 1 {
            result.violation(
                format!(
                    "one message ({content:?}) is stored {} times: {places:?}",
                    places.len()
                ),
                None,
                None,
                Some(places[0].0),
            );
        }
        if !sent.contains(content) {
            result.violation(
                format!("stored message {content:?} was never sent"),
                None,
                None,
                Some(places[0].0),
            );
        }
    }
    result
}

/// (b) each room's numbers are 1..N, one message each; each client's acknowledged messages
/// in the order acknowledged.
fn numbered(world: &World) -> CheckResult {
    let mut result = CheckResult::new(
        "b",
        "each room's stored seqs are 1..N with one message each, and a client's acknowledged messages keep the order they were acknowledged in",
    );
    let mut seq_of: HashMap<&str, u64> = HashMap::new();
    for (room, messages) in world.stored {
        let mut seqs: Vec<u64> = messages.iter().map(|m| m.seq).collect();
        seqs.sort_unstable();
        result.checked += seqs.len() as u64;
        for (expected, seq) in (1..).zip(&seqs) {
            if *seq != expected {
                result.violation(
                    format!(
                        "room {room}: stored seq {seq} where {expected} was due (seqs {}..)",
                        seqs[0]
                    ),
                    None,
                    None,
                    Some(*room),
                );
                break;
            }
        }
        for m in messages {
            seq_of.insert(&m.id, m.seq);
        }
    }
    // Acknowledged sends of each client and room: when, their stored number, the event, the id.
    type Acked<'a> = Vec<(f64, u64, usize, &'a str)>;
    let mut acked: BTreeMap<(usize, usize), Acked> = BTreeMap::new();
    for (index, event) in world.events.iter().enumerate() {
        if let Event::Send {
            client,
            room,
            at,
            outcome: Outcome::Acked { id },
            ..
        } = event
            && let Some(seq) = seq_of.get(id.as_str())
        {
            acked
                .entry((*client, *room))
                .or_default()
                .push((*at, *seq, index, id));
        }
    }
    for ((client, room), mut sends) in acked {
        sends.sort_by(|a, b| a.0.total_cmp(&b.0));
        for pair in sends.windows(2) {
            if pair[1].1 <= pair[0].1 {
                result.violation(
                    format!(
                        "message {} (seq {}) was acknowledged after {} (seq {}) but is numbered before it",
                        pair[1].3, pair[1].1, pair[0].3, pair[0].1
                    ),
                    Some(pair[1].2),
                    Some(client),
                    Some(room),
                );
            }
        }
    }
    result
}

/// Where a connection stands in one room.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Segment {
    /// Not in the room: nothing may arrive.
    Out,
    /// In the room; the next message must be numbered this.
    Expect(u64),
    /// In the room after a replay that did not reach the end (`hasMore`): the live messages
    /// go on from wherever the room is.
    Free,
}

/// (c) during each connection, each room's messages rise by exactly one.
fn per_connection(world: &World) -> CheckResult {
    let mut result = CheckResult::new(
        "c",
        "during each connection, each room's messages arrive with seqs rising by exactly one and no id twice, unless a resync came first",
    );
    let mut segments: HashMap<(u64, usize), Segment> = HashMap::new();
    let mut seen: HashMap<(u64, usize), HashSet<&str>> = HashMap::new();
    for (index, event) in world.events.iter().enumerate() {
        match event {
            Event::JoinSent {
                conn,
                room,
                after_seq,
                ..
            } => {
                let start = after_seq.map_or(Segment::Free, |a| Segment::Expect(a + 1));
                segments.insert((*conn, *room), start);
            }
            Event::Joined {
                conn,
                room,
                outcome,
                ..
            } => match outcome {
                JoinOutcome::Ok { has_more: true, .. } => {
                    segments.insert((*conn, *room), Segment::Free);
                }
                JoinOutcome::Ok { .. } => {}
                JoinOutcome::Refused { .. } | JoinOutcome::TimedOut => {
                    segments.insert((*conn, *room), Segment::Out);
                }
            },
            Event::Resync { conn, room, .. } => {
                segments.insert((*conn, *room), Segment::Out);
            }
            Event::Message {
                client,
                conn,
                room,
                id,
                seq,
                ..
            } if *conn != 0 => {
                result.checked += 1;
                let key = (*conn, *room);
                let state = segments.get(&key).copied().unwrap_or(Segment::Out);
                let fault = match state {
                    Segment::Out => {
                        Some("arrived while the connection was not in the room".to_owned())
                    }
                    Segment::Expect(n) if *seq != n => {
                        Some(format!("seq {seq} arrived where {n} was due"))
                    }
                    _ => None,
                };
                if let Some(fault) = fault {
                    result.violation(
                        format!("connection {conn}: message {id} (seq {seq}) {fault}"),
                        Some(index),
                        Some(*client),
                        Some(*room),
                    );
                }
                if !seen.entry(key).or_default().insert(id) {
                    result.violation(
                        format!("connection {conn}: message {id} (seq {seq}) arrived twice"),
                        Some(index),
                        Some(*client),
                        Some(*room),
                    );
                }
                if state != Segment::Out {
                    segments.insert(key, Segment::Expect(seq + 1));
                }
            }
            _ => {}
        }
    }
    result
}

/// (d) each client received each of its rooms' stored messages exactly once.
fn per_client(world: &World) -> CheckResult {
    let mut result = CheckResult::new(
        "d",
        "over all of a client's connections, replays and history pages, it received each room's stored messages exactly once",
    );
    let mut received: HashMap<(usize, usize), BTreeMap<u64, usize>> = HashMap::new();
    for (index, event) in world.events.iter().enumerate() {
        if let Event::Message {
            client, room, seq, ..
        } = event
        {
            let got = received.entry((*client, *room)).or_default();
            if let Some(first) = got.insert(*seq, index) {
                result.violation(
                    format!("seq {seq} received twice (first at event {first})"),
                    Some(index),
                    Some(*client),
                    Some(*room),
                );
            }
        }
    }
    for (client, rooms) in world.rooms_of.iter().enumerate() {
        for room in rooms {
            let latest = world
                .stored
                .get(room)
                .map_or(0, |m| m.iter().map(|m| m.seq).max().unwrap_or(0));
            let got = received.remove(&(client, *room)).unwrap_or_default();
            result.checked += latest;
            let missing: Vec<u64> = (1..=latest).filter(|s| !got.contains_key(s)).collect();
            if let Some(first) = missing.first() {
                result.violation(
                    format!(
                        "{} of {latest} stored messages never reached the client, from seq {first} ({:?}…)",
                        missing.len(),
                        &missing[..missing.len().min(10)]
                    ),
                    None,
                    Some(client),
                    Some(*room),
                );
            }
        }
    }
    result
}

/// (e) no message sent after an acknowledged removal reaches the removed user before they
/// are added again.
fn removals(world: &World) -> CheckResult {
    let mut result = CheckResult::new(
        "e",
        "no live delivery reaches a member between the acknowledged removal that took them out and their re-adding",
    );
    // When each message was first sent, by content; and each stored id's content.
    let mut first_sent: HashMap<&str, f64> = HashMap::new();
    for event in world.events {
        if let Event::Send {
            content, started, ..
        } = event
        {
            let t = first_sent.entry(content).or_insert(*started);
            *t = t.min(*started);
        }
    }
    let content_of: HashMap<&str, &str> = world
        .stored
        .values()
        .flatten()
        .map(|m| (m.id.as_str(), m.content.as_str()))
        .collect();
    // Each acknowledged removal, until the acknowledged adding that followed it.
    let mut windows: Vec<(usize, usize, f64, f64)> = Vec::new();
    for (index, event) in world.events.iter().enumerate() {
        if let Event::Removed {
            user,
            room,
            at,
            ok: true,
            ..
        } = event
        {
            let back = world.events[index..]
                .iter()
                .find_map(|e| match e {
                    Event::Added {
                        user: u,
                        room: r,
                        at,
                        ok: true,
                        ..
                    } if u == user && r == room => Some(*at),
                    _ => None,
                })
                .unwrap_or(f64::INFINITY);
            windows.push((*user, *room, *at, back));
        }
    }
    // Counted: the removals, and below the deliveries that fell into one.
    result.checked = windows.len() as u64;
    for (index, event) in world.events.iter().enumerate() {
        let Event::Message {
            client,
            room,
            id,
            seq,
            at,
            ..
        } = event
        else {
            continue;
        };
        for (user, r, removed, back) in &windows {
            if user != client || r != room || *at <= *removed || *at > *back {
                continue;
            }
            result.checked += 1;
            let sent = content_of
                .get(id.as_str())
                .and_then(|c| first_sent.get(c))
                .copied()
                .unwrap_or(0.0);
            if sent > *removed {
                result.violation(
                    format!(
                        "message {id} (seq {seq}), sent at {sent:.3} s, reached the user at {at:.3} s, removed at {removed:.3} s and not added back before {back:.3} s"
                    ),
                    Some(index),
                    Some(*client),
                    Some(*room),
                );
            }
        }
    }
    result
}

/// (f) nothing received is missing from the store, or stored under another number.
fn only_stored(world: &World) -> CheckResult {
    let mut result = CheckResult::new(
        "f",
        "nothing is delivered that is not stored, and every delivery carries its stored seq",
    );
    let by_room: HashMap<usize, HashMap<u64, &str>> = world
        .stored
        .iter()
        .map(|(room, ms)| (*room, ms.iter().map(|m| (m.seq, m.id.as_str())).collect()))
        .collect();
    for (index, event) in world.events.iter().enumerate() {
        let Event::Message {
            client,
            room,
            id,
            seq,
            ..
        } = event
        else {
            continue;
        };
        result.checked += 1;
        match by_room.get(room).and_then(|r| r.get(seq)) {
            Some(stored) if *stored == id => {}
            Some(stored) => result.violation(
                format!("message {id} arrived as seq {seq}, which the store gives to {stored}"),
                Some(index),
                Some(*client),
                Some(*room),
            ),
            None => result.violation(
                format!("message {id} arrived as seq {seq}, which the store does not hold"),
                Some(index),
                Some(*client),
                Some(*room),
            ),
        }
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stored(room: usize, ids: &[&str]) -> HashMap<usize, Vec<Stored>> {
        let messages = ids
            .iter()
            .enumerate()
            .map(|(i, id)| Stored {
                id: (*id).to_owned(),
                seq: i as u64 + 1,
                content: format!("c-{id}"),
            })
            .collect();
        HashMap::from([(room, messages)])
    }

    fn send(client: usize, id: &str, started: f64, at: f64) -> Event {
        Event::Send {
            client,
            room: 0,
            content: format!("c-{id}"),
            keyed: false,
            attempt: 1,
            conn: 1,
            started,
            at,
            outcome: Outcome::Acked { id: id.to_owned() },
        }
    }

    fn join(client: usize, conn: u64, after_seq: u64) -> Event {
        Event::JoinSent {
            client,
            conn,
            room: 0,
            after_seq: Some(after_seq),
            at: 0.0,
        }
    }

    fn message(client: usize, conn: u64, id: &str, seq: u64, at: f64) -> Event {
        Event::Message {
            client,
            conn,
            room: 0,
            id: id.to_owned(),
            seq,
            at,
        }
    }

    fn failed(results: &[CheckResult]) -> Vec<&'static str> {
        results
            .iter()
            .filter(|r| !r.violations.is_empty())
            .map(|r| r.name)
            .collect()
    }

    fn run(events: &[Event], stored: &HashMap<usize, Vec<Stored>>) -> Vec<&'static str> {
        let rooms_of = vec![vec![0]; 2];
        failed(&check(&World {
            events,
            stored,
            rooms_of: &rooms_of,
        }))
    }

    #[test]
    fn a_clean_history_passes() {
        let store = stored(0, &["x", "y"]);
        let events = [
            join(0, 1, 0),
            join(1, 2, 0),
            send(0, "x", 1.0, 1.1),
            message(0, 1, "x", 1, 1.2),
            message(1, 2, "x", 1, 1.2),
            send(0, "y", 2.0, 2.1),
            message(0, 1, "y", 2, 2.2),
            Event::Closed {
                client: 1,
                conn: 2,
                at: 2.3,
            },
            join(1, 3, 1),
            message(1, 3, "y", 2, 2.4),
        ];
        assert_eq!(run(&events, &store), Vec::<&str>::new());
    }

    #[test]
    fn each_kind_of_violation_is_found() {
        // The duplicate of a send run twice: one message delivered under two numbers, the
        // second of which the store does not give it.
        let one = stored(0, &["x"]);
        let twice = [
            join(0, 1, 0),
            join(1, 2, 0),
            send(0, "x", 1.0, 1.1),
            message(0, 1, "x", 1, 1.2),
            message(0, 1, "x", 2, 1.3),
            message(1, 2, "x", 1, 1.2),
        ];
        assert_eq!(run(&twice, &one), ["c", "f"]);
        let store = stored(0, &["x", "y"]);
        // An acknowledged message lost.
        let lost = [send(0, "z", 1.0, 1.1)];
        assert!(run(&lost, &store).contains(&"a"));
        // A gap on one connection, filled on the next.
        let gap = [
            send(0, "x", 0.1, 0.2),
            send(0, "y", 0.3, 0.4),
            join(0, 1, 0),
            join(1, 2, 0),
            message(0, 1, "y", 2, 1.0),
            join(0, 3, 0),
            message(0, 3, "x", 1, 2.0),
            message(1, 2, "x", 1, 1.0),
            message(1, 2, "y", 2, 1.0),
        ];
        assert_eq!(run(&gap, &store), ["c"]);
        // Acknowledged y before x, but numbered after it.
        let reordered = [send(0, "y", 1.0, 1.1), send(0, "x", 2.0, 2.1)];
        assert!(run(&reordered, &store).contains(&"b"));
        // A hole in the stored numbers.
        let mut holed = stored(0, &["x", "y"]);
        holed.get_mut(&0).unwrap()[1].seq = 3;
        assert!(run(&[], &holed).contains(&"b"));
        // A message sent after an acknowledged removal reaches the removed user.
        let removed = [
            join(1, 2, 0),
            Event::Removed {
                user: 1,
                room: 0,
                started: 0.9,
                at: 1.0,
                ok: true,
            },
            send(0, "x", 1.5, 1.6),
            message(1, 2, "x", 1, 1.7),
        ];
        assert!(run(&removed, &store).contains(&"e"));
        // Sent before the removal: in flight, allowed.
        let in_flight = [
            join(1, 2, 0),
            send(0, "x", 0.5, 0.6),
            Event::Removed {
                user: 1,
                room: 0,
                started: 0.9,
                at: 1.0,
                ok: true,
            },
            message(1, 2, "x", 1, 1.01),
        ];
        assert!(!run(&in_flight, &store).contains(&"e"));
        // After a resync, nothing until the next join.
        let after_resync = [
            join(1, 2, 0),
            Event::Resync {
                client: 1,
                conn: 2,
                room: 0,
                after_seq: 0,
                at: 1.0,
            },
            message(1, 2, "x", 1, 1.1),
        ];
        assert!(run(&after_resync, &store).contains(&"c"));
    }
}
