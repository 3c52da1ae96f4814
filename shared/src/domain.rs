//! Input types parsed once at the edge ("parse, don't validate").

use mongodb::bson::oid::ObjectId;
use std::fmt;

/// Longest message content, in Unicode code points.
pub const MAX_CONTENT_CHARS: usize = 10_000;

/// Why a raw input was refused. The text is safe to show to the client.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidInput(pub String);

/// Parses a 24-hex-digit MongoDB ObjectId, naming the field in the error.
pub fn parse_object_id(field: &str, raw: &str) -> Result<ObjectId, InvalidInput> {
    if raw.len() != 24 || !raw.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(InvalidInput(format!(
            "{field} must be a 24-character hex ObjectId"
        )));
    }
    ObjectId::parse_str(raw)
        .map_err(|_| InvalidInput(format!("{field} must be a 24-character hex ObjectId")))
}

/// Characters that change how text around them is shown without being seen themselves:
/// bidirectional overrides and isolates (an "RTL override" makes `gnp.exe` read `exe.png`).
fn is_bidi_control(c: char) -> bool {
    matches!(c, '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}' | '\u{200E}' | '\u{200F}' | '\u{061C}')
}

/// Characters that take no room on screen: a text of only these (and spaces) looks empty,
/// and an address holding one looks like another (`adm\u{AD}in@…` shows as `admin@…`).
/// Zero-width and joining marks, the soft hyphen, fillers that render as blanks (Hangul and
/// half-width fillers, the blank Braille pattern), invisible operators and deprecated
/// format characters, variation selectors and tag characters.
fn is_invisible(c: char) -> bool {
    c.is_whitespace()
        || matches!(
            c,
            '\u{00AD}'
                | '\u{034F}'
                | '\u{115F}'
                | '\u{1160}'
                | '\u{17B4}'
                | '\u{17B5}'
                | '\u{180B}'..='\u{180F}'
                | '\u{200B}'..='\u{200D}'
                | '\u{2060}'..='\u{2064}'
                | '\u{206A}'..='\u{206F}'
                | '\u{2800}'
                | '\u{3164}'
                | '\u{FE00}'..='\u{FE0F}'
                | '\u{FEFF}'
                | '\u{FFA0}'
                | '\u{E0000}'..='\u{E007F}'
                | '\u{E0100}'..='\u{E01EF}'
        )
        || is_bidi_control(c)
}

/// Direction overrides and isolates: text after them shows reversed or moved, so a message
/// can show what it does not say. The plain marks (LRM, RLM, ALM) change nothing by themselves
/// and stay allowed in messages.
fn is_direction_override(c: char) -> bool {
    matches!(c, '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}')
}

/// Control characters (C0, DEL, C1: NUL, the escape that starts terminal sequences…).
/// Message text may still hold line breaks and tabs.
fn is_control_in_text(c: char) -> bool {
    c.is_control() && !matches!(c, '\n' | '\r' | '\t')
}

/// Message text of 1 to [`MAX_CONTENT_CHARS`] Unicode code points, with something visible
/// in it and no control characters but line breaks and tabs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageContent(String);

impl MessageContent {
    pub fn parse(raw: String) -> Result<Self, InvalidInput> {
        if raw.is_empty() {
            return Err(InvalidInput("content must not be empty".into()));
        }
        if raw.chars().all(is_invisible) {
            return Err(InvalidInput("content must not be blank".into()));
        }
        if raw.chars().any(is_control_in_text) {
            return Err(InvalidInput(
                "content must not contain control characters".into(),
            ));
        }
        if raw.chars().any(is_direction_override) {
            return Err(InvalidInput(
                "content must not contain text-direction overrides".into(),
            ));
        }
        // Counting code points (not bytes, not UTF-16 units) matches the contract.
        if raw.chars().count() > MAX_CONTENT_CHARS {
            return Err(InvalidInput(format!(
                "content must be at most {MAX_CONTENT_CHARS} characters"
            )));
        }
        Ok(Self(raw))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn into_inner(self) -> String {
        self.0
    }
}

impl fmt::Display for MessageContent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Longest `clientMsgId`, in characters.
pub const MAX_CLIENT_MSG_ID_CHARS: usize = 64;

/// A client's idempotency key for `send_message`: 1 to 64 characters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientMsgId(String);

impl ClientMsgId {
    pub fn parse(raw: String) -> Result<Self, InvalidInput> {
        let n = raw.chars().count();
        if n == 0 || n > MAX_CLIENT_MSG_ID_CHARS {
            return Err(InvalidInput(format!(
                "clientMsgId must be 1 to {MAX_CLIENT_MSG_ID_CHARS} characters"
            )));
        }
        Ok(Self(raw))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A normalised e-mail address: trimmed, lower-cased, of the form `local@domain`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Email(String);

impl Email {
    pub fn parse(raw: &str) -> Result<Self, InvalidInput> {
        let email = raw.trim().to_lowercase();
        let invalid = || InvalidInput("email must be a valid email address".into());
        // No spaces, controls, invisible or direction-changing characters, and none of the
        // characters that only quoted forms allow (`<a>`, `"…"`, comments).
        let forbidden = |c: char| is_invisible(c) || c.is_control() || "<>()[]\\,;:\"".contains(c);
        if email.len() > 254 || email.chars().any(forbidden) {
            return Err(invalid());
        }
        let (local, domain) = email.split_once('@').ok_or_else(invalid)?;
        if local.is_empty()
            || domain.is_empty()
            || domain.contains('@')
            || !domain.contains('.')
            || domain.starts_with('.')
            || domain.ends_with('.')
        {
            return Err(invalid());
        }
        Ok(Self(email))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The part before `@`, used as the default display name.
    pub fn local_part(&self) -> &str {
        self.0.split('@').next().unwrap_or_default()
    }

    /// A short fingerprint of the address, for the names of counters: bounded in length and
    /// not the address itself.
    pub fn fingerprint(&self) -> String {
        fingerprint(&self.0)
    }
}

/// The first 16 hex digits of a text's SHA-256: bounded, stable across processes and
/// releases, and enough to tell texts apart where that is all that is asked.
pub fn fingerprint(text: &str) -> String {
    sha256(text)[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A text's SHA-256.
pub fn sha256(text: &str) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(text.as_bytes()).into()
}

/// Shortest accepted password, in characters.
pub const MIN_PASSWORD_CHARS: usize = 8;
/// Longest accepted password; bounds the hashing work an attacker can ask for.
pub const MAX_PASSWORD_CHARS: usize = 1024;

/// Validates a new password's length.
pub fn check_new_password(raw: &str) -> Result<(), InvalidInput> {
    let n = raw.chars().count();
    if n < MIN_PASSWORD_CHARS {
        return Err(InvalidInput(format!(
            "password must be at least {MIN_PASSWORD_CHARS} characters"
        )));
    }
    if n > MAX_PASSWORD_CHARS {
        return Err(InvalidInput(format!(
            "password must be at most {MAX_PASSWORD_CHARS} characters"
        )));
    }
    Ok(())
}

/// Longest display name or room name, in characters.
pub const MAX_NAME_CHARS: usize = 100;

/// Trims a display or room name and checks it: something visible, no control or
/// direction-changing characters (they would forge what other users see), and its length.
pub fn parse_name(field: &str, raw: &str) -> Result<String, InvalidInput> {
    let name = raw.trim();
    if name.is_empty() || name.chars().all(is_invisible) {
        return Err(InvalidInput(format!("{field} must not be empty")));
    }
    if name.chars().any(|c| c.is_control() || is_bidi_control(c)) {
        return Err(InvalidInput(format!(
            "{field} must not contain control or text-direction characters"
        )));
    }
    if name.chars().count() > MAX_NAME_CHARS {
        return Err(InvalidInput(format!(
            "{field} must be at most {MAX_NAME_CHARS} characters"
        )));
    }
    Ok(name.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn object_ids() {
        assert!(parse_object_id("roomId", "0123456789abcdef01234567").is_ok());
        assert!(parse_object_id("roomId", "0123456789ABCDEF01234567").is_ok());
        for bad in [
            "",
            "123",
            "0123456789abcdef0123456g",
            "0123456789abcdef012345678",
        ] {
            let err = parse_object_id("roomId", bad).unwrap_err();
            assert_eq!(err.0, "roomId must be a 24-character hex ObjectId");
        }
    }

    #[test]
    fn content_counts_code_points() {
        assert!(MessageContent::parse(String::new()).is_err());
        assert!(MessageContent::parse("é".repeat(MAX_CONTENT_CHARS)).is_ok());
        assert!(MessageContent::parse("😀".repeat(MAX_CONTENT_CHARS)).is_ok());
        assert!(MessageContent::parse("a".repeat(MAX_CONTENT_CHARS + 1)).is_err());
        // Line breaks and tabs are text; blanks, NUL and terminal escapes are not.
        assert!(MessageContent::parse("line 1\nline 2\tend".into()).is_ok());
        for bad in [
            " ",
            " \n\t ",
            "\u{200B}\u{200B}",
            "a\0b",
            "\u{1b}[31mred",
            "\u{3164}",
            "\u{2800}\u{2800}",
            "\u{AD}",
            "\u{FFA0} \u{115F}",
            "see \u{202E}gnp.exe",
            "\u{2066}x",
        ] {
            assert!(MessageContent::parse(bad.into()).is_err(), "{bad:?}");
        }
        // The plain marks are text.
        assert!(MessageContent::parse("שלום \u{200F}ok".into()).is_ok());
    }

    #[test]
    fn names() {
        assert_eq!(parse_name("name", "  Ann Lee ").unwrap(), "Ann Lee");
        assert!(parse_name("name", "Zoë 🙂").is_ok());
        for bad in [
            "",
            "   ",
            "\u{200B}\u{200D}",
            "a\0b",
            "\u{1b}[2Jx",
            "evil\u{202E}gnp.exe",
            "tab\tname",
            "\u{3164}",
            "\u{2800}",
            "\u{AD}\u{AD}",
        ] {
            assert!(parse_name("name", bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn emails() {
        assert_eq!(
            Email::parse(" Ann@Example.COM ").unwrap().as_str(),
            "ann@example.com"
        );
        for bad in [
            "",
            "ann",
            "ann@",
            "@x.y",
            "a@b",
            "a b@c.d",
            "a@b@c.d",
            "a@.b",
            "a\0b@c.d",
            "a\u{202E}b@c.d",
            "<a>@c.d",
            "\"a\"@c.d",
            "adm\u{AD}in@c.d",
            "a\u{3164}@c.d",
            "a\u{2800}b@c.d",
        ] {
            assert!(Email::parse(bad).is_err(), "{bad}");
        }
    }
}
