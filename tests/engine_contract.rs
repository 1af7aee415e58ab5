//! The storage contract scenarios of the Python library's suite, plus the guard scenarios
//! its SDK tests, run against the in-memory storage through the manager.

mod common;

use std::time::{Duration, SystemTime};

use common::{leased, manager_with, proxy};
use pharox::{
    AcquireRequest, Filter, HealthCheck, LeaseError, ProxyId, ProxyStatus, Selector, Storage,
};

#[tokio::test]
async fn consumer_roundtrip_is_idempotent() {
    let m = manager_with("p", vec![]).await;
    let a = m.storage().ensure_consumer("worker-1").await.unwrap();
    let b = m.storage().ensure_consumer("worker-1").await.unwrap();
    assert_eq!(a, b);
    let d = m.storage().ensure_consumer("").await.unwrap();
    assert_eq!(&*d.name, pharox::DEFAULT_CONSUMER_NAME);
}

#[tokio::test]
async fn finds_the_active_proxy() {
    let m = manager_with(
        "p",
        vec![
            proxy("p", "a").with_status(ProxyStatus::Inactive),
            proxy("p", "b"),
        ],
    )
    .await;
    let lease = m
        .acquire_proxy(&AcquireRequest::new("p"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(lease.proxy_id().as_str(), "b");
}

#[tokio::test]
async fn filters_on_country_source_and_city() {
    let mut a = proxy("p", "a").with_country("ar");
    a.meta.source = Some("oxylabs".into());
    a.meta.city = Some("Cordoba".into());
    let mut b = proxy("p", "b").with_country("AR");
    b.meta.source = Some("oxylabs".into());
    b.meta.city = Some("Rosario".into());
    let mut c = proxy("p", "c").with_country("BR");
    c.meta.source = Some("oxylabs".into());
    c.meta.city = Some("Rosario".into());
    let m = manager_with("p", vec![a, b, c]).await;
    let f = Filter::new()
        .country("ar")
        .source("oxylabs")
        .city("Rosario");
    let lease = m
        .acquire_proxy(&AcquireRequest::new("p").filter(f))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(lease.proxy_id().as_str(), "b");
}

#[tokio::test]
async fn composite_filters_with_predicate() {
    let mk = |id: &str, host: &str, country: &str, source: &str, city: &str| {
        let mut p = proxy("p", id).with_country(country);
        p.host = host.into();
        p.meta.source = Some(source.into());
        p.meta.city = Some(city.into());
        p
    };
    let m = manager_with(
        "p",
        vec![
            mk("1", "10.0.0.10", "AR", "latam", "Cordoba"),
            mk("2", "10.0.0.20", "AR", "latam", "blocked"),
            mk("3", "10.0.0.30", "BR", "andina", "Sao Paulo"),
            mk("4", "10.0.0.20", "BR", "andina", "Rio"),
        ],
    )
    .await;
    let f = Filter::new()
        .any_of([
            Filter::new().country("AR").source("latam"),
            Filter::new().all_of([Filter::new().country("BR"), Filter::new().source("andina")]),
        ])
        .none_of([Filter::new().city("blocked")])
        .predicate(|p| p.host.ends_with(".20"));
    let lease = m
        .acquire_proxy(&AcquireRequest::new("p").filter(f.clone()))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(lease.proxy_id().as_str(), "4");
    // "4" has no cap, so the same filter keeps choosing it.
    let again = m
        .acquire_proxy(&AcquireRequest::new("p").filter(f))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(again.proxy_id().as_str(), "4");
}

#[tokio::test]
async fn enforces_concurrency_limits() {
    let m = manager_with("p", vec![proxy("p", "a").with_max_concurrency(Some(1))]).await;
    let req = AcquireRequest::new("p");
    let first = m.acquire_proxy(&req).await.unwrap();
    assert!(first.is_some());
    assert!(
        m.acquire_proxy(&req).await.unwrap().is_none(),
        "the only slot is taken"
    );
}

#[tokio::test]
async fn lease_release_cycle() {
    let m = manager_with("p", vec![proxy("p", "a").with_max_concurrency(Some(1))]).await;
    let req = AcquireRequest::new("p");
    let lease = m.acquire_proxy(&req).await.unwrap().unwrap();
    assert!(m.release_proxy(&lease).await.unwrap());
    assert!(m.acquire_proxy(&req).await.unwrap().is_some());
}

#[tokio::test(start_paused = true)]
async fn cleans_up_expired_leases() {
    let m = manager_with("p", vec![proxy("p", "a").with_max_concurrency(Some(1))]).await;
    let req = AcquireRequest::new("p").duration(Duration::from_secs(1));
    m.acquire_proxy(&req).await.unwrap().unwrap();
    tokio::time::advance(Duration::from_millis(999)).await;
    assert_eq!(m.cleanup_expired_leases().await.unwrap(), 0);
    tokio::time::advance(Duration::from_millis(101)).await;
    assert_eq!(m.cleanup_expired_leases().await.unwrap(), 1);
    assert!(m.acquire_proxy(&req).await.unwrap().is_some());
}

#[tokio::test]
async fn least_used_prefers_the_lowest_load() {
    let m = manager_with("p", vec![proxy("p", "busy"), proxy("p", "idle")]).await;
    let first = AcquireRequest::new("p");
    m.acquire_proxy(&first).await.unwrap().unwrap();
    m.acquire_proxy(&first).await.unwrap().unwrap();
    let lu = AcquireRequest::new("p").selector(Selector::LeastUsed);
    assert_eq!(
        m.acquire_proxy(&lu)
            .await
            .unwrap()
            .unwrap()
            .proxy_id()
            .as_str(),
        "idle"
    );
}

#[tokio::test]
async fn round_robin_cycles_in_id_order() {
    let m = manager_with("p", vec![proxy("p", "c"), proxy("p", "a"), proxy("p", "b")]).await;
    let req = AcquireRequest::new("p").selector(Selector::RoundRobin);
    let mut seen = Vec::new();
    for _ in 0..5 {
        let lease = m.acquire_proxy(&req).await.unwrap().unwrap();
        seen.push(lease.proxy_id().to_string());
        m.release_proxy(&lease).await.unwrap();
    }
    assert_eq!(seen, ["a", "b", "c", "a", "b"]);
}

#[tokio::test]
async fn applies_health_results() {
    let m = manager_with("p", vec![proxy("p", "a")]).await;
    let at = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
    let id = ProxyId::from("a");
    let check = HealthCheck {
        status: ProxyStatus::Banned,
        checked_at: Some(at),
        latency: None,
    };
    let old = m.storage().apply_health(&id, check).await.unwrap();
    assert_eq!(old, ProxyStatus::Active);
    let info = m.storage().get_proxy(&id).await.unwrap().unwrap();
    assert_eq!(info.proxy.status, ProxyStatus::Banned);
    assert_eq!(info.proxy.checked_at, at);
    assert!(
        m.acquire_proxy(&AcquireRequest::new("p"))
            .await
            .unwrap()
            .is_none()
    );
    let missing = m
        .storage()
        .set_proxy_status(&ProxyId::from("zz"), ProxyStatus::Active)
        .await;
    assert!(matches!(missing, Err(LeaseError::UnknownProxy(_))));
}

#[tokio::test]
async fn returns_pool_stats() {
    let m = manager_with(
        "p",
        vec![
            proxy("p", "free"),
            proxy("p", "one").with_max_concurrency(Some(1)),
            proxy("p", "off").with_status(ProxyStatus::Inactive),
        ],
    )
    .await;
    let only_one = Filter::new().predicate(|p| p.id.as_str() == "one");
    let lease = m
        .acquire_proxy(&AcquireRequest::new("p").filter(only_one))
        .await
        .unwrap()
        .unwrap();
    let s = m.storage().pool_stats("p").await.unwrap().unwrap();
    assert_eq!(
        (s.total, s.active, s.available, s.leased, s.total_leases),
        (3, 2, 1, 1, 1)
    );
    m.release_proxy(&lease).await.unwrap();
    let s = m.storage().pool_stats("p").await.unwrap().unwrap();
    assert_eq!(
        (s.total, s.active, s.available, s.leased, s.total_leases),
        (3, 2, 2, 0, 0)
    );
    assert!(m.storage().pool_stats("nope").await.unwrap().is_none());
}

#[tokio::test]
async fn unknown_pool_is_an_error_not_a_miss() {
    let m = manager_with("p", vec![proxy("p", "a")]).await;
    let err = m
        .acquire_proxy(&AcquireRequest::new("q"))
        .await
        .unwrap_err();
    assert!(matches!(err, LeaseError::UnknownPool(name) if name == "q"));
}

#[tokio::test]
async fn guard_yields_none_when_unavailable_and_releases_on_drop() {
    let m = manager_with("p", vec![proxy("p", "a").with_max_concurrency(Some(1))]).await;
    let req = AcquireRequest::new("p");
    {
        let guard = m.lease(&req).await.unwrap().expect("free slot");
        assert_eq!(guard.proxy_id().as_str(), "a");
        assert!(m.lease(&req).await.unwrap().is_none());
        assert_eq!(leased(&m, "p").await, 1);
    }
    assert_eq!(leased(&m, "p").await, 0);
}

#[tokio::test]
async fn guard_releases_when_its_task_panics() {
    let m = manager_with("p", vec![proxy("p", "a").with_max_concurrency(Some(1))]).await;
    let m2 = m.clone();
    let task = tokio::spawn(async move {
        let _guard = m2.lease(&AcquireRequest::new("p")).await.unwrap().unwrap();
        panic!("worker failed while holding a lease");
    });
    assert!(task.await.unwrap_err().is_panic());
    assert_eq!(leased(&m, "p").await, 0);
    assert!(
        m.acquire_proxy(&AcquireRequest::new("p"))
            .await
            .unwrap()
            .is_some()
    );
}
