//! Keeps, of a Socket.IO request, only what a socket needs after its handshake, in memory
//! of its own.
//!
//! Engine.IO keeps the parts of the request that opened a session for the session's whole
//! life (`Socket::req_parts`). hyper parses a request in place: the URI and every header
//! value are slices (`Bytes`) of the connection's HTTP/1 read buffer, which keeps the whole
//! buffer (about 16 KB) alive as long as one slice is, and a browser's handshake carries a
//! dozen headers (cookies, user agent, languages) that nothing reads after it. So the URI is
//! copied, only the headers read later are kept (copied too), and so are only the
//! extensions needed later (the upgrade, the per-address slot): axum's `OriginalUri` holds
//! one more clone of the URI, and `ConnectInfo` and `MatchedPath` are not read after the
//! per-address check. heaptrack and the idle benchmark figures are in docs/BENCHMARKS.md.

use axum::extract::Request;
use axum::http::{Extensions, HeaderMap, HeaderName, HeaderValue, Uri, header};

/// The headers read after this middleware: `authorization` by each namespace's handshake
/// (`socket::handshake_token`), `sec-websocket-key` by the WebSocket upgrade and
/// `content-type` by a polling request's body. The per-address check reads the forwarding
/// headers before (it runs first).
const KEPT: [HeaderName; 3] = [
    header::AUTHORIZATION,
    header::SEC_WEBSOCKET_KEY,
    header::CONTENT_TYPE,
];

/// `axum::middleware::map_request` function, in front of the Socket.IO layer.
pub async fn detach_request(request: Request) -> Request {
    // Other requests are left as they are: they end with their response, and their buffer
    // with them.
    if !crate::address::is_engine_io(request.uri().path()) {
        return request;
    }
    let (mut parts, body) = request.into_parts();
    parts.uri = copy_uri(&parts.uri);
    parts.headers = kept_headers(&parts.headers);
    let mut extensions = Extensions::new();
    if let Some(upgrade) = parts.extensions.remove::<hyper::upgrade::OnUpgrade>() {
        extensions.insert(upgrade);
    }
    super::per_address::move_slot(&mut parts.extensions, &mut extensions);
    parts.extensions = extensions;
    Request::from_parts(parts, body)
}

fn copy_uri(uri: &Uri) -> Uri {
    // From a `String`, so the new URI owns its bytes. It parsed once; should it not parse
    // again, the original is kept (correct, only not detached).
    Uri::try_from(uri.to_string()).unwrap_or_else(|_| uri.clone())
}

fn kept_headers(headers: &HeaderMap) -> HeaderMap {
    // Sized to what is kept: a map grows to room for 8 headers at its first insert.
    let count = KEPT
        .iter()
        .map(|name| headers.get_all(name).iter().count())
        .sum();
    let mut kept = HeaderMap::with_capacity(count);
    for name in &KEPT {
        for value in headers.get_all(name) {
            // `from_bytes` copies into a new allocation; the names are static.
            let fresh = HeaderValue::from_bytes(value.as_bytes()).unwrap_or_else(|_| value.clone());
            kept.append(name.clone(), fresh);
        }
    }
    kept
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use axum::extract::OriginalUri;

    #[tokio::test]
    async fn keeps_the_uri_and_the_headers_read_later() {
        let request = Request::builder()
            .uri("/socket.io/?EIO=4&transport=websocket")
            .header("x-forwarded-for", "10.0.0.1")
            .header("cookie", "a=b")
            .header("authorization", "Bearer t")
            .header("sec-websocket-key", "abc")
            .header("content-type", "text/plain")
            .extension(OriginalUri(
                "/socket.io/?EIO=4&transport=websocket".parse().unwrap(),
            ))
            .body(Body::empty())
            .unwrap();
        let copied = detach_request(request).await;
        assert_eq!(copied.uri(), "/socket.io/?EIO=4&transport=websocket");
        assert_eq!(copied.headers().len(), 3);
        assert_eq!(copied.headers()["authorization"], "Bearer t");
        assert_eq!(copied.headers()["sec-websocket-key"], "abc");
        assert_eq!(copied.headers()["content-type"], "text/plain");
        assert!(copied.extensions().get::<OriginalUri>().is_none());
    }

    #[tokio::test]
    async fn other_requests_are_left_as_they_are() {
        let request = Request::builder()
            .uri("/chat/rooms")
            .header("cookie", "a=b")
            .body(Body::empty())
            .unwrap();
        assert_eq!(detach_request(request).await.headers()["cookie"], "a=b");
    }
}
