//! Real servers and service processes, owned by whoever starts them and stopped when
//! dropped: a Redis (one node, or a cluster of 3 masters and 3 replicas) with an append-only
//! file, SecantusDB (the MongoDB-protocol test server), the gateway and persister binaries
//! as processes that can be killed, stopped and resumed, and a TCP proxy that cuts the
//! network between a service and its dependency.
//!
//! Used by the gateway's integration tests and by the load tool's chaos run.

pub mod procs;
pub mod servers;
