//! The browser chat page at `/`: plain HTML, CSS and JavaScript compiled into the binary,
//! with a small Socket.IO client of its own (no build step, nothing fetched at run time).

use axum::Router;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;

const INDEX: &str = include_str!("../../web/index.html");
const SCRIPT: &str = include_str!("../../web/app.js");
const STYLE: &str = include_str!("../../web/app.css");

pub fn router() -> Router {
    Router::new()
        .route("/", get(|| page("text/html; charset=utf-8", INDEX)))
        .route(
            "/app.js",
            get(|| page("text/javascript; charset=utf-8", SCRIPT)),
        )
        .route("/app.css", get(|| page("text/css; charset=utf-8", STYLE)))
}

async fn page(content_type: &'static str, body: &'static str) -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
}
