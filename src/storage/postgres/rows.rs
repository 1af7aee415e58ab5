//! Rows to model values and back: proxies, leases, pool stats, and the arrays of
//! `proxy_upsert_batch`.
//!
//! Ids: a proxy this daemon upserted keeps the [`ProxyId`] of its record (the database holds
//! only its UUID, `ProxyId::uuid()`); any other proxy (Python's, another daemon's) is named
//! by its UUID text. Schemes: `coalesce(scheme, protocol)`, so a `socks5h` upstream stored as
//! protocol `socks5` + scheme `socks5h` reads back as `socks5h`; a row with a scheme pharox
//! cannot speak (Python's `socks4`) is skipped. A resting proxy (`rest_until` after the
//! database's now) reads as `inactive` with its `rest_until`, as the in-memory storage
//! reports it.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use dashmap::DashMap;
use serde_json::{Value, json};
use tokio_postgres::Row;
use uuid::Uuid;

use crate::model::{
    Credentials, Lease, LeaseId, LeaseStatus, PoolStats, Proxy, ProxyId, ProxyMeta, ProxyProtocol,
    ProxyStatus,
};

/// Row reading errors are driver errors (a column of an unexpected type).
pub(crate) type RowResult<T> = Result<T, tokio_postgres::Error>;

/// The config ids of the proxies this daemon upserted, by UUID.
pub(crate) type IdMap = DashMap<Uuid, ProxyId>;

/// The [`ProxyId`] for a stored UUID.
pub(crate) fn proxy_id(ids: &IdMap, id: Uuid) -> ProxyId {
    ids.get(&id)
        .map(|e| e.value().clone())
        .unwrap_or_else(|| ProxyId::new(id.hyphenated().to_string()))
}

/// The proxy columns common to every statement returning a proxy (`proxy_id`, `host`,
/// `port`, `scheme`, `credentials`, `status`, `max_concurrency`, metadata, `latency_us`,
/// `checked_at`). `None` when the row's scheme is not one pharox speaks.
pub(crate) fn proxy(row: &Row, pool: &str, ids: &IdMap) -> RowResult<Option<Proxy>> {
    let Ok(protocol) = row.try_get::<_, &str>("scheme")?.parse::<ProxyProtocol>() else {
        return Ok(None);
    };
    let status = row
        .try_get::<_, &str>("status")?
        .parse()
        .unwrap_or(ProxyStatus::Inactive);
    let port: i32 = row.try_get("port")?;
    let meta = ProxyMeta {
        source: row.try_get("source")?,
        country: row.try_get("country")?,
        city: row.try_get("city")?,
        isp: row.try_get("isp")?,
        asn: row
            .try_get::<_, Option<i32>>("asn")?
            .and_then(|a| u32::try_from(a).ok()),
        latitude: row.try_get("latitude")?,
        longitude: row.try_get("longitude")?,
    };
    Ok(Some(Proxy {
        id: proxy_id(ids, row.try_get("proxy_id")?),
        pool: pool.to_owned(),
        host: row.try_get("host")?,
        port: u16::try_from(port).unwrap_or(0),
        protocol,
        credentials: credentials(row.try_get("credentials")?),
        status,
        max_concurrency: row
            .try_get::<_, Option<i32>>("max_concurrency")?
            .map(|m| u32::try_from(m).unwrap_or(0)),
        checked_at: row.try_get("checked_at")?,
        meta,
        latency: row
            .try_get::<_, Option<i64>>("latency_us")?
            .and_then(|us| u64::try_from(us).ok())
            .map(Duration::from_micros),
        // Statements that do not select these columns leave them unknown.
        rest_until: row.try_get("rest_until").ok().flatten(),
        owner: row
            .try_get::<_, Option<String>>("owner")
            .ok()
            .flatten()
            .map(Arc::from),
    }))
}

/// Applies `rest_until` (list/get rows): a future one marks the proxy as resting.
pub(crate) fn with_rest(row: &Row, mut p: Proxy) -> RowResult<Proxy> {
    let rest: Option<SystemTime> = row.try_get("rest_until")?;
    let now: SystemTime = row.try_get("db_now")?;
    if let Some(until) = rest.filter(|t| *t > now) {
        if matches!(p.status, ProxyStatus::Active | ProxyStatus::Slow) {
            p.status = ProxyStatus::Inactive;
        }
        p.rest_until = Some(until);
    }
    Ok(p)
}

/// `{"user": U, "password": P}` (Python's format), when both are strings.
fn credentials(v: Option<Value>) -> Option<Credentials> {
    let v = v?;
    let user = v.get("user")?.as_str()?;
    let password = v.get("password")?.as_str()?;
    Some(Credentials::new(user, password))
}

/// The stored form of credentials.
pub(crate) fn credentials_json(c: &Credentials) -> Value {
    json!({"user": c.username, "password": c.password.expose()})
}

/// A lease from a row with `lease_id`, `acquired_at`, `expires_at` and the proxy columns.
pub(crate) struct LeaseRow<'a> {
    pub pool: Arc<str>,
    pub consumer: Arc<str>,
    pub holder: Option<Arc<str>>,
    pub ids: &'a IdMap,
}

impl LeaseRow<'_> {
    /// The lease; `None` when its proxy's scheme is not one pharox speaks.
    pub fn lease(self, row: &Row) -> RowResult<Option<Lease>> {
        let Some(proxy) = proxy(row, &self.pool, self.ids)? else {
            return Ok(None);
        };
        Ok(Some(Lease {
            id: LeaseId::from_uuid(row.try_get("lease_id")?),
            pool_name: self.pool,
            consumer_name: self.consumer,
            acquired_at: row.try_get("acquired_at")?,
            expires_at: row.try_get("expires_at")?,
            status: LeaseStatus::Active,
            proxy: Arc::new(proxy),
            holder: self.holder,
        }))
    }
}

/// A live lease from a `list_leases` / `get_lease` row (pool, consumer and holder in it).
pub(crate) fn listed_lease(row: &Row, ids: &IdMap) -> RowResult<Option<Lease>> {
    let pool: &str = row.try_get("pool_name")?;
    let consumer: &str = row.try_get("consumer_name")?;
    let holder: Option<&str> = row.try_get("holder")?;
    LeaseRow {
        pool: pool.into(),
        consumer: consumer.into(),
        holder: holder.map(Arc::from),
        ids,
    }
    .lease(row)
}

/// A lease released by the sweep, from one element of its `leases` json array.
pub(crate) fn swept_lease(v: &Value, ids: &IdMap) -> Option<(Lease, SystemTime)> {
    let text = |k: &str| v.get(k).and_then(Value::as_str);
    let time = |k: &str| {
        let secs = v.get(k)?.as_f64()?;
        Some(UNIX_EPOCH + Duration::try_from_secs_f64(secs).ok()?)
    };
    let id: Uuid = text("id")?.parse().ok()?;
    let proxy_uuid: Uuid = text("proxy")?.parse().ok()?;
    let pool = text("pool")?;
    let protocol = text("scheme")
        .and_then(|s| s.parse().ok())
        .unwrap_or(ProxyProtocol::Http);
    let port = v.get("port").and_then(Value::as_u64).unwrap_or(0);
    let proxy = Proxy::new(
        proxy_id(ids, proxy_uuid),
        pool,
        protocol,
        text("host").unwrap_or_default(),
        u16::try_from(port).unwrap_or(0),
    );
    let lease = Lease {
        id: LeaseId::from_uuid(id),
        pool_name: pool.into(),
        consumer_name: text("consumer")
            .unwrap_or(crate::DEFAULT_CONSUMER_NAME)
            .into(),
        acquired_at: time("acquired_at")?,
        expires_at: time("expires_at")?,
        status: LeaseStatus::Expired,
        proxy: Arc::new(proxy),
        holder: text("holder").map(Arc::from),
    };
    Some((lease, time("released_at")?))
}

/// Pool stats from a `pool_stats` row.
pub(crate) fn stats(row: &Row) -> RowResult<PoolStats> {
    let count = |k: &str| -> RowResult<u32> {
        Ok(u32::try_from(row.try_get::<_, i64>(k)?).unwrap_or(u32::MAX))
    };
    let name: &str = row.try_get("pool_name")?;
    Ok(PoolStats {
        pool_name: name.into(),
        total: count("total")?,
        active: count("active")?,
        available: count("available")?,
        leased: count("leased")?,
        total_leases: u64::try_from(row.try_get::<_, i64>("total_leases")?).unwrap_or(0),
    })
}

/// The parameter arrays of `proxy_upsert_batch` ($3..$19), one element per proxy.
#[derive(Default)]
pub(crate) struct UpsertBatch {
    pub ids: Vec<Uuid>,
    pub hosts: Vec<String>,
    pub ports: Vec<i32>,
    pub protocols: Vec<&'static str>,
    pub schemes: Vec<Option<&'static str>>,
    pub credentials: Vec<Option<Value>>,
    pub statuses: Vec<&'static str>,
    pub sources: Vec<Option<String>>,
    pub countries: Vec<Option<String>>,
    pub cities: Vec<Option<String>>,
    pub latitudes: Vec<Option<f64>>,
    pub longitudes: Vec<Option<f64>>,
    pub isps: Vec<Option<String>>,
    pub asns: Vec<Option<i32>>,
    pub caps: Vec<Option<i32>>,
    pub checked: Vec<SystemTime>,
    pub latencies: Vec<Option<i64>>,
}

impl UpsertBatch {
    /// Appends one (validated) proxy.
    pub fn push(&mut self, p: &Proxy) {
        let (protocol, scheme) = match p.protocol {
            ProxyProtocol::Socks5h => ("socks5", Some("socks5h")),
            other => (other.as_str(), None),
        };
        let m = &p.meta;
        self.ids.push(p.id.uuid());
        self.hosts.push(p.host.clone());
        self.ports.push(i32::from(p.port));
        self.protocols.push(protocol);
        self.schemes.push(scheme);
        self.credentials
            .push(p.credentials.as_ref().map(credentials_json));
        self.statuses.push(p.status.as_str());
        self.sources.push(m.source.clone());
        self.countries
            .push(m.country.as_ref().map(|c| c.to_ascii_uppercase()));
        self.cities.push(m.city.clone());
        self.latitudes.push(m.latitude);
        self.longitudes.push(m.longitude);
        self.isps.push(m.isp.clone());
        self.asns.push(m.asn.and_then(|a| i32::try_from(a).ok()));
        self.caps
            .push(p.max_concurrency.and_then(|c| i32::try_from(c).ok()));
        self.checked.push(p.checked_at);
        self.latencies.push(
            p.latency
                .map(|l| i64::try_from(l.as_micros()).unwrap_or(i64::MAX)),
        );
    }

    /// How many proxies.
    pub fn len(&self) -> usize {
        self.ids.len()
    }
}
