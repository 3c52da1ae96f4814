//! The persister's command line: every setting is a flag and an environment variable.

use clap::Parser;
use shared::backplane::IngestSettings;
use shared::config::{MongoSettings, RedisSettings, TelemetrySettings};
use std::net::IpAddr;

/// Stores chat messages from the ingest partitions in MongoDB.
#[derive(Parser, Debug, Clone)]
#[command(name = "persister", version, about)]
// The shared settings' local defaults, and out of the help the gateway's own (they are
// still read, so that one environment can serve both).
#[command(
    mut_arg("url", |a| a.default_value("redis://127.0.0.1:6379")),
    mut_arg("uri", |a| a.default_value("mongodb://127.0.0.1:27017")),
    mut_arg("pubsub_capacity", |a| a.hide(true)),
    mut_arg("max_backlog", |a| a.hide(true)),
    mut_arg("idempotency_ttl_secs", |a| a.hide(true)),
)]
pub struct Settings {
    /// Address the admin server listens on when ADMIN_HOST is not set.
    #[arg(long, env = "HOST", default_value = "0.0.0.0")]
    pub host: IpAddr,
    /// Address of the admin server (`/metrics`, `/healthz`, `/readyz`, without
    /// authentication); default: HOST. Bind it to a private interface, or keep the port
    /// off public networks (the Helm chart admits it from the release's namespace only). The
    /// container HEALTHCHECK probes it on 127.0.0.1.
    #[arg(long = "admin-host", env = "ADMIN_HOST")]
    pub admin_host: Option<IpAddr>,
    /// Port of the admin server: `/metrics`, `/healthz`, `/readyz` (0 picks a free port).
    #[arg(long, env = "METRICS_PORT", default_value_t = 9101)]
    pub metrics_port: u16,
    /// Probe this persister's `/healthz` on METRICS_PORT of this machine and exit 0 when it
    /// answers (the container image's HEALTHCHECK).
    #[arg(long)]
    pub healthcheck: bool,
    /// Name of this persister in logs and in its instance id (the pod name; default
    /// `$HOSTNAME`, else `persister`). Each process adds a random suffix, so two processes
    /// never share an identity even with the same name.
    #[arg(long, env = "PERSISTER_NAME", default_value_t = default_name())]
    pub name: String,
    /// Most messages stored in one `insert_many`.
    #[arg(long, env = "BATCH_SIZE", default_value_t = 500)]
    pub batch_size: usize,
    /// How long one read waits for new messages, in milliseconds (at most LEASE_MS / 4).
    #[arg(long, env = "READ_BLOCK_MS", default_value_t = 1000)]
    pub read_block_ms: u64,
    /// Partition lease, in milliseconds: a persister that stops renewing (crash, pause,
    /// network cut) loses its partitions to the others within this time.
    #[arg(long, env = "LEASE_MS", default_value_t = 10_000)]
    pub lease_ms: u64,
    #[command(flatten)]
    pub redis: RedisSettings,
    #[command(flatten)]
    pub ingest: IngestSettings,
    #[command(flatten)]
    pub mongo: MongoSettings,
    #[command(flatten)]
    pub telemetry: TelemetrySettings,
}

fn default_name() -> String {
    std::env::var("HOSTNAME").unwrap_or_else(|_| "persister".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn help_lists_only_what_a_persister_uses() {
        Settings::command().debug_assert();
        let help = Settings::command().render_long_help().to_string();
        for gateway_only in [
            "INGEST_MAX_BACKLOG",
            "IDEMPOTENCY_TTL_SECS",
            "REDIS_PUBSUB_CAPACITY",
            "distributed mode",
        ] {
            assert!(!help.contains(gateway_only), "{gateway_only}: {help}");
        }
        assert!(help.contains("[default: redis://127.0.0.1:6379]"), "{help}");
        assert!(
            help.contains("[default: mongodb://127.0.0.1:27017]"),
            "{help}"
        );
        assert_eq!(
            help.matches("Address of the admin server").count(),
            1,
            "{help}"
        );
    }
}
