//! Lease lifecycle: event payloads, panicking callbacks, double release, expiry (on acquire,
//! by cleanup and by the sweeper), renewal, and inventory changes under live leases.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{leased, manager_with, proxy};
use pharox::{
    AcquireEvent, AcquireRequest, Filter, LeaseError, LeaseStatus, Pool, ProxyId, ProxyStatus,
    ReleaseEvent, Selector, Storage,
};

type Log<T> = Arc<Mutex<Vec<T>>>;

fn record(m: &pharox::ProxyManager) -> (Log<AcquireEvent>, Log<ReleaseEvent>) {
    let (acq, rel): (Log<AcquireEvent>, Log<ReleaseEvent>) = Default::default();
    let a = acq.clone();
    m.on_acquire(move |e| a.lock().unwrap().push(e.clone()));
    let r = rel.clone();
    m.on_release(move |e| r.lock().unwrap().push(e.clone()));
    (acq, rel)
}

#[tokio::test(start_paused = true)]
async fn events_carry_the_documented_payloads() {
    let m = manager_with("p", vec![proxy("p", "a").with_max_concurrency(Some(1))]).await;
    let (acq, rel) = record(&m);
    let req = AcquireRequest::new("p")
        .consumer("worker-1")
        .selector(Selector::LeastUsed);
    let lease = m.acquire_proxy(&req).await.unwrap().unwrap();
    assert!(
        m.acquire_proxy(&AcquireRequest::new("p"))
            .await
            .unwrap()
            .is_none()
    );
    tokio::time::advance(Duration::from_secs(7)).await;
    m.release_proxy(&lease).await.unwrap();

    let acq = acq.lock().unwrap();
    assert_eq!(acq.len(), 2);
    let hit = &acq[0];
    assert_eq!(hit.lease.as_ref().map(|l| l.id), Some(lease.id));
    assert_eq!((&*hit.pool_name, &*hit.consumer_name), ("p", "worker-1"));
    assert_eq!(hit.selector, Selector::LeastUsed);
    assert_eq!(
        hit.duration,
        hit.completed_at.duration_since(hit.started_at).unwrap()
    );
    assert_eq!((hit.pool_stats.leased, hit.pool_stats.available), (1, 0));
    let miss = &acq[1];
    assert!(miss.lease.is_none());
    assert_eq!(&*miss.consumer_name, pharox::DEFAULT_CONSUMER_NAME);
    assert_eq!(miss.selector, Selector::FirstAvailable);

    let rel = rel.lock().unwrap();
    assert_eq!(rel.len(), 1);
    assert_eq!(rel[0].lease.id, lease.id);
    assert_eq!(rel[0].lease.status, LeaseStatus::Released);
    assert_eq!(rel[0].lease_duration, Duration::from_secs(7));
    assert_eq!(
        (rel[0].pool_stats.leased, rel[0].pool_stats.available),
        (0, 1)
    );
}

#[tokio::test]
async fn panicking_callbacks_neither_leak_nor_break_acquisition() {
    let m = manager_with("p", vec![proxy("p", "a").with_max_concurrency(Some(1))]).await;
    m.on_acquire(|_| panic!("metrics backend down"));
    m.on_release(|_| panic!("log sink down"));
    let (acq, rel) = record(&m);
    let lease = m
        .acquire_proxy(&AcquireRequest::new("p"))
        .await
        .unwrap()
        .expect("still leased");
    assert!(m.release_proxy(&lease).await.unwrap());
    assert_eq!(leased(&m, "p").await, 0);
    // Callbacks registered after the panicking ones still ran.
    assert_eq!(
        (acq.lock().unwrap().len(), rel.lock().unwrap().len()),
        (1, 1)
    );
}

#[tokio::test]
async fn double_release_is_a_no_op_with_one_event() {
    let m = manager_with("p", vec![proxy("p", "a")]).await;
    let (_, rel) = record(&m);
    let lease = m
        .acquire_proxy(&AcquireRequest::new("p"))
        .await
        .unwrap()
        .unwrap();
    assert!(m.release_proxy(&lease).await.unwrap());
    assert!(!m.release_proxy(&lease).await.unwrap());
    assert!(!m.release_by_id(lease.id).await.unwrap());
    assert_eq!(rel.lock().unwrap().len(), 1);
    assert_eq!(leased(&m, "p").await, 0);
}

#[tokio::test(start_paused = true)]
async fn release_after_expiry_changes_nothing() {
    let m = manager_with("p", vec![proxy("p", "a").with_max_concurrency(Some(1))]).await;
    let (_, rel) = record(&m);
    let req = AcquireRequest::new("p").duration(Duration::from_secs(10));
    let old = m.acquire_proxy(&req).await.unwrap().unwrap();
    tokio::time::advance(Duration::from_secs(10)).await;
    // The acquire cleans up the expired lease first, then leases the freed slot.
    let new = m
        .acquire_proxy(&req)
        .await
        .unwrap()
        .expect("expired lease was cleaned up");
    assert!(
        !m.release_proxy(&old).await.unwrap(),
        "the expired lease is gone"
    );
    assert_eq!(leased(&m, "p").await, 1, "the new lease is untouched");
    {
        let rel = rel.lock().unwrap();
        assert_eq!(rel.len(), 1);
        assert_eq!(
            (rel[0].lease.id, rel[0].lease.status),
            (old.id, LeaseStatus::Expired)
        );
    }
    assert!(m.release_proxy(&new).await.unwrap());
}

#[tokio::test(start_paused = true)]
async fn the_sweeper_releases_expired_leases_in_the_background() {
    let m = manager_with("p", vec![proxy("p", "a")]).await;
    let _sweeper = m.spawn_sweeper(Duration::from_secs(1));
    let req = AcquireRequest::new("p").duration(Duration::from_secs(10));
    m.acquire_proxy(&req).await.unwrap().unwrap();
    tokio::time::sleep(Duration::from_millis(9_500)).await;
    assert_eq!(leased(&m, "p").await, 1);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(leased(&m, "p").await, 0);
}

#[tokio::test(start_paused = true)]
async fn renewal_postpones_expiry() {
    let m = manager_with("p", vec![proxy("p", "a")]).await;
    let mut guard = m
        .lease(&AcquireRequest::new("p").duration(Duration::from_secs(10)))
        .await
        .unwrap()
        .unwrap();
    tokio::time::advance(Duration::from_secs(8)).await;
    assert!(guard.renew(Duration::from_secs(10)).await.unwrap());
    tokio::time::advance(Duration::from_secs(8)).await;
    assert_eq!(m.cleanup_expired_leases().await.unwrap(), 0);
    tokio::time::advance(Duration::from_secs(2)).await;
    assert_eq!(m.cleanup_expired_leases().await.unwrap(), 1);
    assert!(
        !guard.renew(Duration::from_secs(10)).await.unwrap(),
        "expired leases cannot be renewed"
    );
    assert!(matches!(
        m.renew(&guard, Duration::ZERO).await,
        Err(LeaseError::InvalidDuration)
    ));
}

#[tokio::test]
async fn a_removed_proxy_drains() {
    let m = manager_with(
        "p",
        vec![
            proxy("p", "a").with_max_concurrency(Some(2)),
            proxy("p", "b"),
        ],
    )
    .await;
    let only_a =
        AcquireRequest::new("p").filter(pharox::Filter::new().predicate(|p| p.id.as_str() == "a"));
    let lease = m.acquire_proxy(&only_a).await.unwrap().unwrap();
    assert!(m.storage().remove_proxy(&ProxyId::from("a")).await.unwrap());
    assert!(
        m.acquire_proxy(&only_a).await.unwrap().is_none(),
        "no new lease on a draining proxy"
    );
    let info = m
        .storage()
        .get_proxy(&ProxyId::from("a"))
        .await
        .unwrap()
        .unwrap();
    assert!(info.draining);
    assert_eq!(info.current_leases, 1);
    let s = m.storage().pool_stats("p").await.unwrap().unwrap();
    assert_eq!((s.total, s.leased, s.total_leases), (1, 1, 1));
    assert!(m.release_proxy(&lease).await.unwrap());
    assert!(
        m.storage()
            .get_proxy(&ProxyId::from("a"))
            .await
            .unwrap()
            .is_none()
    );
    assert_eq!(m.storage().list_proxies("p").await.unwrap().len(), 1);
}

#[tokio::test]
async fn updating_a_leased_proxy_keeps_its_lease_count() {
    let m = manager_with("p", vec![proxy("p", "a").with_max_concurrency(Some(1))]).await;
    let lease = m
        .acquire_proxy(&AcquireRequest::new("p"))
        .await
        .unwrap()
        .unwrap();
    let mut update = proxy("p", "a").with_max_concurrency(Some(1));
    update.meta.city = Some("Rosario".into());
    m.storage().upsert_proxy(update).await.unwrap();
    let info = m
        .storage()
        .get_proxy(&ProxyId::from("a"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (info.current_leases, info.proxy.meta.city.as_deref()),
        (1, Some("Rosario"))
    );
    assert!(
        m.acquire_proxy(&AcquireRequest::new("p"))
            .await
            .unwrap()
            .is_none(),
        "cap still holds"
    );
    // Re-adding a draining proxy brings it back with its count.
    m.storage().remove_proxy(&ProxyId::from("a")).await.unwrap();
    m.storage()
        .upsert_proxy(proxy("p", "a").with_max_concurrency(Some(2)))
        .await
        .unwrap();
    let info = m
        .storage()
        .get_proxy(&ProxyId::from("a"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!((info.current_leases, info.draining), (1, false));
    m.release_proxy(&lease).await.unwrap();
    assert_eq!(leased(&m, "p").await, 0);
}

#[tokio::test]
async fn a_removed_pool_drains_then_disappears() {
    let m = manager_with("p", vec![proxy("p", "a")]).await;
    let lease = m
        .acquire_proxy(&AcquireRequest::new("p"))
        .await
        .unwrap()
        .unwrap();
    assert!(m.storage().remove_pool("p").await.unwrap());
    assert!(matches!(
        m.acquire_proxy(&AcquireRequest::new("p")).await,
        Err(LeaseError::UnknownPool(_))
    ));
    assert!(m.storage().list_pools().await.unwrap().is_empty());
    assert_eq!(m.storage().list_leases(None).await.unwrap().len(), 1);
    assert!(m.release_proxy(&lease).await.unwrap());
    assert!(m.storage().list_leases(None).await.unwrap().is_empty());
    // The name is free for a new pool.
    m.storage().upsert_pool(Pool::new("p")).await.unwrap();
    assert_eq!(m.storage().pool_stats("p").await.unwrap().unwrap().total, 0);
}

#[tokio::test]
async fn banned_proxies_get_no_lease_until_reactivated() {
    let m = manager_with("p", vec![proxy("p", "a")]).await;
    let id = ProxyId::from("a");
    m.storage()
        .set_proxy_status(&id, ProxyStatus::Banned)
        .await
        .unwrap();
    assert!(
        m.acquire_proxy(&AcquireRequest::new("p"))
            .await
            .unwrap()
            .is_none()
    );
    m.storage()
        .set_proxy_status(&id, ProxyStatus::Active)
        .await
        .unwrap();
    assert!(
        m.acquire_proxy(&AcquireRequest::new("p"))
            .await
            .unwrap()
            .is_some()
    );
}

#[tokio::test]
async fn inventory_validation() {
    let m = manager_with("p", vec![proxy("p", "a")]).await;
    let s = m.storage();
    let zero_cap = proxy("p", "z").with_max_concurrency(Some(0));
    assert!(matches!(
        s.upsert_proxy(zero_cap).await,
        Err(LeaseError::InvalidProxy { .. })
    ));
    assert!(matches!(
        s.upsert_proxy(proxy("nope", "x")).await,
        Err(LeaseError::UnknownPool(_))
    ));
    s.upsert_pool(Pool::new("q")).await.unwrap();
    let moved = s.upsert_proxy(proxy("q", "a")).await;
    assert!(
        matches!(moved, Err(LeaseError::InvalidProxy { reason, .. }) if reason.contains("`p`"))
    );
    let mut half = proxy("p", "h");
    half.meta.latitude = Some(1.0);
    assert!(matches!(
        s.upsert_proxy(half).await,
        Err(LeaseError::InvalidProxy { .. })
    ));
    let zero = m
        .acquire_proxy(&AcquireRequest::new("p").duration(Duration::ZERO))
        .await;
    assert!(matches!(zero, Err(LeaseError::InvalidDuration)));
}

#[tokio::test]
async fn removing_most_of_a_large_pool_keeps_order_and_counts() {
    let ids: Vec<String> = (0..300).map(|i| format!("p{i:03}")).collect();
    let proxies = ids
        .iter()
        .map(|id| proxy("p", id).with_max_concurrency(Some(1)))
        .collect();
    let m = manager_with("p", proxies).await;
    let rr = AcquireRequest::new("p").selector(Selector::RoundRobin);
    let mut held = Vec::new();
    for _ in 0..10 {
        held.push(
            m.acquire_proxy(&AcquireRequest::new("p"))
                .await
                .unwrap()
                .unwrap(),
        );
    }
    held.push(m.acquire_proxy(&rr).await.unwrap().unwrap());
    assert_eq!(held[10].proxy_id().as_str(), "p010");
    // Remove all but the last 50; the leased ones drain, the rest go at once.
    for id in &ids[..250] {
        m.storage()
            .remove_proxy(&ProxyId::from(id.as_str()))
            .await
            .unwrap();
    }
    let s = m.storage().pool_stats("p").await.unwrap().unwrap();
    assert_eq!((s.total, s.available, s.total_leases), (50, 50, 11));
    assert_eq!(m.storage().list_proxies("p").await.unwrap().len(), 61);
    let first = m
        .acquire_proxy(&AcquireRequest::new("p"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(first.proxy_id().as_str(), "p250");
    assert_eq!(
        m.acquire_proxy(&rr)
            .await
            .unwrap()
            .unwrap()
            .proxy_id()
            .as_str(),
        "p251"
    );
    for lease in &held {
        assert!(m.release_proxy(lease).await.unwrap());
    }
    assert_eq!(m.storage().list_proxies("p").await.unwrap().len(), 50);
    let lu = AcquireRequest::new("p").selector(Selector::LeastUsed);
    assert_eq!(
        m.acquire_proxy(&lu)
            .await
            .unwrap()
            .unwrap()
            .proxy_id()
            .as_str(),
        "p252"
    );
    assert_eq!(leased(&m, "p").await, 3);
}

/// Clients choosing filter values cannot grow a pool's indexes without bound: past the view
/// cap, idle views give way and busy ones stay, and every answer is still right.
#[tokio::test]
async fn filter_views_stay_bounded_whatever_keys_clients_send() {
    let proxies = (0..20)
        .map(|i| proxy("p", &format!("p{i:02}")).with_country(&format!("C{i}")))
        .collect();
    let m = manager_with("p", proxies).await;
    for round in 0..3 {
        for k in 0..400 {
            let country = format!("C{}", k % 20);
            let req = AcquireRequest::new("p").filter(Filter::new().country(&country));
            let lease = m.acquire_proxy(&req).await.unwrap();
            let lease = lease.unwrap_or_else(|| panic!("round {round}: {country} has a proxy"));
            assert_eq!(lease.proxy.meta.country.as_deref(), Some(country.as_str()));
            m.release_proxy(&lease).await.unwrap();
            // Keys that match nothing: a fresh one every time.
            let miss = Filter::new().city(format!("nowhere-{round}-{k}"));
            assert!(
                m.acquire_proxy(&AcquireRequest::new("p").filter(miss))
                    .await
                    .unwrap()
                    .is_none()
            );
        }
    }
    let views = m.storage().view_count("p").unwrap();
    assert!(views <= 64, "{views} views");
    assert_eq!(leased(&m, "p").await, 0);
}

/// `exclude` and `only` take the place of predicates for failover and probes: they narrow
/// every selector's choice, and caps still hold.
#[tokio::test]
async fn exclude_and_only_narrow_every_selector() {
    let proxies = (0..5)
        .map(|i| proxy("p", &format!("p{i}")).with_max_concurrency(Some(1)))
        .collect();
    let m = manager_with("p", proxies).await;
    let id = |s: &str| ProxyId::from(s);
    for sel in Selector::ALL.iter().copied() {
        let req = AcquireRequest::new("p")
            .selector(sel)
            .exclude([id("p0"), id("p1"), id("p3")]);
        let a = m.acquire_proxy(&req).await.unwrap().unwrap();
        let b = m.acquire_proxy(&req).await.unwrap().unwrap();
        let mut got = [a.proxy_id().as_str(), b.proxy_id().as_str()];
        got.sort();
        assert_eq!(got, ["p2", "p4"], "{sel}");
        assert!(m.acquire_proxy(&req).await.unwrap().is_none(), "{sel}");
        let only = AcquireRequest::new("p")
            .selector(sel)
            .only([id("p4"), id("p1")])
            .exclude([id("p1")]);
        assert!(
            m.acquire_proxy(&only).await.unwrap().is_none(),
            "{sel}: p4 is full"
        );
        m.release_proxy(&b).await.unwrap();
        m.release_proxy(&a).await.unwrap();
        let c = m.acquire_proxy(&only).await.unwrap().unwrap();
        assert_eq!(c.proxy_id().as_str(), "p4", "{sel}");
        m.release_proxy(&c).await.unwrap();
    }
    assert_eq!(leased(&m, "p").await, 0);
}

/// A duration whose expiry cannot be represented is refused before anything changes.
#[tokio::test]
async fn huge_durations_are_refused_and_leak_nothing() {
    let m = manager_with("p", vec![proxy("p", "a").with_max_concurrency(Some(1))]).await;
    for d in [
        Duration::MAX,
        Duration::from_secs(u64::MAX / 2),
        Duration::ZERO,
    ] {
        let req = AcquireRequest::new("p").duration(d);
        assert!(matches!(
            m.acquire_proxy(&req).await,
            Err(LeaseError::InvalidDuration)
        ));
    }
    assert_eq!(leased(&m, "p").await, 0);
    let lease = m
        .acquire_proxy(&AcquireRequest::new("p"))
        .await
        .unwrap()
        .unwrap();
    assert!(matches!(
        m.renew(&lease, Duration::MAX).await,
        Err(LeaseError::InvalidDuration)
    ));
    assert_eq!(
        m.storage()
            .get_lease(lease.id)
            .await
            .unwrap()
            .unwrap()
            .expires_at,
        lease.expires_at
    );
    assert!(m.release_proxy(&lease).await.unwrap());
    assert_eq!(leased(&m, "p").await, 0);
}
