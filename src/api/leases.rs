//! Leases through the lease API: acquire (one attempt, no waiting: 201 or 409), read (active
//! or ended), release (idempotent). A lease taken here counts against `max_concurrency` like
//! any other, is never renewed (it expires at its `ttl_seconds` if its holder vanishes), can
//! be closed by an operator, and can carry proxy-port connections (`CONSUMER-lease-ID`)
//! for as long as it lives. Leases the API issued are remembered for an hour after they end,
//! so that a client can still read a lease it released or that expired.

use std::time::{Duration, SystemTime};

use dashmap::DashMap;
use hyper::StatusCode;
use rustc_hash::FxBuildHasher;
use serde::Deserialize;
use uuid::Uuid;

use super::{ApiError, ApiResult, Call, json};
use crate::filter::Filter;
use crate::model::{Lease, LeaseId, ProxyMeta};
use crate::retry::wall_now;
use crate::selector::Selector;
use crate::storage::{AcquireRequest, Storage};

/// How long an ended lease stays readable.
const RETENTION: Duration = Duration::from_secs(3600);
/// Most leases remembered; past it, ended ones are forgotten first.
const MAX_REMEMBERED: usize = 200_000;

/// A lease the API issued.
#[derive(Clone, Debug)]
pub struct ApiLease {
    /// The lease as acquired.
    pub lease: Lease,
    /// Its pool's id.
    pub pool_id: Uuid,
    /// When it was released, if it was (expiry is read from `lease.expires_at`).
    pub released_at: Option<SystemTime>,
}

impl ApiLease {
    /// When it ended, if it did by `now`.
    fn ended(&self, now: SystemTime) -> Option<SystemTime> {
        self.released_at
            .or_else(|| (self.lease.expires_at <= now).then_some(self.lease.expires_at))
    }
}

/// Leases the API issued, kept for [`RETENTION`] after they end.
#[derive(Default)]
pub struct ApiLeases {
    map: DashMap<LeaseId, ApiLease, FxBuildHasher>,
}

impl ApiLeases {
    fn issued(&self, lease: Lease, pool_id: Uuid) {
        if self.map.len() >= MAX_REMEMBERED {
            self.prune(wall_now());
        }
        self.map.insert(
            lease.id,
            ApiLease {
                lease,
                pool_id,
                released_at: None,
            },
        );
    }

    /// Forgets leases ended more than [`RETENTION`] ago.
    fn prune(&self, now: SystemTime) {
        let horizon = now.checked_sub(RETENTION).unwrap_or(SystemTime::UNIX_EPOCH);
        self.map
            .retain(|_, l| l.ended(now).is_none_or(|at| at > horizon));
    }

    fn get(&self, id: LeaseId) -> Option<ApiLease> {
        self.map.get(&id).map(|l| l.clone())
    }

    fn released(&self, id: LeaseId, at: SystemTime) {
        if let Some(mut l) = self.map.get_mut(&id) {
            l.released_at.get_or_insert(at);
        }
    }

    /// True when the API issued lease `id` and it has ended.
    pub fn ended(&self, id: LeaseId) -> bool {
        self.map
            .get(&id)
            .is_some_and(|l| l.ended(wall_now()).is_some())
    }

    /// Leases remembered (live and ended).
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// True when none is remembered.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

/// `POST /v1/leases/` as pharox-sdk sends it.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewLease {
    pool_id: String,
    #[serde(default)]
    consumer_id: Option<String>,
    #[serde(default = "default_ttl")]
    ttl_seconds: i64,
    #[serde(default)]
    strategy: Option<String>,
    #[serde(default)]
    filters: Option<ApiFilter>,
}

fn default_ttl() -> i64 {
    300
}

/// A filter as pharox's `ProxyFilters` serialises it (null and `""` mean no constraint).
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct ApiFilter {
    source: Option<String>,
    country: Option<String>,
    city: Option<String>,
    isp: Option<String>,
    asn: Option<u32>,
    latitude: Option<f64>,
    longitude: Option<f64>,
    radius_km: Option<f64>,
    #[serde(default)]
    all_of: Vec<ApiFilter>,
    #[serde(default)]
    any_of: Vec<ApiFilter>,
    #[serde(default)]
    none_of: Vec<ApiFilter>,
}

impl ApiFilter {
    fn into_filter(self) -> Filter {
        let some = |v: Option<String>| v.filter(|s| !s.is_empty());
        Filter {
            meta: ProxyMeta {
                source: some(self.source),
                country: some(self.country).map(|c| c.to_ascii_uppercase()),
                city: some(self.city),
                isp: some(self.isp),
                asn: self.asn,
                latitude: self.latitude,
                longitude: self.longitude,
            },
            radius_km: self.radius_km,
            all_of: self.all_of.into_iter().map(Self::into_filter).collect(),
            any_of: self.any_of.into_iter().map(Self::into_filter).collect(),
            none_of: self.none_of.into_iter().map(Self::into_filter).collect(),
            predicate: None,
        }
    }
}

pub(super) async fn acquire(call: &Call<'_>) -> ApiResult {
    let body: NewLease = call.json()?;
    let pool_id = Uuid::try_parse(&body.pool_id).map_err(|_| ApiError::not_found())?;
    let (pool, _) = super::inventory::find_pool(call, pool_id).await?;
    let consumer = body
        .consumer_id
        .filter(|c| !c.is_empty())
        .unwrap_or_else(|| crate::DEFAULT_CONSUMER_NAME.to_owned());
    if !call.key.consumers.is_empty() && !call.key.consumers.contains(&consumer) {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            format!("this API key may not lease as `{consumer}`"),
        ));
    }
    let max = call.key.max_ttl_seconds;
    let ttl = u64::try_from(body.ttl_seconds)
        .ok()
        .filter(|t| (1..=max).contains(t))
        .ok_or_else(|| ApiError::invalid(format!("ttl_seconds: 1 to {max}")))?;
    let selector: Selector = match body.strategy.as_deref() {
        None => Selector::default(),
        Some(s) => s
            .parse()
            .map_err(|e: crate::model::UnknownName| ApiError::invalid(format!("strategy: {e}")))?,
    };
    let mut req = AcquireRequest::new(pool.name.as_str())
        .consumer(consumer.as_str())
        .duration(Duration::from_secs(ttl))
        .selector(selector);
    if let Some(f) = body.filters {
        let f = f.into_filter();
        f.validate()
            .map_err(|e| ApiError::invalid(format!("filters: {e}")))?;
        req = req.filter(f);
    }
    let Some(lease) = call.state.manager.acquire_proxy(&req).await? else {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            format!("no proxy available in pool `{}`", pool.name),
        ));
    };
    let body = json::lease(&lease, pool.id, None, call.key.reveal_credentials);
    call.state.api_leases.issued(lease, pool.id);
    Ok((StatusCode::CREATED, Some(body)))
}

/// The lease as it stands: the API's record (refreshed from the storage), or a live lease of
/// the storage the API of another daemon issued.
async fn current(call: &Call<'_>, id: LeaseId) -> Result<ApiLease, ApiError> {
    let storage = call.state.manager.storage();
    let live = storage.get_lease(id).await?;
    let now = wall_now();
    match (call.state.api_leases.get(id), live) {
        (Some(mut known), live) => {
            if known.released_at.is_none() && live.is_none() && known.lease.expires_at > now {
                // Released elsewhere (an operator, another daemon).
                known.released_at = Some(now);
                call.state.api_leases.released(id, now);
            }
            Ok(known)
        }
        (None, Some(lease)) => {
            let pool_id = storage
                .list_pools()
                .await?
                .into_iter()
                .find(|(p, _)| *p.name == *lease.pool_name)
                .map_or_else(
                    || crate::model::stable_id("pool", &lease.pool_name),
                    |(p, _)| p.id,
                );
            Ok(ApiLease {
                lease,
                pool_id,
                released_at: None,
            })
        }
        (None, None) => Err(ApiError::not_found()),
    }
}

pub(super) async fn get(call: &Call<'_>, id: Uuid) -> ApiResult {
    let known = current(call, LeaseId::from_uuid(id)).await?;
    let ended = known.ended(wall_now());
    let body = json::lease(
        &known.lease,
        known.pool_id,
        ended,
        call.key.reveal_credentials,
    );
    Ok((StatusCode::OK, Some(body)))
}

pub(super) async fn release(call: &Call<'_>, id: Uuid) -> ApiResult {
    let id = LeaseId::from_uuid(id);
    let mut known = current(call, id).await?;
    if known.ended(wall_now()).is_none() {
        // Its connections (`-lease-ID`) close with it.
        call.state.close_lease(id).await?;
        let at = wall_now();
        call.state.api_leases.released(id, at);
        known.released_at = Some(at);
    }
    let ended = known.ended(wall_now());
    let body = json::lease(
        &known.lease,
        known.pool_id,
        ended,
        call.key.reveal_credentials,
    );
    Ok((StatusCode::OK, Some(body)))
}
