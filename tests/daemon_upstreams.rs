//! A tunnel and a plain-HTTP request through each upstream kind, with fakes that record the
//! exact CONNECT line and upstream credentials.

mod common;

use common::daemon::*;

fn config(upstream: &str, extra_proxy: &str) -> String {
    format!(
        r#"
[auth]
required = true
[security]
allow_private_targets = true
[[consumers]]
name = "worker-1"
password = "secret"
[[pools]]
name = "p"
[[pools.proxies]]
url = "{upstream}"
{extra_proxy}
"#
    )
}

async fn tunnel_and_plain(daemon: &TestDaemon, origin: &Origin) -> (String, String) {
    let auth = basic("worker-1", "secret");
    let target = origin.addr.to_string();
    let (mut s, head) = connect(daemon.addr, &target, Some(&auth), "").await;
    assert_eq!(status(&head), 200, "{head}");
    assert!(
        header(&head, "x-pharox-proxy-id").is_some()
            && header(&head, "x-pharox-lease-id").is_some()
    );
    let tunneled = get_over(&mut s, &target, "/tunnel").await;
    drop(s);

    let mut c = tokio::net::TcpStream::connect(daemon.addr).await.unwrap();
    let req = format!(
        "GET http://{target}/plain HTTP/1.1\r\nHost: {target}\r\nProxy-Authorization: {auth}\r\nX-Pharox-Pool: p\r\nConnection: close\r\n\r\n"
    );
    tokio::io::AsyncWriteExt::write_all(&mut c, req.as_bytes())
        .await
        .unwrap();
    let mut out = Vec::new();
    tokio::io::AsyncReadExt::read_to_end(&mut c, &mut out)
        .await
        .unwrap();
    daemon.wait_leased("p", 0).await;
    (tunneled, String::from_utf8_lossy(&out).into_owned())
}

#[tokio::test]
async fn http_upstream_gets_exact_connect_and_its_own_credentials() {
    let origin = Origin::start().await;
    let up = FakeProxy::start(Mode::Ok).await;
    let d = TestDaemon::start(&config(
        &format!("http://up-user:up%3Apass@{}", up.addr),
        "",
    ))
    .await;
    let (tunneled, plain) = tunnel_and_plain(&d, &origin).await;
    assert!(tunneled.ends_with("origin:/tunnel"), "{tunneled}");
    assert!(
        plain.contains("200 OK")
            && plain.ends_with(&format!("proxied:http://{}/plain", origin.addr)),
        "{plain}"
    );
    assert!(header(&plain, "x-pharox-proxy-id").is_some(), "{plain}");
    let seen = up.requests();
    let target = origin.addr.to_string();
    assert!(
        seen[0].starts_with(&format!("CONNECT {target} HTTP/1.1\r\n")),
        "{}",
        seen[0]
    );
    assert_eq!(
        header(&seen[0], "proxy-authorization"),
        Some(basic("up-user", "up:pass").as_str())
    );
    assert!(
        seen[1].starts_with(&format!("GET http://{target}/plain HTTP/1.1\r\n")),
        "{}",
        seen[1]
    );
    assert_eq!(
        header(&seen[1], "proxy-authorization"),
        Some(basic("up-user", "up:pass").as_str())
    );
    assert_eq!(
        header(&seen[1], "x-pharox-pool"),
        None,
        "identity headers are not forwarded"
    );
    d.stop().await;
}

#[tokio::test]
async fn https_upstream_with_a_configured_ca() {
    let origin = Origin::start().await;
    let (acceptor, ca_pem) = test_tls();
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, ca_pem).unwrap();
    let up = FakeProxy::start_tls(Mode::Ok, Some(acceptor)).await;
    let url = format!("https://u:p@localhost:{}", up.addr.port());
    let d = TestDaemon::start(&config(
        &url,
        &format!("ca_file = {:?}", ca.display().to_string()),
    ))
    .await;
    let (tunneled, plain) = tunnel_and_plain(&d, &origin).await;
    assert!(tunneled.ends_with("origin:/tunnel"), "{tunneled}");
    assert!(
        plain.ends_with(&format!("proxied:http://{}/plain", origin.addr)),
        "{plain}"
    );
    assert_eq!(
        header(&up.requests()[0], "proxy-authorization"),
        Some(basic("u", "p").as_str())
    );
    d.stop().await;
}

#[tokio::test]
async fn socks5_and_socks5h_upstreams() {
    let origin = Origin::start().await;
    for scheme in ["socks5", "socks5h"] {
        let socks = FakeSocks::start("su", "sp").await;
        let d = TestDaemon::start(&config(&format!("{scheme}://su:sp@{}", socks.addr), "")).await;
        let (tunneled, plain) = tunnel_and_plain(&d, &origin).await;
        assert!(tunneled.ends_with("origin:/tunnel"), "{scheme}: {tunneled}");
        assert!(plain.ends_with("origin:/plain"), "{scheme}: {plain}");
        assert_eq!(
            socks.targets(),
            vec![origin.addr.to_string(); 2],
            "{scheme}"
        );
        d.stop().await;
    }
}

#[tokio::test]
async fn socks5h_passes_names_and_socks5_resolves_them() {
    let origin = Origin::start().await;
    let port = origin.addr.port();
    for (scheme, want) in [
        ("socks5h", format!("localhost:{port}")),
        ("socks5", format!("127.0.0.1:{port}")),
    ] {
        let socks = FakeSocks::start("su", "sp").await;
        let d = TestDaemon::start(&config(&format!("{scheme}://su:sp@{}", socks.addr), "")).await;
        let (mut s, head) = connect(
            d.addr,
            &format!("localhost:{port}"),
            Some(&basic("worker-1", "secret")),
            "",
        )
        .await;
        assert_eq!(status(&head), 200, "{head}");
        assert!(
            get_over(&mut s, "localhost", "/")
                .await
                .ends_with("origin:/")
        );
        drop(s);
        assert_eq!(socks.targets(), [want], "{scheme}");
        d.stop().await;
    }
}

#[tokio::test]
async fn direct_upstream_reaches_the_origin_with_clean_headers() {
    let origin = Origin::start().await;
    let d = TestDaemon::start(&config("direct", "")).await;
    let (tunneled, plain) = tunnel_and_plain(&d, &origin).await;
    assert!(tunneled.ends_with("origin:/tunnel"), "{tunneled}");
    assert!(plain.ends_with("origin:/plain"), "{plain}");
    assert_eq!(
        header(&plain, "x-hop"),
        Some("secret"),
        "end-to-end headers pass"
    );
    let reqs = origin.requests();
    let plain_req = &reqs[1];
    assert!(
        plain_req.starts_with("GET /plain HTTP/1.1\r\n"),
        "origin-form to the origin: {plain_req}"
    );
    assert_eq!(header(plain_req, "proxy-authorization"), None);
    assert_eq!(header(plain_req, "x-pharox-pool"), None);
    d.stop().await;
}
