//! Destinations: where a client wants to go, validated where it enters (CONNECT authority,
//! absolute-URI host, SOCKS5 address), and the destination policy judged on the addresses
//! actually dialled.
//!
//! A [`Target`] host is an IP literal or a DNS name of LDH labels (letters, digits, hyphens;
//! labels of 1-63 characters, not starting or ending with a hyphen; at most 253 characters; the
//! last label starting with a letter, so that no resolver reads it as a number such as
//! `2130706433` or `0x7f.1`). Nothing else gets in, so no client byte can put CR, LF, NUL or a
//! space into a head built from a target. IP literals are canonical: an IPv4-mapped IPv6
//! address is its IPv4 address.
//!
//! The policy refuses the daemon's own listeners (a tunnel to them would loop, or reach the
//! admin API from the proxy port) and, for `direct` upstreams, loopback, link-local and
//! "this host" addresses (`0.0.0.0/8`, `::`) unless `security.allow_private_targets` is set.
//! Names are judged after resolution, on every address dialled, and a `direct` connection that
//! turns out to reach this host (its local and peer addresses are the same) is judged as
//! loopback.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use crate::error::ProxyError;

/// Longest DNS name accepted.
pub const MAX_NAME: usize = 253;

/// A destination host.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Host {
    /// An IP literal (canonical: IPv4-mapped addresses are IPv4).
    Ip(IpAddr),
    /// A DNS name of LDH labels, lower-cased, without a trailing dot.
    Name(String),
}

impl fmt::Display for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Host::Ip(ip) => ip.fmt(f),
            Host::Name(n) => f.write_str(n),
        }
    }
}

impl Host {
    /// Parses a host: an IP literal (IPv6 with or without brackets) or an LDH name.
    pub fn parse(s: &str) -> Result<Host, ProxyError> {
        let bare = s.strip_prefix('[').and_then(|r| r.strip_suffix(']'));
        if let Some(v6) = bare {
            return v6
                .parse::<Ipv6Addr>()
                .map(|ip| Host::Ip(canonical(IpAddr::V6(ip))))
                .map_err(|_| bad(s, "not an IPv6 address"));
        }
        if let Ok(ip) = s.parse::<IpAddr>() {
            return Ok(Host::Ip(canonical(ip)));
        }
        name(s).map(Host::Name)
    }

    /// The IP literal, if the host is one.
    pub fn ip(&self) -> Option<IpAddr> {
        match self {
            Host::Ip(ip) => Some(*ip),
            Host::Name(_) => None,
        }
    }
}

fn bad(s: &str, why: &str) -> ProxyError {
    let shown: String = s
        .chars()
        .take(64)
        .map(|c| if c.is_ascii_graphic() { c } else { '?' })
        .collect();
    ProxyError::BadRequest(format!("destination `{shown}`: {why}"))
}

/// Validates an LDH name; returns it lower-cased without a trailing dot.
fn name(s: &str) -> Result<String, ProxyError> {
    let n = s.strip_suffix('.').unwrap_or(s);
    if n.is_empty() || n.len() > MAX_NAME {
        return Err(bad(s, "a host name has 1 to 253 characters"));
    }
    for label in n.split('.') {
        let ok = (1..=63).contains(&label.len())
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !label.starts_with('-')
            && !label.ends_with('-');
        if !ok {
            return Err(bad(
                s,
                "not an IP address or a host name of letters, digits and hyphens",
            ));
        }
    }
    let last = n.rsplit('.').next().unwrap_or(n);
    if !last.as_bytes()[0].is_ascii_alphabetic() {
        return Err(bad(s, "the last label of a host name starts with a letter"));
    }
    Ok(n.to_ascii_lowercase())
}

/// An IPv4-mapped IPv6 address as IPv4; anything else unchanged.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// Where a client wants to go.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Target {
    /// Validated host.
    pub host: Host,
    /// Port, never 0.
    pub port: u16,
}

impl Target {
    /// A target from a validated host and a port; port 0 is refused.
    pub fn new(host: Host, port: u16) -> Result<Target, ProxyError> {
        if port == 0 {
            return Err(bad(&host.to_string(), "port 0"));
        }
        Ok(Target { host, port })
    }

    /// Parses `host:port` or `[v6]:port` (a CONNECT request target).
    pub fn parse_authority(s: &str) -> Result<Target, ProxyError> {
        let (host, port) = match s.strip_prefix('[') {
            Some(rest) => {
                let (h, p) = rest
                    .split_once("]:")
                    .ok_or_else(|| bad(s, "not host:port"))?;
                (&s[..h.len() + 2], p)
            }
            None => s.rsplit_once(':').ok_or_else(|| bad(s, "not host:port"))?,
        };
        let port = parse_port(port).ok_or_else(|| bad(s, "not host:port"))?;
        Target::new(Host::parse(host)?, port)
    }

    /// `host:port`, bracketing IPv6 literals: safe to write into a head.
    pub fn authority(&self) -> String {
        let mut out = String::with_capacity(24);
        self.push_authority(&mut out);
        out
    }

    /// Appends [`Target::authority`] to `out`. IPv4 literals, names and the port are
    /// written digit by digit, not through `fmt`: this runs for every tunnel opened.
    pub fn push_authority(&self, out: &mut String) {
        match &self.host {
            Host::Ip(IpAddr::V6(v6)) => {
                use std::fmt::Write;
                // Writing to a `String` cannot fail.
                let _ = write!(out, "[{v6}]");
            }
            Host::Ip(IpAddr::V4(v4)) => {
                for (i, octet) in v4.octets().into_iter().enumerate() {
                    if i > 0 {
                        out.push('.');
                    }
                    push_decimal(out, octet.into());
                }
            }
            Host::Name(name) => out.push_str(name),
        }
        out.push(':');
        push_decimal(out, self.port);
    }

    /// The host as text (no brackets), for resolvers and SOCKS5.
    pub fn host_str(&self) -> String {
        self.host.to_string()
    }
}

/// Appends `n` in decimal.
#[inline]
fn push_decimal(out: &mut String, n: u16) {
    let mut buf = [0; 20];
    // ASCII digits: always UTF-8.
    out.push_str(std::str::from_utf8(decimal(n.into(), &mut buf)).unwrap_or_default());
}

/// `n` in decimal, written into `buf`.
pub(crate) fn decimal(mut n: u64, buf: &mut [u8; 20]) -> &[u8] {
    let mut at = buf.len();
    loop {
        at -= 1;
        buf[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            return &buf[at..];
        }
    }
}

/// A decimal port 1-65535 (digits only).
pub fn parse_port(s: &str) -> Option<u16> {
    if s.is_empty() || s.len() > 5 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n = s.bytes().fold(0u32, |n, d| n * 10 + u32::from(d - b'0'));
    u16::try_from(n).ok().filter(|p| *p != 0)
}

/// Why a destination is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Denied {
    /// One of the daemon's own listeners.
    #[error("{0} is this proxy's own listener")]
    Own(SocketAddr),
    /// Loopback, link-local or this host, through `direct`.
    #[error("{0} is a loopback, link-local or this-host address")]
    Private(IpAddr),
}

/// What the destination policy needs to know.
#[derive(Debug, Clone)]
pub struct Policy {
    /// Let `direct` reach loopback, link-local and this-host addresses.
    pub allow_private: bool,
    /// The daemon's own listeners (tunnels to them would loop).
    pub own: Vec<SocketAddr>,
}

impl Policy {
    /// Judges an address about to be dialled (`direct`: from this host).
    pub fn check(&self, addr: SocketAddr, direct: bool) -> Result<(), Denied> {
        let addr = SocketAddr::new(canonical(addr.ip()), addr.port());
        if self.is_own(addr) {
            return Err(Denied::Own(addr));
        }
        if direct && !self.allow_private && is_private(addr.ip()) {
            return Err(Denied::Private(addr.ip()));
        }
        Ok(())
    }

    /// Judges a connection made from this host: one whose local and peer addresses are the
    /// same reached this host, whatever address it was dialled as.
    pub fn check_connected(
        &self,
        local: SocketAddr,
        peer: SocketAddr,
        direct: bool,
    ) -> Result<(), Denied> {
        self.check(peer, direct)?;
        if canonical(local.ip()) == canonical(peer.ip()) {
            let as_loopback = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), peer.port());
            self.check(as_loopback, direct)?;
        }
        Ok(())
    }

    fn is_own(&self, addr: SocketAddr) -> bool {
        self.own.iter().any(|own| {
            let own_ip = canonical(own.ip());
            own.port() == addr.port()
                && (own_ip == addr.ip()
                    || (this_host(addr.ip()) && (own_ip.is_loopback() || own_ip.is_unspecified()))
                    || (own_ip.is_unspecified() && addr.ip().is_loopback()))
        })
    }

    /// Checks an IP-literal target before anything is leased.
    pub fn check_literal(&self, target: &Target) -> Result<(), Denied> {
        match target.host.ip() {
            Some(ip) if self.is_own(SocketAddr::new(ip, target.port)) => {
                Err(Denied::Own(SocketAddr::new(ip, target.port)))
            }
            _ => Ok(()),
        }
    }
}

/// Addresses that reach this host itself: loopback and the "this host" ranges.
fn this_host(ip: IpAddr) -> bool {
    match canonical(ip) {
        IpAddr::V4(v4) => v4.is_loopback() || v4.octets()[0] == 0,
        IpAddr::V6(v6) => v6.is_loopback() || v6.is_unspecified(),
    }
}

/// Loopback, link-local, or this host.
pub fn is_private(ip: IpAddr) -> bool {
    match canonical(ip) {
        IpAddr::V4(v4) => this_host(IpAddr::V4(v4)) || v4.is_link_local(),
        IpAddr::V6(v6) => this_host(IpAddr::V6(v6)) || (v6.segments()[0] & 0xffc0) == 0xfe80,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_one_to_five_digits_from_1_to_65535() {
        for n in 0..=99_999u32 {
            for s in [n.to_string(), format!("{n:05}")] {
                let want = s.parse::<u16>().ok().filter(|p| *p != 0);
                assert_eq!(parse_port(&s), want, "{s}");
            }
        }
        for s in ["", "+80", "-1", "8 0", "080800", "٣"] {
            assert_eq!(parse_port(s), None, "{s:?}");
        }
    }

    #[test]
    fn hosts_are_ip_literals_or_ldh_names() {
        for ok in [
            "example.com",
            "EXAMPLE.com.",
            "a-b.c0",
            "localhost",
            "127.0.0.1",
            "[::1]",
            "::1",
            "xn--bcher-kva.example",
        ] {
            assert!(Host::parse(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "exa mple.com",
            "example.com:80 HTTP/1.1\r\nHost: x",
            "a\0b",
            "-a.com",
            "a-.com",
            "a..com",
            "2130706433",
            "127.1",
            "0x7f000001",
            "0x7f.1",
            "1.2.3.4.5",
            "under_score.com",
            "[127.0.0.1]",
            "é.com",
            &"a".repeat(64),
            &format!("{}.com", "a.".repeat(126)),
        ] {
            assert!(Host::parse(bad).is_err(), "{bad:?}");
        }
        assert_eq!(
            Host::parse("Example.COM.").unwrap(),
            Host::Name("example.com".into())
        );
    }

    #[test]
    fn mapped_addresses_are_canonical() {
        let v4 = Host::Ip("127.0.0.1".parse().unwrap());
        assert_eq!(Host::parse("[::ffff:127.0.0.1]").unwrap(), v4);
        assert_eq!(Host::parse("[::ffff:7f00:1]").unwrap(), v4);
    }

    #[test]
    fn authorities() {
        let t = Target::parse_authority("[::1]:443").unwrap();
        assert_eq!(t.authority(), "[::1]:443");
        assert_eq!(
            Target::parse_authority("Example.com:80")
                .unwrap()
                .authority(),
            "example.com:80"
        );
        for bad in [
            "example.com",
            "example.com:0",
            "example.com:+80",
            "a:b:80",
            ":80",
            "[::1]",
        ] {
            assert!(Target::parse_authority(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn own_listeners_and_this_host_are_refused() {
        let admin: SocketAddr = "127.0.0.1:9899".parse().unwrap();
        let p = Policy {
            allow_private: true,
            own: vec![admin],
        };
        for addr in [
            "127.0.0.1:9899",
            "0.0.0.0:9899",
            "[::ffff:127.0.0.1]:9899",
            "[::ffff:7f00:1]:9899",
            "[::]:9899",
            "[::1]:9899",
            "127.0.0.2:9899",
        ] {
            let a: SocketAddr = addr.parse().unwrap();
            assert!(p.check(a, true).is_err(), "{addr}");
            assert!(p.check(a, false).is_err(), "{addr}");
        }
        assert!(p.check("127.0.0.1:80".parse().unwrap(), true).is_ok());
        let strict = Policy {
            allow_private: false,
            own: vec![],
        };
        for addr in [
            "0.0.0.0:80",
            "0.1.2.3:80",
            "[::]:80",
            "[::ffff:127.0.0.1]:80",
            "169.254.1.1:80",
        ] {
            assert!(strict.check(addr.parse().unwrap(), true).is_err(), "{addr}");
            assert!(strict.check(addr.parse().unwrap(), false).is_ok(), "{addr}");
        }
        // A connection that reached this host through one of its own non-loopback addresses.
        let local: SocketAddr = "10.1.2.3:5555".parse().unwrap();
        let peer: SocketAddr = "10.1.2.3:9899".parse().unwrap();
        assert!(p.check_connected(local, peer, true).is_err());
        assert!(
            strict
                .check_connected(local, "10.1.2.3:80".parse().unwrap(), true)
                .is_err()
        );
        assert!(
            strict
                .check_connected(local, "10.9.9.9:80".parse().unwrap(), true)
                .is_ok()
        );
    }
}
