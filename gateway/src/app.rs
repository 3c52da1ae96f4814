//! Building and running the gateway.

use crate::chat::Chat;
use crate::drain::Drain;
use crate::feed::FeedLimits;
use crate::http::{self, HttpState, LoginLimits};
use crate::limits::{Limits, Rate, UserLimiter};
use crate::presence::PresenceTracker;
use crate::rooms::{Fanout, RoomRegistry};
use crate::settings::{Mode, Settings};
use crate::socket::{self, Connections, SocketState};
use anyhow::{Context, anyhow};
use shared::admin::listen;
use shared::backplane::{
    Backplane, Keys, MAX_IDEMPOTENCY_KEYS, MemoryBackplane, MemoryLimits, MemoryPresence,
    MissedSink, Presence, RedisBackplane, RedisPresence, RoomEventSink,
};
use shared::config::Secret;
use shared::counters::{Counters, MemoryCounters, RedisCounters};
use shared::jwt::JwtKeys;
use shared::sqlite::SqliteStore;
use shared::store::{MongoStore, Store};
use socketioxide::{ParserConfig, SocketIo};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Bytes of each WebSocket connection's read buffer.
const WS_READ_BUFFER: usize = 256;
/// How long buffered packets get to reach clients before the transports close at shutdown.
const FLUSH_TIME: Duration = Duration::from_millis(250);

/// The least time the presence gets at shutdown for its last writes and its leave.
const PRESENCE_LEAVE_TIME: Duration = Duration::from_secs(2);

/// A gateway, bound to its ports and connected to Redis and MongoDB, not yet serving.
pub struct Application {
    api: TcpListener,
    admin: TcpListener,
    api_router: axum::Router,
    admin_router: axum::Router,
    io: SocketIo,
    shutdown: CancellationToken,
    drain: Duration,
    drain_state: Arc<Drain>,
    embedded: Option<Embedded>,
    web_ui: bool,
    batch_size: usize,
    limits: crate::serve::Limits,
    /// Closed after everything else has stopped.
    store: Arc<dyn Store>,
    presence: Arc<PresenceTracker>,
}

/// The parts of the embedded mode that run beside the gateway: the persister's loop over
/// the in-process backplane and the SQLite store.
struct Embedded {
    backplane: Arc<MemoryBackplane>,
    store: Arc<dyn Store>,
}

/// The file of the embedded database, in the data directory.
const DATABASE_FILE: &str = "chat.sqlite3";
/// The shortest `JWT_SECRET` accepted (the generated one has 64 hex characters).
const MIN_SECRET_BYTES: usize = 32;

/// The file of the generated JWT secret, in the data directory.
const SECRET_FILE: &str = "jwt-secret";

/// The JWT secret kept in `dir`, generated on first use (readable by the owner only).
fn embedded_secret(dir: &Path) -> anyhow::Result<Secret> {
    use argon2::password_hash::rand_core::{OsRng, RngCore};
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let path = dir.join(SECRET_FILE);
    if let Ok(existing) = std::fs::read_to_string(&path) {
        let existing = existing.trim();
        anyhow::ensure!(!existing.is_empty(), "{} is empty", path.display());
        tracing::info!(path = %path.display(), "JWT_SECRET not set: using the secret kept in the data directory");
        return Ok(Secret::new(existing));
    }
    let mut bytes = [0u8; 32];
    OsRng.fill_bytes(&mut bytes);
    let secret: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .with_context(|| format!("creating {}", path.display()))?;
    file.write_all(secret.as_bytes())?;
    tracing::info!(path = %path.display(), "JWT_SECRET not set: generated a secret and kept it in the data directory");
    Ok(Secret::new(secret))
}

impl Application {
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        // The recorder first, so that the help texts land in it.
        shared::admin::prometheus();
        crate::telemetry::describe();
        let mode = settings.mode().map_err(|e| anyhow!(e))?;
        if mode == Mode::Embedded {
            // The persister runs in this process then.
            persister::describe_metrics();
            std::fs::create_dir_all(&settings.data_dir).with_context(|| {
                format!(
                    "creating the data directory {}",
                    settings.data_dir.display()
                )
            })?;
        }
        let given = settings
            .jwt_secret
            .clone()
            .filter(|s| !s.expose().is_empty());
        let secret = match (given, mode) {
            (Some(secret), _) => secret,
            (None, Mode::Embedded) => embedded_secret(&settings.data_dir)?,
            (None, Mode::Distributed) => {
                return Err(anyhow!(
                    "JWT_SECRET is required in the distributed mode: set the JWT_SECRET environment variable or --jwt-secret"
                ));
            }
        };
        // HS256 with a short secret can be brute-forced offline from any token.
        if secret.expose().len() < MIN_SECRET_BYTES {
            return Err(anyhow!(
                "JWT_SECRET must be at least {MIN_SECRET_BYTES} bytes, it has {}: generate one with `openssl rand -hex 32`",
                secret.expose().len()
            ));
        }
        // A replay is written into the socket's buffer at once; a full buffer cuts it off.
        if settings.replay_limit >= settings.socket_buffer_size as u64 {
            return Err(anyhow!(
                "REPLAY_LIMIT ({}) must be smaller than SOCKET_BUFFER_SIZE ({})",
                settings.replay_limit,
                settings.socket_buffer_size
            ));
        }
        let jwt = JwtKeys::with_claims(
            secret.expose().as_bytes(),
            settings.jwt_expires_in,
            settings.jwt_issuer.clone(),
            settings.jwt_audience.clone(),
        );

        if mode == Mode::Distributed {
            shared::backplane::check_url(&settings.redis)?;
        }
        let store: Arc<dyn Store> = match mode {
            Mode::Distributed => Arc::new(
                MongoStore::connect(&settings.mongo, "chat-gateway")
                    .await
                    .with_context(|| {
                        format!(
                            "connecting to MongoDB (MONGODB_URI, database {})",
                            settings.mongo.db
                        )
                    })?,
            ),
            Mode::Embedded => {
                let path = settings.data_dir.join(DATABASE_FILE);
                Arc::new(
                    SqliteStore::open(&path)
                        .with_context(|| format!("opening the database {}", path.display()))?,
                )
            }
        };

        // The backplane delivers room events to the sockets of this process; the Socket.IO
        // server is built after it and handed to the fan-out then.
        let fanout = Arc::new(Fanout::new());
        let sink: RoomEventSink = {
            let fanout = fanout.clone();
            Arc::new(move |event| fanout.deliver(event))
        };
        let missed: MissedSink = {
            let fanout = fanout.clone();
            Arc::new(move || fanout.missed())
        };
        let (backplane, counters, embedded): (Arc<dyn Backplane>, Arc<dyn Counters>, _) = match mode
        {
            Mode::Distributed => (
                Arc::new(
                    RedisBackplane::connect_with_sink(
                        &settings.redis,
                        &settings.ingest,
                        sink,
                        missed,
                    )
                    .await
                    .context("connecting to Redis (REDIS_URL)")?,
                ),
                Arc::new(RedisCounters::new(
                    shared::backplane::connect_client(&settings.redis)
                        .await
                        .context("connecting to Redis (REDIS_URL)")?,
                    &settings.redis.prefix,
                )),
                None,
            ),
            Mode::Embedded => {
                let memory = Arc::new(MemoryBackplane::with_limits(
                    sink,
                    MemoryLimits {
                        max_backlog: settings.ingest.max_backlog.max(1),
                        idempotency_ttl: Duration::from_secs(settings.ingest.idempotency_ttl_secs),
                        max_idempotency_keys: MAX_IDEMPOTENCY_KEYS,
                    },
                ));
                let parts = Embedded {
                    backplane: memory.clone(),
                    store: store.clone(),
                };
                (
                    memory as Arc<dyn Backplane>,
                    Arc::new(MemoryCounters::default()),
                    Some(parts),
                )
            }
        };

        let presence: Arc<dyn Presence> = match &embedded {
            Some(parts) => Arc::new(MemoryPresence::new(parts.backplane.clone())),
            None => Arc::new(RedisPresence::new(
                shared::backplane::connect_client(&settings.redis)
                    .await
                    .context("connecting to Redis (REDIS_URL)")?,
                Keys::new(&settings.redis.prefix, settings.ingest.partitions),
            )),
        };
        let presence =
            PresenceTracker::new(presence, Duration::from_secs(settings.presence_ttl_secs));
        let drain_state = Arc::new(Drain::default());
        let chat = Chat {
            store: store.clone(),
            backplane: backplane.clone(),
            jwt,
            members: Arc::new(crate::membership::MembershipCache::new(
                store.clone(),
                backplane.clone(),
                settings.membership_cache_rooms,
                Duration::from_secs(settings.membership_cache_secs),
            )),
            users: Arc::new(crate::user_lookup::UserLookup::new(store.clone())),
            presence: presence.clone(),
        };
        let rooms = RoomRegistry::new(
            backplane.clone(),
            store.clone(),
            FeedLimits {
                gap_repair_max: settings.gap_repair_max.max(1),
                replay_limit: settings.replay_limit,
            },
        );
        let limits = Arc::new(Limits {
            events: UserLimiter::new(Rate {
                per_second: settings.events_per_second,
                burst: settings.event_burst,
            }),
            joins: UserLimiter::new(Rate {
                per_second: settings.joins_per_second,
                burst: settings.join_burst,
            }),
            disconnect_after: settings.rate_limit_disconnect_after.max(1),
        });
        // The chat has no binary events: a binary packet with attachments is refused (the
        // connection closed) rather than held, unauthenticated, until its attachments come.
        let parser = ParserConfig::common()
            .max_incoming_binaries(0)
            .max_incoming_binary_buf_size(0)
            .packet_completion_timeout(Duration::from_secs(5));
        let (layer, io) = SocketIo::builder()
            .with_parser(parser)
            .max_buffer_size(settings.socket_buffer_size)
            .ping_interval(Duration::from_secs(settings.ping_interval_secs.max(1)))
            .ping_timeout(Duration::from_secs(settings.ping_timeout_secs.max(1)))
            // One limit for both transports: polling bodies and WebSocket messages.
            .max_payload(settings.max_payload_bytes)
            .ws_max_message_size(usize::try_from(settings.max_payload_bytes).unwrap_or(usize::MAX))
            .ws_max_frame_size(usize::try_from(settings.max_payload_bytes).unwrap_or(usize::MAX))
            // Each connection holds one read buffer; chat frames are small (a larger frame
            // is read in several chunks). docs/BENCHMARKS.md, "Memory per connection".
            .ws_read_buffer_size(WS_READ_BUFFER)
            .with_state(Arc::new(SocketState {
                drain: drain_state.clone(),
                chat: chat.clone(),
                rooms: rooms.clone(),
                membership_ttl: Duration::from_secs(settings.membership_cache_secs),
                limits: limits.clone(),
                connections: Arc::new(Connections::new(settings.max_connections_per_user)),
                expiries: socket::Expiries::start(),
            }))
            .build_layer();
        socket::register(&io);
        rooms.attach(io.clone());
        fanout.attach(io.clone(), rooms);

        let mut api_router = http::router(HttpState {
            chat,
            limits,
            drain: drain_state.clone(),
            hasher: Arc::new(http::hashing::Hasher::new()),
            login: LoginLimits {
                counters,
                max_failures_per_email: settings.login_max_failures_per_email,
                max_failures_per_ip: settings.login_max_failures_per_ip,
                slowdown_after: settings.login_slowdown_after,
                max_room_creations: settings.room_creations_per_user,
                max_registrations_per_ip: settings.register_max_per_ip,
                max_lookups_per_user: settings.user_lookups_per_user,
                window: Duration::from_secs(settings.login_window_secs.max(1)),
                trusted_proxy_hops: settings.trusted_proxy_hops,
            },
            max_room_participants: usize::try_from(settings.max_room_participants)
                .unwrap_or(usize::MAX),
            server_api: http::server_api::ServerApi::new(
                settings.server_api_key.as_ref(),
                &settings.server_events,
            ),
        });
        if !settings.no_web_ui {
            api_router = api_router.merge(http::web::router());
        }
        // Outside the Socket.IO layer, so that they run first: the per-address check, then
        // `socket::detach_request`, which keeps only the headers read after it.
        let slots = socket::AddressSlots::new(
            settings.max_connections_per_address,
            settings.trusted_proxy_hops,
        );
        let api_router = api_router
            .layer(layer)
            .layer(axum::middleware::map_request(socket::detach_request))
            .layer(axum::middleware::from_fn_with_state(
                slots,
                socket::admit_session,
            ));
        // Ready means this gateway can take connections and sends: Redis and its room
        // subscriptions. MongoDB is left out on purpose: a MongoDB blip would otherwise turn
        // every gateway unready at once and empty the Service, although sends and live
        // delivery still work (joins and REST reads fail with UNAVAILABLE meanwhile).
        let ready_drain = drain_state.clone();
        let admin_router = shared::admin::router(Arc::new(move || {
            let backplane = backplane.clone();
            let draining = ready_drain.is_draining();
            Box::pin(async move {
                if draining {
                    return Err("shutting down".to_owned());
                }
                backplane.ping().await.map_err(|e| format!("redis: {e}"))?;
                Ok(())
            })
        }));

        if let Some(cap) = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
            .ok()
            .and_then(|s| s.trim().parse::<u32>().ok())
            .filter(|cap| *cap < settings.listen_backlog)
        {
            // Info, not a warning: it matters only in a connect storm, and most hosts keep the
            // kernel's default.
            tracing::info!(
                listen_backlog = settings.listen_backlog,
                somaxconn = cap,
                "the kernel caps the listen backlog at net.core.somaxconn; raise it for connect storms"
            );
        }
        let api = listen(
            SocketAddr::new(settings.host, settings.port),
            settings.listen_backlog,
        )
        .with_context(|| format!("binding PORT {}", settings.port))?;
        let admin_host = settings.admin_host.unwrap_or(settings.host);
        let admin = listen(SocketAddr::new(admin_host, settings.metrics_port), 1024)
            .with_context(|| format!("binding METRICS_PORT {}", settings.metrics_port))?;

        Ok(Self {
            api,
            admin,
            api_router,
            admin_router,
            io,
            shutdown: CancellationToken::new(),
            drain: Duration::from_secs(settings.shutdown_drain_secs),
            drain_state,
            embedded,
            web_ui: !settings.no_web_ui,
            batch_size: settings.batch_size,
            limits: crate::serve::Limits {
                header: Duration::from_secs(settings.http_header_timeout_secs.max(1)),
                body: Duration::from_secs(settings.http_body_timeout_secs.max(1)),
                // Behind proxies every peer is one: the client's address is counted per
                // session then (socket::per_address).
                per_peer: if settings.trusted_proxy_hops == 0 {
                    settings.max_connections_per_address
                } else {
                    0
                },
            },
            store,
            presence,
        })
    }

    /// The Socket.IO and REST port.
    pub fn port(&self) -> u16 {
        self.api.local_addr().map(|a| a.port()).unwrap_or_default()
    }

    /// The admin port (`/metrics`, `/healthz`, `/readyz`).
    pub fn admin_port(&self) -> u16 {
        self.admin
            .local_addr()
            .map(|a| a.port())
            .unwrap_or_default()
    }

    /// Cancelling this token stops the gateway.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Serves until the shutdown token is cancelled, then closes every socket and waits
    /// for in-flight requests, at most the drain time.
    pub async fn run_until_stopped(self) -> anyhow::Result<()> {
        let address = format!("http://localhost:{}", self.port());
        match &self.embedded {
            Some(_) => tracing::info!(
                mode = "embedded",
                %address,
                admin_port = self.admin_port(),
                web_ui = self.web_ui,
                "chat server running in one process (in-process backplane and persister, SQLite store); \
                 to scale out, set REDIS_URL and MONGODB_URI and run the persister beside the gateways"
            ),
            None => tracing::info!(
                mode = "distributed",
                %address,
                admin_port = self.admin_port(),
                web_ui = self.web_ui,
                "gateway listening (Redis backplane, MongoDB store)"
            ),
        }
        // The embedded persister stops only after the gateway, so that every message
        // accepted before shutdown is stored.
        let persister_stop = CancellationToken::new();
        let persister = self.embedded.as_ref().map(|e| {
            let (backplane, store, stop, batch_size) = (
                e.backplane.clone(),
                e.store.clone(),
                persister_stop.clone(),
                self.batch_size,
            );
            let sampler = tokio::spawn(persister::sample_backlog(backplane.clone()));
            tokio::spawn(async move {
                persister::run_worker(backplane, store, batch_size, stop).await;
                sampler.abort();
            })
        });
        let presence_stop = CancellationToken::new();
        let presence = self.presence.start(presence_stop.clone());
        let shutdown = self.shutdown.clone();
        let admin = axum::serve(self.admin, self.admin_router)
            .with_graceful_shutdown(shutdown.clone().cancelled_owned());
        let admin = tokio::spawn(async move { admin.await });
        // The API stops accepting connections as soon as shutdown starts; its open
        // connections end when the sockets are closed below.
        let mut api = tokio::spawn(crate::serve::serve(
            self.api,
            self.api_router,
            self.limits,
            shutdown.clone(),
        ));

        tokio::select! {
            // Shutdown first: the API's task ends soon after it, and that is no failure.
            biased;
            _ = shutdown.cancelled() => {}
            result = &mut api => {
                admin.abort();
                result.context("API server task")?;
                return Err(anyhow!("the API server stopped by itself"));
            }
        }
        let deadline = tokio::time::Instant::now() + self.drain;
        self.drain_state.start();
        tracing::info!(
            drain_secs = self.drain.as_secs(),
            "shutting down: finishing in-flight events"
        );
        if tokio::time::timeout_at(deadline, self.drain_state.wait_idle())
            .await
            .is_err()
        {
            tracing::warn!("drain time over with events still in flight");
        }
        // Acks just written sit in each socket's buffer; socketioxide has no flush signal,
        // so the writers get a short, bounded moment before the transports close.
        let flush = tokio::time::Instant::now() + FLUSH_TIME;
        tokio::time::sleep_until(flush.min(deadline)).await;
        // Closing the transports (not the namespace) makes Socket.IO clients reconnect,
        // to another gateway behind the load balancer.
        tracing::info!("closing sockets");
        let _ = tokio::time::timeout_at(deadline, self.io.close()).await;
        // Declared gone: the other gateways take this one's users offline.
        presence_stop.cancel();
        // A moment even when the drain time is spent: without the last writes and the
        // leave, this gateway's users stay online until its heartbeat expires.
        let presence_deadline = deadline.max(tokio::time::Instant::now() + PRESENCE_LEAVE_TIME);
        let _ = tokio::time::timeout_at(presence_deadline, presence).await;
        if tokio::time::timeout_at(deadline, &mut api).await.is_err() {
            tracing::warn!("drain time over, exiting with connections open");
            api.abort();
        }
        admin.abort();
        if let (Some(embedded), Some(persister)) = (&self.embedded, persister) {
            // Store what was accepted and is still queued, within the drain time.
            while embedded.backplane.queued() > 0 && tokio::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            let left = embedded.backplane.queued();
            if left > 0 {
                tracing::error!(
                    messages = left,
                    "drain time over: accepted messages were not stored"
                );
            }
            persister_stop.cancel();
            let _ = persister.await;
        }
        self.store.close().await;
        tracing::info!("gateway stopped");
        Ok(())
    }
}
