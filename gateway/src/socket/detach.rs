//! Copies a Socket.IO request's URI and headers out of the connection's read buffer.
//!
//! hyper parses a request in place: the URI and every header value are slices (`Bytes`) of
//! the connection's HTTP/1 read buffer, which keeps the whole buffer (about 16 KB) alive as
//! long as one slice is. engineioxide keeps the request's parts for the socket's whole life
//! (`Socket::req_parts`), and axum's `OriginalUri` extension holds one more clone of the
//! URI, so every connection kept its read buffer after the WebSocket upgrade. Fresh copies
//! of the few hundred bytes those parts hold let the buffer go; heaptrack and the idle
//! benchmark figures are in docs/BENCHMARKS.md.

use axum::extract::{OriginalUri, Request};
use axum::http::{HeaderMap, HeaderValue, Uri};

/// `axum::middleware::map_request` function, in front of the Socket.IO layer.
pub async fn detach_request(request: Request) -> Request {
    // Other requests are left as they are: they end with their response, and their buffer
    // with them.
    if !crate::address::is_engine_io(request.uri().path()) {
        return request;
    }
    let (mut parts, body) = request.into_parts();
    parts.uri = copy_uri(&parts.uri);
    parts.headers = copy_headers(&parts.headers);
    if let Some(OriginalUri(uri)) = parts.extensions.get::<OriginalUri>() {
        let copy = copy_uri(uri);
        parts.extensions.insert(OriginalUri(copy));
    }
    Request::from_parts(parts, body)
}

fn copy_uri(uri: &Uri) -> Uri {
    // From a `String`, so the new URI owns its bytes. It parsed once; should it not parse
    // again, the original is kept (correct, only not detached).
    Uri::try_from(uri.to_string()).unwrap_or_else(|_| uri.clone())
}

fn copy_headers(headers: &HeaderMap) -> HeaderMap {
    let mut copy = HeaderMap::with_capacity(headers.len());
    for (name, value) in headers {
        // `from_bytes` copies into a new allocation; the name is either static (standard
        // headers) or already its own allocation.
        let fresh = HeaderValue::from_bytes(value.as_bytes()).unwrap_or_else(|_| value.clone());
        copy.append(name.clone(), fresh);
    }
    copy
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;

    #[tokio::test]
    async fn copies_keep_every_header_and_the_uri() {
        let request = Request::builder()
            .uri("/socket.io/?EIO=4&transport=websocket")
            .header("x-forwarded-for", "10.0.0.1")
            .header("x-forwarded-for", "10.0.0.2")
            .header("sec-websocket-key", "abc")
            .extension(OriginalUri(
                "/socket.io/?EIO=4&transport=websocket".parse().unwrap(),
            ))
            .body(Body::empty())
            .unwrap();
        let copied = detach_request(request).await;
        assert_eq!(copied.uri(), "/socket.io/?EIO=4&transport=websocket");
        let forwarded: Vec<_> = copied.headers().get_all("x-forwarded-for").iter().collect();
        assert_eq!(forwarded, ["10.0.0.1", "10.0.0.2"]);
        assert_eq!(copied.headers()["sec-websocket-key"], "abc");
        let OriginalUri(original) = copied.extensions().get::<OriginalUri>().unwrap();
        assert_eq!(original, "/socket.io/?EIO=4&transport=websocket");
    }
}
