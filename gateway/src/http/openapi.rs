//! The REST API's OpenAPI 3.1 description, generated from the handlers' own types and
//! their `#[utoipa::path]` annotations, served at `GET /openapi.json`.

use axum::http::header;
use serde::Serialize;
use std::sync::Arc;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi, ToSchema};

/// Every error: the NestJS shape.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ApiError {
    /// The HTTP status, again.
    pub status_code: u16,
    /// The status's reason phrase (`Bad Request`).
    pub error: String,
    /// What went wrong, safe to show.
    pub message: String,
}

/// `POST /auth/register` and `/auth/login`.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Session {
    /// HS256 JWT for `Authorization: Bearer` and the Socket.IO handshake's `auth.token`.
    pub access_token: String,
    pub user: shared::store::User,
}

/// `GET /chat/rooms/:id/presence`.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Online {
    #[schema(pattern = "^[0-9a-f]{24}$")]
    pub room_id: String,
    /// Ids of the participants with a socket in the room, sorted.
    pub online: Vec<String>,
}

/// A server event as the catch-up listing shows it ([`shared::wire::ChatMessage::listed`]).
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ServerEventItem {
    #[schema(pattern = "^[0-9a-f]{24}$")]
    pub id: String,
    #[schema(pattern = "^[0-9a-f]{24}$")]
    pub room_id: String,
    #[schema(minimum = 1)]
    pub seq: u64,
    #[schema(format = DateTime)]
    pub created_at: String,
    /// One of `SERVER_EVENTS`.
    pub event: String,
    pub data: serde_json::Map<String, serde_json::Value>,
}

/// An item of a room's sequence: a chat message, or (in the catch-up listing only) a
/// server event. Only describes what `Listed` writes: never built.
#[allow(dead_code)]
#[derive(Serialize, ToSchema)]
#[serde(untagged)]
pub enum SequenceItem {
    Message(shared::wire::ChatMessage),
    Event(ServerEventItem),
}

/// `202` of the server API.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Accepted {
    #[schema(pattern = "^[0-9a-f]{24}$")]
    pub room_id: String,
    /// The number the event took in the room's sequence.
    #[schema(minimum = 1)]
    pub seq: u64,
}

/// The two bearer schemes: a user's access token, a backend's server API key.
struct Security;

impl Modify for Security {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "accessToken",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("JWT")
                    .description(Some("From POST /auth/register or /auth/login."))
                    .build(),
            ),
        );
        components.add_security_scheme(
            "serverApiKey",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some("SERVER_API_KEY, for backend services."))
                    .build(),
            ),
        );
    }
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Chat gateway REST API",
        description = "Accounts, rooms and history beside the Socket.IO namespace /chat \
                       (docs/asyncapi.yaml). Every error has the shape of ApiError. Every \
                       route may answer 503 while the gateway shuts down, and every route \
                       with a body 408 when it arrives too slowly and 413 when it is too large."
    ),
    paths(
        super::auth::register,
        super::auth::login,
        super::auth::me,
        super::rooms::create,
        super::rooms::list,
        super::rooms::get,
        super::rooms::add_participant,
        super::rooms::remove_participant,
        super::rooms::messages,
        super::rooms::post_message,
        super::rooms::presence,
        super::users::find,
        super::users::get,
        super::server_api::post_event,
    ),
    modifiers(&Security),
    tags(
        (name = "auth", description = "Accounts and tokens"),
        (name = "rooms", description = "Rooms, participants, history"),
        (name = "users", description = "Finding people"),
        (name = "server", description = "The server API for backend services (SERVER_API_KEY)"),
    )
)]
pub struct ApiDoc;

/// The document of a gateway whose server API accepts `server_events`, or is off (`None`):
/// then the route and its key are left out, as the gateway answers 404 there.
pub fn document(server_events: Option<&[String]>) -> String {
    let mut doc = serde_json::to_value(ApiDoc::openapi()).unwrap_or_default();
    match server_events {
        Some(events) => {
            doc["components"]["schemas"]["PostEventBody"]["properties"]["event"]["enum"] =
                serde_json::json!(events);
        }
        None => {
            if let Some(paths) = doc["paths"].as_object_mut() {
                paths.remove("/server/rooms/{id}/events");
            }
            if let Some(schemes) = doc["components"]["securitySchemes"].as_object_mut() {
                schemes.remove("serverApiKey");
            }
            if let Some(tags) = doc["tags"].as_array_mut() {
                tags.retain(|t| t["name"] != "server");
            }
        }
    }
    doc.to_string()
}

/// `GET /openapi.json`: `document`, written once at start-up.
pub fn serve(document: String) -> axum::routing::MethodRouter<super::HttpState> {
    let document: Arc<str> = document.into();
    axum::routing::get(move || {
        let document = document.clone();
        async move {
            (
                [(header::CONTENT_TYPE, "application/json")],
                document.to_string(),
            )
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_document_is_openapi_3_1_with_every_route() {
        let events = vec!["file_uploaded".to_owned()];
        let doc: serde_json::Value = serde_json::from_str(&document(Some(&events))).unwrap();
        let event = &doc["components"]["schemas"]["PostEventBody"]["properties"]["event"];
        assert_eq!(
            event["enum"],
            serde_json::json!(["file_uploaded"]),
            "{event}"
        );
        assert!(doc["openapi"].as_str().unwrap().starts_with("3.1"), "{doc}");
        let paths: Vec<&str> = doc["paths"]
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        for path in [
            "/auth/register",
            "/auth/login",
            "/auth/me",
            "/chat/rooms",
            "/chat/rooms/{id}",
            "/chat/rooms/{id}/participants",
            "/chat/rooms/{id}/participants/{user_id}",
            "/chat/rooms/{id}/messages",
            "/chat/rooms/{id}/presence",
            "/users",
            "/users/{id}",
            "/server/rooms/{id}/events",
        ] {
            assert!(paths.contains(&path), "{path} missing from {paths:?}");
        }
    }

    #[test]
    fn without_a_server_api_key_the_route_is_not_described() {
        let doc: serde_json::Value = serde_json::from_str(&document(None)).unwrap();
        assert!(doc["paths"]["/server/rooms/{id}/events"].is_null());
        assert!(doc["paths"]["/auth/me"].is_object());
    }
}
