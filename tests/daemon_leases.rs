//! Leasing per connection: failover, exhaustion and early wake-up, keep-alive reuse, the
//! connection cap, and no leaked lease on any path (client abort mid-handshake, upstream
//! closing mid-tunnel, idle timeout, a dribbling client, shutdown).

mod common;

use std::time::Duration;

use common::daemon::*;
use pharox::storage::Storage;
use pharox::{ProxyId, ProxyStatus};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn pool_config(proxies: &[String], pool_extra: &str, top: &str) -> String {
    let mut s = format!(
        "{top}\n[security]\nallow_private_targets = true\n[[consumers]]\nname = \"w\"\npassword = \"x\"\n[[pools]]\nname = \"p\"\n{pool_extra}\n"
    );
    for p in proxies {
        s.push_str(&format!("[[pools.proxies]]\n{p}\n"));
    }
    s
}

fn auth() -> String {
    basic("w", "x")
}

#[tokio::test]
async fn failover_skips_a_dead_upstream_and_rests_it() {
    let origin = Origin::start().await;
    let dead = FakeProxy::start(Mode::Refuse).await;
    let live = FakeProxy::start(Mode::Ok).await;
    let cfg = pool_config(
        &[
            format!("url = \"http://{}\"\nid = \"dead\"", dead.addr),
            format!("url = \"http://{}\"\nid = \"live\"", live.addr),
        ],
        "failover_attempts = 1\n[pools.health]\nmax_failures = 2\ncooldown_seconds = 3600",
        "",
    );
    let d = TestDaemon::start(&cfg).await;
    for i in 0..4 {
        let (mut s, head) = connect(d.addr, &origin.addr.to_string(), Some(&auth()), "").await;
        assert_eq!(status(&head), 200, "request {i}: {head}");
        assert_eq!(header(&head, "x-pharox-proxy-id"), Some("live"));
        assert!(get_over(&mut s, "o", "/").await.ends_with("origin:/"));
    }
    d.wait_leased("p", 0).await;
    let info = d
        .state
        .manager
        .storage()
        .get_proxy(&ProxyId::from("dead"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        info.proxy.status,
        ProxyStatus::Inactive,
        "two failures put it in cooldown"
    );
    assert_eq!(live.requests().len(), 4);
    d.stop().await;
}

#[tokio::test]
async fn exhaustion_answers_503_then_a_release_makes_room() {
    let origin = Origin::start().await;
    let cfg = pool_config(
        &["url = \"direct\"\nmax_concurrency = 1".into()],
        "[pools.retry]\nmax_attempts = 1",
        "",
    );
    let d = TestDaemon::start(&cfg).await;
    let target = origin.addr.to_string();
    let (first, head) = connect(d.addr, &target, Some(&auth()), "").await;
    assert_eq!(status(&head), 200);
    let (_, head) = connect(d.addr, &target, Some(&auth()), "").await;
    assert_eq!(status(&head), 503, "{head}");
    assert_eq!(header(&head, "x-pharox-error"), Some("pool_exhausted"));
    assert!(
        header(&head, "retry-after").is_some_and(|v| v.parse::<u64>().is_ok()),
        "{head}"
    );
    drop(first);
    d.wait_leased("p", 0).await;
    let (_, head) = connect(d.addr, &target, Some(&auth()), "").await;
    assert_eq!(status(&head), 200, "{head}");
    d.stop().await;
}

#[tokio::test]
async fn a_waiting_client_is_served_as_soon_as_a_lease_is_released() {
    let origin = Origin::start().await;
    let cfg = pool_config(
        &["url = \"direct\"\nmax_concurrency = 1".into()],
        "[pools.retry]\nmax_attempts = 2\nbackoff_ms = 600000\nmax_backoff_ms = 600000",
        "",
    );
    let d = TestDaemon::start(&cfg).await;
    let target = origin.addr.to_string();
    let (first, head) = connect(d.addr, &target, Some(&auth()), "").await;
    assert_eq!(status(&head), 200);
    let waiter = tokio::spawn({
        let (addr, target) = (d.addr, target.clone());
        async move { connect(addr, &target, Some(&auth()), "").await.1 }
    });
    // Give the waiter time to miss and start its ten-minute backoff, then free the slot.
    tokio::time::sleep(Duration::from_millis(200)).await;
    drop(first);
    let head = tokio::time::timeout(Duration::from_secs(30), waiter)
        .await
        .expect("woken early")
        .unwrap();
    assert_eq!(status(&head), 200, "{head}");
    d.stop().await;
}

#[tokio::test]
async fn keep_alive_requests_share_one_lease() {
    let origin = Origin::start().await;
    let d = TestDaemon::start(&pool_config(&["url = \"direct\"".into()], "", "")).await;
    let mut c = TcpStream::connect(d.addr).await.unwrap();
    let mut leases = Vec::new();
    for path in ["/a", "/b"] {
        let (head, body) = get_keep_alive(&mut c, &origin.addr.to_string(), path, &auth()).await;
        assert_eq!(status(&head), 200, "{head}");
        assert_eq!(body, format!("origin:{path}"));
        leases.push(header(&head, "x-pharox-lease-id").unwrap().to_owned());
        assert_eq!(d.leased("p").await, 1);
    }
    assert_eq!(leases[0], leases[1], "one lease for the connection");
    drop(c);
    d.wait_leased("p", 0).await;
    d.stop().await;
}

/// Requests of one keep-alive connection to different authorities, back and forth, each
/// reach their own origin (the relay reuses the previous request's target only for the same
/// authority).
#[tokio::test]
async fn keep_alive_requests_to_other_authorities_reach_their_own_origin() {
    let (a, b) = (Origin::start().await, Origin::start().await);
    let d = TestDaemon::start(&pool_config(&["url = \"direct\"".into()], "", "")).await;
    let mut c = TcpStream::connect(d.addr).await.unwrap();
    let plan = [(&a, "/1"), (&b, "/2"), (&a, "/3"), (&a, "/4"), (&b, "/5")];
    for (origin, path) in plan {
        let (head, body) = get_keep_alive(&mut c, &origin.addr.to_string(), path, &auth()).await;
        assert_eq!(status(&head), 200, "{head}");
        assert_eq!(body, format!("origin:{path}"));
    }
    let paths = |o: &Origin| -> Vec<String> {
        o.requests()
            .iter()
            .map(|r| r.split(' ').nth(1).unwrap_or_default().to_owned())
            .collect()
    };
    assert_eq!(paths(&a), ["/1", "/3", "/4"]);
    assert_eq!(paths(&b), ["/2", "/5"]);
    drop(c);
    d.wait_leased("p", 0).await;
    d.stop().await;
}

/// Every request of a keep-alive connection is authenticated: a wrong password after good
/// requests is refused (and, like every error answer, closes the connection); the right one
/// works again on the next connection.
#[tokio::test]
async fn keep_alive_requests_are_each_authenticated() {
    let origin = Origin::start().await;
    let d = TestDaemon::start(&pool_config(&["url = \"direct\"".into()], "", "")).await;
    let target = origin.addr.to_string();
    let mut c = TcpStream::connect(d.addr).await.unwrap();
    let (head, _) = get_keep_alive(&mut c, &target, "/a", &auth()).await;
    assert_eq!(status(&head), 200, "{head}");
    let (head, _) = get_keep_alive(&mut c, &target, "/b", &basic("w", "wrong")).await;
    assert_eq!(status(&head), 407, "{head}");
    assert_eq!(header(&head, "x-pharox-error"), Some("auth_failed"));
    assert_eq!(header(&head, "connection"), Some("close"));
    let mut rest = Vec::new();
    c.read_to_end(&mut rest).await.unwrap();
    assert!(rest.is_empty(), "closed after the answer");
    let mut c = TcpStream::connect(d.addr).await.unwrap();
    let (head, body) = get_keep_alive(&mut c, &target, "/c", &auth()).await;
    assert_eq!(status(&head), 200, "{head}");
    assert_eq!(body, "origin:/c");
    let seen = origin.seen.lock().unwrap().clone();
    assert_eq!(
        seen.len(),
        2,
        "the refused request never reached the origin: {seen:?}"
    );
    drop(c);
    d.wait_leased("p", 0).await;
    d.stop().await;
}

/// A plain HTTP client that leaves while its request waits for the upstream's answer: the
/// connection ends and its lease is released (the in-flight request is dropped with it).
#[tokio::test]
async fn client_leaving_mid_request_releases_the_lease() {
    let stall = FakeProxy::start(Mode::Stall).await;
    let cfg = pool_config(&[format!("url = \"http://{}\"", stall.addr)], "", "");
    let d = TestDaemon::start(&cfg).await;
    let mut c = TcpStream::connect(d.addr).await.unwrap();
    let req = format!(
        "GET http://example.test/slow HTTP/1.1\r\nHost: example.test\r\nProxy-Authorization: {}\r\n\r\n",
        auth()
    );
    c.write_all(req.as_bytes()).await.unwrap();
    d.wait_leased("p", 1).await;
    drop(c);
    d.wait_leased("p", 0).await;
    d.stop().await;
}

#[tokio::test]
async fn client_abort_during_the_upstream_handshake_releases_the_lease() {
    let stall = FakeProxy::start(Mode::Stall).await;
    let cfg = pool_config(
        &[format!("url = \"http://{}\"", stall.addr)],
        "",
        "[limits]\nconnect_timeout_ms = 600000",
    );
    let d = TestDaemon::start(&cfg).await;
    let mut c = TcpStream::connect(d.addr).await.unwrap();
    c.write_all(
        format!(
            "CONNECT example.test:443 HTTP/1.1\r\nProxy-Authorization: {}\r\n\r\n",
            auth()
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    d.wait_leased("p", 1).await;
    drop(c);
    d.wait_leased("p", 0).await;
    d.stop().await;
}

#[tokio::test]
async fn upstream_closing_mid_tunnel_releases_the_lease() {
    let origin = Origin::start().await;
    let up = FakeProxy::start(Mode::Ok).await;
    let d = TestDaemon::start(&pool_config(
        &[format!("url = \"http://{}\"", up.addr)],
        "",
        "",
    ))
    .await;
    let (mut s, head) = connect(d.addr, &origin.addr.to_string(), Some(&auth()), "").await;
    assert_eq!(status(&head), 200);
    // `Connection: close`: the origin closes, so the upstream closes the tunnel; the client
    // sees EOF and closes too.
    assert!(get_over(&mut s, "o", "/x").await.ends_with("origin:/x"));
    drop(s);
    d.wait_leased("p", 0).await;
    d.stop().await;
}

#[tokio::test]
async fn idle_and_half_closed_tunnels_are_closed() {
    let origin = Origin::start().await;
    let cfg = pool_config(
        &["url = \"direct\"".into()],
        "",
        "[limits]\nidle_timeout_secs = 1",
    );
    let d = TestDaemon::start(&cfg).await;
    // Idle: nothing sent at all.
    let (mut idle, head) = connect(d.addr, &origin.addr.to_string(), Some(&auth()), "").await;
    assert_eq!(status(&head), 200);
    d.wait_leased("p", 0).await;
    let mut buf = [0u8; 1];
    assert_eq!(
        idle.read(&mut buf).await.unwrap_or(0),
        0,
        "the daemon closed the tunnel"
    );
    // Half-closed: the origin closed, the client stays silent and open.
    let (mut s, _) = connect(d.addr, &origin.addr.to_string(), Some(&auth()), "").await;
    s.write_all(b"GET / HTTP/1.1\r\nHost: o\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.unwrap();
    d.wait_leased("p", 0).await;
    drop(s);
    d.stop().await;
}

#[tokio::test]
async fn a_dribbling_client_hits_the_head_timeout_without_a_lease() {
    let cfg = pool_config(
        &["url = \"direct\"".into()],
        "",
        "[limits]\nhead_timeout_ms = 300",
    );
    let d = TestDaemon::start(&cfg).await;
    let mut c = TcpStream::connect(d.addr).await.unwrap();
    c.write_all(b"CONNECT example.test:443 HTTP/1.1\r\nProxy-Auth")
        .await
        .unwrap();
    let head = read_head(&mut c).await;
    assert_eq!(status(&head), 400, "{head}");
    assert_eq!(header(&head, "x-pharox-error"), Some("bad_request"));
    assert_eq!(d.leased("p").await, 0);
    d.stop().await;
}

#[tokio::test]
async fn an_oversized_head_is_refused() {
    let cfg = pool_config(
        &["url = \"direct\"".into()],
        "",
        "[limits]\nmax_head_bytes = 2048",
    );
    let d = TestDaemon::start(&cfg).await;
    let mut c = TcpStream::connect(d.addr).await.unwrap();
    let big = format!(
        "CONNECT example.test:443 HTTP/1.1\r\nX-Big: {}\r\n\r\n",
        "a".repeat(4096)
    );
    let _ = c.write_all(big.as_bytes()).await;
    let head = read_head(&mut c).await;
    assert_eq!(status(&head), 431, "{head}");
    assert_eq!(header(&head, "x-pharox-error"), Some("bad_request"));
    d.stop().await;
}

#[tokio::test]
async fn past_the_connection_cap_clients_are_refused_at_once() {
    let origin = Origin::start().await;
    let cfg = pool_config(
        &["url = \"direct\"".into()],
        "",
        "[limits]\nmax_connections = 1",
    );
    let d = TestDaemon::start(&cfg).await;
    let target = origin.addr.to_string();
    let (first, head) = connect(d.addr, &target, Some(&auth()), "").await;
    assert_eq!(status(&head), 200);
    // HTTP: an immediate 503 with its code and Retry-After, not a wait in the backlog.
    let (_, head) = connect(d.addr, &target, Some(&auth()), "").await;
    assert_eq!(status(&head), 503, "{head}");
    assert_eq!(
        header(&head, "x-pharox-error"),
        Some("too_many_connections")
    );
    assert_eq!(header(&head, "retry-after"), Some("1"));
    // SOCKS5: "no acceptable method", then close.
    let mut s = TcpStream::connect(d.addr).await.unwrap();
    s.write_all(&[5, 1, 2]).await.unwrap();
    let mut reply = Vec::new();
    s.read_to_end(&mut reply).await.unwrap();
    assert_eq!(reply, [5, 0xff]);
    drop(first);
    // Once the first client is gone, its slot is free again.
    for _ in 0..200 {
        let (_, head) = connect(d.addr, &target, Some(&auth()), "").await;
        if status(&head) == 200 {
            return d.stop().await;
        }
        assert_eq!(status(&head), 503, "{head}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the slot was never freed");
}

#[tokio::test]
async fn shutdown_lets_open_tunnels_finish() {
    let origin = Origin::start().await;
    let d = TestDaemon::start(&pool_config(&["url = \"direct\"".into()], "", "")).await;
    let (mut s, head) = connect(d.addr, &origin.addr.to_string(), Some(&auth()), "").await;
    assert_eq!(status(&head), 200);
    let (state, addr) = (d.state.clone(), d.addr);
    let mut d = d;
    d.begin_stop();
    // New clients are refused once draining started...
    for _ in 0..200 {
        if TcpStream::connect(addr).await.is_err() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(
        TcpStream::connect(addr).await.is_err(),
        "the listener is closed"
    );
    // ...while the open tunnel still works, and its end lets shutdown complete.
    assert!(
        get_over(&mut s, "o", "/during-drain")
            .await
            .ends_with("origin:/during-drain")
    );
    drop(s);
    d.join().await;
    assert_eq!(
        state
            .manager
            .storage()
            .pool_stats("p")
            .await
            .unwrap()
            .unwrap()
            .total_leases,
        0
    );
}

#[tokio::test]
async fn shutdown_closes_what_is_left_at_the_deadline() {
    let origin = Origin::start().await;
    let cfg = pool_config(
        &["url = \"direct\"".into()],
        "",
        "[limits]\ndrain_timeout_secs = 1",
    );
    let d = TestDaemon::start(&cfg).await;
    let (mut s, head) = connect(d.addr, &origin.addr.to_string(), Some(&auth()), "").await;
    assert_eq!(status(&head), 200);
    assert_eq!(d.leased("p").await, 1);
    let state = d.state.clone();
    d.stop().await;
    assert_eq!(
        state
            .manager
            .storage()
            .pool_stats("p")
            .await
            .unwrap()
            .unwrap()
            .total_leases,
        0
    );
    let mut buf = [0u8; 1];
    assert_eq!(
        s.read(&mut buf).await.unwrap_or(0),
        0,
        "the tunnel was closed"
    );
}

#[tokio::test]
async fn health_probes_answer_on_the_admin_port() {
    let d = TestDaemon::start(&pool_config(&["url = \"direct\"".into()], "", "")).await;
    for path in ["/healthz", "/readyz"] {
        let mut c = TcpStream::connect(d.admin).await.unwrap();
        c.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
        let mut out = String::new();
        c.read_to_string(&mut out).await.unwrap();
        assert_eq!(status(&out), 200, "{path}: {out}");
    }
    let mut c = TcpStream::connect(d.admin).await.unwrap();
    c.write_all(b"GET /nope HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut out = String::new();
    c.read_to_string(&mut out).await.unwrap();
    assert_eq!(status(&out), 404);
    d.stop().await;
}

#[tokio::test]
async fn open_tunnels_renew_their_lease() {
    let origin = Origin::start().await;
    let cfg = pool_config(&["url = \"direct\"".into()], "lease_seconds = 1", "");
    let d = TestDaemon::start(&cfg).await;
    let (mut s, head) = connect(d.addr, &origin.addr.to_string(), Some(&auth()), "").await;
    assert_eq!(status(&head), 200);
    let before = d
        .state
        .manager
        .storage()
        .list_leases(Some("p"))
        .await
        .unwrap()[0]
        .expires_at;
    // Longer than the lease: without renewal the sweeper would release it.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let leases = d
        .state
        .manager
        .storage()
        .list_leases(Some("p"))
        .await
        .unwrap();
    assert_eq!(leases.len(), 1, "still leased");
    assert!(leases[0].expires_at > before, "renewed");
    assert!(
        get_over(&mut s, "o", "/still")
            .await
            .ends_with("origin:/still")
    );
    drop(s);
    d.wait_leased("p", 0).await;
    d.stop().await;
}

#[tokio::test]
async fn a_rested_upstream_is_tried_again_after_its_cooldown() {
    let dead = FakeProxy::start(Mode::Refuse).await;
    let cfg = pool_config(
        &[format!("url = \"http://{}\"\nid = \"flaky\"", dead.addr)],
        "failover_attempts = 0\n[pools.health]\nmax_failures = 1\ncooldown_seconds = 1",
        "",
    );
    let d = TestDaemon::start(&cfg).await;
    let (_, head) = connect(d.addr, "example.test:443", Some(&auth()), "").await;
    assert_eq!(status(&head), 502, "{head}");
    let storage = d.state.manager.storage();
    let id = ProxyId::from("flaky");
    for _ in 0..200 {
        if storage.get_proxy(&id).await.unwrap().unwrap().proxy.status == ProxyStatus::Inactive {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let (_, head) = connect(d.addr, "example.test:443", Some(&auth()), "").await;
    assert_eq!(status(&head), 503, "resting: no upstream to lease: {head}");
    *dead.mode.lock().unwrap() = Mode::Ok;
    let mut back = false;
    for _ in 0..400 {
        if storage.get_proxy(&id).await.unwrap().unwrap().proxy.status == ProxyStatus::Active {
            back = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(back, "active again after the cooldown");
    d.stop().await;
}

#[tokio::test]
async fn without_required_auth_the_consumer_header_counts() {
    let origin = Origin::start().await;
    let top = "[auth]\nrequired = false";
    let mut cfg = pool_config(&["url = \"direct\"".into()], "", top);
    cfg.push_str("[[consumers]]\nname = \"open-bot\"\npools = [\"p\"]\n");
    let d = TestDaemon::start(&cfg).await;
    let target = origin.addr.to_string();
    let (_, head) = connect(d.addr, &target, None, "X-Pharox-Consumer: open-bot\r\n").await;
    assert_eq!(status(&head), 200, "{head}");
    let (_, head) = connect(d.addr, &target, None, "").await;
    assert_eq!(status(&head), 200, "the default consumer: {head}");
    let (_, head) = connect(d.addr, &target, None, "X-Pharox-Consumer: w\r\n").await;
    assert_eq!(
        status(&head),
        407,
        "a consumer with a password needs it: {head}"
    );
    let (_, head) = connect(d.addr, &target, None, "X-Pharox-Consumer: stranger\r\n").await;
    assert_eq!(status(&head), 407, "{head}");
    d.stop().await;
}

#[tokio::test]
async fn connect_after_plain_requests_on_one_connection_gets_its_own_lease() {
    let origin = Origin::start().await;
    let d = TestDaemon::start(&pool_config(&["url = \"direct\"".into()], "", "")).await;
    let mut c = TcpStream::connect(d.addr).await.unwrap();
    let (head, body) = get_keep_alive(&mut c, &origin.addr.to_string(), "/first", &auth()).await;
    assert_eq!(
        (status(&head), body.as_str()),
        (200, "origin:/first"),
        "{head}"
    );
    let plain_lease = header(&head, "x-pharox-lease-id").unwrap().to_owned();
    let connect_req = format!(
        "CONNECT {0} HTTP/1.1\r\nHost: {0}\r\nProxy-Authorization: {1}\r\n\r\n",
        origin.addr,
        auth()
    );
    c.write_all(connect_req.as_bytes()).await.unwrap();
    let head = read_head(&mut c).await;
    assert_eq!(status(&head), 200, "{head}");
    assert_ne!(
        header(&head, "x-pharox-lease-id"),
        Some(plain_lease.as_str()),
        "the tunnel has its own lease"
    );
    assert!(
        get_over(&mut c, "o", "/in-tunnel")
            .await
            .ends_with("origin:/in-tunnel")
    );
    drop(c);
    d.wait_leased("p", 0).await;
    d.stop().await;
}

#[tokio::test]
async fn a_keep_alive_connection_fails_over_when_its_upstream_goes_away() {
    let a = FakeProxy::start(Mode::OkClose).await;
    let b = FakeProxy::start(Mode::Ok).await;
    let cfg = pool_config(
        &[
            format!("url = \"http://{}\"\nid = \"a\"", a.addr),
            format!("url = \"http://{}\"\nid = \"b\"", b.addr),
        ],
        "failover_attempts = 1",
        "",
    );
    let d = TestDaemon::start(&cfg).await;
    let mut c = TcpStream::connect(d.addr).await.unwrap();
    let mut ids = Vec::new();
    for (i, path) in ["/one", "/two"].iter().enumerate() {
        if i == 1 {
            // "a" closed its connection after the first answer and now refuses new ones.
            *a.mode.lock().unwrap() = Mode::Refuse;
        }
        let (head, body) = get_keep_alive(&mut c, "example.test", path, &auth()).await;
        assert_eq!(status(&head), 200, "{path}: {head}{body}");
        assert_eq!(body, format!("proxied:http://example.test{path}"));
        ids.push(header(&head, "x-pharox-proxy-id").unwrap().to_owned());
    }
    assert_eq!(
        ids,
        ["a", "b"],
        "the second request moved to the live upstream"
    );
    assert_eq!(
        d.leased("p").await,
        1,
        "the failed upstream's lease was given back"
    );
    drop(c);
    d.wait_leased("p", 0).await;
    d.stop().await;
}
