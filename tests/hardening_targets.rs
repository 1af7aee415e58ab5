//! Issue 10, items 1 and 2: destinations are validated where they enter (SOCKS5 domain,
//! CONNECT authority, absolute-URI host), and the own-listener and loopback rules hold for
//! every spelling of an address (IPv4-mapped, unspecified, names that resolve to loopback).

mod common;

use common::daemon::*;
use common::hostile::*;

fn upstream_config(up: &Upstream) -> String {
    format!(
        "[limits]\nconnect_timeout_ms = 2000\n[[consumers]]\nname = \"w\"\npassword = \"x\"\n[[pools]]\nname = \"p\"\nfailover_attempts = 0\n[[pools.proxies]]\nurl = \"http://up:secret@{}\"\n",
        up.addr
    )
}

fn up_auth() -> Option<String> {
    Some(basic("up", "secret"))
}

fn assert_error(head: &str, status_code: u16, code: &str, what: &str) {
    assert_eq!(status(head), status_code, "{what}: {head}");
    assert_eq!(header(head, "x-pharox-error"), Some(code), "{what}: {head}");
}

/// Item 1: a SOCKS5 domain is an IP literal or an LDH name; anything else is refused before
/// anything is leased or sent upstream.
#[tokio::test]
async fn socks5_domains_that_are_not_host_names_never_reach_the_upstream() {
    let up = Upstream::start(Behaviour::Ok, up_auth());
    let d = TestDaemon::start(&upstream_config(&up)).await;
    // Fails on the bug: the injection domain was written raw into the upstream's CONNECT
    // line, so the upstream saw a second request carrying its own Proxy-Authorization.
    let hostile: &[&[u8]] = &[
        b"example.com:80 HTTP/1.1\r\nHost: x\r\n\r\nGET http://evil.test/ HTTP/1.1\r\nX-A: b",
        b"exa mple.com",
        b"example.com\r\nX-Injected: 1",
        b"example.com\nX: 1",
        b"a\0b.com",
        b"example.com:80",
        b"exa_mple.com",
        b"-lead.example",
        b"trail-.example",
        b"a..b",
        b"2130706433",
        b"127.1",
        b"0x7f.1",
        b"\xff\xfe",
        b"caf\xc3\xa9.example",
        b"",
    ];
    for name in hostile {
        let (code, _) =
            socks_connect(d.addr, "w", "x", &socks_request(3, &socks_domain(name), 80)).await;
        assert_eq!(code, Some(0x01), "domain {:?}", preview(name));
    }
    let long = vec![b'a'; 64];
    let (code, _) = socks_connect(
        d.addr,
        "w",
        "x",
        &socks_request(3, &socks_domain(&long), 80),
    )
    .await;
    assert_eq!(code, Some(0x01), "a 64-character label");
    assert!(up.seen().is_empty(), "forwarded: {:?}", up.seen());
    assert_eq!(d.leased("p").await, 0);
    // The positive control: a real name gets through, lower-cased, in one clean CONNECT.
    let (code, s) = socks_connect(
        d.addr,
        "w",
        "x",
        &socks_request(3, &socks_domain(b"Example.TEST"), 443),
    )
    .await;
    assert_eq!(code, Some(0));
    let seen = up.seen();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(
        seen[0].head,
        format!(
            "CONNECT example.test:443 HTTP/1.1\r\nHost: example.test:443\r\nProxy-Authorization: {}\r\n\r\n",
            basic("up", "secret")
        )
    );
    assert!(up.violations().is_empty(), "{:?}", up.violations());
    drop(s);
    d.wait_leased("p", 0).await;
    d.stop().await;
}

/// Item 1: a CONNECT authority and an absolute URI's host are validated the same way.
#[tokio::test]
async fn connect_authorities_and_uri_hosts_that_are_not_host_names_are_refused() {
    let up = Upstream::start(Behaviour::Ok, up_auth());
    let d = TestDaemon::start(&upstream_config(&up)).await;
    let auth = basic("w", "x");
    // Fails on the bug: these were forwarded into the upstream's request line unchecked.
    for target in [
        "exa_mple.com:80",
        "a..b:80",
        "-lead.example:443",
        "2130706433:80",
        "127.1:80",
        "0x7f.1:443",
        "example.com:+80",
        "example.com:0",
        "example.com:65536",
        "[127.0.0.1]:80",
        "a:b:80",
        "example.com%0d%0aX:80",
    ] {
        let (_, head) = connect(d.addr, target, Some(&auth), "").await;
        assert_error(&head, 400, "bad_request", target);
    }
    let mut wrong = Vec::new();
    for uri in [
        "http://exa_mple.com/",
        "http://2130706433/",
        "http://127.1/",
        "http://a..b/",
        "http://example.com%0d%0aX/",
        "http://-lead.example/",
    ] {
        let req = format!(
            "GET {uri} HTTP/1.1\r\nHost: example.com\r\nProxy-Authorization: {auth}\r\nConnection: close\r\n\r\n"
        );
        let got = exchange(
            d.addr,
            req.as_bytes(),
            false,
            std::time::Duration::from_secs(30),
        )
        .await;
        let (resp, _) = responses(&got.bytes);
        if resp.len() != 1 || resp[0].status != 400 || resp[0].code() != Some("bad_request") {
            wrong.push(format!("{uri}: {}", preview(&got.bytes)));
        }
    }
    assert!(up.seen().is_empty(), "forwarded: {:?}", up.seen());
    assert!(wrong.is_empty(), "not answered 400 bad_request: {wrong:#?}");
    assert_eq!(d.leased("p").await, 0);
    d.stop().await;
}

fn direct_config(allow_private: bool) -> String {
    format!(
        "[security]\nallow_private_targets = {allow_private}\n[[consumers]]\nname = \"w\"\npassword = \"x\"\n[[pools]]\nname = \"p\"\n[[pools.proxies]]\nurl = \"direct\"\n"
    )
}

/// Every spelling of "this host" for port `port`, as a CONNECT authority.
fn this_host_authorities(port: u16) -> Vec<String> {
    [
        "127.0.0.1",
        "0.0.0.0",
        "[::ffff:127.0.0.1]",
        "[::ffff:7f00:1]",
        "[0:0:0:0:0:ffff:127.0.0.1]",
        "[::ffff:0.0.0.0]",
        "[::]",
        "[::1]",
        "127.0.0.2",
        "127.255.255.254",
        "localhost",
        "LOCALHOST.",
    ]
    .iter()
    .map(|h| format!("{h}:{port}"))
    .collect()
}

/// Numeric spellings that are not IP literals: refused as bad requests, never dialled.
fn numeric_spellings(port: u16) -> Vec<String> {
    ["127.1", "2130706433", "0x7f000001", "0177.0.0.1", "0"]
        .iter()
        .map(|h| format!("{h}:{port}"))
        .collect()
}

/// SOCKS5 addresses of this host for `port`: IPv4, IPv6 (mapped, unspecified, loopback) and
/// domains.
fn this_host_socks(port: u16) -> Vec<(String, Vec<u8>)> {
    let v6 = |s: &str| {
        let ip: std::net::Ipv6Addr = s.parse().unwrap();
        (s.to_owned(), socks_request(4, &ip.octets(), port))
    };
    vec![
        ("127.0.0.1".into(), socks_request(1, &[127, 0, 0, 1], port)),
        ("0.0.0.0".into(), socks_request(1, &[0, 0, 0, 0], port)),
        ("127.0.0.2".into(), socks_request(1, &[127, 0, 0, 2], port)),
        v6("::ffff:127.0.0.1"),
        v6("::ffff:0.0.0.0"),
        v6("::"),
        v6("::1"),
        (
            "d:localhost".into(),
            socks_request(3, &socks_domain(b"localhost"), port),
        ),
        (
            "d:0.0.0.0".into(),
            socks_request(3, &socks_domain(b"0.0.0.0"), port),
        ),
        (
            "d:[::ffff:7f00:1]".into(),
            socks_request(3, &socks_domain(b"[::ffff:7f00:1]"), port),
        ),
        (
            "d:::ffff:127.0.0.1".into(),
            socks_request(3, &socks_domain(b"::ffff:127.0.0.1"), port),
        ),
    ]
}

/// Item 2: with private targets allowed, only the own-listener rule protects the admin API
/// and the proxy port, and it must hold for every spelling of this host.
#[tokio::test]
async fn own_listeners_are_refused_under_every_spelling() {
    let d = TestDaemon::start(&direct_config(true)).await;
    let auth = basic("w", "x");
    for port in [d.admin.port(), d.addr.port()] {
        // Fails on the bug: 0.0.0.0 and the IPv4-mapped forms reached the admin API.
        for target in this_host_authorities(port) {
            let (_, head) = connect(d.addr, &target, Some(&auth), "").await;
            assert_error(&head, 403, "destination_denied", &target);
        }
        for target in numeric_spellings(port) {
            let (_, head) = connect(d.addr, &target, Some(&auth), "").await;
            assert_error(&head, 400, "bad_request", &target);
        }
        for (what, req) in this_host_socks(port) {
            let (code, _) = socks_connect(d.addr, "w", "x", &req).await;
            assert!(
                code == Some(0x02) || (what.starts_with("d:") && code == Some(0x01)),
                "SOCKS5 {what}:{port} answered {code:?}"
            );
        }
    }
    // Plain HTTP to the admin API, every spelling: refused, and no admin JSON comes back.
    for authority in this_host_authorities(d.admin.port()) {
        let req = format!(
            "GET http://{authority}/api/v1/pools HTTP/1.1\r\nHost: {authority}\r\nProxy-Authorization: {auth}\r\nConnection: close\r\n\r\n"
        );
        let got = exchange(
            d.addr,
            req.as_bytes(),
            false,
            std::time::Duration::from_secs(30),
        )
        .await;
        let (resp, _) = responses(&got.bytes);
        assert_eq!(resp.len(), 1, "{authority}: {}", preview(&got.bytes));
        assert_eq!(resp[0].status, 403, "{authority}: {}", resp[0].head);
        assert_eq!(resp[0].code(), Some("destination_denied"), "{authority}");
        assert!(
            !String::from_utf8_lossy(&resp[0].body).contains("\"pools\""),
            "{authority} reached the admin API"
        );
    }
    assert_eq!(d.leased("p").await, 0);
    d.stop().await;
}

/// Item 2: by default a `direct` upstream refuses loopback, link-local and this-host
/// targets in every spelling, judged on the address dialled (names after resolution).
#[tokio::test]
async fn direct_refuses_this_host_under_every_spelling_by_default() {
    let origin = Origin::start().await;
    let d = TestDaemon::start(&direct_config(false)).await;
    let auth = basic("w", "x");
    let port = origin.addr.port();
    // Fails on the bug: 0.0.0.0 and the IPv4-mapped forms were dialled and reached the
    // origin on 127.0.0.1.
    let mut targets = this_host_authorities(port);
    targets.extend(["169.254.0.1", "[fe80::1]", "0.1.2.3"].map(|h| format!("{h}:{port}")));
    for target in &targets {
        let (_, head) = connect(d.addr, target, Some(&auth), "").await;
        assert_error(&head, 403, "destination_denied", target);
    }
    for target in numeric_spellings(port) {
        let (_, head) = connect(d.addr, &target, Some(&auth), "").await;
        assert_error(&head, 400, "bad_request", &target);
    }
    for authority in this_host_authorities(port) {
        let req = format!(
            "GET http://{authority}/x HTTP/1.1\r\nHost: {authority}\r\nProxy-Authorization: {auth}\r\nConnection: close\r\n\r\n"
        );
        let got = exchange(
            d.addr,
            req.as_bytes(),
            false,
            std::time::Duration::from_secs(30),
        )
        .await;
        let (resp, _) = responses(&got.bytes);
        assert_eq!(resp.len(), 1, "{authority}: {}", preview(&got.bytes));
        assert_eq!(resp[0].status, 403, "{authority}: {}", resp[0].head);
        assert_eq!(resp[0].code(), Some("destination_denied"), "{authority}");
    }
    for (what, req) in this_host_socks(port) {
        let (code, _) = socks_connect(d.addr, "w", "x", &req).await;
        assert!(
            code == Some(0x02) || (what.starts_with("d:") && code == Some(0x01)),
            "SOCKS5 {what}:{port} answered {code:?}"
        );
    }
    assert!(origin.requests().is_empty(), "{:?}", origin.requests());
    assert_eq!(d.leased("p").await, 0);
    d.stop().await;
}
