//! Engine.IO sessions per client address, bounded (`MAX_CONNECTIONS_PER_ADDRESS`), so that
//! one address cannot hold a gateway's connections, authenticated or not.
//!
//! The address is the client's as `TRUSTED_PROXY_HOPS` defines it (behind a load balancer
//! every connection comes from the balancer; the client is in `X-Forwarded-For`). A session
//! is counted from its handshake (the Engine.IO request without a `sid`) until it closes: the
//! handshake request carries a slot in its extensions, and Engine.IO keeps that request's
//! parts for the session's whole life, so the slot is given back when the session is dropped.

use crate::address::client_address;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{Extensions, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};

/// Sessions per address, and the bound.
pub struct AddressSlots {
    /// `MAX_CONNECTIONS_PER_ADDRESS`; 0 turns the bound off.
    max: usize,
    hops: usize,
    open: Mutex<HashMap<IpAddr, usize>>,
}

/// One session's place, given back when the last copy of its request's parts is dropped.
struct Slot {
    slots: Arc<AddressSlots>,
    address: IpAddr,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut open = self.slots.open.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = open.get_mut(&self.address) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.address);
            }
        }
    }
}

/// What a handshake request carries (request extensions must be `Clone`).
#[derive(Clone)]
struct SlotHeld(#[expect(dead_code, reason = "held for its Drop")] Arc<Slot>);

impl AddressSlots {
    pub fn new(max: usize, trusted_proxy_hops: usize) -> Arc<Self> {
        Arc::new(Self {
            max,
            hops: trusted_proxy_hops,
            open: Mutex::default(),
        })
    }

    fn take(self: &Arc<Self>, address: IpAddr) -> Option<Slot> {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let n = open.entry(address).or_insert(0);
        if *n >= self.max {
            return None;
        }
        *n += 1;
        Some(Slot {
            slots: self.clone(),
            address,
        })
    }
}

/// Moves a handshake's slot from one set of request extensions to another (see
/// `socket::detach_request`).
pub(super) fn move_slot(from: &mut Extensions, to: &mut Extensions) {
    if let Some(slot) = from.remove::<SlotHeld>() {
        to.insert(slot);
    }
}

/// Middleware in front of the Socket.IO layer: a handshake from an address holding
/// `MAX_CONNECTIONS_PER_ADDRESS` sessions is refused with 429.
pub async fn admit(
    State(slots): State<Arc<AddressSlots>>,
    mut request: Request,
    next: Next,
) -> Response {
    let handshake = crate::address::is_engine_io(request.uri().path())
        && !request
            .uri()
            .query()
            .is_some_and(|q| q.split('&').any(|pair| pair.starts_with("sid=")));
    if slots.max == 0 || !handshake {
        return next.run(request).await;
    }
    let Some(peer) = request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0)
    else {
        return next.run(request).await;
    };
    let address = client_address(slots.hops, peer, request.headers());
    match slots.take(address) {
        Some(slot) => {
            request.extensions_mut().insert(SlotHeld(Arc::new(slot)));
            next.run(request).await
        }
        None => {
            metrics::counter!("chat_gateway_address_limited_total").increment(1);
            tracing::debug!(%address, "connection refused: MAX_CONNECTIONS_PER_ADDRESS reached");
            (
                StatusCode::TOO_MANY_REQUESTS,
                axum::Json(serde_json::json!({
                    "statusCode": 429,
                    "error": "Too Many Requests",
                    "message": "too many connections from this address",
                })),
            )
                .into_response()
        }
    }
}
