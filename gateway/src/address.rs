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
        .and_then(|i| forwarded_address(forwarded[i]))
        // No entry there, or one that is no address (`unknown`): the proxy's own.
        .unwrap_or_else(|| peer.ip());
    counted(address)
}

/// An `X-Forwarded-For` entry's address; some proxies write the port too
/// (`203.0.113.7:4711`, `[2001:db8::1]:4711`).
fn forwarded_address(entry: &str) -> Option<IpAddr> {
    entry
        .parse()
        .ok()
        .or_else(|| entry.parse::<SocketAddr>().ok().map(|a| a.ip()))
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
    fn forwarded_entries_with_ports_name_their_address() {
        let peer: SocketAddr = "10.0.0.1:1000".parse().unwrap();
        let from = |entry: &str| {
            let mut headers = HeaderMap::new();
            headers.insert("x-forwarded-for", entry.parse().unwrap());
            client_address(1, peer, &headers).to_string()
        };
        assert_eq!(from("203.0.113.7"), "203.0.113.7");
        assert_eq!(from("203.0.113.7:4711"), "203.0.113.7");
        assert_eq!(from("[2001:db8:1:2::1]:4711"), "2001:db8:1:2::");
        assert_eq!(from("unknown"), "10.0.0.1");
    }

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
