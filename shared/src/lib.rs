//! What the chat gateway and the persister must agree on.
//!
//! * [`wire`]: the Socket.IO payloads (`message`, `user_typing`, acks) and the
//!   envelopes carried over Redis.
//! * [`domain`]: validated input types ([`domain::MessageContent`], ids), parsed once at the edge.
//! * [`jwt`]: HS256 access tokens (`sub`, `email`, `displayName`, `iat`, `exp`).
//! * [`backplane`]: the [`backplane::Backplane`] port and its Redis implementation.
//! * [`store`]: the [`store::Store`] port and its MongoDB implementation.
//! * [`memory`], [`sqlite`]: the in-process backplane and the SQLite store of the
//!   single-process (embedded) mode.
//! * [`config`], [`telemetry`], [`admin`]: settings, logging and the admin HTTP server
//!   (`/metrics`, `/healthz`, `/readyz`) used by both binaries.
//!
//! # Redis names
//! Every key and channel starts with the configured prefix (`REDIS_PREFIX`, default `chat`):
//!
//! | name | type | purpose |
//! |---|---|---|
//! | `{chat}:ingest` | stream | messages accepted by a gateway, waiting to be persisted |
//! | consumer group `persisters` on it | | shared by every persister replica |
//! | `chat:room:{<roomId>}` | pub/sub channel | canonical `message` and `typing` events of one room |
//!
//! The room id is the hash tag of its channel so that rooms spread over a Redis Cluster.

pub mod admin;
pub mod backplane;
pub mod config;
pub mod domain;
pub mod jwt;
pub mod memory;
pub mod sqlite;
pub mod store;
pub mod telemetry;
pub mod wire;

pub use mongodb::bson::oid::ObjectId;
