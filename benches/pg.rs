//! PostgreSQL lease engine benchmark (`harness = false`): acquire + release pairs per second
//! and acquire latency through `ProxyManager<PostgresStorage>`, for 1 and 4 daemons (each an
//! OS process of its own: this binary re-executed with `--worker`, its own manager and node
//! id), pools of 10 / 1 000 / 10 000 proxies with `max_concurrency` 1 and unlimited, and the
//! selectors first_available / least_used / round_robin. Over-leases are counted twice: a
//! monitor samples `current_leases > max_concurrency` during each run, and the audit
//! statement (counter = live lease rows) runs after it; both must stay 0. CPU per pair: the
//! worker processes' own (client), and the server's (the postmaster's children, live and
//! reaped, read from /proc: only when the server runs on this machine).
//!
//! Each (daemons, pool, cap) group ends with a `floor` row: the same worker processes,
//! connections and loops, running the smallest statements a lease can cost on this schema
//! (one transaction bumping the first unlocked proxy below its cap and inserting the lease
//! row, one marking it released and decrementing the counter: no selector, filter, pool
//! lookup, health or rest test, cursor or returned proxy row). Its server µs/pair is the
//! floor the selector rows stand on, measured in the same run (`--no-floor` leaves it out).
//!
//! ```sh
//! export TEST_PHAROX_PG=$(scripts/pg-cluster.sh start)
//! cargo bench --bench pg                      # or: cargo bench --bench pg -- --url URL
//! cargo bench --bench pg -- --secs 2 --sizes 10,1000 --instances 1
//! cargo bench --bench pg -- --instances 1 --tasks 1   # uncontended latency: one loop
//! ```
//! The benchmark works in a database of its own (`pharox_bench_PID`), dropped at the end
//! (`--keep` leaves it, to look at plans with `EXPLAIN` or replay a statement in pgbench).

use std::process::Stdio;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use pharox::storage::postgres::{PgSettings, PostgresStorage};
use pharox::{AcquireRequest, Pool, Proxy, ProxyManager, ProxyProtocol, Selector, Storage};
use tokio_postgres::NoTls;

/// Concurrent acquire loops per daemon (and pooled connections), unless `--tasks N`.
const TASKS: usize = 4;

struct Args {
    url: String,
    secs: f64,
    sizes: Vec<usize>,
    instances: Vec<usize>,
    selectors: Vec<Selector>,
    /// Leave the database in place at the end (to look at its plans).
    keep: bool,
    /// Add the bare-statement `floor` row to every group.
    floor: bool,
    /// Acquire loops (and pooled connections) per daemon.
    tasks: usize,
}

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn list<T: std::str::FromStr + Clone>(v: Option<String>, default: &[T]) -> Vec<T> {
    v.map(|s| s.split(',').filter_map(|x| x.trim().parse().ok()).collect())
        .unwrap_or_else(|| default.to_vec())
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    if args.iter().any(|a| a == "--worker") {
        rt.block_on(worker(&args));
        return;
    }
    let url = arg(&args, "--url")
        .or_else(|| args.iter().find(|a| a.starts_with("postgres")).cloned())
        .or_else(|| std::env::var("TEST_PHAROX_PG").ok());
    let Some(url) = url else {
        eprintln!("pg bench: set TEST_PHAROX_PG or pass --url URL (skipping)");
        return;
    };
    let a = Args {
        url,
        secs: arg(&args, "--secs")
            .and_then(|s| s.parse().ok())
            .unwrap_or(3.0),
        sizes: list(arg(&args, "--sizes"), &[10, 1000, 10000]),
        instances: list(arg(&args, "--instances"), &[1, 4]),
        keep: args.iter().any(|a| a == "--keep"),
        floor: !args.iter().any(|a| a == "--no-floor"),
        tasks: arg(&args, "--tasks")
            .and_then(|s| s.parse().ok())
            .filter(|&n| n > 0)
            .unwrap_or(TASKS),
        selectors: list(
            arg(&args, "--selectors"),
            &[
                Selector::FirstAvailable,
                Selector::LeastUsed,
                Selector::RoundRobin,
            ],
        ),
    };
    rt.block_on(run(a));
}

/// About 200 000 rows of lease history, like a database that has served for a while (released rows, kept for
/// `keep_released_hours`), so that the statements run on the plans of a steady state:
/// fresh from `CREATE DATABASE` the lease table is empty, and its first plans (a sequential
/// scan of a table thought to be one page) stay cached until statistics catch up.
const HISTORY: &str = "
    INSERT INTO consumer (id, name) VALUES ('00000000-0000-4000-8000-000000000001', 'bench-history')
        ON CONFLICT DO NOTHING;
    INSERT INTO lease (id, proxy_id, pool_id, consumer_id, pool_name, status, acquired_at,
                       expires_at, released_at, holder)
    SELECT gen_random_uuid(), p.id, p.pool_id, '00000000-0000-4000-8000-000000000001',
           pp.name, 'released', now() - interval '1 hour', now(), now() - interval '30 minutes',
           'bench-history'
    FROM generate_series(1, 200000 / (SELECT count(*) FROM proxy) + 1) AS g,
         proxy p JOIN proxy_pool pp ON pp.id = p.pool_id;";

fn with_database(url: &str, db: &str) -> String {
    let (base, query) = url
        .split_once('?')
        .map_or((url, None), |(b, q)| (b, Some(q)));
    let cut = base.find("://").map_or(0, |i| i + 3);
    let base = base[cut..].find('/').map_or(base, |i| &base[..cut + i]);
    query.map_or(format!("{base}/{db}"), |q| format!("{base}/{db}?{q}"))
}

async fn raw(url: &str) -> tokio_postgres::Client {
    let (c, conn) = tokio_postgres::connect(url, NoTls).await.expect("connect");
    tokio::spawn(conn);
    c
}

fn settings(url: &str, node: &str, tasks: usize) -> PgSettings {
    let mut s = PgSettings::new(url, node);
    s.pool_size = tasks;
    s.statement_timeout = Duration::from_secs(5);
    s
}

fn pool_name(size: usize, cap: Option<u32>) -> String {
    format!("b{size}{}", if cap.is_some() { "c1" } else { "un" })
}

async fn run(a: Args) {
    let db = format!("pharox_bench_{}", std::process::id());
    raw(&a.url)
        .await
        .batch_execute(&format!("CREATE DATABASE {db}"))
        .await
        .unwrap();
    let url = with_database(&a.url, &db);
    let admin = PostgresStorage::connect(settings(&url, "bench-admin", TASKS))
        .await
        .unwrap();
    let caps = [Some(1), None];
    for &size in &a.sizes {
        for cap in caps {
            let name = pool_name(size, cap);
            admin.upsert_pool(Pool::new(name.clone())).await.unwrap();
            let proxies = (0..size)
                .map(|i| {
                    let id = format!("{name}/10.{}.{}.{}:8080", i >> 16, (i >> 8) & 255, i & 255);
                    Proxy::new(id, &name, ProxyProtocol::Http, "10.0.0.1", 8080)
                        .with_max_concurrency(cap)
                })
                .collect();
            admin.upsert_proxies(proxies).await.unwrap();
        }
    }
    let sql = raw(&url).await;
    sql.batch_execute(HISTORY).await.unwrap();
    sql.batch_execute("VACUUM ANALYZE").await.unwrap();
    println!(
        "pairs/s (acquire p50 / p99 ms; misses) — {} tasks per daemon, {} s per cell",
        a.tasks, a.secs
    );
    println!(
        "| daemons | pool | cap | selector | pairs/s | p50 ms | p99 ms | misses \
         | client µs/pair | server µs/pair | over-leases |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    let postmaster = postmaster_pid(&sql).await;
    let mut over_total = 0;
    for &n in &a.instances {
        for &size in &a.sizes {
            for cap in caps {
                let floor = a.floor.then_some(Kind::Floor);
                let kinds = a.selectors.iter().map(|&s| Kind::Selector(s)).chain(floor);
                for sel in kinds {
                    let pool = pool_name(size, cap);
                    // What autovacuum does in a long-lived database: statistics that
                    // follow the lease table's growth (each cell adds thousands of rows).
                    sql.batch_execute("ANALYZE lease").await.unwrap();
                    let server_before = postmaster.map(server_cpu);
                    let (cell, over, hits, client_cpu) =
                        cell(&url, &sql, &admin, (n, a.tasks), &pool, sel, a.secs).await;
                    let per_pair = |cpu: f64| format!("{:.0}", cpu * 1e6 / hits.max(1) as f64);
                    let server = match (postmaster, server_before) {
                        (Some(pid), Some(before)) => per_pair(server_cpu(pid) - before),
                        _ => "-".into(),
                    };
                    let cell = format!("{cell} | {} | {server}", per_pair(client_cpu));
                    over_total += over;
                    let cap = cap.map_or("∞".into(), |c| c.to_string());
                    println!("| {n} | {size} | {cap} | {sel} | {cell} | {over} |");
                }
            }
        }
    }
    println!("over-leases in all runs: {over_total}");
    admin.close().await;
    drop(sql);
    if a.keep {
        println!("kept the database {db} (--keep)");
        return;
    }
    raw(&a.url)
        .await
        .batch_execute(&format!("DROP DATABASE {db} WITH (FORCE)"))
        .await
        .unwrap();
    assert_eq!(over_total, 0, "over-leasing detected");
}

/// What a cell's loops run: the manager with a selector, or the bare floor statements.
#[derive(Clone, Copy)]
enum Kind {
    Selector(Selector),
    Floor,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Selector(s) => s.as_str(),
            Kind::Floor => "floor",
        }
    }
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One measurement: `n` worker processes of `tasks` loops each on one pool with one
/// selector (or the floor).
async fn cell(
    url: &str,
    sql: &tokio_postgres::Client,
    admin: &PostgresStorage,
    (n, tasks): (usize, usize),
    pool: &str,
    sel: Kind,
    secs: f64,
) -> (String, u64, u64, f64) {
    let start_at =
        SystemTime::now().duration_since(UNIX_EPOCH).unwrap() + Duration::from_millis(1500);
    let exe = std::env::current_exe().unwrap();
    let tag = format!("{}-{}", pool, sel.as_str());
    let children: Vec<_> = (0..n)
        .map(|i| {
            tokio::process::Command::new(&exe)
                .args([
                    "--worker",
                    "--url",
                    url,
                    "--pool",
                    pool,
                    "--selector",
                    sel.as_str(),
                ])
                .args([
                    "--node",
                    &format!("bench-{tag}-{i}"),
                    "--secs",
                    &secs.to_string(),
                ])
                .args(["--start-at", &start_at.as_millis().to_string()])
                .args(["--tasks", &tasks.to_string()])
                .stdout(Stdio::piped())
                .spawn()
                .expect("worker process")
        })
        .collect();
    let mut over = 0u64;
    let deadline =
        Instant::now() + Duration::from_millis(1500) + Duration::from_secs_f64(secs + 1.0);
    while Instant::now() < deadline {
        let row = sql
            .query_one(
                "SELECT count(*) FROM proxy WHERE max_concurrency IS NOT NULL AND current_leases > max_concurrency",
                &[],
            )
            .await
            .unwrap();
        over += row.get::<_, i64>(0) as u64;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (mut hits, mut misses, mut lat, mut cpu) = (0u64, 0u64, Vec::new(), 0.0);
    for c in children {
        let out = c.wait_with_output().await.unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        let v: serde_json::Value =
            serde_json::from_str(text.lines().last().unwrap_or("{}")).unwrap();
        hits += v["hits"].as_u64().unwrap_or(0);
        misses += v["misses"].as_u64().unwrap_or(0);
        cpu += v["cpu_s"].as_f64().unwrap_or(0.0);
        lat.extend(
            v["lat_us"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|x| x.as_u64()),
        );
    }
    over += admin.audit(Some(pool)).await.unwrap().len() as u64;
    let live: i64 = sql
        .query_one(
            "SELECT count(*) FROM lease WHERE status = 'active' AND pool_name = $1",
            &[&pool],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(live, 0, "leases left behind");
    lat.sort_unstable();
    let q = |p: f64| {
        lat.get(((lat.len() as f64 - 1.0) * p) as usize)
            .map_or(0.0, |&u| u as f64 / 1000.0)
    };
    let rate = hits as f64 / secs;
    let text = format!("{rate:.0} | {:.2} | {:.2} | {misses}", q(0.5), q(0.99));
    (text, over, hits, cpu)
}

/// utime + stime of a process, in seconds, and (with `children`) of its reaped children.
fn proc_cpu(pid: u32, children: bool) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let field = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // After the comm: state(0) ppid(1) ... utime(11) stime(12) cutime(13) cstime(14).
    let mut ticks = field(11) + field(12);
    if children {
        ticks += field(13) + field(14);
    }
    Some(ticks / 100.0)
}

fn parent_of(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?
        .1
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// The server's postmaster, when it runs on this machine (the parent of our backend).
async fn postmaster_pid(sql: &tokio_postgres::Client) -> Option<u32> {
    let row = sql.query_one("SELECT pg_backend_pid()", &[]).await.ok()?;
    let backend = u32::try_from(row.get::<_, i32>(0)).ok()?;
    let pm = parent_of(backend)?;
    let comm = std::fs::read_to_string(format!("/proc/{pm}/comm")).ok()?;
    comm.trim().starts_with("postgres").then_some(pm)
}

/// CPU seconds of the whole server: the postmaster with its reaped children, plus its live
/// children.
fn server_cpu(postmaster: u32) -> f64 {
    let mut total = proc_cpu(postmaster, true).unwrap_or(0.0);
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        if parent_of(pid) == Some(postmaster) {
            total += proc_cpu(pid, false).unwrap_or(0.0);
        }
    }
    total
}

/// A daemon: its own storage and manager; `--tasks` loops of acquire + release.
async fn worker(args: &[String]) {
    let get = |k| arg(args, k).expect(k);
    let (url, pool, node) = (get("--url"), get("--pool"), get("--node"));
    let secs: f64 = get("--secs").parse().unwrap();
    let start_ms: u128 = get("--start-at").parse().unwrap();
    let tasks: usize = get("--tasks").parse().unwrap();
    if get("--selector") == "floor" {
        return floor_worker(&url, (&pool, &node), tasks, secs, start_ms).await;
    }
    let sel: Selector = get("--selector").parse().unwrap();
    let mut s = settings(&url, &node, tasks);
    s.migrate = false; // the parent migrated
    let storage = PostgresStorage::connect(s).await.expect("worker connect");
    let m = ProxyManager::new(storage.clone());
    let until = wait_for_start(start_ms, secs).await;
    let tasks: Vec<_> = (0..tasks)
        .map(|t| {
            let (m, pool) = (m.clone(), pool.clone());
            tokio::spawn(async move {
                let req = AcquireRequest::new(pool)
                    .selector(sel)
                    .consumer(format!("bench-{t}"));
                let (mut hits, mut misses, mut lat) = (0u64, 0u64, Vec::new());
                while Instant::now() < until {
                    let t0 = Instant::now();
                    match m.acquire_proxy(&req).await {
                        Ok(Some(lease)) => {
                            lat.push(t0.elapsed().as_micros() as u64);
                            m.release_proxy(&lease).await.expect("release");
                            hits += 1;
                        }
                        Ok(None) => misses += 1,
                        Err(e) => panic!("acquire: {e}"),
                    }
                }
                (hits, misses, lat)
            })
        })
        .collect();
    let (hits, misses, lat) = gather(tasks).await;
    storage.close().await;
    report(hits, misses, lat);
}

/// Sleeps until the common start, and returns the end of the measurement.
async fn wait_for_start(start_ms: u128, secs: f64) -> Instant {
    let now_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis();
    tokio::time::sleep(Duration::from_millis(start_ms.saturating_sub(now_ms) as u64)).await;
    Instant::now() + Duration::from_secs_f64(secs)
}

/// Loop results: hits, misses and acquire latencies (µs), added up.
type Tally = (u64, u64, Vec<u64>);

async fn gather(tasks: Vec<tokio::task::JoinHandle<Tally>>) -> Tally {
    let (mut hits, mut misses, mut lat) = (0, 0, Vec::new());
    for t in tasks {
        let (h, mi, l) = t.await.unwrap();
        hits += h;
        misses += mi;
        lat.extend(l);
    }
    (hits, misses, lat)
}

/// A worker's last line: what the parent adds up.
fn report(hits: u64, misses: u64, lat: Vec<u64>) {
    let cpu = proc_cpu(std::process::id(), false).unwrap_or(0.0);
    println!(
        "{}",
        serde_json::json!({"hits": hits, "misses": misses, "lat_us": lat, "cpu_s": cpu})
    );
}

/// The floor's lease: the first unlocked proxy of the pool below its cap, bumped, and its
/// lease row, in one transaction (0 rows: a miss).
const FLOOR_ACQUIRE: &str = "
    WITH b AS (
        UPDATE proxy p SET current_leases = p.current_leases + 1
        WHERE p.id = (SELECT q.id FROM proxy q
                      WHERE q.pool_id = $1
                        AND (q.max_concurrency IS NULL OR q.current_leases < q.max_concurrency)
                      ORDER BY q.created_at, q.id LIMIT 1 FOR UPDATE SKIP LOCKED)
          AND (p.max_concurrency IS NULL OR p.current_leases < p.max_concurrency)
        RETURNING p.id, p.pool_id)
    INSERT INTO lease (id, proxy_id, pool_id, consumer_id, pool_name, status, acquired_at,
                       expires_at, holder)
    SELECT $2, b.id, b.pool_id, $3, $4, 'active', now(), now() + interval '60 seconds', $5
    FROM b RETURNING id";

/// The floor's release: the lease marked released, its proxy's counter decremented.
const FLOOR_RELEASE: &str = "
    WITH r AS (
        UPDATE lease SET status = 'released', released_at = now()
        WHERE id = $1 AND status = 'active' RETURNING proxy_id)
    UPDATE proxy p SET current_leases = p.current_leases - 1 FROM r WHERE p.id = r.proxy_id";

/// A floor worker: `tasks` connections, each looping over the two bare statements.
async fn floor_worker(
    url: &str,
    (pool, node): (&str, &str),
    tasks: usize,
    secs: f64,
    start_ms: u128,
) {
    let consumer = uuid::Uuid::parse_str("00000000-0000-4000-8000-000000000001").unwrap();
    let mut conns = Vec::new();
    for _ in 0..tasks {
        let c = raw(url).await;
        let acquire = c.prepare(FLOOR_ACQUIRE).await.unwrap();
        let release = c.prepare(FLOOR_RELEASE).await.unwrap();
        conns.push((c, acquire, release));
    }
    let row = conns[0]
        .0
        .query_one("SELECT id FROM proxy_pool WHERE name = $1", &[&pool])
        .await
        .unwrap();
    let pool_id: uuid::Uuid = row.get(0);
    let until = wait_for_start(start_ms, secs).await;
    let tasks: Vec<_> = conns
        .into_iter()
        .map(|(c, acquire, release)| {
            let (pool, node) = (pool.to_string(), node.to_string());
            tokio::spawn(async move {
                let (mut hits, mut misses, mut lat) = (0u64, 0u64, Vec::new());
                while Instant::now() < until {
                    let t0 = Instant::now();
                    let id = uuid::Uuid::new_v4();
                    let args: [&(dyn tokio_postgres::types::ToSql + Sync); 5] =
                        [&pool_id, &id, &consumer, &pool, &node];
                    if c.query_opt(&acquire, &args).await.unwrap().is_none() {
                        misses += 1;
                        continue;
                    }
                    lat.push(t0.elapsed().as_micros() as u64);
                    c.execute(&release, &[&id]).await.unwrap();
                    hits += 1;
                }
                (hits, misses, lat)
            })
        })
        .collect();
    let (hits, misses, lat) = gather(tasks).await;
    report(hits, misses, lat);
}
