//! The REST contract: every endpoint's success and error statuses and bodies.

mod common;

use common::TestApp;
use reqwest::StatusCode;
use serde_json::{Value, json};

fn nest(status: u16, error: &str, message: &str) -> Value {
    json!({ "statusCode": status, "error": error, "message": message })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn register_login_me() {
    let app = TestApp::spawn(1).await;
    let reg = |body: Value| app.call("POST", "/auth/register", None, Some(body));

    let (status, body) =
        reg(json!({ "email": "Ann@Example.com", "password": "password123", "displayName": "Ann" }))
            .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let user = body["user"].clone();
    assert_eq!(user["email"], json!("ann@example.com"));
    assert_eq!(user["displayName"], json!("Ann"));
    assert_eq!(
        user.as_object().unwrap().len(),
        3,
        "user is {{_id, email, displayName}} only: {user}"
    );
    let token = body["accessToken"].as_str().unwrap().to_owned();

    // Default display name, and e-mail uniqueness regardless of case.
    let (status, body) =
        reg(json!({ "email": "bob@example.com", "password": "password123" })).await;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(body["user"]["displayName"], json!("bob"));
    let (status, body) =
        reg(json!({ "email": "ANN@example.com", "password": "password456" })).await;
    assert_eq!(
        (status, body),
        (
            StatusCode::CONFLICT,
            nest(409, "Conflict", "email is already registered")
        )
    );

    let (status, body) = reg(json!({ "email": "not-an-email", "password": "password123" })).await;
    assert_eq!(
        (status, body),
        (
            StatusCode::BAD_REQUEST,
            nest(400, "Bad Request", "email must be a valid email address")
        )
    );
    let (status, body) = reg(json!({ "email": "c@example.com", "password": "short" })).await;
    assert_eq!(
        (status, body),
        (
            StatusCode::BAD_REQUEST,
            nest(400, "Bad Request", "password must be at least 8 characters")
        )
    );
    let (status, body) = reg(json!({ "email": "c@example.com" })).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(
        body["message"].as_str().unwrap().contains("password"),
        "{body}"
    );
    let (status, body) = reg(json!("just a string")).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    let resp = app
        .http
        .post(app.url("/auth/register"))
        .body("{not json")
        .header("content-type", "application/json")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    assert_eq!(
        resp.json::<Value>().await.unwrap()["statusCode"],
        json!(400)
    );

    let login = |email: &str, password: &str| {
        app.call(
            "POST",
            "/auth/login",
            None,
            Some(json!({ "email": email, "password": password })),
        )
    };
    let (status, body) = login("ann@EXAMPLE.com", "password123").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["user"], user);
    let refused = nest(401, "Unauthorized", "invalid email or password");
    assert_eq!(
        login("ann@example.com", "wrong-password").await,
        (StatusCode::UNAUTHORIZED, refused.clone())
    );
    assert_eq!(
        login("nobody@example.com", "password123").await,
        (StatusCode::UNAUTHORIZED, refused.clone())
    );
    assert_eq!(
        login("garbage", "password123").await,
        (StatusCode::UNAUTHORIZED, refused)
    );

    assert_eq!(
        app.call("GET", "/auth/me", Some(&token), None).await,
        (StatusCode::OK, user)
    );
    let (status, body) = app.call("GET", "/auth/me", None, None).await;
    assert_eq!(
        (status, body),
        (
            StatusCode::UNAUTHORIZED,
            nest(401, "Unauthorized", "missing token")
        )
    );
    let (status, body) = app.call("GET", "/auth/me", Some("garbage"), None).await;
    assert_eq!(
        (status, body),
        (
            StatusCode::UNAUTHORIZED,
            nest(401, "Unauthorized", "invalid token")
        )
    );

    let (status, body) = app.call("GET", "/nowhere", None, None).await;
    assert_eq!(
        (status, body),
        (
            StatusCode::NOT_FOUND,
            nest(404, "Not Found", "Cannot GET /nowhere")
        )
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rooms() {
    let app = TestApp::spawn(1).await;
    let (ann, ann_id) = app.user("ann").await;
    let (bob, bob_id) = app.user("bob").await;
    let (eve, eve_id) = app.user("eve").await;

    let (status, room) = app
        .call(
            "POST",
            "/chat/rooms",
            Some(&ann),
            Some(json!({ "name": "general", "participantIds": [bob_id] })),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{room}");
    let room_id = room["_id"].as_str().unwrap().to_owned();
    assert_eq!(room["name"], json!("general"));
    assert_eq!(room["participants"], json!([ann_id, bob_id]));
    assert_eq!(room["lastMessageAt"], Value::Null);
    assert!(room["createdAt"].as_str().unwrap().ends_with('Z'));

    // The caller is always a participant; a room without a name is fine.
    let (status, solo) = app
        .call(
            "POST",
            "/chat/rooms",
            Some(&bob),
            Some(json!({ "participantIds": [] })),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(solo["participants"], json!([bob_id]));
    assert_eq!(solo["name"], Value::Null);

    let (status, body) = app
        .call(
            "POST",
            "/chat/rooms",
            Some(&ann),
            Some(json!({ "participantIds": ["bad"] })),
        )
        .await;
    assert_eq!(
        (status, body["message"].clone()),
        (
            StatusCode::BAD_REQUEST,
            json!("participantIds must be a 24-character hex ObjectId")
        )
    );
    let (status, body) = app
        .call(
            "POST",
            "/chat/rooms",
            Some(&ann),
            Some(json!({ "participantIds": ["0123456789abcdef01234567"] })),
        )
        .await;
    assert_eq!(
        (status, body),
        (
            StatusCode::NOT_FOUND,
            nest(404, "Not Found", "user 0123456789abcdef01234567 not found")
        )
    );
    let (status, _) = app
        .call(
            "POST",
            "/chat/rooms",
            None,
            Some(json!({ "participantIds": [] })),
        )
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);

    // Most recently active first: a message makes `room` newer than `solo`.
    let (_, list) = app.call("GET", "/chat/rooms", Some(&bob), None).await;
    assert_eq!(
        list.as_array()
            .unwrap()
            .iter()
            .map(|r| r["_id"].clone())
            .collect::<Vec<_>>(),
        vec![solo["_id"].clone(), json!(room_id)]
    );
    let (status, msg) = app
        .call(
            "POST",
            &format!("/chat/rooms/{room_id}/messages"),
            Some(&ann),
            Some(json!({ "content": "hi" })),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED);
    let mut list = Value::Null;
    for _ in 0..200 {
        // The persister stores asynchronously; wait until the room's activity moved.
        list = app.call("GET", "/chat/rooms", Some(&bob), None).await.1;
        if list[0]["_id"] == json!(room_id) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    assert_eq!(list[0]["_id"], json!(room_id), "{list}");
    assert_eq!(list[0]["lastMessageAt"], msg["createdAt"]);
    assert_eq!(
        app.call("GET", "/chat/rooms", Some(&eve), None).await,
        (StatusCode::OK, json!([]))
    );

    let path = format!("/chat/rooms/{room_id}");
    assert_eq!(
        app.call("GET", &path, Some(&bob), None).await.0,
        StatusCode::OK
    );
    assert_eq!(
        app.call("GET", "/chat/rooms/xyz", Some(&bob), None).await.0,
        StatusCode::BAD_REQUEST
    );
    assert_eq!(
        app.call(
            "GET",
            "/chat/rooms/0123456789abcdef01234567",
            Some(&bob),
            None
        )
        .await
        .0,
        StatusCode::NOT_FOUND
    );
    let (status, body) = app.call("GET", &path, Some(&eve), None).await;
    assert_eq!(
        (status, body),
        (
            StatusCode::FORBIDDEN,
            nest(403, "Forbidden", "you are not a participant of this room")
        )
    );

    let add = format!("/chat/rooms/{room_id}/participants");
    assert_eq!(
        app.call("POST", &add, Some(&eve), Some(json!({ "userId": eve_id })))
            .await
            .0,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        app.call("POST", &add, Some(&ann), Some(json!({ "userId": "nope" })))
            .await
            .0,
        StatusCode::BAD_REQUEST
    );
    assert_eq!(
        app.call("POST", &add, Some(&ann), Some(json!({}))).await.0,
        StatusCode::BAD_REQUEST
    );
    assert_eq!(
        app.call(
            "POST",
            &add,
            Some(&ann),
            Some(json!({ "userId": "0123456789abcdef01234567" }))
        )
        .await
        .0,
        StatusCode::NOT_FOUND
    );
    let (status, body) = app
        .call("POST", &add, Some(&ann), Some(json!({ "userId": eve_id })))
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["participants"], json!([ann_id, bob_id, eve_id]));
    let (_, body) = app
        .call("POST", &add, Some(&ann), Some(json!({ "userId": eve_id })))
        .await;
    assert_eq!(
        body["participants"].as_array().unwrap().len(),
        3,
        "adding twice is a no-op"
    );
    assert_eq!(
        app.call("GET", &path, Some(&eve), None).await.0,
        StatusCode::OK
    );
    let _ = bob;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_history_and_rest_posts_reach_sockets() {
    let app = TestApp::spawn(2).await;
    let (ann, ann_id) = app.user("ann").await;
    let (bob, bob_id) = app.user("bob").await;
    let (eve, _) = app.user("eve").await;
    let room = app.room(&ann, &[&bob_id]).await;
    let b = app.member(1, &bob, &[&room]).await;
    let path = format!("/chat/rooms/{room}/messages");

    let mut sent = Vec::new();
    for i in 0..7 {
        let (status, msg) = app
            .call(
                "POST",
                &path,
                Some(&ann),
                Some(json!({ "content": format!("m{i}") })),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{msg}");
        assert_eq!(msg["roomId"], json!(room));
        assert_eq!(msg["sender"]["_id"], json!(ann_id));
        assert_eq!(msg["content"], json!(format!("m{i}")));
        // Numbered in the room from 1, without gaps.
        assert_eq!(msg["seq"], json!(i + 1));
        // Delivered to sockets exactly as the REST answer.
        assert_eq!(b.next("message").await, msg);
        sent.push(msg);
    }

    let (status, page) = app
        .call("GET", &format!("{path}?limit=3"), Some(&bob), None)
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(page, json!([sent[6], sent[5], sent[4]]));
    let before = sent[4]["id"].as_str().unwrap();
    let (_, page) = app
        .call(
            "GET",
            &format!("{path}?limit=3&before={before}"),
            Some(&bob),
            None,
        )
        .await;
    assert_eq!(page, json!([sent[3], sent[2], sent[1]]));
    let before = sent[1]["id"].as_str().unwrap();
    let (_, page) = app
        .call("GET", &format!("{path}?before={before}"), Some(&bob), None)
        .await;
    assert_eq!(page, json!([sent[0]]));
    let (_, page) = app.call("GET", &path, Some(&bob), None).await;
    assert_eq!(page.as_array().unwrap().len(), 7);
    let (_, page) = app
        .call("GET", &format!("{path}?limit=1000"), Some(&bob), None)
        .await;
    assert_eq!(
        page.as_array().unwrap().len(),
        7,
        "limit is capped, not refused"
    );

    // Catching up: what came after a sequence number, oldest first.
    let (status, page) = app
        .call(
            "GET",
            &format!("{path}?afterSeq=2&limit=3"),
            Some(&bob),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(page, json!([sent[2], sent[3], sent[4]]));
    let (_, page) = app
        .call("GET", &format!("{path}?afterSeq=5"), Some(&bob), None)
        .await;
    assert_eq!(page, json!([sent[5], sent[6]]));
    let (_, page) = app
        .call("GET", &format!("{path}?afterSeq=7"), Some(&bob), None)
        .await;
    assert_eq!(page, json!([]));

    let both = format!("before={}&afterSeq=1", sent[1]["id"].as_str().unwrap());
    for bad in [
        "limit=0",
        "limit=-1",
        "limit=abc",
        "before=xyz",
        "afterSeq=-1",
        "afterSeq=x",
        both.as_str(),
    ] {
        let (status, body) = app
            .call("GET", &format!("{path}?{bad}"), Some(&bob), None)
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}: {body}");
    }
    assert_eq!(
        app.call("GET", &path, Some(&eve), None).await.0,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        app.call("GET", &path, None, None).await.0,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        app.call("POST", &path, Some(&eve), Some(json!({ "content": "x" })))
            .await
            .0,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        app.call(
            "GET",
            "/chat/rooms/0123456789abcdef01234567/messages",
            Some(&bob),
            None
        )
        .await
        .0,
        StatusCode::NOT_FOUND
    );

    for (body, message) in [
        (json!({ "content": "" }), "content must not be empty"),
        (json!({ "content": 12 }), "content must be a string"),
        (json!({ "content": " \n " }), "content must not be blank"),
        (
            json!({ "content": "\u{1b}[2Jcleared" }),
            "content must not contain control characters",
        ),
        (
            json!({ "content": "x".repeat(10_001) }),
            "content must be at most 10000 characters",
        ),
    ] {
        let (status, resp) = app.call("POST", &path, Some(&ann), Some(body)).await;
        assert_eq!(
            (status, resp),
            (StatusCode::BAD_REQUEST, nest(400, "Bad Request", message))
        );
    }
    let (status, _) = app.call("POST", &path, Some(&ann), Some(json!({}))).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_endpoints() {
    let mut app = TestApp::spawn(1).await;
    let admin = |path: &str| format!("http://127.0.0.1:{}{path}", app.gateways[0].admin_port);
    let get = |url: String| async move { reqwest::get(url).await.unwrap() };
    assert_eq!(get(admin("/healthz")).await.status(), StatusCode::OK);
    assert_eq!(get(admin("/readyz")).await.status(), StatusCode::OK);
    let (ann, _) = app.user("ann").await;
    let room = app.room(&ann, &[]).await;
    let mut a = app.member(0, &ann, &[&room]).await;
    a.request(
        "send_message",
        json!({ "roomId": room, "content": "count me" }),
    )
    .await;
    a.next("message").await;
    let metrics = get(admin("/metrics")).await.text().await.unwrap();
    for name in [
        "chat_gateway_connections",
        "chat_gateway_events_total",
        "chat_gateway_deliveries_total",
        "chat_gateway_ingest_append_seconds_bucket",
        // The persister's backlog (in-process here, so on the same recorder).
        "chat_persister_backlog_entries",
        "chat_persister_partitions_owned",
        "process_resident_memory_bytes",
        "process_open_fds",
    ] {
        assert!(metrics.contains(name), "{name} missing from /metrics");
    }
    if app.skip_when_embedded("readiness without Redis")
        || app.skip_when_cluster("kills the single Redis")
    {
        return;
    }
    app.redis.kill();
    assert_eq!(
        get(admin("/readyz")).await.status(),
        StatusCode::SERVICE_UNAVAILABLE
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_up_without_jwt_secret_names_the_variable() {
    let app = TestApp::spawn(0).await;
    let mut settings = app.gateway_settings();
    settings.jwt_secret = None;
    if app.embedded {
        // The embedded mode generates one and keeps it in its data directory.
        let dir = settings.data_dir.clone();
        gateway::Application::build(settings)
            .await
            .expect("starts without JWT_SECRET");
        let kept = std::fs::read_to_string(dir.join("jwt-secret")).unwrap();
        assert_eq!(kept.len(), 64);
        return;
    }
    let error = gateway::Application::build(settings)
        .await
        .err()
        .expect("must refuse to start");
    assert!(
        error.to_string().contains("JWT_SECRET is required"),
        "{error:#}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_logins_are_limited_per_email_and_per_address() {
    let mut app = TestApp::spawn(0).await;
    app.add_gateway_with(|s| {
        s.login_max_failures_per_email = 3;
        s.login_max_failures_per_ip = 5;
    })
    .await;
    let (status, _) = app
        .call(
            "POST",
            "/auth/register",
            None,
            Some(json!({ "email": "ann@example.com", "password": "password123" })),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED);
    let login = |email: &str, password: &str| {
        let req = app
            .http
            .post(app.url("/auth/login"))
            .json(&json!({ "email": email, "password": password }));
        async move { req.send().await.unwrap() }
    };
    for _ in 0..3 {
        assert_eq!(
            login("ann@example.com", "wrong-password").await.status(),
            StatusCode::UNAUTHORIZED
        );
    }
    // Locked for this e-mail, even with the right password.
    let resp = login("ANN@example.com", "password123").await;
    assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
    let retry_after: u64 = resp.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        (1..=900).contains(&retry_after),
        "Retry-After {retry_after}"
    );
    assert_eq!(
        resp.json::<Value>().await.unwrap(),
        nest(
            429,
            "Too Many Requests",
            "too many failed logins, try again later"
        )
    );
    // An unknown e-mail is limited the same way (nothing is revealed); here the address
    // reaches its limit of 5 failures.
    for _ in 0..2 {
        assert_eq!(
            login("nobody@example.com", "x").await.status(),
            StatusCode::UNAUTHORIZED
        );
    }
    assert_eq!(
        login("other@example.com", "x").await.status(),
        StatusCode::TOO_MANY_REQUESTS
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_port_listens_on_its_own_address() {
    let mut app = TestApp::spawn(0).await;
    let g = app
        .add_gateway_with(|s| s.admin_host = Some("127.0.0.2".parse().unwrap()))
        .await;
    let port = app.gateways[g].admin_port;
    let healthz = |ip: &str| format!("http://{ip}:{port}/healthz");
    assert_eq!(
        reqwest::get(healthz("127.0.0.2")).await.unwrap().status(),
        StatusCode::OK
    );
    assert!(
        reqwest::get(healthz("127.0.0.1")).await.is_err(),
        "not on the API's address"
    );
    // The API stays on HOST.
    assert_eq!(
        app.call("GET", "/auth/me", None, None).await.0,
        StatusCode::UNAUTHORIZED
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parallel_failed_logins_cannot_all_pass_the_limit() {
    let mut app = TestApp::spawn(0).await;
    app.add_gateway_with(|s| {
        s.login_max_failures_per_email = 5;
        s.login_max_failures_per_ip = 1000;
    })
    .await;
    // 40 wrong passwords for one e-mail at once: the limit is counted before the password
    // is checked, so only 5 are tried.
    let attempts = (0..40).map(|_| {
        app.http
            .post(app.url("/auth/login"))
            .json(&json!({ "email": "target@example.com", "password": "guess" }))
            .send()
    });
    let statuses: Vec<StatusCode> = futures::future::join_all(attempts)
        .await
        .into_iter()
        .map(|r| r.unwrap().status())
        .collect();
    let tried = statuses
        .iter()
        .filter(|s| **s == StatusCode::UNAUTHORIZED)
        .count();
    let limited = statuses
        .iter()
        .filter(|s| **s == StatusCode::TOO_MANY_REQUESTS)
        .count();
    assert_eq!((tried, limited), (5, 35), "{statuses:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_address_is_taken_only_from_trusted_proxies() {
    let mut app = TestApp::spawn(0).await;
    app.add_gateway_with(|s| {
        s.login_max_failures_per_email = 1000;
        s.login_max_failures_per_ip = 3;
        s.trusted_proxy_hops = 1;
    })
    .await;
    let login = |forwarded: String, email: String| {
        app.http
            .post(app.url("/auth/login"))
            .header("x-forwarded-for", forwarded)
            .json(&json!({ "email": email, "password": "guess" }))
            .send()
    };
    // One client behind the proxy (which appended 203.0.113.7), forging a new first entry
    // each time: still one address, limited after 3 failures.
    for i in 0..3 {
        let resp = login(
            format!("10.0.0.{i}, 203.0.113.7"),
            format!("u{i}@example.com"),
        )
        .await
        .unwrap();
        assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    }
    let resp = login("10.9.9.9, 203.0.113.7".into(), "u9@example.com".into())
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
    // Another client behind the same proxy has its own counter.
    let resp = login("203.0.113.8".into(), "v@example.com".into())
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_and_emails_that_would_forge_what_others_see_are_refused() {
    let app = TestApp::spawn(1).await;
    let register = |email: &str, name: &str| {
        app.call(
            "POST",
            "/auth/register",
            None,
            Some(json!({ "email": email, "password": "password123", "displayName": name })),
        )
    };
    for (email, name, message) in [
        (
            "a\u{0}b@example.com",
            "ok",
            "email must be a valid email address",
        ),
        (
            "evil\u{202E}@example.com",
            "ok",
            "email must be a valid email address",
        ),
        (
            "<a>@example.com",
            "ok",
            "email must be a valid email address",
        ),
        (
            "c@example.com",
            "\u{1b}[31mred",
            "displayName must not contain control or text-direction characters",
        ),
        (
            "d@example.com",
            "\u{200B}\u{200B}",
            "displayName must not be empty",
        ),
        // Blank-looking fillers, and an address that shows as another.
        ("e@example.com", "\u{3164}", "displayName must not be empty"),
        (
            "f@example.com",
            "\u{2800}\u{AD}",
            "displayName must not be empty",
        ),
        (
            "adm\u{AD}in@example.com",
            "ok",
            "email must be a valid email address",
        ),
    ] {
        let (status, body) = register(email, name).await;
        assert_eq!(
            (status, body),
            (StatusCode::BAD_REQUEST, nest(400, "Bad Request", message)),
            "{email:?} {name:?}"
        );
    }
    let (ann, _) = app.user("ann").await;
    let (status, body) = app
        .call(
            "POST",
            "/chat/rooms",
            Some(&ann),
            Some(json!({ "name": "nul\u{0}room", "participantIds": [] })),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_owner_adds_and_removes_others_and_anyone_may_leave() {
    let app = TestApp::spawn(1).await;
    let (ann, ann_id) = app.user("ann").await;
    let (bob, bob_id) = app.user("bob").await;
    let (cat, cat_id) = app.user("cat").await;
    let (_, dan_id) = app.user("dan").await;
    let (status, room) = app
        .call(
            "POST",
            "/chat/rooms",
            Some(&ann),
            Some(json!({ "participantIds": [bob_id, cat_id] })),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(room["ownerId"], json!(ann_id));
    let id = room["_id"].as_str().unwrap();
    let add = format!("/chat/rooms/{id}/participants");
    let remove = |user: &str| format!("/chat/rooms/{id}/participants/{user}");

    // A participant who is not the owner neither adds nor removes others, nor the owner.
    let (status, body) = app
        .call("POST", &add, Some(&bob), Some(json!({ "userId": dan_id })))
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert_eq!(
        body["message"],
        json!("only the room's owner adds participants")
    );
    for target in [&cat_id, &ann_id] {
        let (status, body) = app.call("DELETE", &remove(target), Some(&bob), None).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
        assert_eq!(
            body["message"],
            json!("only the room's owner removes other participants")
        );
    }
    // The owner does both; anyone removes themself.
    let (status, _) = app
        .call("POST", &add, Some(&ann), Some(json!({ "userId": dan_id })))
        .await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = app.call("DELETE", &remove(&cat_id), Some(&ann), None).await;
    assert_eq!(status, StatusCode::OK);
    let (status, body) = app.call("DELETE", &remove(&bob_id), Some(&bob), None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["participants"], json!([ann_id, dan_id]));
    let _ = cat;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_get_the_json_error_shape_without_internal_names() {
    let app = TestApp::spawn(1).await;
    let (ann, _) = app.user("ann").await;
    let room = app.room(&ann, &[]).await;
    let (status, body) = app
        .call("POST", "/auth/register", None, Some(json!("just a string")))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let message = body["message"].as_str().unwrap();
    assert_eq!(
        message,
        "invalid type: string \"just a string\", expected an object"
    );
    let (status, body) = app
        .call(
            "POST",
            "/auth/register",
            None,
            Some(json!({ "email": "a@b.co" })),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(body["message"], json!("missing field `password`"));
    for path in [
        format!("/chat/rooms/{room}/messages?limit=5&limit=6"),
        "/users?email=a@b.co&email=c@d.co".to_owned(),
    ] {
        let (status, body) = app.call("GET", &path, Some(&ann), None).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{path}");
        assert_eq!(body["statusCode"], json!(400), "{path}: {body}");
        assert!(
            body["message"].as_str().unwrap().contains("more than once")
                || body["message"]
                    .as_str()
                    .unwrap()
                    .contains("duplicate field"),
            "{body}"
        );
    }
    // A lone surrogate is not JSON a server can keep.
    let response = reqwest::Client::new()
        .post(app.url(&format!("/chat/rooms/{room}/messages")))
        .bearer_auth(&ann)
        .header("content-type", "application/json")
        .body(r#"{"content":"\ud800"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    let body: Value = response.json().await.unwrap();
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .starts_with("body is not valid JSON: "),
        "{body}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registrations_and_account_lookups_are_limited() {
    let mut app = TestApp::spawn(0).await;
    let g = app
        .add_gateway_with(|s| {
            s.register_max_per_ip = 3;
            s.user_lookups_per_user = 2;
        })
        .await;
    let url = |path: &str| format!("http://127.0.0.1:{}{path}", app.port(g));
    let http = reqwest::Client::new();
    let register = |n: usize| {
        http.post(url("/auth/register"))
            .json(&json!({ "email": format!("limit{n}@example.com"), "password": "correct horse battery" }))
            .send()
    };
    let mut token = String::new();
    for n in 0..3 {
        let response = register(n).await.unwrap();
        assert_eq!(response.status(), StatusCode::CREATED);
        token = response.json::<Value>().await.unwrap()["accessToken"]
            .as_str()
            .unwrap()
            .to_owned();
    }
    let refused = register(3).await.unwrap();
    assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
    assert!(refused.headers().contains_key("retry-after"));

    // Two answers that tell whether an account exists, then 429.
    let lookup = || {
        http.get(url("/users?email=nobody@example.com"))
            .bearer_auth(&token)
            .send()
    };
    assert_eq!(lookup().await.unwrap().status(), StatusCode::NOT_FOUND);
    let unknown = http
        .post(url("/chat/rooms"))
        .bearer_auth(&token)
        .json(&json!({ "participantIds": ["0123456789abcdef01234567"] }))
        .send()
        .await
        .unwrap();
    assert_eq!(unknown.status(), StatusCode::NOT_FOUND);
    assert_eq!(
        lookup().await.unwrap().status(),
        StatusCode::TOO_MANY_REQUESTS
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_sign_ups_is_refused_with_retry_after_not_queued() {
    let mut app = TestApp::spawn(0).await;
    let g = app
        .add_gateway_with(|s| s.register_max_per_ip = 10_000)
        .await;
    let url = format!("http://127.0.0.1:{}/auth/register", app.port(g));
    let http = reqwest::Client::new();
    // More at once than the hashing queue holds (64), each a slow argon2 hash.
    let attempts = (0..200).map(|n| {
        http.post(&url)
            .json(&json!({ "email": format!("flood{n}@example.com"), "password": "correct horse battery" }))
            .send()
    });
    let responses = futures::future::join_all(attempts).await;
    let mut busy = 0;
    for response in responses {
        let response = response.unwrap();
        match response.status() {
            StatusCode::CREATED => {}
            StatusCode::SERVICE_UNAVAILABLE => {
                assert_eq!(response.headers()["retry-after"], "1");
                busy += 1;
            }
            other => panic!("unexpected {other}"),
        }
    }
    assert!(busy > 0, "nothing was refused");
}

/// A login names no counter after what the client sent, and has a body bounded to what a
/// login needs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_login_names_no_counter_after_what_the_client_sent_and_its_body_is_bounded() {
    let app = TestApp::spawn(1).await;
    // Past the route's limit: 413 once that much is read. (A client still sending a larger
    // body when the answer comes may see the connection closed instead of the answer.)
    let huge = format!("{}@example.com", "a".repeat(20_000));
    let (status, body) = app
        .call(
            "POST",
            "/auth/login",
            None,
            Some(json!({ "email": huge, "password": "x" })),
        )
        .await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{body}");
    assert_eq!(body["statusCode"], json!(413));
    let long = format!("{}@example.com", "b".repeat(10_000));
    let (status, _) = app
        .call(
            "POST",
            "/auth/login",
            None,
            Some(json!({ "email": long, "password": "x" })),
        )
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    if app.embedded {
        return;
    }
    let keys = app.redis_keys(&format!("{}:count:*", app.prefix)).await;
    assert!(!keys.is_empty(), "the address was counted");
    for key in &keys {
        assert!(
            key.len() < 120,
            "a counter named after the client's input: {key:.200}"
        );
    }
}

/// Twelve wrong passwords from another address lock that address out of the account, and
/// slow the account down everywhere, but the owner, even after a typo of their own, still
/// logs in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guesser_at_another_address_slows_the_owner_down_but_cannot_lock_them_out() {
    let app = TestApp::spawn(1).await;
    let (status, _) = app
        .call(
            "POST",
            "/auth/register",
            None,
            Some(json!({ "email": "owner@example.com", "password": "password123" })),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED);
    let guesser = reqwest::Client::builder()
        .local_address("127.0.0.2".parse::<std::net::IpAddr>().unwrap())
        .build()
        .unwrap();
    let mut statuses = Vec::new();
    for _ in 0..12 {
        let resp = guesser
            .post(app.url("/auth/login"))
            .json(&json!({ "email": "owner@example.com", "password": "guess" }))
            .send()
            .await
            .unwrap();
        statuses.push(resp.status().as_u16());
    }
    assert_eq!(statuses, [[401; 10].as_slice(), &[429, 429]].concat());
    // The owner mistypes once, then logs in: slowed, not refused.
    let (status, _) = app
        .call(
            "POST",
            "/auth/login",
            None,
            Some(json!({ "email": "owner@example.com", "password": "password124" })),
        )
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let started = std::time::Instant::now();
    let (status, body) = app
        .call(
            "POST",
            "/auth/login",
            None,
            Some(json!({ "email": "owner@example.com", "password": "password123" })),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    // Eleven failures, six past LOGIN_SLOWDOWN_AFTER: 6 × 250 ms.
    assert!(started.elapsed() >= std::time::Duration::from_millis(1450));
}

/// Room creation is limited per user, a room's participants are capped (at creation and
/// when adding), and the room list comes in pages.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rooms_are_bounded_in_number_and_size_and_listed_in_pages() {
    let mut app = TestApp::spawn(0).await;
    app.add_gateway_with(|s| {
        s.room_creations_per_user = 3;
        s.max_room_participants = 3;
    })
    .await;
    let (ann, _) = app.user("ann").await;
    let mut others = Vec::new();
    for name in ["bob", "cat", "dan"] {
        others.push(app.user(name).await.1);
    }
    let create = |ids: Vec<String>| {
        app.call(
            "POST",
            "/chat/rooms",
            Some(&ann),
            Some(json!({ "participantIds": ids })),
        )
    };
    let (status, body) = create(others.clone()).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(
        body["message"].as_str().unwrap().contains("at most 3"),
        "{body}"
    );
    let (status, first) = create(vec![others[0].clone()]).await;
    assert_eq!(status, StatusCode::CREATED);
    let room = first["_id"].as_str().unwrap().to_owned();
    let participants = format!("/chat/rooms/{room}/participants");
    let add = |user: &str| {
        app.call(
            "POST",
            &participants,
            Some(&ann),
            Some(json!({ "userId": user })),
        )
    };
    assert_eq!(add(&others[1]).await.0, StatusCode::OK);
    let (status, body) = add(&others[2]).await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert_eq!(
        add(&others[1]).await.0,
        StatusCode::OK,
        "adding a member again is fine"
    );
    let mut ids = vec![room.clone()];
    for _ in 0..2 {
        let (status, created) = create(vec![]).await;
        assert_eq!(status, StatusCode::CREATED);
        ids.push(created["_id"].as_str().unwrap().to_owned());
    }
    let (status, body) = create(vec![]).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{body}");
    // Most recently active first: the last created.
    let (status, page) = app
        .call("GET", "/chat/rooms?limit=2", Some(&ann), None)
        .await;
    assert_eq!(status, StatusCode::OK);
    let listed: Vec<&str> = page
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["_id"].as_str().unwrap())
        .collect();
    assert_eq!(listed, [ids[2].as_str(), ids[1].as_str()]);
    let (_, rest) = app
        .call(
            "GET",
            &format!("/chat/rooms?limit=2&before={}", ids[1]),
            Some(&ann),
            None,
        )
        .await;
    let listed: Vec<&str> = rest
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["_id"].as_str().unwrap())
        .collect();
    assert_eq!(listed, [ids[0].as_str()]);
    let (status, _) = app
        .call("GET", "/chat/rooms?limit=0", Some(&ann), None)
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
}

/// A profile shows the e-mail only to the user and to people who share a room with them, and
/// looking people up by id is limited like looking them up by e-mail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_profile_shows_the_email_only_to_roommates_and_lookups_are_limited() {
    let mut app = TestApp::spawn(0).await;
    app.add_gateway_with(|s| s.user_lookups_per_user = 3).await;
    let (ann, _) = app.user("ann").await;
    let (_, bob_id) = app.user("bob").await;
    let (cat, _) = app.user("cat").await;
    app.room(&ann, &[&bob_id]).await;
    let path = format!("/users/{bob_id}");
    let (_, seen_by_ann) = app.call("GET", &path, Some(&ann), None).await;
    assert!(seen_by_ann["email"].as_str().is_some(), "{seen_by_ann}");
    let (_, seen_by_cat) = app.call("GET", &path, Some(&cat), None).await;
    assert_eq!(seen_by_cat["email"], Value::Null, "{seen_by_cat}");
    assert!(seen_by_cat["displayName"].as_str().is_some());
    // Roommates are looked up freely (the chat page names who is typing).
    for _ in 0..5 {
        let (status, _) = app.call("GET", &path, Some(&ann), None).await;
        assert_eq!(status, StatusCode::OK);
    }
    // Guessing ids: limited.
    let mut statuses = Vec::new();
    for _ in 0..3 {
        let guess = format!("/users/{}", shared::ObjectId::new().to_hex());
        statuses.push(app.call("GET", &guess, Some(&cat), None).await.0.as_u16());
    }
    assert_eq!(statuses, [404, 404, 429], "cat looked bob up once already");
}

/// A deleted user's token, still valid, opens nothing on REST, and an open socket of theirs
/// is refused and cut off once its checks are renewed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_users_token_opens_nothing() {
    let mut app = TestApp::spawn(0).await;
    if app.skip_when_embedded("the user is deleted in MongoDB") {
        return;
    }
    app.add_gateway_with(|s| s.membership_cache_secs = 1).await;
    let (ann, ann_id) = app.user("ann").await;
    let room = app.room(&ann, &[]).await;
    let mut a = app.member(0, &ann, &[&room]).await;
    let client = mongodb::Client::with_uri_str(app.mongo.uri())
        .await
        .unwrap();
    client
        .database(&app.db)
        .collection::<mongodb::bson::Document>("users")
        .delete_one(mongodb::bson::doc! { "_id": shared::ObjectId::parse_str(&ann_id).unwrap() })
        .await
        .unwrap();
    for (method, path, body) in [
        ("GET", "/chat/rooms".to_owned(), None),
        ("POST", "/chat/rooms".to_owned(), Some(json!({}))),
        ("GET", format!("/chat/rooms/{room}/messages"), None),
    ] {
        let (status, body) = app.call(method, &path, Some(&ann), body).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{method} {path}: {body}");
        assert_eq!(body["message"], json!("user no longer exists"));
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let ack = a
            .request("send_message", json!({ "roomId": room, "content": "?" }))
            .await;
        if ack["error"]["code"] == json!("UNAUTHORIZED") {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "still sending: {ack}");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    a.wait_disconnected().await;
}

/// A client that trickles its request (headers or body) holds a connection for the timeouts
/// at most.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_requests_are_cut_off() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut app = TestApp::spawn(0).await;
    app.add_gateway_with(|s| {
        s.http_header_timeout_secs = 1;
        s.http_body_timeout_secs = 1;
    })
    .await;
    let port = app.port(0);
    // Headers, a line every 300 ms: closed after about a second.
    let mut slow = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    slow.write_all(b"GET /auth/me HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let mut closed = false;
    while started.elapsed() < std::time::Duration::from_secs(10) {
        if slow.write_all(b"X-Slow: 1\r\n").await.is_err() {
            closed = true;
            break;
        }
        let mut buf = [0u8; 256];
        match tokio::time::timeout(std::time::Duration::from_millis(300), slow.read(&mut buf)).await
        {
            Ok(Ok(0)) | Ok(Err(_)) => {
                closed = true;
                break;
            }
            Ok(Ok(_)) => {
                // hyper answers 408 before closing.
                closed = true;
                break;
            }
            Err(_) => {}
        }
    }
    assert!(closed, "a trickled request kept its connection");
    assert!(started.elapsed() < std::time::Duration::from_secs(5));
    // A body that never comes in full: 408.
    let mut slow = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    slow.write_all(
        b"POST /auth/login HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"email\"",
    )
    .await
    .unwrap();
    let mut answer = String::new();
    let _ = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        slow.read_to_string(&mut answer),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer:?}");
    // A body trickled a byte every 200 ms: the deadline is the whole body's, so 408 too.
    let mut slow = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    slow.write_all(
        b"POST /auth/login HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n",
    )
    .await
    .unwrap();
    let started = std::time::Instant::now();
    let mut answer = Vec::new();
    while started.elapsed() < std::time::Duration::from_secs(5) {
        if slow.write_all(b" ").await.is_err() {
            break;
        }
        let mut buf = [0u8; 256];
        match tokio::time::timeout(std::time::Duration::from_millis(200), slow.read(&mut buf)).await
        {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => answer.extend_from_slice(&buf[..n]),
            Err(_) => {}
        }
        if !answer.is_empty() {
            break;
        }
    }
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer:?}");
    assert!(started.elapsed() < std::time::Duration::from_secs(3));
}
