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
    describe_histogram!(
        "chat_gateway_user_lookup_batch_size",
        "User records looked up in one store query (connects and re-checks are batched)."
    );
    describe_counter!(
        "chat_gateway_user_lookup_queue_full_total",
        "User lookups (connects, deletion checks) not made because the lookup queue was full: \
         the token's claims were trusted."
    );
    describe_counter!(
        "chat_gateway_address_limited_total",
        "Connections refused because their client address held MAX_CONNECTIONS_PER_ADDRESS."
    );
    describe_counter!(
        "chat_gateway_events_total",
        "Client events handled, by event and result (ok or the error code)."
    );
    describe_counter!(
        "chat_gateway_deliveries_total",
        "Events emitted to local sockets (one per socket), by event (server events under \
         server_event)."
    );
    describe_counter!(
        "chat_gateway_server_events_total",
        "Server API requests, by result: accepted, or unauthorized (a missing or wrong key)."
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
        "chat_gateway_presence_writes_total",
        "Presence changes written to the shared presence, by result (a failed one is retried)."
    );
    describe_counter!(
        "chat_gateway_presence_reaped_total",
        "Presence entries of dead gateways taken offline by this gateway."
    );
    describe_counter!(
        "chat_gateway_slow_consumer_disconnects_total",
        "Sockets disconnected because their outgoing buffer was full."
    );
    describe_counter!(
        "chat_gateway_backplane_lagged_total",
        "Room events dropped because the fan-out fell behind Redis pub/sub."
    );
    describe_gauge!(
        "chat_gateway_backplane_pubsub_backlog_max_messages",
        "Most Redis pub/sub messages seen waiting for the fan-out at once since start (REDIS_PUBSUB_CAPACITY must hold them)."
    );
    describe_counter!(
        "chat_gateway_resubscribes_total",
        "Times the Redis subscriber connection came back and every room channel was subscribed again."
    );
    describe_counter!(
        "chat_gateway_resubscribe_failures_total",
        "Resubscriptions after a Redis reconnect that Redis refused (tried again until they succeed; the gateway is not ready meanwhile)."
    );
    describe_counter!(
        "chat_gateway_append_repeats_total",
        "Appends run a second time by the Redis client after a reconnect, recognised by the message's id and answered with its first number."
    );
    describe_counter!(
        "chat_gateway_idempotency_evictions_total",
        "clientMsgId records the embedded mode forgot before their time because it held the most it keeps."
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
        "chat_gateway_fanout_seconds",
        Unit::Seconds,
        "Time from a published batch of messages arriving from Redis to its last emit to the room's local sockets."
    );
    describe_histogram!(
        "chat_gateway_backplane_publish_seconds",
        Unit::Seconds,
        "Time to publish a typing event to its room."
    );
    describe_counter!(
        "chat_gateway_duplicates_suppressed_total",
        "Messages that arrived again (republished, or repaired from the store first) and were delivered once."
    );
    describe_counter!(
        "chat_redis_client_restarts_total",
        "Redis clients whose routing task ended by itself and was started again."
    );
    describe_counter!(
        "chat_gateway_gaps_total",
        "Holes found in a local room's live messages (a later seq arrived, or the store was ahead after events were lost)."
    );
    describe_counter!(
        "chat_gateway_messages_repaired_total",
        "Messages read from the store and delivered to fill a gap in live delivery."
    );
    describe_counter!(
        "chat_gateway_resyncs_total",
        "Times a room's sockets got resync (gap over GAP_REPAIR_MAX, or the store could not fill it)."
    );
    describe_counter!(
        "chat_gateway_messages_replayed_total",
        "Messages replayed to sockets joining with afterSeq."
    );
    describe_counter!(
        "chat_gateway_feed_overflows_total",
        "Live batches dropped from a full room feed queue (then repaired from the store)."
    );
    describe_counter!(
        "chat_gateway_password_hash_queue_full_total",
        "Registrations and logins refused with 503 because the password hashing queue was full."
    );
    describe_counter!(
        "chat_gateway_password_hashes_skipped_total",
        "Queued password hashes skipped because their client had gone."
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
        "Logins, registrations and account lookups refused with 429 over their limits."
    );
    describe_counter!(
        "chat_gateway_token_expiry_disconnects_total",
        "Sockets disconnected because their token expired."
    );
    describe_counter!(
        "chat_gateway_membership_checks_total",
        "Participant checks of joins and sends, by where the answer came from (source: cache, store)."
    );
    describe_counter!(
        "chat_gateway_membership_reads_total",
        "Rooms whose participants were read from the store for the membership cache."
    );
}
