//! Event payloads, parsed from whatever JSON the client sent into domain types.

use crate::error::ChatError;
use serde_json::Value;
use shared::ObjectId;
use shared::domain::{ClientMsgId, MessageContent, parse_object_id};

fn object(payload: Option<Value>) -> Result<serde_json::Map<String, Value>, ChatError> {
    match payload {
        Some(Value::Object(map)) => Ok(map),
        _ => Err(ChatError::BadRequest("payload must be an object".into())),
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
pub fn room_id(payload: Option<Value>) -> Result<ObjectId, ChatError> {
    let mut map = object(payload)?;
    Ok(parse_object_id(
        "roomId",
        &string_field(&mut map, "roomId")?,
    )?)
}

/// `{ roomId, content, clientMsgId? }` of `send_message`.
pub struct SendMessage {
    pub room_id: ObjectId,
    pub content: MessageContent,
    pub client_msg_id: Option<ClientMsgId>,
}

pub fn send_message(payload: Option<Value>) -> Result<SendMessage, ChatError> {
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
        assert_eq!(err(room_id(None)), "payload must be an object");
        assert_eq!(err(room_id(Some(json!("x")))), "payload must be an object");
        assert_eq!(
            err(room_id(Some(json!([room])))),
            "payload must be an object"
        );
        assert_eq!(err(room_id(Some(json!({})))), "roomId is required");
        assert_eq!(
            err(room_id(Some(json!({"roomId": 5})))),
            "roomId must be a string"
        );
        assert_eq!(
            err(room_id(Some(json!({"roomId": "x"})))),
            "roomId must be a 24-character hex ObjectId"
        );
        assert!(room_id(Some(json!({"roomId": room}))).is_ok());
        assert_eq!(
            err(send_message(Some(json!({"roomId": room})))),
            "content is required"
        );
        assert_eq!(
            err(send_message(Some(json!({"roomId": room, "content": ""})))),
            "content must not be empty"
        );
        assert_eq!(
            err(send_message(Some(json!({"roomId": room, "content": 1})))),
            "content must be a string"
        );
    }
}
