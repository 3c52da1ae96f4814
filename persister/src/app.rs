//! Building and running a persister: connections, the admin server, the balancer.

use crate::balance::{Persister, Tuning};
use crate::metrics::{describe_metrics, sample_backlog};
use crate::settings::Settings;
use anyhow::Context;
use shared::backplane::{Ingest, RedisIngest};
use shared::store::{MongoStore, Store};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// A persister, connected and bound to its admin port, not yet running.
pub struct Application {
    settings: Settings,
    ingest: Arc<RedisIngest>,
    store: Arc<MongoStore>,
    admin: TcpListener,
    shutdown: CancellationToken,
}

impl Application {
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        shared::admin::prometheus();
        describe_metrics();
        shared::backplane::check_url(&settings.redis)?;
        let store = Arc::new(
            MongoStore::connect(&settings.mongo, "chat-persister")
                .await
                .with_context(|| {
                    format!(
                        "connecting to MongoDB (MONGODB_URI, database {})",
                        settings.mongo.db
                    )
                })?,
        );
        let ingest = Arc::new(
            RedisIngest::connect(&settings.redis, &settings.ingest, &settings.name)
                .await
                .context("connecting to the ingest partitions in Redis (REDIS_URL)")?,
        );
        let admin = shared::admin::listen(
            SocketAddr::new(
                settings.admin_host.unwrap_or(settings.host),
                settings.metrics_port,
            ),
            1024,
        )
        .with_context(|| format!("binding METRICS_PORT {}", settings.metrics_port))?;
        Ok(Self {
            settings,
            ingest,
            store,
            admin,
            shutdown: CancellationToken::new(),
        })
    }

    pub fn admin_port(&self) -> u16 {
        self.admin
            .local_addr()
            .map(|a| a.port())
            .unwrap_or_default()
    }

    /// This process's instance id (its name plus a random suffix).
    pub fn instance(&self) -> &str {
        self.ingest.instance()
    }

    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Runs until the shutdown token is cancelled. The batches in hand are finished first.
    pub async fn run_until_stopped(self) -> anyhow::Result<()> {
        let lease = Duration::from_millis(self.settings.lease_ms.max(100));
        let persister = Persister::new(
            self.ingest.clone(),
            self.store.clone(),
            Tuning {
                batch_size: self.settings.batch_size.max(1),
                lease,
                // Reads return in time for shutdown and rebalancing to be prompt.
                block: Duration::from_millis(self.settings.read_block_ms.max(1)).min(lease / 4),
            },
            self.shutdown.clone(),
        );
        let ready = {
            let (store, ingest, failing) = (
                self.store.clone(),
                self.ingest.clone(),
                persister.failing.clone(),
            );
            shared::admin::router(Arc::new(move || {
                let (store, ingest, failing) = (store.clone(), ingest.clone(), failing.clone());
                Box::pin(async move {
                    ingest.ping().await.map_err(|e| format!("redis: {e}"))?;
                    store.ping().await.map_err(|e| format!("mongodb: {e}"))?;
                    if failing.load(Ordering::Relaxed) > 0 {
                        return Err("retrying a failed batch".to_owned());
                    }
                    Ok(())
                })
            }))
        };
        let admin = axum::serve(self.admin, ready)
            .with_graceful_shutdown(self.shutdown.clone().cancelled_owned());
        let admin = tokio::spawn(async move { admin.await });
        let sampler = tokio::spawn(sample_backlog(self.ingest.clone() as Arc<dyn Ingest>));
        tracing::info!(instance = %self.ingest.instance(), partitions = self.settings.ingest.partitions, "persister running");
        persister.run().await;
        sampler.abort();
        admin.abort();
        self.store.close().await;
        tracing::info!("persister stopped");
        Ok(())
    }
}
