//! PostgreSQL stopped and started under traffic, on a cluster of the test's own: new CONNECTs
//! are refused with 503 `storage_unavailable` and `Retry-After` (never a hang, never another
//! answer), `/readyz` and `pharox_storage_up` follow the database, a tunnel opened before the
//! stop goes on, and the daemon serves again by itself once the server is back; down for
//! longer than a lease, an open tunnel is closed when its last granted lease runs out.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::net::TcpStream;

use crate::common::daemon::{header, status};
use crate::common::hostile::{Behaviour, Upstream};
use crate::pgsupport::{OwnCluster, eventually, raw, settles_to_zero};
use crate::support::*;

/// The statement timeout of the outage daemon.
const OUTAGE_STATEMENT_MS: u64 = 1000;
/// A password in the daemon's URL (the cluster trusts local connections and ignores it); it
/// must show up nowhere.
const PASSWORD: &str = "outagePw4711zq";
/// How many CONNECTs the traffic task sends at most.
const MAX_ROUNDS: u32 = 5_000;

/// One reply the traffic saw: status, `X-Pharox-Error`, `Retry-After`.
type Reply = (u16, String, Option<String>);

/// A CONNECT through `proxy`, bounded: a daemon that hangs fails the test here.
async fn bounded_tunnel(proxy: SocketAddr, pool: &str) -> (TcpStream, String) {
    tokio::time::timeout(Duration::from_secs(30), tunnel(proxy, pool))
        .await
        .expect("a CONNECT is answered, database or not")
}

fn reply(head: &str) -> Reply {
    (
        status(head),
        error_code(head).to_owned(),
        header(head, "retry-after").map(str::to_owned),
    )
}

/// True for the one refusal allowed while the database is down.
fn storage_refusal((code, error, retry_after): &Reply) -> bool {
    *code == 503
        && error == "storage_unavailable"
        && retry_after
            .as_deref()
            .and_then(|s| s.parse::<u64>().ok())
            .is_some_and(|s| s >= 1)
}

/// CONNECTs every 20 ms until `stop`; every reply, tunnels checked for an echo.
async fn traffic(proxy: SocketAddr, stop: Arc<AtomicBool>) -> Vec<Reply> {
    let mut seen = Vec::new();
    for _ in 0..MAX_ROUNDS {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        let (mut s, head) = bounded_tunnel(proxy, "out").await;
        let mut r = reply(&head);
        if r.0 == 200 && !echoes(&mut s).await {
            r.1 = "no echo".into();
        }
        seen.push(r);
        drop(s);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    seen
}

/// Polls a fresh CONNECT until one is answered `want` (each answer being 200 or the storage
/// refusal); the last reply either way.
async fn poll_connect(node: &Node, want: u16, within: Duration) -> Option<Reply> {
    eventually(within, || async {
        let (_s, head) = bounded_tunnel(node.proxy, "out").await;
        let r = reply(&head);
        assert!(r.0 == 200 || storage_refusal(&r), "{head}");
        (r.0 == want).then_some(r)
    })
    .await
}

/// Polls `pharox_storage_up` until it reads `want`.
async fn storage_up_becomes(node: &Node, want: f64) -> bool {
    eventually(Duration::from_secs(30), || async {
        (node.metric("pharox_storage_up", &[]).await == Some(want)).then_some(())
    })
    .await
    .is_some()
}

/// Polls `/readyz` until it answers `want`.
async fn readyz_becomes(node: &Node, want: u16) -> bool {
    eventually(Duration::from_secs(30), || async {
        (node.readyz().await == want).then_some(())
    })
    .await
    .is_some()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_stopped_and_started_under_traffic() {
    let Some(cluster) = tokio::task::block_in_place(|| OwnCluster::start("fleet-outage", ""))
    else {
        return;
    };
    let url = cluster
        .url
        .replacen("://postgres@", &format!("://postgres:{PASSWORD}@"), 1);
    assert!(url.contains(PASSWORD), "{url}");
    let up = Upstream::start(Behaviour::Ok, None);
    let pools = pool(
        "out",
        "first_available",
        60,
        NO_RETRY,
        &[("o-1", up.addr, Some(8))],
    );
    let node = Node::start(&config("outage-a", OUTAGE_STATEMENT_MS, "", &pools), &url).await;
    assert!(readyz_becomes(&node, 200).await, "ready at start");
    assert!(storage_up_becomes(&node, 1.0).await, "storage up at start");
    let (mut held, head) = node.tunnel("out").await;
    ok(&head);
    assert!(echoes(&mut held).await);

    let stop = Arc::new(AtomicBool::new(false));
    let load = tokio::spawn(traffic(node.proxy, stop.clone()));
    // Some traffic goes through before the stop.
    let before = poll_connect(&node, 200, Duration::from_secs(10)).await;
    assert!(before.is_some());

    tokio::task::block_in_place(|| cluster.pgstop());
    let refused = poll_connect(&node, 503, Duration::from_secs(30))
        .await
        .expect("a new CONNECT is refused while PostgreSQL is down");
    println!("while PostgreSQL is down: {refused:?}");
    assert!(readyz_becomes(&node, 503).await, "/readyz answers 503");
    assert!(
        storage_up_becomes(&node, 0.0).await,
        "pharox_storage_up drops to 0"
    );
    assert!(echoes(&mut held).await, "the open tunnel goes on");
    // Still down: every new CONNECT is the same refusal.
    for _ in 0..3 {
        let (_s, head) = bounded_tunnel(node.proxy, "out").await;
        assert!(storage_refusal(&reply(&head)), "{head}");
    }
    let errors: Vec<String> = node
        .metrics()
        .await
        .lines()
        .filter(|l| l.starts_with("pharox_storage_errors_total{"))
        .map(str::to_owned)
        .collect();
    println!("storage errors: {errors:?}");
    assert!(
        errors
            .iter()
            .any(|l| l.starts_with("pharox_storage_errors_total{op=\"acquire\"}")),
        "the refused acquires are counted: {errors:?}"
    );

    tokio::task::block_in_place(|| cluster.pgstart(""));
    let back = poll_connect(&node, 200, Duration::from_secs(60)).await;
    assert!(
        back.is_some(),
        "CONNECTs succeed again without a restart:\n{}",
        node.log()
    );
    assert!(
        readyz_becomes(&node, 200).await,
        "/readyz answers 200 again"
    );
    assert!(
        storage_up_becomes(&node, 1.0).await,
        "pharox_storage_up back to 1"
    );
    assert!(echoes(&mut held).await, "the tunnel outlived the outage");
    stop.store(true, Ordering::Relaxed);
    let seen = load.await.unwrap();

    let served = seen.iter().filter(|r| r.0 == 200).count();
    let refusals = seen.iter().filter(|r| storage_refusal(r)).count();
    println!(
        "traffic: {} CONNECTs, {served} served, {refusals} refused",
        seen.len()
    );
    let other: Vec<&Reply> = seen
        .iter()
        .filter(|r| !(storage_refusal(r) || r.0 == 200 && r.1.is_empty()))
        .collect();
    assert!(
        other.is_empty(),
        "only tunnels or the storage refusal: {other:?}"
    );
    assert!(served > 0 && refusals > 0, "{seen:?}");

    drop(held);
    let sql = raw(&cluster.url).await;
    let settled = settles_to_zero(&sql).await;
    assert!(
        settled.is_ok(),
        "no lease left, every counter 0: {:?}",
        settled
    );
    assert!(up.max_open() <= 8);
    let metrics = node.metrics().await;
    let mut node = node;
    let exit = node.terminate().await;
    let log = node.log();
    assert_eq!(exit.code(), Some(0), "{log}");
    assert!(!metrics.contains(PASSWORD), "the password is in /metrics");
    assert!(
        !log.contains(PASSWORD),
        "the password is in the log:\n{log}"
    );
}

/// The database stays down for longer than a lease: a tunnel opened before the stop runs
/// while its last granted lease lasts, then closes (counted in `pharox_leases_lost_total`)
/// instead of outliving a lease the other daemons' sweeper may already hand out again. Once
/// the server is back, the lease is released and nothing is left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tunnel_outliving_its_lease_while_the_database_is_down_is_closed() {
    let Some(cluster) = tokio::task::block_in_place(|| OwnCluster::start("fleet-expiry", ""))
    else {
        return;
    };
    let up = Upstream::start(Behaviour::Ok, None);
    let pools = pool(
        "out",
        "first_available",
        4,
        NO_RETRY,
        &[("o-1", up.addr, Some(1))],
    );
    let node = Node::start(
        &config("expiry-a", OUTAGE_STATEMENT_MS, "", &pools),
        &cluster.url,
    )
    .await;
    let (mut held, head) = node.tunnel("out").await;
    ok(&head);
    assert!(echoes(&mut held).await);

    tokio::task::block_in_place(|| cluster.pgstop());
    assert!(
        closed_within(&mut held, Duration::from_secs(30)).await,
        "the tunnel was closed while the database was down"
    );
    let lost = eventually(Duration::from_secs(10), || async {
        node.metric("pharox_leases_lost_total", &[("pool", "out")])
            .await
            .filter(|n| *n >= 1.0)
    })
    .await;
    assert_eq!(lost, Some(1.0), "one lease lost");

    tokio::task::block_in_place(|| cluster.pgstart(""));
    let sql = raw(&cluster.url).await;
    let settled = settles_to_zero(&sql).await;
    assert!(
        settled.is_ok(),
        "the lease was released once the server was back: {:?}",
        settled
    );
    assert_eq!(up.max_open(), 1);
    node.stop().await;
}
