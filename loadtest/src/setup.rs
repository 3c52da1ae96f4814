//! Users, rooms and connections for a scenario.

use crate::client::{Client, Incoming};
use anyhow::Context;
use serde_json::json;
use shared::ObjectId;
use shared::config::MongoSettings;
use shared::jwt::JwtKeys;
use shared::store::{MongoStore, Store};
use std::net::IpAddr;
use std::sync::Arc;
use tokio::sync::{Semaphore, mpsc};

/// Where the gateways are and how users are made.
#[derive(clap::Args, Debug, Clone)]
pub struct Target {
    /// Gateway base URL (repeat for several gateways; clients are spread over them).
    #[arg(long = "url", default_value = "http://127.0.0.1:3000")]
    pub urls: Vec<String>,
    /// Local source addresses to spread connections over (127.0.0.x), so that more than
    /// about 28,000 connections fit.
    #[arg(long = "source", value_delimiter = ',')]
    pub sources: Vec<IpAddr>,
    /// Mint tokens with this secret (the gateways' JWT_SECRET) and create users and rooms
    /// directly in MongoDB (fast). Without it, users register through the REST API.
    #[arg(long, env = "JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,
    /// MongoDB of the gateways (with --jwt-secret).
    #[arg(long, env = "MONGODB_URI", default_value = "mongodb://127.0.0.1:27017")]
    pub mongodb_uri: String,
    #[arg(long, env = "MONGODB_DB", default_value = "chat")]
    pub mongodb_db: String,
    /// With --jwt-secret: mint tokens and room ids without storing users or rooms, for a
    /// server that checks no membership (the Node peer in `peers/node`).
    #[arg(long, requires = "jwt_secret")]
    pub mint_only: bool,
}

/// A user of the load test.
#[derive(Clone)]
pub struct User {
    pub id: ObjectId,
    pub token: String,
}

/// Creates `rooms` rooms of `members` users each; returns them per room.
pub async fn rooms(
    target: &Target,
    rooms: usize,
    members: usize,
) -> anyhow::Result<Vec<(ObjectId, Vec<User>)>> {
    match &target.jwt_secret {
        Some(secret) if target.mint_only => mint(secret, rooms, members),
        Some(secret) => seed_mongo(target, secret, rooms, members).await,
        None => register(target, rooms, members).await,
    }
}

fn mint(secret: &str, rooms: usize, members: usize) -> anyhow::Result<Vec<(ObjectId, Vec<User>)>> {
    let keys = JwtKeys::new(secret.as_bytes(), 24 * 3600);
    (0..rooms)
        .map(|r| {
            let users = (0..members)
                .map(|m| {
                    let id = ObjectId::new();
                    let token = keys.issue(
                        id,
                        &format!("load-{id}@example.com"),
                        &format!("load {r}.{m}"),
                    )?;
                    Ok(User { id, token })
                })
                .collect::<anyhow::Result<_>>()?;
            Ok((ObjectId::new(), users))
        })
        .collect()
}

async fn seed_mongo(
    target: &Target,
    secret: &str,
    rooms: usize,
    members: usize,
) -> anyhow::Result<Vec<(ObjectId, Vec<User>)>> {
    let store = MongoStore::connect(
        &MongoSettings {
            uri: Some(target.mongodb_uri.clone()),
            db: target.mongodb_db.clone(),
        },
        "chat-loadtest",
    )
    .await
    .context("connecting to MongoDB")?;
    use futures::StreamExt;
    let keys = JwtKeys::new(secret.as_bytes(), 24 * 3600);
    let run = ObjectId::new().to_hex();
    let mut out = Vec::with_capacity(rooms);
    for r in 0..rooms {
        // Many inserts in flight: seeding 10,000 users one round trip at a time is slow.
        let (store, keys, run) = (&store, &keys, &run);
        let users: Vec<User> = futures::stream::iter(0..members)
            .map(|m| async move {
                let email = format!("load-{run}-{r}-{m}@example.com");
                // Not a password hash: these users log in with minted tokens only.
                let user = store
                    .create_user(&email, &format!("load {r}.{m}"), "!")
                    .await?;
                let token = keys.issue(user.id, &user.email, &user.display_name)?;
                anyhow::Ok(User { id: user.id, token })
            })
            .buffered(64)
            .collect::<Vec<_>>()
            .await
            .into_iter()
            .collect::<anyhow::Result<_>>()?;
        let room = store
            .create_room(
                Some(format!("load {r}")),
                users.iter().map(|u| u.id).collect(),
            )
            .await?;
        out.push((room.id, users));
    }
    Ok(out)
}

async fn register(
    target: &Target,
    rooms: usize,
    members: usize,
) -> anyhow::Result<Vec<(ObjectId, Vec<User>)>> {
    let http = reqwest::Client::new();
    let base = &target.urls[0];
    let run = ObjectId::new().to_hex();
    let limit = Arc::new(Semaphore::new(16));
    let mut out = Vec::with_capacity(rooms);
    for r in 0..rooms {
        let mut tasks = Vec::new();
        for m in 0..members {
            let (http, limit) = (http.clone(), limit.clone());
            let url = format!("{base}/auth/register");
            let email = format!("load-{run}-{r}-{m}@example.com");
            tasks.push(tokio::spawn(async move {
                let _permit = limit.acquire().await?;
                let body: serde_json::Value = http
                    .post(url)
                    .json(&json!({ "email": email, "password": "load-test-password" }))
                    .send()
                    .await?
                    .error_for_status()?
                    .json()
                    .await?;
                let id = ObjectId::parse_str(body["user"]["_id"].as_str().unwrap_or_default())?;
                anyhow::Ok(User {
                    id,
                    token: body["accessToken"].as_str().unwrap_or_default().to_owned(),
                })
            }));
        }
        let mut users = Vec::new();
        for task in tasks {
            users.push(task.await??);
        }
        let room: serde_json::Value = http
            .post(format!("{base}/chat/rooms"))
            .bearer_auth(&users[0].token)
            .json(&json!({ "participantIds": users[1..].iter().map(|u| u.id.to_hex()).collect::<Vec<_>>() }))
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        out.push((
            ObjectId::parse_str(room["_id"].as_str().unwrap_or_default())?,
            users,
        ));
    }
    Ok(out)
}

/// Connects client `index`, spread over the URLs and source addresses.
pub async fn connect(
    target: &Target,
    index: usize,
    user: &User,
    events: mpsc::UnboundedSender<Incoming>,
) -> anyhow::Result<Client> {
    let url = &target.urls[index % target.urls.len()];
    let source = (!target.sources.is_empty()).then(|| target.sources[index % target.sources.len()]);
    Client::connect(url, source, &user.token, events).await
}

/// Connects client `index` (spread over URLs and source addresses) and joins `room`.
pub async fn join(
    target: &Target,
    index: usize,
    user: &User,
    room: ObjectId,
    events: mpsc::UnboundedSender<Incoming>,
    rx: &mut mpsc::UnboundedReceiver<Incoming>,
) -> anyhow::Result<Client> {
    // Bounded, so that a connect or join the server never answers counts as failed and the
    // run ends by itself (seen: 4 of 5,000 idle clients never answered, and the run waited).
    let joining = async {
        let mut client = connect(target, index, user, events).await?;
        let ack = client.emit("join_room", &json!({ "roomId": room.to_hex() }), true);
        loop {
            match rx.recv().await {
                Some(Incoming::Ack { id, payload }) if Some(id) == ack => {
                    anyhow::ensure!(payload["ok"] == json!(true), "join refused: {payload}");
                    return Ok(client);
                }
                Some(Incoming::Closed) | None => anyhow::bail!("closed while joining"),
                Some(_) => {}
            }
        }
    };
    tokio::time::timeout(JOIN_TIMEOUT, joining)
        .await
        .map_err(|_| anyhow::anyhow!("not connected and joined within {JOIN_TIMEOUT:?}"))?
}

/// The longest a client may take to connect, authenticate and join.
const JOIN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(120);
