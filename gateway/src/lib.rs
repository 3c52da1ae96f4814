//! The chat gateway: terminates Socket.IO (namespace `/chat`) and the REST API,
//! validates JWTs, appends `send_message` to the Redis ingest stream, publishes `typing`,
//! and fans the room events that Redis delivers out to its local sockets.
//!
//! Stateless: any number of gateways share one Redis and one MongoDB. Each gateway
//! subscribes to the channel of every room with a local member, and only those. Without
//! Redis and MongoDB it runs embedded: the whole chat server in one process.

mod address;
mod app;
mod chat;
#[cfg(test)]
mod decode_props;
mod delivery;
mod drain;
mod error;
mod feed;
mod http;
mod limits;
mod membership;
mod presence;
mod rooms;
mod serve;
mod settings;
mod socket;
mod telemetry;
#[cfg(test)]
mod testing;
mod user_lookup;

pub use app::Application;
pub use settings::{Mode, Settings};

/// The fan-out's last step, for `benches/fanout.rs` (a regression there shows in
/// `cargo bench`); not an API.
#[doc(hidden)]
pub mod fanout_bench {
    pub use crate::delivery::{
        NAMESPACE, RoomSockets, add_user_socket, emit_to_room, emit_typing, join, room_key,
    };
}
