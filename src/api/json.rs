//! What the lease API answers, in the shapes `pharox-sdk` 0.2 parses: pools, proxies (as
//! pharox 0.8's `Proxy` model reads them, never with a password) and leases (with how to use
//! them), and its time format.

use std::time::SystemTime;

use serde_json::{Value, json};
use uuid::Uuid;

use crate::model::{Lease, Pool, PoolStats, Proxy, ProxyInfo, ProxyProtocol, stable_id};

/// `YYYY-MM-DDTHH:MM:SS.ffffff+00:00` (UTC; what Python 3.10's `fromisoformat` reads).
pub fn iso(t: SystemTime) -> String {
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, day) = civil(days as i64);
    format!(
        "{y:04}-{m:02}-{day:02}T{:02}:{:02}:{:02}.{:06}+00:00",
        rem / 3600,
        rem / 60 % 60,
        rem % 60,
        d.subsec_micros()
    )
}

/// The proleptic Gregorian date of a day count since 1970-01-01 (H. Hinnant's algorithm).
fn civil(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// A consumer's id: stable per name.
pub fn consumer_id(name: &str) -> Uuid {
    stable_id("consumer", name)
}

/// A pool, with its figures.
pub fn pool(p: &Pool, stats: &PoolStats) -> Value {
    json!({
        "id": p.id,
        "name": p.name,
        "description": p.description.clone().unwrap_or_default(),
        "source": if p.owner.is_some() { "config" } else { "api" },
        "stats": {
            "total": stats.total, "active": stats.active, "available": stats.available,
            "leased": stats.leased, "total_leases": stats.total_leases,
        },
    })
}

/// A proxy (no password, ever).
pub fn proxy(info: &ProxyInfo, pool_id: Uuid) -> Value {
    let p = &info.proxy;
    json!({
        "id": p.id.uuid(),
        "pool_id": pool_id,
        "pharox_id": p.id,
        "host": p.host,
        "port": p.port,
        "protocol": p.protocol,
        "status": p.status,
        "max_concurrency": p.max_concurrency,
        "current_leases": info.current_leases,
        "checked_at": iso(p.checked_at),
        "username": p.credentials.as_ref().map(|c| c.username.clone()),
        "source": p.meta.source, "country": p.meta.country, "city": p.meta.city,
        "isp": p.meta.isp, "asn": p.meta.asn,
        "latitude": p.meta.latitude, "longitude": p.meta.longitude,
        "latency_ms": p.latency.map(|l| l.as_millis() as u64),
        "managed": if p.owner.is_some() { "config" } else { "api" },
    })
}

/// A lease: what the SDK reads, and how to use it (the upstream, with its credentials only
/// when `reveal` is allowed, and the pharox username that routes a proxy-port connection
/// onto it).
pub fn lease(l: &Lease, pool_id: Uuid, released_at: Option<SystemTime>, reveal: bool) -> Value {
    let status = if released_at.is_some() {
        "released"
    } else {
        "active"
    };
    json!({
        "id": l.id,
        "proxy_id": l.proxy.id.uuid(),
        "consumer_id": consumer_id(&l.consumer_name),
        "pool_id": pool_id,
        "status": status,
        "acquired_at": iso(l.acquired_at),
        "expires_at": iso(l.expires_at),
        "released_at": released_at.map(iso),
        "pool_name": l.pool_name,
        "consumer_name": l.consumer_name,
        "holder": l.holder,
        "proxy": upstream(&l.proxy, reveal),
        "pharox_username": format!("{}-lease-{}", l.consumer_name, l.id),
    })
}

/// The upstream of a lease, for a client that connects to it itself.
fn upstream(p: &Proxy, reveal: bool) -> Value {
    let creds = p.credentials.as_ref();
    let auth = match creds {
        Some(c) if reveal => format!(
            "{}:{}@",
            quote_plus(&c.username),
            quote_plus(c.password.expose())
        ),
        Some(c) => format!("{}@", quote_plus(&c.username)),
        None => String::new(),
    };
    let url = match p.protocol {
        ProxyProtocol::Direct => None,
        proto => Some(format!("{proto}://{auth}{}", p.authority())),
    };
    json!({
        "id": p.id.uuid(),
        "host": p.host,
        "port": p.port,
        "protocol": p.protocol,
        "username": creds.map(|c| c.username.clone()),
        "password": creds.filter(|_| reveal).map(|c| c.password.expose().to_owned()),
        "url": url,
    })
}

/// `application/x-www-form-urlencoded` escaping, as Python's `quote_plus`.
fn quote_plus(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'_' | b'.' | b'-' | b'~' => {
                out.push(b as char)
            }
            b' ' => out.push('+'),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn times_are_what_python_310_reads() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_micros(1_764_601_847_418_664);
        assert_eq!(iso(t), "2025-12-01T15:10:47.418664+00:00");
        assert_eq!(
            iso(SystemTime::UNIX_EPOCH),
            "1970-01-01T00:00:00.000000+00:00"
        );
        let leap = SystemTime::UNIX_EPOCH + Duration::from_secs(951_782_400); // 2000-02-29
        assert_eq!(&iso(leap)[..10], "2000-02-29");
    }

    #[test]
    fn credentials_are_escaped_like_quote_plus() {
        assert_eq!(quote_plus("s3cr@t p:w/rd"), "s3cr%40t+p%3Aw%2Frd");
    }
}
