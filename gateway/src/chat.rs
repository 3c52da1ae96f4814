//! The operations both surfaces (REST and Socket.IO) share: room authorisation, posting a
//! message, typing. Handlers parse their input, call these, and map the [`ChatError`].

use crate::error::ChatError;
use shared::ObjectId;
use shared::backplane::{Appended, Backplane, BackplaneError};
use shared::domain::{ClientMsgId, MessageContent};
use shared::jwt::{AuthUser, JwtKeys};
use shared::store::{Room, Store};
use shared::wire::{ChatMessage, RoomEvent, Sender, UserTyping, now_millis};
use std::sync::Arc;

/// What every handler needs. Cheap to clone.
#[derive(Clone)]
pub struct Chat {
    pub store: Arc<dyn Store>,
    pub backplane: Arc<dyn Backplane>,
    pub jwt: JwtKeys,
    /// Participants cached for the socket events' checks.
    pub members: Arc<crate::membership::MembershipCache>,
    /// User records, looked up in batches (connects, REST requests, sockets' re-checks).
    pub users: Arc<crate::user_lookup::UserLookup>,
    /// Who is online in which room.
    pub presence: Arc<crate::presence::PresenceTracker>,
}

impl Chat {
    /// The room, if `user` is one of its participants.
    pub async fn room_for(&self, user: &ObjectId, room: ObjectId) -> Result<Room, ChatError> {
        let room = self
            .store
            .room(room)
            .await?
            .ok_or_else(|| ChatError::NotFound("room not found".into()))?;
        if !room.has_participant(user) {
            return Err(ChatError::Forbidden(
                "you are not a participant of this room".into(),
            ));
        }
        Ok(room)
    }

    /// The ids (hex) of the users online in `room`; the caller checked that the asking user is
    /// a participant.
    pub async fn online(&self, room: ObjectId) -> Result<Vec<String>, ChatError> {
        let mut online: Vec<String> = self
            .presence
            .online(room)
            .await?
            .into_iter()
            .map(ObjectId::to_hex)
            .collect();
        online.sort_unstable();
        Ok(online)
    }

    /// `Ok` when `user` is a participant of `room`, from the membership cache: for checks
    /// that need no more of the room (joining, sending and typing on a socket). Answers the
    /// room's count of removals the check is as new as.
    pub async fn check_member(&self, user: &ObjectId, room: ObjectId) -> Result<u64, ChatError> {
        self.members.check(user, room).await
    }

    /// Accepts a message: assigns its id and time and appends it to the ingest stream.
    /// A retry with the same `client_msg_id` returns the first message's id and time and
    /// appends nothing; the same `client_msg_id` with other content is refused (`Conflict`).
    /// The caller has checked that `user` is a participant of `room`.
    pub async fn post_message(
        &self,
        user: &AuthUser,
        room: ObjectId,
        content: MessageContent,
        client_msg_id: Option<&ClientMsgId>,
    ) -> Result<ChatMessage, ChatError> {
        let message = ChatMessage {
            id: ObjectId::new(),
            room_id: room,
            sender: Sender {
                id: user.id,
                email: user.email.clone(),
                display_name: user.display_name.clone(),
            },
            content: content.into_inner(),
            created_at: now_millis(),
            seq: None,
            server_event: None,
        };
        // Scoped per sender and room: the same client id in another room is another message.
        let key =
            client_msg_id.map(|c| format!("{}:{}:{}", user.id.to_hex(), room.to_hex(), c.as_str()));
        self.append(
            message,
            key,
            "clientMsgId was already used for a message with other content",
        )
        .await
    }

    /// Accepts a server event (a [`ChatMessage::server`] item) into its room's sequence. A
    /// retry with the same `idempotency_key` in the room returns the first one's number and
    /// appends nothing; the same key with another event or data is refused (`Conflict`).
    pub async fn post_server_event(
        &self,
        item: ChatMessage,
        idempotency_key: Option<&str>,
    ) -> Result<ChatMessage, ChatError> {
        // `server` is no user id (those are hex): no client key can take the same place.
        let key = idempotency_key.map(|k| format!("server:{}:{k}", item.room_id.to_hex()));
        self.append(
            item,
            key,
            "idempotencyKey was already used for another event or data",
        )
        .await
    }

    /// Appends an item to its room's ingest partition and gives it its number (or, for a
    /// retry under a known idempotency key, the first one's id, time and number).
    async fn append(
        &self,
        mut message: ChatMessage,
        key: Option<String>,
        conflict: &str,
    ) -> Result<ChatMessage, ChatError> {
        let started = std::time::Instant::now();
        let appended = match self.backplane.append(&message, key.as_deref()).await {
            // The room's counter is not in Redis (its first message there, or Redis lost its
            // data): continue from the highest number stored, then append again.
            Err(BackplaneError::SeqUnknown(room)) => {
                let latest = self.store.latest_seq(room).await?;
                self.backplane.seed_seq(room, latest).await?;
                self.backplane.append(&message, key.as_deref()).await?
            }
            other => other?,
        };
        match appended {
            Appended::New { seq } => message.seq = Some(seq),
            Appended::Duplicate {
                same_content: false,
                ..
            } => {
                return Err(ChatError::Conflict(conflict.into()));
            }
            Appended::Duplicate {
                id,
                created_at,
                seq,
                ..
            } => {
                metrics::counter!("chat_gateway_duplicate_sends_total").increment(1);
                message.id = id;
                message.created_at = created_at;
                message.seq = Some(seq);
            }
        }
        metrics::histogram!("chat_gateway_ingest_append_seconds")
            .record(started.elapsed().as_secs_f64());
        Ok(message)
    }

    /// Tells the room's other members that `user` is typing. At most once.
    pub async fn typing(&self, user: &AuthUser, room: ObjectId) -> Result<(), ChatError> {
        let started = std::time::Instant::now();
        self.backplane
            .publish(&[RoomEvent::Typing(UserTyping {
                user_id: user.id,
                room_id: room,
            })])
            .await?;
        metrics::histogram!("chat_gateway_backplane_publish_seconds")
            .record(started.elapsed().as_secs_f64());
        Ok(())
    }
}
