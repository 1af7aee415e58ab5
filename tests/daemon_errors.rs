//! Every row of the error table, header stripping, and the username grammar end to end.

mod common;

use common::daemon::*;

const CONFIG: &str = r#"
default_pool = "p"
[security]
allow_private_targets = true
[[consumers]]
name = "worker-1"
password = "secret"
[[consumers]]
name = "team-a-bot"
password = "pw"
pools = ["p"]
[[pools]]
name = "p"
[[pools.proxies]]
url = "direct"
[[pools]]
name = "q"
[[pools.proxies]]
url = "direct"
"#;

async fn connect_status(d: &TestDaemon, target: &str, auth: Option<&str>, extra: &str) -> String {
    connect(d.addr, target, auth, extra).await.1
}

fn assert_error(head: &str, status_code: u16, code: &str) {
    assert_eq!(status(head), status_code, "{head}");
    assert_eq!(header(head, "x-pharox-error"), Some(code), "{head}");
}

#[tokio::test]
async fn error_table_rows() {
    let origin = Origin::start().await;
    let target = origin.addr.to_string();
    let d = TestDaemon::start(CONFIG).await;
    let ok = basic("worker-1", "secret");

    let h = connect_status(&d, &target, None, "").await;
    assert_error(&h, 407, "auth_required");
    assert_eq!(
        header(&h, "proxy-authenticate"),
        Some("Basic realm=\"pharox\"")
    );
    let h = connect_status(&d, &target, Some(&basic("worker-1", "wrong")), "").await;
    assert_error(&h, 407, "auth_failed");
    assert_eq!(
        header(&h, "proxy-authenticate"),
        Some("Basic realm=\"pharox\"")
    );
    assert_error(
        &connect_status(&d, &target, Some(&basic("nobody", "secret")), "").await,
        407,
        "auth_failed",
    );
    assert_error(
        &connect_status(&d, &target, Some("Bearer abc"), "").await,
        407,
        "auth_failed",
    );

    assert_error(
        &connect_status(&d, "no-port", Some(&ok), "").await,
        400,
        "bad_request",
    );
    assert_error(
        &connect_status(
            &d,
            &target,
            Some(&basic("worker-1-pool-p-colour-red", "secret")),
            "",
        )
        .await,
        400,
        "bad_username",
    );
    assert_error(
        &connect_status(&d, &target, Some(&basic("worker-1-asn-x", "secret")), "").await,
        400,
        "bad_username",
    );
    assert_error(
        &connect_status(&d, &target, Some(&basic("worker-1-pool", "secret")), "").await,
        400,
        "bad_username",
    );

    assert_error(
        &connect_status(&d, &target, Some(&basic("worker-1-pool-zz", "secret")), "").await,
        403,
        "unknown_pool",
    );
    assert_error(
        &connect_status(&d, &target, Some(&basic("team-a-bot-pool-q", "pw")), "").await,
        403,
        "pool_forbidden",
    );
    assert_error(
        &connect_status(&d, &target, Some(&ok), "X-Pharox-Pool: q2\r\n").await,
        403,
        "unknown_pool",
    );
    let own = d.addr.to_string();
    assert_error(
        &connect_status(&d, &own, Some(&ok), "").await,
        403,
        "destination_denied",
    );

    // A dashed consumer name parses; the pool key routes.
    let (mut s, h) = connect(d.addr, &target, Some(&basic("team-a-bot-pool-p", "pw")), "").await;
    assert_eq!(status(&h), 200, "{h}");
    assert!(get_over(&mut s, &target, "/x").await.ends_with("origin:/x"));
    drop(s);
    d.wait_leased("p", 0).await;
    d.stop().await;
}

#[tokio::test]
async fn direct_refuses_loopback_unless_allowed() {
    let origin = Origin::start().await;
    let strict = CONFIG.replace(
        "allow_private_targets = true",
        "allow_private_targets = false",
    );
    let d = TestDaemon::start(&strict).await;
    let h = connect_status(
        &d,
        &origin.addr.to_string(),
        Some(&basic("worker-1", "secret")),
        "",
    )
    .await;
    assert_error(&h, 403, "destination_denied");
    let h = connect_status(
        &d,
        &format!("localhost:{}", origin.addr.port()),
        Some(&basic("worker-1", "secret")),
        "",
    )
    .await;
    assert_error(&h, 403, "destination_denied");
    assert_eq!(d.leased("p").await, 0);
    d.stop().await;
}

#[tokio::test]
async fn upstream_failures_and_timeouts() {
    let refuse = FakeProxy::start(Mode::Refuse).await;
    let stall = FakeProxy::start(Mode::Stall).await;
    let forbid = FakeProxy::start(Mode::Status(403)).await;
    let cfg = |url: String| {
        format!(
            "[limits]\nconnect_timeout_ms = 300\n[[consumers]]\nname = \"w\"\npassword = \"x\"\n[[pools]]\nname = \"p\"\nfailover_attempts = 0\n[[pools.proxies]]\nurl = \"{url}\"\n"
        )
    };
    for (url, status_code, code) in [
        (format!("http://{}", refuse.addr), 502, "upstream_failed"),
        (format!("http://{}", forbid.addr), 502, "upstream_failed"),
        (format!("http://{}", stall.addr), 504, "upstream_timeout"),
    ] {
        let d = TestDaemon::start(&cfg(url.clone())).await;
        let h = connect_status(&d, "example.test:443", Some(&basic("w", "x")), "").await;
        assert_error(&h, status_code, code);
        assert_eq!(d.leased("p").await, 0, "{url}");
        d.stop().await;
    }
}

#[tokio::test]
async fn malformed_and_non_proxy_requests_get_400() {
    let d = TestDaemon::start(CONFIG).await;
    for raw in [
        "GET /local HTTP/1.1\r\nHost: x\r\n\r\n",
        "NOT HTTP\r\n\r\n",
        "GET http://x/ HTTP/1.1\r\nBad Header\r\n\r\n",
    ] {
        let mut s = tokio::net::TcpStream::connect(d.addr).await.unwrap();
        tokio::io::AsyncWriteExt::write_all(&mut s, raw.as_bytes())
            .await
            .unwrap();
        let h = read_head(&mut s).await;
        assert_error(&h, 400, "bad_request");
    }
    d.stop().await;
}
