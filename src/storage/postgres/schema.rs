//! The schema: running `migrate.sql`, checking that every table and column the backend uses
//! is there, and [`CheckReport`] (`pharox check --connect`).

use std::fmt;
use std::time::Duration;

use tokio_postgres::{Client, Row};
use uuid::Uuid;

use super::conn::{TlsMode, conn_spec};
use super::error::{PgError, Scrub};
use super::listen::Session;
use super::{PgSettings, sql};

/// The tables and columns the backend reads or writes: pharox 0.11's, plus the migration's.
const REQUIRED: &[(&str, &[&str])] = &[
    ("consumer", &["id", "name", "created_at"]),
    (
        "proxy_pool",
        &["id", "name", "description", "created_at", "lease_slow"],
    ),
    (
        "pool_selector_state",
        &[
            "pool_id",
            "strategy",
            "last_proxy_id",
            "created_at",
            "updated_at",
        ],
    ),
    (
        "proxy",
        &[
            "id",
            "pool_id",
            "host",
            "port",
            "protocol",
            "status",
            "credentials",
            "source",
            "country",
            "city",
            "latitude",
            "longitude",
            "isp",
            "asn",
            "max_concurrency",
            "current_leases",
            "checked_at",
            "created_at",
            "latency_us",
            "rest_until",
            "owner",
            "scheme",
            "removed_at",
        ],
    ),
    (
        "lease",
        &[
            "id",
            "proxy_id",
            "pool_id",
            "consumer_id",
            "pool_name",
            "status",
            "acquired_at",
            "expires_at",
            "released_at",
            "holder",
            "release_reason",
        ],
    ),
    (
        "proxy_health_record",
        &[
            "id",
            "proxy_id",
            "checked_at",
            "reachable",
            "latency_ms",
            "protocol",
            "status_before",
            "status_after",
            "error",
        ],
    ),
    (
        "pharox_node",
        &[
            "node_id",
            "backend_pid",
            "hostname",
            "version",
            "started_at",
            "heartbeat_at",
        ],
    ),
    (
        "pharox_schema_migrations",
        &["version", "applied_at", "description"],
    ),
];

/// Runs `migrate.sql` (one transaction, serialised across daemons by an advisory lock) with
/// a long statement and lock timeout for this session only.
pub(crate) async fn migrate(client: &Client, scrub: &Scrub) -> Result<(), PgError> {
    let text = format!(
        "SET lock_timeout = '30s'; SET statement_timeout = '130s';\n{}\n\
         RESET lock_timeout; RESET statement_timeout;",
        sql::MIGRATE
    );
    match tokio::time::timeout(Duration::from_secs(140), client.batch_execute(&text)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(PgError::Migrate(scrub.db_error(&e))),
        Err(_) => Err(PgError::Migrate("no answer within 140 s".into())),
    }
}

/// What the schema lacks: `table X` or `column X.Y`, in [`REQUIRED`] order.
pub(crate) async fn missing(client: &Client, scrub: &Scrub) -> Result<Vec<String>, PgError> {
    let (tables, columns): (Vec<&str>, Vec<&str>) = REQUIRED
        .iter()
        .flat_map(|(t, cols)| cols.iter().map(move |c| (*t, *c)))
        .unzip();
    let rows = client
        .query(sql::stmt("schema_missing"), &[&tables, &columns])
        .await
        .map_err(|e| statement(scrub, &e))?;
    let mut out: Vec<String> = Vec::new();
    for row in &rows {
        let tab: &str = row.get("tab");
        let what = if row.get::<_, bool>("table_missing") {
            format!("table {tab}")
        } else {
            format!("column {tab}.{}", row.get::<_, &str>("col"))
        };
        if !out.contains(&what) {
            out.push(what);
        }
    }
    Ok(out)
}

/// Fails with [`PgError::Schema`] when anything is missing.
pub(crate) async fn require(client: &Client, scrub: &Scrub) -> Result<(), PgError> {
    let missing = missing(client, scrub).await?;
    if missing.is_empty() {
        Ok(())
    } else {
        Err(PgError::Schema(missing))
    }
}

fn statement(scrub: &Scrub, e: &tokio_postgres::Error) -> PgError {
    PgError::Statement {
        op: "check",
        reason: scrub.db_error(e),
    }
}

/// A proxy whose counter disagrees with its live lease rows, or exceeds its cap.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CounterDrift {
    /// The proxy.
    pub proxy_id: Uuid,
    /// Its `current_leases`.
    pub current_leases: i32,
    /// Its cap.
    pub max_concurrency: Option<i32>,
    /// Its `active` lease rows.
    pub active_rows: i64,
}

/// One endpoint stored more than once in a pool (the rows do not share a cap).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Duplicate {
    /// The pool.
    pub pool: String,
    /// Host and port of the endpoint.
    pub host: String,
    /// Port.
    pub port: i32,
    /// The rows' ids, oldest first.
    pub ids: Vec<Uuid>,
}

/// Reads `audit_counters` rows.
pub(crate) fn drifts(rows: &[Row], scrub: &Scrub) -> Result<Vec<CounterDrift>, PgError> {
    rows.iter()
        .map(|r| {
            Ok(CounterDrift {
                proxy_id: r.try_get("proxy_id")?,
                current_leases: r.try_get("current_leases")?,
                max_concurrency: r.try_get("max_concurrency")?,
                active_rows: r.try_get("active_rows")?,
            })
        })
        .collect::<Result<_, tokio_postgres::Error>>()
        .map_err(|e| statement(scrub, &e))
}

/// What `pharox check --connect` found.
#[derive(Clone, Debug)]
pub struct CheckReport {
    /// The URL, masked.
    pub url: String,
    /// `sslmode` as configured.
    pub tls_mode: TlsMode,
    /// Whether the check's session is encrypted.
    pub encrypted: bool,
    /// The server's `server_version`.
    pub server_version: String,
    /// Tables and columns missing (`migrate = true` creates them).
    pub missing: Vec<String>,
    /// The highest applied fleet migration (`None`: never migrated).
    pub migration_version: Option<i32>,
    /// Endpoints stored twice in a pool.
    pub duplicates: Vec<Duplicate>,
    /// Counters that disagree with their lease rows (should never happen).
    pub drift: Vec<CounterDrift>,
    /// The node id checked.
    pub node_id: String,
    /// Who holds the node id right now (`None`: free; a daemon with it can start).
    pub node_holder: Option<String>,
}

impl CheckReport {
    /// True when every table and column the backend uses is there (a daemon with
    /// `migrate = false` can start; with `migrate = true` the migration adds what lacks).
    pub fn schema_ok(&self) -> bool {
        self.missing.is_empty()
    }
}

impl fmt::Display for CheckReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "database: {} (PostgreSQL {})",
            self.url, self.server_version
        )?;
        let enc = if self.encrypted {
            "encrypted"
        } else {
            "not encrypted"
        };
        writeln!(
            f,
            "  tls: sslmode={}, session {enc}",
            self.tls_mode.as_str()
        )?;
        match self.migration_version {
            Some(v) => writeln!(f, "  migration: version {v}")?,
            None => writeln!(f, "  migration: not applied")?,
        }
        if self.missing.is_empty() {
            writeln!(f, "  schema: complete")?;
        } else {
            writeln!(
                f,
                "  schema: missing {} (start with migrate = true)",
                self.missing.join(", ")
            )?;
        }
        for d in &self.duplicates {
            let ids: Vec<String> = d.ids.iter().map(Uuid::to_string).collect();
            writeln!(
                f,
                "  warning: {}:{} is stored {} times in pool {} (caps not shared): {}",
                d.host,
                d.port,
                d.ids.len(),
                d.pool,
                ids.join(", ")
            )?;
        }
        for d in &self.drift {
            writeln!(
                f,
                "  error: proxy {} counts {} leases (cap {:?}) but has {} live lease rows",
                d.proxy_id, d.current_leases, d.max_concurrency, d.active_rows
            )?;
        }
        match &self.node_holder {
            Some(h) => write!(
                f,
                "  node id {}: held by a live session ({h})",
                self.node_id
            ),
            None => write!(f, "  node id {}: free", self.node_id),
        }
    }
}

/// Connects with the settings (no node lock, nothing written) and reports.
pub(crate) async fn check(s: &PgSettings) -> Result<CheckReport, PgError> {
    let spec = conn_spec(s, None)?;
    let session = Session::open(&spec, s.statement_timeout).await?;
    let client = session.client();
    let scrub = &spec.scrub;
    let q = |name: &'static str| client.query(sql::stmt(name), &[]);
    let info = q("server_info").await.map_err(|e| statement(scrub, &e))?;
    let (server_version, encrypted) = info
        .first()
        .map(|r| (r.get::<_, String>("version"), r.get::<_, bool>("ssl")))
        .unwrap_or_default();
    let missing = missing(client, scrub).await?;
    let migration_version = migration_version(client, scrub).await?;
    let (mut duplicates, mut drift) = (Vec::new(), Vec::new());
    if missing.is_empty() {
        duplicates = inventory_duplicates(client, scrub).await?;
        let none: Option<&str> = None;
        let rows = client
            .query(sql::stmt("audit_counters"), &[&none])
            .await
            .map_err(|e| statement(scrub, &e))?;
        drift = drifts(&rows, scrub)?;
    }
    let node = s.node_id.as_str();
    let held = client
        .query(sql::stmt("node_holder"), &[&node])
        .await
        .map_err(|e| statement(scrub, &e))?;
    let node_holder = if held.is_empty() {
        None
    } else {
        Some(session.holder(node).await)
    };
    Ok(CheckReport {
        url: spec.masked.clone(),
        tls_mode: spec.tls_mode,
        encrypted,
        server_version,
        missing,
        migration_version,
        duplicates,
        drift,
        node_id: s.node_id.clone(),
        node_holder,
    })
}

async fn migration_version(client: &Client, scrub: &Scrub) -> Result<Option<i32>, PgError> {
    let present = client
        .query(sql::stmt("migrations_table"), &[])
        .await
        .map_err(|e| statement(scrub, &e))?;
    if !present.first().is_some_and(|r| r.get::<_, bool>("present")) {
        return Ok(None);
    }
    let rows = client
        .query(sql::stmt("migration_version"), &[])
        .await
        .map_err(|e| statement(scrub, &e))?;
    Ok(rows
        .first()
        .and_then(|r| r.get::<_, Option<i32>>("version")))
}

async fn inventory_duplicates(client: &Client, scrub: &Scrub) -> Result<Vec<Duplicate>, PgError> {
    let none: Option<&str> = None;
    let rows = client
        .query(sql::stmt("inventory_duplicates"), &[&none])
        .await
        .map_err(|e| statement(scrub, &e))?;
    rows.iter()
        .map(|r| {
            Ok(Duplicate {
                pool: r.try_get("pool_name")?,
                host: r.try_get("host")?,
                port: r.try_get("port")?,
                ids: r.try_get("ids")?,
            })
        })
        .collect::<Result<_, tokio_postgres::Error>>()
        .map_err(|e| statement(scrub, &e))
}
