//! The lease engine's data model: pools, proxies, consumers, leases and pool statistics.
//!
//! These are plain values. The storage owns the live state (lease counts, the lease table);
//! what callers hold are snapshots. Secrets are wrapped in [`Secret`] so that `Debug` output
//! and logs never show them.

use std::borrow::Borrow;
use std::fmt;
use std::str::FromStr;
use std::sync::{Arc, LazyLock};
use std::time::{Duration, SystemTime};

use serde::{Serialize, Serializer};
use uuid::Uuid;

/// Name of the consumer used when a caller does not name one. It always exists.
pub const DEFAULT_CONSUMER_NAME: &str = "default";

/// [`DEFAULT_CONSUMER_NAME`] as a shared string (allocated once per process).
pub(crate) fn default_consumer() -> Arc<str> {
    default_consumer_ref().clone()
}

/// The shared [`DEFAULT_CONSUMER_NAME`] string, without touching its reference count.
pub(crate) fn default_consumer_ref() -> &'static Arc<str> {
    static NAME: LazyLock<Arc<str>> = LazyLock::new(|| Arc::from(DEFAULT_CONSUMER_NAME));
    &NAME
}

/// A string that must never be printed: `Debug` and `Display` show `***`.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The secret itself, for the one place that must send it (never for logging).
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// True when the secret is the empty string.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl<'de> serde::Deserialize<'de> for Secret {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d).map(Secret)
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// Namespace of pharox's stable ids (UUID v5, RFC 9562):
/// `uuid5(NAMESPACE_URL, "urn:pharox")`.
pub const ID_NAMESPACE: Uuid = Uuid::from_u128(0x4724b937_d9a2_5c0b_87db_695177fb7bbf);

/// The stable UUID of a named thing: `uuid5(ID_NAMESPACE, "KIND:NAME")` (kinds: `pool`,
/// `proxy`, `consumer`). Every daemon computes the same id for the same name, and so does
/// any other client of a shared database.
pub fn stable_id(kind: &str, name: &str) -> Uuid {
    Uuid::new_v5(&ID_NAMESPACE, format!("{kind}:{name}").as_bytes())
}

/// Stable identifier of a proxy, unique across all pools. Ordered as a string; the
/// `round_robin` selector visits proxies in this order.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ProxyId(Arc<str>);

impl ProxyId {
    /// Makes an id from any string.
    pub fn new(id: impl Into<Arc<str>>) -> Self {
        Self(id.into())
    }

    /// The id as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The proxy's UUID: the id itself when it is one (proxies made by the lease API or by
    /// Python pharox), else its stable id (`stable_id("proxy", id)`).
    pub fn uuid(&self) -> Uuid {
        match self.0.len() {
            36 | 32 => Uuid::try_parse(&self.0).ok(),
            _ => None,
        }
        .unwrap_or_else(|| stable_id("proxy", &self.0))
    }
}

impl fmt::Debug for ProxyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl fmt::Display for ProxyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl Borrow<str> for ProxyId {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl From<&str> for ProxyId {
    fn from(s: &str) -> Self {
        Self::new(s)
    }
}

impl Serialize for ProxyId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

/// Identifier of a lease: a UUID (random, version 4), shown in its 36-character hyphenated
/// form. The same ids name leases in every backend, so a PostgreSQL row, a pharox-sdk client
/// and the daemon's admin API agree on them.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LeaseId(Uuid);

impl LeaseId {
    /// A fresh random id.
    pub fn new() -> Self {
        Self(Uuid::new_v4())
    }

    /// The UUID.
    pub fn as_uuid(&self) -> Uuid {
        self.0
    }

    /// An id from its UUID (storage backends, tests).
    pub fn from_uuid(id: Uuid) -> Self {
        Self(id)
    }
}

impl Default for LeaseId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for LeaseId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "LeaseId({})", self.0)
    }
}

impl fmt::Display for LeaseId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0.hyphenated(), f)
    }
}

/// A lease id that is neither 36-character hyphenated nor 32-hex-digit UUID text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a lease id is a UUID (36 characters with dashes, or 32 hex digits)")]
pub struct BadLeaseId;

impl FromStr for LeaseId {
    type Err = BadLeaseId;

    /// Accepts the hyphenated form (`8-4-4-4-12` hex digits) and the simple form (32 hex
    /// digits), nothing else (no braces, no `urn:uuid:`).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.len() != 36 && s.len() != 32 {
            return Err(BadLeaseId);
        }
        Uuid::try_parse(s).map(Self).map_err(|_| BadLeaseId)
    }
}

impl Serialize for LeaseId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// Defines a string-valued enum with `FromStr`, `Display` and `Serialize` in snake_case.
macro_rules! string_enum {
    ($(#[$meta:meta])* $name:ident { $($(#[$vmeta:meta])* $variant:ident = $text:literal),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum $name { $($(#[$vmeta])* $variant),+ }

        impl $name {
            /// Every value, in declaration order.
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            /// The canonical lower-case name.
            pub fn as_str(self) -> &'static str {
                match self { $($name::$variant => $text),+ }
            }
        }

        impl ::std::fmt::Display for $name {
            fn fmt(&self, f: &mut ::std::fmt::Formatter<'_>) -> ::std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl ::std::str::FromStr for $name {
            type Err = $crate::model::UnknownName;

            fn from_str(s: &str) -> Result<Self, Self::Err> {
                match s {
                    $($text => Ok($name::$variant),)+
                    _ => Err($crate::model::UnknownName {
                        what: stringify!($name),
                        got: s.to_owned(),
                        expected: &[$($text),+],
                    }),
                }
            }
        }

        impl<'de> ::serde::Deserialize<'de> for $name {
            fn deserialize<D: ::serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = <::std::borrow::Cow<'de, str>>::deserialize(d)?;
                s.parse().map_err(::serde::de::Error::custom)
            }
        }

        impl ::serde::Serialize for $name {
            fn serialize<S: ::serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.as_str())
            }
        }
    };
}
pub(crate) use string_enum;

/// A name that is not one of an enum's values.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown {what} `{got}` (expected one of: {})", expected.join(", "))]
pub struct UnknownName {
    /// The kind of value.
    pub what: &'static str,
    /// What was given.
    pub got: String,
    /// The accepted names.
    pub expected: &'static [&'static str],
}

string_enum! {
    /// Health of a proxy. Only `Active` proxies are leased.
    ProxyStatus {
        /// Usable.
        Active = "active",
        /// Not usable (unreachable or not yet checked).
        Inactive = "inactive",
        /// Reachable but slower than the configured threshold.
        Slow = "slow",
        /// Taken out of rotation by an operator or a consumer report.
        Banned = "banned",
    }
}

string_enum! {
    /// How the daemon talks to an upstream.
    ProxyProtocol {
        /// HTTP proxy: CONNECT for tunnels, absolute-form requests for plain HTTP.
        Http = "http",
        /// HTTP proxy reached over TLS.
        Https = "https",
        /// SOCKS5 proxy; target names are resolved locally.
        Socks5 = "socks5",
        /// SOCKS5 proxy; target names are resolved by the proxy.
        Socks5h = "socks5h",
        /// No proxy: connect to the target from this host.
        Direct = "direct",
    }
}

/// Credentials of an upstream proxy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Credentials {
    /// User name, sent as is.
    pub username: String,
    /// Password; never printed.
    pub password: Secret,
}

impl Credentials {
    /// Builds credentials from a user name and a password.
    pub fn new(username: impl Into<String>, password: impl Into<String>) -> Self {
        Self {
            username: username.into(),
            password: Secret::new(password),
        }
    }
}

/// A named set of proxies.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Pool {
    /// Unique name.
    pub name: String,
    /// Unique id: `stable_id("pool", name)` unless the storage holds another one (a pool made
    /// by Python pharox has a random one).
    pub id: Uuid,
    /// Free text for operators.
    pub description: Option<String>,
    /// Lease `slow` proxies too (default `false`: only `active` ones, as the seed does).
    pub lease_slow: bool,
    /// Whose config defines it (a daemon's node id); `None` for pools made through the lease
    /// API or by other clients. A reload only ever removes what its own config defined.
    pub owner: Option<Arc<str>>,
}

impl Pool {
    /// A pool with a name and no description.
    pub fn new(name: impl Into<String>) -> Self {
        let name = name.into();
        Self {
            id: stable_id("pool", &name),
            name,
            description: None,
            lease_slow: false,
            owner: None,
        }
    }
}

/// What is known of a proxy's location and provenance: the fields filters match on. The same
/// struct describes a proxy (in the inventory and in config files) and what a filter or a
/// username asks for (a filter's coordinates are the centre of its geo constraint).
#[derive(Clone, Debug, Default, PartialEq, Serialize, serde::Deserialize)]
#[serde(default)]
pub struct ProxyMeta {
    /// Provider or origin of the proxy.
    pub source: Option<String>,
    /// ISO country code, upper-cased on input.
    pub country: Option<String>,
    /// City name (compared exactly).
    pub city: Option<String>,
    /// Internet service provider (compared exactly).
    pub isp: Option<String>,
    /// Autonomous system number.
    pub asn: Option<u32>,
    /// Latitude in degrees.
    pub latitude: Option<f64>,
    /// Longitude in degrees.
    pub longitude: Option<f64>,
}

impl ProxyMeta {
    /// The string fields, named (for validation messages).
    pub fn strings(&self) -> [(&'static str, &Option<String>); 4] {
        [
            ("country", &self.country),
            ("city", &self.city),
            ("source", &self.source),
            ("isp", &self.isp),
        ]
    }
}

/// An upstream proxy as the inventory describes it. Live figures (lease count, draining)
/// are in [`ProxyInfo`]; a proxy's lease count survives any update of this record.
#[derive(Clone, Debug)]
pub struct Proxy {
    /// Unique id across all pools.
    pub id: ProxyId,
    /// Name of the pool the proxy belongs to.
    pub pool: String,
    /// Host name or IP literal (empty for `direct`).
    pub host: String,
    /// Port (0 for `direct`).
    pub port: u16,
    /// How to talk to it.
    pub protocol: ProxyProtocol,
    /// Credentials for the upstream, if it needs them.
    pub credentials: Option<Credentials>,
    /// Health status; only `Active` proxies are leased. Default: `Active`.
    pub status: ProxyStatus,
    /// Maximum simultaneous leases: `None` unlimited, 1 exclusive, N shared.
    pub max_concurrency: Option<u32>,
    /// When the proxy was last checked; `least_used` prefers the oldest on ties.
    pub checked_at: SystemTime,
    /// Location and provenance (what filters match on).
    pub meta: ProxyMeta,
    /// Last measured latency; `lowest_latency` puts unmeasured proxies last.
    pub latency: Option<Duration>,
    /// Resting after consecutive connect failures until then (status `inactive`); the
    /// storage puts it back to `active` at that time.
    pub rest_until: Option<SystemTime>,
    /// Whose config defines it (a daemon's node id); `None` for proxies made through the
    /// lease API or by other clients. A reload only ever removes what its own config defined.
    pub owner: Option<Arc<str>>,
}

impl Proxy {
    /// An active proxy with no limit and no metadata.
    pub fn new(
        id: impl Into<ProxyId>,
        pool: impl Into<String>,
        protocol: ProxyProtocol,
        host: impl Into<String>,
        port: u16,
    ) -> Self {
        Self {
            id: id.into(),
            pool: pool.into(),
            host: host.into(),
            port,
            protocol,
            credentials: None,
            status: ProxyStatus::Active,
            max_concurrency: None,
            checked_at: SystemTime::UNIX_EPOCH,
            meta: ProxyMeta::default(),
            latency: None,
            rest_until: None,
            owner: None,
        }
    }

    /// The same proxy with a concurrency cap.
    pub fn with_max_concurrency(mut self, max: Option<u32>) -> Self {
        self.max_concurrency = max;
        self
    }

    /// The same proxy with a status.
    pub fn with_status(mut self, status: ProxyStatus) -> Self {
        self.status = status;
        self
    }

    /// The same proxy with a country (upper-cased).
    pub fn with_country(mut self, country: &str) -> Self {
        self.meta.country = Some(country.to_ascii_uppercase());
        self
    }

    /// `host:port`, with brackets around IPv6 literals.
    pub fn authority(&self) -> String {
        if self.host.contains(':') && !self.host.starts_with('[') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    /// Normalises input values in place (country codes to upper case).
    pub(crate) fn normalise(&mut self) {
        if let Some(c) = &mut self.meta.country {
            c.make_ascii_uppercase();
        }
    }
}

impl From<String> for ProxyId {
    fn from(s: String) -> Self {
        Self::new(s)
    }
}

/// A proxy with its live figures, as the storage reports it.
#[derive(Clone, Debug)]
pub struct ProxyInfo {
    /// The inventory record.
    pub proxy: Arc<Proxy>,
    /// Live leases on this proxy.
    pub current_leases: u32,
    /// Removed from the inventory but still carrying leases: no new leases.
    pub draining: bool,
}

/// A change of a proxy's health: a new status, and for a check, when and how fast.
#[derive(Clone, Debug, PartialEq)]
pub struct HealthCheck {
    /// The new status.
    pub status: ProxyStatus,
    /// When the check ran (`None` keeps the old `checked_at`).
    pub checked_at: Option<SystemTime>,
    /// Measured latency (`None` keeps the old one).
    pub latency: Option<Duration>,
}

impl HealthCheck {
    /// Only a status change (an operator's ban, say).
    pub fn status(status: ProxyStatus) -> Self {
        Self {
            status,
            checked_at: None,
            latency: None,
        }
    }
}

/// A consumer: whoever leases proxies. Only a name.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize)]
pub struct Consumer {
    /// Unique name.
    pub name: Arc<str>,
}

string_enum! {
    /// State of a lease.
    LeaseStatus {
        /// Held.
        Active = "active",
        /// Given back by its holder (or by an operator).
        Released = "released",
        /// Released by cleanup because it was not renewed in time.
        Expired = "expired",
    }
}

/// A lease on one proxy. The value is a snapshot: releasing does not change the copy a
/// caller holds; the storage knows the live state.
#[derive(Clone, Debug, Serialize)]
pub struct Lease {
    /// Unique id.
    pub id: LeaseId,
    /// The pool it was leased from.
    pub pool_name: Arc<str>,
    /// Who holds it.
    pub consumer_name: Arc<str>,
    /// When it was acquired (wall clock of the storage; serialised as Unix seconds).
    #[serde(serialize_with = "ser_unix_seconds")]
    pub acquired_at: SystemTime,
    /// When it expires unless renewed (wall clock of the storage; serialised as Unix
    /// seconds).
    #[serde(serialize_with = "ser_unix_seconds")]
    pub expires_at: SystemTime,
    /// Status at the time of this snapshot.
    pub status: LeaseStatus,
    /// The leased proxy: its id (serialised as `proxy_id`) and connection details.
    #[serde(rename = "proxy_id", serialize_with = "ser_proxy_id")]
    pub proxy: Arc<Proxy>,
    /// Who holds it in a shared storage: the node id of the daemon that took it (`None` in
    /// the in-memory storage, and for leases taken by Python pharox).
    pub holder: Option<Arc<str>>,
}

impl Lease {
    /// The leased proxy's id.
    pub fn proxy_id(&self) -> &ProxyId {
        &self.proxy.id
    }
}

fn ser_proxy_id<S: Serializer>(p: &Arc<Proxy>, s: S) -> Result<S::Ok, S::Error> {
    p.id.serialize(s)
}

/// Seconds since the Unix epoch of a wall-clock time (0 before the epoch).
pub fn unix_seconds(t: SystemTime) -> f64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

fn ser_unix_seconds<S: Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(unix_seconds(*t))
}

/// Counters of one pool at one moment.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct PoolStats {
    /// The pool's name.
    pub pool_name: Arc<str>,
    /// Proxies in the inventory (draining ones excluded).
    pub total: u32,
    /// Of those, with status `active`.
    pub active: u32,
    /// Active proxies with a free slot (what a lease could get right now).
    pub available: u32,
    /// Proxies carrying at least one lease (draining ones included).
    pub leased: u32,
    /// Live leases in the pool.
    pub total_leases: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stable_ids_are_uuid5_of_the_pharox_namespace() {
        assert_eq!(
            Uuid::new_v5(&Uuid::NAMESPACE_URL, b"urn:pharox"),
            ID_NAMESPACE
        );
        let id = stable_id("pool", "latam");
        assert_eq!(id.get_version_num(), 5);
        assert_eq!(Pool::new("latam").id, id);
        assert_eq!(
            ProxyId::from("p/10.0.0.1:8080").uuid(),
            stable_id("proxy", "p/10.0.0.1:8080")
        );
        let v4 = Uuid::new_v4();
        assert_eq!(ProxyId::new(v4.to_string()).uuid(), v4);
        assert_eq!(ProxyId::new(v4.simple().to_string()).uuid(), v4);
    }

    #[test]
    fn lease_ids_read_both_uuid_forms_only() {
        let id = LeaseId::new();
        assert_eq!(id.to_string().len(), 36);
        assert_eq!(id.to_string().parse::<LeaseId>(), Ok(id));
        assert_eq!(id.as_uuid().simple().to_string().parse::<LeaseId>(), Ok(id));
        for bad in [
            "",
            "abc",
            "{00000000-0000-0000-0000-000000000000}",
            "urn:uuid:00000000-0000-0000-0000-000000000000",
        ] {
            assert!(bad.parse::<LeaseId>().is_err(), "{bad}");
        }
    }
}
