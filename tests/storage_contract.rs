//! The storage contract, one suite run on both backends: every scenario is an async fn
//! generic over `S: Storage`, run on `InMemoryStorage` (module `memory`) and on
//! `PostgresStorage` in a database of its own (module `postgres`; needs `PHAROX_TEST_PG`),
//! with the same inventory and the same expected answers.
//!
//! Where an order depends on proxy ids (round_robin, tie-breaks), the ids are UUID strings:
//! the in-memory storage orders ids as strings, PostgreSQL orders the stored UUIDs, and for
//! lower-case hyphenated UUIDs the two orders are the same. Expiry uses short real durations
//! and polls (the database clock does not follow tokio's paused time).

mod common;
mod pgsupport;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use common::proxy;
use pgsupport::{TestDb, eventually};
use pharox::filter::haversine_km;
use pharox::storage::{MAX_LEASE_DURATION, Renewal};
use pharox::{
    AcquireRequest, Filter, HealthCheck, InMemoryStorage, LeaseError, Pool, Proxy, ProxyId,
    ProxyManager, ProxyStatus, RetryPolicy, Selector, Storage,
};

/// A test's manager, and the database it uses (if any), dropped last.
struct Env<S: Storage> {
    m: ProxyManager<S>,
    _db: Option<TestDb>,
}

impl<S: Storage> Env<S> {
    fn s(&self) -> &S {
        self.m.storage()
    }

    /// Creates pool `p` with these proxies.
    async fn with(self, proxies: Vec<Proxy>) -> Self {
        self.s().upsert_pool(Pool::new("p")).await.unwrap();
        for p in proxies {
            self.s().upsert_proxy(p).await.unwrap();
        }
        self
    }

    async fn pick(&self, req: &AcquireRequest) -> Option<String> {
        self.m
            .acquire_proxy(req)
            .await
            .unwrap()
            .map(|l| l.proxy_id().to_string())
    }

    async fn stats(&self) -> (u32, u32, u32, u32, u64) {
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
fn uid(n: u8) -> String {
    format!("00000000-0000-4000-8000-{n:012x}")
}

fn one(id: &str) -> Proxy {
    proxy("p", id).with_max_concurrency(Some(1))
}

fn at(secs: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000 + secs)
}

async fn consumers_are_idempotent<S: Storage>(e: Env<S>) {
    let a = e.s().ensure_consumer("worker-1").await.unwrap();
    assert_eq!(a, e.s().ensure_consumer("worker-1").await.unwrap());
    let d = e.s().ensure_consumer("").await.unwrap();
    assert_eq!(&*d.name, pharox::DEFAULT_CONSUMER_NAME);
    let e = e.with(vec![proxy("p", "a")]).await;
    let lease =
        e.m.acquire_proxy(&AcquireRequest::new("p").consumer("worker-2"))
            .await
            .unwrap()
            .unwrap();
    assert_eq!(&*lease.consumer_name, "worker-2");
    assert_eq!(&*lease.pool_name, "p");
}

async fn only_active_proxies_are_leased<S: Storage>(e: Env<S>) {
    let e = e
        .with(vec![
            proxy("p", "a").with_status(ProxyStatus::Inactive),
            proxy("p", "b").with_status(ProxyStatus::Banned),
            proxy("p", "c"),
        ])
        .await;
    assert_eq!(
        e.pick(&AcquireRequest::new("p")).await.as_deref(),
        Some("c")
    );
}

async fn unknown_pool_is_an_error<S: Storage>(e: Env<S>) {
    let e = e.with(vec![proxy("p", "a")]).await;
    let err =
        e.m.acquire_proxy(&AcquireRequest::new("q"))
            .await
            .unwrap_err();
    assert!(
        matches!(err, LeaseError::UnknownPool(ref n) if n == "q"),
        "{err:?}"
    );
    assert!(e.s().pool_stats("q").await.unwrap().is_none());
}

async fn first_available_follows_inventory_order<S: Storage>(e: Env<S>) {
    let e = e.with(vec![one("z"), one("a"), one("m")]).await;
    let req = AcquireRequest::new("p");
    assert_eq!(e.pick(&req).await.as_deref(), Some("z"));
    assert_eq!(e.pick(&req).await.as_deref(), Some("a"));
    e.s().upsert_proxy(one("z")).await.unwrap();
    assert_eq!(e.pick(&req).await.as_deref(), Some("m"));
    assert_eq!(e.pick(&req).await, None);
}

async fn least_used_breaks_ties_by_check_then_id<S: Storage>(e: Env<S>) {
    let checked = |id: &str, t| {
        let mut p = proxy("p", id);
        p.checked_at = at(t);
        p
    };
    let (a, b, c) = (uid(1), uid(2), uid(3));
    let e = e
        .with(vec![checked(&b, 100), checked(&c, 50), checked(&a, 100)])
        .await;
    let req = AcquireRequest::new("p").selector(Selector::LeastUsed);
    for want in [&c, &a, &b, &c] {
        assert_eq!(e.pick(&req).await.as_ref(), Some(want));
    }
}

async fn round_robin_rotates_in_id_order<S: Storage>(e: Env<S>) {
    let ids = [uid(3), uid(1), uid(2)];
    let e = e.with(ids.iter().map(|i| proxy("p", i)).collect()).await;
    let req = AcquireRequest::new("p").selector(Selector::RoundRobin);
    let mut seen = Vec::new();
    for _ in 0..5 {
        let lease = e.m.acquire_proxy(&req).await.unwrap().unwrap();
        seen.push(lease.proxy_id().to_string());
        e.m.release_proxy(&lease).await.unwrap();
    }
    assert_eq!(seen, [uid(1), uid(2), uid(3), uid(1), uid(2)]);
}

async fn round_robin_neither_skips_nor_repeats<S: Storage>(e: Env<S>) {
    let e = e.with(vec![one(&uid(1)), one(&uid(2)), one(&uid(3))]).await;
    let req = AcquireRequest::new("p").selector(Selector::RoundRobin);
    for i in 1..=3 {
        assert_eq!(e.pick(&req).await, Some(uid(i)));
    }
    assert_eq!(e.pick(&req).await, None);
}

async fn round_robin_resumes_after_a_vanished_id<S: Storage>(e: Env<S>) {
    let (a, b, c) = (uid(1), uid(2), uid(3));
    let e = e
        .with(vec![proxy("p", &a), proxy("p", &b), proxy("p", &c)])
        .await;
    let req = AcquireRequest::new("p").selector(Selector::RoundRobin);
    assert_eq!(e.pick(&req).await.as_ref(), Some(&a));
    assert_eq!(e.pick(&req).await.as_ref(), Some(&b));
    for id in [&b, &c] {
        e.s()
            .set_proxy_status(&id.as_str().into(), ProxyStatus::Banned)
            .await
            .unwrap();
    }
    assert_eq!(e.pick(&req).await.as_ref(), Some(&a));
    e.s()
        .set_proxy_status(&c.as_str().into(), ProxyStatus::Active)
        .await
        .unwrap();
    assert_eq!(e.pick(&req).await.as_ref(), Some(&c));
}

fn timed(id: &str, ms: Option<u64>, city: &str) -> Proxy {
    let mut p = proxy("p", id);
    p.latency = ms.map(Duration::from_millis);
    p.meta.city = Some(city.into());
    p
}

async fn lowest_latency_order<S: Storage>(e: Env<S>) {
    let (fa, fb) = (uid(1), uid(2));
    let e = e
        .with(vec![
            timed(&uid(9), None, "unmeasured"),
            timed(&uid(8), Some(300), "slow"),
            timed(&fb, Some(20), "fast"),
            timed(&fa, Some(20), "fast"),
        ])
        .await;
    let req = AcquireRequest::new("p").selector(Selector::LowestLatency);
    assert_eq!(e.pick(&req).await.as_ref(), Some(&fa));
    assert_eq!(
        e.pick(&req).await.as_ref(),
        Some(&fb),
        "same latency: least used"
    );
    assert_eq!(e.pick(&req).await.as_ref(), Some(&fa));
    let not_fast = req
        .clone()
        .filter(Filter::new().none_of([Filter::new().city("fast")]));
    assert_eq!(
        e.pick(&not_fast).await,
        Some(uid(8)),
        "unmeasured comes last"
    );
}

async fn lowest_latency_buckets_spread_leases<S: Storage>(e: Env<S>) {
    let e = e
        .with(vec![
            timed(&uid(1), Some(20), "x"),
            timed(&uid(2), Some(21), "x"),
            timed(&uid(3), Some(100), "x"),
        ])
        .await;
    let req = AcquireRequest::new("p").selector(Selector::LowestLatency);
    let mut got = Vec::new();
    for _ in 0..4 {
        got.push(e.pick(&req).await.unwrap());
    }
    assert_eq!(got, [uid(1), uid(2), uid(1), uid(2)]);
}

async fn random_covers_the_eligible_only<S: Storage>(e: Env<S>) {
    let e = e
        .with(vec![
            proxy("p", "a"),
            proxy("p", "b"),
            proxy("p", "c"),
            proxy("p", "off").with_status(ProxyStatus::Inactive),
        ])
        .await;
    let req = AcquireRequest::new("p").selector(Selector::Random);
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..150 {
        let lease = e.m.acquire_proxy(&req).await.unwrap().unwrap();
        seen.insert(lease.proxy_id().to_string());
        e.m.release_proxy(&lease).await.unwrap();
    }
    assert_eq!(seen.into_iter().collect::<Vec<_>>(), ["a", "b", "c"]);
}

fn tagged(id: &str) -> Proxy {
    let mut p = proxy("p", id).with_country("ar");
    p.meta.city = Some("Cordoba".into());
    p.meta.source = Some("vendor-a".into());
    p.meta.isp = Some("Telecom".into());
    p.meta.asn = Some(7303);
    p
}

async fn every_scalar_filter_field<S: Storage>(e: Env<S>) {
    let mut other = proxy("p", "other").with_country("BR");
    other.meta.city = Some("Rio".into());
    other.meta.source = Some("vendor-b".into());
    other.meta.isp = Some("Claro".into());
    other.meta.asn = Some(28573);
    let e = e.with(vec![other, tagged("tagged")]).await;
    for f in [
        Filter::new().country("ar"),
        Filter::new().country("AR"),
        Filter::new().city("Cordoba"),
        Filter::new().source("vendor-a"),
        Filter::new().isp("Telecom"),
        Filter::new().asn(7303),
        Filter::new().country("ar").city("Cordoba").asn(7303),
    ] {
        let req = AcquireRequest::new("p").filter(f.clone());
        assert_eq!(e.pick(&req).await.as_deref(), Some("tagged"), "{f:?}");
    }
    for f in [
        Filter::new().city("cordoba"),
        Filter::new().asn(1),
        Filter::new().asn(u32::MAX),
        Filter::new().country("UY"),
        Filter::new().country("AR").city("Rio"),
    ] {
        assert_eq!(
            e.pick(&AcquireRequest::new("p").filter(f.clone())).await,
            None,
            "{f:?}"
        );
    }
}

async fn geo_radius_is_inclusive<S: Storage>(e: Env<S>) {
    let d = haversine_km(0.0, 0.0, 0.0, 1.0);
    let mut east = proxy("p", "east");
    east.meta.latitude = Some(0.0);
    east.meta.longitude = Some(1.0);
    let e = e.with(vec![proxy("p", "nowhere"), east]).await;
    let near = |r| AcquireRequest::new("p").filter(Filter::new().near(0.0, 0.0, r));
    assert_eq!(e.pick(&near(d)).await.as_deref(), Some("east"));
    assert_eq!(e.pick(&near(d * (1.0 - 1e-12))).await, None);
    let exact = Filter {
        meta: pharox::ProxyMeta {
            latitude: Some(0.0),
            longitude: Some(1.0),
            ..Default::default()
        },
        ..Filter::new()
    };
    let req = AcquireRequest::new("p").filter(exact);
    assert_eq!(e.pick(&req).await.as_deref(), Some("east"));
}

async fn combinators<S: Storage>(e: Env<S>) {
    let e = e
        .with(vec![tagged("t1"), proxy("p", "plain").with_country("US")])
        .await;
    let cases = [
        (
            Filter::new().all_of([Filter::new().country("AR"), Filter::new().asn(7303)]),
            Some("t1"),
        ),
        (
            Filter::new().all_of([Filter::new().country("AR"), Filter::new().asn(1)]),
            None,
        ),
        (
            Filter::new().any_of([Filter::new().asn(1), Filter::new().country("US")]),
            Some("plain"),
        ),
        (
            Filter::new().any_of([Filter::new().asn(1), Filter::new().country("FR")]),
            None,
        ),
        (Filter::new().any_of([Filter::new()]), Some("t1")),
        (
            Filter::new().none_of([Filter::new().country("AR")]),
            Some("plain"),
        ),
        (
            Filter::new().none_of([Filter::new().city("Cordoba")]),
            Some("plain"),
        ),
        (Filter::new().none_of([Filter::new()]), None),
        (
            Filter::new()
                .any_of([Filter::new().country("US"), Filter::new().isp("Telecom")])
                .none_of([Filter::new().asn(7303)]),
            Some("plain"),
        ),
    ];
    for (f, want) in cases {
        let got = e.pick(&AcquireRequest::new("p").filter(f.clone())).await;
        assert_eq!(got.as_deref(), want, "{f:?}");
    }
}

async fn exclude_and_only<S: Storage>(e: Env<S>) {
    let e = e
        .with(vec![proxy("p", "a"), proxy("p", "b"), proxy("p", "c")])
        .await;
    let req = AcquireRequest::new("p");
    let ex = req.clone().exclude([ProxyId::from("a")]);
    assert_eq!(e.pick(&ex).await.as_deref(), Some("b"));
    let only = req.clone().only([ProxyId::from("c")]);
    assert_eq!(e.pick(&only).await.as_deref(), Some("c"));
    assert_eq!(e.pick(&req.clone().only([])).await, None);
    let both = req
        .clone()
        .only(["a".into(), "b".into()])
        .exclude(["a".into()]);
    assert_eq!(e.pick(&both).await.as_deref(), Some("b"));
    let all_out = req.exclude(["a".into(), "b".into(), "c".into()]);
    assert_eq!(e.pick(&all_out).await, None);
}

async fn caps_hold<S: Storage>(e: Env<S>) {
    let e = e
        .with(vec![
            one("x"),
            proxy("p", "y").with_max_concurrency(Some(2)),
            proxy("p", "free"),
        ])
        .await;
    let only = |id: &str| AcquireRequest::new("p").only([ProxyId::from(id)]);
    assert!(e.pick(&only("x")).await.is_some());
    assert_eq!(e.pick(&only("x")).await, None);
    assert!(e.pick(&only("y")).await.is_some());
    assert!(e.pick(&only("y")).await.is_some());
    assert_eq!(e.pick(&only("y")).await, None);
    for _ in 0..5 {
        assert!(e.pick(&only("free")).await.is_some());
    }
    assert_eq!(e.stats().await.4, 8);
}

async fn release_is_idempotent<S: Storage>(e: Env<S>) {
    let e = e.with(vec![one("a")]).await;
    let lease =
        e.m.acquire_proxy(&AcquireRequest::new("p"))
            .await
            .unwrap()
            .unwrap();
    assert!(e.m.release_proxy(&lease).await.unwrap());
    assert!(!e.m.release_proxy(&lease).await.unwrap());
    assert!(!e.m.release_by_id(lease.id).await.unwrap());
    assert!(!e.m.release_by_id(pharox::LeaseId::new()).await.unwrap());
    let again =
        e.m.acquire_proxy(&AcquireRequest::new("p"))
            .await
            .unwrap()
            .unwrap();
    assert!(e.m.release_by_id(again.id).await.unwrap());
    assert_eq!(e.stats().await.4, 0);
}

async fn renew_extends_live_leases_only<S: Storage>(e: Env<S>) {
    let e = e.with(vec![proxy("p", "a")]).await;
    let req = AcquireRequest::new("p").duration(Duration::from_secs(60));
    let live = e.m.acquire_proxy(&req).await.unwrap().unwrap();
    let gone = e.m.acquire_proxy(&req).await.unwrap().unwrap();
    e.m.release_proxy(&gone).await.unwrap();
    let renewals: Vec<Renewal> = [&live, &gone]
        .iter()
        .map(|l| Renewal {
            id: l.id,
            pool: l.pool_name.clone(),
            duration: Duration::from_secs(3600),
        })
        .collect();
    let renewed = e.m.renew_many(&renewals).await.unwrap();
    assert_eq!(renewed.len(), 1);
    assert_eq!(renewed[0].0, live.id);
    let grew = renewed[0].1.duration_since(live.expires_at).unwrap();
    assert!(grew >= Duration::from_secs(3000), "{grew:?}");
    let fetched = e.s().get_lease(live.id).await.unwrap().unwrap();
    assert_eq!(fetched.expires_at, renewed[0].1);
}

async fn invalid_durations_are_refused<S: Storage>(e: Env<S>) {
    let e = e.with(vec![proxy("p", "a")]).await;
    for d in [Duration::ZERO, MAX_LEASE_DURATION + Duration::from_secs(1)] {
        let err =
            e.m.acquire_proxy(&AcquireRequest::new("p").duration(d))
                .await
                .unwrap_err();
        assert!(matches!(err, LeaseError::InvalidDuration), "{err:?}");
    }
    let lease =
        e.m.acquire_proxy(&AcquireRequest::new("p"))
            .await
            .unwrap()
            .unwrap();
    let bad = Renewal {
        id: lease.id,
        pool: lease.pool_name.clone(),
        duration: Duration::ZERO,
    };
    let err = e.m.renew_many(&[bad]).await.unwrap_err();
    assert!(matches!(err, LeaseError::InvalidDuration), "{err:?}");
    let kept = e.s().get_lease(lease.id).await.unwrap().unwrap();
    assert_eq!(kept.expires_at, lease.expires_at);
}

async fn cleanup_releases_expired_leases<S: Storage>(e: Env<S>) {
    let e = e.with(vec![one("short"), one("long")]).await;
    let short = AcquireRequest::new("p")
        .only(["short".into()])
        .duration(Duration::from_secs(1));
    let long = AcquireRequest::new("p")
        .only(["long".into()])
        .duration(Duration::from_secs(300));
    let s = e.m.acquire_proxy(&short).await.unwrap().unwrap();
    let l = e.m.acquire_proxy(&long).await.unwrap().unwrap();
    let released = Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = released.clone();
    e.m.on_release(move |ev| seen.lock().unwrap().push(ev.lease.id));
    let swept = eventually(Duration::from_secs(15), || async {
        let n = e.m.cleanup_expired_leases().await.unwrap();
        (n > 0).then_some(n)
    })
    .await;
    assert_eq!(
        swept,
        Some(1),
        "the 1 s lease expires, the 300 s one does not"
    );
    assert_eq!(*released.lock().unwrap(), [s.id]);
    assert!(e.s().get_lease(s.id).await.unwrap().is_none());
    assert!(e.s().get_lease(l.id).await.unwrap().is_some());
    assert!(e.pick(&short).await.is_some(), "the slot is free again");
    assert!(
        !e.m.release_proxy(&s).await.unwrap(),
        "an expired lease releases as a no-op"
    );
}

async fn pool_stats_count<S: Storage>(e: Env<S>) {
    let e = e
        .with(vec![
            proxy("p", "free"),
            one("one"),
            proxy("p", "off").with_status(ProxyStatus::Inactive),
        ])
        .await;
    let lease =
        e.m.acquire_proxy(&AcquireRequest::new("p").only(["one".into()]))
            .await
            .unwrap()
            .unwrap();
    assert_eq!(e.stats().await, (3, 2, 1, 1, 1));
    e.m.release_proxy(&lease).await.unwrap();
    assert_eq!(e.stats().await, (3, 2, 2, 0, 0));
    let pools = e.s().list_pools().await.unwrap();
    assert_eq!(pools.len(), 1);
    assert_eq!(pools[0].0.name, "p");
    assert_eq!(pools[0].1.total, 3);
}

async fn slow_proxies_follow_the_pool_setting<S: Storage>(e: Env<S>) {
    let e = e
        .with(vec![proxy("p", "s").with_status(ProxyStatus::Slow)])
        .await;
    let req = AcquireRequest::new("p");
    assert_eq!(e.pick(&req).await, None);
    let mut pool = Pool::new("p");
    pool.lease_slow = true;
    e.s().upsert_pool(pool.clone()).await.unwrap();
    assert_eq!(e.pick(&req).await.as_deref(), Some("s"));
    assert_eq!(e.stats().await.1, 1);
    pool.lease_slow = false;
    e.s().upsert_pool(pool).await.unwrap();
    assert_eq!(e.pick(&req).await, None);
}

async fn upsert_keeps_live_counts<S: Storage>(e: Env<S>) {
    let e = e
        .with(vec![
            proxy("p", "x")
                .with_max_concurrency(Some(2))
                .with_country("AR"),
        ])
        .await;
    let lease =
        e.m.acquire_proxy(&AcquireRequest::new("p"))
            .await
            .unwrap()
            .unwrap();
    let moved = proxy("p", "x")
        .with_max_concurrency(Some(2))
        .with_country("br");
    e.s().upsert_proxy(moved).await.unwrap();
    let info = e.s().get_proxy(&"x".into()).await.unwrap().unwrap();
    assert_eq!(info.current_leases, 1);
    assert_eq!(info.proxy.meta.country.as_deref(), Some("BR"));
    let ar = AcquireRequest::new("p").filter(Filter::new().country("AR"));
    assert_eq!(e.pick(&ar).await, None);
    let br = AcquireRequest::new("p").filter(Filter::new().country("BR"));
    assert_eq!(e.pick(&br).await.as_deref(), Some("x"));
    assert_eq!(
        e.pick(&br).await,
        None,
        "the cap counts the lease taken before the update"
    );
    assert!(e.m.release_proxy(&lease).await.unwrap());
    assert_eq!(
        e.s()
            .get_proxy(&"x".into())
            .await
            .unwrap()
            .unwrap()
            .current_leases,
        1
    );
}

async fn removed_proxies_drain<S: Storage>(e: Env<S>) {
    let e = e.with(vec![proxy("p", "a"), proxy("p", "b")]).await;
    let req = AcquireRequest::new("p");
    let lease = e.m.acquire_proxy(&req).await.unwrap().unwrap();
    assert_eq!(lease.proxy_id().as_str(), "a");
    assert!(e.s().remove_proxy(&"a".into()).await.unwrap());
    let info = e.s().get_proxy(&"a".into()).await.unwrap().unwrap();
    assert!(info.draining);
    assert_eq!(info.current_leases, 1);
    assert_eq!(e.pick(&req.clone().only(["a".into()])).await, None);
    assert_eq!(e.stats().await.0, 1, "a draining proxy is not counted");
    assert!(e.m.release_proxy(&lease).await.unwrap());
    assert!(e.s().get_proxy(&"a".into()).await.unwrap().is_none());
    assert!(!e.s().remove_proxy(&"a".into()).await.unwrap());
    assert!(!e.s().remove_proxy(&"nope".into()).await.unwrap());
    let listed: Vec<String> = e
        .s()
        .list_proxies("p")
        .await
        .unwrap()
        .iter()
        .map(|i| i.proxy.id.to_string())
        .collect();
    assert_eq!(listed, ["b"]);
    e.s().upsert_proxy(proxy("p", "a")).await.unwrap();
    assert_eq!(e.pick(&req.only(["a".into()])).await.as_deref(), Some("a"));
}

async fn removed_pools_drain<S: Storage>(e: Env<S>) {
    let e = e.with(vec![proxy("p", "a")]).await;
    let lease =
        e.m.acquire_proxy(&AcquireRequest::new("p"))
            .await
            .unwrap()
            .unwrap();
    assert!(e.s().remove_pool("p").await.unwrap());
    let err =
        e.m.acquire_proxy(&AcquireRequest::new("p"))
            .await
            .unwrap_err();
    assert!(matches!(err, LeaseError::UnknownPool(_)), "{err:?}");
    assert!(e.s().list_pools().await.unwrap().is_empty());
    assert_eq!(
        e.s().pool_stats("p").await.unwrap().unwrap().total_leases,
        1
    );
    assert!(!e.s().remove_pool("p").await.unwrap());
    assert!(!e.s().remove_pool("nope").await.unwrap());
    assert!(e.m.release_proxy(&lease).await.unwrap());
    assert!(e.s().pool_stats("p").await.unwrap().is_none());
    e.s().upsert_pool(Pool::new("p")).await.unwrap();
    assert_eq!(
        e.pick(&AcquireRequest::new("p")).await,
        None,
        "its proxies went with it"
    );
    e.s().upsert_proxy(proxy("p", "a")).await.unwrap();
    assert_eq!(
        e.pick(&AcquireRequest::new("p")).await.as_deref(),
        Some("a")
    );
}

async fn health_changes_apply<S: Storage>(e: Env<S>) {
    let e = e.with(vec![proxy("p", "a")]).await;
    let id = ProxyId::from("a");
    let check = HealthCheck {
        status: ProxyStatus::Banned,
        checked_at: Some(at(5)),
        latency: Some(Duration::from_millis(12)),
    };
    assert_eq!(
        e.s().apply_health(&id, check).await.unwrap(),
        ProxyStatus::Active
    );
    let info = e.s().get_proxy(&id).await.unwrap().unwrap();
    assert_eq!(info.proxy.status, ProxyStatus::Banned);
    assert_eq!(info.proxy.checked_at, at(5));
    assert_eq!(info.proxy.latency, Some(Duration::from_millis(12)));
    assert_eq!(e.pick(&AcquireRequest::new("p")).await, None);
    assert_eq!(e.stats().await.1, 0);
    let back = HealthCheck::status(ProxyStatus::Active);
    assert_eq!(
        e.s().apply_health(&id, back).await.unwrap(),
        ProxyStatus::Banned
    );
    assert_eq!(
        e.s()
            .get_proxy(&id)
            .await
            .unwrap()
            .unwrap()
            .proxy
            .checked_at,
        at(5)
    );
    assert_eq!(
        e.pick(&AcquireRequest::new("p")).await.as_deref(),
        Some("a")
    );
    let missing = e
        .s()
        .set_proxy_status(&"zz".into(), ProxyStatus::Active)
        .await;
    assert!(
        matches!(missing, Err(LeaseError::UnknownProxy(_))),
        "{missing:?}"
    );
}

async fn rests_take_proxies_out_until_their_deadline<S: Storage>(e: Env<S>) {
    let e = e
        .with(vec![
            proxy("p", "a"),
            proxy("p", "b").with_status(ProxyStatus::Banned),
        ])
        .await;
    let (a, b) = (ProxyId::from("a"), ProxyId::from("b"));
    let req = AcquireRequest::new("p");
    let later = SystemTime::now() + Duration::from_secs(120);
    assert!(e.s().rest(&a, later).await.unwrap());
    assert!(
        !e.s().rest(&b, later).await.unwrap(),
        "a banned proxy does not rest"
    );
    assert!(!e.s().rest(&"zz".into(), later).await.unwrap());
    let info = e.s().get_proxy(&a).await.unwrap().unwrap();
    assert_eq!(info.proxy.status, ProxyStatus::Inactive);
    assert!(info.proxy.rest_until.is_some());
    assert_eq!(e.pick(&req).await, None);
    assert_eq!(e.stats().await.1, 0);
    assert_eq!(
        e.s()
            .set_proxy_status(&a, ProxyStatus::Active)
            .await
            .unwrap(),
        ProxyStatus::Inactive
    );
    assert!(
        e.s()
            .get_proxy(&a)
            .await
            .unwrap()
            .unwrap()
            .proxy
            .rest_until
            .is_none()
    );
    assert_eq!(e.pick(&req).await.as_deref(), Some("a"));
    // A short rest ends by itself (the sweep ends it, or the deadline simply passes).
    assert!(
        e.s()
            .rest(&a, SystemTime::now() + Duration::from_secs(1))
            .await
            .unwrap()
    );
    let back = eventually(Duration::from_secs(15), || async {
        e.m.cleanup_expired_leases().await.unwrap();
        e.pick(&req).await
    })
    .await;
    assert_eq!(back.as_deref(), Some("a"));
    assert_eq!(
        e.s().get_proxy(&a).await.unwrap().unwrap().proxy.status,
        ProxyStatus::Active
    );
}

async fn leases_are_listed<S: Storage>(e: Env<S>) {
    let e = e.with(vec![proxy("p", "a")]).await;
    e.s().upsert_pool(Pool::new("q")).await.unwrap();
    e.s().upsert_proxy(proxy("q", "qa")).await.unwrap();
    let first =
        e.m.acquire_proxy(&AcquireRequest::new("p"))
            .await
            .unwrap()
            .unwrap();
    let second =
        e.m.acquire_proxy(&AcquireRequest::new("q"))
            .await
            .unwrap()
            .unwrap();
    let all: Vec<_> = e
        .s()
        .list_leases(None)
        .await
        .unwrap()
        .iter()
        .map(|l| l.id)
        .collect();
    assert_eq!(all, [first.id, second.id]);
    let q: Vec<_> = e
        .s()
        .list_leases(Some("q"))
        .await
        .unwrap()
        .iter()
        .map(|l| l.id)
        .collect();
    assert_eq!(q, [second.id]);
    let got = e.s().get_lease(second.id).await.unwrap().unwrap();
    assert_eq!((got.proxy_id().as_str(), &*got.pool_name), ("qa", "q"));
    assert_eq!(got.holder, second.holder);
    e.m.release_proxy(&second).await.unwrap();
    assert!(e.s().get_lease(second.id).await.unwrap().is_none());
}

async fn guard_releases_on_drop<S: Storage>(e: Env<S>) {
    let e = e.with(vec![one("a")]).await;
    {
        let guard =
            e.m.lease(&AcquireRequest::new("p"))
                .await
                .unwrap()
                .expect("free");
        assert_eq!(guard.proxy_id().as_str(), "a");
        assert!(
            e.m.lease(&AcquireRequest::new("p"))
                .await
                .unwrap()
                .is_none()
        );
    }
    let freed = eventually(Duration::from_secs(10), || async {
        (e.stats().await.4 == 0).then_some(())
    })
    .await;
    assert!(freed.is_some(), "the dropped guard released its lease");
}

async fn a_release_wakes_a_waiter<S: Storage>(e: Env<S>) {
    let e = e.with(vec![one("a")]).await;
    let held =
        e.m.acquire_proxy(&AcquireRequest::new("p"))
            .await
            .unwrap()
            .unwrap();
    let policy = RetryPolicy {
        max_attempts: 2,
        backoff: Duration::from_secs(60),
        ..RetryPolicy::default()
    };
    let m = e.m.clone();
    let started = std::time::Instant::now();
    let waiter = tokio::spawn(async move {
        m.acquire_proxy_with_retry(&AcquireRequest::new("p"), &policy)
            .await
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    e.m.release_proxy(&held).await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(20), waiter)
        .await
        .expect("woken well before its 60 s backoff")
        .unwrap()
        .unwrap();
    assert!(got.is_some());
    assert!(started.elapsed() < Duration::from_secs(30));
}
