//! One `PostgresStorage` and the database around it: Python pharox 0.11 on a database the
//! daemon migrated and filled, rows that only the database has (Python's) leased with their
//! stored credentials, the schema check, `check`, the observer, passwords that never show
//! (URL masking, `Debug`, every error message), and nodes that create the same consumer or
//! pool at the same moment.

mod pgsupport;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use pgsupport::TestDb;
use pharox::storage::postgres::{PgError, PgSettings, mask_url};
use pharox::{
    AcquireRequest, Credentials, Filter, HealthCheck, Pool, PostgresStorage, Proxy, ProxyId,
    ProxyManager, ProxyProtocol, ProxyStatus, Storage,
};
use uuid::Uuid;

const PASSWORD: &str = "hunter2-Very-Secret";

fn upstream(id: &str, protocol: ProxyProtocol) -> Proxy {
    let mut p = Proxy::new(id, "mixed", protocol, "10.1.0.1", 1080).with_country("ar");
    p.credentials = Some(Credentials::new("user", "pw-of-the-upstream"));
    p.max_concurrency = Some(2);
    p
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_works_on_a_database_the_daemon_migrated() {
    let Some(db) = TestDb::new("py_migrated").await else {
        return;
    };
    let Some(py) = pgsupport::python() else {
        return;
    };
    let s = db.storage("migrator").await;
    s.upsert_pool(Pool::new("mixed")).await.unwrap();
    s.upsert_proxies(vec![
        upstream("h", ProxyProtocol::Http),
        upstream("s", ProxyProtocol::Https),
        upstream("5", ProxyProtocol::Socks5),
        upstream("5h", ProxyProtocol::Socks5h),
    ])
    .await
    .unwrap();
    let check = HealthCheck {
        status: ProxyStatus::Active,
        checked_at: Some(std::time::SystemTime::now()),
        latency: Some(Duration::from_millis(40)),
    };
    s.apply_health(&"h".into(), check).await.unwrap();
    s.rest(
        &"s".into(),
        std::time::SystemTime::now() + Duration::from_secs(60),
    )
    .await
    .unwrap();
    let m = ProxyManager::new(s.clone());
    let ours = m
        .acquire_proxy(&AcquireRequest::new("mixed"))
        .await
        .unwrap()
        .unwrap();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/py/on_migrated.py");
    let out = tokio::process::Command::new(py)
        .args([script, &db.url, "mixed"])
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let v: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    println!("python on the migrated database: {v}");
    assert_eq!(v["pools"], serde_json::json!(["mixed"]));
    // socks5h is stored as protocol socks5 (+ scheme socks5h): Python reads it as socks5.
    assert_eq!(
        v["protocols"],
        serde_json::json!(["http", "https", "socks5", "socks5"])
    );
    assert_eq!(v["with_credentials"], 4);
    assert_eq!(v["daemon_leases"], 1);
    assert!(v["health_records"].as_u64().unwrap() >= 2);
    assert_eq!(v["hit"], true);
    assert_eq!(v["stats"][0], 4);
    // Our lease is still live and releases normally; the counters agree.
    assert!(m.release_proxy(&ours).await.unwrap());
    assert!(s.audit(None).await.unwrap().is_empty());
    let stats = s.pool_stats("mixed").await.unwrap().unwrap();
    assert_eq!(stats.total_leases, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_only_the_database_has_are_leasable() {
    let Some(db) = TestDb::new("db_only").await else {
        return;
    };
    let s = db.storage("reader").await;
    let sql = db.sql().await;
    let pool_id = Uuid::new_v4();
    let (good, socks4) = (Uuid::new_v4(), Uuid::new_v4());
    // What Python pharox writes: a uuid4 pool, lower-case country, its credentials format.
    sql.execute(
        "INSERT INTO proxy_pool (id, name) VALUES ($1, 'python-pool')",
        &[&pool_id],
    )
    .await
    .unwrap();
    for (id, protocol) in [(good, "socks5"), (socks4, "socks4")] {
        sql.execute(
            "INSERT INTO proxy (id, pool_id, host, port, protocol, status, credentials, country,
                                max_concurrency)
             VALUES ($1, $2, '192.0.2.7', 1080, $3, 'active',
                     '{\"user\": \"py\", \"password\": \"py-pass\"}'::json, 'br', 1)",
            &[&id, &pool_id, &protocol],
        )
        .await
        .unwrap();
    }
    let m = ProxyManager::new(s.clone());
    let req = AcquireRequest::new("python-pool").filter(Filter::new().country("BR"));
    let lease = m.acquire_proxy(&req).await.unwrap().unwrap();
    assert_eq!(lease.proxy_id().as_str(), good.to_string());
    assert_eq!(lease.proxy.protocol, ProxyProtocol::Socks5);
    let creds = lease.proxy.credentials.as_ref().unwrap();
    assert_eq!(
        (creds.username.as_str(), creds.password.expose()),
        ("py", "py-pass")
    );
    assert_eq!(lease.holder.as_deref(), Some("reader"));
    assert!(
        m.acquire_proxy(&req).await.unwrap().is_none(),
        "socks4 is skipped"
    );
    let listed = s.list_proxies("python-pool").await.unwrap();
    assert_eq!(listed.len(), 1, "the socks4 row cannot be used");
    // Not ours: a reload's remove_proxy leaves it alone.
    assert!(
        !s.remove_proxy(&ProxyId::new(good.to_string()))
            .await
            .unwrap()
    );
    assert!(!s.remove_pool("python-pool").await.unwrap());
    assert!(m.release_proxy(&lease).await.unwrap());
    assert!(
        m.acquire_proxy(&req).await.unwrap().is_some(),
        "still leasable"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_schema_is_named() {
    let Some(db) = TestDb::new("schema").await else {
        return;
    };
    let mut settings = db.settings("schema-check");
    settings.migrate = false;
    let err = PostgresStorage::connect(settings.clone())
        .await
        .unwrap_err();
    let PgError::Schema(missing) = &err else {
        panic!("{err}")
    };
    assert!(missing.contains(&"table proxy_pool".to_owned()), "{err}");
    let report = PostgresStorage::check(&settings).await.unwrap();
    assert!(!report.schema_ok());
    assert_eq!(report.migration_version, None);
    db.storage("schema-check").await.close().await;
    db.sql()
        .await
        .batch_execute("ALTER TABLE proxy DROP COLUMN latency_us")
        .await
        .unwrap();
    let err = PostgresStorage::connect(settings.clone())
        .await
        .unwrap_err();
    assert!(
        matches!(&err, PgError::Schema(m) if *m == ["column proxy.latency_us"]),
        "{err}"
    );
    assert!(err.to_string().contains("migrate = true"), "{err}");
    // A failed start gives its node id back before it returns: starting again at once finds
    // the schema problem again, never the id still held by the session that just failed.
    for _ in 0..20 {
        let again = PostgresStorage::connect(settings.clone())
            .await
            .unwrap_err();
        assert!(matches!(&again, PgError::Schema(_)), "{again}");
    }
    // The migration puts it back (it is idempotent and additive).
    db.storage("schema-check").await.close().await;
    let report = PostgresStorage::check(&settings).await.unwrap();
    assert!(report.schema_ok(), "{report}");
    assert_eq!(report.migration_version, Some(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_reports_the_database() {
    let Some(db) = TestDb::new("check").await else {
        return;
    };
    let s = db.storage("checked").await;
    s.upsert_pool(Pool::new("mixed")).await.unwrap();
    s.upsert_proxy(upstream("h", ProxyProtocol::Http))
        .await
        .unwrap();
    // The same endpoint added again by someone else (a uuid4 row): caps are not shared.
    db.sql()
        .await
        .execute(
            "INSERT INTO proxy (id, pool_id, host, port, protocol, status)
             SELECT $1, pool_id, host, port, protocol, 'active' FROM proxy LIMIT 1",
            &[&Uuid::new_v4()],
        )
        .await
        .unwrap();
    let report = PostgresStorage::check(&db.settings("checked"))
        .await
        .unwrap();
    let text = report.to_string();
    println!("{text}");
    assert!(report.schema_ok());
    assert_eq!(report.migration_version, Some(1));
    assert_eq!(report.duplicates.len(), 1);
    assert!(report.drift.is_empty());
    assert!(
        report.node_holder.is_some(),
        "the storage above holds the node id"
    );
    assert!(text.contains("PostgreSQL 1"), "{text}");
    let free = PostgresStorage::check(&db.settings("nobody"))
        .await
        .unwrap();
    assert!(free.node_holder.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_observer_sees_every_operation() {
    let Some(db) = TestDb::new("observer").await else {
        return;
    };
    let s = db.storage("observed").await;
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    s.set_observer(Arc::new(move |op, took, ok| {
        log.lock().unwrap().push((op, ok));
        assert!(took.is_some_and(|t| t < Duration::from_secs(30)));
    }));
    s.upsert_pool(Pool::new("mixed")).await.unwrap();
    s.upsert_proxy(upstream("h", ProxyProtocol::Http))
        .await
        .unwrap();
    let m = ProxyManager::new(s.clone());
    let lease = m
        .acquire_proxy(&AcquireRequest::new("mixed"))
        .await
        .unwrap()
        .unwrap();
    m.renew(&lease, Duration::from_secs(60)).await.unwrap();
    m.release_proxy(&lease).await.unwrap();
    m.cleanup_expired_leases().await.unwrap();
    s.set_proxy_status(&"h".into(), ProxyStatus::Banned)
        .await
        .unwrap();
    s.list_leases(None).await.unwrap();
    let ops: Vec<&str> = seen.lock().unwrap().iter().map(|(op, _)| *op).collect();
    for op in [
        "inventory",
        "acquire",
        "consumer",
        "renew",
        "release",
        "sweep",
        "health",
        "leases",
        "stats",
    ] {
        assert!(ops.contains(&op), "{op} missing from {ops:?}");
    }
    assert!(seen.lock().unwrap().iter().all(|(_, ok)| *ok));
    assert!(s.is_up());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_password_never_shows() {
    let url = format!("postgres://pharox:{PASSWORD}@127.0.0.1:1/db?sslmode=disable");
    assert_eq!(
        mask_url(&url),
        "postgres://pharox:***@127.0.0.1:1/db?sslmode=disable"
    );
    let settings = PgSettings::new(url.clone(), "masked");
    let debug = format!("{settings:?}");
    assert!(
        !debug.contains(PASSWORD) && debug.contains("pharox:***@"),
        "{debug}"
    );
    let mut errors = Vec::new();
    // Nothing listens on port 1: a connection error.
    errors.push(
        PostgresStorage::connect(settings.clone())
            .await
            .unwrap_err(),
    );
    errors.push(PostgresStorage::check(&settings).await.unwrap_err());
    // A URL that cannot be parsed.
    let bad = PgSettings::new(format!("postgres://u:{PASSWORD}@h/db?sslmode=nope"), "m");
    errors.push(PostgresStorage::connect(bad).await.unwrap_err());
    let bad_ca = PgSettings {
        ca_file: Some("/nonexistent/ca.pem".into()),
        ..PgSettings::new(url.replace("disable", "verify-full"), "m")
    };
    errors.push(PostgresStorage::connect(bad_ca).await.unwrap_err());
    if let Some(db) = TestDb::new("masking").await {
        // The test server trusts everyone, so a password in the URL is accepted and ignored.
        let with_password = db
            .url
            .replacen("postgres@", &format!("postgres:{PASSWORD}@"), 1);
        let mut s = db.settings("masked");
        s.url = pharox::Secret::new(with_password.clone());
        let first = PostgresStorage::connect(s.clone()).await.unwrap();
        errors.push(PostgresStorage::connect(s.clone()).await.unwrap_err());
        s.migrate = false;
        s.node_id = "other".into();
        let report = PostgresStorage::check(&s).await.unwrap();
        let text = format!("{report} {report:?} {first:?}");
        assert!(!text.contains(PASSWORD), "{text}");
        assert!(text.contains("postgres:***@"), "{text}");
    }
    for e in &errors {
        let text = format!("{e} / {e:?}");
        println!("{text}");
        assert!(!text.contains(PASSWORD), "{text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_locked_row_is_a_contended_miss_and_a_full_pool_a_plain_one() {
    let Some(db) = TestDb::new("contended").await else {
        return;
    };
    let s = db.storage("locker").await;
    s.upsert_pool(Pool::new("locked")).await.unwrap();
    let only = Proxy::new("only", "locked", ProxyProtocol::Http, "10.1.0.9", 8080)
        .with_country("ar")
        .with_max_concurrency(Some(1));
    s.upsert_proxies(vec![only]).await.unwrap();
    let m = ProxyManager::new(s.clone());
    let mut sql = db.sql().await;
    // Another session holds the proxy's row lock: every acquire statement skips it, and the
    // probe (with the filter's parameters numbered from its own start) finds it eligible.
    let tx = sql.transaction().await.unwrap();
    tx.execute(
        "SELECT 1 FROM proxy p JOIN proxy_pool pp ON pp.id = p.pool_id
         WHERE pp.name = 'locked' FOR UPDATE OF p",
        &[],
    )
    .await
    .unwrap();
    for &selector in pharox::Selector::ALL {
        let req = AcquireRequest::new("locked")
            .selector(selector)
            .filter(Filter::new().country("AR"));
        let got = m.acquire_proxy(&req).await;
        assert!(
            matches!(got, Ok(None)),
            "{selector}: a locked row is a miss: {got:?}"
        );
    }
    tx.commit().await.unwrap();
    let req = AcquireRequest::new("locked").filter(Filter::new().country("AR"));
    let lease = m.acquire_proxy(&req).await.unwrap().expect("free again");
    // Full (at its cap): a plain miss, for every selector.
    for &selector in pharox::Selector::ALL {
        let req = AcquireRequest::new("locked")
            .selector(selector)
            .filter(Filter::new().country("AR"));
        assert!(m.acquire_proxy(&req).await.unwrap().is_none(), "{selector}");
    }
    assert!(m.release_proxy(&lease).await.unwrap());
    let sql = db.sql().await;
    let live: i64 = sql
        .query_one("SELECT count(*) FROM lease WHERE status = 'active'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(live, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn released_history_is_pruned_after_its_retention() {
    let Some(db) = TestDb::new("prune").await else {
        return;
    };
    let mut settings = db.settings("pruner");
    settings.keep_released = Some(Duration::from_secs(3600));
    let s = PostgresStorage::connect(settings).await.unwrap();
    s.upsert_pool(Pool::new("hist")).await.unwrap();
    let p = Proxy::new("h1", "hist", ProxyProtocol::Http, "10.1.0.10", 8080);
    s.upsert_proxies(vec![p]).await.unwrap();
    let m = ProxyManager::new(s.clone());
    let req = AcquireRequest::new("hist");
    let (old, recent, live) = (
        m.acquire_proxy(&req).await.unwrap().unwrap(),
        m.acquire_proxy(&req).await.unwrap().unwrap(),
        m.acquire_proxy(&req).await.unwrap().unwrap(),
    );
    assert!(m.release_proxy(&old).await.unwrap());
    assert!(m.release_proxy(&recent).await.unwrap());
    let sql = db.sql().await;
    // One released two hours ago (past the retention), one a minute ago.
    sql.execute(
        "UPDATE lease SET released_at = now() - interval '2 hours' WHERE id = $1",
        &[&old.id.as_uuid()],
    )
    .await
    .unwrap();
    s.cleanup_expired(std::time::SystemTime::now())
        .await
        .unwrap();
    let ids = |status: &'static str| {
        let sql = &sql;
        async move {
            let rows = sql
                .query("SELECT id FROM lease WHERE status = $1", &[&status])
                .await
                .unwrap();
            rows.iter().map(|r| r.get::<_, Uuid>(0)).collect::<Vec<_>>()
        }
    };
    assert_eq!(ids("released").await, vec![recent.id.as_uuid()]);
    assert_eq!(ids("active").await, vec![live.id.as_uuid()]);
    assert!(m.release_proxy(&live).await.unwrap());

    // keep_released = None: the history stays, however old.
    let mut settings = db.settings("keeper");
    settings.keep_released = None;
    let keeper = PostgresStorage::connect(settings).await.unwrap();
    sql.execute(
        "UPDATE lease SET released_at = now() - interval '3000 days'",
        &[],
    )
    .await
    .unwrap();
    keeper
        .cleanup_expired(std::time::SystemTime::now())
        .await
        .unwrap();
    assert_eq!(ids("released").await.len(), 2);
    s.cleanup_expired(std::time::SystemTime::now())
        .await
        .unwrap();
    assert!(
        ids("released").await.is_empty(),
        "the pruning node deletes them"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_releases_from_two_nodes_count_exactly() {
    let Some(db) = TestDb::new("releases").await else {
        return;
    };
    let a = db.storage("rel-a").await;
    let b = db.storage("rel-b").await;
    a.upsert_pool(Pool::new("batch")).await.unwrap();
    let proxies = (0..8)
        .map(|i| {
            Proxy::new(
                format!("b{i}"),
                "batch",
                ProxyProtocol::Http,
                "10.1.2.1",
                9000 + i,
            )
            .with_max_concurrency(Some(8))
        })
        .collect();
    a.upsert_proxies(proxies).await.unwrap();
    // The two nodes take turns, so every proxy carries leases of both; then the pool is full.
    let (ma, mb) = (ProxyManager::new(a.clone()), ProxyManager::new(b.clone()));
    let (mut of_a, mut of_b) = (Vec::new(), Vec::new());
    for _ in 0..32 {
        let req = AcquireRequest::new("batch").selector(pharox::Selector::RoundRobin);
        of_a.push(ma.acquire_proxy(&req).await.unwrap().expect("room"));
        of_b.push(mb.acquire_proxy(&req).await.unwrap().expect("room"));
    }
    let req = AcquireRequest::new("batch");
    assert!(ma.acquire_proxy(&req).await.unwrap().is_none(), "full");
    let sql = db.sql().await;
    assert_eq!(pgsupport::snapshot(&sql).await, (0, 0, 64, 64));

    // Every lease released at once from both nodes, and A's first lease twice.
    let mut set = tokio::task::JoinSet::new();
    for (m, lease) in of_a
        .iter()
        .map(|l| (&ma, l))
        .chain(of_b.iter().map(|l| (&mb, l)))
    {
        let (m, lease) = (m.clone(), lease.clone());
        set.spawn(async move { (lease.id, m.release_proxy(&lease).await.unwrap()) });
    }
    let (m, first) = (ma.clone(), of_a[0].clone());
    set.spawn(async move { (first.id, m.release_proxy(&first).await.unwrap()) });
    let mut released = std::collections::HashMap::new();
    while let Some(done) = set.join_next().await {
        let (id, freed) = done.unwrap();
        *released.entry(id).or_insert(0) += usize::from(freed);
    }
    assert_eq!(released.len(), 64);
    assert!(
        released.values().all(|&n| n == 1),
        "each lease once: {released:?}"
    );
    assert_eq!(pgsupport::snapshot(&sql).await, (0, 0, 0, 0));
    let reasons: Vec<(String, i64)> = sql
        .query(
            "SELECT release_reason, count(*) FROM lease GROUP BY 1 ORDER BY 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(reasons, vec![("released".to_string(), 64)]);
    // Released again: not live, nothing changes; the pool has all its room back.
    for lease in &of_a {
        assert!(!ma.release_proxy(lease).await.unwrap());
    }
    assert_eq!(pgsupport::snapshot(&sql).await, (0, 0, 0, 0));
    for _ in 0..64 {
        assert!(mb.acquire_proxy(&req).await.unwrap().is_some());
    }
    a.close().await;
    b.close().await;
}

/// The text of one statement of the backend's `statements.sql` (from `-- name: NAME` to its
/// closing `;`), as the backend prepares it.
fn shipped_statement(name: &str) -> String {
    let all = include_str!("../src/storage/postgres/statements.sql");
    let start = all
        .find(&format!("-- name: {name}\n"))
        .unwrap_or_else(|| panic!("{name} is in statements.sql"));
    let body = &all[start..];
    let body = &body[body.find('\n').unwrap() + 1..];
    let end = body.find(";\n").unwrap();
    body[..=end].to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_finds_its_lease_by_key_whatever_the_statistics_said() {
    let Some(db) = TestDb::new("release_plan").await else {
        return;
    };
    let s = db.storage("planner").await;
    s.upsert_pool(Pool::new("plan")).await.unwrap();
    let one = Proxy::new("p1", "plan", ProxyProtocol::Http, "10.1.3.1", 8080);
    s.upsert_proxies(vec![one]).await.unwrap();
    let m = ProxyManager::new(s.clone());
    let lease = m
        .acquire_proxy(&AcquireRequest::new("plan"))
        .await
        .unwrap()
        .unwrap();
    m.release_proxy(&lease).await.unwrap();
    // A history of released leases, statistics taken while none is live (the partial
    // indexes nearly empty), and the plan a connection would keep for its life.
    let sql = db.sql().await;
    sql.batch_execute(
        "INSERT INTO lease (id, proxy_id, pool_id, consumer_id, pool_name, status,
                            acquired_at, expires_at, released_at, holder, release_reason)
         SELECT gen_random_uuid(), proxy_id, pool_id, consumer_id, pool_name, status,
                acquired_at, expires_at, released_at, holder, release_reason
         FROM lease, generate_series(1, 20000);
         ANALYZE lease;
         SET plan_cache_mode = force_generic_plan",
    )
    .await
    .unwrap();
    let text = shipped_statement("release");
    sql.batch_execute(&format!(
        "PREPARE release_probe(uuid, text) AS {}",
        text.trim_end_matches(';')
    ))
    .await
    .unwrap();
    let explain = "EXPLAIN (FORMAT JSON) EXECUTE \
                   release_probe('00000000-0000-0000-0000-000000000000', 'released')";
    let plan: serde_json::Value = sql.query_one(explain, &[]).await.unwrap().get(0);
    let plan = plan.to_string();
    assert!(plan.contains("\"lease_pkey\""), "{plan}");
    assert!(!plan.contains("lease_active_"), "no partial index: {plan}");
}

/// Two nodes creating the same consumers and pools at the same moment (the same names, so
/// the same v5 ids) both get the one row: no unique violation, one id per name, which both
/// nodes then use.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_creators_of_one_consumer_and_pool_agree() {
    let Some(db) = TestDb::new("creators").await else {
        return;
    };
    let nodes = [db.storage("make-a").await, db.storage("make-b").await];
    nodes[0].upsert_pool(Pool::new("shared")).await.unwrap();
    let proxy = Proxy::new("m1", "shared", ProxyProtocol::Http, "10.1.3.1", 8000);
    nodes[0].upsert_proxies(vec![proxy]).await.unwrap();
    const ROUNDS: usize = 40;
    const PER_NODE: usize = 4;
    for round in 0..ROUNDS {
        let mut set = tokio::task::JoinSet::new();
        for node in &nodes {
            for _ in 0..PER_NODE {
                let (n, consumer) = (node.clone(), format!("maker-{round}"));
                set.spawn(async move {
                    let req = AcquireRequest::new("shared").consumer(consumer.as_str());
                    let now = std::time::SystemTime::now();
                    // Eight acquirers on one proxy may miss (it stays row-locked by another
                    // through every attempt): the consumer was resolved all the same.
                    match n.acquire(&req, now).await?.lease {
                        Some(lease) => n.release(&lease, now).await.map(|_| ()),
                        None => Ok(()),
                    }
                });
                let (n, pool) = (node.clone(), format!("made-{round}"));
                set.spawn(async move { n.upsert_pool(Pool::new(pool)).await });
            }
        }
        while let Some(r) = set.join_next().await {
            r.unwrap().unwrap_or_else(|e| panic!("round {round}: {e}"));
        }
    }
    let sql = db.sql().await;
    let count = |table: &'static str, prefix: &'static str| {
        let sql = &sql;
        async move {
            let q = format!(
                "SELECT count(*), count(DISTINCT name) FROM {table} WHERE name LIKE '{prefix}%'"
            );
            let row = sql.query_one(q.as_str(), &[]).await.unwrap();
            (row.get::<_, i64>(0), row.get::<_, i64>(1))
        }
    };
    let n = ROUNDS as i64;
    assert_eq!(
        count("consumer", "maker-").await,
        (n, n),
        "one row per consumer"
    );
    assert_eq!(
        count("proxy_pool", "made-").await,
        (n, n),
        "one row per pool"
    );
    assert_eq!(pgsupport::snapshot(&sql).await, (0, 0, 0, 0));
}
