//! A daemon dies: its leases come back by expiry (swept by the survivors), or at once when it
//! restarts with its node id; a second live daemon with a node id in use is refused.

use std::time::Duration;

use crate::common::admin::admin;
use crate::common::daemon::{header, status};
use crate::common::hostile::{Behaviour, Upstream};
use crate::pgsupport::{TestDb, eventually};
use crate::support::*;

/// Polls CONNECTs through `node` (a pool without retry) until one is answered 200; the
/// open tunnel and its head.
async fn first_tunnel(
    node: &Node,
    pool: &str,
    within: Duration,
) -> Option<(tokio::net::TcpStream, String)> {
    eventually(within, || async {
        let (s, head) = node.tunnel(pool).await;
        if status(&head) == 200 {
            return Some((s, head));
        }
        assert_eq!(
            (status(&head), error_code(&head)),
            (503, "pool_exhausted"),
            "{head}"
        );
        None
    })
    .await
}

/// Daemon A holds the only slot of a cap-1 upstream for a tunnel (`lease_seconds = 2`) and is
/// killed with SIGKILL: nobody releases that lease, it expires on the database clock, B's
/// sweeper releases it, and B can lease the upstream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_daemons_lease_comes_back_by_expiry() {
    let Some(db) = TestDb::new("fleet_sigkill").await else {
        return;
    };
    let up = Upstream::start(Behaviour::Ok, None);
    let pools = pool(
        "one",
        "first_available",
        2,
        NO_RETRY,
        &[("solo", up.addr, Some(1))],
    );
    let mut a = Node::start(&config("kill-a", STATEMENT_MS, "", &pools), &db.url).await;
    let b = Node::start(&config("kill-b", STATEMENT_MS, "", &pools), &db.url).await;
    let sql = db.sql().await;

    let (mut held, head) = a.tunnel("one").await;
    let lease = lease_id(ok(&head)).to_owned();
    assert!(echoes(&mut held).await);
    // The cap holds across daemons while A lives (renewed every second).
    let (_, refused) = b.tunnel("one").await;
    assert_eq!(error_code(&refused), "pool_exhausted", "{refused}");

    a.kill().await;
    assert!(
        closed_within(&mut held, Duration::from_secs(10)).await,
        "the dead daemon's tunnel is gone"
    );
    let (row_status, _, holder) = lease_row(&sql, &lease).await.unwrap();
    println!("lease {lease} after SIGKILL: {row_status}, holder {holder:?}");
    assert_eq!(holder.as_deref(), Some("kill-a"));

    let (mut s, head) = first_tunnel(&b, "one", Duration::from_secs(20))
        .await
        .expect("the killed daemon's lease came back within about a lease TTL");
    assert!(echoes(&mut s).await);
    assert_eq!(
        lease_row(&sql, &lease).await.unwrap(),
        (
            "released".into(),
            Some("expired".into()),
            Some("kill-a".into())
        ),
        "released by the sweeper (of B, the only daemon left)"
    );
    let b_lease = lease_id(&head).to_owned();
    assert_eq!(
        lease_row(&sql, &b_lease).await.unwrap().2.as_deref(),
        Some("kill-b")
    );
    assert_eq!(up.max_open(), 1);
    drop(s);
    b.stop().await;
    let (over, drift, live, counted) = snapshot(&sql).await;
    assert_eq!((over, drift, live, counted), (0, 0, 0, 0));
}

/// Daemon A holds a lease of 300 s and is killed; restarted with the same node id, it
/// releases that stale lease while starting: the slot is free as soon as A listens again,
/// long before the lease would have expired.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_with_the_same_node_id_releases_its_stale_leases() {
    let Some(db) = TestDb::new("fleet_restart").await else {
        return;
    };
    let up = Upstream::start(Behaviour::Ok, None);
    let pools = pool(
        "one",
        "first_available",
        300,
        NO_RETRY,
        &[("solo", up.addr, Some(1))],
    );
    let a_config = config("restart-a", STATEMENT_MS, "", &pools);
    let mut a = Node::start(&a_config, &db.url).await;
    let b = Node::start(&config("restart-b", STATEMENT_MS, "", &pools), &db.url).await;
    let sql = db.sql().await;

    let (mut held, head) = a.tunnel("one").await;
    let lease = lease_id(ok(&head)).to_owned();
    assert!(echoes(&mut held).await);
    a.kill().await;
    assert!(closed_within(&mut held, Duration::from_secs(10)).await);
    // Nobody released it: the slot stays taken for the lease's 300 s.
    assert_eq!(lease_row(&sql, &lease).await.unwrap().0, "active");
    let (_, refused) = b.tunnel("one").await;
    assert_eq!(error_code(&refused), "pool_exhausted", "{refused}");
    // The server notices the dead client's sessions (and drops the node lock) on its own;
    // a restart that came sooner would be refused as a duplicate.
    let gone = eventually(Duration::from_secs(20), || async {
        (sessions_of(&sql, "restart-a").await == 0).then_some(())
    })
    .await;
    assert!(gone.is_some(), "the killed daemon's sessions ended");

    let a = Node::start(&a_config, &db.url).await;
    assert_eq!(
        lease_row(&sql, &lease).await.unwrap(),
        (
            "released".into(),
            Some("node_restart".into()),
            Some("restart-a".into())
        ),
        "released at start, before A listens"
    );
    // Free at once: one attempt, no retry.
    let (mut s, head) = b.tunnel("one").await;
    ok(&head);
    assert!(echoes(&mut s).await);
    assert_eq!(up.max_open(), 1);
    drop(s);
    a.stop().await;
    b.stop().await;
    assert_eq!(snapshot(&sql).await, (0, 0, 0, 0));
}

/// A second daemon with the node id of a live one exits non-zero, naming the node id; the
/// first one goes on serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_duplicate_node_id_is_refused() {
    let Some(db) = TestDb::new("fleet_dup").await else {
        return;
    };
    let up = Upstream::start(Behaviour::Ok, None);
    let pools = pool(
        "one",
        "first_available",
        60,
        NO_RETRY,
        &[("solo", up.addr, Some(2))],
    );
    let cfg = config("dup-node-7", STATEMENT_MS, "", &pools);
    let first = Node::start(&cfg, &db.url).await;
    let (status, log) = match Node::spawn(&cfg, &db.url, "info").await {
        Ok(n) => panic!(
            "a second daemon with node id dup-node-7 started:\n{}",
            n.log()
        ),
        Err(e) => e,
    };
    println!("the duplicate exited ({status}):\n{log}");
    assert!(!status.success(), "{status}");
    assert_eq!(status.code(), Some(1));
    assert!(
        log.contains("node id `dup-node-7` is held by another live daemon"),
        "{log}"
    );
    assert_eq!(first.readyz().await, 200);
    let (mut s, head) = first.tunnel("one").await;
    ok(&head);
    assert!(echoes(&mut s).await);
    drop(s);
    first.stop().await;
}

/// Daemon A stops and starts again (same node id) with a config that dropped one of its
/// three proxies: the two it kept stay in the fleet with their stored state (an operator's
/// ban survives the restart), the dropped one leaves the fleet (`removed_at`, `inactive`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_keeps_its_proxies_and_their_stored_state() {
    let Some(db) = TestDb::new("fleet_restart_inventory").await else {
        return;
    };
    let ups: Vec<Upstream> = (0..3)
        .map(|_| Upstream::start(Behaviour::Ok, None))
        .collect();
    let all: Vec<Up> = ["k-1", "k-2", "k-3"]
        .iter()
        .zip(&ups)
        .map(|(id, u)| (*id, u.addr, None))
        .collect();
    let full = pool("keep", "first_available", 60, NO_RETRY, &all);
    let a = Node::start(&config("keep-a", STATEMENT_MS, "", &full), &db.url).await;
    let (code, body) = admin(
        a.admin,
        "PUT",
        "/api/v1/proxies/k-1/status",
        None,
        r#"{"status": "banned"}"#,
    )
    .await;
    assert_eq!(code, 200, "{body}");
    a.stop().await;

    let fewer = pool("keep", "first_available", 60, NO_RETRY, &all[..2]);
    let a = Node::start(&config("keep-a", STATEMENT_MS, "", &fewer), &db.url).await;
    let sql = db.sql().await;
    let mut rows = Vec::new();
    for u in &ups {
        let row = sql
            .query_one(
                "SELECT status::text, removed_at IS NOT NULL FROM proxy WHERE port = $1",
                &[&i32::from(u.addr.port())],
            )
            .await
            .unwrap();
        rows.push((row.get::<_, String>(0), row.get::<_, bool>(1)));
    }
    assert_eq!(
        rows,
        [
            ("banned".to_owned(), false),
            ("active".to_owned(), false),
            ("inactive".to_owned(), true)
        ],
        "(status, removed) of k-1 (banned before the restart), k-2 and k-3 (dropped)"
    );
    for _ in 0..3 {
        let (mut s, head) = a.tunnel("keep").await;
        ok(&head);
        assert_eq!(header(&head, "x-pharox-proxy-id"), Some("k-2"), "{head}");
        assert!(echoes(&mut s).await);
    }
    a.stop().await;
}
