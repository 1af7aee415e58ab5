//! PostgreSQL test support: the server named by `TEST_PHAROX_PG`, one fresh database per
//! test (dropped when the test ends, so tests run in parallel and leave nothing behind), raw
//! SQL access, and the Python venv of `TEST_PHAROX_VENV`.
//!
//! Without `TEST_PHAROX_PG` a test prints a notice and passes, except when `CI=true`: then it
//! fails, since no PostgreSQL test may be skipped in CI. Same rule for `TEST_PHAROX_VENV`.
//! Start a server with `export TEST_PHAROX_PG=$(scripts/pg-cluster.sh start)`.
#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use pharox::storage::postgres::{PgSettings, PostgresStorage};
use tokio_postgres::NoTls;

fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}

/// The value of `var`, or `None` after a notice (a panic in CI).
fn required(var: &str, what: &str) -> Option<String> {
    match std::env::var(var) {
        Ok(v) if !v.is_empty() => Some(v),
        _ if in_ci() => panic!("{var} is not set but CI=true: {what} tests must not be skipped"),
        _ => {
            eprintln!("note: {var} is not set; skipping this {what} test");
            None
        }
    }
}

/// The server URL (`TEST_PHAROX_PG`).
pub fn admin_url() -> Option<String> {
    required("TEST_PHAROX_PG", "PostgreSQL")
}

/// The Python interpreter of the pharox 0.11 venv (`TEST_PHAROX_VENV`).
pub fn python() -> Option<PathBuf> {
    let venv = required("TEST_PHAROX_VENV", "Python pharox")?;
    let py = PathBuf::from(venv).join("bin/python");
    assert!(
        py.exists(),
        "TEST_PHAROX_VENV has no bin/python: {}",
        py.display()
    );
    Some(py)
}

/// `url` with its database replaced by `db`.
pub fn with_database(url: &str, db: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let scheme_end = base.find("://").map_or(0, |i| i + 3);
    let base = match base[scheme_end..].find('/') {
        Some(i) => &base[..scheme_end + i],
        None => base,
    };
    match query {
        Some(q) => format!("{base}/{db}?{q}"),
        None => format!("{base}/{db}"),
    }
}

/// A raw connection (no TLS) for SQL the tests run by hand.
pub async fn raw(url: &str) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(url, NoTls)
        .await
        .unwrap_or_else(|e| panic!("cannot connect to the test server: {e}"));
    tokio::spawn(async move {
        let _ = conn.await;
    });
    client
}

static SEQ: AtomicUsize = AtomicUsize::new(0);

/// A database of its own for one test, dropped (with its connections) at the end.
pub struct TestDb {
    pub name: String,
    pub url: String,
    admin: String,
}

impl TestDb {
    /// Creates the database; `None` when no server is configured (outside CI).
    pub async fn new(tag: &str) -> Option<TestDb> {
        let admin = admin_url()?;
        let tag: String = tag
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() {
                    c.to_ascii_lowercase()
                } else {
                    '_'
                }
            })
            .take(32)
            .collect();
        let n = SEQ.fetch_add(1, Ordering::SeqCst);
        let name = format!("pharox_t_{tag}_{}_{n}", std::process::id());
        raw(&admin)
            .await
            .batch_execute(&format!("CREATE DATABASE \"{name}\""))
            .await
            .unwrap_or_else(|e| panic!("CREATE DATABASE {name}: {e}"));
        Some(TestDb {
            url: with_database(&admin, &name),
            name,
            admin,
        })
    }

    /// Settings for a storage on this database: 4 connections, 5 s statement timeout (the
    /// test machine is shared), migrate on.
    pub fn settings(&self, node: &str) -> PgSettings {
        let mut s = PgSettings::new(self.url.clone(), node);
        s.pool_size = 4;
        s.statement_timeout = Duration::from_secs(5);
        s
    }

    /// A connected storage with node id `node`.
    pub async fn storage(&self, node: &str) -> PostgresStorage {
        PostgresStorage::connect(self.settings(node))
            .await
            .unwrap_or_else(|e| panic!("connect {node}: {e}"))
    }

    /// A raw connection to this database.
    pub async fn sql(&self) -> tokio_postgres::Client {
        raw(&self.url).await
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let (admin, name) = (self.admin.clone(), self.name.clone());
        let dropped = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async {
                raw(&admin)
                    .await
                    .batch_execute(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
                    .await
            })
        })
        .join();
        if let Ok(Err(e)) = dropped {
            eprintln!("note: could not drop test database {}: {e}", self.name);
        }
    }
}

/// Polls `check` every 50 ms until it returns `Some`, for at most `within`.
pub async fn eventually<T, F, Fut>(within: Duration, mut check: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if let Some(v) = check().await {
            return Some(v);
        }
        if tokio::time::Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A throwaway cluster of the test's own (`scripts/pg-cluster.sh` with a private state
/// file), for tests that stop the server or configure it: stopped and removed on drop.
pub struct OwnCluster {
    state: PathBuf,
    pub url: String,
}

impl OwnCluster {
    /// Starts one with extra server options; `None` (skip) when `TEST_PHAROX_PG` is unset,
    /// the marker of an environment with PostgreSQL (outside CI).
    pub fn start(tag: &str, server_opts: &str) -> Option<OwnCluster> {
        admin_url()?;
        let state =
            std::env::temp_dir().join(format!("pharox-pg-{tag}-{}.state", std::process::id()));
        let out = Self::script(&state, server_opts, &["start"]);
        let url = String::from_utf8(out).unwrap().trim().to_owned();
        Some(OwnCluster { state, url })
    }

    fn script(state: &std::path::Path, opts: &str, args: &[&str]) -> Vec<u8> {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/pg-cluster.sh");
        let out = std::process::Command::new("bash")
            .arg(script)
            .args(args)
            .env("PG_CLUSTER_STATE", state)
            .env("PG_CLUSTER_OPTS", opts)
            .env("PG_CLUSTER_MAX_CONNECTIONS", "100")
            .output()
            .expect("bash runs");
        assert!(
            out.status.success(),
            "pg-cluster.sh {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    }

    /// Stops the server, keeping its data (`immediate`: a crash).
    pub fn pgstop(&self) {
        Self::script(&self.state, "", &["pgstop", "immediate"]);
    }

    /// Starts the same data again on the same port.
    pub fn pgstart(&self, server_opts: &str) {
        Self::script(&self.state, server_opts, &["pgstart"]);
    }
}

impl Drop for OwnCluster {
    fn drop(&mut self) {
        Self::script(&self.state, "", &["stop"]);
    }
}

/// One snapshot of the shared state: proxies over their cap, proxies whose counter
/// disagrees with their active lease rows, active lease rows, and the sum of the counters.
pub async fn snapshot(sql: &tokio_postgres::Client) -> (i64, i64, i64, i64) {
    let row = sql
        .query_one(
            "SELECT (SELECT count(*) FROM proxy WHERE max_concurrency IS NOT NULL
                        AND current_leases > max_concurrency) AS over,
                    (SELECT count(*) FROM proxy p LEFT JOIN
                        (SELECT proxy_id, count(*) AS n FROM lease WHERE status = 'active'
                         GROUP BY proxy_id) a ON a.proxy_id = p.id
                     WHERE p.current_leases <> coalesce(a.n, 0)) AS drift,
                    (SELECT count(*) FROM lease WHERE status = 'active') AS live,
                    (SELECT coalesce(sum(current_leases), 0)::bigint FROM proxy) AS counted",
            &[],
        )
        .await
        .unwrap();
    (
        row.get("over"),
        row.get("drift"),
        row.get("live"),
        row.get("counted"),
    )
}

/// Runs `tests/py/SCRIPT ARGS` in the venv; the JSON object of its last stdout line.
pub async fn run_script(py: &std::path::Path, script: &str, args: &[&str]) -> serde_json::Value {
    let path = format!("{}/tests/py/{script}", env!("CARGO_MANIFEST_DIR"));
    let out = tokio::process::Command::new(py)
        .arg(&path)
        .args(args)
        .kill_on_drop(true)
        .output()
        .await
        .expect("python runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{script} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(stdout.lines().last().unwrap_or("{}"))
        .unwrap_or_else(|e| panic!("{script} prints JSON ({e}): {stdout}"))
}

/// Polls [`snapshot`] (up to 30 s) until nothing is leased and every counter is 0; the last
/// snapshot otherwise.
pub async fn settles_to_zero(sql: &tokio_postgres::Client) -> Result<(), (i64, i64, i64, i64)> {
    let zero = eventually(Duration::from_secs(30), || async {
        (snapshot(sql).await == (0, 0, 0, 0)).then_some(())
    })
    .await;
    match zero {
        Some(()) => Ok(()),
        None => Err(snapshot(sql).await),
    }
}
