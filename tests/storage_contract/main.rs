//! The storage contract, one suite run on both backends: every scenario is an async fn
//! generic over `S: Storage` (`selection.rs`: selectors and filters; `lifecycle.rs`: leases,
//! inventory, health), run on `InMemoryStorage` (module `memory`) and on `PostgresStorage`
//! in a database of its own (module `postgres`; needs `TEST_PHAROX_PG`), with the same
//! inventory and the same expected answers.
//!
//! Where an order depends on proxy ids (round_robin, tie-breaks), the ids are UUID strings:
//! the in-memory storage orders ids as strings, PostgreSQL orders the stored UUIDs, and for
//! lower-case hyphenated UUIDs the two orders are the same. Expiry uses short real durations
//! and polls (the database clock does not follow tokio's paused time).

#[path = "../common/mod.rs"]
mod common;
mod lifecycle;
#[path = "../pgsupport/mod.rs"]
mod pgsupport;
mod selection;

use std::time::{Duration, SystemTime};

use common::proxy;
use lifecycle::*;
use pgsupport::TestDb;
use pharox::{AcquireRequest, InMemoryStorage, Pool, Proxy, ProxyManager, Storage};
use selection::*;

/// A test's manager, and the database it uses (if any), dropped last.
pub(crate) struct Env<S: Storage> {
    pub m: ProxyManager<S>,
    _db: Option<TestDb>,
}

impl<S: Storage> Env<S> {
    pub fn s(&self) -> &S {
        self.m.storage()
    }

    /// Creates pool `p` with these proxies.
    pub async fn with(self, proxies: Vec<Proxy>) -> Self {
        self.s().upsert_pool(Pool::new("p")).await.unwrap();
        for p in proxies {
            self.s().upsert_proxy(p).await.unwrap();
        }
        self
    }

    pub async fn pick(&self, req: &AcquireRequest) -> Option<String> {
        self.m
            .acquire_proxy(req)
            .await
            .unwrap()
            .map(|l| l.proxy_id().to_string())
    }

    pub async fn stats(&self) -> (u32, u32, u32, u32, u64) {
        let s = self.s().pool_stats("p").await.unwrap().expect("pool p");
        (s.total, s.active, s.available, s.leased, s.total_leases)
    }
}

async fn memory() -> Env<InMemoryStorage> {
    Env {
        m: ProxyManager::new(InMemoryStorage::new()),
        _db: None,
    }
}

async fn postgres(tag: &str) -> Option<Env<pharox::PostgresStorage>> {
    let db = TestDb::new(tag).await?;
    let storage = db.storage("contract").await;
    Some(Env {
        m: ProxyManager::new(storage),
        _db: Some(db),
    })
}

/// Runs each scenario on both backends.
macro_rules! contract {
    ($($name:ident),* $(,)?) => {
        mod memory {
            $(#[tokio::test]
            async fn $name() {
                super::$name(super::memory().await).await
            })*
        }
        mod postgres {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                if let Some(env) = super::postgres(stringify!($name)).await {
                    super::$name(env).await
                }
            })*
        }
    };
}

contract!(
    consumers_are_idempotent,
    only_active_proxies_are_leased,
    unknown_pool_is_an_error,
    first_available_follows_inventory_order,
    least_used_breaks_ties_by_check_then_id,
    round_robin_rotates_in_id_order,
    round_robin_neither_skips_nor_repeats,
    round_robin_resumes_after_a_vanished_id,
    lowest_latency_order,
    lowest_latency_buckets_spread_leases,
    random_covers_the_eligible_only,
    every_scalar_filter_field,
    geo_radius_is_inclusive,
    combinators,
    exclude_and_only,
    caps_hold,
    release_is_idempotent,
    renew_extends_live_leases_only,
    invalid_durations_are_refused,
    cleanup_releases_expired_leases,
    pool_stats_count,
    slow_proxies_follow_the_pool_setting,
    upsert_keeps_live_counts,
    removed_proxies_drain,
    removed_pools_drain,
    health_changes_apply,
    rests_take_proxies_out_until_their_deadline,
    leases_are_listed,
    guard_releases_on_drop,
    a_release_wakes_a_waiter,
);

/// A UUID-form id whose string order is its UUID order.
pub(crate) fn uid(n: u8) -> String {
    format!("00000000-0000-4000-8000-{n:012x}")
}

pub(crate) fn one(id: &str) -> Proxy {
    proxy("p", id).with_max_concurrency(Some(1))
}

pub(crate) fn at(secs: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000 + secs)
}
