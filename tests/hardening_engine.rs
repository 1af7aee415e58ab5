//! Issue 10, item 7: durations the engine cannot represent are refused before anything
//! changes (acquire, renewal, a clock at the end of time), and configuration validation
//! bounds every duration, naming the key.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use common::{RecordingSleeper, leased, manager_with, proxy};
use pharox::config::Config;
use pharox::retry::Clock;
use pharox::storage::{MAX_LEASE_DURATION, Renewal};
use pharox::{
    AcquireRequest, InMemoryStorage, LeaseError, Pool, ProxyManager, RetryPolicy, Storage,
};

const HUGE: [Duration; 4] = [
    Duration::MAX,
    Duration::from_secs(u64::MAX),
    Duration::from_secs(i64::MAX as u64),
    Duration::ZERO,
];

fn invalid<T: std::fmt::Debug>(r: Result<T, LeaseError>, what: &str) {
    assert!(
        matches!(r, Err(LeaseError::InvalidDuration)),
        "{what}: {r:?}"
    );
}

/// Fails on the bug: `now + duration` panicked after the proxy's lease count was raised,
/// so the slot leaked for good (the boundary acquire below would then miss).
#[tokio::test(start_paused = true)]
async fn acquire_refuses_unrepresentable_durations_and_takes_nothing() {
    let m = manager_with("p", vec![proxy("p", "a").with_max_concurrency(Some(1))]).await;
    let over = MAX_LEASE_DURATION + Duration::from_secs(1);
    for d in HUGE.into_iter().chain([over]) {
        let req = AcquireRequest::new("p").duration(d);
        invalid(m.acquire_proxy(&req).await, &format!("acquire {d:?}"));
        invalid(
            m.acquire_proxy_with_retry(&req, &RetryPolicy::once()).await,
            &format!("acquire with retry {d:?}"),
        );
        invalid(
            m.lease(&req).await.map(|g| g.map(|g| g.id)),
            &format!("lease {d:?}"),
        );
        let stats = m.storage().pool_stats("p").await.unwrap().unwrap();
        assert_eq!(
            (stats.total_leases, stats.leased),
            (0, 0),
            "{d:?}: {stats:?}"
        );
        let info = m.storage().get_proxy(&"a".into()).await.unwrap().unwrap();
        assert_eq!(info.current_leases, 0, "{d:?}");
    }
    // The longest lease allowed works, and the only slot is still there to take.
    let lease = m
        .acquire_proxy(&AcquireRequest::new("p").duration(MAX_LEASE_DURATION))
        .await
        .unwrap()
        .expect("the slot did not leak");
    assert!(lease.expires_at > lease.acquired_at);
    m.release_proxy(&lease).await.unwrap();
    assert_eq!(leased(&m, "p").await, 0);
}

/// Fails on the bug: a huge renewal panicked, or renewed the valid leases of a batch before
/// failing on the bad one.
#[tokio::test(start_paused = true)]
async fn renewal_refuses_huge_durations_and_changes_nothing() {
    let m = manager_with("p", vec![proxy("p", "a"), proxy("p", "b")]).await;
    let req = AcquireRequest::new("p").duration(Duration::from_secs(10));
    let l1 = m.acquire_proxy(&req).await.unwrap().unwrap();
    let l2 = m.acquire_proxy(&req).await.unwrap().unwrap();
    let expiry = |id| {
        let m = m.clone();
        async move {
            m.storage()
                .get_lease(id)
                .await
                .unwrap()
                .map(|l| l.expires_at)
        }
    };
    let (e1, e2) = (expiry(l1.id).await, expiry(l2.id).await);
    for d in HUGE {
        invalid(m.renew(&l1, d).await, &format!("renew {d:?}"));
        let batch = [
            Renewal {
                id: l1.id,
                pool: "p".into(),
                duration: Duration::from_secs(600),
            },
            Renewal {
                id: l2.id,
                pool: "p".into(),
                duration: d,
            },
        ];
        invalid(m.renew_many(&batch).await, &format!("batch with {d:?}"));
        assert_eq!(expiry(l1.id).await, e1, "a failed batch renewed nothing");
        assert_eq!(expiry(l2.id).await, e2);
    }
    let mut guard = m.guard(l1.clone());
    invalid(guard.renew(Duration::MAX).await, "guard renew");
    let _ = guard.into_lease(); // l1 stays live, as the storage holds it
    // Nothing was extended: both leases expire at their original time.
    tokio::time::advance(Duration::from_secs(11)).await;
    assert_eq!(m.cleanup_expired_leases().await.unwrap(), 2);
    assert_eq!(leased(&m, "p").await, 0);
}

/// A clock at the very end of representable time.
struct EndOfTime;

impl Clock for EndOfTime {
    fn now(&self) -> SystemTime {
        SystemTime::UNIX_EPOCH
            .checked_add(Duration::from_secs(i64::MAX as u64 - 60))
            .unwrap_or_else(|| SystemTime::UNIX_EPOCH + Duration::from_secs(u32::MAX as u64))
    }
}

/// Fails on the bug: `now + duration` overflowed (a panic) instead of being checked.
#[tokio::test]
async fn a_clock_at_the_end_of_time_fails_cleanly() {
    let m = ProxyManager::with_time(
        InMemoryStorage::new(),
        Arc::new(EndOfTime),
        Arc::new(RecordingSleeper::default()),
    );
    m.storage().upsert_pool(Pool::new("p")).await.unwrap();
    m.storage()
        .upsert_proxy(proxy("p", "a").with_max_concurrency(Some(1)))
        .await
        .unwrap();
    if EndOfTime
        .now()
        .checked_add(Duration::from_secs(300))
        .is_some()
    {
        return; // this platform's SystemTime reaches further; nothing to overflow
    }
    invalid(
        m.acquire_proxy(&AcquireRequest::new("p")).await,
        "acquire at the end of time",
    );
    invalid(
        m.acquire_proxy_with_retry(&AcquireRequest::new("p"), &RetryPolicy::once())
            .await,
        "acquire with retry at the end of time",
    );
    assert_eq!(m.cleanup_expired_leases().await.unwrap(), 0);
    assert_eq!(leased(&m, "p").await, 0);
    let info = m.storage().get_proxy(&"a".into()).await.unwrap().unwrap();
    assert_eq!(info.current_leases, 0);
}

const BASE: &str = r#"
[[consumers]]
name = "w"
password = "x"
[[pools]]
name = "p"
[[pools.proxies]]
url = "direct"
"#;

const BIG: &str = "9223372036854775807";

/// Inserts `line` into the table `table` of BASE (created if missing).
fn with(table: &str, line: &str) -> String {
    match table {
        "" => format!("{line}\n{BASE}"),
        "limits" => format!("[limits]\n{line}\n{BASE}"),
        "pools" => BASE.replace("name = \"p\"\n", &format!("name = \"p\"\n{line}\n")),
        sub => format!("{BASE}[pools.{sub}]\n{line}\n"),
    }
}

/// BASE with a `[storage]` table of kind postgres holding `line` (and no `direct` upstream:
/// a fleet shares none).
fn with_postgres(line: &str) -> String {
    with(
        "",
        &format!("[storage]\nkind = \"postgres\"\nurl = \"postgres://u@127.0.0.1/db\"\n{line}"),
    )
    .replace("url = \"direct\"", "url = \"http://10.0.0.1:8080\"")
}

/// Fails on the bug: these parsed and validated, then panicked at the first connection (or
/// made every lease request fail, for a lease longer than the engine accepts).
#[test]
fn configuration_bounds_every_duration_and_names_the_key() {
    let health_check = "target = \"example.com:443\"";
    let cases: Vec<(String, &str)> = vec![
        (
            with("pools", &format!("lease_seconds = {BIG}")),
            "lease_seconds",
        ),
        (
            with(
                "pools",
                &format!("lease_seconds = {}", MAX_LEASE_DURATION.as_secs() + 1),
            ),
            "lease_seconds",
        ),
        (
            with(
                "pools",
                &format!("session_ttl_seconds = {BIG}\nsession_max_ttl_seconds = {BIG}"),
            ),
            "session_",
        ),
        (
            with("pools", &format!("session_max_ttl_seconds = {BIG}")),
            "session_max_ttl_seconds",
        ),
        (
            with("health", &format!("cooldown_seconds = {BIG}")),
            "cooldown_seconds",
        ),
        (with("retry", &format!("backoff_ms = {BIG}")), "backoff_ms"),
        (
            with("retry", &format!("max_backoff_ms = {BIG}")),
            "max_backoff_ms",
        ),
        (
            with("limits", &format!("head_timeout_ms = {BIG}")),
            "head_timeout_ms",
        ),
        (
            with("limits", &format!("connect_timeout_ms = {BIG}")),
            "connect_timeout_ms",
        ),
        (
            with("limits", &format!("idle_timeout_secs = {BIG}")),
            "idle_timeout_secs",
        ),
        (
            with("limits", &format!("drain_timeout_secs = {BIG}")),
            "drain_timeout_secs",
        ),
        (
            with("limits", &format!("response_timeout_ms = {BIG}")),
            "response_timeout_ms",
        ),
        (
            with_postgres(&format!("statement_timeout_ms = {BIG}")),
            "statement_timeout_ms",
        ),
        (
            with_postgres(&format!("keep_released_hours = {BIG}")),
            "keep_released_hours",
        ),
        (
            with(
                "",
                &format!(
                    "[[api.keys]]\nname = \"farm\"\nkey = \"0123456789abcdef\"\n\
                     max_ttl_seconds = {BIG}"
                ),
            ),
            "max_ttl_seconds",
        ),
        (
            with(
                "health_check",
                &format!("{health_check}\ninterval_secs = {BIG}"),
            ),
            "interval_secs",
        ),
        (
            with(
                "health_check",
                &format!("{health_check}\ntimeout_ms = {BIG}"),
            ),
            "timeout_ms",
        ),
        (
            with(
                "health_check",
                &format!("{health_check}\nslow_threshold_ms = {BIG}"),
            ),
            "slow_threshold_ms",
        ),
    ];
    let mut accepted = Vec::new();
    for (toml, key) in &cases {
        match Config::from_toml_str(toml, Path::new("."), &|_| None) {
            Ok(_) => accepted.push(*key),
            Err(e) => assert!(e.to_string().contains(key), "{key}: {e}"),
        }
    }
    assert!(
        accepted.is_empty(),
        "accepted unbounded durations: {accepted:?}"
    );
    // The shape of each case is right: with sane values every one of them is valid.
    for (toml, key) in &cases {
        let sane = toml
            .replace(BIG, "3600")
            .replace(&(MAX_LEASE_DURATION.as_secs() + 1).to_string(), "3600");
        Config::from_toml_str(&sane, Path::new("."), &|_| None)
            .unwrap_or_else(|e| panic!("{key} with a sane value: {e}"));
    }
}
