//! Settings shared by the gateway and the persister. Every setting is a flag and an
//! environment variable; `--help` shows the defaults.

use clap::{Args, ValueEnum};
use std::fmt;

/// Where Redis is and how our names in it start.
#[derive(Args, Debug, Clone)]
pub struct RedisSettings {
    /// Redis URL: one node, `redis://[user:password@]host:port[/db]`, or a Redis Cluster,
    /// `redis-cluster://[user:password@]host:port?node=host:port&node=host:port`. Its value
    /// is never printed: it may hold a password.
    #[arg(long = "redis-url", env = "REDIS_URL", hide_env_values = true)]
    pub url: Option<String>,
    /// Prefix of every Redis key and channel this service uses.
    #[arg(long = "redis-prefix", env = "REDIS_PREFIX", default_value = "chat")]
    pub prefix: String,
    /// Pub/sub messages buffered between the Redis connection and the fan-out task.
    /// When the fan-out falls this far behind, the overflow is counted in
    /// `chat_gateway_backplane_lagged_total` and logged (never dropped silently), and the
    /// rooms repair their messages from the store. The buffer is allocated whole at start
    /// (in each of the subscriber client's event channels): 65,536 slots cost 36 MB of RSS
    /// before the first client. The bench's fan-out bursts peaked at 73 waiting messages
    /// (`chat_gateway_backplane_pubsub_backlog_max_messages`, docs/BENCHMARKS.md).
    #[arg(
        long = "redis-pubsub-capacity",
        env = "REDIS_PUBSUB_CAPACITY",
        default_value_t = 4_096
    )]
    pub pubsub_capacity: usize,
}

/// Where MongoDB is.
#[derive(Args, Debug, Clone)]
pub struct MongoSettings {
    /// MongoDB connection string, `mongodb://[user:password@]host:port[,host:port]`. Its
    /// value is never printed: it may hold a password.
    #[arg(long = "mongodb-uri", env = "MONGODB_URI", hide_env_values = true)]
    pub uri: Option<String>,
    /// Database name.
    #[arg(long = "mongodb-db", env = "MONGODB_DB", default_value = "chat")]
    pub db: String,
}

impl RedisSettings {
    /// The URL, or the local default.
    pub fn url(&self) -> &str {
        self.url.as_deref().unwrap_or("redis://127.0.0.1:6379")
    }
}

impl MongoSettings {
    /// The connection string, or the local default.
    pub fn uri(&self) -> &str {
        self.uri.as_deref().unwrap_or("mongodb://127.0.0.1:27017")
    }
}

/// Log output format.
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// Logging settings. The filter itself comes from `RUST_LOG` (default `info`).
#[derive(Args, Debug, Clone)]
pub struct TelemetrySettings {
    /// `text` or `json`.
    #[arg(long = "log-format", env = "LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

/// A rate: a finite number above zero (clap's value parser).
pub fn positive_rate(value: &str) -> Result<f64, String> {
    match value.parse::<f64>() {
        Ok(rate) if rate.is_finite() && rate > 0.0 => Ok(rate),
        _ => Err("expected a number above 0".to_owned()),
    }
}

/// A secret string whose `Debug` and `Display` never show the value.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl std::str::FromStr for Secret {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Self(s.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn rates_are_numbers_above_zero() {
        assert_eq!(super::positive_rate("2.5"), Ok(2.5));
        for wrong in ["-1", "0", "NaN", "inf", "x", ""] {
            assert!(super::positive_rate(wrong).is_err(), "{wrong}");
        }
    }
}
