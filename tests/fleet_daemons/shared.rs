//! What the daemons of a fleet share beyond caps: the round-robin cursor, and wake-ups.

use std::time::Duration;

use crate::common::daemon::{header, status};
use crate::common::hostile::{Behaviour, Upstream};
use crate::pgsupport::{TestDb, eventually};
use crate::support::*;

/// CONNECTs alternating between daemons A and B through a round-robin pool of three: the
/// upstreams come in one rotation, as if one daemon served them all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_robin_rotates_across_daemons() {
    let Some(db) = TestDb::new("fleet_rr").await else {
        return;
    };
    let ups: Vec<Upstream> = (0..3)
        .map(|_| Upstream::start(Behaviour::Ok, None))
        .collect();
    let list: Vec<Up> = ["rr-a", "rr-b", "rr-c"]
        .iter()
        .zip(&ups)
        .map(|(id, u)| (*id, u.addr, None))
        .collect();
    let pools = pool("rr", "round_robin", 60, NO_RETRY, &list);
    let a = Node::start(&config("rr-a", STATEMENT_MS, "", &pools), &db.url).await;
    let b = Node::start(&config("rr-b", STATEMENT_MS, "", &pools), &db.url).await;

    let mut seq = Vec::new();
    for i in 0..12 {
        let node = if i % 2 == 0 { &a } else { &b };
        let (mut s, head) = node.tunnel("rr").await;
        ok(&head);
        assert!(echoes(&mut s).await);
        seq.push(header(&head, "x-pharox-proxy-id").unwrap().to_owned());
    }
    println!("rotation: {seq:?}");
    let mut first: Vec<&String> = seq[..3].iter().collect();
    first.sort();
    first.dedup();
    assert_eq!(
        first.len(),
        3,
        "the first three are the three upstreams: {seq:?}"
    );
    for i in 3..seq.len() {
        assert_eq!(
            seq[i],
            seq[i - 3],
            "position {i} breaks the rotation: {seq:?}"
        );
    }
    for u in &ups {
        assert_eq!(u.accepted(), 4, "each upstream served a third");
        assert!(u.violations().is_empty(), "{:?}", u.violations());
    }
    a.stop().await;
    b.stop().await;
}

/// A client waiting on daemon B (retry backoff 60 s) for the cap-1 upstream a tunnel
/// through daemon A holds gets it soon after A's tunnel closes: A's release wakes B, far
/// sooner than the backoff (the bound, 20 s, is a third of it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_on_one_daemon_wakes_a_waiter_on_another() {
    let Some(db) = TestDb::new("fleet_wake").await else {
        return;
    };
    let up = Upstream::start(Behaviour::Ok, None);
    let retry = "max_attempts = 2\nbackoff_ms = 60000\nmax_backoff_ms = 60000";
    let pools = pool(
        "one",
        "first_available",
        60,
        retry,
        &[("solo", up.addr, Some(1))],
    );
    let a = Node::start(&config("wake-a", STATEMENT_MS, "", &pools), &db.url).await;
    let b = Node::start(&config("wake-b", STATEMENT_MS, "", &pools), &db.url).await;

    let (mut held, head) = a.tunnel("one").await;
    ok(&head);
    assert!(echoes(&mut held).await);
    let proxy = b.proxy;
    let waiter = tokio::spawn(async move {
        let (mut s, head) = tunnel(proxy, "one").await;
        let echoed = status(&head) == 200 && echoes(&mut s).await;
        (head, echoed)
    });
    // B's first attempt missed: the client now sleeps out (or is woken from) its backoff.
    let missed = eventually(Duration::from_secs(20), || async {
        let misses = b
            .metric(
                "pharox_acquire_total",
                &[("pool", "one"), ("status", "miss")],
            )
            .await?;
        (misses >= 1.0).then_some(())
    })
    .await;
    assert!(missed.is_some(), "B's client tried once and missed");
    assert!(!waiter.is_finished(), "B's client waits for the slot");
    assert_eq!(up.accepted(), 1);

    drop(held);
    let (head, echoed) = tokio::time::timeout(Duration::from_secs(20), waiter)
        .await
        .expect("B's waiter was woken well before its 60 s backoff")
        .unwrap();
    assert_eq!(status(&head), 200, "{head}");
    assert!(echoed);
    assert_eq!(header(&head, "x-pharox-proxy-id"), Some("solo"));
    assert_eq!(up.max_open(), 1, "never two tunnels on the cap-1 upstream");
    assert_eq!(
        b.metric(
            "pharox_acquire_total",
            &[("pool", "one"), ("status", "hit")]
        )
        .await,
        Some(1.0)
    );
    a.stop().await;
    b.stop().await;
}
