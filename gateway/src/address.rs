//! The client's address, as the limits count it, and which requests are Engine.IO's.

use axum::http::HeaderMap;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};

/// The client's address. Behind `TRUSTED_PROXY_HOPS` proxies, each of which appends the
/// address it received the request from to `X-Forwarded-For`, it is the entry that many
/// places from the right: entries further left were written by the client and can be
/// forged. Without trusted proxies, or with fewer entries than hops, the connection's peer.
/// An IPv6 address counts as its /64: one subscriber is usually given a whole /64, so its
/// addresses are one client to every limit.
pub fn client_address(hops: usize, peer: SocketAddr, headers: &HeaderMap) -> IpAddr {
    if hops == 0 {
        return counted(peer.ip());
    }
    let forwarded: Vec<&str> = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .collect();
    let address = forwarded
        .len()
        .checked_sub(hops)
        .and_then(|i| forwarded[i].parse().ok())
        .unwrap_or_else(|| peer.ip());
    counted(address)
}

/// The address as limits count it: IPv4 as it is (and IPv4-mapped IPv6 as IPv4), IPv6 by
/// its /64.
pub fn counted(address: IpAddr) -> IpAddr {
    match address {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let bits = u128::from(v6) & !((1u128 << 64) - 1);
                IpAddr::V6(Ipv6Addr::from(bits))
            }
        },
    }
}

/// Whether a path is Engine.IO's (the Socket.IO layer serves `/socket.io` and everything
/// under it).
pub fn is_engine_io(path: &str) -> bool {
    path == "/socket.io" || path.starts_with("/socket.io/")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_counted_as_one_client_is() {
        let one = |raw: &str| counted(raw.parse().unwrap()).to_string();
        assert_eq!(one("203.0.113.7"), "203.0.113.7");
        assert_eq!(one("::ffff:203.0.113.7"), "203.0.113.7");
        assert_eq!(one("2001:db8:1:2:3:4:5:6"), "2001:db8:1:2::");
        assert_eq!(one("2001:db8:1:2:ffff::1"), "2001:db8:1:2::");
        assert!(is_engine_io("/socket.io"));
        assert!(is_engine_io("/socket.io/"));
        assert!(!is_engine_io("/socket.iox"));
    }
}
