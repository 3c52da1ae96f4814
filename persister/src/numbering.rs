//! Keeping each room's stored numbers 1, 2, 3… with one message each.
//!
//! A message's number comes from its room's counter in Redis when it is appended, so it
//! normally follows the last number stored. Before a batch is stored, its worker tells apart
//! the two cases where it does not:
//!
//! * **a redelivery**: the message is stored already (the partition's earlier holder died
//!   before acknowledging it). It is published again, not stored again.
//! * **a taken number**: the store holds another message under it, because Redis's counter
//!   fell behind the store (a failover to a replica that missed the last writes, or an
//!   append-only file that lost its last second). Nothing of that room is stored from there:
//!   its entries from that one on are numbered again in Redis ([`Ingest::renumber`]), in
//!   their order, after the store's latest, and come back later in the stream.
//!
//! The worker holds its partition's lease, so it is the only writer of its rooms' numbers:
//! it remembers the last number it stored in each room and asks the store only when a batch
//! does not follow on from it. The store's unique index on `(roomId, seq)` catches whatever
//! slips past (a paused earlier holder storing late): [`StoreError::SeqTaken`] makes the
//! worker forget what it remembered and plan the batch again from the store.
//!
//! [`Ingest::renumber`]: shared::backplane::Ingest::renumber
//! [`StoreError::SeqTaken`]: shared::store::StoreError::SeqTaken

use shared::ObjectId;
use shared::backplane::stream_seq;
use shared::store::{SequencedMessage, Store, StoreError};
use shared::wire::ChatMessage;
use std::collections::{HashMap, HashSet, VecDeque};

/// Rooms whose last stored number a worker remembers at most; past it, it forgets them all
/// and asks the store again as batches come.
const REMEMBERED_ROOMS: usize = 100_000;
/// Renumberings whose moved entries a worker still filters out (they are rare; the oldest
/// is long behind the read position when a newer one pushes it out).
const REMEMBERED_MOVES: usize = 64;

/// An entry of a batch: its stream id and its message with the number it was given.
#[derive(Debug, Clone)]
pub(crate) struct Numbered {
    pub entry: String,
    pub message: SequencedMessage,
}

/// What to do with a batch.
#[derive(Debug, Default)]
pub(crate) struct Plan {
    /// Messages to store, in stream order.
    pub store: Vec<SequencedMessage>,
    /// Messages to publish once stored (the new ones and the redelivered ones), in order.
    pub publish: Vec<ChatMessage>,
    /// Rooms whose numbers are taken, with the entry from which they must be renumbered.
    pub taken: Vec<(ObjectId, String)>,
}

/// A worker's knowledge of its rooms' numbers.
#[derive(Default)]
pub(crate) struct Numbering {
    /// The last number stored in each room, as far as this worker knows.
    last: HashMap<ObjectId, u64>,
    /// Entries moved by a renumbering, `(room, first, last)` by stream position: a copy read
    /// before the move is not stored.
    moved: VecDeque<(ObjectId, i64, i64)>,
}

impl Numbering {
    /// Whether the entry was moved away by a renumbering (it comes back under a new id).
    pub fn is_moved(&self, room: &ObjectId, entry: &str) -> bool {
        let at = stream_seq(entry).unwrap_or(i64::MIN);
        self.moved
            .iter()
            .any(|(r, first, last)| r == room && (*first..=*last).contains(&at))
    }

    /// Plans a batch: which messages are new, which are stored already, and which rooms
    /// have taken numbers. Asks the store only about rooms whose batch does not follow on
    /// from the last number this worker stored.
    pub async fn plan(&self, store: &dyn Store, batch: &[Numbered]) -> Result<Plan, StoreError> {
        // Each room's first and last number in the batch, in order of first appearance.
        let mut rooms: Vec<(ObjectId, u64, u64)> = Vec::new();
        for n in batch {
            let seq = number(&n.message);
            match rooms
                .iter_mut()
                .find(|(r, ..)| *r == n.message.message.room_id)
            {
                Some((_, first, last)) => {
                    *first = (*first).min(seq);
                    *last = (*last).max(seq);
                }
                None => rooms.push((n.message.message.room_id, seq, seq)),
            }
        }
        let (known, ask): (Vec<_>, Vec<_>) = rooms.into_iter().partition(|(room, first, _)| {
            self.last.get(room).is_some_and(|last| last + 1 == *first)
        });
        let known: HashSet<ObjectId> = known.into_iter().map(|(room, ..)| room).collect();
        // The ids too, wherever they are stored: a message may be stored under another number
        // than its entry says (moved by a migration of the store).
        let ids: Vec<ObjectId> = batch
            .iter()
            .map(|n| &n.message.message)
            .filter(|m| !known.contains(&m.room_id))
            .map(|m| m.id)
            .collect();
        let stored = store.stored_in(&ask, &ids).await?;
        let by_id: HashMap<ObjectId, u64> = stored.iter().map(|s| (s.id, s.seq)).collect();
        let by_seq: HashSet<(ObjectId, u64)> = stored.iter().map(|s| (s.room, s.seq)).collect();

        let mut plan = Plan::default();
        let mut stopped: HashSet<ObjectId> = HashSet::new();
        for n in batch {
            let (m, seq) = (&n.message.message, number(&n.message));
            if stopped.contains(&m.room_id) {
                continue;
            }
            if !known.contains(&m.room_id) {
                match by_id.get(&m.id) {
                    // Stored already: published again, under the number it is stored with
                    // (gateways drop a number they delivered), not stored again.
                    Some(stored) => {
                        plan.publish.push(with_number(m, *stored));
                        continue;
                    }
                    None if by_seq.contains(&(m.room_id, seq)) => {
                        stopped.insert(m.room_id);
                        plan.taken.push((m.room_id, n.entry.clone()));
                        continue;
                    }
                    None => {}
                }
            }
            plan.store.push(n.message.clone());
            plan.publish.push(with_number(m, seq));
        }
        Ok(plan)
    }

    /// Records messages as stored (or found stored).
    pub fn stored(&mut self, messages: &[ChatMessage]) {
        if self.last.len() > REMEMBERED_ROOMS {
            self.last.clear();
        }
        for m in messages {
            let Some(seq) = m.seq else { continue };
            let last = self.last.entry(m.room_id).or_insert(seq);
            *last = (*last).max(seq);
        }
    }

    /// Records a renumbering of `room` from the entry `first` to `last`: the store's latest
    /// number in the room is `store_latest`, and the moved copies come later.
    pub fn renumbered(&mut self, room: ObjectId, first: &str, last: &str, store_latest: u64) {
        if self.moved.len() >= REMEMBERED_MOVES {
            self.moved.pop_front();
        }
        let at = |id: &str| stream_seq(id).unwrap_or(i64::MAX);
        self.moved.push_back((room, at(first), at(last)));
        self.last.insert(room, store_latest);
    }

    /// Forgets what was remembered of every room: the store is asked again.
    pub fn forget(&mut self) {
        self.last.clear();
    }
}

fn number(m: &SequencedMessage) -> u64 {
    u64::try_from(m.seq).unwrap_or(0)
}

fn with_number(m: &ChatMessage, seq: u64) -> ChatMessage {
    ChatMessage {
        seq: Some(seq),
        ..m.clone()
    }
}
