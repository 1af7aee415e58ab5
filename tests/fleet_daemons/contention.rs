//! No over-leasing across the fleet: two daemons (CONNECT clients through each) and two
//! Python pharox 0.11 workers lease from one pool of cap-limited upstreams at the same time,
//! while an SQL monitor checks every snapshot: no proxy above its cap, every counter equal to
//! its proxy's active lease rows. The upstreams count their open connections against the cap.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use crate::common::admin::metric;
use crate::common::daemon::status;
use crate::common::hostile::{Behaviour, Upstream};
use crate::pgsupport::TestDb;
use crate::support::*;

/// How many CONNECTs one client sends at most (the run normally ends on `stop` first).
const MAX_ROUNDS: u32 = 20_000;

/// What one client saw.
#[derive(Debug, Default)]
struct Tally {
    hits: u64,
    misses: u64,
    /// Replies other than 200 or 503 `pool_exhausted`, and tunnels that did not echo.
    unexpected: Vec<String>,
}

/// A client of `proxy`: CONNECT, echo, hold a few milliseconds, close; again until `stop`.
async fn client(proxy: SocketAddr, pool: &'static str, seed: u64, stop: Arc<AtomicBool>) -> Tally {
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut t = Tally::default();
    for _ in 0..MAX_ROUNDS {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        let (mut s, head) = tokio::time::timeout(Duration::from_secs(30), tunnel(proxy, pool))
            .await
            .expect("every CONNECT is answered");
        match (status(&head), error_code(&head)) {
            (200, _) => {
                t.hits += 1;
                if !echoes(&mut s).await {
                    t.unexpected.push(format!("a tunnel did not echo: {head}"));
                }
                tokio::time::sleep(Duration::from_micros(rng.u64(..3000))).await;
            }
            (503, "pool_exhausted") => t.misses += 1,
            _ => t.unexpected.push(format!("{head}{}", body(&mut s).await)),
        }
        drop(s);
        // Leave room for the (much slower) Python workers.
        tokio::time::sleep(Duration::from_micros(rng.u64(500..4000))).await;
    }
    t
}

/// The rest of an error reply (it closes the connection), at most 2 s of waiting.
async fn body(s: &mut tokio::net::TcpStream) -> String {
    use tokio::io::AsyncReadExt;
    let mut b = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(2), s.read_to_end(&mut b)).await;
    String::from_utf8_lossy(&b).into_owned()
}

/// The daemon's warnings and errors other than the expected `pool_exhausted`.
fn trouble(node: &Node) -> Vec<String> {
    node.log()
        .lines()
        .filter(|l| l.contains(r#""level":"WARN""#) || l.contains(r#""level":"ERROR""#))
        .filter(|l| !l.contains(r#""code":"pool_exhausted""#))
        .map(str::to_owned)
        .collect()
}

/// Two daemons with three client tasks each and two Python workers share three upstreams
/// (caps 1, 2 and 1: four slots for eight contenders). Every monitor snapshot shows no
/// proxy over its cap and no counter drift; no upstream ever has more tunnels open than its
/// cap; at the end no lease is left and every counter is 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_daemons_and_two_python_workers_never_over_lease() {
    let Some(db) = TestDb::new("fleet_contention").await else {
        return;
    };
    let Some(py) = crate::pgsupport::python() else {
        return;
    };
    let caps = [1usize, 2, 1];
    let ups: Vec<Upstream> = caps
        .iter()
        .map(|_| Upstream::start(Behaviour::Ok, None))
        .collect();
    let list: Vec<Up> = ["c-1", "c-2", "c-3"]
        .iter()
        .zip(&ups)
        .zip(caps)
        .map(|((id, u), cap)| (*id, u.addr, Some(cap as u32)))
        .collect();
    let retry = "max_attempts = 3\nbackoff_ms = 10\nmax_backoff_ms = 40";
    let a = Node::start(
        &config(
            "hammer-a",
            STATEMENT_MS,
            "",
            &pool("hammer", "least_used", 30, retry, &list),
        ),
        &db.url,
    )
    .await;
    let b = Node::start(
        &config(
            "hammer-b",
            STATEMENT_MS,
            "",
            &pool("hammer", "round_robin", 30, retry, &list),
        ),
        &db.url,
    )
    .await;

    let sql = db.sql().await;
    let (samples, peak) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let monitor_stop = Arc::new(AtomicBool::new(false));
    let monitor = {
        let (stop, samples, peak) = (monitor_stop.clone(), samples.clone(), peak.clone());
        tokio::spawn(async move {
            let mut bad = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let (over, drift, live, counted) = snapshot(&sql).await;
                if (over, drift) != (0, 0) || live != counted {
                    bad.push((over, drift, live, counted));
                }
                samples.fetch_add(1, Ordering::Relaxed);
                peak.fetch_max(live as u64, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            (sql, bad)
        })
    };

    let stop = Arc::new(AtomicBool::new(false));
    let mut clients = Vec::new();
    for (i, node) in [&a, &b].into_iter().enumerate() {
        for t in 0..3 {
            let seed = (i * 10 + t) as u64;
            clients.push(tokio::spawn(client(
                node.proxy,
                "hammer",
                seed,
                stop.clone(),
            )));
        }
    }
    // The daemons' clients run from before the Python workers start until after they end.
    let workers: Vec<_> = (0..2)
        .map(|i| {
            let (py, url) = (py.clone(), db.url.clone());
            tokio::spawn(async move {
                python(&py, "worker.py", &[&url, "hammer", "6", &i.to_string()]).await
            })
        })
        .collect();
    let mut py_stats = Vec::new();
    for w in workers {
        py_stats.push(w.await.unwrap());
    }
    stop.store(true, Ordering::Relaxed);
    let mut tallies = Vec::new();
    for c in clients {
        tallies.push(c.await.unwrap());
    }
    monitor_stop.store(true, Ordering::Relaxed);
    let (sql, bad) = monitor.await.unwrap();

    println!("python workers: {py_stats:?}");
    for t in &tallies {
        println!("client: {} hits, {} misses", t.hits, t.misses);
    }
    println!(
        "monitor: {} snapshots, peak {} live leases (4 slots)",
        samples.load(Ordering::Relaxed),
        peak.load(Ordering::Relaxed)
    );
    assert!(
        bad.is_empty(),
        "snapshots (over cap, drift, live, counted) with a violation: {bad:?}"
    );
    assert!(samples.load(Ordering::Relaxed) > 10, "the monitor polled");
    assert!(
        (1..=4).contains(&peak.load(Ordering::Relaxed)),
        "the monitor saw leases, never more than the four slots"
    );
    for t in &tallies {
        assert!(
            t.unexpected.is_empty(),
            "{:?}\ndaemon a: {:#?}\ndaemon b: {:#?}",
            t.unexpected,
            trouble(&a),
            trouble(&b)
        );
        assert!(t.hits > 0, "every client got tunnels: {tallies:?}");
    }
    let mut missed = 0.0;
    for node in [&a, &b] {
        let m = node.metrics().await;
        missed += metric(
            &m,
            "pharox_acquire_total",
            &[("pool", "hammer"), ("status", "miss")],
        )
        .unwrap_or(0.0);
    }
    assert!(
        missed > 0.0,
        "the pool was contended (some acquire found every slot taken)"
    );
    for s in &py_stats {
        let o = s.as_object().expect("a JSON object of counters");
        assert!(o.keys().all(|k| !k.starts_with("error")), "{s}");
        assert!(
            o.get("hit").and_then(|h| h.as_u64()).unwrap_or(0) > 0,
            "each Python worker leased: {s}"
        );
    }
    let hits: u64 = tallies.iter().map(|t| t.hits).sum();
    let accepted: usize = ups.iter().map(Upstream::accepted).sum();
    assert_eq!(accepted as u64, hits, "one upstream connection per tunnel");
    for (u, cap) in ups.iter().zip(caps) {
        assert!(
            u.max_open() <= cap,
            "an upstream of cap {cap} had {} tunnels open at once",
            u.max_open()
        );
        assert!(u.violations().is_empty(), "{:?}", u.violations());
    }

    a.stop().await;
    b.stop().await;
    assert_eq!(
        snapshot(&sql).await,
        (0, 0, 0, 0),
        "(over cap, drift, live leases, sum of counters) once everyone stopped"
    );
}
