//! Sticky sessions: same id → same upstream, different ids spread, one lease however many
//! connections, TTL lapse releases, rotation through the admin API, and moving on failure or
//! ban (with the headers saying so).

mod common;

use std::time::Duration;

use common::admin::{admin, metric};
use common::daemon::*;
use serde_json::Value;

async fn two_upstreams(pool_extra: &str) -> (TestDaemon, FakeProxy, FakeProxy, Origin) {
    let origin = Origin::start().await;
    let a = FakeProxy::start(Mode::Ok).await;
    let b = FakeProxy::start(Mode::Ok).await;
    let cfg = format!(
        r#"
[limits]
drain_timeout_secs = 1
[[consumers]]
name = "w"
password = "pw"
[[pools]]
name = "p"
selector = "round_robin"
failover_attempts = 1
{pool_extra}
[[pools.proxies]]
url = "http://{}"
id = "a"
max_concurrency = 1
[[pools.proxies]]
url = "http://{}"
id = "b"
max_concurrency = 1
"#,
        a.addr, b.addr
    );
    (TestDaemon::start(&cfg).await, a, b, origin)
}

async fn open(d: &TestDaemon, origin: &Origin, user: &str) -> (tokio::net::TcpStream, String) {
    let (s, head) = connect(
        d.addr,
        &origin.addr.to_string(),
        Some(&basic(user, "pw")),
        "",
    )
    .await;
    assert_eq!(status(&head), 200, "{user}: {head}");
    (s, head)
}

fn proxy_of(head: &str) -> String {
    header(head, "x-pharox-proxy-id").unwrap().to_owned()
}

#[tokio::test]
async fn a_session_sticks_to_one_upstream_and_counts_once() {
    let (d, _a, _b, origin) = two_upstreams("").await;
    let (s1, h1) = open(&d, &origin, "w-session-abc").await;
    // Both upstreams are exclusive; the session's second connection shares its lease.
    let (s2, h2) = open(&d, &origin, "w-session-abc").await;
    assert_eq!(proxy_of(&h1), proxy_of(&h2));
    assert_eq!(
        header(&h1, "x-pharox-lease-id"),
        header(&h2, "x-pharox-lease-id")
    );
    assert_eq!(header(&h2, "x-pharox-session"), Some("abc"));
    assert_eq!(d.leased("p").await, 1, "one lease for the session");
    drop((s1, s2));
    let (_s3, h3) = open(&d, &origin, "w-session-abc").await;
    assert_eq!(
        proxy_of(&h1),
        proxy_of(&h3),
        "still the same after its connections closed"
    );
    // Another session gets the other upstream.
    let (_s4, h4) = open(&d, &origin, "w-session-xyz").await;
    assert_ne!(proxy_of(&h1), proxy_of(&h4));
    let (_, body) = admin(d.admin, "GET", "/api/v1/sessions", None, "").await;
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["sessions"].as_array().unwrap().len(), 2, "{body}");
    let text = admin(d.admin, "GET", "/metrics", None, "").await.1;
    assert_eq!(
        metric(&text, "pharox_sessions_active", &[("pool", "p")]),
        Some(2.0)
    );
    d.stop().await;
}

#[tokio::test]
async fn the_idle_ttl_releases_the_lease() {
    let (d, _a, _b, origin) = two_upstreams("").await;
    let (s, _) = open(&d, &origin, "w-session-brief-ttl-2").await;
    drop(s);
    // The session keeps its lease between connections...
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(d.leased("p").await, 1);
    // ...until its two-second TTL lapses with nothing open.
    d.wait_leased("p", 0).await;
    let (_, body) = admin(d.admin, "GET", "/api/v1/sessions", None, "").await;
    assert!(body.contains("\"sessions\":[]"), "{body}");
    d.stop().await;
}

#[tokio::test]
async fn rotation_moves_the_next_connection() {
    let (d, _a, _b, origin) = two_upstreams("").await;
    let (s, h1) = open(&d, &origin, "w-session-rot").await;
    drop(s);
    let (code, _) = admin(d.admin, "DELETE", "/api/v1/sessions/w/p/rot", None, "").await;
    assert_eq!(code, 200);
    d.wait_leased("p", 0).await;
    let (_s, h2) = open(&d, &origin, "w-session-rot").await;
    assert_ne!(
        proxy_of(&h1),
        proxy_of(&h2),
        "a new upstream after rotation"
    );
    assert_eq!(
        admin(d.admin, "DELETE", "/api/v1/sessions/w/p/none", None, "")
            .await
            .0,
        404
    );
    d.stop().await;
}

#[tokio::test]
async fn a_session_moves_when_its_upstream_fails_or_is_banned() {
    let (d, a, b, origin) = two_upstreams("").await;
    let (s, h1) = open(&d, &origin, "w-session-m").await;
    drop(s);
    let first = proxy_of(&h1);
    let failing = if first == "a" { &a } else { &b };
    *failing.mode.lock().unwrap() = Mode::Refuse;
    let (s, h2) = open(&d, &origin, "w-session-m").await;
    drop(s);
    let second = proxy_of(&h2);
    assert_ne!(first, second);
    assert_eq!(
        header(&h2, "x-pharox-session-moved-from"),
        Some(first.as_str()),
        "{h2}"
    );
    // Banning the new one moves it back.
    *failing.mode.lock().unwrap() = Mode::Ok;
    let (code, _) = admin(
        d.admin,
        "PUT",
        &format!("/api/v1/proxies/{second}/status"),
        None,
        r#"{"status":"banned"}"#,
    )
    .await;
    assert_eq!(code, 200);
    let (_s, h3) = open(&d, &origin, "w-session-m").await;
    assert_eq!(proxy_of(&h3), first);
    assert_eq!(
        header(&h3, "x-pharox-session-moved-from"),
        Some(second.as_str())
    );
    d.stop().await;
}

#[tokio::test]
async fn session_values_are_checked() {
    let (d, _a, _b, origin) = two_upstreams("").await;
    for user in ["w-ttl-5", "w-session-abc-ttl-0"] {
        let (_, head) = connect(
            d.addr,
            &origin.addr.to_string(),
            Some(&basic(user, "pw")),
            "",
        )
        .await;
        assert_eq!(
            header(&head, "x-pharox-error"),
            Some("bad_username"),
            "{user}: {head}"
        );
    }
    let long = "x".repeat(65);
    let (_, head) = connect(
        d.addr,
        &origin.addr.to_string(),
        Some(&basic("w", "pw")),
        &format!("X-Pharox-Session: {long}\r\n"),
    )
    .await;
    assert_eq!(
        header(&head, "x-pharox-error"),
        Some("bad_username"),
        "{head}"
    );
    let (_s, head) = connect(
        d.addr,
        &origin.addr.to_string(),
        Some(&basic("w", "pw")),
        "X-Pharox-Session: via-header\r\n",
    )
    .await;
    assert_eq!(
        header(&head, "x-pharox-session"),
        Some("via-header"),
        "{head}"
    );
    d.stop().await;
}

#[tokio::test]
async fn closing_a_session_lease_makes_the_session_take_a_new_one() {
    let (d, _a, _b, origin) = two_upstreams("").await;
    let (mut s, h1) = open(&d, &origin, "w-session-cl").await;
    let lease = header(&h1, "x-pharox-lease-id").unwrap().to_owned();
    let (code, _) = admin(
        d.admin,
        "DELETE",
        &format!("/api/v1/leases/{lease}"),
        None,
        "",
    )
    .await;
    assert_eq!(code, 200);
    let mut buf = [0u8; 1];
    assert_eq!(
        tokio::io::AsyncReadExt::read(&mut s, &mut buf)
            .await
            .unwrap_or(0),
        0,
        "its connection was closed"
    );
    let (_s, h2) = open(&d, &origin, "w-session-cl").await;
    assert_ne!(
        header(&h2, "x-pharox-lease-id").unwrap(),
        lease,
        "a fresh lease, not the released one"
    );
    assert_eq!(d.leased("p").await, 1);
    d.stop().await;
}
