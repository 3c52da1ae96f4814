//! HS256 access tokens.
//!
//! Only HS256 is accepted (tokens with `alg: none` or any other algorithm are refused),
//! `exp` is required and checked with no leeway; a token is refused before its `nbf`, and
//! when its `iat` lies in the future (more than [`IAT_SKEW_SECS`] ahead, for the clocks of
//! different pods).

use chrono::Utc;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation, errors::ErrorKind};
use mongodb::bson::oid::ObjectId;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::sync::Arc;

/// The claims of an access token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Claims {
    /// The user id (24-hex).
    pub sub: String,
    #[serde(default)]
    pub email: Option<String>,
    #[serde(default)]
    pub display_name: Option<String>,
    pub iat: i64,
    pub exp: i64,
    /// Not valid before (seconds since the epoch). Tokens issued here have none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iss: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aud: Option<String>,
}

/// Why a token was refused. The `Display` text is what clients see.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("missing token")]
    Missing,
    #[error("invalid token")]
    Invalid,
    #[error("token expired")]
    Expired,
}

impl TokenError {
    /// A bounded label for metrics.
    pub fn reason(self) -> &'static str {
        match self {
            TokenError::Missing => "missing",
            TokenError::Invalid => "invalid",
            TokenError::Expired => "expired",
        }
    }
}

/// A user identified by a valid token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthUser {
    pub id: ObjectId,
    pub email: Option<String>,
    pub display_name: Option<String>,
    /// Expiry, in seconds since the epoch.
    pub exp: i64,
}

/// How far in the future a token's `iat` may be: the clocks of the pod that issued it and
/// the one that checks it may differ by this much.
pub const IAT_SKEW_SECS: i64 = 30;

/// Signs and verifies access tokens with one shared secret.
///
/// Cheap to clone (one reference count): the socket events' and the HTTP handlers' states
/// hold it and are cloned for every event and request, and the keys and their `Validation`
/// own several heap allocations each.
#[derive(Clone)]
pub struct JwtKeys(Arc<Keys>);

struct Keys {
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
    ttl_secs: i64,
    issuer: Option<String>,
    audience: Option<String>,
}

impl fmt::Debug for JwtKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JwtKeys")
            .field("secret", &"<redacted>")
            .field("ttl_secs", &self.0.ttl_secs)
            .finish()
    }
}

impl JwtKeys {
    pub fn new(secret: &[u8], ttl_secs: i64) -> Self {
        Self::with_claims(secret, ttl_secs, None, None)
    }

    /// Keys that also put `iss` and/or `aud` in issued tokens and require them on every
    /// token they verify.
    pub fn with_claims(
        secret: &[u8],
        ttl_secs: i64,
        issuer: Option<String>,
        audience: Option<String>,
    ) -> Self {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = 0;
        validation.validate_exp = true;
        validation.validate_nbf = true;
        let mut required = vec!["exp", "sub"];
        if let Some(iss) = &issuer {
            validation.set_issuer(&[iss]);
            required.push("iss");
        }
        match &audience {
            Some(aud) => {
                validation.set_audience(&[aud]);
                required.push("aud");
            }
            None => validation.validate_aud = false,
        }
        validation.set_required_spec_claims(&required);
        Self(Arc::new(Keys {
            encoding: EncodingKey::from_secret(secret),
            decoding: DecodingKey::from_secret(secret),
            validation,
            ttl_secs,
            issuer,
            audience,
        }))
    }

    /// Issues a token for a user, valid for the configured lifetime.
    pub fn issue(
        &self,
        user_id: ObjectId,
        email: &str,
        display_name: &str,
    ) -> Result<String, jsonwebtoken::errors::Error> {
        let iat = Utc::now().timestamp();
        let claims = Claims {
            sub: user_id.to_hex(),
            email: Some(email.to_owned()),
            display_name: Some(display_name.to_owned()),
            iat,
            exp: iat + self.0.ttl_secs,
            nbf: None,
            iss: self.0.issuer.clone(),
            aud: self.0.audience.clone(),
        };
        self.sign(&claims)
    }

    /// Signs arbitrary claims (tests and tools use this to mint edge cases).
    pub fn sign(&self, claims: &Claims) -> Result<String, jsonwebtoken::errors::Error> {
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), claims, &self.0.encoding)
    }

    /// Verifies a token and returns its user.
    pub fn verify(&self, token: &str) -> Result<AuthUser, TokenError> {
        let token = token.trim();
        if token.is_empty() {
            return Err(TokenError::Missing);
        }
        let data = jsonwebtoken::decode::<Claims>(token, &self.0.decoding, &self.0.validation)
            .map_err(|e| match e.kind() {
                ErrorKind::ExpiredSignature => TokenError::Expired,
                _ => TokenError::Invalid,
            })?;
        if data.claims.iat > Utc::now().timestamp() + IAT_SKEW_SECS {
            return Err(TokenError::Invalid);
        }
        let id = ObjectId::parse_str(&data.claims.sub).map_err(|_| TokenError::Invalid)?;
        Ok(AuthUser {
            id,
            email: data.claims.email,
            display_name: data.claims.display_name,
            exp: data.claims.exp,
        })
    }
}

/// Extracts the token from an `Authorization: Bearer <token>` header value.
pub fn bearer(header: Option<&str>) -> Option<&str> {
    let value = header?.trim();
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys() -> JwtKeys {
        JwtKeys::new(b"test-secret", 60)
    }

    #[test]
    fn round_trip() {
        let id = ObjectId::new();
        let token = keys().issue(id, "a@b.c", "A").unwrap();
        let user = keys().verify(&token).unwrap();
        assert_eq!(user.id, id);
        assert_eq!(user.email.as_deref(), Some("a@b.c"));
    }

    #[test]
    fn refusals() {
        let id = ObjectId::new();
        assert_eq!(keys().verify(""), Err(TokenError::Missing));
        assert_eq!(keys().verify("garbage"), Err(TokenError::Invalid));
        let other = JwtKeys::new(b"other", 60).issue(id, "a@b.c", "A").unwrap();
        assert_eq!(keys().verify(&other), Err(TokenError::Invalid));
        let now = Utc::now().timestamp();
        let expired = keys()
            .sign(&Claims {
                sub: id.to_hex(),
                email: None,
                display_name: None,
                iat: now - 100,
                exp: now - 10,
                nbf: None,
                iss: None,
                aud: None,
            })
            .unwrap();
        assert_eq!(keys().verify(&expired), Err(TokenError::Expired));
        // Not valid yet (nbf an hour ahead), or issued in the future: refused now.
        let claims = |iat: i64, nbf: Option<i64>| Claims {
            sub: id.to_hex(),
            email: None,
            display_name: None,
            iat,
            exp: now + 7200,
            nbf,
            iss: None,
            aud: None,
        };
        let early = keys().sign(&claims(now, Some(now + 3600))).unwrap();
        assert_eq!(keys().verify(&early), Err(TokenError::Invalid));
        let future = keys().sign(&claims(now + 3600, None)).unwrap();
        assert_eq!(keys().verify(&future), Err(TokenError::Invalid));
        // Within the clock skew allowed between pods, and once nbf has passed: accepted.
        let skewed = keys().sign(&claims(now + 5, Some(now - 1))).unwrap();
        assert_eq!(keys().verify(&skewed).unwrap().id, id);
        // alg "none": header {"alg":"none","typ":"JWT"}, no signature.
        let none = format!(
            "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.{}.",
            expired.split('.').nth(1).unwrap()
        );
        assert_eq!(keys().verify(&none), Err(TokenError::Invalid));
    }

    #[test]
    fn issuer_and_audience_are_required_when_configured() {
        let id = ObjectId::new();
        let strict = JwtKeys::with_claims(b"s", 60, Some("chat".into()), Some("clients".into()));
        let token = strict.issue(id, "a@b.c", "A").unwrap();
        assert_eq!(strict.verify(&token).unwrap().id, id);
        // Same secret, no iss/aud: refused by the strict keys, accepted by lax ones.
        let plain = JwtKeys::new(b"s", 60).issue(id, "a@b.c", "A").unwrap();
        assert_eq!(strict.verify(&plain), Err(TokenError::Invalid));
        assert!(JwtKeys::new(b"s", 60).verify(&token).is_ok());
        let other_iss = JwtKeys::with_claims(b"s", 60, Some("evil".into()), Some("clients".into()));
        assert_eq!(
            strict.verify(&other_iss.issue(id, "a", "A").unwrap()),
            Err(TokenError::Invalid)
        );
        let other_aud = JwtKeys::with_claims(b"s", 60, Some("chat".into()), Some("others".into()));
        assert_eq!(
            strict.verify(&other_aud.issue(id, "a", "A").unwrap()),
            Err(TokenError::Invalid)
        );
    }

    #[test]
    fn bearer_header() {
        assert_eq!(bearer(Some("Bearer abc")), Some("abc"));
        assert_eq!(bearer(Some("bearer  abc ")), Some("abc"));
        assert_eq!(bearer(Some("Basic abc")), None);
        assert_eq!(bearer(None), None);
    }
}
