//! Event payloads, parsed from whatever JSON the client sent into domain types.

use crate::error::ChatError;
use serde_json::Value;
use shared::ObjectId;
use shared::domain::{ClientMsgId, MessageContent, parse_object_id};

/// What the client sent as the event's first argument, or why it could not be read.
pub type Payload = Result<Value, String>;

/// The payload of an event, as socketioxide extracted it.
pub fn read<E: std::fmt::Display>(data: Result<Value, E>) -> Payload {
    data.map_err(|e| e.to_string())
}

fn object(payload: Payload) -> Result<serde_json::Map<String, Value>, ChatError> {
    match payload {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(ChatError::BadRequest("payload must be an object".into())),
        // No argument at all.
        Err(error) if error.starts_with("first element not found") => {
            Err(ChatError::BadRequest("payload must be an object".into()))
        }
        // JSON that could not be read (a lone surrogate, say).
        Err(error) => Err(ChatError::BadRequest(format!(
            "payload is not valid JSON: {}",
            crate::error::serde_detail(&error)
        ))),
    }
}

fn string_field(
    map: &mut serde_json::Map<String, Value>,
    field: &str,
) -> Result<String, ChatError> {
    match map.remove(field) {
        Some(Value::String(s)) => Ok(s),
        None | Some(Value::Null) => Err(ChatError::BadRequest(format!("{field} is required"))),
        Some(_) => Err(ChatError::BadRequest(format!("{field} must be a string"))),
    }
}

/// `{ roomId }` of `join_room`, `leave_room` and `typing`.
pub fn room_id(payload: Payload) -> Result<ObjectId, ChatError> {
    let mut map = object(payload)?;
    Ok(parse_object_id(
        "roomId",
        &string_field(&mut map, "roomId")?,
    )?)
}

/// `{ roomId, afterSeq? }` of `join_room`.
pub struct JoinRoom {
    pub room_id: ObjectId,
    /// Replay the room's messages after this `seq` before the live ones.
    pub after_seq: Option<u64>,
}

pub fn join_room(payload: Payload) -> Result<JoinRoom, ChatError> {
    let mut map = object(payload)?;
    let room_id = parse_object_id("roomId", &string_field(&mut map, "roomId")?)?;
    let after_seq = match map.remove("afterSeq") {
        None | Some(Value::Null) => None,
        Some(Value::Number(n)) if n.as_u64().is_some() => n.as_u64(),
        Some(_) => {
            return Err(ChatError::BadRequest(
                "afterSeq must be a non-negative integer".into(),
            ));
        }
    };
    Ok(JoinRoom { room_id, after_seq })
}

/// `{ roomId, content, clientMsgId? }` of `send_message`.
pub struct SendMessage {
    pub room_id: ObjectId,
    pub content: MessageContent,
    pub client_msg_id: Option<ClientMsgId>,
}

pub fn send_message(payload: Payload) -> Result<SendMessage, ChatError> {
    let mut map = object(payload)?;
    let room_id = parse_object_id("roomId", &string_field(&mut map, "roomId")?)?;
    let content = MessageContent::parse(string_field(&mut map, "content")?)?;
    let client_msg_id = client_msg_id(map.remove("clientMsgId"))?;
    Ok(SendMessage {
        room_id,
        content,
        client_msg_id,
    })
}

/// The optional `clientMsgId` of a message (socket event or REST body).
pub fn client_msg_id(raw: Option<Value>) -> Result<Option<ClientMsgId>, ChatError> {
    match raw {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(ClientMsgId::parse(s)?)),
        Some(_) => Err(ChatError::BadRequest("clientMsgId must be a string".into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn err(r: Result<impl Sized, ChatError>) -> String {
        match r {
            Ok(_) => panic!("expected an error"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn refusals_say_why() {
        let room = "0123456789abcdef01234567";
        assert_eq!(
            err(room_id(Err("first element not found".into()))),
            "payload must be an object"
        );
        assert_eq!(err(room_id(Ok(json!("x")))), "payload must be an object");
        assert_eq!(err(room_id(Ok(json!([room])))), "payload must be an object");
        assert_eq!(err(room_id(Ok(json!({})))), "roomId is required");
        assert_eq!(
            err(room_id(Ok(json!({"roomId": 5})))),
            "roomId must be a string"
        );
        assert_eq!(
            err(room_id(Ok(json!({"roomId": "x"})))),
            "roomId must be a 24-character hex ObjectId"
        );
        assert!(room_id(Ok(json!({"roomId": room}))).is_ok());
        for bad in [json!(-1), json!(1.5), json!("3"), json!(true)] {
            assert_eq!(
                err(join_room(Ok(json!({"roomId": room, "afterSeq": bad})))),
                "afterSeq must be a non-negative integer"
            );
        }
        let join = join_room(Ok(json!({"roomId": room, "afterSeq": 7}))).unwrap();
        assert_eq!(join.after_seq, Some(7));
        assert_eq!(
            err(send_message(Ok(json!({"roomId": room})))),
            "content is required"
        );
        assert_eq!(
            err(send_message(Ok(json!({"roomId": room, "content": ""})))),
            "content must not be empty"
        );
        assert_eq!(
            err(send_message(Ok(json!({"roomId": room, "content": 1})))),
            "content must be a string"
        );
    }
}
