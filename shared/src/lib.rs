//! What the chat gateway and the persister must agree on.
//!
//! * [`wire`]: the Socket.IO payloads (`message`, `user_typing`, acks) and the
//!   envelopes carried over Redis.
//! * [`domain`]: validated input types ([`domain::MessageContent`], ids), parsed once at the edge.
//! * [`jwt`]: HS256 access tokens (`sub`, `email`, `displayName`, `iat`, `exp`).
//! * [`backplane`]: the [`backplane::Backplane`] and [`backplane::Ingest`] ports, their Redis
//!   implementations (single node or cluster) and the in-process one.
//! * [`counters`]: the login-limit counters, a port of their own.
//! * [`store`]: the [`store::Store`] port and its MongoDB implementation.
//! * `sqlite` (feature `sqlite`): the SQLite store of the single-process (embedded) mode.
//! * [`config`], [`telemetry`], [`admin`]: settings, logging and the admin HTTP server
//!   (`/metrics`, `/healthz`, `/readyz`) used by both binaries.
//!
//! # Redis names
//! Every key and channel, with its hash tag and bound, is listed in [`backplane::keys`].

pub mod admin;
pub mod backplane;
pub mod config;
pub mod counters;
pub mod domain;
pub mod jwt;
#[cfg(feature = "sqlite")]
pub mod sqlite;
pub mod store;
pub mod telemetry;
pub mod wire;

pub use mongodb::bson::oid::ObjectId;
