//! Help texts of the gateway's metrics (Prometheus `# HELP`), registered once at start-up.
//! Labels come only from bounded sets: event names, results, reasons; never ids.

use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};

pub fn describe() {
    describe_gauge!(
        "chat_gateway_connections",
        "Open Socket.IO connections on /chat."
    );
    describe_counter!("chat_gateway_connects_total", "Accepted /chat connections.");
    describe_counter!(
        "chat_gateway_disconnects_total",
        "Closed /chat connections, by reason."
    );
    describe_counter!(
        "chat_gateway_auth_failures_total",
        "Refused connections, by reason (missing, invalid, expired token; too many connections)."
    );
    describe_counter!(
        "chat_gateway_events_total",
        "Client events handled, by event and result (ok or the error code)."
    );
    describe_counter!(
        "chat_gateway_deliveries_total",
        "Events emitted to local sockets (one per socket), by event."
    );
    describe_gauge!(
        "chat_gateway_rooms_local",
        "Rooms with at least one member connected to this gateway."
    );
    describe_gauge!(
        "chat_gateway_redis_subscriptions",
        "Room channels this gateway is subscribed to in Redis."
    );
    describe_counter!(
        "chat_gateway_slow_consumer_disconnects_total",
        "Sockets disconnected because their outgoing buffer was full."
    );
    describe_counter!(
        "chat_gateway_backplane_lagged_total",
        "Room events dropped because the fan-out fell behind Redis pub/sub."
    );
    describe_counter!(
        "chat_gateway_resubscribes_total",
        "Times the Redis subscriber connection came back and every room channel was subscribed again."
    );
    describe_counter!(
        "chat_gateway_ingest_full_total",
        "Sends refused because their ingest partition held INGEST_MAX_BACKLOG entries."
    );
    describe_histogram!(
        "chat_gateway_ingest_append_seconds",
        Unit::Seconds,
        "Time to append a message to the ingest stream."
    );
    describe_histogram!(
        "chat_gateway_backplane_publish_seconds",
        Unit::Seconds,
        "Time to publish a typing event to its room."
    );
    describe_counter!(
        "chat_gateway_duplicates_suppressed_total",
        "Messages published twice (after a persister takeover) and delivered once."
    );
    describe_counter!(
        "chat_gateway_duplicate_sends_total",
        "send_message retries answered with the first message (same clientMsgId)."
    );
    describe_counter!(
        "chat_gateway_rate_limited_total",
        "Events refused with RATE_LIMITED."
    );
    describe_counter!(
        "chat_gateway_rate_limit_disconnects_total",
        "Connections closed for staying over the event rate."
    );
    describe_counter!(
        "chat_gateway_login_rate_limited_total",
        "Logins refused with 429 after too many failures."
    );
    describe_counter!(
        "chat_gateway_token_expiry_disconnects_total",
        "Sockets disconnected because their token expired."
    );
}
