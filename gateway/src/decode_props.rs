//! Property tests: arbitrary JSON thrown at every event and REST body decoder never
//! panics and always ends in a value or a typed error a client can be shown.

use crate::error::ChatError;
use crate::http::auth::{LoginBody, RegisterBody};
use crate::http::rooms::{AddParticipantBody, CreateRoomBody, PostMessageBody};
use crate::socket::payload;
use proptest::prelude::*;
use serde_json::{Map, Value};
use shared::ObjectId;

/// Field names the decoders look for, mixed with random ones.
const FIELDS: &[&str] = &[
    "roomId",
    "content",
    "clientMsgId",
    "email",
    "password",
    "displayName",
    "name",
    "participantIds",
    "userId",
    "token",
];

fn any_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<f64>()
            .prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
        ".{0,40}".prop_map(Value::String),
        "[0-9a-fA-F]{24}".prop_map(Value::String),
        (0usize..12_000).prop_map(|n| Value::String("é".repeat(n))),
    ];
    leaf.prop_recursive(4, 64, 8, |inner| {
        let key = prop_oneof![
            prop::sample::select(FIELDS).prop_map(str::to_owned),
            ".{0,8}"
        ];
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::vec((key, inner), 0..8)
                .prop_map(|kv| Value::Object(kv.into_iter().collect::<Map<_, _>>())),
        ]
    })
}

/// A decoder's error is one of the kinds a bad input may produce, with a message.
fn typed(error: ChatError) {
    assert!(
        matches!(error, ChatError::BadRequest(_)),
        "unexpected error kind: {error:?}"
    );
    assert!(!error.to_string().is_empty());
}

fn decode<T: serde::de::DeserializeOwned>(v: &Value) -> Option<T> {
    serde_json::from_value(v.clone()).ok()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2_000, ..ProptestConfig::default() })]

    #[test]
    fn event_payloads(v in any_json()) {
        if let Err(e) = payload::room_id(Ok(v.clone())) { typed(e) }
        if let Err(e) = payload::send_message(Ok(v.clone())) { typed(e) }
        if let Err(e) = payload::client_msg_id(Some(v.clone())) { typed(e) }
    }

    #[test]
    fn rest_bodies(v in any_json()) {
        if let Some(body) = decode::<RegisterBody>(&v) && let Err(e) = body.validate() { typed(e) }
        let _ = decode::<LoginBody>(&v);
        if let Some(body) = decode::<CreateRoomBody>(&v) && let Err(e) = body.validate(ObjectId::new(), 1000) { typed(e) }
        if let Some(body) = decode::<AddParticipantBody>(&v) {
            let _ = shared::domain::parse_object_id("userId", body.user_id());
        }
        if let Some(body) = decode::<PostMessageBody>(&v) && let Err(e) = body.validate() { typed(e) }
    }

    #[test]
    fn tokens(s in ".{0,300}") {
        let keys = shared::jwt::JwtKeys::new(b"secret", 60);
        prop_assert!(keys.verify(&s).is_err());
        prop_assert!(shared::jwt::bearer(Some(&s)).is_none_or(|t| t.len() <= s.len()));
    }
}
