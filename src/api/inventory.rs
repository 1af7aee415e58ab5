//! Pools and proxies through the lease API. What the API creates lives in the storage (in
//! fleet mode, the shared database) with no owner: a config reload never deletes it, and the
//! API never deletes or rewrites what a config file defines (409), though it may change a
//! config proxy's status, as an operator can.

use std::time::SystemTime;

use hyper::StatusCode;
use serde::Deserialize;
use serde_json::Value;
use uuid::Uuid;

use super::{ApiError, ApiResult, Call, json};
use crate::model::{
    Credentials, HealthCheck, Pool, PoolStats, Proxy, ProxyId, ProxyInfo, ProxyMeta, ProxyProtocol,
    ProxyStatus,
};
use crate::storage::Storage;
use crate::target::Host;

/// The pool with this id, with its figures.
pub(super) async fn find_pool(call: &Call<'_>, id: Uuid) -> Result<(Pool, PoolStats), ApiError> {
    let pools = call.state.manager.storage().list_pools().await?;
    pools
        .into_iter()
        .find(|(p, _)| p.id == id)
        .ok_or_else(ApiError::not_found)
}

pub(super) async fn list_pools(call: &Call<'_>) -> ApiResult {
    let pools = call.state.manager.storage().list_pools().await?;
    let items: Vec<Value> = pools.iter().map(|(p, s)| json::pool(p, s)).collect();
    Ok((StatusCode::OK, Some(Value::Array(items))))
}

pub(super) async fn get_pool(call: &Call<'_>, id: Uuid) -> ApiResult {
    let (pool, stats) = find_pool(call, id).await?;
    Ok((StatusCode::OK, Some(json::pool(&pool, &stats))))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewPool {
    name: String,
    #[serde(default)]
    description: Option<String>,
}

pub(super) async fn create_pool(call: &Call<'_>) -> ApiResult {
    call.must_manage()?;
    let body: NewPool = call.json()?;
    let name = body.name.trim();
    if name.is_empty()
        || name.chars().count() > 128
        || name.chars().any(|c| c.is_whitespace() || c.is_control())
    {
        return Err(ApiError::invalid(
            "name: 1 to 128 characters without spaces or control characters",
        ));
    }
    let storage = call.state.manager.storage();
    if storage
        .list_pools()
        .await?
        .iter()
        .any(|(p, _)| p.name == name)
    {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            format!("a pool named `{name}` exists"),
        ));
    }
    let mut pool = Pool::new(name);
    pool.description = body.description.filter(|d| !d.is_empty());
    pool.lease_slow = true;
    storage.upsert_pool(pool.clone()).await?;
    refresh(call).await;
    let stats = storage.pool_stats(name).await?.unwrap_or_default();
    Ok((StatusCode::CREATED, Some(json::pool(&pool, &stats))))
}

pub(super) async fn delete_pool(call: &Call<'_>, id: Uuid) -> ApiResult {
    call.must_manage()?;
    let (pool, _) = find_pool(call, id).await?;
    if pool.owner.is_some() {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            format!("pool `{}` is defined in a config file", pool.name),
        ));
    }
    call.state.manager.storage().remove_pool(&pool.name).await?;
    refresh(call).await;
    Ok((StatusCode::NO_CONTENT, None))
}

/// Lets the proxy port see pools the API made or removed.
async fn refresh(call: &Call<'_>) {
    if let Err(e) = crate::reload::refresh_pools(call.state).await {
        tracing::warn!(error = %e, "could not refresh the pools of the storage");
    }
}

pub(super) async fn list_proxies(call: &Call<'_>, id: Uuid) -> ApiResult {
    let (pool, _) = find_pool(call, id).await?;
    let proxies = call
        .state
        .manager
        .storage()
        .list_proxies(&pool.name)
        .await?;
    let items: Vec<Value> = proxies
        .iter()
        .filter(|i| !i.draining)
        .map(|i| json::proxy(i, pool.id))
        .collect();
    Ok((StatusCode::OK, Some(Value::Array(items))))
}

/// Fields a body may not have (serde cannot deny unknown fields next to a flattened struct,
/// so they are collected and refused here).
type Unknown = std::collections::BTreeMap<String, serde::de::IgnoredAny>;

fn no_unknown(unknown: &Unknown) -> Result<(), ApiError> {
    match unknown.keys().next() {
        Some(k) => Err(ApiError::invalid(format!("unknown field `{k}`"))),
        None => Ok(()),
    }
}

/// A proxy as a client creates it (pharox-sdk's `add_proxy`, plus the extension fields).
#[derive(Deserialize)]
struct NewProxy {
    host: String,
    port: u32,
    #[serde(default = "http")]
    protocol: String,
    username: Option<String>,
    password: Option<String>,
    status: Option<ProxyStatus>,
    max_concurrency: Option<u32>,
    #[serde(flatten)]
    meta: ProxyMeta,
    #[serde(flatten)]
    unknown: Unknown,
}

fn http() -> String {
    "http".into()
}

/// A proxy's metadata as given: `""` means none, country codes are upper-cased.
fn normalised(mut meta: ProxyMeta) -> Result<ProxyMeta, ApiError> {
    for slot in [
        &mut meta.source,
        &mut meta.country,
        &mut meta.city,
        &mut meta.isp,
    ] {
        if slot.as_deref() == Some("") {
            *slot = None;
        }
    }
    if let Some(c) = &mut meta.country {
        c.make_ascii_uppercase();
    }
    check_coordinates(&meta)?;
    Ok(meta)
}

fn check_coordinates(m: &ProxyMeta) -> Result<(), ApiError> {
    match (m.latitude, m.longitude) {
        (None, None) => Ok(()),
        (Some(lat), Some(lon))
            if (-90.0..=90.0).contains(&lat) && (-180.0..=180.0).contains(&lon) =>
        {
            Ok(())
        }
        (Some(_), Some(_)) => Err(ApiError::invalid("latitude/longitude out of range")),
        _ => Err(ApiError::invalid("latitude and longitude go together")),
    }
}

pub(super) async fn create_proxy(call: &Call<'_>, pool_id: Uuid) -> ApiResult {
    call.must_manage()?;
    let (pool, _) = find_pool(call, pool_id).await?;
    let body: NewProxy = call.json()?;
    no_unknown(&body.unknown)?;
    let protocol: ProxyProtocol = match body.protocol.as_str() {
        "socks4" => {
            return Err(ApiError::invalid(
                "protocol: socks4 upstreams are not supported",
            ));
        }
        "direct" => return Err(ApiError::invalid("protocol: direct is for config files")),
        other => other
            .parse()
            .map_err(|e: crate::model::UnknownName| ApiError::invalid(format!("protocol: {e}")))?,
    };
    Host::parse(&body.host).map_err(|e| ApiError::invalid(format!("host: {e}")))?;
    let port = u16::try_from(body.port)
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| ApiError::invalid("port: 1 to 65535"))?;
    if body.max_concurrency == Some(0) {
        return Err(ApiError::invalid(
            "max_concurrency: at least 1 (null: unlimited)",
        ));
    }
    let credentials = match (body.username, body.password) {
        (None, None) => None,
        (Some(u), Some(p)) if !u.trim().is_empty() && !p.trim().is_empty() => {
            Some(Credentials::new(u, p))
        }
        _ => {
            return Err(ApiError::invalid(
                "username and password: both, non-blank, or neither",
            ));
        }
    };
    let mut proxy = Proxy::new(
        ProxyId::new(Uuid::new_v4().to_string()),
        pool.name.clone(),
        protocol,
        body.host,
        port,
    );
    proxy.credentials = credentials;
    proxy.status = body.status.unwrap_or(ProxyStatus::Active);
    proxy.max_concurrency = body.max_concurrency;
    proxy.meta = normalised(body.meta)?;
    proxy.checked_at = SystemTime::now();
    let storage = call.state.manager.storage();
    storage.upsert_proxy(proxy.clone()).await?;
    let info = storage
        .get_proxy(&proxy.id)
        .await?
        .ok_or_else(ApiError::not_found)?;
    Ok((StatusCode::CREATED, Some(json::proxy(&info, pool.id))))
}

/// The proxy with this UUID in the pool with this id.
async fn find_proxy(
    call: &Call<'_>,
    pool_id: Uuid,
    id: Uuid,
) -> Result<(Pool, ProxyInfo), ApiError> {
    let (pool, _) = find_pool(call, pool_id).await?;
    let proxies = call
        .state
        .manager
        .storage()
        .list_proxies(&pool.name)
        .await?;
    let info = proxies
        .into_iter()
        .find(|i| !i.draining && i.proxy.id.uuid() == id)
        .ok_or_else(ApiError::not_found)?;
    Ok((pool, info))
}

/// A change of a proxy (pharox-sdk's `update_proxy_status` sends only `status`). Absent
/// fields keep their value; `""` clears a metadata string.
#[derive(Deserialize)]
struct ProxyChange {
    status: Option<ProxyStatus>,
    #[serde(default, deserialize_with = "some")]
    max_concurrency: Option<Option<u32>>,
    #[serde(flatten)]
    meta: ProxyMeta,
    #[serde(flatten)]
    unknown: Unknown,
}

/// A present field, even `null` (`Some(None)`), apart from an absent one (`None`).
fn some<'de, D: serde::Deserializer<'de>, T: Deserialize<'de>>(
    d: D,
) -> Result<Option<T>, D::Error> {
    T::deserialize(d).map(Some)
}

pub(super) async fn update_proxy(call: &Call<'_>, pool_id: Uuid, id: Uuid) -> ApiResult {
    call.must_manage()?;
    let (pool, info) = find_proxy(call, pool_id, id).await?;
    let change: ProxyChange = call.json()?;
    no_unknown(&change.unknown)?;
    let meta_change = change.max_concurrency.is_some() || has_meta(&change.meta);
    if meta_change && info.proxy.owner.is_some() {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "this proxy is defined in a config file: only its status can change here",
        ));
    }
    let storage = call.state.manager.storage();
    if meta_change {
        let mut p = (*info.proxy).clone();
        if let Some(max) = change.max_concurrency {
            if max == Some(0) {
                return Err(ApiError::invalid(
                    "max_concurrency: at least 1 (null: unlimited)",
                ));
            }
            p.max_concurrency = max;
        }
        merge_meta(&mut p.meta, change.meta)?;
        storage.upsert_proxy(p).await?;
    }
    if let Some(status) = change.status {
        let check = HealthCheck {
            status,
            checked_at: Some(SystemTime::now()),
            latency: None,
        };
        storage.apply_health(&info.proxy.id, check).await?;
        if status == ProxyStatus::Active {
            call.state.failures.remove(&info.proxy.id);
        }
    }
    let info = storage
        .get_proxy(&info.proxy.id)
        .await?
        .ok_or_else(ApiError::not_found)?;
    Ok((StatusCode::OK, Some(json::proxy(&info, pool.id))))
}

fn has_meta(m: &ProxyMeta) -> bool {
    *m != ProxyMeta::default()
}

/// Applies the fields present in `change` (an empty string clears one).
fn merge_meta(meta: &mut ProxyMeta, change: ProxyMeta) -> Result<(), ApiError> {
    let set = |slot: &mut Option<String>, v: Option<String>| {
        if let Some(v) = v {
            *slot = (!v.is_empty()).then_some(v);
        }
    };
    set(&mut meta.source, change.source);
    set(
        &mut meta.country,
        change.country.map(|c| c.to_ascii_uppercase()),
    );
    set(&mut meta.city, change.city);
    set(&mut meta.isp, change.isp);
    if change.asn.is_some() {
        meta.asn = change.asn;
    }
    if change.latitude.is_some() || change.longitude.is_some() {
        meta.latitude = change.latitude;
        meta.longitude = change.longitude;
    }
    check_coordinates(meta)
}

pub(super) async fn delete_proxy(call: &Call<'_>, pool_id: Uuid, id: Uuid) -> ApiResult {
    call.must_manage()?;
    let (_, info) = find_proxy(call, pool_id, id).await?;
    if info.proxy.owner.is_some() {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "this proxy is defined in a config file",
        ));
    }
    call.state
        .manager
        .storage()
        .remove_proxy(&info.proxy.id)
        .await?;
    Ok((StatusCode::NO_CONTENT, None))
}
