//! Fleet mode with several `PostgresStorage` instances (different node ids) on one database,
//! and Python pharox 0.11 workers as separate processes (`TEST_PHAROX_VENV`): no
//! over-leasing under contention, a shared round-robin rotation, wake-up across instances,
//! node ids (duplicates refused, stale leases released at restart), renewals that a hand
//! release in SQL has made impossible.

mod pgsupport;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use pgsupport::{TestDb, eventually, snapshot};
use pharox::storage::Renewal;
use pharox::storage::postgres::PgError;
use pharox::{
    AcquireRequest, Filter, LeaseError, Pool, PostgresStorage, Proxy, ProxyManager, ProxyProtocol,
    RetryPolicy, Selector, Storage,
};

fn uid(n: u8) -> String {
    format!("00000000-0000-4000-8000-{n:012x}")
}

fn proxy(id: &str, cap: Option<u32>) -> Proxy {
    Proxy::new(id, "shared", ProxyProtocol::Http, "10.0.0.1", 8080)
        .with_max_concurrency(cap)
        .with_country("AR")
}

async fn inventory(s: &PostgresStorage, proxies: Vec<Proxy>) {
    s.upsert_pool(Pool::new("shared")).await.unwrap();
    s.upsert_proxies(proxies).await.unwrap();
}

/// A Rust worker: random selectors and filters, short holds, renewals, 5 % abandoned
/// 1 s leases (left to expire), until `stop`.
async fn rust_worker(
    m: ProxyManager<PostgresStorage>,
    seed: u64,
    stop: Arc<AtomicBool>,
) -> (u64, u64) {
    let mut rng = fastrand::Rng::with_seed(seed);
    let (mut hits, mut errors) = (0, 0);
    let selectors = Selector::ALL;
    while !stop.load(Ordering::Relaxed) {
        let abandon = rng.u8(..100) < 5;
        let mut req = AcquireRequest::new("shared")
            .consumer(format!("rust-{seed}"))
            .selector(selectors[rng.usize(..selectors.len())])
            .duration(Duration::from_secs(if abandon { 1 } else { 30 }));
        if rng.bool() {
            req = req.filter(Filter::new().country("ar"));
        }
        match m.acquire_proxy(&req).await {
            Ok(Some(lease)) => {
                hits += 1;
                tokio::time::sleep(Duration::from_micros(rng.u64(..3000))).await;
                if abandon {
                    continue;
                }
                if rng.u8(..10) == 0 {
                    let _ = m.renew(&lease, Duration::from_secs(30)).await;
                }
                if m.release_proxy(&lease).await.is_err() {
                    errors += 1;
                }
                // Leave room for the (much slower) Python workers.
                tokio::time::sleep(Duration::from_micros(rng.u64(..8000))).await;
            }
            Ok(None) => tokio::time::sleep(Duration::from_millis(1)).await,
            Err(e) => {
                eprintln!("worker {seed}: {e}");
                errors += 1;
            }
        }
    }
    (hits, errors)
}

async fn python_worker(py: &std::path::Path, url: &str, idx: u32, secs: u32) -> serde_json::Value {
    let (secs, idx) = (secs.to_string(), idx.to_string());
    pgsupport::run_script(py, "worker.py", &[url, "shared", &secs, &idx]).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_over_leasing_under_contention() {
    let Some(db) = TestDb::new("contention").await else {
        return;
    };
    let nodes = ["node-1", "node-2", "node-3"];
    let mut storages = Vec::new();
    for n in nodes {
        storages.push(db.storage(n).await);
    }
    // 3 exclusive and 3 two-slot proxies: 9 slots for 3 x 3 Rust tasks and 2 Python workers.
    let proxies: Vec<Proxy> = (1..=6)
        .map(|i| proxy(&uid(i), Some(if i <= 3 { 1 } else { 2 })))
        .collect();
    inventory(&storages[0], proxies).await;
    let stop = Arc::new(AtomicBool::new(false));
    let sql = db.sql().await;
    let (samples, peak) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let monitor_stop = Arc::new(AtomicBool::new(false));
    let monitor = {
        let (stop, samples, peak) = (monitor_stop.clone(), samples.clone(), peak.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let (over, drift, live, _) = snapshot(&sql).await;
                assert_eq!(
                    (over, drift),
                    (0, 0),
                    "over cap / counter drift in one snapshot"
                );
                samples.fetch_add(1, Ordering::Relaxed);
                peak.fetch_max(live as u64, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            sql
        })
    };
    let mut workers = Vec::new();
    let mut sweepers = Vec::new();
    for (i, s) in storages.iter().enumerate() {
        let m = ProxyManager::new(s.clone());
        sweepers.push(m.spawn_sweeper(Duration::from_millis(200)));
        for t in 0..3 {
            workers.push(tokio::spawn(rust_worker(
                m.clone(),
                (i * 10 + t) as u64,
                stop.clone(),
            )));
        }
    }
    let python = pgsupport::python();
    let py_runs: Vec<_> = python
        .iter()
        .flat_map(|py| (0..2).map(move |i| (py.clone(), i)))
        .map(|(py, i)| {
            let url = db.url.clone();
            tokio::spawn(async move { python_worker(&py, &url, i, 10).await })
        })
        .collect();
    // 7 s of everyone at once; the Python workers go on alone for their last seconds.
    tokio::time::sleep(Duration::from_secs(7)).await;
    stop.store(true, Ordering::Relaxed);
    let mut per_task = Vec::new();
    for w in workers {
        per_task.push(w.await.unwrap());
    }
    let mut py_stats = Vec::new();
    for r in py_runs {
        py_stats.push(r.await.unwrap());
    }
    monitor_stop.store(true, Ordering::Relaxed);
    let sql = monitor.await.expect("the monitor saw no violation");
    drop(sweepers);
    println!("rust (hits, errors) per task: {per_task:?}");
    println!("python: {py_stats:?}");
    println!(
        "monitor: {} samples, peak {} live leases (9 slots)",
        samples.load(Ordering::Relaxed),
        peak.load(Ordering::Relaxed)
    );
    assert!(
        per_task.iter().all(|(h, e)| *h > 0 && *e == 0),
        "{per_task:?}"
    );
    let py_hits: u64 = py_stats.iter().filter_map(|s| s.get("hit")?.as_u64()).sum();
    assert!(
        py_stats.is_empty() || py_hits > 0,
        "Python leased nothing: {py_stats:?}"
    );
    for s in &py_stats {
        assert!(
            s.as_object()
                .unwrap()
                .keys()
                .all(|k| !k.starts_with("error")),
            "{s}"
        );
    }
    assert!(peak.load(Ordering::Relaxed) <= 9);
    // The abandoned 1 s leases expire and are swept; then nothing is left.
    let m = ProxyManager::new(storages[1].clone());
    let clean = eventually(Duration::from_secs(20), || async {
        m.cleanup_expired_leases().await.unwrap();
        let (over, drift, live, _) = snapshot(&sql).await;
        assert_eq!((over, drift), (0, 0));
        (live == 0).then_some(())
    })
    .await;
    assert!(clean.is_some(), "leases left after every worker stopped");
    let counters: i64 = sql
        .query_one(
            "SELECT coalesce(sum(current_leases), 0)::int8 FROM proxy",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(counters, 0);
    assert!(storages[0].audit(None).await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_robin_rotation_is_shared_by_two_instances() {
    let Some(db) = TestDb::new("rr_shared").await else {
        return;
    };
    let (a, b) = (db.storage("rr-a").await, db.storage("rr-b").await);
    inventory(&a, (1..=5).map(|i| proxy(&uid(i), None)).collect()).await;
    let (ma, mb) = (ProxyManager::new(a), ProxyManager::new(b));
    let req = AcquireRequest::new("shared").selector(Selector::RoundRobin);
    let mut seen = Vec::new();
    for i in 0..12 {
        let m = if i % 2 == 0 { &ma } else { &mb };
        let lease = m.acquire_proxy(&req).await.unwrap().unwrap();
        seen.push(lease.proxy_id().to_string());
        m.release_proxy(&lease).await.unwrap();
    }
    let want: Vec<String> = (0..12).map(|i| uid(1 + (i % 5) as u8)).collect();
    assert_eq!(seen, want, "one rotation across both instances");
    // Concurrently, the rotation still spreads evenly.
    let counts = Arc::new(std::sync::Mutex::new(BTreeMap::<String, u32>::new()));
    let mut tasks = Vec::new();
    for m in [ma.clone(), mb.clone(), ma.clone(), mb.clone()] {
        let (req, counts) = (req.clone(), counts.clone());
        tasks.push(tokio::spawn(async move {
            for _ in 0..50 {
                let lease = m.acquire_proxy(&req).await.unwrap().unwrap();
                *counts
                    .lock()
                    .unwrap()
                    .entry(lease.proxy_id().to_string())
                    .or_default() += 1;
                m.release_proxy(&lease).await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let counts = counts.lock().unwrap().clone();
    println!("concurrent round robin picks: {counts:?}");
    assert_eq!(counts.len(), 5);
    assert!(
        counts.values().all(|&n| (30..=50).contains(&n)),
        "{counts:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_on_another_instance_wakes_a_waiter() {
    let Some(db) = TestDb::new("wakeup").await else {
        return;
    };
    let (a, b) = (db.storage("wake-a").await, db.storage("wake-b").await);
    inventory(&a, vec![proxy(&uid(1), Some(1))]).await;
    let (ma, mb) = (ProxyManager::new(a), ProxyManager::new(b));
    let held = ma
        .acquire_proxy(&AcquireRequest::new("shared"))
        .await
        .unwrap()
        .unwrap();
    let policy = RetryPolicy {
        max_attempts: 2,
        backoff: Duration::from_secs(60),
        ..RetryPolicy::default()
    };
    let waiter = tokio::spawn(async move {
        let lease = mb
            .acquire_proxy_with_retry(&AcquireRequest::new("shared"), &policy)
            .await;
        (lease, Instant::now())
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let released = Instant::now();
    assert!(ma.release_proxy(&held).await.unwrap());
    let (lease, woke) = tokio::time::timeout(Duration::from_secs(20), waiter)
        .await
        .expect("the waiter on the other instance was woken well before its 60 s backoff")
        .unwrap();
    assert!(lease.unwrap().is_some());
    println!(
        "woken {:?} after the release on the other instance",
        woke - released
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_duplicate_node_id_is_refused() {
    let Some(db) = TestDb::new("dup_node").await else {
        return;
    };
    let first = db.storage("same").await;
    let err = PostgresStorage::connect(db.settings("same"))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, PgError::NodeTaken(n) if n == "same"),
        "{err}"
    );
    let report = PostgresStorage::check(&db.settings("same")).await.unwrap();
    assert!(report.node_holder.is_some(), "{report}");
    first.close().await;
    let again = eventually(Duration::from_secs(10), || async {
        PostgresStorage::connect(db.settings("same")).await.ok()
    })
    .await;
    assert!(again.is_some(), "the id is free once its holder closed");
}

async fn held_by(sql: &tokio_postgres::Client, node: &str) -> i64 {
    sql.query_one(
        "SELECT count(*) FROM lease WHERE status = 'active' AND holder = $1",
        &[&node],
    )
    .await
    .unwrap()
    .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_releases_the_nodes_stale_leases() {
    let Some(db) = TestDb::new("restart").await else {
        return;
    };
    let (crashing, other) = (db.storage("restarting").await, db.storage("other").await);
    inventory(
        &crashing,
        (1..=3).map(|i| proxy(&uid(i), Some(1))).collect(),
    )
    .await;
    let (mc, mo) = (
        ProxyManager::new(crashing.clone()),
        ProxyManager::new(other),
    );
    for _ in 0..2 {
        mc.acquire_proxy(&AcquireRequest::new("shared"))
            .await
            .unwrap()
            .unwrap();
    }
    let kept = mo
        .acquire_proxy(&AcquireRequest::new("shared"))
        .await
        .unwrap()
        .unwrap();
    let sql = db.sql().await;
    assert_eq!(held_by(&sql, "restarting").await, 2);
    // A crash: the process goes away without releasing anything.
    drop(mc);
    drop(crashing);
    let restarted = eventually(Duration::from_secs(15), || async {
        PostgresStorage::connect(db.settings("restarting"))
            .await
            .ok()
    })
    .await
    .expect("the node id comes free when the crashed session ends");
    assert_eq!(held_by(&sql, "restarting").await, 0);
    assert_eq!(
        held_by(&sql, "other").await,
        1,
        "other nodes' leases are untouched"
    );
    let reasons: i64 = sql
        .query_one(
            "SELECT count(*) FROM lease WHERE release_reason = 'node_restart'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(reasons, 2);
    let stats = restarted.pool_stats("shared").await.unwrap().unwrap();
    assert_eq!((stats.total_leases, stats.available), (1, 2));
    assert!(restarted.audit(None).await.unwrap().is_empty());
    assert!(mo.release_proxy(&kept).await.unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_released_by_hand_or_held_elsewhere_are_not_renewed() {
    let Some(db) = TestDb::new("renew_hand").await else {
        return;
    };
    let (a, b) = (db.storage("renew-a").await, db.storage("renew-b").await);
    inventory(&a, (1..=3).map(|i| proxy(&uid(i), None)).collect()).await;
    let (ma, mb) = (ProxyManager::new(a), ProxyManager::new(b));
    let req = AcquireRequest::new("shared").duration(Duration::from_secs(60));
    let (kept, by_hand) = (
        ma.acquire_proxy(&req).await.unwrap().unwrap(),
        ma.acquire_proxy(&req).await.unwrap().unwrap(),
    );
    let elsewhere = mb.acquire_proxy(&req).await.unwrap().unwrap();
    // An operator releases a lease directly in SQL, counter included, as the lab does.
    db.sql()
        .await
        .execute(
            "WITH l AS (UPDATE lease SET status = 'released', released_at = now()
                        WHERE id = $1 AND status = 'active' RETURNING proxy_id)
             UPDATE proxy SET current_leases = current_leases - 1 FROM l WHERE proxy.id = l.proxy_id",
            &[&by_hand.id.as_uuid()],
        )
        .await
        .unwrap();
    let renewals: Vec<Renewal> = [&kept, &by_hand, &elsewhere]
        .iter()
        .map(|l| Renewal {
            id: l.id,
            pool: l.pool_name.clone(),
            duration: Duration::from_secs(120),
        })
        .collect();
    let renewed: Vec<_> = ma
        .renew_many(&renewals)
        .await
        .unwrap()
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    assert_eq!(renewed, [kept.id], "only this node's live lease is renewed");
    let listed = ma.storage().list_leases(Some("shared")).await.unwrap();
    let holders: Vec<_> = listed
        .iter()
        .map(|l| l.holder.as_deref().unwrap_or("-").to_owned())
        .collect();
    assert_eq!(holders, ["renew-a", "renew-b"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acquire_refuses_predicates_and_unknown_pools_without_side_effects() {
    let Some(db) = TestDb::new("refusals").await else {
        return;
    };
    let s = db.storage("refusals").await;
    inventory(&s, vec![proxy(&uid(1), Some(1))]).await;
    let m = ProxyManager::new(s.clone());
    let f = Filter::new().any_of([Filter::new().predicate(|_| true)]);
    let err = m
        .acquire_proxy(&AcquireRequest::new("shared").filter(f))
        .await
        .unwrap_err();
    assert!(
        matches!(err, LeaseError::Unsupported(m) if m.contains("predicate")),
        "{err}"
    );
    let direct = Proxy::new("d", "shared", ProxyProtocol::Direct, "", 0);
    let err = s.upsert_proxy(direct).await.unwrap_err();
    assert!(
        err.to_string()
            .contains("direct upstreams cannot be stored in a shared database"),
        "{err}"
    );
    assert_eq!(s.pool_stats("shared").await.unwrap().unwrap().total, 1);
}
