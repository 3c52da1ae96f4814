//! What the Redis implementations share: building clients from `REDIS_URL`, the Lua scripts,
//! error codes, and the check that every process agrees on the partition count.

use super::{BackplaneError, Keys};
use crate::config::RedisSettings;
use fred::prelude::*;
use fred::types::ConnectHandle;
use fred::types::scripts::Script;
use std::sync::LazyLock;
use std::time::Duration;

/// Redis commands that do not answer within this time fail with `UNAVAILABLE`.
pub(super) const COMMAND_TIMEOUT: Duration = Duration::from_secs(3);

/// Slots of each event channel (errors, reconnections, pub/sub messages…) of a client that
/// subscribes to nothing: only connection events pass there. fred keeps several such
/// channels per client, each slot sized for a pub/sub message, so the subscriber's large
/// capacity (`REDIS_PUBSUB_CAPACITY`) on every client would cost tens of megabytes each.
const COMMAND_CLIENT_EVENTS: usize = 16;

/// A command client builder for `REDIS_URL`: one node (`redis://`) or a cluster
/// (`redis-cluster://host:port?node=host:port&…`), reconnecting forever.
fn builder(settings: &RedisSettings) -> Result<Builder, BackplaneError> {
    builder_with_capacity(settings, COMMAND_CLIENT_EVENTS)
}

/// The builder of the subscriber: its pub/sub messages wait in a channel of
/// `REDIS_PUBSUB_CAPACITY` slots for the fan-out.
pub(super) fn subscriber_builder(settings: &RedisSettings) -> Result<Builder, BackplaneError> {
    builder_with_capacity(settings, settings.pubsub_capacity)
}

/// Checks REDIS_URL without connecting: a process refuses a mistyped URL at once, before it
/// waits for anything.
pub fn check_url(settings: &RedisSettings) -> Result<(), BackplaneError> {
    redis_config(settings).map(drop)
}

fn redis_config(settings: &RedisSettings) -> Result<Config, BackplaneError> {
    // Without one of its TLS features the client library would connect in plain text to a
    // `rediss://` URL (with a warning): refuse it rather than drop the encryption asked for.
    // The URL itself is never in a message: it may hold a password.
    const FORMS: &str = "redis://[user:password@]host:port[/db] or \
        redis-cluster://[user:password@]host:port?node=host:port";
    let Some((scheme, _)) = settings.url().split_once("://") else {
        return Err(BackplaneError::Config(format!(
            "REDIS_URL is not a URL; expected {FORMS}"
        )));
    };
    if scheme.starts_with("rediss") || scheme.starts_with("valkeys") {
        return Err(BackplaneError::Config(format!(
            "REDIS_URL asks for TLS ({scheme}://), which this build does not support; use redis:// or redis-cluster://"
        )));
    }
    if !matches!(
        scheme,
        "redis" | "redis-cluster" | "valkey" | "valkey-cluster"
    ) {
        return Err(BackplaneError::Config(format!(
            "REDIS_URL has the scheme {scheme}://, not a Redis one; expected {FORMS}"
        )));
    }
    Config::from_url(settings.url()).map_err(|e| {
        BackplaneError::Config(format!(
            "REDIS_URL is invalid ({}); expected {FORMS}",
            e.details()
        ))
    })
}

fn builder_with_capacity(
    settings: &RedisSettings,
    events: usize,
) -> Result<Builder, BackplaneError> {
    let mut config = redis_config(settings)?;
    // The first connection retries as later ones do, for CONNECT_WAIT at most (`init`).
    config.fail_fast = false;
    let mut builder = Builder::from_config(config);
    builder
        .with_performance_config(|p| {
            p.broadcast_channel_capacity = events;
            p.default_command_timeout = COMMAND_TIMEOUT;
        })
        .with_connection_config(|c| {
            c.connection_timeout = Duration::from_secs(5);
            // Retry a command once after a reconnect; callers see an error rather than a hang.
            c.max_command_attempts = 2;
        })
        // Reconnect forever: 100 ms doubling up to 2 s between attempts.
        .set_policy(ReconnectPolicy::new_exponential(0, 100, 2_000, 2));
    Ok(builder)
}

/// Restarts a client's routing task whenever it ends by itself.
///
/// fred 10 ends a client's routing task when following a redirection fails (seen when a
/// slot moved to another master: an `ASK` that ran out of attempts, "Max attempts
/// reached"). The client is then dead without saying so: every later command waits in its
/// queue until it times out, and a persister stalled on all its partitions until restarted.
/// A task that ends without being asked to (an error that is not a cancellation; `quit`
/// cancels) is started again after a short pause.
pub(crate) fn supervise<C: ClientLike + Clone + Send + 'static>(client: C, task: ConnectHandle) {
    tokio::spawn(async move {
        let mut task = task;
        loop {
            match task.await {
                Ok(Ok(())) => return,
                Ok(Err(error)) if error.is_canceled() => return,
                Ok(Err(error)) => {
                    tracing::warn!(client = client.id(), %error, "Redis client's routing task ended: restarting it");
                }
                Err(error) => {
                    tracing::warn!(client = client.id(), %error, "Redis client's routing task failed: restarting it");
                }
            }
            metrics::counter!("chat_redis_client_restarts_total").increment(1);
            tokio::time::sleep(Duration::from_millis(100)).await;
            task = client.connect();
        }
    });
}

/// A connected command client, its routing task supervised ([`supervise`]).
pub async fn connect_client(settings: &RedisSettings) -> Result<Client, BackplaneError> {
    let client = builder(settings)?.build()?;
    let task = init(&client).await?;
    supervise(client.clone(), task);
    Ok(client)
}

/// How long a new client waits for Redis. A process started while Redis restarts or fails
/// over (a cluster master down, its replica not yet promoted) waits for it, not ready
/// meanwhile, instead of exiting at once and being restarted with a growing back-off.
pub(super) const CONNECT_WAIT: Duration = Duration::from_secs(30);

/// Connects a client: `Ok` once connected, an error past [`CONNECT_WAIT`].
pub(super) async fn init<C: ClientLike>(client: &C) -> Result<ConnectHandle, BackplaneError> {
    match tokio::time::timeout(CONNECT_WAIT, client.init()).await {
        Ok(connected) => Ok(connected?),
        Err(_) => {
            let _ = client.quit().await;
            Err(BackplaneError::Redis(fred::error::Error::new(
                fred::error::ErrorKind::Timeout,
                format!(
                    "no connection within {} s: is Redis up at the address REDIS_URL gives?",
                    CONNECT_WAIT.as_secs()
                ),
            )))
        }
    }
}

/// The Lua scripts, run by SHA (loaded again by fred after a `NOSCRIPT`, e.g. on a new
/// master after a failover).
pub(super) struct Scripts {
    pub append: Script,
    pub acquire: Script,
    pub renew: Script,
    pub release: Script,
    pub read: Script,
    pub complete: Script,
    pub heartbeat: Script,
    pub count: Script,
    pub uncount: Script,
    pub seed: Script,
    pub renumber: Script,
    pub presence: Script,
    pub presence_heartbeat: Script,
}

pub(super) static SCRIPTS: LazyLock<Scripts> = LazyLock::new(|| Scripts {
    append: Script::from_lua(include_str!("scripts/append.lua")),
    acquire: Script::from_lua(include_str!("scripts/acquire.lua")),
    renew: Script::from_lua(include_str!("scripts/renew.lua")),
    release: Script::from_lua(include_str!("scripts/release.lua")),
    read: Script::from_lua(include_str!("scripts/read.lua")),
    complete: Script::from_lua(include_str!("scripts/complete.lua")),
    heartbeat: Script::from_lua(include_str!("scripts/heartbeat.lua")),
    count: Script::from_lua(include_str!("scripts/count.lua")),
    uncount: Script::from_lua(include_str!("scripts/uncount.lua")),
    seed: Script::from_lua(include_str!("scripts/seed.lua")),
    renumber: Script::from_lua(include_str!("scripts/renumber.lua")),
    presence: Script::from_lua(include_str!("scripts/presence.lua")),
    presence_heartbeat: Script::from_lua(include_str!("scripts/presence_heartbeat.lua")),
});

/// A connected command client, after checking that Redis holds `keys`' partition count,
/// and warning about settings of Redis that break the durability promise.
pub(super) async fn connect_checked(
    settings: &RedisSettings,
    keys: &Keys,
) -> Result<Client, BackplaneError> {
    let client = connect_client(settings).await?;
    check_partitions(&client, keys).await?;
    for warning in durability_warnings(&client).await {
        tracing::warn!("{warning}");
    }
    Ok(client)
}

/// What in Redis's configuration breaks "an acknowledged message is never lost": an
/// eviction policy (Redis would drop ingest entries, leases or counters when full) and no
/// append-only file (a restart loses what was accepted and not yet stored). Empty when both
/// are right, or when `CONFIG GET` is refused (managed services): then nothing can be said.
/// On a cluster, the node asked speaks for all.
pub async fn durability_warnings(client: &Client) -> Vec<String> {
    let mut warnings = Vec::new();
    let get = |name: &'static str| async move {
        let reply: Result<std::collections::HashMap<String, String>, _> =
            client.config_get(name).await;
        match reply {
            Ok(map) => map.get(name).cloned(),
            Err(error) => {
                tracing::debug!(%error, name, "cannot read Redis's configuration");
                None
            }
        }
    };
    if let Some(policy) = get("maxmemory-policy").await
        && policy != "noeviction"
    {
        warnings.push(format!(
            "Redis maxmemory-policy is {policy}: when full, Redis may evict ingest entries, \
             partition leases or counters and lose acknowledged messages; set noeviction"
        ));
    }
    if let Some(aof) = get("appendonly").await
        && aof != "yes"
    {
        warnings.push(
            "Redis appendonly is no: a Redis restart loses the messages accepted and not yet \
             stored; set appendonly yes"
                .to_owned(),
        );
    }
    warnings
}

/// Records the partition count on first use and refuses a process configured with another
/// one: rooms would map to other partitions, and their order would break.
async fn check_partitions(client: &Client, keys: &Keys) -> Result<(), BackplaneError> {
    let record = keys.partitions_record();
    let _: Option<String> = client
        .set(
            &record,
            keys.partitions().to_string(),
            None,
            Some(SetOptions::NX),
            false,
        )
        .await?;
    let recorded: Option<String> = client.get(&record).await?;
    match recorded.as_deref().map(str::parse::<u16>) {
        Some(Ok(n)) if n == keys.partitions() => Ok(()),
        Some(Ok(n)) => Err(BackplaneError::Config(format!(
            "INGEST_PARTITIONS is {} but this Redis holds {n} ingest partitions (key {record}); \
             start every gateway and persister with INGEST_PARTITIONS={n}",
            keys.partitions()
        ))),
        other => Err(BackplaneError::Malformed(format!(
            "{record} holds {other:?}"
        ))),
    }
}

/// Waits until `replicas` replicas of the master that owns `key` have every write this
/// client's connection to that master made so far (Redis `WAIT`).
pub(super) async fn wait_for_replicas(
    client: &Client,
    key: &str,
    replicas: u32,
    timeout: Duration,
) -> Result<(), BackplaneError> {
    let wanted = i64::from(replicas);
    let timeout = i64::try_from(timeout.as_millis())
        .unwrap_or(i64::MAX)
        .max(1);
    let confirmed: i64 = if client.is_clustered() {
        // WAIT has no key: route it to the connection the write went over.
        let slot = fred::util::redis_keyslot(key.as_bytes());
        let server = client
            .cached_cluster_state()
            .and_then(|state| state.get_server(slot).cloned())
            .ok_or_else(|| {
                BackplaneError::Malformed(format!("no cluster node owns slot {slot}"))
            })?;
        client
            .with_cluster_node(server)
            .wait(wanted, timeout)
            .await?
    } else {
        client.wait(wanted, timeout).await?
    };
    if confirmed < wanted {
        return Err(BackplaneError::NotReplicated { confirmed, wanted });
    }
    Ok(())
}

/// Takes one back from a fixed-window counter that still exists (`uncount.lua`).
pub(crate) async fn uncount_script(client: &Client, key: &str) -> Result<i64, fred::error::Error> {
    SCRIPTS
        .uncount
        .evalsha_with_reload(client, vec![key.to_owned()], Vec::<String>::new())
        .await
}

/// Adds one to a fixed-window counter (`count.lua`); returns the new count.
pub(crate) async fn count_script(
    client: &Client,
    key: &str,
    window: Duration,
) -> Result<u64, fred::error::Error> {
    SCRIPTS
        .count
        .evalsha_with_reload(
            client,
            vec![key.to_owned()],
            vec![window.as_millis().to_string()],
        )
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(url: &str) -> RedisSettings {
        RedisSettings {
            url: Some(url.to_owned()),
            prefix: "chat".into(),
            pubsub_capacity: 16,
        }
    }

    #[test]
    fn urls_are_checked_at_start() {
        assert!(builder(&settings("redis://127.0.0.1:6379")).is_ok());
        assert!(
            builder(&settings(
                "redis-cluster://127.0.0.1:7000?node=127.0.0.1:7001"
            ))
            .is_ok()
        );
        for tls in ["rediss://h:6379", "rediss-cluster://h:7000"] {
            let Err(BackplaneError::Config(why)) = builder(&settings(tls)) else {
                panic!("{tls} accepted");
            };
            assert!(why.contains("TLS"), "{why}");
        }
        for wrong in [
            "http://127.0.0.1:6379",
            "127.0.0.1:6379",
            "localhost",
            "redis://user:secret@:6379:x",
        ] {
            let Err(BackplaneError::Config(why)) = builder(&settings(wrong)) else {
                panic!("{wrong} accepted");
            };
            assert!(
                why.starts_with("REDIS_URL ") && why.contains("redis://"),
                "{why}"
            );
            assert!(
                !why.contains("secret") && !why.contains("Relative"),
                "{why}"
            );
        }
    }
}
