//! The embedded mode's own promises: one process with nothing else running, data kept on
//! disk across restarts, a generated secret, the mode chosen by the URLs, and the chat page.
//! (The contract tests in `socket.rs` and `rest.rs` also run against this mode with
//! `CHAT_TEST_MODE=embedded`.)

mod common;

use clap::Parser;
use common::sio::SioClient;
use serde_json::{Value, json};
use std::path::Path;

struct Running {
    port: u16,
    stop: tokio_util::sync::CancellationToken,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

async fn start(dir: &Path, extra: &[&str]) -> Running {
    let dir = dir.to_str().unwrap();
    let settings = gateway::Settings::try_parse_from(
        [
            "gateway",
            "--embedded",
            "--data-dir",
            dir,
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--metrics-port",
            "0",
            "--events-per-second",
            "1000000",
            "--event-burst",
            "1000000",
        ]
        .iter()
        .chain(extra),
    )
    .unwrap();
    let app = gateway::Application::build(settings)
        .await
        .expect("embedded gateway starts");
    let (port, admin, stop) = (app.port(), app.admin_port(), app.shutdown_token());
    let task = tokio::spawn(app.run_until_stopped());
    common::wait_ready(admin).await;
    Running { port, stop, task }
}

impl Running {
    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    async fn post(&self, path: &str, token: Option<&str>, body: Value) -> (u16, Value) {
        let mut req = reqwest::Client::new().post(self.url(path)).json(&body);
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        let resp = req.send().await.unwrap();
        (
            resp.status().as_u16(),
            resp.json().await.unwrap_or(Value::Null),
        )
    }

    async fn get(&self, path: &str, token: &str) -> (u16, Value) {
        let resp = reqwest::Client::new()
            .get(self.url(path))
            .bearer_auth(token)
            .send()
            .await
            .unwrap();
        (
            resp.status().as_u16(),
            resp.json().await.unwrap_or(Value::Null),
        )
    }

    async fn stop(self) {
        self.stop.cancel();
        self.task.await.unwrap().unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_and_the_generated_secret_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let first = start(dir.path(), &[]).await;
    let secret = std::fs::read_to_string(dir.path().join("jwt-secret")).unwrap();
    let (status, ann) = first
        .post(
            "/auth/register",
            None,
            json!({ "email": "ann@example.com", "password": "password123" }),
        )
        .await;
    assert_eq!(status, 201, "{ann}");
    let token = ann["accessToken"].as_str().unwrap().to_owned();
    let (_, bob) = first
        .post(
            "/auth/register",
            None,
            json!({ "email": "bob@example.com", "password": "password123", "displayName": "Bob" }),
        )
        .await;
    // Participants are found by e-mail.
    let (status, found) = first.get("/users?email=BOB@example.com", &token).await;
    assert_eq!(status, 200);
    assert_eq!(found, bob["user"]);
    let (status, _) = first.get("/users?email=nobody@example.com", &token).await;
    assert_eq!(status, 404);
    let bob_id = bob["user"]["_id"].as_str().unwrap();
    let (status, by_id) = first.get(&format!("/users/{bob_id}"), &token).await;
    assert_eq!((status, &by_id["displayName"]), (200, &json!("Bob")));
    let (_, room) = first
        .post(
            "/chat/rooms",
            Some(&token),
            json!({ "name": "kept", "participantIds": [bob_id] }),
        )
        .await;
    let room = room["_id"].as_str().unwrap().to_owned();
    let mut socket = SioClient::with_token(first.port, &token).await;
    socket.request("join_room", json!({ "roomId": room })).await;
    // Many messages at once, then an immediate shutdown: every acknowledged one is stored.
    for i in 0..100 {
        socket.emit(
            "send_message",
            json!({ "roomId": room, "content": format!("m{i}") }),
        );
    }
    let last = socket
        .request("send_message", json!({ "roomId": room, "content": "last" }))
        .await;
    assert_eq!(last["ok"], json!(true), "{last}");
    first.stop().await;

    let second = start(dir.path(), &[]).await;
    assert_eq!(
        std::fs::read_to_string(dir.path().join("jwt-secret")).unwrap(),
        secret
    );
    // The old token is still valid: same secret.
    let (status, history) = second
        .get(&format!("/chat/rooms/{room}/messages?limit=100"), &token)
        .await;
    assert_eq!(status, 200, "{history}");
    let history = history.as_array().unwrap();
    assert_eq!(history.len(), 100);
    assert_eq!(history[0]["content"], json!("last"));
    assert_eq!(history[0]["seq"], json!(101));
    assert_eq!(history[99]["content"], json!("m1"));
    // Numbering goes on from the stored messages after the restart.
    let (status, next) = second
        .post(
            &format!("/chat/rooms/{room}/messages"),
            Some(&token),
            json!({ "content": "after the restart" }),
        )
        .await;
    assert_eq!(status, 201, "{next}");
    assert_eq!(next["seq"], json!(102));
    let (status, _) = second
        .post(
            "/auth/login",
            None,
            json!({ "email": "ann@example.com", "password": "password123" }),
        )
        .await;
    assert_eq!(status, 200);
    second.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_chat_page_is_served_unless_turned_off() {
    let dir = tempfile::tempdir().unwrap();
    let on = start(dir.path(), &["--jwt-secret", common::JWT_SECRET]).await;
    let page = reqwest::get(on.url("/")).await.unwrap();
    assert_eq!(page.status(), 200);
    assert!(
        page.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/html")
    );
    assert!(page.text().await.unwrap().contains("/app.js"));
    let script = reqwest::get(on.url("/app.js")).await.unwrap();
    assert!(script.text().await.unwrap().contains("join_room"));
    on.stop().await;

    let off = start(
        dir.path(),
        &["--jwt-secret", common::JWT_SECRET, "--no-web-ui"],
    )
    .await;
    let page = reqwest::get(off.url("/")).await.unwrap();
    assert_eq!(page.status(), 404);
    off.stop().await;
}

#[test]
fn setting_only_one_url_is_a_start_up_error_that_says_why() {
    let settings = gateway::Settings::try_parse_from([
        "gateway",
        "--redis-url",
        "redis://127.0.0.1:1",
        "--jwt-secret",
        common::JWT_SECRET,
    ])
    .unwrap();
    if std::env::var_os("MONGODB_URI").is_some() {
        return; // the environment selects the distributed mode
    }
    let error = tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(gateway::Application::build(settings))
        .err()
        .expect("refuses to start");
    assert!(
        error.to_string().contains("MONGODB_URI is not"),
        "{error:#}"
    );
}

#[test]
fn a_short_jwt_secret_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let settings = gateway::Settings::try_parse_from([
        "gateway",
        "--embedded",
        "--data-dir",
        dir.path().to_str().unwrap(),
        "--jwt-secret",
        "only-twenty-two-bytes!",
    ])
    .unwrap();
    let error = tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(gateway::Application::build(settings))
        .err()
        .expect("refused");
    let text = format!("{error:#}");
    assert!(
        text.contains("JWT_SECRET must be at least 32 bytes, it has 22"),
        "{text}"
    );
}
