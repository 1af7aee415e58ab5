//! Issue 10, items 3 and 9: a lease the daemon loses (released or expired behind its back)
//! closes its connections, tunnel, plain HTTP, SOCKS5 and sticky session alike; state a
//! client can create is bounded: no session entry or task outlives a failed first lease, a
//! consumer has at most `limits.max_sessions_per_consumer` sessions (429 `session_limit`),
//! and lease swaps on a keep-alive connection leave no task behind.

mod common;

use std::time::Duration;

use common::admin::admin;
use common::daemon::*;
use common::hostile::*;
use pharox::LeaseId;
use pharox::retry::wall_now;
use pharox::storage::Storage;
use serde_json::Value;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

/// One direct upstream, exclusive, leases of 2 s (renewed after 1 s, so a lost lease is
/// noticed within about a second). Heads may take two minutes, so that an idle keep-alive
/// connection is not closed by the head timeout within the tests' 30 s bound.
const EXCLUSIVE: &str = r#"
[limits]
head_timeout_ms = 120000
[security]
allow_private_targets = true
[[consumers]]
name = "w"
password = "x"
[[pools]]
name = "p"
lease_seconds = 2
[pools.retry]
max_attempts = 1
[[pools.proxies]]
url = "direct"
max_concurrency = 1
"#;

fn lease_id(head: &str) -> LeaseId {
    header(head, "x-pharox-lease-id")
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no lease id: {head}"))
}

async fn release_behind_the_back(d: &TestDaemon, id: LeaseId) {
    let released = d
        .state
        .manager
        .storage()
        .release_by_id(id, wall_now())
        .await
        .unwrap();
    assert!(released.is_some(), "the lease was live");
}

/// Waits (bounded) for the daemon to close `s`; panics if it is still open.
async fn assert_closed(s: &mut TcpStream, what: &str) {
    let end = read_all(s, Duration::from_secs(30)).await;
    assert_ne!(
        end.error,
        Some(std::io::ErrorKind::TimedOut),
        "{what}: still open on a lost lease"
    );
}

/// Fails on the bug: the renewal found the lease gone, was ignored, and the tunnel kept
/// running on a slot that was handed to the next client (two tunnels on a cap of 1).
#[tokio::test]
async fn a_lost_lease_closes_its_tunnel() {
    let origin = Origin::start().await;
    let d = TestDaemon::start(EXCLUSIVE).await;
    let target = origin.addr.to_string();
    let auth = basic("w", "x");
    let (mut first, head) = connect(d.addr, &target, Some(&auth), "").await;
    assert_eq!(status(&head), 200, "{head}");
    release_behind_the_back(&d, lease_id(&head)).await;
    // The slot is free in the storage, so the next client gets it...
    let (second, head) = connect(d.addr, &target, Some(&auth), "").await;
    assert_eq!(status(&head), 200, "{head}");
    // ...and the first tunnel, whose lease is gone, must not go on beside it.
    assert_closed(&mut first, "CONNECT tunnel").await;
    assert!(eventually(|| d.state.registry.len() == 1).await);
    drop(second);
    d.wait_leased("p", 0).await;
    assert!(eventually(|| d.state.registry.is_empty()).await);
    d.stop().await;
}

/// Fails on the bug: as above, for a SOCKS5 tunnel.
#[tokio::test]
async fn a_lost_lease_closes_its_socks5_tunnel() {
    let origin = Origin::start().await;
    let d = TestDaemon::start(EXCLUSIVE).await;
    let req = socks_request(1, &[127, 0, 0, 1], origin.addr.port());
    let (code, mut s) = socks_connect(d.addr, "w", "x", &req).await;
    assert_eq!(code, Some(0));
    let leases = d
        .state
        .manager
        .storage()
        .list_leases(Some("p"))
        .await
        .unwrap();
    assert_eq!(leases.len(), 1);
    release_behind_the_back(&d, leases[0].id).await;
    assert_closed(&mut s, "SOCKS5 tunnel").await;
    assert!(eventually(|| d.state.registry.is_empty()).await);
    d.stop().await;
}

/// Fails on the bug: a plain-HTTP keep-alive connection kept using (and renewing attempts
/// on) a lease that was gone.
#[tokio::test]
async fn a_lost_lease_closes_its_keep_alive_connection() {
    let origin = Origin::start().await;
    let d = TestDaemon::start(EXCLUSIVE).await;
    let mut c = TcpStream::connect(d.addr).await.unwrap();
    let (head, body) =
        get_keep_alive(&mut c, &origin.addr.to_string(), "/a", &basic("w", "x")).await;
    assert_eq!((status(&head), body.as_str()), (200, "origin:/a"), "{head}");
    release_behind_the_back(&d, lease_id(&head)).await;
    assert_closed(&mut c, "keep-alive connection").await;
    assert!(eventually(|| d.state.registry.is_empty()).await);
    d.wait_leased("p", 0).await;
    d.stop().await;
}

/// Fails on the bug: a sticky session kept handing out its lost lease, so its connections
/// ran on a slot someone else held.
#[tokio::test]
async fn a_lost_session_lease_closes_its_connections_and_the_session_leases_again() {
    let origin = Origin::start().await;
    let d = TestDaemon::start(EXCLUSIVE).await;
    let target = origin.addr.to_string();
    let auth = basic("w-session-s1", "x");
    let (mut first, head) = connect(d.addr, &target, Some(&auth), "").await;
    assert_eq!(status(&head), 200, "{head}");
    let lost = lease_id(&head);
    release_behind_the_back(&d, lost).await;
    assert_closed(&mut first, "session tunnel").await;
    let (s, head) = connect(d.addr, &target, Some(&auth), "").await;
    assert_eq!(status(&head), 200, "{head}");
    assert_ne!(lease_id(&head), lost, "the session took a new lease");
    assert_eq!(d.leased("p").await, 1);
    assert!(
        d.state
            .manager
            .storage()
            .get_lease(lease_id(&head))
            .await
            .unwrap()
            .is_some(),
        "the session's lease is live"
    );
    drop(s);
    d.stop().await;
}

async fn sessions(d: &TestDaemon) -> Vec<Value> {
    let (code, body) = admin(d.admin, "GET", "/api/v1/sessions", None, "").await;
    assert_eq!(code, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    v["sessions"].as_array().cloned().unwrap_or_default()
}

fn alive_tasks() -> usize {
    tokio::runtime::Handle::current()
        .metrics()
        .num_alive_tasks()
}

/// The number of alive tasks once it stopped changing (20 polls alike, bounded).
async fn steady_tasks() -> usize {
    let (mut last, mut same) = (alive_tasks(), 0);
    for _ in 0..500 {
        tokio::time::sleep(Duration::from_millis(10)).await;
        let now = alive_tasks();
        same = if now == last { same + 1 } else { 0 };
        last = now;
        if same >= 20 {
            break;
        }
    }
    last
}

/// Waits (bounded) until at most `n` tasks are alive; returns the last count.
async fn settle_tasks(n: usize) -> usize {
    for _ in 0..500 {
        if alive_tasks() <= n {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    alive_tasks()
}

/// Fails on the bug: a session got a map entry, a reaper task and a slot of the consumer's
/// quota before its lease succeeded, and kept them for its TTL after leasing failed.
#[tokio::test]
async fn sessions_whose_first_lease_fails_leave_nothing_behind() {
    let refuse = Upstream::start(Behaviour::Refuse, None);
    let origin = Origin::start().await;
    let cfg = format!(
        r#"
[security]
allow_private_targets = true
[limits]
max_sessions_per_consumer = 2
[[consumers]]
name = "w"
password = "x"
[[pools]]
name = "bad"
failover_attempts = 0
[pools.health]
max_failures = 1000
[[pools.proxies]]
url = "http://{}"
[[pools]]
name = "busy"
[pools.retry]
max_attempts = 1
[[pools.proxies]]
url = "direct"
max_concurrency = 1
[[pools]]
name = "good"
[[pools.proxies]]
url = "direct"
"#,
        refuse.addr
    );
    let d = TestDaemon::start(&cfg).await;
    let target = origin.addr.to_string();
    // Warm up (the daemon's own tasks start, one connection comes and goes), then count.
    let (warm, head) = connect(d.addr, &target, Some(&basic("w-pool-good", "x")), "").await;
    assert_eq!(status(&head), 200, "{head}");
    drop(warm);
    d.wait_leased("good", 0).await;
    let _ = sessions(&d).await;
    let baseline = steady_tasks().await;
    for i in 0..20 {
        let (_, head) = connect(
            d.addr,
            &target,
            Some(&basic(&format!("w-pool-bad-session-f{i}"), "x")),
            "",
        )
        .await;
        assert_eq!(
            header(&head, "x-pharox-error"),
            Some("upstream_failed"),
            "{head}"
        );
    }
    // An exhausted pool: the lease itself fails.
    let (holder, head) = connect(d.addr, &target, Some(&basic("w-pool-busy", "x")), "").await;
    assert_eq!(status(&head), 200, "{head}");
    for i in 0..20 {
        let (_, head) = connect(
            d.addr,
            &target,
            Some(&basic(&format!("w-pool-busy-session-e{i}"), "x")),
            "",
        )
        .await;
        assert_eq!(
            header(&head, "x-pharox-error"),
            Some("pool_exhausted"),
            "{head}"
        );
    }
    drop(holder);
    d.wait_leased("busy", 0).await;
    assert_eq!(
        sessions(&d).await,
        Vec::<Value>::new(),
        "failed sessions are forgotten"
    );
    let left = settle_tasks(baseline + 4).await;
    assert!(
        left <= baseline + 4,
        "{left} tasks alive, {baseline} before"
    );
    // None of them used the consumer's quota of two.
    let mut open = Vec::new();
    for id in ["g1", "g2"] {
        let (s, head) = connect(
            d.addr,
            &target,
            Some(&basic(&format!("w-pool-good-session-{id}"), "x")),
            "",
        )
        .await;
        assert_eq!(status(&head), 200, "{id}: {head}");
        open.push(s);
    }
    assert_eq!(sessions(&d).await.len(), 2);
    drop(open);
    d.stop().await;
}

/// Fails on the bug: there was no cap, so one consumer could create sessions (entries,
/// tasks, leases) without bound.
#[tokio::test]
async fn the_session_cap_answers_429_session_limit() {
    let origin = Origin::start().await;
    let cfg = r#"
[security]
allow_private_targets = true
[limits]
max_sessions_per_consumer = 2
[[consumers]]
name = "w"
password = "x"
[[consumers]]
name = "v"
password = "y"
[[pools]]
name = "p"
[[pools.proxies]]
url = "direct"
"#;
    let d = TestDaemon::start(cfg).await;
    let target = origin.addr.to_string();
    let user = |s: &str| basic(&format!("w-session-{s}"), "x");
    let mut open = Vec::new();
    for s in ["s1", "s2"] {
        let (c, head) = connect(d.addr, &target, Some(&user(s)), "").await;
        assert_eq!(status(&head), 200, "{s}: {head}");
        open.push(c);
    }
    // CONNECT, plain HTTP and SOCKS5 all refuse a third session.
    let (_, head) = connect(d.addr, &target, Some(&user("s3")), "").await;
    assert_eq!(status(&head), 429, "{head}");
    assert_eq!(header(&head, "x-pharox-error"), Some("session_limit"));
    let req = format!(
        "GET http://{target}/x HTTP/1.1\r\nHost: {target}\r\nProxy-Authorization: {}\r\nConnection: close\r\n\r\n",
        user("s4")
    );
    let got = exchange(d.addr, req.as_bytes(), false, Duration::from_secs(30)).await;
    let (resp, _) = responses(&got.bytes);
    assert_eq!(resp.len(), 1, "{}", preview(&got.bytes));
    assert_eq!(
        (resp[0].status, resp[0].code()),
        (429, Some("session_limit"))
    );
    let (code, _) = socks_connect(
        d.addr,
        "w-session-s5",
        "x",
        &socks_request(1, &[127, 0, 0, 1], origin.addr.port()),
    )
    .await;
    assert_eq!(code, Some(0x02), "SOCKS5: not allowed");
    // Existing sessions and other consumers are unaffected.
    let (_, head) = connect(d.addr, &target, Some(&user("s1")), "").await;
    assert_eq!(status(&head), 200, "{head}");
    let (_, head) = connect(d.addr, &target, Some(&basic("v-session-s3", "y")), "").await;
    assert_eq!(status(&head), 200, "{head}");
    // Ending a session frees its place.
    let (code, body) = admin(d.admin, "DELETE", "/api/v1/sessions/w/p/s1", None, "").await;
    assert_eq!(code, 200, "{body}");
    let (_, head) = connect(d.addr, &target, Some(&user("s3")), "").await;
    assert_eq!(status(&head), 200, "{head}");
    drop(open);
    d.stop().await;
}

/// Fails on the bug: every lease swap on a keep-alive connection spawned a watcher task
/// that lived until the connection closed (one more task per swap).
#[tokio::test]
async fn lease_swaps_on_a_keep_alive_connection_leave_no_tasks_behind() {
    let origin = Origin::start().await;
    let cfg = r#"
[security]
allow_private_targets = true
[[consumers]]
name = "w"
password = "x"
[[pools]]
name = "p"
[[pools.proxies]]
url = "direct"
[[pools]]
name = "q"
[[pools.proxies]]
url = "direct"
"#;
    let d = TestDaemon::start(cfg).await;
    let target = origin.addr.to_string();
    let mut c = TcpStream::connect(d.addr).await.unwrap();
    let get = |pool: &str| {
        format!(
            "GET http://{target}/{pool} HTTP/1.1\r\nHost: {target}\r\nProxy-Authorization: {}\r\nX-Pharox-Pool: {pool}\r\n\r\n",
            basic("w", "x")
        )
    };
    let roundtrip = async |c: &mut TcpStream, pool: &str| {
        c.write_all(get(pool).as_bytes()).await.unwrap();
        let head = read_head(c).await;
        assert_eq!(status(&head), 200, "{head}");
        let len: usize = header(&head, "content-length").unwrap().parse().unwrap();
        let mut body = vec![0; len];
        tokio::io::AsyncReadExt::read_exact(c, &mut body)
            .await
            .unwrap();
    };
    roundtrip(&mut c, "p").await;
    let baseline = steady_tasks().await;
    for i in 0..40 {
        roundtrip(&mut c, if i % 2 == 0 { "q" } else { "p" }).await;
    }
    let left = settle_tasks(baseline + 4).await;
    assert!(
        left <= baseline + 4,
        "{left} tasks alive after 40 lease swaps, {baseline} before"
    );
    assert_eq!(
        d.leased("p").await + d.leased("q").await,
        1,
        "one lease at a time"
    );
    drop(c);
    d.wait_leased("p", 0).await;
    d.stop().await;
}
