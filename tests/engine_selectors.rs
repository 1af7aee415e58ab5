//! Selector choices and tie-breaks, every filter field, geo radius, combinators and filter
//! validation.

mod common;

use std::time::{Duration, SystemTime};

use common::{manager_with, proxy};
use pharox::filter::haversine_km;
use pharox::{
    AcquireRequest, Filter, FilterError, LeaseError, Proxy, ProxyStatus, Selector, Storage,
};

async fn pick(m: &pharox::ProxyManager, req: &AcquireRequest) -> Option<String> {
    m.acquire_proxy(req)
        .await
        .unwrap()
        .map(|l| l.proxy_id().to_string())
}

fn at(secs: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
}

#[tokio::test]
async fn first_available_follows_inventory_order_and_skips_full_proxies() {
    let one = |id| proxy("p", id).with_max_concurrency(Some(1));
    let m = manager_with("p", vec![one("z"), one("a"), one("m")]).await;
    let req = AcquireRequest::new("p");
    assert_eq!(pick(&m, &req).await.as_deref(), Some("z"));
    assert_eq!(pick(&m, &req).await.as_deref(), Some("a"));
    // Updating an existing proxy keeps its place in the order.
    m.storage().upsert_proxy(one("z")).await.unwrap();
    assert_eq!(pick(&m, &req).await.as_deref(), Some("m"));
    assert_eq!(pick(&m, &req).await, None);
}

#[tokio::test]
async fn least_used_breaks_ties_by_oldest_check_then_id() {
    let mut b = proxy("p", "b");
    b.checked_at = at(100);
    let mut c = proxy("p", "c");
    c.checked_at = at(50);
    let mut a = proxy("p", "a");
    a.checked_at = at(100);
    let m = manager_with("p", vec![b, c, a]).await;
    let req = AcquireRequest::new("p").selector(Selector::LeastUsed);
    // All at 0 leases: c is the oldest checked.
    assert_eq!(pick(&m, &req).await.as_deref(), Some("c"));
    // a and b tie at 0 leases and the same checked_at: smallest id.
    assert_eq!(pick(&m, &req).await.as_deref(), Some("a"));
    assert_eq!(pick(&m, &req).await.as_deref(), Some("b"));
    // Now all have one lease: back to c.
    assert_eq!(pick(&m, &req).await.as_deref(), Some("c"));
}

#[tokio::test]
async fn round_robin_neither_skips_nor_repeats_when_eligibility_changes() {
    let one = |id| proxy("p", id).with_max_concurrency(Some(1));
    let m = manager_with("p", vec![one("A"), one("B"), one("C")]).await;
    let req = AcquireRequest::new("p").selector(Selector::RoundRobin);
    // Holding each lease makes the chosen proxy ineligible; the Python library's index-based
    // cursor gave A then C here.
    assert_eq!(pick(&m, &req).await.as_deref(), Some("A"));
    assert_eq!(pick(&m, &req).await.as_deref(), Some("B"));
    assert_eq!(pick(&m, &req).await.as_deref(), Some("C"));
    assert_eq!(pick(&m, &req).await, None);
}

#[tokio::test]
async fn round_robin_resumes_after_the_last_id_when_it_disappears() {
    let m = manager_with("p", vec![proxy("p", "a"), proxy("p", "b"), proxy("p", "c")]).await;
    let req = AcquireRequest::new("p").selector(Selector::RoundRobin);
    assert_eq!(pick(&m, &req).await.as_deref(), Some("a"));
    assert_eq!(pick(&m, &req).await.as_deref(), Some("b"));
    m.storage()
        .set_proxy_status(&"b".into(), ProxyStatus::Banned)
        .await
        .unwrap();
    m.storage()
        .set_proxy_status(&"c".into(), ProxyStatus::Banned)
        .await
        .unwrap();
    assert_eq!(pick(&m, &req).await.as_deref(), Some("a"));
    m.storage()
        .set_proxy_status(&"c".into(), ProxyStatus::Active)
        .await
        .unwrap();
    assert_eq!(pick(&m, &req).await.as_deref(), Some("c"));
}

#[tokio::test]
async fn lowest_latency_prefers_measured_fast_proxies_then_least_used() {
    let with_latency = |id, ms: Option<u64>| {
        let mut p = proxy("p", id);
        p.latency = ms.map(Duration::from_millis);
        p
    };
    let m = manager_with(
        "p",
        vec![
            with_latency("unmeasured", None),
            with_latency("slow", Some(300)),
            with_latency("fast-b", Some(20)),
            with_latency("fast-a", Some(20)),
        ],
    )
    .await;
    let req = AcquireRequest::new("p").selector(Selector::LowestLatency);
    assert_eq!(pick(&m, &req).await.as_deref(), Some("fast-a"));
    assert_eq!(
        pick(&m, &req).await.as_deref(),
        Some("fast-b"),
        "same latency: least used"
    );
    assert_eq!(pick(&m, &req).await.as_deref(), Some("fast-a"));
    let only_slow_or_unmeasured =
        Filter::new()
            .none_of([Filter::new()
                .predicate(|p| p.latency.is_some_and(|l| l < Duration::from_millis(100)))]);
    let req2 = req.clone().filter(only_slow_or_unmeasured);
    assert_eq!(
        pick(&m, &req2).await.as_deref(),
        Some("slow"),
        "unmeasured comes last"
    );
}

#[tokio::test]
async fn random_picks_only_eligible_proxies_and_all_of_them() {
    let m = manager_with(
        "p",
        vec![
            proxy("p", "a"),
            proxy("p", "b"),
            proxy("p", "c"),
            proxy("p", "off").with_status(ProxyStatus::Inactive),
        ],
    )
    .await;
    let req = AcquireRequest::new("p").selector(Selector::Random);
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..300 {
        let lease = m.acquire_proxy(&req).await.unwrap().unwrap();
        seen.insert(lease.proxy_id().to_string());
        m.release_proxy(&lease).await.unwrap();
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

#[tokio::test]
async fn each_scalar_filter_field_selects() {
    let mut other = proxy("p", "other").with_country("BR");
    other.meta.city = Some("Rio".into());
    other.meta.source = Some("vendor-b".into());
    other.meta.isp = Some("Claro".into());
    other.meta.asn = Some(28573);
    let m = manager_with("p", vec![other, tagged("tagged")]).await;
    let filters = [
        Filter::new().country("ar"),
        Filter::new().country("AR"),
        Filter::new().city("Cordoba"),
        Filter::new().source("vendor-a"),
        Filter::new().isp("Telecom"),
        Filter::new().asn(7303),
    ];
    for f in filters {
        let req = AcquireRequest::new("p").filter(f.clone());
        assert_eq!(pick(&m, &req).await.as_deref(), Some("tagged"), "{f:?}");
    }
    for f in [
        Filter::new().city("cordoba"),
        Filter::new().asn(1),
        Filter::new().country("UY"),
    ] {
        assert_eq!(pick(&m, &AcquireRequest::new("p").filter(f)).await, None);
    }
}

#[tokio::test]
async fn geo_radius_is_inclusive_at_the_haversine_distance() {
    // One degree of longitude on the equator: R * pi / 180.
    let d = haversine_km(0.0, 0.0, 0.0, 1.0);
    assert!((d - 111.194_926_644_558_7).abs() < 1e-9, "{d}");
    let mut p = proxy("p", "east");
    p.meta.latitude = Some(0.0);
    p.meta.longitude = Some(1.0);
    let mut nowhere = proxy("p", "nowhere");
    nowhere.meta.latitude = None;
    let m = manager_with("p", vec![nowhere, p]).await;
    let at_edge = AcquireRequest::new("p").filter(Filter::new().near(0.0, 0.0, d));
    assert_eq!(pick(&m, &at_edge).await.as_deref(), Some("east"));
    let just_short =
        AcquireRequest::new("p").filter(Filter::new().near(0.0, 0.0, d * (1.0 - 1e-12)));
    assert_eq!(pick(&m, &just_short).await, None);
    // Without a radius the coordinates must match.
    let exact = Filter {
        meta: pharox::ProxyMeta {
            latitude: Some(0.0),
            longitude: Some(1.0),
            ..Default::default()
        },
        ..Filter::new()
    };
    assert_eq!(
        pick(&m, &AcquireRequest::new("p").filter(exact))
            .await
            .as_deref(),
        Some("east")
    );
}

#[tokio::test]
async fn combinators_and_predicates() {
    let m = manager_with(
        "p",
        vec![tagged("t1"), proxy("p", "plain").with_country("US")],
    )
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
            Filter::new().predicate(|p| p.id.as_str() == "plain"),
            Some("plain"),
        ),
        (Filter::new().predicate(|_| false), None),
    ];
    for (f, want) in cases {
        let got = pick(&m, &AcquireRequest::new("p").filter(f.clone())).await;
        assert_eq!(got.as_deref(), want, "{f:?}");
    }
}

#[tokio::test]
async fn changing_a_proxys_metadata_moves_it_between_indexes() {
    let m = manager_with("p", vec![proxy("p", "x").with_country("AR")]).await;
    let ar = AcquireRequest::new("p").filter(Filter::new().country("AR"));
    let br = AcquireRequest::new("p").filter(Filter::new().country("BR"));
    assert_eq!(pick(&m, &ar).await.as_deref(), Some("x"));
    assert_eq!(pick(&m, &br).await, None);
    m.storage()
        .upsert_proxy(proxy("p", "x").with_country("br"))
        .await
        .unwrap();
    assert_eq!(pick(&m, &ar).await, None);
    assert_eq!(pick(&m, &br).await.as_deref(), Some("x"));
}

#[tokio::test]
async fn invalid_filters_are_rejected() {
    let m = manager_with("p", vec![proxy("p", "a")]).await;
    let cases = [
        (
            Filter {
                meta: pharox::ProxyMeta {
                    latitude: Some(1.0),
                    ..Default::default()
                },
                ..Filter::new()
            },
            FilterError::HalfCoordinate,
        ),
        (
            Filter {
                meta: pharox::ProxyMeta {
                    longitude: Some(1.0),
                    ..Default::default()
                },
                ..Filter::new()
            },
            FilterError::HalfCoordinate,
        ),
        (
            Filter {
                radius_km: Some(5.0),
                ..Filter::new()
            },
            FilterError::RadiusWithoutCenter,
        ),
        (
            Filter::new().near(1.0, 1.0, 0.0),
            FilterError::BadRadius(0.0),
        ),
        (
            Filter::new().near(1.0, 1.0, -2.0),
            FilterError::BadRadius(-2.0),
        ),
        (
            Filter::new().near(91.0, 1.0, 5.0),
            FilterError::BadCoordinate(91.0, 1.0),
        ),
        (Filter::new().city(""), FilterError::Empty("city")),
        (
            Filter::new().any_of([Filter {
                meta: pharox::ProxyMeta {
                    latitude: Some(1.0),
                    ..Default::default()
                },
                ..Filter::new()
            }]),
            FilterError::HalfCoordinate,
        ),
    ];
    for (f, want) in cases {
        let err = m
            .acquire_proxy(&AcquireRequest::new("p").filter(f))
            .await
            .unwrap_err();
        assert!(
            matches!(&err, LeaseError::InvalidFilter(e) if *e == want),
            "{err:?} != {want:?}"
        );
    }
}

#[tokio::test]
async fn slow_proxies_are_leased_only_where_the_pool_allows() {
    let m = manager_with("p", vec![proxy("p", "s").with_status(ProxyStatus::Slow)]).await;
    let req = AcquireRequest::new("p");
    assert_eq!(
        pick(&m, &req).await,
        None,
        "the seed's rule by default: only active"
    );
    let mut pool = pharox::Pool::new("p");
    pool.lease_slow = true;
    m.storage().upsert_pool(pool.clone()).await.unwrap();
    let lease = m
        .acquire_proxy(&req)
        .await
        .unwrap()
        .expect("slow is leasable now");
    assert_eq!(
        m.storage().pool_stats("p").await.unwrap().unwrap().active,
        1
    );
    m.release_proxy(&lease).await.unwrap();
    pool.lease_slow = false;
    m.storage().upsert_pool(pool).await.unwrap();
    assert_eq!(pick(&m, &req).await, None);
}

#[tokio::test]
async fn lowest_latency_spreads_over_nearly_equal_latencies() {
    let with_latency = |id, ms: u64| {
        let mut p = proxy("p", id);
        p.latency = Some(Duration::from_millis(ms));
        p
    };
    let m = manager_with(
        "p",
        vec![
            with_latency("f1", 20),
            with_latency("f2", 21),
            with_latency("slow", 100),
        ],
    )
    .await;
    let req = AcquireRequest::new("p").selector(Selector::LowestLatency);
    let mut got = Vec::new();
    for _ in 0..4 {
        got.push(pick(&m, &req).await.unwrap());
    }
    assert_eq!(
        got,
        ["f1", "f2", "f1", "f2"],
        "20 ms and 21 ms count as equal; least used wins"
    );
}
