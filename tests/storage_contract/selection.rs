//! Contract scenarios: selectors and their tie-breaks, every filter field, geo, combinators,
//! exclude/only, caps.

use std::time::Duration;

use pharox::filter::haversine_km;
use pharox::{AcquireRequest, Filter, LeaseError, Proxy, ProxyId, ProxyStatus, Selector, Storage};

use crate::common::proxy;
use crate::{Env, at, one, uid};

pub(crate) async fn consumers_are_idempotent<S: Storage>(e: Env<S>) {
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

pub(crate) async fn only_active_proxies_are_leased<S: Storage>(e: Env<S>) {
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

pub(crate) async fn unknown_pool_is_an_error<S: Storage>(e: Env<S>) {
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

pub(crate) async fn first_available_follows_inventory_order<S: Storage>(e: Env<S>) {
    let e = e.with(vec![one("z"), one("a"), one("m")]).await;
    let req = AcquireRequest::new("p");
    assert_eq!(e.pick(&req).await.as_deref(), Some("z"));
    assert_eq!(e.pick(&req).await.as_deref(), Some("a"));
    e.s().upsert_proxy(one("z")).await.unwrap();
    assert_eq!(e.pick(&req).await.as_deref(), Some("m"));
    assert_eq!(e.pick(&req).await, None);
}

pub(crate) async fn least_used_breaks_ties_by_check_then_id<S: Storage>(e: Env<S>) {
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

pub(crate) async fn round_robin_rotates_in_id_order<S: Storage>(e: Env<S>) {
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

pub(crate) async fn round_robin_neither_skips_nor_repeats<S: Storage>(e: Env<S>) {
    let e = e.with(vec![one(&uid(1)), one(&uid(2)), one(&uid(3))]).await;
    let req = AcquireRequest::new("p").selector(Selector::RoundRobin);
    for i in 1..=3 {
        assert_eq!(e.pick(&req).await, Some(uid(i)));
    }
    assert_eq!(e.pick(&req).await, None);
}

pub(crate) async fn round_robin_resumes_after_a_vanished_id<S: Storage>(e: Env<S>) {
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

pub(crate) fn timed(id: &str, ms: Option<u64>, city: &str) -> Proxy {
    let mut p = proxy("p", id);
    p.latency = ms.map(Duration::from_millis);
    p.meta.city = Some(city.into());
    p
}

pub(crate) async fn lowest_latency_order<S: Storage>(e: Env<S>) {
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

pub(crate) async fn lowest_latency_buckets_spread_leases<S: Storage>(e: Env<S>) {
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

pub(crate) async fn random_covers_the_eligible_only<S: Storage>(e: Env<S>) {
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

pub(crate) fn tagged(id: &str) -> Proxy {
    let mut p = proxy("p", id).with_country("ar");
    p.meta.city = Some("Cordoba".into());
    p.meta.source = Some("vendor-a".into());
    p.meta.isp = Some("Telecom".into());
    p.meta.asn = Some(7303);
    p
}

pub(crate) async fn every_scalar_filter_field<S: Storage>(e: Env<S>) {
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

pub(crate) async fn geo_radius_is_inclusive<S: Storage>(e: Env<S>) {
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

pub(crate) async fn combinators<S: Storage>(e: Env<S>) {
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

pub(crate) async fn exclude_and_only<S: Storage>(e: Env<S>) {
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

pub(crate) async fn caps_hold<S: Storage>(e: Env<S>) {
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
