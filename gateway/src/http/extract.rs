//! Request extractors whose rejections use the API's error shape.

use crate::error::{ChatError, serde_detail};
use crate::http::HttpState;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use serde::de::DeserializeOwned;
use shared::jwt::{AuthUser, TokenError, bearer};

/// The user of a valid `Authorization: Bearer` token whose user still exists; 401 otherwise.
/// When the store does not answer, the token alone is trusted (as sockets trust it): reads
/// fail with 503 then anyway.
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
        let user = result.map_err(|e| {
            metrics::counter!("chat_gateway_auth_failures_total", "reason" => e.reason())
                .increment(1);
            ChatError::from(e)
        })?;
        if state.chat.users.deleted(user.id).await {
            metrics::counter!("chat_gateway_auth_failures_total", "reason" => "unknown_user")
                .increment(1);
            return Err(ChatError::Unauthorized("user no longer exists".into()));
        }
        Ok(Authenticated(user))
    }
}

/// A JSON body; 400 with a message saying what is wrong otherwise.
pub struct JsonBody<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for JsonBody<T> {
    type Rejection = ChatError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ChatError> {
        use axum::extract::rejection::JsonRejection;
        match axum::Json::<T>::from_request(req, state).await {
            Ok(axum::Json(value)) => Ok(JsonBody(value)),
            Err(JsonRejection::MissingJsonContentType(_)) => Err(ChatError::BadRequest(
                "Content-Type must be application/json".into(),
            )),
            Err(JsonRejection::JsonSyntaxError(e)) => Err(ChatError::BadRequest(format!(
                "body is not valid JSON: {}",
                serde_detail(&e.body_text())
            ))),
            Err(JsonRejection::JsonDataError(e)) => {
                Err(ChatError::BadRequest(serde_detail(&e.body_text())))
            }
            Err(rejection) if rejection.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE => {
                Err(ChatError::TooLarge(
                    "request body too large for this route".into(),
                ))
            }
            Err(rejection) if caused_by_timeout(&rejection) => Err(ChatError::TooSlow(
                "the request body did not arrive in time".into(),
            )),
            Err(rejection) => Err(ChatError::BadRequest(rejection.body_text())),
        }
    }
}

/// Whether reading the body stopped at `HTTP_BODY_TIMEOUT_SECS` (see `crate::serve`).
fn caused_by_timeout(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause = Some(error);
    while let Some(error) = cause {
        if error.is::<crate::serve::BodyTooSlow>() {
            return true;
        }
        cause = error.source();
    }
    false
}

/// Query parameters; 400 in the API's error shape otherwise (a repeated parameter, say).
pub struct QueryParams<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for QueryParams<T> {
    type Rejection = ChatError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ChatError> {
        match axum::extract::Query::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Query(value)) => Ok(QueryParams(value)),
            Err(rejection) => Err(ChatError::BadRequest(format!(
                "invalid query string: {}",
                serde_detail(&rejection.body_text())
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::error::serde_detail;

    #[test]
    fn no_internal_names_or_positions() {
        assert_eq!(
            serde_detail(
                "Failed to deserialize the JSON body into the target type: invalid type: string \"x\", expected struct RegisterBody at line 1 column 3"
            ),
            "invalid type: string \"x\", expected an object"
        );
        assert_eq!(
            serde_detail(
                "Failed to deserialize the JSON body into the target type: missing field `email` at line 1 column 2"
            ),
            "missing field `email`"
        );
        assert_eq!(
            serde_detail("Failed to deserialize query string: duplicate field `email`"),
            "duplicate field `email`"
        );
    }
}
