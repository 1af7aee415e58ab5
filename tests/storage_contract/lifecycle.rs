//! Contract scenarios: release, renew, expiry, stats, lease_slow, inventory updates and
//! removals, health and rests, lease lists, the guard, wake-up.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use pharox::storage::{MAX_LEASE_DURATION, Renewal};
use pharox::{
    AcquireRequest, Filter, HealthCheck, LeaseError, Pool, ProxyId, ProxyStatus, RetryPolicy,
    Storage,
};

use crate::common::proxy;
use crate::pgsupport::eventually;
use crate::{Env, at, one};

pub(crate) async fn release_is_idempotent<S: Storage>(e: Env<S>) {
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

pub(crate) async fn renew_extends_live_leases_only<S: Storage>(e: Env<S>) {
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

pub(crate) async fn invalid_durations_are_refused<S: Storage>(e: Env<S>) {
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

pub(crate) async fn cleanup_releases_expired_leases<S: Storage>(e: Env<S>) {
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

pub(crate) async fn pool_stats_count<S: Storage>(e: Env<S>) {
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

pub(crate) async fn slow_proxies_follow_the_pool_setting<S: Storage>(e: Env<S>) {
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

pub(crate) async fn upsert_keeps_live_counts<S: Storage>(e: Env<S>) {
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

pub(crate) async fn removed_proxies_drain<S: Storage>(e: Env<S>) {
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

pub(crate) async fn removed_pools_drain<S: Storage>(e: Env<S>) {
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

pub(crate) async fn health_changes_apply<S: Storage>(e: Env<S>) {
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

pub(crate) async fn rests_take_proxies_out_until_their_deadline<S: Storage>(e: Env<S>) {
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

pub(crate) async fn leases_are_listed<S: Storage>(e: Env<S>) {
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

pub(crate) async fn guard_releases_on_drop<S: Storage>(e: Env<S>) {
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

pub(crate) async fn a_release_wakes_a_waiter<S: Storage>(e: Env<S>) {
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
