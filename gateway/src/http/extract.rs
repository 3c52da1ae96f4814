//! Request extractors whose rejections use the API's error shape.

use crate::error::ChatError;
use crate::http::HttpState;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use serde::de::DeserializeOwned;
use shared::jwt::{AuthUser, TokenError, bearer};

/// The user of a valid `Authorization: Bearer` token; 401 otherwise.
pub struct Authenticated(pub AuthUser);

impl FromRequestParts<HttpState> for Authenticated {
    type Rejection = ChatError;

    async fn from_request_parts(parts: &mut Parts, state: &HttpState) -> Result<Self, ChatError> {
        let header = parts
            .headers
            .get("authorization")
            .map(|v| v.to_str().unwrap_or(""));
        let result = match header {
            None => Err(TokenError::Missing),
            Some(h) => bearer(Some(h))
                .ok_or(TokenError::Invalid)
                .and_then(|t| state.chat.jwt.verify(t)),
        };
        result.map(Authenticated).map_err(|e| {
            metrics::counter!("chat_gateway_auth_failures_total", "reason" => e.reason())
                .increment(1);
            e.into()
        })
    }
}

/// A JSON body; 400 with a message saying what is wrong otherwise.
pub struct JsonBody<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for JsonBody<T> {
    type Rejection = ChatError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ChatError> {
        match axum::Json::<T>::from_request(req, state).await {
            Ok(axum::Json(value)) => Ok(JsonBody(value)),
            Err(rejection) => Err(ChatError::BadRequest(rejection.body_text())),
        }
    }
}
