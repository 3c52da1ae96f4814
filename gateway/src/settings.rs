//! Gateway settings: every one a flag and an environment variable.

use clap::Parser;
use shared::backplane::IngestSettings;
use shared::config::{MongoSettings, RedisSettings, Secret, TelemetrySettings};
use std::net::IpAddr;
use std::path::PathBuf;

/// Socket.IO + REST chat gateway.
#[derive(Parser, Debug, Clone)]
#[command(name = "gateway", version, about)]
pub struct Settings {
    /// Address to listen on.
    #[arg(long, env = "HOST", default_value = "0.0.0.0")]
    pub host: IpAddr,
    /// Port of the Socket.IO and REST API (0 picks a free port).
    #[arg(long, env = "PORT", default_value_t = 3000)]
    pub port: u16,
    /// Address of the admin server (`/metrics`, `/healthz`, `/readyz`, without
    /// authentication); default: HOST. Bind it to a private interface, or keep the port
    /// off public networks (the Helm chart admits it from the release's namespace only). The
    /// container HEALTHCHECK probes it on 127.0.0.1.
    #[arg(long = "admin-host", env = "ADMIN_HOST")]
    pub admin_host: Option<IpAddr>,
    /// Port of the admin server: `/metrics`, `/healthz`, `/readyz` (0 picks a free port).
    #[arg(long, env = "METRICS_PORT", default_value_t = 9100)]
    pub metrics_port: u16,
    /// Probe this gateway's `/healthz` on METRICS_PORT of this machine and exit 0 when it
    /// answers (the container image's HEALTHCHECK).
    #[arg(long)]
    pub healthcheck: bool,
    /// Run the whole chat server in this process: an in-process backplane and persister and
    /// a SQLite store in --data-dir. The default when neither REDIS_URL nor MONGODB_URI is set.
    #[arg(long, env = "EMBEDDED")]
    pub embedded: bool,
    /// Where the embedded mode keeps its database and its generated JWT secret.
    #[arg(long, env = "DATA_DIR", default_value = "data")]
    pub data_dir: PathBuf,
    /// Embedded mode: most messages the in-process persister stores in one transaction. A
    /// batch reaches each member socket as one burst, so keep SOCKET_BUFFER_SIZE above it.
    #[arg(long, env = "BATCH_SIZE", default_value_t = 500)]
    pub batch_size: usize,
    /// Do not serve the browser chat page at `/`.
    #[arg(long, env = "NO_WEB_UI")]
    pub no_web_ui: bool,
    /// Secret that signs access tokens (HS256). Required in the distributed mode; the
    /// embedded mode generates one in --data-dir when it is not set.
    #[arg(long, env = "JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<Secret>,
    /// When set, issued tokens carry this `iss`, and a token without it is refused.
    #[arg(long, env = "JWT_ISSUER")]
    pub jwt_issuer: Option<String>,
    /// When set, issued tokens carry this `aud`, and a token without it is refused.
    #[arg(long, env = "JWT_AUDIENCE")]
    pub jwt_audience: Option<String>,
    /// Lifetime of issued access tokens, in seconds.
    #[arg(long, env = "JWT_EXPIRES_IN", default_value_t = 3600, value_parser = clap::value_parser!(i64).range(1..))]
    pub jwt_expires_in: i64,
    /// TCP listen backlog. Large enough that a storm of simultaneous connects is queued,
    /// not refused (the kernel caps it at `net.core.somaxconn`).
    #[arg(long, env = "LISTEN_BACKLOG", default_value_t = 16_384)]
    pub listen_backlog: u32,
    /// Packets buffered per socket on their way to the client. A socket whose buffer is
    /// full is disconnected as a slow consumer (counted and logged), never fed partially.
    #[arg(long, env = "SOCKET_BUFFER_SIZE", default_value_t = 1024)]
    pub socket_buffer_size: usize,
    /// Engine.IO heartbeat: seconds between pings.
    #[arg(long, env = "PING_INTERVAL_SECS", default_value_t = 25)]
    pub ping_interval_secs: u64,
    /// Engine.IO heartbeat: seconds without a pong before the connection is closed. It also
    /// bounds how long a slow consumer whose buffer stays full keeps its connection.
    #[arg(long, env = "PING_TIMEOUT_SECS", default_value_t = 20)]
    pub ping_timeout_secs: u64,
    /// Longest time from a connection starting to wait for a request to the end of its
    /// headers, in seconds; past it the connection is closed (a client trickling bytes holds
    /// it no longer). An idle keep-alive connection closes after it too, so it is above the
    /// 60 s idle timeout of common load balancers: a balancer must close first, or it may
    /// send a request on a connection the gateway is closing.
    #[arg(long, env = "HTTP_HEADER_TIMEOUT_SECS", default_value_t = 65)]
    pub http_header_timeout_secs: u64,
    /// Longest time to receive an HTTP request's whole body, in seconds (past it, 408), and
    /// the longest a write waits for the client to read (past it the connection is closed).
    #[arg(long, env = "HTTP_BODY_TIMEOUT_SECS", default_value_t = 30)]
    pub http_body_timeout_secs: u64,
    /// Largest Socket.IO / Engine.IO payload accepted from a client, in bytes.
    #[arg(long, env = "MAX_PAYLOAD_BYTES", default_value_t = 100_000)]
    pub max_payload_bytes: u64,
    /// How long a verified room membership is trusted by a socket before MongoDB is asked
    /// again, and a gateway's cached participant list at most, in seconds.
    #[arg(long, env = "MEMBERSHIP_CACHE_SECS", default_value_t = 30)]
    pub membership_cache_secs: u64,
    /// Rooms whose participants a gateway keeps for the checks of joins and sends (read
    /// again after any removal; see docs/RELIABILITY.md).
    #[arg(long, env = "MEMBERSHIP_CACHE_ROOMS", default_value_t = 10_000)]
    pub membership_cache_rooms: usize,
    /// On SIGTERM, how long in-flight work may take before the process exits, in seconds.
    #[arg(long, env = "SHUTDOWN_DRAIN_SECS", default_value_t = 10)]
    pub shutdown_drain_secs: u64,
    /// Sustained `send_message` + `typing` events (and REST message posts) per second allowed
    /// per user, across all of the user's sockets on a gateway; over it an event is refused
    /// with `RATE_LIMITED` (REST: 429).
    #[arg(long, env = "EVENTS_PER_SECOND", default_value_t = 20.0, value_parser = shared::config::positive_rate)]
    pub events_per_second: f64,
    /// Events a user may send at once above the sustained rate.
    #[arg(long, env = "EVENT_BURST", default_value_t = 40.0, value_parser = shared::config::positive_rate)]
    pub event_burst: f64,
    /// A gateway that dies (its process killed, its machine gone) has its users shown
    /// offline in their rooms within this many seconds. Each gateway writes one heartbeat
    /// every quarter of it, whatever it holds.
    #[arg(long, env = "PRESENCE_TTL_SECS", default_value_t = 30, value_parser = clap::value_parser!(u64).range(2..))]
    pub presence_ttl_secs: u64,
    /// Sustained `join_room` + `leave_room` (and `get_presence`) events per second allowed
    /// per user.
    #[arg(long, env = "JOINS_PER_SECOND", default_value_t = 10.0, value_parser = shared::config::positive_rate)]
    pub joins_per_second: f64,
    /// Joins and leaves a user may send at once above the sustained rate (a client that
    /// reconnects rejoins all its rooms at once).
    #[arg(long, env = "JOIN_BURST", default_value_t = 200.0, value_parser = shared::config::positive_rate)]
    pub join_burst: f64,
    /// Refused events in a row after which the connection is closed.
    #[arg(long, env = "RATE_LIMIT_DISCONNECT_AFTER", default_value_t = 50)]
    pub rate_limit_disconnect_after: u32,
    /// Most simultaneous connections of one user to one gateway.
    #[arg(long, env = "MAX_CONNECTIONS_PER_USER", default_value_t = 20)]
    pub max_connections_per_user: usize,
    /// Socket.IO connections (Engine.IO sessions, authenticated or not) per client address
    /// on a gateway; the address as `TRUSTED_PROXY_HOPS` defines it. Past it, a new
    /// connection is refused with 429. 0 turns the bound off (load tests from a few addresses).
    #[arg(long, env = "MAX_CONNECTIONS_PER_ADDRESS", default_value_t = 1000)]
    pub max_connections_per_address: usize,
    /// Failed logins for one e-mail from one client address within `LOGIN_WINDOW_SECS` after
    /// which that address's logins for it are refused with 429 until the window ends (from
    /// another address the owner still logs in).
    #[arg(long, env = "LOGIN_MAX_FAILURES_PER_EMAIL", default_value_t = 10)]
    pub login_max_failures_per_email: u64,
    /// Failed logins for one e-mail from any address within `LOGIN_WINDOW_SECS` after which
    /// each login for it waits 250 ms more (at most 5 s) before its password is checked:
    /// guessing slows down everywhere, and nobody is locked out.
    #[arg(long, env = "LOGIN_SLOWDOWN_AFTER", default_value_t = 5)]
    pub login_slowdown_after: u64,
    /// Failed logins from one client address within `LOGIN_WINDOW_SECS` after which its
    /// logins are refused with 429 until the window ends.
    #[arg(long, env = "LOGIN_MAX_FAILURES_PER_IP", default_value_t = 100)]
    pub login_max_failures_per_ip: u64,
    /// Registrations from one client address within `LOGIN_WINDOW_SECS` after which they
    /// are refused with 429 until the window ends.
    #[arg(long, env = "REGISTER_MAX_PER_IP", default_value_t = 20)]
    pub register_max_per_ip: u64,
    /// `GET /users?email=` and `GET /users/:id` lookups (and answers naming an unknown user
    /// id) per user within `LOGIN_WINDOW_SECS`, after which they are refused with 429 until
    /// the window ends.
    #[arg(long, env = "USER_LOOKUPS_PER_USER", default_value_t = 100)]
    pub user_lookups_per_user: u64,
    /// Rooms one user may create within `LOGIN_WINDOW_SECS`; past it, 429 until the window
    /// ends.
    #[arg(long, env = "ROOM_CREATIONS_PER_USER", default_value_t = 30)]
    pub room_creations_per_user: u64,
    /// Most participants of a room: creating a room with more, or adding one to a full room,
    /// is refused. Every joined room costs each gateway a feed and a subscription.
    #[arg(long, env = "MAX_ROOM_PARTICIPANTS", default_value_t = 1000, value_parser = clap::value_parser!(u64).range(2..=100_000))]
    pub max_room_participants: u64,
    /// Window of the login, registration, lookup and room-creation counters, in seconds.
    #[arg(long, env = "LOGIN_WINDOW_SECS", default_value_t = 900)]
    pub login_window_secs: u64,
    /// How many proxies in front of the gateway append the client's address to
    /// `X-Forwarded-For` (1 behind HAProxy or ingress-nginx). The client address used by the
    /// login limits is the entry that many places from the right; 0 ignores the header.
    #[arg(long, env = "TRUSTED_PROXY_HOPS", default_value_t = 0)]
    pub trusted_proxy_hops: usize,
    /// Most missing messages of one room a gateway reads from the store to fill a gap in
    /// its live delivery; past it the room's sockets get `resync` and catch up by joining
    /// again with `afterSeq`.
    #[arg(long, env = "GAP_REPAIR_MAX", default_value_t = 1000)]
    pub gap_repair_max: u64,
    /// Most messages replayed to a socket that joins with `afterSeq`; the ack says
    /// `hasMore` when more follow. Must be smaller than `SOCKET_BUFFER_SIZE` (the replay is
    /// written into the socket's buffer at once).
    #[arg(long, env = "REPLAY_LIMIT", default_value_t = 500)]
    pub replay_limit: u64,
    /// Key that backend services send as `Authorization: Bearer <key>` to the server API
    /// (`POST /server/rooms/:roomId/events`): at least 32 bytes. While it is unset (or
    /// empty) the route does not exist.
    #[arg(long, env = "SERVER_API_KEY", hide_env_values = true, value_parser = crate::http::server_api::parse_key)]
    pub server_api_key: Option<Secret>,
    /// Events the server API accepts, comma-separated; members receive each under its name.
    #[arg(
        long,
        env = "SERVER_EVENTS",
        default_value = "file_uploaded,file_unlocked",
        value_delimiter = ',',
        value_parser = crate::http::server_api::parse_event_name
    )]
    pub server_events: Vec<String>,
    #[command(flatten)]
    pub redis: RedisSettings,
    #[command(flatten)]
    pub ingest: IngestSettings,
    #[command(flatten)]
    pub mongo: MongoSettings,
    #[command(flatten)]
    pub telemetry: TelemetrySettings,
}

/// How the gateway runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// One process: in-process backplane and persister, SQLite store.
    Embedded,
    /// Many gateways and a persister around one Redis and one MongoDB.
    Distributed,
}

impl Settings {
    /// The mode these settings select, or why they select none.
    pub fn mode(&self) -> Result<Mode, String> {
        // An empty variable (`REDIS_URL=` in a compose file) counts as unset.
        let set = |v: &Option<String>| v.as_deref().is_some_and(|v| !v.trim().is_empty());
        let (redis, mongo) = (set(&self.redis.url), set(&self.mongo.uri));
        match (self.embedded, redis, mongo) {
            (true, false, false) | (false, false, false) => Ok(Mode::Embedded),
            (true, _, _) => Err(
                "--embedded cannot be combined with REDIS_URL or MONGODB_URI: unset them, or drop --embedded for the distributed mode".into(),
            ),
            (false, true, true) => Ok(Mode::Distributed),
            (false, true, false) => Err(
                "REDIS_URL is set but MONGODB_URI is not: the distributed mode needs both (unset both for the embedded mode)".into(),
            ),
            (false, false, true) => Err(
                "MONGODB_URI is set but REDIS_URL is not: the distributed mode needs both (unset both for the embedded mode)".into(),
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(args: &[&str]) -> Result<Mode, String> {
        Settings::try_parse_from(std::iter::once("gateway").chain(args.iter().copied()))
            .unwrap()
            .mode()
    }

    #[test]
    fn urls_select_the_mode() {
        // Only when neither variable is in the environment of the test run.
        if std::env::var_os("REDIS_URL").is_some() || std::env::var_os("MONGODB_URI").is_some() {
            return;
        }
        assert_eq!(mode(&[]), Ok(Mode::Embedded));
        assert_eq!(mode(&["--embedded"]), Ok(Mode::Embedded));
        assert_eq!(
            mode(&["--redis-url", "", "--mongodb-uri", " "]),
            Ok(Mode::Embedded)
        );
        assert_eq!(
            mode(&["--redis-url", "redis://r", "--mongodb-uri", "mongodb://m"]),
            Ok(Mode::Distributed)
        );
        assert!(
            mode(&["--redis-url", "redis://r"])
                .unwrap_err()
                .contains("MONGODB_URI is not")
        );
        assert!(
            mode(&["--mongodb-uri", "mongodb://m"])
                .unwrap_err()
                .contains("REDIS_URL is not")
        );
        assert!(mode(&["--embedded", "--mongodb-uri", "mongodb://m"]).is_err());
    }

    #[test]
    fn help_and_values_say_what_applies() {
        use clap::CommandFactory;
        let help = Settings::command().render_long_help().to_string();
        // Without REDIS_URL the gateway runs embedded: no Redis default to show.
        assert!(!help.contains("redis://127.0.0.1:6379"), "{help}");
        assert!(!help.contains("every token must"), "{help}");
        for wrong in [
            ["--events-per-second", "-1"],
            ["--event-burst", "0"],
            ["--joins-per-second", "NaN"],
            ["--join-burst", "x"],
            ["--jwt-expires-in", "0"],
        ] {
            let parsed =
                Settings::try_parse_from(std::iter::once("gateway").chain(wrong.iter().copied()));
            assert!(parsed.is_err(), "{wrong:?} accepted");
        }
    }
}
